"""Builds the training and held-out batch readers a job's `[data]` section asks for."""

from __future__ import annotations

from worker.batch import Batch, BatchReader
from worker.criteo import CriteoTsvReader
from worker.data_paths import check_held_out
from worker.parquet_reader import ParquetReader
from worker.readers import ReaderConfig
from worker.synthetic import Split, SyntheticReader
from worker.train_config import DataSource, TrainingJob


def train_reader(job: TrainingJob, rank: int, world_size: int) -> BatchReader:
    """This rank's part of every global training batch: its slice (synthetic), or the local batches
    made from its share of the files (worker/readers.py), for `train.epochs` passes."""
    data = job.data
    if data.source == DataSource.SYNTHETIC:
        return SyntheticReader(data.synthetic, rank, world_size, Split.TRAIN, data.prefetch_batches)
    return _file_reader(job, data.paths, rank, world_size, training=True)


def ranks_may_differ_in_batches(job: TrainingJob) -> bool:
    """True when ranks' streams can end at different steps (file shares differ in rows), so the
    trainer must agree on the last step; synthetic ranks all have the same number of batches."""
    return job.data.source != DataSource.SYNTHETIC


def eval_batches(job: TrainingJob) -> list[Batch]:
    """The held-out batches of one evaluation (whole global batches, read by one process)."""
    data = job.data
    if data.source == DataSource.SYNTHETIC:
        reader = SyntheticReader(data.synthetic, 0, 1, Split.EVAL)
        count = min(job.train.eval_batches, len(reader))
        return [reader.batch(i) for i in range(count)]
    if not data.eval_paths:
        return []
    check_held_out(data.paths, data.eval_paths, data.storage)
    batches = []
    for batch in _file_reader(job, data.eval_paths, 0, 1, training=False):
        batches.append(batch)
        if len(batches) == job.train.eval_batches:
            break
    return batches


def _file_reader(job: TrainingJob, paths, rank: int, world_size: int, training: bool) -> BatchReader:
    """Training: epochs, shuffles and read-ahead from [data]; held-out: one pass in file order."""
    data = job.data
    config = ReaderConfig(
        global_batch_size=job.train.batch_size,
        num_dense=data.num_dense,
        num_sparse=data.num_sparse,
        bad_rows=data.bad_rows,
        drop_last=training,  # held-out rows are all scored, a short last batch too
        epochs=job.train.epochs if training else 1,
        seed=data.seed,
        shuffle_files=data.shuffle_files and training,
        shuffle_buffer=data.shuffle_buffer if training else 0,
        range_bytes=data.range_bytes,
        prefetch_batches=data.prefetch_batches if training else 0,
        arrow_threads=data.arrow_threads,
        arrow_memory_pool=data.arrow_memory_pool,
    )
    cls = CriteoTsvReader if data.source == DataSource.CRITEO else ParquetReader
    field = "data.paths" if training else "data.eval_paths"
    return cls(list(paths), config, rank, world_size, storage=data.storage, paths_field=field)
