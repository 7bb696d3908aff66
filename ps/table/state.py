"""What a table hands out and takes back whole: its state (snapshots) and its changed keys.

Plain numpy dataclasses, with no torch, so that snapshot tools and serving replicas can read and
write table states without importing the table itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TableLayout:
    """Where a TableState's rows lie, and the state that picks which rows a push evicts, so that a
    table restored from a snapshot evicts what the snapshotted one would have (see TableImage for
    why that depends on the layout). Aligned with the TableState it belongs to:

    rows (u,) int64: each key's row; free_rows (f,) uint32: rows freed and not taken again, in the
    order new keys take them (last first); num_rows: rows handed out (u + f for a whole table).
    pending_rows (p,) int64 and pending_seq (p,) int64 (first-seen number): each pending key's row
    and when it was first seen; pending_free_rows (pf,) uint32; pending_num_rows.
    next_seq, sweep_cursor, pending_sweep_cursor, rng (the eviction sampler's numpy bit generator
    state): as in TableImage.

    An incremental snapshot's state holds the rows of its touched keys only; the rest (free
    rows, pending, cursors) is the whole table's at that point, so the last of a chain wins.
    """

    rows: np.ndarray
    free_rows: np.ndarray
    num_rows: int
    pending_rows: np.ndarray
    pending_seq: np.ndarray
    pending_free_rows: np.ndarray
    pending_num_rows: int
    next_seq: int
    sweep_cursor: int
    pending_sweep_cursor: int
    rng: dict


@dataclass
class TableState:
    """All state of a table, rows sorted by key. u = rows, p = keys pending admission.

    keys (u,) int64; values (u, dim) float32; optimizer_state (u, state_width) float32;
    freq (u,) uint32 pushes seen; last_step (u,) uint32 step of the last push;
    pending_keys (p,) int64; pending_counts (p,) uint32; pending_last_step (p,) uint32;
    version: pushes applied; step: the largest step pushed.
    storage: the table's row storage ("float32", "float16", "int8"); for float16 and int8,
    encoded (u, 4 * value_words) uint8 holds each row's value as stored (csrc/row_codec.h) and
    `values` its float32 decoding; a table of the same storage loads `encoded` bit for bit.
    layout: where the rows lie (TableLayout); None for a state without it (an older snapshot),
    which a table loads with rows laid out by key and eviction started afresh.
    """

    keys: np.ndarray
    values: np.ndarray
    optimizer_state: np.ndarray
    freq: np.ndarray
    last_step: np.ndarray
    pending_keys: np.ndarray
    pending_counts: np.ndarray
    pending_last_step: np.ndarray
    version: int = 0
    step: int = 0
    storage: str = "float32"
    encoded: np.ndarray | None = None
    layout: TableLayout | None = None


@dataclass
class TableChanges:
    """Keys changed since the previous take_changes(): touched (t,) int64 rows that were created
    or updated, deleted (d,) int64 rows that were evicted; both sorted, disjoint.

    complete False: more keys changed than the tracker may hold, so both arrays are empty and
    the changes are unknown; an incremental snapshot must then carry every row (and take the
    deletions from its parent's keys)."""

    touched_keys: np.ndarray
    deleted_keys: np.ndarray
    complete: bool = True


@dataclass
class TableImage:
    """A table as it lies in memory: what TableState holds, and where. A standby loads its
    primary's image (ps/shard/state_copy.py) and goes on exactly as the primary does, because a
    large table's eviction depends on the layout: its TTL sweep reads windows of rows in row order
    from a cursor, capacity eviction samples row indices with a seeded generator, and new keys
    take freed rows last-freed first (ps/table/embedding_table.py). A TableState loaded instead
    lays rows out by key and starts those afresh, so the standby would evict other keys.

    r = rows handed out, u of them live; q pending rows, pu of them live; o first-seen entries.
    keys (u,) int64 at rows (u,) int64; free_rows (r - u,) uint32 in the order new keys take them
    (last first); words (d, width) float32, the words as stored (values or encoded words, optimizer
    state, [freq, last_step] as uint32) of rows word_rows (d,) int64: every row, free rows included
    (d = r), or in a live copy's image the rows written since the standby got the rest.
    pending_keys (pu,) int64 at pending_rows (pu,) int64, pending_free_rows (q - pu,) uint32;
    pending_meta (q, 2) uint32 [count, last_step]; pending_row_keys (q,) int64 and pending_seq
    (q,) int64 (first-seen number, 0 on a free row); pending_order_keys / pending_order_seqs (o,)
    int64, the first-seen entries in order, cut into chunks of pending_order_chunks (c,) int64.
    counters: num_rows, pending_num_rows, next_seq, sweep_cursor, pending_sweep_cursor, version,
    step, num_admitted, num_evicted, num_pending_dropped. rng: the eviction sampler's
    numpy bit generator state.
    """

    ARRAYS = (
        "keys", "rows", "free_rows", "word_rows", "words", "pending_keys", "pending_rows", "pending_free_rows",
        "pending_meta", "pending_row_keys", "pending_seq", "pending_order_keys", "pending_order_seqs",
        "pending_order_chunks",
    )
    COUNTERS = (
        "num_rows", "pending_num_rows", "next_seq", "sweep_cursor", "pending_sweep_cursor", "version", "step",
        "num_admitted", "num_evicted", "num_pending_dropped",
    )

    arrays: dict[str, np.ndarray]
    counters: dict[str, int]
    rng: dict
