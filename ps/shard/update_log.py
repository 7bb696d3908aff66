"""The update log of one table on one shard: which keys each applied push touched, bounded.

    base_version           head_version
        |  v+1   v+2   ...   v+k |
        |  keys  keys        keys|   entry = (version, touched keys (t,), deleted keys (d,), ack time)

The log holds every version in (base_version, head_version], contiguous. It holds keys only;
rows are read from the table when a subscriber is sent a range, so a range merged over many
pushes carries each key once, with its current row. Bounded by entries, by total keys and by
bytes (keys and a fixed overhead per entry; a shard splits DEFAULT_SHARD_LOG_BYTES over its
tables): the oldest entries go first, and a subscriber that still needs them gets LogGapError (it
must resync from a full copy). Synchronous and not thread-safe, like the table it follows.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ps.errors import LogGapError

DEFAULT_MAX_ENTRIES = 65536
DEFAULT_MAX_KEYS = 1 << 20
ENTRY_OVERHEAD_BYTES = 400  # a LogEntry, its two array headers and its deque slot (beside the keys)
# What a shard's update logs hold together, split evenly over its tables (at least
# MIN_TABLE_LOG_BYTES each): one table's log alone reaches ~34 MB under the bounds above (1M keys
# and their entries), 6.8 GB for a shard of 200 tables. Above 30 tables the split binds first.
DEFAULT_SHARD_LOG_BYTES = 1 << 30
MIN_TABLE_LOG_BYTES = 1 << 20


def table_log_bytes(num_tables: int, shard_bytes: int = DEFAULT_SHARD_LOG_BYTES) -> int:
    """The byte bound of each of a shard's num_tables update logs."""
    return max(MIN_TABLE_LOG_BYTES, shard_bytes // max(1, num_tables))

class LogEntry(NamedTuple):
    """One applied push: version, touched keys (t,) int64 unique, deleted keys (d,) int64, ack_time
    (unix seconds when the push was acknowledged), keys_through (the touched and deleted keys the
    log took up to this push, since it began). A NamedTuple: one is made per table per push."""

    version: int
    touched_keys: np.ndarray
    deleted_keys: np.ndarray
    ack_time: float
    keys_through: int


@dataclass(frozen=True)
class LogRange:
    """The merged changes of versions (from_version, to_version].

    touched_keys (t,) int64: rows created or updated and not deleted after; deleted_keys (d,) int64:
    rows deleted and not recreated after; both sorted and disjoint. acks: (version, ack_time,
    num_keys) per push in the range, oldest first.
    """

    from_version: int
    to_version: int
    touched_keys: np.ndarray
    deleted_keys: np.ndarray
    acks: tuple[tuple[int, float, int], ...]


class UpdateLog:
    """Ring of LogEntry for versions (base_version, head_version]."""

    def __init__(
        self, base_version: int = 0, max_entries: int = DEFAULT_MAX_ENTRIES, max_keys: int = DEFAULT_MAX_KEYS,
        max_bytes: int | None = None,
    ) -> None:
        """max_bytes: bound on memory_bytes (None: none beyond the entries and keys)."""
        if max_entries < 1:
            raise ValueError(f"max_entries: must be >= 1, got {max_entries}")
        if max_keys < 1:
            raise ValueError(f"max_keys: must be >= 1, got {max_keys}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes: must be >= 1 or None, got {max_bytes}")
        self.max_entries = max_entries
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.base_version = base_version
        self.head_version = base_version
        self._entries: deque[LogEntry] = deque()
        self._num_keys = 0
        self._num_bytes = 0
        self._keys_taken = 0  # keys_through of the newest entry

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def num_keys(self) -> int:
        """Touched plus deleted keys held over all entries."""
        return self._num_keys

    @property
    def memory_bytes(self) -> int:
        """Bytes the log holds: its keys and a fixed overhead per entry."""
        return self._num_bytes

    def append(self, version: int, touched_keys: np.ndarray, deleted_keys: np.ndarray, ack_time: float) -> None:
        """Records push `version`: touched_keys (t,) int64 unique, deleted_keys (d,) int64.

        A version that does not follow head_version (the table was loaded or replaced) starts the
        log afresh at version - 1: older subscribers then get LogGapError, never a wrong range.
        """
        if version != self.head_version + 1:
            self._entries.clear()
            self._num_keys = 0
            self._num_bytes = 0
            self.base_version = version - 1
        keys = touched_keys.shape[0] + deleted_keys.shape[0]
        entry = LogEntry(version, touched_keys, deleted_keys, ack_time, self._keys_taken + keys)
        self._entries.append(entry)
        self._keys_taken += keys
        self._num_keys += keys
        self._num_bytes += _entry_bytes(entry)
        self.head_version = version
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_entries
            or self._num_keys > self.max_keys
            or (self.max_bytes is not None and self._num_bytes > self.max_bytes)
        ):
            dropped = self._entries.popleft()
            self._num_keys -= dropped.touched_keys.shape[0] + dropped.deleted_keys.shape[0]
            self._num_bytes -= _entry_bytes(dropped)
            self.base_version = dropped.version

    def keys_after(self, from_version: int) -> int:
        """Touched plus deleted keys of the pushes after from_version that the log holds (every
        push it holds when from_version is older): what reading that range costs. O(1), and safe
        to call without the lock the appends hold (a Subscribe stream sizes its next range with
        it on the event loop while the tables thread appends): it reads a few fields, and never
        iterates the entries, which an append could change under it."""
        count = self.head_version - max(from_version, self.base_version)
        entries = self._entries
        if count <= 0:
            return 0
        if count >= len(entries):
            return self._num_keys
        try:
            through = entries[-count - 1].keys_through  # read before _keys_taken, which only grows
        except IndexError:  # entries dropped by an append since len(): the range is the whole log
            return self._num_keys
        return self._keys_taken - through

    def covers(self, from_version: int) -> bool:
        """True when the log can produce every change after from_version."""
        return self.base_version <= from_version <= self.head_version

    def check(self, from_version: int, table: str) -> None:
        """Raises LogGapError unless covers(from_version)."""
        if from_version > self.head_version:
            raise LogGapError(
                f"table {table!r}: version {from_version} is ahead of this shard's {self.head_version} "
                "(the shard restarted from older state); resync with full_sync"
            )
        if from_version < self.base_version:
            raise LogGapError(
                f"table {table!r}: the update log starts after version {self.base_version}, the subscriber "
                f"holds {from_version} (it fell behind by more than {self.max_keys} keys, "
                f"{self.max_entries} pushes or {self.max_bytes or 'unbounded'} bytes of log); resync with full_sync"
            )

    def range_after(self, from_version: int, table: str = "") -> LogRange:
        """The merged changes of (from_version, head_version]; LogGapError if not covered."""
        return merge_entries(from_version, self.head_version, self.entries_after(from_version, table))

    def entries_after(self, from_version: int, table: str = "") -> tuple[LogEntry, ...]:
        """The entries of (from_version, head_version]; LogGapError if not covered. Under the lock
        the appends hold; what it returns stays valid after it (entries and their keys are never
        changed), so merge_entries may run on another thread while pushes go on."""
        self.check(from_version, table)
        # The log is contiguous, so the range is its newest head_version - from_version entries:
        # taken from the right, its cost follows the range, not how many pushes the log holds.
        return tuple(itertools.islice(reversed(self._entries), self.head_version - from_version))[::-1]


def merge_entries(from_version: int, to_version: int, entries: tuple[LogEntry, ...]) -> LogRange:
    """The merged changes of (from_version, to_version], whose entries, oldest first, are `entries`
    (UpdateLog.entries_after). Touches nothing but them: a Subscribe stream runs it off the lock."""
    empty = np.empty(0, dtype=np.int64)
    if not entries:
        return LogRange(from_version, to_version, empty, empty, ())
    acks = tuple((e.version, e.ack_time, int(e.touched_keys.shape[0])) for e in entries)
    if len(entries) == 1 and entries[0].deleted_keys.shape[0] == 0:
        return LogRange(from_version, to_version, np.sort(entries[0].touched_keys), empty, acks)
    # The last thing that happened to a key wins; in one entry, deletions come after updates
    # (a TTL sweep runs after the push's updates).
    parts = []
    for e in entries:
        parts.append(e.touched_keys)
        parts.append(e.deleted_keys)
    keys = np.concatenate(parts)
    is_delete = np.concatenate([np.full(p.shape[0], i % 2 == 1, dtype=np.bool_) for i, p in enumerate(parts)])
    reversed_keys = keys[::-1]
    unique, last_from_end = np.unique(reversed_keys, return_index=True)
    deleted = is_delete[::-1][last_from_end]
    return LogRange(from_version, to_version, unique[~deleted], unique[deleted], acks)


def _entry_bytes(entry: LogEntry) -> int:
    return entry.touched_keys.nbytes + entry.deleted_keys.nbytes + ENTRY_OVERHEAD_BYTES
