"""A shard's state as the messages that copy it to a new standby (ps/shard/replication.py).

    TableState --header (JSON) + each array's bytes--> pieces of the message limit --> "TableState" messages
    PushLedger.export() --JSON (answers base64)--> one "Ledger" message

A table's first piece is a JSON header (each array's name, dtype and shape; version, step,
storage); the pieces after it are the arrays' bytes in that order. The sender's pieces are views of
the exported arrays and the receiver writes them straight into arrays allocated from the header,
so neither side holds another whole copy of a table (an npz encoding did: one more copy on each
side, and the chunks of it another). Arrays keep their dtype and shape, so a loaded table equals
the exported one bit for bit.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from ps.table.state import TableState

_FORMAT = "embps-table-state-1"
_ARRAYS = (
    "keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts", "pending_last_step",
)
_MAX_STATE_BYTES = 1 << 40  # what one table's header may announce


def table_state_pieces(state: TableState, size: int) -> list[bytes | memoryview]:
    """The `state` bytes of one table's TableState messages, in order: the header, then the arrays'
    bytes in pieces of at most `size` bytes, views of the arrays (copied into each message as it is
    sent). At least the header, so an empty table is one message."""
    arrays = [(name, np.ascontiguousarray(getattr(state, name))) for name in _ARRAYS]
    if state.encoded is not None:
        arrays.append(("encoded", np.ascontiguousarray(state.encoded)))
    header = {
        "format": _FORMAT, "version": int(state.version), "step": int(state.step), "storage": str(state.storage),
        "arrays": [[name, array.dtype.str, list(array.shape)] for name, array in arrays],
    }
    pieces: list[bytes | memoryview] = [json.dumps(header).encode()]
    for _, array in arrays:
        if array.nbytes:
            view = memoryview(array).cast("B")
            pieces.extend(view[i : i + size] for i in range(0, array.nbytes, size))
    return pieces


class TableStateReader:
    """Rebuilds a TableState from table_state_pieces' pieces, bytes from the network: the header
    allocates each array once, and add() writes the pieces into them in order. ValueError, naming
    what is wrong, for anything table_state_pieces does not write."""

    def __init__(self, header: bytes) -> None:
        try:
            fields = json.loads(header)
            if fields["format"] != _FORMAT:
                raise ValueError(f"format {fields['format']!r}, expected {_FORMAT!r}")
            self._version, self._step = _count(fields["version"]), _count(fields["step"])
            self._storage = fields["storage"]
            if not isinstance(self._storage, str):
                raise ValueError("storage: not a string")
            announced = [tuple(a) for a in fields["arrays"]]
            names = [a[0] for a in announced]
            if names not in (list(_ARRAYS), [*_ARRAYS, "encoded"]):
                raise ValueError(f"arrays {names}, expected {list(_ARRAYS)} (and 'encoded')")
            shapes = [(np.dtype(dtype), tuple(_count(n) for n in shape)) for _, dtype, shape in announced]
        except ValueError as exc:
            raise ValueError(f"state copy: not a table state header ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - JSON of another shape, a dtype numpy does not know
            raise ValueError(f"state copy: not a table state header ({type(exc).__name__}: {exc})") from None
        if any(dtype.kind not in "iuf" or not 1 <= len(shape) <= 2 for dtype, shape in shapes):
            raise ValueError("state copy: a table state's arrays are 1-D or 2-D numbers")
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
                raise ValueError("state copy: more bytes than the table state's header announced")
            view = self._views[0]
            n = min(view.nbytes - self._at, data.nbytes)
            view[self._at : self._at + n] = data[:n]
            data = data[n:]
            self._at += n
            if self._at == view.nbytes:
                self._views.pop(0)
                self._at = 0

    def finish(self) -> TableState:
        """The table state, once every announced byte came."""
        if self._views:
            raise ValueError("state copy: fewer bytes than the table state's header announced")
        arrays = dict(self._arrays)
        encoded = arrays.pop("encoded", None)
        return TableState(**arrays, version=self._version, step=self._step, storage=self._storage, encoded=encoded)


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
