"""The messages of one Subscribe range, made one at a time.

    range (touched keys (t,), their rows (t, row bytes), deleted keys (d,), acks)
      -> rows in pieces of at most `budget` bytes, then deleted keys, then acks; at least one message

A subscriber that stops reading leaves its stream suspended between two messages. Made one at a
time, the stream then holds the range's rows and one message; made all at once, as before, it held
a second copy of every row until its client took the last message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ps import wire
from ps.rpc import ps_pb2
from ps.shard.update_log import LogRange

ACK_BYTES = 32  # one VersionAck on the wire, framing included (generous)


@dataclass(frozen=True)
class RangePart:
    """One message's share of a range: `fields` for ps_pb2.UpdateBatch (keys and values, or
    deleted_keys, or acks, or none), and whether it ends the range."""

    fields: dict
    last: bool


def range_parts(changes: LogRange, rows: np.ndarray, budget: int) -> Iterator[RangePart]:
    """The parts of `changes`, whose touched keys' rows are `rows` (t, row bytes) uint8, each at
    most `budget` bytes (one row or key or ack at least), made as they are taken."""
    touched, deleted = changes.touched_keys, changes.deleted_keys
    if rows.shape[0] != touched.shape[0]:
        raise ValueError(f"range_parts: {rows.shape[0]} rows for {touched.shape[0]} keys")
    rows_per = max(1, budget // (8 + rows.shape[1]))
    keys_per = max(1, budget // 8)
    acks_per = max(1, budget // ACK_BYTES)
    row_starts = range(0, touched.shape[0], rows_per)
    deleted_starts = range(0, deleted.shape[0], keys_per)
    ack_starts = range(0, len(changes.acks), acks_per)
    total = len(row_starts) + len(deleted_starts) + len(ack_starts)
    if total == 0:
        yield RangePart({}, True)
        return
    made = 0
    for i in row_starts:
        made += 1
        keys = wire.encode_keys(touched[i : i + rows_per])
        yield RangePart({"keys": keys, "values": rows[i : i + rows_per].tobytes()}, made == total)
    for i in deleted_starts:
        made += 1
        yield RangePart({"deleted_keys": wire.encode_keys(deleted[i : i + keys_per])}, made == total)
    for i in ack_starts:
        made += 1
        acks = [ps_pb2.VersionAck(version=v, ack_time=t, num_keys=k) for v, t, k in changes.acks[i : i + acks_per]]
        yield RangePart({"acks": acks}, made == total)
