"""What a table hands out and takes back whole: its state (snapshots) and its changed keys.

Plain numpy dataclasses, with no torch, so that snapshot tools and serving replicas can read and
write table states without importing the table itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
