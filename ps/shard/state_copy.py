"""A shard's state as the messages that copy it to a new standby (ps/shard/replication.py).

    TableState --npz (no pickle)--> bytes --chunks of the message limit--> "TableState" messages
    PushLedger.export() --JSON (answers base64)--> one "Ledger" message

Arrays keep their dtype and shape, so a loaded table equals the exported one bit for bit.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from ps.table.state import TableState

_ARRAYS = (
    "keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts", "pending_last_step",
)


def encode_table_state(state: TableState) -> bytes:
    arrays = {name: getattr(state, name) for name in _ARRAYS}
    arrays["scalars"] = np.array([state.version, state.step], dtype=np.uint64)
    arrays["storage"] = np.array(state.storage)
    if state.encoded is not None:
        arrays["encoded"] = state.encoded
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def decode_table_state(data: bytes) -> TableState:
    """ValueError when `data` is not what encode_table_state writes (bytes from the network)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            fields = {name: archive[name] for name in _ARRAYS}
            version, step = (int(v) for v in archive["scalars"])
            encoded = archive["encoded"] if "encoded" in archive.files else None
            storage = str(archive["storage"])
    except Exception as exc:  # noqa: BLE001 - whatever numpy's reader raises on junk, the copy is invalid
        raise ValueError(f"state copy: not a table state ({type(exc).__name__}: {exc})") from None
    return TableState(**fields, version=version, step=step, storage=storage, encoded=encoded)


def chunks(data: bytes, size: int) -> list[memoryview]:
    """Views of data's pieces of at most `size` bytes (one empty piece for empty data): no copy of
    data, which may be a large table's whole state; a piece is copied into its message when sent."""
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(data), size)] or [view[:0]]


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
