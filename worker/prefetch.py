"""Runs a generator ahead in a background thread, through a bounded queue.

The reader's pipeline (read, parse, hash, shuffle, batch) runs in the thread, so the trainer
finds the next batch ready; the Parquet reader decodes in a second one (worker/parquet_reader.py).
pyarrow, numpy and the native hash release the GIL for most of it. At
most `depth` items wait in the queue, so memory stays bounded. An exception in the thread is
raised in the consumer after the items produced before it; closing the consumer stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()
_PUT_CHECK_S = 0.1  # how often a blocked producer looks whether the consumer has gone


def prefetched(source: Iterator[T], depth: int, name: str = "reader") -> Iterator[T]:
    """Yields the items of `source`, produced up to `depth` ahead in a daemon thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=_PUT_CHECK_S)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=f"{name}-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
