"""A loopback TCP proxy that delivers what its target sends `delay` seconds late: a slow link to one
real server (e.g. a PS shard whose Subscribe stream reaches a replica late), order kept.

    with SlowLink("127.0.0.1:50051", delay=0.3) as link:
        ... connect to link.address instead ...
"""

from __future__ import annotations

import asyncio
import threading
import time


class SlowLink:
    """Forwards connections on 127.0.0.1:<port> to `target` ("host:port"); bytes from the target
    are held `delay` seconds, bytes to it pass at once. `delay` may be changed on the way: it holds
    the bytes that arrive after."""

    def __init__(self, target: str, delay: float) -> None:
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="slow-link", daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.address = ""

    def __enter__(self) -> SlowLink:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self.loop
        ).result(10)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
            sink.close()

        async def hold() -> None:
            while data := await up_reader.read(1 << 16):
                held.put_nowait((time.monotonic() + self.delay, data))
            held.put_nowait((time.monotonic() + self.delay, b""))

        async def deliver() -> None:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(t) for t in (pump(reader, up_writer), hold(), deliver())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            up_writer.close()
