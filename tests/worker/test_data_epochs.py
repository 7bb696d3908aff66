"""Readers across epochs: file shuffle, shuffle buffer, exact resume; paths on S3 with globs; errors."""

import json

import pyarrow.fs as pafs
import pytest

from ps.snapshot.storage import StorageConfig
from tests.worker.reference_features import assert_batches_equal, batch_of_rows, global_batches, rows_of
from tests.worker.test_data_parquet import table_of_rows
from worker.batch import Batch
from worker.criteo import CriteoTsvReader, write_criteo_sample
from worker.parquet_reader import ParquetReader
from worker.readers import ReaderConfig


def shuffled(**kwargs) -> ReaderConfig:
    base = dict(
        global_batch_size=32,
        read_block_bytes=2048,
        range_bytes=6000,
        read_batch_rows=16,
        epochs=2,
        seed=7,
        shuffle_files=True,
        shuffle_buffer=50,
        drop_last=False,
    )
    return ReaderConfig(**(base | kwargs))


def write_days(tmp_path, sizes):
    return [write_criteo_sample(tmp_path / f"day_{i}.tsv", n, num_bad_rows=3, seed=20 + i) for i, n in enumerate(sizes)]


def test_every_epoch_covers_every_row_once_in_a_new_order(tmp_path):
    samples = write_days(tmp_path, [90, 60, 120])
    paths = [s.path for s in samples]
    rows = [r for s in samples for r in s.good_rows]
    readers = [CriteoTsvReader(paths, shuffled(), rank=r, world_size=2) for r in range(2)]
    streams = [list(reader) for reader in readers]
    everything = Batch.cat([b for stream in streams for b in stream])
    assert rows_of(everything) == sorted(rows_of(batch_of_rows(rows, 13)) * 2)  # each row once per epoch
    assert readers[0].share(0) != readers[0].share(1)  # the file order changes with the epoch
    plain = Batch.cat(list(CriteoTsvReader(paths, shuffled(shuffle_buffer=0, shuffle_files=False, epochs=1))))
    assert_batches_equal(plain, batch_of_rows(rows, 13))  # no shuffle: file order
    assert rows_of(streams[0][0]) != rows_of(plain.slice(0, 16))  # the buffer shuffles
    # The same (files, seed, W) give the same global batches; another seed gives others.
    again = global_batches(lambda r: CriteoTsvReader(paths, shuffled(), rank=r, world_size=2), 2)
    for a, b in zip(again, global_batches(lambda r: iter(streams[r]), 2), strict=True):
        assert_batches_equal(a, b)
    other = global_batches(lambda r: CriteoTsvReader(paths, shuffled(seed=8), rank=r, world_size=2), 2)
    assert rows_of(other[0]) != rows_of(again[0])


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("kind", ["tsv", "parquet"])
def test_resume_mid_epoch_and_in_the_next_epoch_is_exact(tmp_path, kind, prefetch):
    import pyarrow.parquet as pq

    samples = write_days(tmp_path, [90, 60, 120])
    if kind == "tsv":
        paths, cls = [s.path for s in samples], CriteoTsvReader
    else:
        paths, cls = [tmp_path / f"day_{i}.parquet" for i in range(3)], ParquetReader
        for sample, path in zip(samples, paths, strict=True):
            pq.write_table(table_of_rows(sample.good_rows), path, row_group_size=25)
    cfg = shuffled(prefetch_batches=prefetch)  # the position follows the consumer, not the read-ahead
    reader = cls(paths, cfg, rank=1, world_size=2)
    iterator = iter(reader)
    states, seen = [], []
    for batch in iterator:
        seen.append(batch)
        states.append(json.loads(json.dumps(reader.state())))
    assert states[-1]["epoch"] == 2
    epochs = [s["epoch"] for s in states]
    middle = epochs.index(1) - 2  # a position in epoch 0, rows of the buffer held back
    later = epochs.index(1) + 1  # a position in epoch 1
    assert states[middle]["buffer"] is not None and states[later]["buffer"] is not None
    for k in (middle, later):
        resumed = cls(paths, cfg, rank=1, world_size=2)
        resumed.restore(states[k])
        rest = list(resumed)
        assert len(rest) == len(seen) - k - 1
        for a, b in zip(rest, seen[k + 1 :], strict=True):
            assert_batches_equal(a, b)


def test_a_position_is_refused_over_another_file_list_and_fits_the_same_files_moved(tmp_path, caplog):
    """A position is an index into the units of the files data.paths gave: over a glob that now
    matches a file added since (its name first), it was restored as it was and pointed into
    another file, rows read twice (it read day_1's rows again and then day_2 whole)."""
    data = tmp_path / "data"
    data.mkdir()
    write_days(data, [90, 60])  # day_0.tsv, day_1.tsv
    for i in (1, 0):
        (data / f"day_{i}.tsv").rename(data / f"day_{i + 1}.tsv")
    cfg = shuffled(shuffle_files=False, shuffle_buffer=0, range_bytes=1 << 20, epochs=1)  # a unit a file
    glob = [str(data / "day_*.tsv")]
    reader = CriteoTsvReader(glob, cfg)
    iterator = iter(reader)
    head = [next(iterator) for _ in range(3)]  # 96 rows: into day_2.tsv
    state = json.loads(json.dumps(reader.state()))
    assert state["unit"] == 1 and head
    rest = list(iterator)
    write_criteo_sample(data / "day_0.tsv", 30, num_bad_rows=0, seed=5)
    taken_over_two = r"data\.paths: the position to resume from was taken over 2 file\(s\)"
    with pytest.raises(ValueError, match=taken_over_two + ".*now gives 3"):
        CriteoTsvReader(glob, cfg).restore(state)
    (data / "day_0.tsv").unlink()
    day_2 = (data / "day_2.tsv").read_bytes()
    (data / "day_2.tsv").write_bytes(day_2 + day_2[: day_2.index(b"\n") + 1])  # a file grown since
    with pytest.raises(ValueError, match=taken_over_two + ".*now gives 2"):
        CriteoTsvReader(glob, cfg).restore(state)
    # The same files in another folder: the position fits them, and the rest is the same.
    moved = tmp_path / "moved"
    moved.mkdir()
    (data / "day_1.tsv").rename(moved / "day_1.tsv")
    (moved / "day_2.tsv").write_bytes(day_2)
    resumed = CriteoTsvReader([str(moved / "day_*.tsv")], cfg)
    resumed.restore(state)
    again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(again, rest, strict=True):
        assert_batches_equal(a, b)
    # A position from before positions held their files still loads (with a warning).
    older = CriteoTsvReader([str(moved / "day_*.tsv")], cfg)
    older.restore({k: v for k, v in state.items() if k != "files"})
    assert len(list(older)) == len(rest)
    assert "not checked against data.paths" in caplog.text


@pytest.mark.parametrize("prefetch", [0, 3])
def test_a_new_pass_of_a_reader_goes_on_where_its_consumer_stopped(tmp_path, prefetch):
    """The shuffle buffer as of each batch was a copy made per batch (68 ms a batch at 1M rows);
    it is now the consumer's own buffer, replayed from the batches' changes: a second pass of the
    same reader starts from it, whatever the first pass had read ahead."""
    samples = write_days(tmp_path, [90, 60, 120])
    paths = [s.path for s in samples]
    cfg = shuffled(prefetch_batches=prefetch)
    whole = list(CriteoTsvReader(paths, cfg, rank=0, world_size=2))
    reader = CriteoTsvReader(paths, cfg, rank=0, world_size=2)
    first = iter(reader)
    parts = [next(first) for _ in range(4)]
    first.close()
    parts += list(reader)
    assert len(parts) == len(whole)
    for a, b in zip(parts, whole, strict=True):
        assert_batches_equal(a, b)


def test_paths_on_s3_with_directories_and_globs(tmp_path, s3):
    import pyarrow.parquet as pq

    samples = write_days(tmp_path, [70, 50, 40])
    base = s3.fresh_uri()
    fs = pafs.S3FileSystem(
        endpoint_override=s3.config.endpoint_override,
        scheme="http",
        access_key=s3.config.access_key,
        secret_key=s3.config.secret_key,
        region="us-east-1",
    )
    root = base.removeprefix("s3://")
    local = []
    for i, sample in enumerate(samples):
        table = table_of_rows(sample.good_rows)
        for part in range(2):
            half = table.slice(part * (table.num_rows // 2), table.num_rows // 2 if part == 0 else None)
            path = tmp_path / f"day_{i}-part-{part}.parquet"
            pq.write_table(half, path, row_group_size=20)
            with fs.open_output_stream(f"{root}/criteo/day_{i}/part-{part}.parquet") as out:
                out.write(path.read_bytes())
            local.append(path)
        with fs.open_output_stream(f"{root}/tsv/day_{i}.tsv") as out:
            out.write(sample.path.read_bytes())
    with fs.open_output_stream(f"{root}/criteo/day_1/_SUCCESS") as out:
        out.write(b"")
    cfg = ReaderConfig(global_batch_size=20, drop_last=False)
    remote = ParquetReader([f"{base}/criteo/day_*/part-*.parquet"], cfg, rank=1, world_size=2, storage=s3.config)
    assert remote.paths == [f"{base}/criteo/day_{i}/part-{p}.parquet" for i in range(3) for p in range(2)]
    on_disk = ParquetReader(local, cfg, rank=1, world_size=2)
    for a, b in zip(remote, on_disk, strict=True):
        assert_batches_equal(a, b)
    assert remote.num_parsed == on_disk.num_parsed < sum(len(s.good_rows) for s in samples)
    folder = CriteoTsvReader([f"{base}/tsv"], ReaderConfig(global_batch_size=20, range_bytes=5000), storage=s3.config)
    rows = [r for s in samples for r in s.good_rows]
    assert_batches_equal(Batch.cat(list(folder)), batch_of_rows(rows[: len(rows) // 20 * 20], 13))
    # A missing object, an empty glob, an object we cannot read: the error names the path, at start.
    with pytest.raises(FileNotFoundError, match=f"{base}/criteo/day_9.parquet: no such file"):
        ParquetReader([f"{base}/criteo/day_9.parquet"], cfg, storage=s3.config)
    with pytest.raises(FileNotFoundError, match=f"{base}/criteo/day_\\*/x-\\*: the glob matches no file"):
        ParquetReader([f"{base}/criteo/day_*/x-*"], cfg, storage=s3.config)
    wrong = StorageConfig(
        endpoint_override=s3.config.endpoint_override, scheme="http", access_key="nobody", secret_key="wrong"
    )
    with pytest.raises(OSError, match=f"{base}/tsv/day_0.tsv"):
        CriteoTsvReader([f"{base}/tsv/day_0.tsv"], cfg, storage=wrong)


def test_a_glob_in_an_absolute_path_s_first_component_lists_under_the_root(tmp_path, monkeypatch):
    """"/data*/part-*" was looked for under the working directory (its base was "." instead of "/"):
    it read a file there that matched, or found none. And a glob listed its base recursively, all of
    "/" for that one; it lists one level per component now."""
    real = tmp_path / "real" / "day.tsv"
    real.parent.mkdir()
    write_criteo_sample(real, 30, num_bad_rows=0)
    assert str(real).startswith("/tmp/")
    cwd = tmp_path / "cwd"
    decoy = cwd / "tmp" / real.relative_to("/tmp")
    decoy.parent.mkdir(parents=True)
    write_criteo_sample(decoy, 10, num_bad_rows=0)
    monkeypatch.chdir(cwd)
    reader = CriteoTsvReader(["/tm?" + str(real)[len("/tmp"):]], ReaderConfig(global_batch_size=10))
    assert reader.paths == [str(real)]
    assert sum(len(b) for b in reader) == 30


def test_local_path_errors_name_the_path(tmp_path):
    cfg = ReaderConfig(global_batch_size=8)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.tsv'}: no such file"):
        CriteoTsvReader([tmp_path / "nope.tsv"], cfg)
    with pytest.raises(FileNotFoundError, match="the glob matches no file"):
        CriteoTsvReader([str(tmp_path / "day_*.tsv")], cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}: the directory holds no file"):
        CriteoTsvReader([tmp_path / "empty"], cfg)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.parquet'}: cannot read as Parquet"):
        ParquetReader([tmp_path / "broken.parquet"], cfg)
    sample = write_criteo_sample(tmp_path / "one.tsv.gz.src", 10, num_bad_rows=0)
    import gzip

    (tmp_path / "one.tsv.gz").write_bytes(gzip.compress(sample.path.read_bytes()))
    with pytest.raises(ValueError, match="1 unit.*for 2 workers"):
        CriteoTsvReader([tmp_path / "one.tsv.gz"], cfg, rank=0, world_size=2)
    # HDFS goes through the same code; without a JVM here, the error names the entry and what is missing.
    with pytest.raises(OSError, match="data.paths: hdfs://namenode:8020/criteo/day_\\*.tsv: .*HDFS"):
        CriteoTsvReader(["hdfs://namenode:8020/criteo/day_*.tsv"], cfg)
    with pytest.raises(ValueError, match="data.paths: ftp://host/x.tsv: .*unsupported scheme"):
        CriteoTsvReader(["ftp://host/x.tsv"], cfg)
    # A file two entries name (a folder and a file in it, two globs, the same path twice) would be
    # read twice an epoch: refused, naming both entries.
    folder = tmp_path / "days"
    folder.mkdir()
    write_criteo_sample(folder / "a.tsv", 10, num_bad_rows=0)
    for second in (str(folder / "a.tsv"), str(folder / "*.tsv"), str(folder)):
        with pytest.raises(ValueError, match=r"data.paths\[1\]: .*names .*a.tsv, which data.paths\[0\] names already"):
            CriteoTsvReader([str(folder), second], cfg)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_damaged_file_found_while_reading_is_named(tmp_path, prefetch):
    """A truncated .gz or a Parquet data page that does not decompress raised pyarrow's OSError
    ("Truncated compressed stream", "Corrupt snappy compressed data."), naming none of the files."""
    import gzip

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = write_criteo_sample(tmp_path / "day.tsv", 2000, num_bad_rows=0)
    whole = gzip.compress(sample.path.read_bytes())
    (tmp_path / "cut.tsv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OSError, match=f"{tmp_path / 'cut.tsv.gz'}: cannot read: "):
        list(CriteoTsvReader([tmp_path / "cut.tsv.gz"], ReaderConfig(global_batch_size=8, prefetch_batches=prefetch)))
    rng = np.random.default_rng(0)
    columns = {"label": pa.array(rng.integers(0, 2, 5000).astype(np.float32))}
    columns |= {f"I{i + 1}": pa.array(rng.integers(0, 100, 5000)) for i in range(2)}
    columns |= {f"C{i + 1}": pa.array([f"{x:08x}" for x in rng.integers(0, 1 << 30, 5000)]) for i in range(2)}
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=1000, compression="snappy")
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 300):  # inside a data page; the footer intact
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    config = ReaderConfig(global_batch_size=100, num_dense=2, num_sparse=2, prefetch_batches=prefetch)
    with pytest.raises(OSError, match=rf"{path}: row group \d+: cannot read: "):
        list(ParquetReader([path], config))


def test_launch_trains_two_workers_on_their_shares_of_s3_parquet_for_two_epochs(tmp_path, s3):
    """A real job: 2 workers read their row groups from S3 for 2 epochs with a shuffle buffer, agree
    on the last step (the shares differ in rows), and report the time spent waiting for data."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from ps import toml_writer
    from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
    from tests.helpers.processes import REPO_ROOT, make_job
    from tests.worker.training_jobs import training_toml

    base = s3.fresh_uri()
    fs = pafs.S3FileSystem(
        endpoint_override=s3.config.endpoint_override,
        scheme="http",
        access_key=s3.config.access_key,
        secret_key=s3.config.secret_key,
        region="us-east-1",
    )
    for i, n in enumerate([300, 150, 110]):
        sample = write_criteo_sample(tmp_path / f"day_{i}.tsv", n, num_bad_rows=0, seed=40 + i)
        pq.write_table(table_of_rows(sample.good_rows), tmp_path / f"day_{i}.parquet", row_group_size=50)
        with fs.open_output_stream(f"{base.removeprefix('s3://')}/day_{i}/part-0.parquet") as out:
            out.write((tmp_path / f"day_{i}.parquet").read_bytes())
    table = TableConfig(name="emb", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    out_dir = tmp_path / "out"
    train = {"workers": 2, "steps": 1000, "epochs": 2, "batch_size": 64, "tables": ["emb"], "output_dir": str(out_dir)}
    data = {"source": "parquet", "paths": [f"{base}/day_*/part-*.parquet"], "shuffle_buffer": 40, "seed": 3}
    storage = {
        "endpoint_override": s3.config.endpoint_override,
        "scheme": "http",
        "access_key": s3.config.access_key,
        "secret_key": s3.config.secret_key,
    }
    text = training_toml(
        make_job([table], 1, job="data-launch"), train, {"bottom_sizes": [4], "top_sizes": [8]}, data, {}
    )
    path = tmp_path / "job.toml"
    path.write_text(text + "\n" + toml_writer.document([toml_writer.table(("data", "storage"), storage)]))
    result = subprocess.run(
        [sys.executable, "-m", "embps", "launch", str(path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    cfg = ReaderConfig(global_batch_size=64, drop_last=True, epochs=2, seed=3, shuffle_files=True, shuffle_buffer=40)
    reference = global_batches(
        lambda r: ParquetReader([f"{base}/day_*/part-*.parquet"], cfg, rank=r, world_size=2, storage=s3.config), 2
    )
    assert 2 * 560 // 64 - 2 <= len(reference) < 2 * 560 // 64  # the shorter share ends the job
    assert summary["steps"] == len(reference)
    assert summary["times_rank0"]["data_wait_s"] >= 0
