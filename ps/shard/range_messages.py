"""The messages of one Subscribe range, made one at a time.

    range (touched keys (t,), their rows (t, row bytes), deleted keys (d,), acks)
      -> rows in pieces of at most `budget` bytes, then deleted keys, then acks; at least one message;
         one message with all of them when they fit `budget` together

A subscriber that stops reading leaves its stream suspended between two messages. Made one at a
time, the stream then holds the range's rows and one message; made all at once, as before, it held
a second copy of every row until its client took the last message. range_pieces gives the same
messages by position, so that a live stream reads each message's rows only when it makes it
(ps/shard/server.py): it then holds the range's keys and one message's rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ps import wire
from ps.rpc import ps_pb2
from ps.shard.update_log import LogRange

ACK_BYTES = 32  # one VersionAck on the wire, framing included (generous)
ROW_KINDS = ("rows", "whole")  # the pieces that carry touched keys' rows


@dataclass(frozen=True)
class RangePart:
    """One message's share of a range: `fields` for ps_pb2.UpdateBatch (keys and values, or
    deleted_keys, or acks, or none), and whether it ends the range."""

    fields: dict
    last: bool


@dataclass(frozen=True)
class RangePiece:
    """One message's share of a range, by position: the touched keys [start, stop) and their rows
    (kind "rows"), the deleted keys [start, stop) ("deleted"), the acks [start, stop) ("acks"),
    all of a range that fits one message ("whole": its rows as "rows" says, its deleted keys and
    acks all), or nothing ("empty": a range without changes); and whether it ends the range."""

    kind: str
    start: int
    stop: int
    last: bool


def range_pieces(changes: LogRange, row_bytes: int, budget: int) -> Iterator[RangePiece]:
    """The pieces of `changes`, whose rows are `row_bytes` bytes each, each at most `budget` bytes
    (one row or key or ack at least); at least one."""
    rows_per = max(1, budget // (8 + row_bytes))
    keys_per = max(1, budget // 8)
    acks_per = max(1, budget // ACK_BYTES)
    spans = [
        ("rows", changes.touched_keys.shape[0], rows_per),
        ("deleted", changes.deleted_keys.shape[0], keys_per),
        ("acks", len(changes.acks), acks_per),
    ]
    total = sum(-(-count // per) for _, count, per in spans)
    if total == 0:
        yield RangePiece("empty", 0, 0, True)
        return
    touched = changes.touched_keys.shape[0]
    whole_bytes = touched * (8 + row_bytes) + changes.deleted_keys.shape[0] * 8 + len(changes.acks) * ACK_BYTES
    if total > 1 and whole_bytes <= budget:
        # A range that fits one message is one: a push's range was its rows and then its acks,
        # two messages (and, over SubscribeTables, two replies) for a few rows.
        yield RangePiece("whole", 0, touched, True)
        return
    made = 0
    for kind, count, per in spans:
        for start in range(0, count, per):
            made += 1
            yield RangePiece(kind, start, min(start + per, count), made == total)


def piece_fields(changes: LogRange, piece: RangePiece, rows: np.ndarray | None = None) -> dict:
    """ps_pb2.UpdateBatch fields of `piece`; a "rows" piece needs its rows (stop - start, row bytes)
    uint8."""
    if piece.kind in ROW_KINDS:
        if rows is None or rows.shape[0] != piece.stop - piece.start:
            raise ValueError(f"piece_fields: the rows of touched keys [{piece.start}, {piece.stop}) are needed")
        fields = {"keys": wire.encode_keys(changes.touched_keys[piece.start : piece.stop]), "values": rows.tobytes()}
        if piece.kind == "whole":
            whole = piece_fields(changes, RangePiece("deleted", 0, changes.deleted_keys.shape[0], True))
            fields.update(whole, **piece_fields(changes, RangePiece("acks", 0, len(changes.acks), True)))
        return fields
    if piece.kind == "deleted":
        return {"deleted_keys": wire.encode_keys(changes.deleted_keys[piece.start : piece.stop])}
    if piece.kind == "acks":
        return {
            "acks": [
                ps_pb2.VersionAck(version=v, ack_time=t, num_keys=k)
                for v, t, k in changes.acks[piece.start : piece.stop]
            ]
        }
    return {}


def range_parts(changes: LogRange, rows: np.ndarray, budget: int) -> Iterator[RangePart]:
    """The parts of `changes`, whose touched keys' rows are `rows` (t, row bytes) uint8, each at
    most `budget` bytes (one row or key or ack at least), made as they are taken."""
    if rows.shape[0] != changes.touched_keys.shape[0]:
        raise ValueError(f"range_parts: {rows.shape[0]} rows for {changes.touched_keys.shape[0]} keys")
    for piece in range_pieces(changes, rows.shape[1], budget):
        piece_rows = rows[piece.start : piece.stop] if piece.kind in ROW_KINDS else None
        yield RangePart(piece_fields(changes, piece, piece_rows), piece.last)
