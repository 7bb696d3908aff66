"""A shard's state as the messages that copy it to a new standby (ps/shard/replication.py).

    rows' words, copied between pushes --> "TableRows" messages --> CopiedRows (a RowStore)
    TableImage --header (JSON) + each array's bytes--> pieces of <= 4 MiB --> "TableState" messages
    PushLedger.export() --JSON (answers base64)--> "Ledger" messages

A table travels as its image (ps/table/state.py TableImage: its rows where they lie, free rows,
eviction cursors and sampler), not as its TableState: a standby must go on evicting exactly what
its primary evicts. A table's first piece is a JSON header (counters, the sampler's state, each
array's name, dtype and shape); the pieces after it are the arrays' bytes in that order. The
sender's pieces are views of the image's arrays and the receiver writes them straight into arrays
allocated from the header, so neither side holds another whole copy of a table. Arrays keep their
dtype and shape, so a loaded table equals the copied one bit for bit.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from ps.arrays import set_flags
from ps.table.row_store import RowStore
from ps.table.state import TableImage

_FORMAT = "embps-table-image-2"  # 2: words of the rows word_rows names (a live copy), not always every row
_MAX_STATE_BYTES = 1 << 40  # what one table's header may announce


def table_image_pieces(image: TableImage, size: int) -> list[bytes | memoryview]:
    """The `state` bytes of one table's "TableState" messages, in order: the header, then the arrays'
    bytes in pieces of at most `size` bytes, views of the arrays (copied into each message as it is
    sent). At least the header, so an empty table is one message."""
    arrays = [(name, np.ascontiguousarray(image.arrays[name])) for name in TableImage.ARRAYS]
    header = {
        "format": _FORMAT, "counters": image.counters, "rng": image.rng,
        "arrays": [[name, array.dtype.str, list(array.shape)] for name, array in arrays],
    }
    pieces: list[bytes | memoryview] = [json.dumps(header).encode()]
    for _, array in arrays:
        if array.nbytes:
            view = memoryview(array).cast("B")
            pieces.extend(view[i : i + size] for i in range(0, array.nbytes, size))
    return pieces


class TableImageReader:
    """Rebuilds a TableImage from table_image_pieces' pieces, bytes from the network: the header
    allocates each array once, and add() writes the pieces into them in order. ValueError, naming
    what is wrong, for anything table_image_pieces does not write (whether the image fits the
    table is EmbeddingTable.load_image's to say)."""

    def __init__(self, header: bytes) -> None:
        try:
            fields = json.loads(header)
            if fields["format"] != _FORMAT:
                raise ValueError(f"format {fields['format']!r}, expected {_FORMAT!r} (a primary of another embps "
                                 "version: restart the pair on one version)")
            counters = fields["counters"]
            if sorted(counters) != sorted(TableImage.COUNTERS):
                raise ValueError(f"counters {sorted(counters)}, expected {sorted(TableImage.COUNTERS)}")
            self._counters = {name: _count(counters[name]) for name in TableImage.COUNTERS}
            self._rng = fields["rng"]
            if not isinstance(self._rng, dict):
                raise ValueError("rng: not an object")
            announced = [tuple(a) for a in fields["arrays"]]
            names = [a[0] for a in announced]
            if names != list(TableImage.ARRAYS):
                raise ValueError(f"arrays {names}, expected {list(TableImage.ARRAYS)}")
            shapes = [(np.dtype(dtype), tuple(_count(n) for n in shape)) for _, dtype, shape in announced]
        except ValueError as exc:
            raise ValueError(f"state copy: not a table image header ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - JSON of another shape, a dtype numpy does not know
            raise ValueError(f"state copy: not a table image header ({type(exc).__name__}: {exc})") from None
        if any(dtype.kind not in "iuf" or not 1 <= len(shape) <= 2 for dtype, shape in shapes):
            raise ValueError("state copy: a table image's arrays are 1-D or 2-D numbers")
        total = sum(dtype.itemsize * math.prod(shape) for dtype, shape in shapes)
        if total > _MAX_STATE_BYTES:
            raise ValueError(f"state copy: a header announcing {total:,} bytes, over {_MAX_STATE_BYTES:,}")
        try:
            self._arrays = {name: np.empty(shape, dtype) for name, (dtype, shape) in zip(names, shapes, strict=True)}
        except MemoryError:
            raise ValueError(f"state copy: no memory for the {total:,} bytes the header announces") from None
        self._views = [memoryview(a).cast("B") for a in self._arrays.values() if a.nbytes]
        self._at = 0  # bytes written into self._views[0]; filled views are dropped

    def add(self, piece: bytes) -> None:
        """Writes the next bytes of the arrays."""
        data = memoryview(piece)
        while data.nbytes:
            if not self._views:
                raise ValueError("state copy: more bytes than the table image's header announced")
            view = self._views[0]
            n = min(view.nbytes - self._at, data.nbytes)
            view[self._at : self._at + n] = data[:n]
            data = data[n:]
            self._at += n
            if self._at == view.nbytes:
                self._views.pop(0)
                self._at = 0

    def finish(self) -> TableImage:
        """The table image, once every announced byte came."""
        if self._views:
            raise ValueError("state copy: fewer bytes than the table image's header announced")
        return TableImage(dict(self._arrays), dict(self._counters), self._rng)


class CopiedRows:
    """The rows of one table that "TableRows" messages brought, written into `store` (the table's
    new RowStore) as they come; held (>= rows,) bool marks those written. The primary sends its rows
    in order first, then rows it wrote since among them, so a message reaches at most its own
    number of rows past those held: a message naming rows further on is refused (ValueError), and
    so is one whose words do not match its rows, before the store grows for it."""

    def __init__(self, store: RowStore) -> None:
        self.store = store
        self.held = np.zeros(0, dtype=np.bool_)
        self._span = 0  # 1 + the highest row written

    def add(self, rows: bytes, words: bytes) -> None:
        width = self.store.width
        if len(rows) % 8:
            raise ValueError(f"state copy: rows of {len(rows)} bytes, not int64 numbers")
        row_ids = np.frombuffer(rows, dtype="<i8")
        n = row_ids.shape[0]
        if len(words) != n * width * 4:
            raise ValueError(f"state copy: {len(words)} bytes of words for {n} rows of {width} words")
        if not n:
            return
        if int(row_ids.min()) < 0 or int(row_ids.max()) >= self._span + n:
            raise ValueError(f"state copy: rows in [{int(row_ids.min())}, {int(row_ids.max())}] after "
                             f"{self._span} rows")
        self._span = max(self._span, int(row_ids.max()) + 1)
        self.store.ensure_rows(self._span)
        self.store.scatter(row_ids.astype(np.int64), 0, np.frombuffer(words, dtype="<f4").reshape(n, width))
        self.held = set_flags(self.held, row_ids)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def encode_ledger(exported: list) -> bytes:
    return json.dumps(
        [[client, [[seq, base64.b64encode(answer).decode(), multi] for seq, answer, multi in entries]]
         for client, entries in exported]
    ).encode()


def decode_ledger(data: bytes) -> list:
    """ValueError when `data` is not what encode_ledger writes (bytes from the network)."""
    try:
        return [
            [str(client), [[int(seq), base64.b64decode(answer), bool(multi)] for seq, answer, multi in entries]]
            for client, entries in json.loads(data)
        ]
    except Exception as exc:  # noqa: BLE001 - JSON of another shape, bad base64: the copy is invalid
        raise ValueError(f"state copy: not a push-id memory ({type(exc).__name__}: {exc})") from None
