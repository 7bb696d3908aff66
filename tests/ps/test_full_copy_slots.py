"""FullCopySlots' turns without a server: arrival order, and a waiter that leaves (its call
cancelled) neither keeps a turn nor loses one for the others. The preemption of a stalled copy runs
against a real shard in tests/ps/test_slow_subscribers.py."""

from __future__ import annotations

import asyncio

import pytest

from ps.shard.full_copy_slots import FullCopySlots


async def _until(condition, what: str) -> None:
    """Lets the loop run until condition() holds, at most 5 s."""
    try:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0)  # one pass of the loop, then look again
    except TimeoutError:
        raise AssertionError(f"not within 5 s: {what}") from None


def test_turns_go_in_arrival_order_and_a_cancelled_waiter_passes_its_turn_on():
    async def scenario() -> list[str]:
        slots = FullCopySlots(2, patience=5.0)
        order: list[str] = []
        entered = {name: asyncio.Event() for name in "abcdefg"}
        holds = {name: asyncio.Event() for name in "abcdefg"}

        async def copy(name: str) -> None:
            await slots.acquire(None)
            order.append(name)
            entered[name].set()
            try:
                await holds[name].wait()
            finally:
                slots.release(None)

        async def entering(*names: str) -> None:
            async with asyncio.timeout(5):
                for name in names:
                    await entered[name].wait()

        tasks = {name: asyncio.create_task(copy(name)) for name in "ab"}
        await entering("a", "b")
        for queued, name in enumerate("cde", start=1):  # each queues before the next starts
            tasks[name] = asyncio.create_task(copy(name))
            await _until(lambda n=queued: slots.waiting == n, f"{name} waiting")
        assert order == ["a", "b"] and (slots.running, slots.waiting) == (2, 3)
        tasks["c"].cancel()  # a waiter leaves before its turn
        await asyncio.gather(tasks["c"], return_exceptions=True)
        assert slots.waiting == 2
        holds["a"].set()  # a's turn goes to d, the first still waiting
        await entering("d")
        assert order == ["a", "b", "d"]
        holds["b"].set()
        tasks["e"].cancel()  # e leaves as b's turn frees: whichever comes first, nobody holds that turn
        await asyncio.gather(tasks["b"], tasks["e"], return_exceptions=True)
        assert (slots.running, slots.waiting) == (1, 0)
        holds["d"].set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert (slots.running, slots.waiting) == (0, 0)
        tasks.update({name: asyncio.create_task(copy(name)) for name in "fg"})  # both turns are free again
        await entering("f", "g")
        assert order[-2:] == ["f", "g"] and slots.running == 2
        for name in "fg":
            holds[name].set()
        await asyncio.gather(tasks["f"], tasks["g"])
        return order

    assert asyncio.run(scenario()) == ["a", "b", "d", "f", "g"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="slots >= 1 and patience > 0"):
        FullCopySlots(0, 1.0)
    with pytest.raises(ValueError, match="slots >= 1 and patience > 0"):
        FullCopySlots(1, float("nan"))
