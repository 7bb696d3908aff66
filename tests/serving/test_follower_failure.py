"""A follower that raises what it does not handle (a bug, memory) stopped following its shard
while the replica went on serving its rows as current, its stream reported connected. Now the
replica stops (exit 1) for its supervisor to restart it."""

from __future__ import annotations

import asyncio
import logging

from serving.server import stop_when_any_fails


def test_a_follower_that_fails_stops_the_replica_and_one_cancelled_does_not(caplog):
    async def run() -> tuple[list[str], bool, bool]:
        stop = asyncio.Event()

        async def follows() -> None:
            await asyncio.Event().wait()

        async def fails() -> None:
            raise MemoryError("a shard's rows")

        cancelled, failing = asyncio.create_task(follows()), asyncio.create_task(fails())
        failed = stop_when_any_fails(
            {cancelled: "table a shard 0's follower", failing: "table a shard 1's follower"}, stop
        )
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        await asyncio.wait_for(stop.wait(), timeout=10)
        return failed, cancelled.cancelled(), failing.done()

    with caplog.at_level(logging.CRITICAL, logger="embps.serving"):
        failed, cancelled, done = asyncio.run(run())
    assert cancelled and done
    assert failed == ["table a shard 1's follower"]
    assert "table a shard 1's follower failed; the replica stops" in caplog.text
    assert "MemoryError: a shard's rows" in caplog.text
