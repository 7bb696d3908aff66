"""glibc malloc settings for servers that answer with large buffers, applied by re-exec.
"""

from __future__ import annotations

import os
import sys

# glibc's defaults mmap and unmap every reply buffer above 128 KiB, and page-fault it in again on
# the next call (about half of a 1 MB reply's server time); read by glibc at process start only.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def exec_with_malloc_tuning(argv: list[str]) -> None:
    """Re-executes `python -m embps <argv>` (same pid) with MALLOC_TUNING in the environment,
    unless it is already there or EMBPS_MALLOC_TUNING=0. Returns only when it does not re-exec."""
    if os.environ.get("EMBPS_MALLOC_TUNING", "1") == "0":
        return
    if all(os.environ.get(k) for k in MALLOC_TUNING):
        return
    env = {**os.environ, **MALLOC_TUNING}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "embps", *argv], env)
