"""Ending a server or worker process without running native libraries' exit-time destructors.

A process that read Parquet or talked to S3 holds Arrow's thread pools (and the AWS SDK's). When
it ends through the interpreter's normal exit, C++ static destructors tear those pools down while
their threads may still be alive, and now and then that is `terminate called without an active
exception`: SIGABRT, after the process did everything right (apache/arrow#34314). A shard that
exits 4 to say its snapshot is unusable then reports -6, and a worker that finished its job fails
it. So these processes end with os._exit once their own work is done: Python's exit functions
(atexit: pyarrow's S3 finalizer, logging, multiprocessing) still run, with the interpreter whole,
but the interpreter's teardown and the C++ static destructors do not; the exit status is the one
the process chose.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn


def exit_process(status: int) -> NoReturn:
    """Runs the atexit functions, flushes logging, stdout and stderr, then ends the process with
    `status` at once."""
    atexit._run_exitfuncs()  # what a normal exit runs first; not public, but there since Python 3.0
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to say there
            pass
    os._exit(status)
