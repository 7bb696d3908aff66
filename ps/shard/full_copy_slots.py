"""The turns of a shard's full copies (Subscribe with full_sync): at most `slots` run at once, the
others wait in arrival order, and a copy whose subscriber stalls gives its turn to one that waits.

Why: each running copy holds its table's key list and a change feed that every push updates, so
they are few (MAX_FULL_COPIES). A copy runs at its subscriber's pace, and a subscriber that stops
reading is ended only after the stream stall limit (60 s by default): before, four such streams
held every turn that long, and a replica that needed a resync waited behind them. Now a waiting
copy ends the running copy whose subscriber has left a message untaken longest, once that is at
least `patience` seconds (or its stream's stall limit, if shorter), with RESOURCE_EXHAUSTED and a
message saying so (its subscriber resubscribes, as after a stall). A subscriber that takes its
messages keeps its turn however long its copy takes.

Runs on the shard's event loop only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from ps.process.calls import StallWatch

_CHECK_SECONDS = 1.0  # a waiting copy looks for a stalled one at least this often


class FullCopySlots:
    """`await slots.acquire(watch)` before a full copy runs, `slots.release(watch)` once it ended
    (however); `watch` is its stream's StallWatch (None: a copy never ended for a waiting one)."""

    def __init__(self, slots: int, patience: float) -> None:
        if slots < 1 or not patience > 0:
            raise ValueError(f"FullCopySlots: need slots >= 1 and patience > 0, got {slots}, {patience}")
        self._free = slots
        self.patience = patience
        self._running: list[StallWatch | None] = []
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, watch: StallWatch | None) -> None:
        """Waits for a turn (in arrival order), ending a stalled copy for it when one qualifies."""
        await self._wait_turn()
        self._running.append(watch)

    def release(self, watch: StallWatch | None) -> None:
        """Gives the turn of a copy that acquired it to the first waiting copy."""
        self._running.remove(watch)
        self._release()

    async def _wait_turn(self) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append(granted)
        try:
            while not granted.done():
                self._end_a_stalled_copy()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._next_check()):  # not wait_for: tests/test_cancellation.py
                        await asyncio.shield(granted)
        except BaseException:
            if granted.done() and not granted.cancelled():
                self._release()  # granted as this waiter left: the turn goes to the next one
            else:
                self._waiting.remove(granted)
            raise

    def _release(self) -> None:
        while self._waiting:
            granted = self._waiting.popleft()
            if not granted.done():
                granted.set_result(None)  # the turn passes on without ever being free
                return
        self._free += 1

    def _end_a_stalled_copy(self) -> None:
        """Ends the running copy whose subscriber has kept a message waiting longest, if that is at
        least `patience` and no copy ended this way is still running."""
        watches = [w for w in self._running if w is not None]
        if any(w.fired for w in watches):
            return  # one is ending already: its turn goes to the first waiting copy
        if not watches:
            return
        stalled = max(watches, key=StallWatch.waiting_seconds)
        waited = stalled.waiting_seconds()
        if waited >= min(self.patience, stalled.seconds):
            stalled.end_now(
                f"Subscribe: the client took no message for {waited:.0f} s while another full copy waited for "
                "this one's turn; resubscribe"
            )

    def _next_check(self) -> float:
        """Seconds until a running copy's subscriber could pass its patience (at most _CHECK_SECONDS)."""
        left = (min(self.patience, w.seconds) - w.waiting_seconds() for w in self._running if w is not None)
        return min(_CHECK_SECONDS, max(0.01, min(left, default=_CHECK_SECONDS)))
