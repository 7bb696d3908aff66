"""A cancelled task must end: no product code waits with asyncio.wait_for.

On Python 3.11, asyncio.wait_for swallows a cancellation that arrives in the same loop iteration
as its awaitable's completion: it returns the result and the task goes on as if it had not been
cancelled. A loop around such a wait (a monitor, a stream's heartbeat wait) then never ends, and
whoever gathers it at shutdown hangs. A serving replica did exactly that: its monitor waited for a
follower's link event with wait_for, a follower set the event as SIGTERM cancelled the tasks, and
the replica was still running 15 s later, when the test killed it. `async with asyncio.timeout()`
counts cancellations and raises the one it did not cause.
"""

from __future__ import annotations

import ast
import asyncio
import pathlib
from types import SimpleNamespace

from grpc_health.v1._async import HealthServicer

from serving.metrics import ServingMetrics
from serving.server import monitor

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCT = ("ps", "serving", "worker", "bench")
ROUNDS = 50


def _wait_for_calls(path: pathlib.Path) -> list[int]:
    """Lines of `asyncio.wait_for(...)` calls in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "wait_for"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "asyncio"
    ]


def test_no_product_code_waits_with_asyncio_wait_for():
    found = {
        str(path.relative_to(ROOT)): lines
        for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))
        if (lines := _wait_for_calls(path))
    }
    assert found == {}, f"asyncio.wait_for in {found}: use `async with asyncio.timeout(...)` (see this module)"


def test_the_replica_monitor_ends_when_cancelled_as_a_stream_changes():
    """The replica's monitor, cancelled in the same loop iteration as a follower sets its link
    event, ends; with asyncio.wait_for it went on every time."""

    async def cancelled_as_the_event_is_set() -> bool:
        replica = SimpleNamespace(
            config=SimpleNamespace(stale_after_seconds=2.0), followers=[], link_changed=asyncio.Event()
        )
        servicer = SimpleNamespace(replica=replica, metrics=ServingMetrics())
        ticked = asyncio.get_running_loop().create_future()
        # on_tick runs in the monitor's first round, which then goes on to its wait without
        # yielding: once `ticked` is done, the monitor is waiting for the event.
        def tick() -> None:
            if not ticked.done():
                ticked.set_result(None)

        task = asyncio.create_task(monitor(servicer, HealthServicer(), tick))
        async with asyncio.timeout(2.0):
            await ticked
        replica.link_changed.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
        return bool(done)

    async def all_rounds() -> list[bool]:
        return [await cancelled_as_the_event_is_set() for _ in range(ROUNDS)]

    assert all(asyncio.run(all_rounds()))
