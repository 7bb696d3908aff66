"""StreamTurns without a server: arrival order, units (a range's bytes) that fit or wait, one
larger than the capacity held alone, a waiter that leaves (its call cancelled) neither keeps a turn
nor loses one for the others, and a stalled holder ended for a waiter after the patience. Against a
real shard: tests/ps/test_slow_subscribers.py (full copies) and tests/ps/test_subscribe_memory.py
(ranges)."""

from __future__ import annotations

import asyncio

import pytest

from ps.shard.stream_turns import StreamTurns


async def _until(condition, what: str) -> None:
    """Lets the loop run until condition() holds, at most 5 s."""
    try:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0)  # one pass of the loop, then look again
    except TimeoutError:
        raise AssertionError(f"not within 5 s: {what}") from None


class _Streams:
    """Named streams that each acquire units, note when they hold them, and release on request."""

    def __init__(self, turns: StreamTurns, watch=None) -> None:
        self.turns = turns
        self.watch = watch
        self.order: list[str] = []
        self.holds = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._done: dict[str, asyncio.Event] = {}

    async def _stream(self, name: str, units: int, watch) -> None:
        hold = await self.turns.acquire(watch, units)
        self.order.append(name)
        self.holds[name] = hold
        try:
            await self._done[name].wait()
        finally:
            self.turns.release(hold)

    def start(self, name: str, units: int = 1, watch=None) -> None:
        self._done[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._stream(name, units, watch))

    def finish(self, name: str) -> None:
        self._done[name].set()

    async def holding(self, *names: str) -> None:
        await _until(lambda: all(n in self.holds for n in names), f"{names} holding")

    async def queue(self, name: str, units: int = 1, watch=None) -> None:
        """Starts `name` and waits until it waits."""
        before = self.turns.waiting
        self.start(name, units, watch)
        await _until(lambda: self.turns.waiting == before + 1, f"{name} waiting")

    async def end(self) -> None:
        for name in self._done:
            self.finish(name)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def test_turns_go_in_arrival_order_and_a_cancelled_waiter_passes_its_turn_on():
    async def scenario() -> list[str]:
        turns = StreamTurns(2, 5.0, "a test waited")
        s = _Streams(turns)
        s.start("a")
        s.start("b")
        await s.holding("a", "b")
        for name in "cde":  # each queues before the next starts
            await s.queue(name)
        assert s.order == ["a", "b"] and (turns.running, turns.waiting) == (2, 3)
        s.tasks["c"].cancel()  # a waiter leaves before its turn
        await asyncio.gather(s.tasks["c"], return_exceptions=True)
        assert turns.waiting == 2
        s.finish("a")  # a's turn goes to d, the first still waiting
        await s.holding("d")
        assert s.order == ["a", "b", "d"]
        s.finish("b")
        s.tasks["e"].cancel()  # e leaves as b's turn frees: whichever comes first, nobody holds that turn
        await asyncio.gather(s.tasks["b"], s.tasks["e"], return_exceptions=True)
        assert (turns.running, turns.waiting, turns.held) == (1, 0, 1)
        s.finish("d")
        await asyncio.gather(s.tasks["d"])
        assert (turns.running, turns.waiting, turns.held) == (0, 0, 0)
        s.start("f")
        s.start("g")  # both turns are free again
        await s.holding("f", "g")
        await s.end()
        assert (turns.running, turns.held) == (0, 0)
        return s.order

    assert asyncio.run(scenario()) == ["a", "b", "d", "f", "g"]


def test_units_wait_in_order_until_they_fit_and_a_larger_one_than_the_capacity_holds_alone():
    async def scenario() -> None:
        turns = StreamTurns(100, 5.0, "a test waited")
        s = _Streams(turns)
        s.start("a", 60)
        await s.holding("a")
        await s.queue("b", 50)  # does not fit beside a
        await s.queue("c", 10)  # would fit, but waits behind b: arrival order
        assert (turns.held, turns.running, turns.waiting) == (60, 1, 2)
        s.finish("a")
        await s.holding("b", "c")  # both fit now, granted together
        assert s.order == ["a", "b", "c"] and turns.held == 60
        await s.queue("big", 500)  # more than the capacity: waits until nothing is held
        await s.queue("d", 1)
        s.finish("b")
        await _until(lambda: turns.held == 10, "b released")
        assert "big" not in s.holds and turns.waiting == 2
        s.finish("c")
        await s.holding("big")
        assert turns.held == 500 and turns.waiting == 1  # d waits beside a range larger than everything
        s.finish("big")
        await s.holding("d")
        assert turns.held == 1
        await s.end()

    asyncio.run(scenario())


def test_resize_gives_back_or_takes_without_waiting_and_a_cancelled_head_lets_the_others_in():
    async def scenario() -> None:
        turns = StreamTurns(100, 5.0, "a test waited")
        s = _Streams(turns)
        s.start("a", 90)  # an estimate
        await s.holding("a")
        await s.queue("b", 40)
        turns.resize(s.holds["a"], 50)  # what it read was less: b fits now
        await s.holding("b")
        assert turns.held == 90
        turns.resize(s.holds["b"], 70)  # a range that grew while it waited: past the capacity
        assert turns.held == 120
        await s.queue("c", 1)  # nothing is granted while the capacity is passed
        await s.queue("d", 1)
        s.finish("a")
        await s.holding("c", "d")
        assert turns.held == 72
        await s.queue("e", 95)  # the head of the queue does not fit ...
        await s.queue("f", 5)  # ... and f waits behind it
        s.tasks["e"].cancel()  # e leaves: f, which fits, goes in
        await s.holding("f")
        assert turns.held == 77 and turns.waiting == 0
        await s.end()
        assert turns.held == 0

    asyncio.run(scenario())


def test_a_pending_turn_is_waited_for_a_while_at_a_time_and_abandoned_without_leaking():
    async def scenario() -> None:
        turns = StreamTurns(10, 5.0, "a test waited")
        first = turns.pending(None, 6)
        held = await first.wait(0.01)  # it fitted: granted at once, no task
        assert held is not None and turns.held == 6
        second = turns.pending(None, 6)
        assert await second.wait(0.01) is None and turns.waiting == 1  # a while, and it still waits
        second.abandon()  # its stream left while it waited
        await _until(lambda: turns.waiting == 0, "the abandoned turn out of the queue")
        third = turns.pending(None, 6)
        await _until(lambda: turns.waiting == 1, "the third waiting")
        turns.release(held)  # granted to the third, whose stream leaves before taking it
        await _until(lambda: turns.held == 6, "granted to the third")
        third.abandon()  # its task gives the units back as it ends, on the loop's next pass
        await _until(lambda: (turns.held, turns.running, turns.waiting) == (0, 0, 0), "the third's units back")
        fourth = turns.pending(None, 4)
        assert (await fourth.wait(0.01)).units == 4 and turns.held == 4

    asyncio.run(scenario())


class _Watch:
    """The part of a stream's StallWatch that StreamTurns reads: how long its subscriber has left a
    message untaken, its stall limit, and end_now (which, for a real stream, cancels its task)."""

    def __init__(self, waiting: float, seconds: float = 60.0) -> None:
        self.waiting = waiting
        self.seconds = seconds
        self.fired = False
        self.message = ""
        self.task: asyncio.Task | None = None

    def waiting_seconds(self) -> float:
        return self.waiting

    def end_now(self, message: str) -> None:
        self.fired, self.message = True, message
        self.task.cancel()


def test_a_waiter_ends_the_holder_stalled_longest_once_past_the_patience():
    async def scenario() -> None:
        turns = StreamTurns(100, 0.2, "other streams waited for the memory its range holds")
        s = _Streams(turns)
        reading, stalled, newer = _Watch(0.0), _Watch(0.1), _Watch(0.05)
        for name, watch in (("reading", reading), ("stalled", stalled), ("newer", newer)):
            s.start(name, 30, watch)
            await s.holding(name)
            watch.task = s.tasks[name]
        start = asyncio.get_running_loop().time()
        waiter = asyncio.create_task(turns.acquire(None, 20))
        await _until(lambda: turns.waiting == 1, "the waiter queued")
        assert not waiter.done() and not stalled.fired  # nobody past the patience yet
        newer.waiting, stalled.waiting = 0.3, 0.5  # both pass it; the one stalled longest goes first
        async with asyncio.timeout(5):
            hold = await waiter
        assert stalled.fired and not newer.fired and not reading.fired
        assert stalled.message == (
            "Subscribe: the client took no message for 0 s while other streams waited for the memory its range "
            "holds; resubscribe"
        )
        assert asyncio.get_running_loop().time() - start < 2.0
        assert turns.held == 80
        turns.release(hold)
        await s.end()

    asyncio.run(scenario())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="capacity >= 1 and patience > 0"):
        StreamTurns(0, 1.0, "x")
    with pytest.raises(ValueError, match="capacity >= 1 and patience > 0"):
        StreamTurns(1, float("nan"), "x")
    with pytest.raises(ValueError, match="units must be >= 0"):
        asyncio.run(StreamTurns(1, 1.0, "x").acquire(None, -1))
