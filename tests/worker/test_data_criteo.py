"""Criteo TSV reader: parsing against a plain reference, bad rows, streaming, sharding, resume."""

import gzip
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.worker.reference_features import assert_batches_equal, batch_of_rows, key, rows_of
from worker.batch import Batch
from worker.criteo import CriteoTsvReader, write_criteo_sample
from worker.data_options import BadRowPolicy
from worker.data_paths import files_digest
from worker.features import hash_categorical, missing_key
from worker.readers import ReaderConfig
from worker.shares import byte_ranges


def config(**kwargs) -> ReaderConfig:
    kwargs.setdefault("global_batch_size", 64)
    kwargs.setdefault("read_block_bytes", 2048)
    return ReaderConfig(**kwargs)


def test_parses_sample_like_the_reference_and_skips_bad_rows(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 300, num_bad_rows=12, seed=1)
    reader = CriteoTsvReader([sample.path], config())
    batches = list(reader)
    assert [len(b) for b in batches] == [64, 64, 64, 64, 44]
    assert reader.num_bad_rows == 12
    assert_batches_equal(Batch.cat(batches), batch_of_rows(sample.good_rows, 13))
    files = {"count": 1, "sha256": files_digest(reader.files)}
    assert reader.state() == {"epoch": 1, "unit": 0, "offset": 0, "num_batches": 5, "buffer": None, "files": files}
    assert reader.num_parsed == 312  # every line, bad ones included


def test_streams_in_blocks_smaller_than_the_file(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 200, num_bad_rows=0, seed=2)
    with sample.path.open("a") as f:
        f.write("garbage\n")
    block = 1024
    assert sample.path.stat().st_size > 10 * block
    reader = CriteoTsvReader([sample.path], config(global_batch_size=8, read_block_bytes=block, bad_rows="fail"))
    iterator = iter(reader)
    # The first batches come out before the reader has seen the bad last line: it streams.
    first = [next(iterator) for _ in range(3)]
    assert reader.state()["offset"] == 24
    assert_batches_equal(Batch.cat(first), batch_of_rows(sample.good_rows[:24], 13))
    with pytest.raises(ValueError, match=f"{sample.path}:201: bad row"):
        list(iterator)


def test_bad_rows_are_logged_rate_limited(tmp_path, caplog):
    sample = write_criteo_sample(tmp_path / "day.tsv", 100, num_bad_rows=10, seed=3)
    with caplog.at_level(logging.WARNING, logger="worker.readers"):
        reader = CriteoTsvReader([sample.path], config(bad_row_log_interval_s=3600))
        list(reader)
    assert reader.num_bad_rows == 10
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert f"{sample.path}:{sample.bad_lines[0]}" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.readers"):
        list(CriteoTsvReader([sample.path], config(bad_row_log_interval_s=0)))
    logged = [int(r.getMessage().split(f"{sample.path}:")[1].split(":")[0]) for r in caplog.records]
    assert sorted(logged) == sample.bad_lines  # every bad row's own line, whatever kind of bad it is


def test_the_bad_rows_total_is_logged_once_at_the_end(tmp_path, caplog):
    """Rate-limited, the lines said "1 in all" for a reader that skipped half its rows in a burst
    (a review): the end of training logs the total of those no line counted."""
    sample = write_criteo_sample(tmp_path / "day.tsv", 100, num_bad_rows=10, seed=3)
    reader = CriteoTsvReader([sample.path], config(bad_row_log_interval_s=3600))
    with caplog.at_level(logging.WARNING, logger="worker.readers"):
        list(reader)
        reader.log_bad_rows_total()
        reader.log_bad_rows_total()  # nothing new: no second line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1] == "skipped 10 bad row(s) in all (9 since the last line)", lines


BAD_LINES = {
    "too few fields": "1\t2\t3",
    "too many fields": "\t".join(["1"] + ["5"] * 13 + ["ab"] * 27),
    "non-numeric integer": "\t".join(["1"] + ["5"] * 12 + ["12x"] + ["ab"] * 26),
    "non-numeric label": "\t".join(["yes"] + ["5"] * 13 + ["ab"] * 26),
    "label out of range": "\t".join(["2"] + ["5"] * 13 + ["ab"] * 26),
    "empty line": "",
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_fail_mode_names_file_and_line(tmp_path, kind):
    good = "\t".join(["0"] + ["1"] * 13 + ["68fd1e64"] * 26)
    path = tmp_path / "day.tsv"
    path.write_text("\n".join([good] * 4 + [BAD_LINES[kind]] + [good] * 3) + "\n")
    with pytest.raises(ValueError, match=f"{path}:5: bad row"):
        list(CriteoTsvReader([path], config(bad_rows="fail")))
    skipping = CriteoTsvReader([path], config(bad_rows=BadRowPolicy.SKIP))
    assert sum(len(b) for b in skipping) == 7
    assert skipping.num_bad_rows == 1


def test_empty_fields_and_the_same_string_in_two_features(tmp_path):
    fields = ["1", "", "-3", "7"] + ["deadbeef", "deadbeef", "", "", "DEADBEEF", "not hex at all"]
    path = tmp_path / "small.tsv"
    path.write_text("\t".join(fields) + "\n")
    (batch,) = CriteoTsvReader([path], config(num_dense=3, num_sparse=6))
    np.testing.assert_allclose(batch.dense.numpy(), [[0.0, 0.0, np.log1p(7)]], rtol=1e-6)
    keys = batch.sparse[0]
    assert keys[0] != keys[1]
    assert keys[2] == missing_key(2) and keys[3] == missing_key(3) and keys[2] != keys[3]
    assert keys.tolist() == [key(f, t) for f, t in enumerate(fields[4:])]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="0123456789abcdefABCDEF", max_size=20),
            st.text(max_size=12).filter(lambda s: "\x00" not in s),
        ),
        max_size=30,
    ),
    st.integers(0, 40),
)
def test_hash_categorical_matches_the_reference(strings, feature):
    import pyarrow as pa

    column = pa.array(strings, type=pa.string())
    assert hash_categorical(column, feature).tolist() == [key(feature, s) for s in strings]
    if len(strings) > 2:  # an offset slice reads the right bytes
        assert hash_categorical(column.slice(1), feature).tolist() == [key(feature, s) for s in strings[1:]]


def write_files(tmp_path, sizes, gz=False):
    samples = []
    for i, size in enumerate(sizes):
        sample = write_criteo_sample(tmp_path / f"part-{i}.tsv", size, num_bad_rows=5, seed=10 + i)
        name = sample.path
        if gz:
            name = tmp_path / f"part-{i}.tsv.gz"
            name.write_bytes(gzip.compress(sample.path.read_bytes()))
        samples.append((name, sample))
    return samples


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_resume_from_state_yields_the_remaining_batches(tmp_path, gz):
    samples = write_files(tmp_path, [100, 70, 90], gz=gz)
    paths = [name for name, _ in samples]
    cfg = config(global_batch_size=48)
    original = CriteoTsvReader(paths, cfg)
    iterator = iter(original)
    head = [next(iterator) for _ in range(3)]
    state = json.loads(json.dumps(original.state()))
    assert state["unit"] == 1 and state["num_batches"] == 3  # one unit per small file
    rest = list(iterator)
    resumed = CriteoTsvReader(paths, cfg)
    resumed.restore(state)
    again = list(resumed)
    assert len(again) == len(rest) == 3
    for a, b in zip(again, rest, strict=True):
        assert_batches_equal(a, b)
    expected = batch_of_rows([row for _, s in samples for row in s.good_rows], 13)
    assert_batches_equal(Batch.cat(head + again), expected)


def test_resume_at_end_of_file_without_trailing_newline(tmp_path):
    row = "\t".join(["1"] + ["2"] * 13 + ["0a"] * 26)
    path = tmp_path / "day.tsv"
    path.write_text("\n".join([row] * 4))
    copy = tmp_path / "day-copy.tsv"
    copy.write_bytes(path.read_bytes())
    reader = CriteoTsvReader([path, copy], config(global_batch_size=4))
    iterator = iter(reader)
    next(iterator)
    files = {"count": 2, "sha256": files_digest(reader.files)}
    assert reader.state() == {"epoch": 0, "unit": 0, "offset": 4, "num_batches": 1, "buffer": None, "files": files}
    resumed = CriteoTsvReader([path, copy], config(global_batch_size=4))
    resumed.restore(reader.state())
    assert [len(b) for b in resumed] == [4]
    beyond = CriteoTsvReader([path], config())
    beyond.restore({"epoch": 0, "unit": 0, "offset": 9, "num_batches": 0})
    with pytest.raises(ValueError, match="state.offset"):
        list(beyond)


def test_ranks_split_the_lines_of_one_file_by_byte_ranges(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 400, num_bad_rows=9, seed=11)
    cfg = config(global_batch_size=40, read_block_bytes=1024, range_bytes=4096, drop_last=False)
    total = len(sample.good_rows) + 9
    for world in (1, 2, 4):
        readers = [CriteoTsvReader([sample.path], cfg, rank=r, world_size=world) for r in range(world)]
        parts = [Batch.cat(list(reader)) for reader in readers]
        # Every line parsed once over all ranks, and each rank parses its ranges' lines only.
        assert sum(reader.num_parsed for reader in readers) == total
        data = sample.path.read_bytes()
        line_starts = np.array([0] + [i + 1 for i, c in enumerate(data[:-1]) if c == ord("\n")])
        lines_in = [int(((line_starts >= u.start) & (line_starts < u.end)).sum()) for u in readers[0].units_by_file[0]]
        assert len(lines_in) >= world
        for reader in readers:
            # Exactly the lines that begin in its ranges: its share plus at most one range's worth.
            assert reader.num_parsed == sum(lines_in[u.part] for u in reader.share(0))
            assert reader.num_parsed <= -(-total // world) + max(lines_in)
        assert rows_of(Batch.cat(parts)) == rows_of(batch_of_rows(sample.good_rows, 13))
        assert sum(reader.num_bad_rows for reader in readers) == 9


def test_config_and_argument_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="bad_rows"):
        ReaderConfig(bad_rows="maybe")
    with pytest.raises(ValueError, match="global_batch_size"):
        ReaderConfig(global_batch_size=0)
    with pytest.raises(ValueError, match="global_batch_size"):
        CriteoTsvReader([tmp_path / "x.tsv"], ReaderConfig(global_batch_size=10), rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        CriteoTsvReader([tmp_path / "x.tsv"], ReaderConfig(), rank=2, world_size=2)
    with pytest.raises(TypeError, match="paths"):
        CriteoTsvReader(str(tmp_path / "x.tsv"), ReaderConfig())
    sample = write_criteo_sample(tmp_path / "x.tsv", 10, num_bad_rows=0)
    with pytest.raises(ValueError, match="state.unit"):
        CriteoTsvReader([sample.path], ReaderConfig()).restore({"epoch": 0, "unit": 5, "offset": 0, "num_batches": 0})


def test_hash_categorical_fast_path_for_eight_hex_digits():
    import pyarrow as pa

    strings = ["68fd1e64", "DEADBEEF", "0000000a", "zzzzzzzz", "12345g78", "", "abc", "ffffffffffffffff", "8a2b3c4d"]
    column = pa.array(strings, type=pa.string())
    assert hash_categorical(column, 3).tolist() == [key(3, s) for s in strings]
    every_eight = [s for s in strings if len(s) == 8]  # one contiguous buffer of 8-byte strings
    assert hash_categorical(pa.array(every_eight), 5).tolist() == [key(5, s) for s in every_eight]
    assert hash_categorical(pa.array(every_eight).slice(2), 5).tolist() == [key(5, s) for s in every_eight[2:]]


def test_a_count_past_float64_s_range_is_a_bad_row_not_an_infinite_feature(tmp_path):
    """400 digits parse as a valid integer, and as inf in float64: it fed the dense tower inf
    (poisoning it) with bad_rows = "fail" too. It is a bad row now, skipped and counted, or failed."""
    path = tmp_path / "inf.tsv"
    path.write_text("1\t5\ta1b2c3d4\n0\t" + "9" * 400 + "\tdeadbeef\n1\t-3\t\n")
    reader = CriteoTsvReader([str(path)], ReaderConfig(global_batch_size=2, num_dense=1, num_sparse=1,
                                                       prefetch_batches=0))
    batches = list(reader)
    assert reader.num_bad_rows == 1
    assert all(np.isfinite(b.dense.numpy()).all() for b in batches)
    failing = CriteoTsvReader([str(path)], ReaderConfig(global_batch_size=3, num_dense=1, num_sparse=1,
                                                        prefetch_batches=0, bad_rows=BadRowPolicy.FAIL))
    with pytest.raises(ValueError, match=r"inf\.tsv:2: bad row: I1: not an integer within float64's range"):
        list(failing)


def test_bytes_that_are_not_utf8_are_a_categorical_s_value_or_a_bad_number(tmp_path):
    """One Latin-1 byte anywhere failed the whole pass ("invalid UTF8 data"), bad_rows = "skip"
    or not: in a categorical it is hashed as the bytes it is, in a count the row is a bad row."""
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"1\t5\tcaf\xe9\n0\t7\tcafe\n1\t\xff3\tdeadbeef\n0\t2\tcaf\xe9\n")
    reader = CriteoTsvReader([str(path)], ReaderConfig(global_batch_size=3, num_dense=1, num_sparse=1,
                                                       prefetch_batches=0, drop_last=False))
    (batch,) = list(reader)
    assert reader.num_bad_rows == 1 and len(batch) == 3
    sparse = np.asarray(batch.sparse)[:, 0]
    assert sparse[0] == sparse[2] != sparse[1]  # b"caf\xe9" twice, b"cafe" once
    failing = CriteoTsvReader([str(path)], ReaderConfig(global_batch_size=3, num_dense=1, num_sparse=1,
                                                        prefetch_batches=0, bad_rows=BadRowPolicy.FAIL))
    with pytest.raises(ValueError, match=r"latin1\.tsv:3: bad row: I1: not an integer"):
        list(failing)


def test_held_out_rows_fewer_than_a_batch_are_all_scored(tmp_path):
    """The held-out reader dropped a short last batch as the training reader does: 255 held-out
    rows and batch_size 256 gave no evaluation at all, and any held-out file lost its tail."""
    from ps.table.config import TableConfig
    from tests.helpers.processes import make_job
    from tests.worker.training_jobs import training_toml
    from worker.data_sources import eval_batches
    from worker.train_config import load_training_job

    held_out = write_criteo_sample(tmp_path / "eval.tsv", 255, num_bad_rows=0, seed=4, num_dense=13, num_sparse=2)
    trained = write_criteo_sample(tmp_path / "train.tsv", 300, num_bad_rows=0, seed=5, num_dense=13, num_sparse=2)
    train = {"workers": 1, "steps": 1, "batch_size": 256, "tables": ["c"], "eval_batches": 10,
             "output_dir": str(tmp_path / "out")}
    data = {"source": "criteo", "paths": [str(trained.path)], "eval_paths": [str(held_out.path)], "num_sparse": 2}
    ps = make_job(tables=[TableConfig("c", dim=4)], num_shards=1)
    (tmp_path / "job.toml").write_text(training_toml(ps, train, {"bottom_sizes": [8], "top_sizes": [16]}, data, {}))
    batches = eval_batches(load_training_job(tmp_path / "job.toml"))
    assert [b.labels.shape[0] for b in batches] == [255]


def test_held_out_files_that_are_training_files_are_refused_naming_the_file(tmp_path):
    """data.eval_paths naming a file data.paths trains on (the same file, or a folder holding it)
    was read as held-out: the evaluation scored rows the model saw, and its AUC looked good."""
    from ps.table.config import TableConfig
    from tests.helpers.processes import make_job
    from tests.worker.training_jobs import training_toml
    from worker.data_sources import eval_batches
    from worker.train_config import load_training_job

    folder = tmp_path / "day_0"
    folder.mkdir()
    trained = write_criteo_sample(folder / "part-0.tsv", 300, num_bad_rows=0, seed=5, num_dense=13, num_sparse=2)
    held_out = write_criteo_sample(tmp_path / "eval.tsv", 100, num_bad_rows=0, seed=4, num_dense=13, num_sparse=2)
    train = {"workers": 1, "steps": 1, "batch_size": 64, "tables": ["c"], "output_dir": str(tmp_path / "out")}
    ps = make_job(tables=[TableConfig("c", dim=4)], num_shards=1)
    for eval_paths in ([str(held_out.path), str(trained.path)], [str(folder)]):
        data = {"source": "criteo", "paths": [str(folder)], "eval_paths": eval_paths, "num_sparse": 2}
        (tmp_path / "job.toml").write_text(training_toml(ps, train, {"bottom_sizes": [8], "top_sizes": [16]}, data, {}))
        index = len(eval_paths) - 1
        refused = rf"^data\.eval_paths\[{index}\]: .*names .*part-0\.tsv, which data\.paths trains on"
        with pytest.raises(ValueError, match=refused):
            eval_batches(load_training_job(tmp_path / "job.toml"))
    # A symbolic link to a training file is that file (it passed as held-out: a review).
    link = tmp_path / "eval-link.tsv"
    link.symlink_to(trained.path)
    data = {"source": "criteo", "paths": [str(folder)], "eval_paths": [str(link)], "num_sparse": 2}
    (tmp_path / "job.toml").write_text(training_toml(ps, train, {"bottom_sizes": [8], "top_sizes": [16]}, data, {}))
    with pytest.raises(ValueError, match=r"^data\.eval_paths\[0\]: .*eval-link\.tsv, which data\.paths trains on"):
        eval_batches(load_training_job(tmp_path / "job.toml"))


@pytest.mark.parametrize("block", [37, 50, 64, 1 << 20])
@pytest.mark.parametrize("range_bytes", [None, 120])
def test_a_bare_carriage_return_is_a_bad_row_and_resumes_stay_exact(tmp_path, block, range_bytes):
    """pyarrow ends a row at a bare \\r; the byte ranges and a resume's skipped lines count \\n
    only. Each bare \\r moved every later resume offset a line on (rows skipped), and the part of
    its line before it passed as a good row. Now such a line is one bad row at its own line, CRLF
    lines read as rows, and a resume from any batch reads the rest exactly, whatever the reads'
    sizes (a \\r at the end of one read, its \\n at the start of the next) and the byte ranges."""
    lines = []
    for i in range(40):
        c2 = f"{i:08x}"
        if i in (5, 6, 19):
            c2 = f"ab\rcd{i}"
        if i == 7:
            c2 = "x\r\ry"
        end = "\r\n" if i % 3 == 0 else "\n"
        lines.append(f"1\t{i}\t{i:08x}\t{c2}{end}")
    path = tmp_path / "cr.tsv"
    # The last line ends the file with a \r and no \n (a CRLF file without its last line feed): a
    # good row; as a tab, that \r made it a bad one (a review's repro).
    path.write_bytes("".join(lines).encode() + b"1\t40\tz\tw\r")
    extra = {} if range_bytes is None else {"range_bytes": range_bytes}
    cfg = ReaderConfig(global_batch_size=3, num_dense=1, num_sparse=2, prefetch_batches=0, read_block_bytes=block,
                       **extra)

    def counts(batches) -> list[int]:
        return [round(float(v)) for b in batches for v in np.expm1(b.dense.numpy().ravel())]

    reader = CriteoTsvReader([str(path)], cfg)
    batches, states = [], []
    for batch in reader:
        batches.append(batch)
        states.append(reader.state())
    assert counts(batches) == [i for i in range(41) if i not in (5, 6, 7, 19)]  # file order, each row once
    assert reader.num_bad_rows == 4  # lines 6, 7, 8 and 20
    for k, state in enumerate(states[:-1]):
        resumed = CriteoTsvReader([str(path)], cfg)
        resumed.restore(state)
        assert counts(list(resumed)) == counts(batches[k + 1 :]), f"resume after batch {k}"


# Lines of a file with num_dense = 1, num_sparse = 2 (4 fields): index -> (bytes, line end). I1 is
# the index, so a row's count says which line it came from. None: a good row (C2 below).
UNDECODABLE = {
    3: (b"1\t3\tcaf\xe9\tab\textra", b"\n"),  # a field too many and a Latin-1 byte (the review's row)
    4: (b"1\t4\t\xff\xfe", b"\n"),  # a field too few
    9: (b"1\t9\t\xe6\x97\xa5\tcaf\xc3\tx\ty", b"\n"),  # a UTF-8 character, then a cut one
    10: (b"0\t1\xe90\tab\tcd", b"\n"),  # the right field count, a count that is not UTF-8
    11: (b"\xb91\t11\tab\tcd", b"\n"),  # the right field count, a label that is not UTF-8
    13: (b"0\t13\tabcdefghijklmnop\tqrst\tuvw\xe9", b"\n"),  # ASCII up to its last field
    15: (b"1\t15\t" + b"\xe9" * 20 + b"\tx\ty", b"\n"),  # most of a 37-byte read not UTF-8
    16: (b"0\t16\tab\tcd\te\xe9", b"\r\n"),  # a CRLF line
    19: (b"1\t19\t\xe8\xe9", b""),  # the last line, without its line feed
}
GOOD_C2 = [b"caf\xc3\xa9", b"caf\xe9", b"\xe6\x97\xa5\xe6\x9c\xac", b"plain"]  # UTF-8, Latin-1, UTF-8, ASCII


def undecodable_sample(path) -> list[list[bytes]]:
    """Writes UNDECODABLE's file at `path`; returns its good rows' fields, in file order."""
    good, lines = [], []
    for i in range(20):
        if i in UNDECODABLE:
            lines.append(UNDECODABLE[i][0] + UNDECODABLE[i][1])
            continue
        fields = [b"1", b"%d" % i, b"%08x" % i, GOOD_C2[i % len(GOOD_C2)]]
        good.append(fields)
        lines.append(b"\t".join(fields) + (b"\r\n" if i % 5 == 0 else b"\n"))
    path.write_bytes(b"".join(lines))
    return good


@pytest.mark.parametrize("block", [37, 64, 1 << 20])
@pytest.mark.parametrize("range_bytes", [None, 90])
def test_a_row_of_the_wrong_field_count_with_bytes_that_are_not_utf8_is_a_bad_row(tmp_path, block, range_bytes):
    """pyarrow decodes a row of the wrong field count as UTF-8 before the invalid-row handler sees
    it: one that was not UTF-8 ended the pass ("cannot parse as Criteo TSV"), bad_rows = "skip" or
    not. Now it is one bad row at its own line, as are rows whose count or label is not UTF-8; the
    good rows are read once each, in file order, their categoricals' bytes as they are (UTF-8 or
    not), whatever the reads' sizes (a character, or a bad line, cut between two reads) and the
    byte ranges, and a resume from any batch reads the rest exactly."""
    path = tmp_path / "mixed.tsv"
    good = undecodable_sample(path)
    extra = {} if range_bytes is None else {"range_bytes": range_bytes}
    cfg = ReaderConfig(global_batch_size=3, num_dense=1, num_sparse=2, prefetch_batches=0, read_block_bytes=block,
                       **extra)
    reader = CriteoTsvReader([str(path)], cfg)
    assert range_bytes is None or len(reader.units_by_file[0]) > 1

    def counts(batches) -> list[int]:
        return [round(float(v)) for b in batches for v in np.expm1(b.dense.numpy().ravel())]

    batches, states = [], []
    for batch in reader:
        batches.append(batch)
        states.append(reader.state())
    assert counts(batches) == [i for i in range(20) if i not in UNDECODABLE]
    assert_batches_equal(Batch.cat(batches), batch_of_rows(good, 1))
    assert reader.num_bad_rows == len(UNDECODABLE) and reader.num_parsed == 20
    for k, state in enumerate(states[:-1]):
        resumed = CriteoTsvReader([str(path)], cfg)
        resumed.restore(state)
        assert counts(list(resumed)) == counts(batches[k + 1 :]), f"resume after batch {k}"


@pytest.mark.parametrize("line", sorted(UNDECODABLE))
@pytest.mark.parametrize("range_bytes", [None, 90])
def test_fail_mode_names_the_line_of_a_row_that_is_not_utf8(tmp_path, line, range_bytes):
    """bad_rows = "fail" on a row of the wrong field count that was not UTF-8 said "cannot parse
    as Criteo TSV: ... Row #4" (a row of pyarrow's stream, not a line of the file). It names the
    file and the line, as for any bad row; "?" stands for each byte that is not UTF-8 in the row."""
    path = tmp_path / "mixed.tsv"
    undecodable_sample(path)
    data = path.read_bytes()
    for i in UNDECODABLE:  # the other bad lines made good: the first bad row is `line`'s
        if i != line:
            data = data.replace(UNDECODABLE[i][0], b"1\t%d\tab\tcd" % i, 1)
    path.write_bytes(data)
    extra = {} if range_bytes is None else {"range_bytes": range_bytes}
    cfg = ReaderConfig(global_batch_size=3, num_dense=1, num_sparse=2, prefetch_batches=0, read_block_bytes=37,
                       bad_rows="fail", **extra)
    with pytest.raises(ValueError, match=r"bad row: ") as failed:
        list(CriteoTsvReader([str(path)], cfg))
    # The range that owns the line: the last one whose first line starts at or before it.
    line_start = data.index(UNDECODABLE[line][0])
    starts = [start for start, _ in byte_ranges(len(data), range_bytes or len(data))]
    begins = [0] + [data.index(b"\n", start - 1) + 1 for start in starts[1:]]
    owner = max(k for k, begin in enumerate(begins) if begin <= line_start)
    lines_before = data[: begins[owner]].count(b"\n")
    where = f"{path}:{line + 1 - lines_before}"
    if owner:
        where += f" (line of the byte range from {starts[owner]})"
    assert str(failed.value).startswith(f"{where}: bad row: ")
    if line not in (10, 11):  # a count or a label: "not a number"
        assert "tab-separated fields" in str(failed.value) and "?" in str(failed.value)


def test_launch_counts_bad_input_rows_and_fails_a_run_that_trained_on_none(tmp_path):
    """`embps launch` on TSV files: the bad rows the ranks skipped are summed into summary.json and
    the done line; a file of only bad rows trained nothing and the launcher said "done: the job
    was at its last step already (0)" and exited 0 (a review). It fails now, saying why."""
    import subprocess
    import sys
    from pathlib import Path

    from ps.table.config import TableConfig
    from tests.helpers.processes import make_job
    from tests.worker.training_jobs import training_toml

    repo = Path(__file__).resolve().parents[2]
    ps = make_job(tables=[TableConfig("c", dim=4)], num_shards=1)

    def launch(name: str, rows: int, bad: int) -> tuple[subprocess.CompletedProcess, dict | None]:
        sample = write_criteo_sample(tmp_path / f"{name}.tsv", rows, num_bad_rows=bad, seed=6, num_dense=13,
                                     num_sparse=2)
        out = tmp_path / f"out_{name}"
        train = {"workers": 1, "steps": 50, "batch_size": 16, "tables": ["c"], "output_dir": str(out)}
        data = {"source": "criteo", "paths": [str(sample.path)], "num_sparse": 2}
        path = tmp_path / f"{name}.toml"
        path.write_text(training_toml(ps, train, {"bottom_sizes": [8], "top_sizes": [16]}, data, {}))
        done = subprocess.run([sys.executable, "-m", "embps", "launch", str(path)], cwd=repo, capture_output=True,
                              text=True, timeout=300)
        summary = out / "summary.json"
        return done, json.loads(summary.read_text()) if summary.exists() else None

    done, summary = launch("some_bad", 160, 24)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["input_bad_rows"] == 24 and summary["input_rows_parsed"] == 184
    assert "24 bad input rows skipped" in done.stdout
    done, summary = launch("all_bad", 0, 40)
    assert done.returncode == 1, done.stderr[-3000:]
    assert summary["samples"] == 0 and summary["input_bad_rows"] == 40
    assert "embps launch: FAILED: no step trained: data.paths gave no batch (40 rows read, 40 of them bad)" in (
        done.stderr
    )
    assert "last step already" not in done.stdout
