"""FullCopySlots' turns without a server: arrival order, and a waiter that leaves (its call
cancelled) neither keeps a turn nor loses one for the others. The preemption of a stalled copy runs
against a real shard in tests/ps/test_slow_subscribers.py."""

from __future__ import annotations

import asyncio

import pytest

from ps.shard.full_copy_slots import FullCopySlots


def test_turns_go_in_arrival_order_and_a_cancelled_waiter_passes_its_turn_on():
    async def scenario() -> list[str]:
        slots = FullCopySlots(2, patience=5.0)
        order: list[str] = []

        async def copy(name: str, hold: asyncio.Event) -> None:
            await slots.acquire(None)
            order.append(name)
            try:
                await hold.wait()
            finally:
                slots.release(None)

        holds = {name: asyncio.Event() for name in "abcde"}
        tasks = {}
        for name in "abcde":
            tasks[name] = asyncio.create_task(copy(name, holds[name]))
            await asyncio.sleep(0)  # each starts (and queues) in turn
        await asyncio.sleep(0.01)
        assert order == ["a", "b"] and (slots.running, slots.waiting) == (2, 3)
        tasks["c"].cancel()  # a waiter leaves before its turn
        await asyncio.sleep(0.01)
        assert slots.waiting == 2
        holds["a"].set()  # a's turn goes to d, the first still waiting
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "d"]
        holds["b"].set()
        tasks["e"].cancel()  # e leaves as b's turn frees: whichever comes first, nobody holds that turn
        await asyncio.sleep(0.01)
        assert (slots.running, slots.waiting) == (1, 0)
        holds["d"].set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert (slots.running, slots.waiting) == (0, 0)
        for name in "fg":  # both turns are free again
            holds[name] = asyncio.Event()
            tasks[name] = asyncio.create_task(copy(name, holds[name]))
        await asyncio.sleep(0.01)
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
