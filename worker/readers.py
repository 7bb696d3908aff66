"""What the file readers share: config, row validation, batching across files, rank split, state.

A file reader turns a list of files into a stream of global batches of `global_batch_size`
rows (the last one may be shorter) and yields rank r's rows of each (see `split_rows`). Every
rank parses every row, so W ranks together see exactly the global batches of one process;
the cost is that parsing is repeated on each rank (hashing is too: it is cheap next to a
training step).

Position: (file index, offset) where offset counts the units of the file consumed up to and
including the last row of the last yielded global batch: lines for TSV, rows for Parquet.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from worker.batch import Batch, check_rank, split_rows
from worker.features import hash_categorical, transform_dense

logger = logging.getLogger(__name__)

_INT_PATTERN = r"^[+-]?[0-9]+$"
_FLOAT_PATTERN = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


class BadRowPolicy(StrEnum):
    """What a reader does with a malformed row (wrong column count, non-numeric number field)."""

    SKIP = "skip"  # count it, log (rate-limited), go on
    FAIL = "fail"  # raise ValueError naming file and line


@dataclass(frozen=True)
class ReaderConfig:
    """Options shared by the TSV and Parquet readers.

    Columns, in this order: `label`, `I1..I{num_dense}`, `C1..C{num_sparse}` (Criteo's layout).
    """

    global_batch_size: int = 2048  # rows per global batch; each rank gets 1/W of them
    num_dense: int = 13  # integer (count) features
    num_sparse: int = 26  # categorical features, one value each
    bad_rows: BadRowPolicy = BadRowPolicy.SKIP
    drop_last: bool = False  # drop a short last global batch instead of yielding it
    read_block_bytes: int = 1 << 20  # TSV: bytes parsed per block
    read_batch_rows: int = 65536  # Parquet: rows decoded per record batch
    bad_row_log_interval_s: float = 10.0  # at most one "skipped bad rows" log line per interval

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "bad_rows", BadRowPolicy(self.bad_rows))
        except ValueError:
            choices = ", ".join(repr(p.value) for p in BadRowPolicy)
            raise ValueError(f"bad_rows: must be one of {choices}, got {self.bad_rows!r}") from None
        for name in ("global_batch_size", "num_sparse", "read_block_bytes", "read_batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense: must be >= 0, got {self.num_dense}")
        if self.bad_row_log_interval_s < 0:
            raise ValueError(f"bad_row_log_interval_s: must be >= 0, got {self.bad_row_log_interval_s}")

    @property
    def column_names(self) -> list[str]:
        """label, I1..I{num_dense}, C1..C{num_sparse}."""
        return ["label"] + [f"I{i + 1}" for i in range(self.num_dense)] + [f"C{i + 1}" for i in range(self.num_sparse)]


@dataclass
class _Rows:
    """Parsed good rows of one file, in file order; next_offset[i] is the offset after row i."""

    file_index: np.ndarray  # (n,) int64
    next_offset: np.ndarray  # (n,) int64
    dense: np.ndarray  # (n, num_dense) float32
    sparse: np.ndarray  # (n, num_sparse) int64
    labels: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def cat(parts: Sequence[_Rows]) -> _Rows:
        return _Rows(*(np.concatenate([getattr(p, name) for p in parts]) for name in _ROW_FIELDS))

    def take(self, start: int, stop: int) -> _Rows:
        return _Rows(*(getattr(self, name)[start:stop] for name in _ROW_FIELDS))


_ROW_FIELDS = ("file_index", "next_offset", "dense", "sparse", "labels")


@dataclass
class BadRowLog:
    """Counts bad rows and logs them at most once per `interval_s` (the first one at once)."""

    interval_s: float
    count: int = 0
    _logged_count: int = 0
    _last_log: float = field(default=-float("inf"))

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            skipped = self.count - self._logged_count
            logger.warning("skipped %d bad row(s), %d in all; latest %s: %s", skipped, self.count, where, reason)
            self._logged_count = self.count
            self._last_log = now


class FileReader(ABC):
    """Base of the file readers: batching, rank split, bad-row policy, state. See module doc."""

    def __init__(self, paths: Sequence[str | Path], config: ReaderConfig, rank: int = 0, world_size: int = 1) -> None:
        if isinstance(paths, (str, Path)):
            raise TypeError("paths: expected a sequence of paths, got a single path (wrap it in a list)")
        if not paths:
            raise ValueError("paths: need at least one file")
        if not isinstance(config, ReaderConfig):
            raise TypeError(f"config: expected ReaderConfig, got {type(config).__name__}")
        check_rank(rank, world_size)
        if config.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size: must be divisible by world_size={world_size} so every rank gets "
                f"the same local batch size, got {config.global_batch_size}"
            )
        self.paths = [str(p) for p in paths]
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self._bad = BadRowLog(config.bad_row_log_interval_s)
        self._file_index = 0
        self._offset = 0
        self._num_batches = 0

    @property
    def num_bad_rows(self) -> int:
        """Bad rows this reader object has met (read-ahead included; not part of the state)."""
        return self._bad.count

    def state(self) -> dict:
        """Position after the last yielded batch: {"file_index", "offset", "num_batches"}."""
        return {"file_index": self._file_index, "offset": self._offset, "num_batches": self._num_batches}

    def restore(self, state: dict) -> None:
        """Continues from `state` (from `state()` of a reader over the same files and config)."""
        for name in ("file_index", "offset", "num_batches"):
            if not isinstance(state.get(name), int) or state[name] < 0:
                raise ValueError(f"state.{name}: must be an int >= 0, got {state.get(name)!r}")
        if state["file_index"] > len(self.paths):
            raise ValueError(f"state.file_index: must be <= {len(self.paths)} files, got {state['file_index']}")
        self._file_index = state["file_index"]
        self._offset = state["offset"]
        self._num_batches = state["num_batches"]

    def __iter__(self) -> Iterator[Batch]:
        """Yields this rank's part of each global batch, from the current position to the end.

        Each call starts a new pass from the position (`state()`), so use one iterator at a time.
        """
        size = self.config.global_batch_size
        pending: list[_Rows] = []
        num_pending = 0
        for file_index in range(self._file_index, len(self.paths)):
            start = self._offset if file_index == self._file_index else 0
            for rows in self._read_file(file_index, start):
                pending.append(rows)
                num_pending += len(rows)
                while num_pending >= size:
                    rows_all = _Rows.cat(pending)
                    yield self._emit(rows_all.take(0, size))
                    pending = [rows_all.take(size, num_pending)]
                    num_pending -= size
        if num_pending and not self.config.drop_last:
            yield self._emit(_Rows.cat(pending))

    def _emit(self, rows: _Rows) -> Batch:
        self._file_index = int(rows.file_index[-1])
        self._offset = int(rows.next_offset[-1])
        self._num_batches += 1
        start, stop = split_rows(len(rows), self.rank, self.world_size)
        return Batch.from_numpy(rows.dense[start:stop], rows.sparse[start:stop], rows.labels[start:stop])

    @abstractmethod
    def _read_file(self, file_index: int, start: int) -> Iterator[_Rows]:
        """Good rows of file `file_index` from offset `start` on, in chunks, via `_parse`."""

    def _bad_row(self, where: str, reason: str) -> None:
        """Applies the bad-row policy to one row at `where` ("path:line")."""
        if self.config.bad_rows is BadRowPolicy.FAIL:
            raise ValueError(f'{where}: bad row: {reason} (set bad_rows = "skip" to skip such rows)')
        self._bad.add(where, reason)

    def _parse(
        self,
        table: pa.RecordBatch | pa.Table,
        file_index: int,
        next_offset: np.ndarray,
        where: Callable[[int], str],
    ) -> _Rows:
        """Validates and converts a chunk of raw rows; bad rows go through the policy and are dropped.

        table: columns `config.column_names` as strings (TSV) or numbers/strings (Parquet);
        next_offset (n,) int64; where(i) names row i ("path:line") for messages.
        """
        cfg = self.config
        n = table.num_rows
        bad = np.zeros(n, dtype=bool)
        reasons: dict[int, str] = {}
        label, label_bad = _to_float(table.column("label"), _FLOAT_PATTERN, empty_ok=False)
        _note(bad, reasons, label_bad, "label: not a number")
        _note(bad, reasons, (label < 0) | (label > 1), "label: must be in [0, 1] (a click probability)")
        dense = np.zeros((n, cfg.num_dense), dtype=np.float64)
        for i in range(cfg.num_dense):
            name = f"I{i + 1}"
            dense[:, i], col_bad = _to_float(table.column(name), _INT_PATTERN, empty_ok=True)
            _note(bad, reasons, col_bad, f"{name}: not an integer")
        for row in np.flatnonzero(bad):
            self._bad_row(where(int(row)), reasons[int(row)])
        good = np.flatnonzero(~bad)
        if bad.any():
            table = table.take(pa.array(good))
        sparse = np.empty((good.shape[0], cfg.num_sparse), dtype=np.int64)
        for f in range(cfg.num_sparse):
            sparse[:, f] = hash_categorical(_as_strings(table.column(f"C{f + 1}"), f"C{f + 1}"), f)
        return _Rows(
            file_index=np.full(good.shape[0], file_index, dtype=np.int64),
            next_offset=next_offset[good],
            dense=transform_dense(dense[good]),
            sparse=sparse,
            labels=label[good].astype(np.float32),
        )


def _note(bad: np.ndarray, reasons: dict[int, str], col_bad: np.ndarray, reason: str) -> None:
    for row in np.flatnonzero(col_bad & ~bad):
        reasons[int(row)] = reason
    bad |= col_bad


def _to_float(column: pa.Array | pa.ChunkedArray, pattern: str, empty_ok: bool) -> tuple[np.ndarray, np.ndarray]:
    """A number column -> (values (n,) float64 with empty/null as 0, bad (n,) bool)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = pc.fill_null(column, "")
        empty = np.asarray(pc.equal(column, "").to_numpy(zero_copy_only=False), dtype=bool)
        ok = np.asarray(pc.match_substring_regex(column, pattern).to_numpy(zero_copy_only=False), dtype=bool)
        bad = ~ok & ~(empty & empty_ok)
        cleaned = pc.if_else(pa.array(ok), column, pa.scalar("0", column.type))
        values = pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64), bad
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        values = pc.fill_null(pc.cast(column, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        values = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(values) | (null & (not empty_ok))
        return np.where(bad, 0.0, values), bad
    raise TypeError(f"number column of type {kind}: expected integer, floating point or string")


def _as_strings(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise TypeError(f"{name}: categorical columns must be strings, got {column.type}")
    return column


def line_reason(text: str, expected: int, actual: int) -> str:
    """The message for a row with the wrong number of fields."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    return f"expected {expected} tab-separated fields, got {actual}: {shown!r}"
