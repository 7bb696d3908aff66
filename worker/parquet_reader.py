"""Parquet files with Criteo's logical columns, streamed record batch by record batch.

Columns `label`, `I1..I{num_dense}`, `C1..C{num_sparse}` (other columns are ignored):
label numeric (or numeric strings); I* integer/float, or strings holding integers, null -> 0;
C* strings (or dictionary-encoded strings), null or "" -> the feature's missing key. Keys and
dense values come out exactly as from the same rows in TSV. A null or non-finite label, or an
I* string that is not an integer, is a bad row; messages name it `path:row N` (0-based).
`offset` in the state counts rows consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.readers import FileReader, _Rows


class ParquetReader(FileReader):
    """Streams Parquet files as batches (`read_batch_rows` rows decoded at a time).

    Restoring a position skips whole row groups by their metadata and decodes only the group
    that holds the position.

    >>> reader = ParquetReader(["part-0.parquet"], ReaderConfig(global_batch_size=4096), rank, world)
    >>> for batch in reader: ...
    """

    def _read_file(self, file_index: int, start: int) -> Iterator[_Rows]:
        path = self.paths[file_index]
        names = self.config.column_names
        parquet = pq.ParquetFile(path)
        missing = [name for name in names if name not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {names[0]}, I*, C*")
        _check_types(path, parquet.schema_arrow, names)
        num_rows = parquet.metadata.num_rows
        if start > num_rows:
            raise ValueError(f"state.offset: {path} has {num_rows} rows, state says {start}")
        group_rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        group_starts = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
        first_group = int(np.searchsorted(group_starts, start, side="right") - 1)
        groups = [g for g in range(first_group, parquet.num_row_groups) if group_rows[g] > 0]
        if not groups:
            return
        row = int(group_starts[groups[0]])
        for record_batch in parquet.iter_batches(
            batch_size=self.config.read_batch_rows, row_groups=groups, columns=names, use_threads=False
        ):
            first, row = row, row + record_batch.num_rows
            if row <= start:
                continue
            skip = max(start - first, 0)
            if skip:
                record_batch = record_batch.slice(skip)
                first += skip
            next_offset = np.arange(first + 1, row + 1, dtype=np.int64)
            yield self._parse(record_batch, file_index, next_offset, lambda i, first=first: f"{path}:row {first + i}")


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
