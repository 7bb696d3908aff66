"""Work over a shard's tables on several threads, within a bound on the bytes it holds.

A snapshot round or a restore touches every table of a shard, 3-4 files each; one after the other,
500 tables meant 2,000 storage requests in a row, whose latency (not their bytes) set the time.
Small tables go several at a time; a big one, whose export or decoded state would multiply the
process's memory if several ran beside it, waits until it fits the bound or runs alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")

THREADS = 8  # storage requests in flight: S3's latency hidden, few enough not to crowd a shard's cores
BYTES_IN_FLIGHT = 256 << 20  # the tasks' estimated bytes held at once (beyond it, one at a time)


def run_bounded(
    tasks: Sequence[tuple[int, Callable[[], T]]], threads: int | None = None, max_bytes: int | None = None
) -> list[T]:
    """Runs tasks, each (its bytes, fn), on up to `threads` threads, in order, starting one only
    while the bytes of those running stay within max_bytes (the first always starts); returns the
    results in task order. After a task fails none starts, and the first failure in task order is
    raised once every started task ended. threads, max_bytes: THREADS and BYTES_IN_FLIGHT when
    None (read at the call, so a test may lower them)."""
    threads = THREADS if threads is None else threads
    max_bytes = BYTES_IN_FLIGHT if max_bytes is None else max_bytes
    if threads <= 1 or len(tasks) <= 1:
        return [fn() for _, fn in tasks]
    with ThreadPoolExecutor(threads, thread_name_prefix="embps-tables") as pool:
        futures: list[Future[T]] = []
        running: dict[Future[T], int] = {}
        failed = False
        for size, fn in tasks:
            while running and (len(running) >= threads or sum(running.values()) + size > max_bytes):
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    del running[future]
                    failed = failed or future.exception() is not None
            if failed:
                break
            future = pool.submit(fn)
            futures.append(future)
            running[future] = size
        wait(futures)
    # A failure stopped the loop only after it was among these futures: result() raises it here.
    return [future.result() for future in futures]
