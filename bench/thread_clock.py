"""The calling thread's CPU time and run-queue wait, to tell a call's own work from the machine's
pauses on a shared machine.

A call's wall time = its time on a CPU (its own work, page faults included) + its time runnable
but waiting for a CPU (the machine's: other processes had the cores) + its time blocked (locks,
the GIL, I/O). The CPU time comes from the thread's CPU clock (time.thread_time_ns()); the wait
from /proc/thread-self/schedstat (Linux; its run-queue delay is complete whenever the thread runs,
while its CPU time there lags by up to a scheduler tick, hence the clock). Elsewhere the wait is
unknown (None).
"""

from __future__ import annotations

import os
import time


class ThreadClock:
    """Reads the creating thread's counters: make one in each thread that measures itself."""

    def __init__(self, path: str = "/proc/thread-self/schedstat") -> None:
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> tuple[float, float | None]:
        """(seconds on a CPU, seconds waiting in the run queue or None) since the thread began."""
        on_cpu = time.thread_time_ns() * 1e-9
        if self._fd is None:
            return on_cpu, None
        return on_cpu, int(os.pread(self._fd, 128, 0).split()[1]) * 1e-9

    def wait(self) -> float | None:
        """Seconds waiting in the run queue since the thread began, or None where unknown (or the
        thread has ended)."""
        if self._fd is None:
            return None
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * 1e-9
        except ProcessLookupError:
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class OtherThreadWait:
    """The run-queue wait of another thread of this process (by its native id), read from any
    thread: where a call is served by another thread, that thread's pauses are the call's too."""

    def __init__(self, native_id: int) -> None:
        self._clock = ThreadClock(f"/proc/self/task/{native_id}/schedstat")

    def wait(self) -> float | None:
        return self._clock.wait()

    def close(self) -> None:
        self._clock.close()
