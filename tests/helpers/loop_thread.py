"""An asyncio event loop running on a thread of its own, for code under test that reads its
sockets on a loop (e.g. ps/shard/replication_link.py's PrimaryLink) while the test blocks.

    with LoopThread() as loop:
        link.start(loop, on_ack, on_end)
"""

from __future__ import annotations

import asyncio
import threading


class LoopThread:
    """Starts a loop on a daemon thread; on exit stops it, waits for the thread, and closes it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)

    def __enter__(self) -> asyncio.AbstractEventLoop:
        self._thread.start()
        return self.loop

    def __exit__(self, *exc_info) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
