"""Parquet files with Criteo's logical columns, streamed record batch by record batch.

Columns `label`, `I1..I{num_dense}`, `C1..C{num_sparse}` (other columns are ignored):
label numeric (or numeric strings); I* integer/float, or strings holding integers, null -> 0;
C* strings (or dictionary-encoded strings), null or "" -> the feature's missing key. Keys and
dense values come out exactly as from the same rows in TSV. A null or non-finite label, or an
I* string that is not an integer, is a bad row; messages name it `path:row N` (0-based, in the
file). A unit of work is one row group; `offset` in the state counts its rows consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ps.errors import EmbpsError
from worker.data_options import ArrowMemoryPool
from worker.data_paths import DataFile, open_input
from worker.prefetch import prefetched
from worker.readers import FileReader, _Position, _Rows
from worker.shares import Unit

_DECODE_AHEAD = 2  # record batches decoded ahead of the parse (each up to read_batch_rows rows)


class ParquetReader(FileReader):
    """Streams this rank's row groups of Parquet files as batches (`read_batch_rows` rows decoded
    at a time); `offset` in the state counts rows of the row group consumed.

    Every rank reads every file's footer at start (to plan the units, and so a missing column
    or an unreadable object fails then), and decodes only its own row groups. Categorical
    columns are read dictionary-encoded, so each distinct string is hashed once per chunk (in
    C++, worker/features.py::hash_columns). With read-ahead on, pyarrow decodes the next record
    batches (its threads, driven by a thread of ours) while this one is parsed.

    >>> reader = ParquetReader(["s3://bucket/criteo/day_*/part-*.parquet"], ReaderConfig(global_batch_size=4096), r, w)
    >>> for batch in reader: ...
    """

    _auto_memory_pool = ArrowMemoryPool.JEMALLOC  # see worker/readers.py::configure_arrow

    def _plan(self) -> list[list[Unit]]:
        names = self.config.column_names
        units = []
        for index, data_file in enumerate(self.files):
            with _open_parquet(data_file, []) as parquet:
                missing = [name for name in names if name not in parquet.schema_arrow.names]
                if missing:
                    raise ValueError(
                        f"{data_file.name}: missing column(s) {', '.join(missing)}; expected {names[0]}, I*, C*"
                    )
                _check_types(data_file.name, parquet.schema_arrow, names)
                rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            units.append([Unit(index, g, 0, n) for g, n in enumerate(rows) if n > 0])
        return units

    def _read_unit(self, unit: Unit, start: int) -> Iterator[_Rows]:
        for record_batch, next_offset, where in self._decode_unit(unit, start):
            self.num_parsed += record_batch.num_rows
            yield self._parse(record_batch, next_offset, where)

    def _rows_from(self, start: _Position) -> Iterator[tuple[int, int, _Rows]]:
        """With read-ahead on (`prefetch_batches` > 0), decoding runs in its own thread, up to
        `_DECODE_AHEAD` record batches ahead and across row groups, beside the parse here."""
        if not self.config.prefetch_batches:
            yield from super()._rows_from(start)
            return
        decoded = prefetched(
            (
                (epoch, index, *part)
                for epoch, index, unit, skip in self._tasks(start)
                for part in self._decode_unit(unit, skip)
            ),
            _DECODE_AHEAD,
            name="parquet-decode",
        )
        try:
            for epoch, index, record_batch, next_offset, where in decoded:
                self.num_parsed += record_batch.num_rows
                yield epoch, index, self._parse(record_batch, next_offset, where)
        finally:
            decoded.close()

    def _decode_unit(self, unit: Unit, start: int) -> Iterator[tuple[pa.RecordBatch, np.ndarray, Callable[[int], str]]]:
        """Record batches of `unit` from row `start` on: (batch, next_offset (n,) int64, where(i))."""
        data_file = self.files[unit.file_index]
        path = data_file.name
        if start > unit.end:
            raise ValueError(f"state.offset: row group {unit.part} of {path} has {unit.end} rows, state says {start}")
        names = self.config.column_names
        sparse_names = [name for name in names if name.startswith("C")]
        with _open_parquet(data_file, sparse_names) as parquet:
            first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.part))  # for messages
            row = 0
            batches = parquet.iter_batches(
                batch_size=self.config.read_batch_rows, row_groups=[unit.part], columns=names, use_threads=True
            )
            while True:
                try:
                    record_batch = next(batches, None)
                except EmbpsError:
                    raise
                except (OSError, pa.ArrowException) as exc:  # a damaged page: pyarrow's error named no file
                    raise OSError(f"{path}: row group {unit.part}: cannot read: {exc}") from exc
                if record_batch is None:
                    break
                first, row = row, row + record_batch.num_rows
                if row <= start:
                    continue
                skip = max(start - first, 0)
                if skip:
                    record_batch = record_batch.slice(skip)
                    first += skip
                next_offset = np.arange(first + 1, row + 1, dtype=np.int64)
                base = first_row + first
                yield record_batch, next_offset, lambda i, base=base: f"{path}:row {base + i}"


class _open_parquet:  # noqa: N801 - used like open()
    """A ParquetFile on the data file, closed on exit; OSError / ValueError name the file."""

    def __init__(self, data_file: DataFile, dictionary_columns: list[str]) -> None:
        self._handle = open_input(data_file)
        try:
            self._parquet = pq.ParquetFile(self._handle, read_dictionary=dictionary_columns or None)
        except (OSError, pa.ArrowException) as exc:
            self._handle.close()
            raise ValueError(f"{data_file.name}: cannot read as Parquet: {exc}") from exc
        except KeyError as exc:  # a dictionary column it lacks: a file rewritten since the pass began
            self._handle.close()
            column = exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc.args[0]
            raise ValueError(
                f"{data_file.name}: no column {column!r} any longer (the file changed since the pass began)"
            ) from None

    def __enter__(self) -> pq.ParquetFile:
        return self._parquet

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def _is_string(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_types(path: str, schema: pa.Schema, names: list[str]) -> None:
    """Raises TypeError naming the file and column whose type the reader cannot use."""
    for name in names:
        kind = schema.field(name).type
        if name.startswith("C"):
            ok = _is_string(kind)
            rule = "categorical columns must be strings (keys are hashed from the text)"
        else:
            numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_null)
            ok = _is_string(kind) or any(test(kind) for test in numeric)
            rule = "label and I* columns must be numbers or strings of numbers"
        if not ok:
            raise TypeError(f"{path}: column {name}: {rule}, got {kind}")
