"""The replica's consistent cut (DESIGN section 9): rows visible only up to the newest training step
that every shard of every served table has committed, published all at once.

    follower (table t, shard s) --committed ranges--> waiting[(t, s)]: [Delta step 7, Delta step 8]
    newest[(t, s)] = newest step received;  cut = min over (t, s) of newest[(t, s)]
    cut > served version: every waiting delta of step <= cut is published as one model version

Publishing (native stores, csrc/serving_store.h's ModelClock): each changed (table, shard) gets a
private store with the cut's rows (an overlay, or a whole replacement after a resync), set as its
pending store; then one atomic store makes the cut the visible version; then floor = cut and the
overlays are merged into the main stores (replacements swapped in) and the pending stores dropped.
A gate thread reads visible V, the pending stores of steps <= V, then the main stores, and answers
again if floor > V at the end: no lookup ever sees half a cut, and one at the current cut never
waits. Without the native stores, publishing and lookups share one lock instead.

Waiting deltas are bounded by `max_waiting_bytes`: past it, a follower whose (table, shard) is
ahead of the cut stops reading its stream until the cut moves (the shard merges the commits that
pile up, or, once its commit log has dropped them, the follower resyncs in full); the (table,
shard) that holds the cut back always gets through, so the cut always moves. The replica keeps
serving the last cut meanwhile. The cut never goes back: a shard restarted from an older snapshot
or a resync at an older step waits in `waiting` until its stream passes the served version.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from ps.process.calls import ShuttingDownError
from serving.metrics import ServingMetrics
from serving.store import ShardRows, TableReplica, _embps_gate

T = TypeVar("T")
DENSE_KEPT = 4  # dense towers of the last published steps kept (a scorer may hold a reply a cut old)
INLINE_ROWS = 2048  # publishing more rows than this runs on a thread (the loop keeps taking calls)
LAG_REFRESH_SECONDS = 0.25


class ModelVersionMovedError(ShuttingDownError):
    """A lookup could not finish at one model version (UNAVAILABLE, as the gate answers it): retry."""


@dataclass
class Delta:
    """One (table, shard)'s committed range: the rows of step `step` for the keys it changed, or
    (replace) a full copy of the shard at that step. keys (n,) int64, values (n, ...) the rows as a
    PS table of `storage` keeps them (ps/wire.py decode_stored_rows: float32 or float16 (n, dim),
    int8 words (n, width)), deleted (d,) int64."""

    step: int
    to_version: int
    incarnation: int
    keys: np.ndarray
    values: np.ndarray
    deleted: np.ndarray
    replace: ShardRows | None = None
    dense: tuple[int, str, bytes] | None = None  # (step, format, state) published with this step
    commit_time: float = 0.0
    storage: str = "float32"
    received: float = field(default_factory=time.time)
    held_bytes: int = 0  # nbytes when offered: what it counts for in waiting_bytes until published

    @property
    def nbytes(self) -> int:
        rows = self.replace.block_bytes if self.replace is not None else 0
        dense = len(self.dense[2]) if self.dense is not None else 0
        return self.keys.nbytes + self.values.nbytes + self.deleted.nbytes + rows + dense + 200


@dataclass
class Tail:
    """Where a (table, shard)'s stream is, waiting deltas included: what it subscribes from."""

    version: int
    incarnation: int
    step: int


class ModelCut:
    """The cut of the replica's `tables` (one TableReplica per served table), from `start_step`
    (an export's step, or 0). Methods run on the event loop; publishing may run on a thread."""

    def __init__(self, tables: dict[str, TableReplica], metrics: ServingMetrics, max_waiting_bytes: int,
                 start_step: int = 0) -> None:
        self.tables = tables
        self.metrics = metrics
        self.max_waiting_bytes = max_waiting_bytes
        self.version = start_step
        self.clock = _embps_gate.ModelClock() if _embps_gate is not None else None
        self._lock = threading.Lock()  # without native stores: publishing and lookups
        keys = [(name, s) for name, table in tables.items() for s in range(len(table.shards))]
        self.tails = {
            (name, s): Tail(tables[name].shards[s].version, tables[name].shards[s].incarnation, start_step)
            for name, s in keys
        }
        self.newest = dict.fromkeys(keys, start_step)
        # min and max of `newest`, and how many streams are at the min: each offer updates them in
        # O(1) (the min is looked for again once per step, when its last stream moves on), so that
        # a step costs O(tables x shards), not its square.
        self._low, self._at_low, self._high = start_step, len(keys), start_step
        self.waiting: dict[tuple[str, int], list[Delta]] = {k: [] for k in keys}
        self.waiting_bytes = 0
        self._waiting_count = 0
        self._lag_due = 0.0  # time.monotonic() from which an offer refreshes cut_lag_seconds again
        self.dense: tuple[int, str, bytes] | None = None  # the newest published with a step <= the cut
        self.dense_recent: dict[int, tuple[int, str, bytes]] = {}  # the last few, for scorers a cut behind
        self.served_commit_time = 0.0
        self._moved = asyncio.Condition()
        self._publishing = asyncio.Lock()
        if self.clock is not None:
            self.clock.publish(start_step)
            for table in tables.values():
                table.native.set_clock(self.clock)
        metrics.model_version.set(start_step)

    def read(self, answer: Callable[[int], T]) -> tuple[T, int]:
        """(answer(version), version): answer reads rows at one model version (TableReplica.lookup
        with `version`); called again while the cut moved under it. Any thread."""
        if self.clock is None:
            with self._lock:
                return answer(self.version), self.version
        for _ in range(64):
            version = self.clock.begin_read()
            result = answer(version)
            if self.clock.still_valid(version):
                return result, version
        raise ModelVersionMovedError(
            "the model version moved under this lookup 64 times; retry (the replica applies cuts faster than it "
            "answers)"
        )

    async def offer(self, table: str, shard: int, delta: Delta) -> None:
        """Takes (table, shard)'s next committed range; returns once it is held (waiting or visible)."""
        key = (table, shard)
        async with self._moved:
            # Past the bound, a stream ahead of the cut waits; the one holding the cut never does.
            await self._moved.wait_for(
                lambda: self.waiting_bytes <= self.max_waiting_bytes or self.newest[key] <= self.cut_candidate()
            )
        if delta.replace is not None:  # a full copy supersedes what its stream sent before
            self.waiting_bytes -= sum(d.held_bytes for d in self.waiting[key])
            self._waiting_count -= len(self.waiting[key])
            self.waiting[key] = []
        # Counted once: a full copy's blocks grow when the deltas after it are staged into it.
        delta.held_bytes = delta.nbytes
        self.waiting[key].append(delta)
        self.waiting_bytes += delta.held_bytes
        self._waiting_count += 1
        self._set_newest(key, delta.step)
        self.tails[key] = Tail(delta.to_version, delta.incarnation, delta.step)
        self._observe(lag=time.monotonic() >= self._lag_due)
        await self.advance()

    def cut_candidate(self) -> int:
        """The newest step every (table, shard) has reached: min over newest."""
        return self._low

    def _showable(self, limit: int) -> int:
        """The newest step <= limit, past the served version, that every (table, shard) can show, or
        the served version if none. A shard merges the commits a slow stream missed into one range
        ending at the newest (ps/shard/commit_stream.py): a stream whose range jumped from step 15
        to 17 cannot show 16, and a cut at 16 (the other streams' newest) served its rows of 15
        beside the others' of 16. A stream shows step S when one of its ranges ends at S, when all
        of them end at or before S, or when the range over S changed none of its rows."""
        steps = sorted({d.step for deltas in self.waiting.values() for d in deltas if self.version < d.step <= limit})
        for step in reversed(steps):
            if all(_shows(deltas, step) for deltas in self.waiting.values()):
                return step
        return self.version

    def _set_newest(self, key: tuple[str, int], step: int) -> None:
        old = self.newest[key]
        self.newest[key] = step
        if step < self._low or (step < old and old == self._high):  # a stream went back: look again
            self._find_low_and_high()
            return
        self._high = max(self._high, step)
        if old == self._low and step != old:
            self._at_low -= 1
            if self._at_low == 0:
                self._find_low_and_high()
        elif step == self._low and old != step:
            self._at_low += 1

    def _find_low_and_high(self) -> None:
        steps = self.newest.values()
        self._low, self._high = min(steps), max(steps)
        self._at_low = sum(1 for step in steps if step == self._low)

    async def advance(self) -> None:
        """Publishes the newest cut the waiting deltas allow, if it is past the served version; then
        wakes the streams held past the bound, published or not: what they wait for (the lowest
        stream, the waiting bytes) moves with every offer, and a stream that went back moves the
        lowest up to the served version without a cut to publish."""
        try:
            await self._publish_next_cut()
        finally:
            async with self._moved:
                self._moved.notify_all()

    async def _publish_next_cut(self) -> None:
        async with self._publishing:
            cut = self.cut_candidate()
            if cut <= self.version:  # the usual offer: O(1), no scan
                return
            cut = self._showable(cut)
            if cut <= self.version:
                return
            batch: dict[tuple[str, int], list[Delta]] = {}
            for key, deltas in self.waiting.items():
                ready = [d for d in deltas if d.step <= cut]
                if ready:
                    batch[key] = ready
                    self.waiting[key] = deltas[len(ready):]
                    self._waiting_count -= len(ready)
            rows = sum(d.keys.shape[0] + d.deleted.shape[0] for ds in batch.values() for d in ds)
            if rows > INLINE_ROWS or any(d.replace is not None for ds in batch.values() for d in ds):
                await asyncio.to_thread(self._publish, cut, batch)
            else:
                self._publish(cut, batch)
            for (name, s), deltas in batch.items():
                self.metrics.version.labels(name, str(s)).set(deltas[-1].to_version)
                self.metrics.rows.labels(name, str(s)).set(self.tables[name].shards[s].size)
            published = [d for ds in batch.values() for d in ds]
            self.waiting_bytes -= sum(d.held_bytes for d in published)
            now = time.time()
            for d in published:
                if d.commit_time:
                    self.metrics.cut_visible_seconds.observe(max(0.0, now - d.commit_time))
                if d.dense is not None and (self.dense is None or d.dense[0] >= self.dense[0]):
                    self.dense = d.dense
                    self.dense_recent[d.dense[0]] = d.dense
                    for old in sorted(self.dense_recent)[:-DENSE_KEPT]:
                        del self.dense_recent[old]
            self.served_commit_time = max((d.commit_time for d in published if d.step == cut), default=now)
            self.metrics.model_version.set(cut)
            self._observe()

    def _publish(self, cut: int, batch: dict[tuple[str, int], list[Delta]]) -> None:
        """Makes `cut` the visible version with every delta of `batch` (see the module docstring)."""
        if self.clock is None:
            with self._lock:
                for (name, s), deltas in batch.items():
                    _merge(self.tables[name], s, deltas)
                self.version = cut
            return
        staged = set()
        for (name, s), deltas in batch.items():
            table = self.tables[name]
            if not any(d.replace is not None or d.keys.shape[0] or d.deleted.shape[0] for d in deltas):
                main = table.shards[s]
                if (main.version, main.incarnation) == (deltas[-1].to_version, deltas[-1].incarnation):
                    continue  # the step left this (table, shard) alone: nothing to stage
                # Else only its versions move: an empty overlay reports them until the merge.
            rows, replace = _stage(table, s, deltas)
            table.native.set_pending(s, cut, replace, rows.native)
            staged.add((name, s))
        self.clock.publish(cut)
        self.version = cut
        self.clock.begin_merge(cut)
        for (name, s), deltas in batch.items():
            _merge(self.tables[name], s, deltas)
            if (name, s) in staged:
                self.tables[name].native.clear_pending(s)

    def _observe(self, lag: bool = True) -> None:
        """Sets the cut's gauges; lag: cut_lag_seconds too, which looks at every waiting delta (an
        offer refreshes it at most every LAG_REFRESH_SECONDS, a published cut always)."""
        m = self.metrics
        m.waiting_bytes.set(self.waiting_bytes)
        m.waiting_deltas.set(self._waiting_count)
        m.cut_lag_steps.set(max(0, self._high - self.version))
        if lag:
            self._lag_due = time.monotonic() + LAG_REFRESH_SECONDS
            behind = [d.commit_time for ds in self.waiting.values() for d in ds
                      if d.commit_time and d.step > self.version]
            m.cut_lag_seconds.set(max(0.0, time.time() - min(behind)) if behind else 0.0)


def _shows(deltas: list[Delta], step: int) -> bool:
    """Whether a stream whose waiting deltas are `deltas` (in order) can show `step` (ModelCut._showable)."""
    over = next((d for d in deltas if d.step > step), None)
    if over is None or not (over.replace is not None or over.keys.shape[0] or over.deleted.shape[0]):
        return True
    before = [d for d in deltas if d.step <= step]
    return bool(before) and before[-1].step == step


def _stage(table: TableReplica, shard: int, deltas: list[Delta]) -> tuple[ShardRows, bool]:
    """A private store with deltas' rows: the last full copy with what follows it (replace), or an
    overlay of upserts and deletion marks."""
    last_copy = max((i for i, d in enumerate(deltas) if d.replace is not None), default=None)
    if last_copy is not None:
        rows = deltas[last_copy].replace
        for d in deltas[last_copy + 1:]:
            _write(rows, d)
        rows.version, rows.incarnation = deltas[-1].to_version, deltas[-1].incarnation
        return rows, True
    # Sized to its rows: one is made per changed (table, shard) at every cut (csrc/serving_store.h).
    rows = sum(d.keys.shape[0] + d.deleted.shape[0] for d in deltas)
    overlay = ShardRows(table.dim, table.dtype, expected_rows=max(1, rows))
    for d in deltas:
        if d.keys.shape[0]:
            overlay.upsert_rows(d.keys, d.values, d.storage)
        if d.deleted.shape[0]:
            overlay.native.mark_deleted(d.deleted)
    # A lookup at the cut reads the overlay before the merge and reports its versions (the main
    # store's are the cut before's until then).
    overlay.version, overlay.incarnation = deltas[-1].to_version, deltas[-1].incarnation
    return overlay, False


def _merge(table: TableReplica, shard: int, deltas: list[Delta]) -> None:
    """Writes deltas into the main store of `shard` (a full copy replaces it, already holding what
    follows it when staged; without native stores it gets it here)."""
    last_copy = max((i for i, d in enumerate(deltas) if d.replace is not None), default=None)
    if last_copy is not None:
        rows = deltas[last_copy].replace
        if table.native is None:
            for d in deltas[last_copy + 1:]:
                _write(rows, d)
        table.replace_shard(shard, rows)
    else:
        rows = table.shards[shard]
        for d in deltas:
            _write(rows, d)
    rows.version = deltas[-1].to_version
    rows.incarnation = deltas[-1].incarnation


def _write(rows: ShardRows, d: Delta) -> None:
    if d.keys.shape[0]:
        rows.upsert_rows(d.keys, d.values, d.storage)
    if d.deleted.shape[0]:
        rows.erase(d.deleted)
