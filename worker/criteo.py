"""Criteo-format TSV: a streaming reader, and a small sample-file writer for tests.

One sample per line, tab-separated, no header, no quoting:

    label <TAB> I1 ... I{num_dense} <TAB> C1 ... C{num_sparse}

label 0/1; I* integer counts (may be negative or empty); C* categorical values, in Criteo
8 hex digits (any string is accepted, see worker/features.py), may be empty. A line with the
wrong number of fields, or a non-numeric label/I* field, is a bad row (see `BadRowPolicy`).
Empty lines are bad rows too. Files may be gzip-compressed (`.gz`).
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from worker.readers import BadRowPolicy, FileReader, _Rows, line_reason

_SCAN_BYTES = 1 << 20


class CriteoTsvReader(FileReader):
    """Streams Criteo TSV files as batches; `offset` in the state counts lines consumed.

    The files are parsed block by block (`read_block_bytes`) with pyarrow's streaming CSV
    reader, every column read as a string and validated here, so no file is held in memory.
    Restoring a position scans the file's bytes up to that line (no parsing) and starts there.

    >>> reader = CriteoTsvReader(["day_0.tsv"], ReaderConfig(global_batch_size=4096), rank, world)
    >>> for batch in reader: ...
    """

    def _read_file(self, file_index: int, start: int) -> Iterator[_Rows]:
        path = self.paths[file_index]
        names = self.config.column_names
        invalid: list[int] = []  # 1-based lines with the wrong field count, not yet passed
        failure: list[str] = []
        fail = self.config.bad_rows is BadRowPolicy.FAIL

        def on_invalid(row: pacsv.InvalidRow) -> str:
            line = start + row.number
            reason = line_reason(row.text, row.expected_columns, row.actual_columns)
            invalid.append(line)
            if fail:
                # An exception raised here would be swallowed by pyarrow: record it, stop the parse.
                failure.append(f'{path}:{line}: bad row: {reason} (set bad_rows = "skip" to skip such rows)')
                return "error"
            self._bad.add(f"{path}:{line}", reason)
            return "skip"

        read_options = pacsv.ReadOptions(column_names=names, block_size=self.config.read_block_bytes, use_threads=False)
        parse_options = pacsv.ParseOptions(
            delimiter="\t",
            quote_char=False,
            escape_char=False,
            newlines_in_values=False,
            ignore_empty_lines=False,
            invalid_row_handler=on_invalid,
        )
        convert_options = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        with _open_at_line(path, start) as stream:
            if not stream.peek(1):
                return  # an empty file, or the position is its end: pyarrow would call it an error
            cursor = start + 1
            try:
                reader = pacsv.open_csv(
                    stream, read_options=read_options, parse_options=parse_options, convert_options=convert_options
                )
                for record_batch in reader:
                    if record_batch.num_rows == 0:
                        continue
                    lines = _lines_of_rows(cursor, record_batch.num_rows, invalid)
                    cursor = int(lines[-1]) + 1
                    invalid[:] = [line for line in invalid if line >= cursor]
                    yield self._parse(record_batch, file_index, lines, lambda i, lines=lines: f"{path}:{lines[i]}")
            except pa.ArrowInvalid as exc:
                if failure:
                    raise ValueError(failure[0]) from None
                raise ValueError(f"{path}: cannot parse as Criteo TSV: {exc}") from exc


def _lines_of_rows(cursor: int, num_rows: int, invalid: list[int]) -> np.ndarray:
    """1-based line numbers (num_rows,) int64 of the next good rows, from line `cursor` on.

    Every physical line is either a row or an invalid line (empty lines are rows), so the rows'
    lines are the lines from `cursor` on minus the invalid ones pyarrow reported.
    """
    skipped = np.array([line for line in invalid if line >= cursor], dtype=np.int64)
    candidates = np.arange(cursor, cursor + num_rows + skipped.shape[0], dtype=np.int64)
    if skipped.shape[0]:
        candidates = candidates[~np.isin(candidates, skipped)]
    return candidates[:num_rows]


def _open_at_line(path: str, lines: int) -> BinaryIO:
    """Opens `path` (plain or .gz) positioned after its first `lines` lines."""
    stream: BinaryIO = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    if lines == 0:
        return stream
    remaining = lines
    position = 0
    last = b""
    while True:
        chunk = stream.read(_SCAN_BYTES)
        if not chunk:
            if remaining == 1 and last not in (b"", b"\n"):
                return stream  # the last line has no newline and was consumed whole
            stream.close()
            raise ValueError(f"state.offset: {path} has fewer than {lines} lines")
        count = chunk.count(b"\n")
        if count < remaining:
            remaining -= count
            position += len(chunk)
            last = chunk[-1:]
            continue
        end = -1
        for _ in range(remaining):
            end = chunk.index(b"\n", end + 1)
        stream.seek(position + end + 1)
        return stream


@dataclass(frozen=True)
class CriteoSample:
    """What `write_criteo_sample` wrote: the good rows' fields and where the bad rows are."""

    path: Path
    good_rows: list[list[str]]  # fields of each good row, file order: label, I*, C*
    good_lines: list[int]  # 1-based line of each good row
    bad_lines: list[int]  # 1-based lines of the bad rows


def write_criteo_sample(
    path: str | Path,
    num_rows: int = 300,
    *,
    num_bad_rows: int = 12,
    num_dense: int = 13,
    num_sparse: int = 26,
    seed: int = 0,
) -> CriteoSample:
    """Writes a small Criteo-format TSV with empty fields and bad rows (for tests and demos).

    num_rows good rows plus num_bad_rows bad ones (too few fields, too many, a non-numeric
    integer or label, an empty line) at random lines. Categorical values come from one small
    vocabulary shared by all features, so equal strings appear in different features; a few are
    not hex. Deterministic given the arguments.
    """
    if num_rows < 0 or num_bad_rows < 0:
        raise ValueError(f"num_rows, num_bad_rows: must be >= 0, got {num_rows}, {num_bad_rows}")
    rng = random.Random(seed)
    vocab = [f"{rng.getrandbits(32):08x}" for _ in range(40)] + ["not-hex", "0", "FFFF"]
    good: list[list[str]] = []
    for _ in range(num_rows):
        fields = [str(rng.randint(0, 1))]
        for _ in range(num_dense):
            fields.append("" if rng.random() < 0.15 else str(int(rng.expovariate(0.05)) - (rng.random() < 0.05)))
        for _ in range(num_sparse):
            fields.append("" if rng.random() < 0.15 else rng.choice(vocab[:8] if rng.random() < 0.6 else vocab))
        good.append(fields)
    kinds = ["few", "many", "int", "label", "empty"]
    bad = [
        _bad_line(kinds[i % len(kinds)], rng.choice(good) if good else ["0"] * (1 + num_dense + num_sparse), num_dense)
        for i in range(num_bad_rows)
    ]
    total = num_rows + num_bad_rows
    bad_positions = sorted(rng.sample(range(total), num_bad_rows))
    lines: list[str] = []
    good_lines: list[int] = []
    bad_iter, good_iter = iter(bad), iter(good)
    bad_set = set(bad_positions)
    for position in range(total):
        if position in bad_set:
            lines.append(next(bad_iter))
        else:
            lines.append("\t".join(next(good_iter)))
            good_lines.append(position + 1)
    path = Path(path)
    path.write_text("".join(line + "\n" for line in lines))
    return CriteoSample(path, good, good_lines, [p + 1 for p in bad_positions])


def _bad_line(kind: str, template: list[str], num_dense: int) -> str:
    fields = list(template)
    if kind == "few":
        fields = fields[:-3]
    elif kind == "many":
        fields = fields + ["extra"]
    elif kind == "int" and num_dense:
        fields[1] = "12x"
    elif kind in ("label", "int"):
        fields[0] = "yes"
    else:
        return ""
    return "\t".join(fields)
