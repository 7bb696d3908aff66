"""Waiting for a condition with a deadline: how tests synchronise with processes and threads,
instead of sleeping for a time that is long enough on one machine and too short on a busy one."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_SECONDS = 0.02


def eventually(check: Callable[[], object], timeout: float = 10.0) -> bool:
    """True as soon as `check()` is truthy; False if it is still falsy after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(POLL_SECONDS)
    return bool(check())


def wait_until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Returns once `check()` is truthy; AssertionError naming `what` after `timeout` seconds."""
    if not eventually(check, timeout):
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
