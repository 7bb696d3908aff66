"""Parquet reader: the same rows as TSV give the same batches; resume across row groups; errors."""

import dataclasses
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.worker.reference_features import assert_batches_equal, batch_of_rows, global_batches, rows_of
from worker.batch import Batch
from worker.criteo import CriteoTsvReader, write_criteo_sample
from worker.data_paths import files_digest
from worker.parquet_reader import ParquetReader
from worker.readers import ReaderConfig

NUM_DENSE, NUM_SPARSE = 13, 26


def table_of_rows(rows: list[list[str]], string_dense: bool = False) -> pa.Table:
    """Typed columns as a Criteo-to-Parquet converter writes them: empty numbers -> null."""
    columns = {"label": pa.array([int(r[0]) for r in rows], pa.int64())}
    for i in range(NUM_DENSE):
        values = [r[1 + i] for r in rows]
        if string_dense:
            columns[f"I{i + 1}"] = pa.array(values, pa.string())
        else:
            columns[f"I{i + 1}"] = pa.array([int(v) if v else None for v in values], pa.int64())
    for f in range(NUM_SPARSE):
        columns[f"C{f + 1}"] = pa.array([r[1 + NUM_DENSE + f] or None for r in rows], pa.string())
    return pa.table(columns)


def write_parquet(path, rows, row_group_size=50, **kwargs):
    pq.write_table(table_of_rows(rows, **kwargs), path, row_group_size=row_group_size)
    return path


def config(**kwargs) -> ReaderConfig:
    kwargs.setdefault("global_batch_size", 64)
    kwargs.setdefault("read_batch_rows", 32)
    return ReaderConfig(**kwargs)


@pytest.mark.parametrize("string_dense", [False, True], ids=["int-columns", "string-columns"])
def test_same_rows_as_tsv_give_identical_batches(tmp_path, string_dense):
    sample = write_criteo_sample(tmp_path / "day.tsv", 250, num_bad_rows=7, seed=5)
    path = write_parquet(tmp_path / "day.parquet", sample.good_rows, string_dense=string_dense)
    from_tsv = list(CriteoTsvReader([sample.path], config()))
    from_parquet = list(ParquetReader([path], config()))
    assert [len(b) for b in from_parquet] == [64, 64, 64, 58]
    for a, b in zip(from_parquet, from_tsv, strict=True):
        assert_batches_equal(a, b)
    assert_batches_equal(Batch.cat(from_parquet), batch_of_rows(sample.good_rows, NUM_DENSE))


def test_dictionary_encoded_categoricals(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 40, num_bad_rows=0, seed=6)
    table = table_of_rows(sample.good_rows)
    table = table.set_column(table.schema.get_field_index("C1"), "C1", table.column("C1").dictionary_encode())
    pq.write_table(table, tmp_path / "dict.parquet")
    (batch,) = ParquetReader([tmp_path / "dict.parquet"], config())
    assert_batches_equal(batch, batch_of_rows(sample.good_rows, NUM_DENSE))


def test_resume_inside_a_row_group_and_across_files(tmp_path):
    samples = [write_criteo_sample(tmp_path / f"{i}.tsv", n, num_bad_rows=0, seed=i) for i, n in enumerate([130, 90])]
    paths = [write_parquet(tmp_path / f"{i}.parquet", s.good_rows, row_group_size=40) for i, s in enumerate(samples)]
    cfg = config(global_batch_size=48)
    original = ParquetReader(paths, cfg)
    iterator = iter(original)
    head = [next(iterator) for _ in range(2)]
    state = json.loads(json.dumps(original.state()))
    files = {"count": 2, "sha256": files_digest(original.files)}
    assert state == {"epoch": 0, "unit": 2, "offset": 16, "num_batches": 2, "buffer": None, "files": files}  # row 96
    rest = list(iterator)
    resumed = ParquetReader(paths, cfg)
    resumed.restore(state)
    again = list(resumed)
    assert len(again) == len(rest) == 3
    for a, b in zip(again, rest, strict=True):
        assert_batches_equal(a, b)
    rows = samples[0].good_rows + samples[1].good_rows
    assert_batches_equal(Batch.cat(head + again), batch_of_rows(rows, NUM_DENSE))


def test_ranks_read_only_their_row_groups(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 230, num_bad_rows=0, seed=8)
    path = write_parquet(tmp_path / "day.parquet", sample.good_rows, row_group_size=30)
    cfg = config(global_batch_size=24, drop_last=False)
    for world in (1, 2, 4):
        readers = [ParquetReader([path], cfg, rank=r, world_size=world) for r in range(world)]
        parts = [Batch.cat(list(reader)) for reader in readers]
        for reader in readers:
            assert reader.num_parsed == sum(unit.end for unit in reader.share(0))  # its row groups, no other
            assert reader.num_parsed <= -(-230 // world) + 30  # its share plus at most one row group
        assert sum(reader.num_parsed for reader in readers) == 230
        assert rows_of(Batch.cat(parts)) == rows_of(batch_of_rows(sample.good_rows, NUM_DENSE))
    # W = 2, groups 0, 2, 4, 6 vs 1, 3, 5, 7 (20 rows): global batch b = rank 0's b-th + rank 1's b-th.
    shares = global_batches(lambda r: ParquetReader([path], cfg, rank=r, world_size=2), 2)
    assert [len(b) for b in shares[-2:]] == [24, 12 + 2]  # rank 0: 120 rows, rank 1: 110 (9 x 12 + 2)
    assert_batches_equal(shares[0], batch_of_rows(sample.good_rows[0:12] + sample.good_rows[30:42], NUM_DENSE))


def test_null_label_is_a_bad_row(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 20, num_bad_rows=0, seed=9)
    table = table_of_rows(sample.good_rows)
    labels = table.column("label").to_pylist()
    labels[7] = None
    table = table.set_column(0, "label", pa.array(labels, pa.int64()))
    path = tmp_path / "day.parquet"
    pq.write_table(table, path)
    reader = ParquetReader([path], config())
    (batch,) = reader
    assert reader.num_bad_rows == 1
    assert_batches_equal(batch, batch_of_rows(sample.good_rows[:7] + sample.good_rows[8:], NUM_DENSE))
    with pytest.raises(ValueError, match=f"{path}:row 7: bad row: label"):
        list(ParquetReader([path], config(bad_rows="fail")))


def test_missing_or_mistyped_columns_are_named(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 10, num_bad_rows=0, seed=4)
    table = table_of_rows(sample.good_rows)
    pq.write_table(table.drop_columns(["I3"]), tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="missing column.*I3"):
        list(ParquetReader([tmp_path / "missing.parquet"], config()))
    keys = pa.array(range(10), pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("C2"), "C2", keys), tmp_path / "typed.parquet")
    with pytest.raises(TypeError, match=f"{tmp_path / 'typed.parquet'}: column C2"):
        list(ParquetReader([tmp_path / "typed.parquet"], config()))


def test_a_file_that_lost_a_column_since_the_pass_began_is_named(tmp_path):
    """The columns are checked when the pass is planned; a file rewritten without one since (an
    object replaced on S3 between epochs) failed with a bare KeyError: b'C2', naming neither the
    file nor the column, and left the file open."""
    sample = write_criteo_sample(tmp_path / "day.tsv", 256, num_bad_rows=0, seed=8)
    first = write_parquet(tmp_path / "a.parquet", sample.good_rows)
    second = write_parquet(tmp_path / "b.parquet", sample.good_rows)
    batches = iter(ParquetReader([first, second], config()))
    next(batches)  # a batch of the first file's rows
    pq.write_table(table_of_rows(sample.good_rows).drop_columns(["C2"]), tmp_path / "new.parquet")
    os.replace(tmp_path / "new.parquet", second)  # replaced whole, as an object store does
    with pytest.raises(ValueError, match=f"{second.name}: no column 'C2' any longer"):
        list(batches)


def test_decoding_ahead_in_a_thread_gives_the_same_batches_and_stops_with_the_reader(tmp_path):
    sample = write_criteo_sample(tmp_path / "day.tsv", 230, num_bad_rows=0, seed=11)
    path = write_parquet(tmp_path / "day.parquet", sample.good_rows, row_group_size=30)

    def read(prefetch_batches: int) -> tuple[list, int]:
        cfg = config(global_batch_size=24, epochs=2, shuffle_files=True, shuffle_buffer=40)
        reader = ParquetReader([path], dataclasses.replace(cfg, prefetch_batches=prefetch_batches))
        return [(batch, reader.state()) for batch in reader], reader.num_parsed

    inline, parsed_inline = read(0)  # no thread: decode and parse in turn
    ahead, parsed_ahead = read(3)  # decoding in its own thread, across row groups and epochs
    assert parsed_inline == parsed_ahead == 460
    assert [state for _, state in ahead] == [state for _, state in inline]
    for (a, _), (b, _) in zip(ahead, inline, strict=True):
        assert_batches_equal(a, b)

    def decoding() -> bool:
        return any(t.name == "parquet-decode-prefetch" for t in threading.enumerate())

    iterator = iter(ParquetReader([path], config(global_batch_size=24, epochs=4)))
    next(iterator)
    assert decoding()  # 920 rows: the threads hold at most 4 batches + 3 record batches ahead
    iterator.close()  # joins the batch thread, which closes the decoding one
    assert not decoding()


@pytest.fixture
def arrow_settings():
    """Arrow's thread count and memory pool are per process: put them back after the test."""
    threads, pool = pa.cpu_count(), pa.default_memory_pool()
    yield
    pa.set_cpu_count(threads)
    pa.set_memory_pool(pool)


def test_reader_sizes_arrow_threads_and_pool_for_the_local_ranks(tmp_path, monkeypatch, arrow_settings):
    sample = write_criteo_sample(tmp_path / "day.tsv", 120, num_bad_rows=0, seed=9)
    path = write_parquet(tmp_path / "day.parquet", sample.good_rows, row_group_size=30)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    reader = ParquetReader([path], config(global_batch_size=24), rank=1, world_size=4)
    assert reader.arrow_threads == pa.cpu_count() == max(1, cores // 4)
    assert pa.default_memory_pool().backend_name == "jemalloc"  # "auto": the Parquet reader's choice
    CriteoTsvReader([sample.path], config(global_batch_size=24), 0, 1)
    assert pa.default_memory_pool().backend_name == "mimalloc"  # "auto": the TSV reader's choice
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ParquetReader([path], config(global_batch_size=24), 0, 1).arrow_threads == cores
    batches = {}
    for pool in ("system", "jemalloc", "mimalloc", "default"):
        reader = ParquetReader([path], config(global_batch_size=24, arrow_threads=3, arrow_memory_pool=pool), 0, 1)
        assert pa.cpu_count() == 3
        if pool != "default":
            assert pa.default_memory_pool().backend_name == pool
        batches[pool] = Batch.cat(list(reader))
    assert_batches_equal(batches["system"], batches["mimalloc"])  # the allocator changes no value
    with pytest.raises(ValueError, match="arrow_memory_pool: must be one of"):
        config(arrow_memory_pool="tcmalloc")
    with pytest.raises(ValueError, match="arrow_threads: must be >= 0"):
        config(arrow_threads=-1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE: must be an integer"):
        ParquetReader([path], config(global_batch_size=24), 0, 1)


def test_a_missing_file_names_the_field_it_came_from(tmp_path):
    missing = str(tmp_path / "held-out.parquet")
    for field in ("data.paths", "data.eval_paths"):
        with pytest.raises(FileNotFoundError, match=rf"^{field}: {missing}: no such file"):
            ParquetReader([missing], config(), paths_field=field)


def test_files_without_a_row_say_so(tmp_path):
    """Parquet files of the right schema and no row gave "0 unit(s) of work ... write smaller row
    groups or more files", naming no file (a review)."""
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(ValueError, match=rf"^data\.paths: no rows to read: {empty} hold no Parquet row group$"):
        ParquetReader([str(empty)], config())


def test_dictionary_encoded_number_columns_read_as_their_values(tmp_path):
    """Parquet writers dictionary-encode repetitive columns: a label or count column stored as
    dictionary<string> passed the plan's type check, then failed the first read."""
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({
        "label": pa.array(["1", "0", "1", "0"]).dictionary_encode(),
        "I1": pa.array(["3", "4", "", "6"]).dictionary_encode(),
        "C1": pa.array(["a", "b", "c", "d"]),
    }), path)
    reader = ParquetReader([str(path)], ReaderConfig(global_batch_size=2, num_dense=1, num_sparse=1,
                                                     prefetch_batches=0))
    batches = list(reader)
    assert [b.labels.tolist() for b in batches] == [[1.0, 0.0], [1.0, 0.0]]
    plain = list(ParquetReader([str(_plain_copy(tmp_path, path))], ReaderConfig(
        global_batch_size=2, num_dense=1, num_sparse=1, prefetch_batches=0)))
    for a, b in zip(batches, plain, strict=True):
        assert a.dense.tolist() == b.dense.tolist()


def _plain_copy(tmp_path, path):
    table = pq.read_table(path)
    plain = pa.table({name: table.column(name).cast(pa.string()) for name in table.column_names})
    out = tmp_path / "plain.parquet"
    pq.write_table(plain, out)
    return out
