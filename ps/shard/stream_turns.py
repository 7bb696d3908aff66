"""Turns of a shard's Subscribe streams at something they hold while their subscriber reads: at
most `capacity` units are held at once, streams wait in arrival order, and a stream whose
subscriber stalls gives its units to one that waits.

    full copies:  StreamTurns(MAX_FULL_COPIES, ...), 1 unit a copy (its key list and change feed)
    ranges:       StreamTurns(--subscribe-memory-bytes, ...), a range's bytes of keys and rows

Why: a stream holds what it read until its subscriber has taken it, at the subscriber's pace, and a
subscriber that stops reading is ended only after the stream stall limit (60 s by default). Before
the full copies took turns, four such streams held every copy's turn that long, and a replica that
needed a resync waited behind them; before ranges took turns, every stream read its whole range at
once, so 100 subscribers from version 0 of a 150,000-row table that read nothing made its shard
hold a copy of the rows each (3 GB in 12 s, docs/reliability.md). Now a waiting stream ends the
holding stream whose subscriber has left a message untaken longest, once that is at least
`patience` seconds (or its stream's stall limit, if shorter), with RESOURCE_EXHAUSTED and a message
saying so (its subscriber resubscribes, as after a stall). A subscriber that takes its messages
keeps its turn however long it takes.

A stream asking for more units than `capacity` waits until nothing else is held and then holds
them alone: a range larger than the budget is still sent, one at a time.

Runs on the shard's event loop only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass

from ps.process.calls import StallWatch

_CHECK_SECONDS = 1.0  # a waiting stream looks for a stalled one at least this often


@dataclass(eq=False)
class Hold:
    """What one stream holds: `units`, and the StallWatch of its stream (None: never ended for a
    waiting one)."""

    watch: StallWatch | None
    units: int


class StreamTurns:
    """`hold = await turns.acquire(watch, units)` before a stream reads what it will hold,
    `turns.release(hold)` once it let go of it (however its stream ended)."""

    def __init__(self, capacity: int, patience: float, waited_for: str) -> None:
        """waited_for: what a stalled stream's status says it was ended for ("another full copy
        waited for this one's turn")."""
        if capacity < 1 or not patience > 0:
            raise ValueError(f"StreamTurns: need capacity >= 1 and patience > 0, got {capacity}, {patience}")
        self.capacity = capacity
        self.patience = patience
        self.waited_for = waited_for
        self.held = 0  # units held
        self._holds: list[Hold] = []
        self._waiting: collections.deque[tuple[Hold, asyncio.Future]] = collections.deque()

    @property
    def running(self) -> int:
        """Streams that hold units."""
        return len(self._holds)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, watch: StallWatch | None, units: int = 1) -> Hold:
        """Waits for `units` (in arrival order), ending a stalled stream for them when one qualifies."""
        now = self._take_now(watch, units)
        if now is not None:
            return now
        granted = asyncio.get_running_loop().create_future()
        entry = (Hold(watch, units), granted)
        self._waiting.append(entry)
        try:
            while not granted.done():
                self._end_a_stalled_stream()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._next_check()):  # not wait_for: tests/test_cancellation.py
                        await asyncio.shield(granted)
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(granted.result())  # granted as this waiter left: its units go on
            else:
                self._waiting.remove(entry)
                self._grant()  # the waiters behind it may fit now
            raise
        return granted.result()

    def pending(self, watch: StallWatch | None, units: int) -> PendingTurn:
        """The units at once when they fit, else acquire(watch, units) in a task of its own, which
        the caller waits for a while at a time (a stream that sends heartbeats while it waits)."""
        now = self._take_now(watch, units)
        return PendingTurn(self, now if now is not None else asyncio.ensure_future(self.acquire(watch, units)))

    def _take_now(self, watch: StallWatch | None, units: int) -> Hold | None:
        if units < 0:
            raise ValueError(f"StreamTurns: units must be >= 0, got {units}")
        if not self._waiting and self._fits(units):
            return self._hold(Hold(watch, units))
        return None

    def release(self, hold: Hold) -> None:
        """Gives back what `hold` holds, to the waiting streams in arrival order."""
        self._holds.remove(hold)
        self.held -= hold.units
        self._grant()

    def resize(self, hold: Hold, units: int) -> None:
        """`hold` now holds `units`, without waiting: a stream that asked for an estimate holds
        what it read. Less gives the rest to the waiting streams; more (a range that grew while its
        stream waited) may take `held` past `capacity` until it is released, and no stream is
        granted meanwhile."""
        units = max(0, units)
        self.held += units - hold.units
        hold.units = units
        self._grant()

    def _fits(self, units: int) -> bool:
        return self.held + units <= self.capacity or not self._holds

    def _hold(self, hold: Hold) -> Hold:
        self._holds.append(hold)
        self.held += hold.units
        return hold

    def _grant(self) -> None:
        """Grants the first waiting streams, in order, while they fit."""
        while self._waiting and self._fits(self._waiting[0][0].units):
            hold, granted = self._waiting.popleft()
            granted.set_result(self._hold(hold))

    def _end_a_stalled_stream(self) -> None:
        """Ends the holding stream whose subscriber has kept a message waiting longest, if that is
        at least `patience` and no stream ended this way still holds its units."""
        watches = [h.watch for h in self._holds if h.watch is not None]
        if not watches or any(w.fired for w in watches):
            return  # none to end, or one is ending already: its units go to the first waiting stream
        stalled = max(watches, key=lambda watch: watch.waiting_seconds())
        waited = stalled.waiting_seconds()
        if waited >= min(self.patience, stalled.seconds):
            stalled.end_now(
                f"Subscribe: the client took no message for {waited:.0f} s while {self.waited_for}; resubscribe"
            )

    def _next_check(self) -> float:
        """Seconds until a holding stream's subscriber could pass its patience (at most _CHECK_SECONDS)."""
        left = (min(self.patience, h.watch.seconds) - h.watch.waiting_seconds()
                for h in self._holds if h.watch is not None)
        return min(_CHECK_SECONDS, max(0.01, min(left, default=_CHECK_SECONDS)))


class PendingTurn:
    """Units granted at once (a Hold), or an acquire() running in its own task: `await
    turn.wait(seconds)` gives the Hold, or None after `seconds`; a caller that leaves before it
    has the Hold calls abandon() (units granted meanwhile go back; else it leaves the queue)."""

    def __init__(self, turns: StreamTurns, granted: Hold | asyncio.Task) -> None:
        self._turns = turns
        self._granted = granted

    async def wait(self, seconds: float) -> Hold | None:
        if isinstance(self._granted, Hold):
            return self._granted
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: tests/test_cancellation.py
                return await asyncio.shield(self._granted)
        return None

    def abandon(self) -> None:
        task = self._granted
        if isinstance(task, Hold):
            return  # wait() gave it at once: the caller holds it
        if not task.done():
            task.cancel()  # acquire() gives back units granted as it is cancelled
        elif not task.cancelled() and task.exception() is None:
            self._turns.release(task.result())
