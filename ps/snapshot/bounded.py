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

from ps.process.malloc import release_free_memory

T = TypeVar("T")

THREADS = 8  # storage requests in flight: S3's latency hidden, few enough not to crowd a shard's cores
BYTES_IN_FLIGHT = 256 << 20  # the tasks' estimated bytes held at once (beyond it, one at a time)
RELEASE_AFTER_BYTES = 16 << 20  # a task this big hands its thread's pyarrow memory back when done


def run_bounded(
    tasks: Sequence[tuple[int, Callable[[], Callable[[], T]]]], threads: int | None = None, max_bytes: int | None = None
) -> list[T]:
    """Runs tasks, each (its bytes, start), in order: start() runs on the calling thread once the
    task fits (the bytes of the tasks running stay within max_bytes, and a thread is free; the
    first always starts) and returns the function one of up to `threads` pool threads then runs,
    whose result is the task's. Returns the results in task order. Once a failure is seen (while
    waiting for a thread or for bytes), no further task starts; the first failure in task order
    is raised once every started task ended. threads, max_bytes: THREADS and BYTES_IN_FLIGHT when
    None (read at the call, so a test may lower them).

    What start() allocates comes from the calling thread's heap: large buffers that are freed by
    the end (a table's export) belong there. glibc gives each pool thread an arena of its own and
    keeps what is freed at the top of it (malloc_trim releases only the main arena's top, and a
    server's trim threshold is 256 MiB): a shard exporting its tables on the pool kept 100-250 MiB
    more after every round (a review's measure: 8 tables of 1M pending keys).
    """
    threads = THREADS if threads is None else threads
    max_bytes = BYTES_IN_FLIGHT if max_bytes is None else max_bytes
    if threads <= 1 or len(tasks) <= 1:
        return [start()() for _, start in tasks]
    with ThreadPoolExecutor(threads, thread_name_prefix="embps-tables") as pool:
        futures: list[Future[T]] = []
        running: dict[Future[T], int] = {}
        failed = False
        for size, start in tasks:
            while running and (len(running) >= threads or sum(running.values()) + size > max_bytes):
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    del running[future]
                    failed = failed or future.exception() is not None
            if failed:
                break
            try:
                fn = start()
            except BaseException:
                wait(futures)  # no task outlives the call
                for future in futures:
                    future.result()  # an earlier task's failure, if any, comes first
                raise
            future = pool.submit(_run_and_release, fn, size >= RELEASE_AFTER_BYTES)
            futures.append(future)
            running[future] = size
        wait(futures)
    _release_thread_memory()
    # A failure stopped the loop only after it was among these futures: result() raises it here.
    return [future.result() for future in futures]


def _run_and_release(fn: Callable[[], T], release: bool) -> T:
    """fn() on a pool thread; with `release`, then that thread's share of pyarrow's pool handed
    back (mimalloc keeps a heap per thread, and only its own thread can collect it). It costs
    ~2 ms, so only tasks of RELEASE_AFTER_BYTES or more pay it (500 small tables: +1 s a round)."""
    try:
        return fn()
    finally:
        if release:
            import pyarrow as pa

            pa.default_memory_pool().release_unused()


def _release_thread_memory() -> None:
    """What the pool's threads freed goes back to the kernel, as far as the allocators let: their
    parquet buffers were allocated in per-thread heaps (pyarrow's mimalloc), and whatever they
    allocated through glibc in arenas of their own."""
    import pyarrow as pa  # only the snapshot modules, which bring it, run tables here

    pa.default_memory_pool().release_unused()
    release_free_memory()
