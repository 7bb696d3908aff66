"""glibc malloc settings for processes that allocate large buffers on every call or step.

glibc's defaults mmap every allocation above 128 KiB (a threshold that only grows once such a
buffer was freed) and hand freed memory at the top of the heap back to the kernel above 128 KiB:
a buffer of the next call or step is then page-faulted in again, page by page. A shard's 1 MB
reply spent about half of its server time there; a worker's training step spent 10% of its CPU
in page faults (perf, 26 tables, batch 1024 per worker: the outputs of the dense tower's
matrix products and concatenations), and the same tower trained 3-23% faster in one process
with these settings (five interleaved pairs, 2026-12-03).

Servers (`embps ps`, `embps serve`) get them by re-exec, since glibc reads the environment at
process start; a worker, started by `embps launch`, torchrun or a cluster's own launcher, sets
them on itself through mallopt(3) (`tune_malloc_here`). EMBPS_MALLOC_TUNING=0 turns both off.
"""

from __future__ import annotations

import ctypes
import os
import sys

from ps.process.python_command import python_module

MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 256 << 20
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
}
DISABLE_VARIABLE = "EMBPS_MALLOC_TUNING"
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def _disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1") == "0"


def exec_with_malloc_tuning(argv: list[str]) -> None:
    """Re-executes `python -m embps <argv>` (same pid) with MALLOC_TUNING in the environment,
    unless it is already there or EMBPS_MALLOC_TUNING=0. Returns only when it does not re-exec."""
    if _disabled():
        return
    if all(os.environ.get(k) for k in MALLOC_TUNING):
        return
    command, env = python_module("embps", *argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**env, **MALLOC_TUNING})


def tune_malloc_here() -> bool:
    """Applies MALLOC_TUNING to this process's later allocations through glibc's mallopt.

    Returns whether both settings took: False with EMBPS_MALLOC_TUNING=0, or where the C library
    has no mallopt (not glibc), or refuses a value.
    """
    if _disabled():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return mmap_set and trim_set


def release_free_memory() -> bool:
    """Hands the C heap's free pages back to the kernel (glibc's malloc_trim), every arena's: what
    threads that have ended freed stays in their arenas otherwise, above the trim threshold or
    not at the top of a heap. Returns whether it ran (False where the C library has none)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
