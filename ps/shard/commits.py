"""Committed steps on one shard (DESIGN section 9): what each table looked like when a step was done.

    update log:   ... v17 (step s) v18 (step s) | commit s ... v19 (step s+1) | commit s+1
    commit log:   SealedCommit(step s,   (v_prev, v18], keys touched, their rows AT v18, deleted keys)
                  SealedCommit(step s+1, (v18, v19],    ...)

Rows are read when the commit is recorded (Commit runs serialised with the pushes, and in sync
mode no push of step s + 1 reaches a shard before Commit(s) returns), so a committed range carries
the rows of its step, never later ones: a replica that applies ranges only up to a commit holds
exactly that step. A range that starts inside a commit (a replica that took a full copy between
two commits) is covered by that commit's range, whose rows are all at its step. Bounded by bytes
and by count, oldest first; a subscriber that needs a commit no longer held gets LogGapError and
resyncs. A commit whose changes the update log had already forgotten is kept as incomplete: it
marks the step, and only a subscriber already past it may continue. Rows are sealed only while
a committed stream is open on the table or one ended within the last SEAL_IDLE_SECONDS: a job
without replicas pays nothing per commit, and a replica that comes back later resyncs in full. A
shard's standby gets every commit over the replication stream with the tables its primary sealed
(sealed_tables), seals those and counts them as followed (mark_followed): once promoted it goes
on sealing them, so a replica that fails over to it goes on from its cut even when the trainer's
next commit arrives before the replica does. A commit the standby missed (its primary died first)
is covered by the next one: that range starts before the replica's cut, and a range that starts
inside a commit is served whole (above).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np

from ps.errors import LogGapError
from ps.rpc import ps_pb2

DEFAULT_SHARD_COMMIT_BYTES = 256 << 20  # per shard, split over its tables: rows sealed and not yet dropped
# A table's commit log holds at least this, however many tables share the shard's bytes (above 64
# tables the shard holds more: 4 MiB x tables, ~2 GiB at 500), so a replica of a many-table job
# is not sent to a full resync after a few steps behind.
MIN_TABLE_COMMIT_BYTES = 4 << 20
DEFAULT_MAX_COMMIT_BYTES = 64 << 20
DEFAULT_MAX_COMMITS = 4096
SEAL_IDLE_SECONDS = 60.0
MAX_STEP = 2**32 - 1  # a row's last_step is a uint32: no push carries a later step
MAX_DENSE_STATES = 4  # dense towers kept (the newest steps): a replica takes them with the rows
_EMPTY_KEYS = np.empty(0, dtype=np.int64)


@functools.cache
def no_rows(width: int) -> np.ndarray:
    """(0, width) float32, one read-only array per width: the rows of every commit that has none
    (a shard seals a commit per table per step, without rows for the tables nobody follows)."""
    rows = np.empty((0, width), dtype=np.float32)
    rows.flags.writeable = False
    return rows


@dataclass(frozen=True, slots=True)
class SealedCommit:
    """Changes of versions (from_version, to_version] with the rows as of step `step`'s commit.

    touched_keys (t,) int64 sorted, values (t, width) float32 words, row i of touched_keys[i] as the
    table stores it (ps/shard/state.py read_stored_rows; a float32 table's values), deleted_keys
    (d,) int64 sorted, disjoint from touched. complete = False: the update log had lost part of
    the range, so its keys are unknown (a subscriber before to_version must resync).
    """

    step: int
    from_version: int
    to_version: int
    touched_keys: np.ndarray
    values: np.ndarray
    deleted_keys: np.ndarray
    complete: bool = True
    commit_time: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.touched_keys.nbytes + self.values.nbytes + self.deleted_keys.nbytes + 200


class CommitLog:
    """The commits of one table on one shard, newest last; starts with a base commit (the step and
    version the table was restored at: its state is a committed one)."""

    def __init__(self, width: int, base_version: int = 0, base_step: int = 0,
                 max_bytes: int = DEFAULT_MAX_COMMIT_BYTES, max_commits: int = DEFAULT_MAX_COMMITS) -> None:
        self.width = width  # float32 words a row takes as the table stores it
        self.max_bytes = max_bytes
        self.max_commits = max_commits
        self.epoch = 0  # a new history of steps begins with each reset (subscribers resync)
        self.subscribed_at = -SEAL_IDLE_SECONDS  # time.monotonic() a committed stream last ended
        self.followers = 0  # committed streams open on the table (ps/shard/commit_stream.py)
        self.reset(base_step, base_version)

    def reset(self, step: int, version: int) -> None:
        """Starts the log afresh at a committed state (step, version): a trainer resumed from an
        older snapshot commits its steps again, a new history; committed streams resync."""
        self._commits: deque[SealedCommit] = deque([SealedCommit(step, version, version, _EMPTY_KEYS,
                                                                 no_rows(self.width), _EMPTY_KEYS, True, time.time())])
        # to_version of each incomplete commit held, oldest first (to_versions never go back, see
        # seal), so that check() does not walk every commit held for each range a stream sends.
        self._incomplete: deque[int] = deque()
        self._bytes = self._commits[0].nbytes
        self.epoch += 1

    @property
    def last_step(self) -> int:
        return self._commits[-1].step

    @property
    def last_version(self) -> int:
        return self._commits[-1].to_version

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def seal(self, commit: SealedCommit) -> None:
        """Appends the newest commit; drops the oldest beyond the bounds. A commit that ends before
        the newest one (the table's versions went back: a standby loaded its primary's state) starts
        a new history there, as reset() does, so to_versions never go back within one.

        An incomplete commit without rows that follows another one merges with it: a table no
        committed stream follows seals such a commit every step (its rows are not read), and a
        subscriber before either must resync whichever it meets, so one entry answers as both did.
        Without the merge such a table held max_commits of them (~320 bytes each: 260 MB for a
        200-table shard). Likewise a commit of no change at all (a table no push touched since the
        newest commit) moves the newest commit to its step: the newest rows are that step's too. A
        table pushed once in a while held one such commit a step (93 MB for a 200-table shard, and
        Python's collector slowed every commit by half)."""
        if commit.to_version < self.last_version:
            self.reset(commit.step, commit.to_version)
            return
        newest = self._commits[-1]
        if _no_change(commit) and commit.from_version == newest.to_version:
            self._commits[-1] = dataclasses.replace(newest, step=commit.step, commit_time=commit.commit_time)
            return
        if _rowless_gap(commit) and _rowless_gap(newest):
            self._commits[-1] = SealedCommit(commit.step, newest.from_version, commit.to_version, _EMPTY_KEYS,
                                             commit.values, _EMPTY_KEYS, False, commit.commit_time)
            self._incomplete[-1] = commit.to_version
            return
        if not commit.complete:
            # Every commit before an incomplete one is out of reach: a subscriber before its
            # to_version resyncs (check). Kept, the rows a table sealed while a replica followed
            # stayed once it left (its commits then go unsealed): up to max_bytes a table, for good.
            self._commits.clear()
            self._incomplete.clear()
            self._bytes = 0
        self._commits.append(commit)
        self._bytes += commit.nbytes
        if not commit.complete:
            self._incomplete.append(commit.to_version)
        while len(self._commits) > 1 and (len(self._commits) > self.max_commits or self._bytes > self.max_bytes):
            dropped = self._commits.popleft()
            self._bytes -= dropped.nbytes
            if not dropped.complete:
                self._incomplete.popleft()

    def check(self, position: int, table: str) -> None:
        """LogGapError unless a subscriber holding version `position` can be brought to the newest commit."""
        # An incomplete commit after position first: seal() drops the commits before one, so the
        # log may start after position for that reason, not for its bounds.
        if self._incomplete and self._incomplete[-1] > position:
            raise LogGapError(
                f"table {table!r}: a committed range after version {position} was sealed without its rows (no "
                f"committed stream followed the table for {SEAL_IDLE_SECONDS:.0f} s, or the update log had "
                "forgotten part of it); resync with full_sync"
            )
        oldest = self._commits[0]
        if position < oldest.from_version:
            raise LogGapError(
                f"table {table!r}: the commit log starts after version {oldest.from_version}, the subscriber holds "
                f"{position} (it fell behind by more than {self.max_bytes} bytes of committed rows or "
                f"{self.max_commits} commits); resync with full_sync"
            )

    def bytes_after(self, position: int) -> int:
        """Bytes of the commits after version `position`: what after(position) holds, about."""
        newest = itertools.takewhile(lambda c: c.to_version > position, reversed(self._commits))
        return sum(c.nbytes for c in newest)

    def after(self, position: int, table: str) -> SealedCommit:
        """The changes from version `position` to the newest commit, rows as of that commit (merged
        over every commit after `position`: the last thing that happened to a key wins)."""
        self.check(position, table)
        if position > self.last_version:
            raise ValueError(f"table {table!r}: version {position} is ahead of the newest commit")
        newest = self._commits[-1]
        # The commits after position are the newest ones: taken from the right, the cost follows
        # how far behind the subscriber is, not how many commits the log holds.
        picked = list(itertools.takewhile(lambda c: c.to_version > position, reversed(self._commits)))[::-1]
        if not picked:
            return SealedCommit(newest.step, position, position, _EMPTY_KEYS, no_rows(self.width), _EMPTY_KEYS, True,
                                newest.commit_time)
        if len(picked) == 1:
            c = picked[0]
            return SealedCommit(c.step, position, c.to_version, c.touched_keys, c.values, c.deleted_keys, True,
                                c.commit_time)
        keys = np.concatenate([k for c in picked for k in (c.touched_keys, c.deleted_keys)])
        is_delete = np.concatenate(
            [np.repeat([False, True], [c.touched_keys.shape[0], c.deleted_keys.shape[0]]) for c in picked]
        )
        rows = np.concatenate(
            [np.concatenate([c.values, np.zeros((c.deleted_keys.shape[0], self.width), np.float32)]) for c in picked]
        )
        unique, last_from_end = np.unique(keys[::-1], return_index=True)
        at = keys.shape[0] - 1 - last_from_end
        deleted = is_delete[at]
        return SealedCommit(newest.step, position, newest.to_version, unique[~deleted], rows[at[~deleted]],
                            unique[deleted], True, newest.commit_time)


def _no_change(commit: SealedCommit) -> bool:
    return (commit.complete and commit.from_version == commit.to_version
            and commit.touched_keys.shape[0] == 0 and commit.deleted_keys.shape[0] == 0)


def _rowless_gap(commit: SealedCommit) -> bool:
    return not commit.complete and commit.touched_keys.shape[0] == 0 and commit.deleted_keys.shape[0] == 0


class DenseStates:
    """The newest dense towers published with commits on this shard: step -> (format, bytes)."""

    def __init__(self, max_states: int = MAX_DENSE_STATES) -> None:
        self.max_states = max_states
        self._states: OrderedDict[int, tuple[str, bytes]] = OrderedDict()

    def put(self, step: int, fmt: str, state: bytes) -> None:
        self._states[step] = (fmt, state)
        while len(self._states) > self.max_states:
            self._states.popitem(last=False)

    def drop_from(self, step: int) -> None:
        """Forgets the towers of `step` and later: a new history of steps starts at `step`, and an
        old history's tower of a step the new one reaches was served as the new one's."""
        for old in [s for s in self._states if s >= step]:
            del self._states[old]

    def newest_in(self, after_step: int, up_to_step: int) -> tuple[int, str, bytes] | None:
        """The newest state with after_step < step <= up_to_step, or None."""
        for step in reversed(self._states):
            if after_step < step <= up_to_step:
                fmt, state = self._states[step]
                return step, fmt, state
        return None


def sealing_tables(shard) -> tuple[str, ...]:
    """The tables of `shard` whose commits seal rows now: a committed stream is open on them, or
    one ended within SEAL_IDLE_SECONDS. (Open, not "looked lately": a stream that sends no
    heartbeats, ps/shard/heartbeats.py, waits for its table's next commit without waking.)"""
    now = time.monotonic()
    return tuple(
        name for name, c in shard.commits.items() if c.followers or now - c.subscribed_at < SEAL_IDLE_SECONDS
    )


@contextlib.contextmanager
def followed(commits: CommitLog) -> Iterator[None]:
    """While a committed stream is open on the table of `commits`."""
    commits.followers += 1
    try:
        yield
    finally:
        commits.followers -= 1
        commits.subscribed_at = time.monotonic()


def mark_followed(shard, tables: Collection[str]) -> None:
    """Keeps `tables` of `shard` sealing rows for SEAL_IDLE_SECONDS as if a committed stream had
    looked now: a standby does so for the tables its primary sealed."""
    now = time.monotonic()
    for name in tables:
        shard.commits[name].subscribed_at = now


def commit(shard, request: ps_pb2.CommitRequest, sealed_tables: Collection[str] | None = None) -> ps_pb2.CommitResponse:
    """Records step request.step on every table of `shard` (on the tables' thread): each table's
    changes since its previous commit, with their rows as they are now (for the tables in
    sealed_tables, default sealing_tables(shard); a standby seals those its primary did). A repeat of the newest
    step changes nothing. A step before the newest starts a new history (a trainer resumed from
    an older snapshot replays steps): each table's commit log restarts there, its rows as they are
    now, and committed subscribers resync (their replicas keep serving their cut until the new
    history passes it)."""
    step = request.step
    if request.dense_state and not request.dense_format:
        raise ValueError("dense_format: required with dense_state (how the replica decodes it)")
    if step > MAX_STEP:  # a step no push can carry: the next real step would start a new history
        raise ValueError(f"step: must be in [0, 2^32 - 1] (a push's step), got {step}")
    first = next(iter(shard.commits.values()))
    now = time.time()
    sealed = set(sealing_tables(shard) if sealed_tables is None else sealed_tables)
    new_history = step < first.last_step
    if new_history:
        shard.dense.drop_from(step)
    # The tower first: a committed stream that sees the step sealed on its table sends the tower
    # with that range, and never asks for a step's tower again once past it.
    if request.dense_state:
        shard.dense.put(step, request.dense_format, bytes(request.dense_state))
    if new_history:
        for name, commits in shard.commits.items():
            commits.reset(step, shard.tables[name].version)
    elif step > first.last_step:
        for name, commits in shard.commits.items():
            table, log = shard.tables[name], shard.logs[name]
            since = commits.last_version
            followed = name in sealed
            if table.version == since:
                rows = no_rows(commits.width)
                commits.seal(SealedCommit(step, since, since, _EMPTY_KEYS, rows, _EMPTY_KEYS, True, now))
            elif followed and log.covers(since):
                changes = log.range_after(since, name)
                _, values = shard.read_stored_rows(name, changes.touched_keys)
                commits.seal(SealedCommit(step, since, changes.to_version, changes.touched_keys, values,
                                          changes.deleted_keys, True, now))
            else:
                rows = no_rows(commits.width)
                commits.seal(SealedCommit(step, since, table.version, _EMPTY_KEYS, rows, _EMPTY_KEYS, False, now))
    return ps_pb2.CommitResponse(step=first.last_step, versions=[c.last_version for c in shard.commits.values()])
