"""Criteo-format TSV: a streaming reader, and a small sample-file writer for tests.

One sample per line, tab-separated, no header, no quoting:

    label <TAB> I1 ... I{num_dense} <TAB> C1 ... C{num_sparse}

label 0/1; I* integer counts (may be negative or empty); C* categorical values, in Criteo
8 hex digits (any string is accepted, see worker/features.py), may be empty. A line with the
wrong number of fields, or a non-numeric label/I* field, is a bad row (see `BadRowPolicy`).
Empty lines are bad rows too. Files may be gzip-compressed (`.gz`).
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ps.errors import EmbpsError
from worker.data_options import ArrowMemoryPool, BadRowPolicy
from worker.data_paths import DataFile, open_input
from worker.readers import FileReader, _Rows, line_reason
from worker.shares import Unit, byte_ranges

_SCAN_BYTES = 1 << 20


class CriteoTsvReader(FileReader):
    """Streams this rank's byte ranges of Criteo TSV files as batches; `offset` counts lines.

    A plain file is cut into byte ranges of at most `range_bytes` (and of at most total / W, so
    every rank gets a range). The owner of [start, end) reads the lines that begin inside it:
    from the first newline at or after start - 1 (the file's start for start 0) to the first
    newline at or after end - 1, so every line has one owner and no rank parses another's. A
    gzip file is one range. Each range is parsed block by block (`read_block_bytes`) with
    pyarrow's streaming CSV reader, every column read as a string and validated here. Restoring
    a position scans the range's bytes up to that line (no parsing) and starts there.

    >>> reader = CriteoTsvReader(["s3://bucket/day_*.tsv"], ReaderConfig(global_batch_size=4096), rank, world)
    >>> for batch in reader: ...
    """

    _auto_memory_pool = ArrowMemoryPool.MIMALLOC  # see worker/readers.py::configure_arrow

    def _plan(self) -> list[list[Unit]]:
        plain = [f for f in self.files if not f.name.endswith(".gz")]
        total = sum(f.size for f in plain)
        range_bytes = max(1, min(self.config.range_bytes, -(-total // self.world_size)))
        units = []
        for index, data_file in enumerate(self.files):
            with open_input(data_file) as handle:
                handle.read(1)  # an object we may list but not read fails here, at start
            if data_file.name.endswith(".gz"):
                units.append([Unit(index, 0, 0, -1)])
            else:
                ranges = byte_ranges(data_file.size, range_bytes)
                units.append([Unit(index, part, start, end) for part, (start, end) in enumerate(ranges)])
        return units

    def _read_unit(self, unit: Unit, start: int) -> Iterator[_Rows]:
        data_file = self.files[unit.file_index]
        path = data_file.name
        names = self.config.column_names
        invalid: list[int] = []  # 1-based lines (of the range) with the wrong field count, not yet passed
        failure: list[str] = []
        fail = self.config.bad_rows is BadRowPolicy.FAIL
        if unit.start == 0:

            def where(line: int) -> str:
                return f"{path}:{line}"
        else:

            def where(line: int) -> str:
                return f"{path}:{line} (line of the byte range from {unit.start})"

        def on_invalid(row: pacsv.InvalidRow) -> str:
            line = start + row.number
            reason = line_reason(row.text, row.expected_columns, row.actual_columns)
            invalid.append(line)
            if fail:
                # An exception raised here would be swallowed by pyarrow: record it, stop the parse.
                failure.append(f'{where(line)}: bad row: {reason} (set bad_rows = "skip" to skip such rows)')
                return "error"
            self._bad.add(where(line), reason)
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
            # A categorical is any bytes (hashed as they are), and a number that is not UTF-8 fails
            # its pattern as a bad row: checked, one Latin-1 byte failed the whole pass. The invalid-row
            # handler's text is decoded all the same: _RangeStream makes such rows UTF-8.
            check_utf8=False,
        )
        with _open_range(data_file, unit, start, len(names), self.config.read_block_bytes) as stream:
            cursor = start + 1
            try:
                if not stream.peek():
                    return  # an empty range, or the position is its end: pyarrow would call it an error
                reader = pacsv.open_csv(
                    stream, read_options=read_options, parse_options=parse_options, convert_options=convert_options
                )
                for record_batch in reader:
                    if record_batch.num_rows == 0:
                        continue
                    lines = _lines_of_rows(cursor, record_batch.num_rows, invalid)
                    self.num_parsed += int(lines[-1]) + 1 - cursor
                    cursor = int(lines[-1]) + 1
                    invalid[:] = [line for line in invalid if line >= cursor]
                    yield self._parse(record_batch, lines, lambda i, lines=lines: where(int(lines[i])))
                self.num_parsed += len(invalid)  # invalid lines after the last good one
            except pa.ArrowInvalid as exc:
                if failure:
                    raise ValueError(failure[0]) from None
                raise ValueError(f"{path}: cannot parse as Criteo TSV: {exc}") from exc
            except EmbpsError:
                raise
            except (OSError, pa.ArrowException) as exc:  # a truncated .gz: the error named no file
                raise OSError(f"{path}: cannot read: {exc}") from exc


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


class _RangeStream(io.RawIOBase):
    """Bytes [begin, stop) of a stream (stop None: to its end), as pyarrow's parser needs them:

    - every bare carriage return (one no line feed follows) read as a tab: pyarrow ends a row at
      a bare \\r, the byte ranges and a resume's skipped lines count \\n only, so each one moved
      every later resume offset a line on (rows skipped), and the part of the line before it
      passed as a good row. As a tab, its line is one row with a field too many: a bad row, at
      its own line number.
    - in a line with the wrong number of fields, each byte that is not UTF-8 read as "?":
      pyarrow decodes such a line strictly to hand it to the invalid-row handler, and the decode
      error ended the pass ("cannot parse as Criteo TSV"), bad_rows = "skip" or not, before the
      handler saw the row. So it is the bad row it was, at its own line number and of its own
      length (an escape four bytes long could make it too long for a block). A line with the
      right number of fields keeps its bytes: a categorical is hashed as the bytes it is, a count
      that is not UTF-8 fails its pattern. Only a chunk that is not ASCII is read line by line.
    """

    def __init__(self, source: pa.NativeFile, remaining: int | None, num_fields: int, block_bytes: int) -> None:
        """num_fields: the fields of a good row; block_bytes: pyarrow's block size. A line that is
        not ASCII is read a block at a time up to its end, but past two blocks it is handed on as
        it is: pyarrow fails on a row longer than that anyway ("straddling object")."""
        self._source = source
        self._remaining = remaining
        self._num_fields = num_fields
        self._block_bytes = block_bytes
        self._raw = b""  # read from the source, not yet prepared
        self._ready = b""  # prepared, not yet returned
        self._open_tabs = 0  # tabs in the prepared part of a line whose end is not prepared yet

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = []
            while chunk := self.read(_SCAN_BYTES):
                parts.append(chunk)
            return b"".join(parts)
        if size == 0:
            return b""
        # A full read but at the end: pyarrow takes each read as a block, and a row that does not
        # end in the block after the one it starts in fails the pass ("straddling object").
        while len(self._ready) < size:
            more = self._prepare(size - len(self._ready))
            if not more:
                break
            self._ready += more
        out, self._ready = self._ready[:size], self._ready[size:]
        return out

    def _prepare(self, size: int) -> bytes:
        """The next bytes of the source, masked and escaped (see the class doc); b"" at its end."""
        data, self._raw = self._raw or self._pull(size), b""
        if not data.isascii():
            data = self._whole_lines(data)
        if data.endswith(b"\r") and not self._raw:
            self._raw = self._pull(1)  # whether a line feed follows it
        data = _mask_bare_cr(data, self._raw[:1])
        if not data.isascii():
            data = self._escape_undecodable(data)
        newline = data.rfind(b"\n")
        tabs = data.count(b"\t", newline + 1)
        self._open_tabs = tabs if newline >= 0 else self._open_tabs + tabs
        return data

    def _whole_lines(self, data: bytes) -> bytes:
        """data cut so that its last line is ASCII or ends in it (the rest back to `_raw`): a line's
        field count, which decides whether its bytes are escaped, needs the whole line."""
        while True:
            end = data.rfind(b"\n") + 1
            if data[end:].isascii():  # ASCII is UTF-8 whatever follows: _open_tabs counts its fields
                return data
            if end:
                self._raw = data[end:]
                return data[:end]
            more = self._pull(self._block_bytes) if len(data) <= 2 * self._block_bytes else b""
            if not more:
                return data
            data += more

    def _escape_undecodable(self, data: bytes) -> bytes:
        """data (masked; whole lines, but for an ASCII last line or the source's last one) with each
        byte that is not UTF-8 as "?" in its lines of the wrong field count; the first line may go
        on one that `_open_tabs` counted."""
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError:
            pass
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if line.isascii() or line.count(b"\t") + (self._open_tabs if i == 0 else 0) + 1 == self._num_fields:
                continue
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                lines[i] = line.decode("utf-8", "surrogateescape").encode("utf-8", "replace")  # a byte: "?"
        return b"\n".join(lines)

    def _pull(self, size: int) -> bytes:
        if self._remaining is not None:
            size = self._remaining if size < 0 else min(size, self._remaining)
            if size == 0:
                return b""
        data = self._source.read(size) if size >= 0 else self._source.read()
        if self._remaining is not None:
            self._remaining -= len(data)
        return bytes(data)

    def peek(self) -> bool:
        """Whether bytes are left to read (kept for the next read)."""
        if not self._ready and not self._raw:
            self._raw = self._pull(self._block_bytes)
        return bool(self._ready or self._raw)

    def skip_lines(self, lines: int, name: str) -> None:
        """Consumes `lines` lines; a last line without newline counts as one."""
        remaining = lines
        while remaining:
            chunk = self.read(_SCAN_BYTES)
            if not chunk:
                raise ValueError(f"state.offset: {name} (this range) has fewer than {lines} lines")
            count = chunk.count(b"\n")
            if count < remaining:
                remaining -= count
                if remaining == 1 and not chunk.endswith(b"\n") and not self.peek():
                    return  # the last line has no newline and was consumed whole
                continue
            end = -1
            for _ in range(remaining):
                end = chunk.index(b"\n", end + 1)
            self._ready = chunk[end + 1 :] + self._ready
            return

    def close(self) -> None:
        self._source.close()
        super().close()


_BARE_CR = re.compile(rb"\r(?!\n)")


def _mask_bare_cr(data: bytes, following: bytes) -> bytes:
    """data with each carriage return that no line feed follows as a tab; `following`: the byte
    after data (b"" at the end of the stream), which decides for a carriage return data ends with.
    One that ends the stream ends its line (a CRLF file whose last line has no line feed; a range
    ends after a line feed, so only a file's end is one): as a tab, that last row was a bad one."""
    if b"\r" not in data:
        return data
    if data.endswith(b"\r") and following == b"\n":
        return _BARE_CR.sub(b"\t", data[:-1]) + b"\r"
    if data.endswith(b"\r") and following == b"":
        return _BARE_CR.sub(b"\t", data[:-1])
    return _BARE_CR.sub(b"\t", data)


def _open_range(data_file: DataFile, unit: Unit, lines: int, num_fields: int, block_bytes: int) -> _RangeStream:
    """The lines of `unit` (see CriteoTsvReader), positioned after its first `lines` lines; num_fields
    and block_bytes as _RangeStream takes them."""
    if unit.end == -1:
        source = data_file.fs.open_input_stream(data_file.path, compression="gzip")
        stream = _RangeStream(source, None, num_fields, block_bytes)
    else:
        handle = open_input(data_file)
        begin = 0 if unit.start == 0 else _next_newline(handle, unit.start - 1, data_file.size) + 1
        stop = data_file.size if unit.end >= data_file.size else _next_newline(handle, unit.end - 1, data_file.size) + 1
        handle.seek(min(begin, data_file.size))
        stream = _RangeStream(handle, max(0, stop - begin), num_fields, block_bytes)
    if lines:
        stream.skip_lines(lines, data_file.name)
    return stream


def _next_newline(handle: pa.NativeFile, position: int, size: int) -> int:
    """Position of the first newline at or after `position`, or size - 1 when there is none."""
    while position < size:
        chunk = handle.read_at(min(_SCAN_BYTES, size - position), position)
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found
        position += len(chunk)
    return size - 1


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
