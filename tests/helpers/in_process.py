"""A job's shards served from the test's own process: the real gRPC servers (ps/shard/server.py's
`create_server`) on port 0, on one event-loop thread, for tests that kill or signal no shard.
They start in milliseconds instead of a process start each (Python, torch, the native core).

    with InProcessShards.start(make_job([TableConfig("user", dim=8)], num_shards=2)) as shards:
        client = PSClient.from_job(shards.job)  # shards.job names the bound ports
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace

import grpc

from ps.job_config import JobConfig
from ps.rpc import ps_pb2_grpc
from ps.shard.server import ParameterServerServicer, create_server
from ps.shard.update_log import DEFAULT_MAX_KEYS

START_TIMEOUT_S = 60.0


@dataclass
class InProcessShards:
    """Every shard of `job` (addresses rewritten to the ports bound) on one event loop in a thread."""

    job: JobConfig
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    servers: list[grpc.aio.Server]
    servicers: list[ParameterServerServicer]

    @classmethod
    def start(cls, job: JobConfig, log_max_keys: int = DEFAULT_MAX_KEYS) -> InProcessShards:
        """log_max_keys: each table's update log bound (`embps ps --update-log-keys`)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="in-process-shards", daemon=True)
        thread.start()

        async def build() -> tuple[list[grpc.aio.Server], list[ParameterServerServicer], list[int]]:
            servers, servicers, ports = [], [], []
            for index in range(len(job.shards)):
                server, port, servicer, _health = await create_server(
                    job, index, address="127.0.0.1:0", log_max_keys=log_max_keys
                )
                await server.start()
                servers.append(server)
                servicers.append(servicer)
                ports.append(port)
            return servers, servicers, ports

        try:
            servers, servicers, ports = asyncio.run_coroutine_threadsafe(build(), loop).result(START_TIMEOUT_S)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(START_TIMEOUT_S)
            raise
        bound = tuple(replace(s, address=f"127.0.0.1:{port}") for s, port in zip(job.shards, ports, strict=True))
        return cls(replace(job, shards=bound), loop, thread, servers, servicers)

    def stop(self) -> list[int]:
        """Stops every server (calls in flight are cancelled) and the loop; [0] per shard, as a
        ShardCluster's exit codes after a clean stop."""
        if self.thread.is_alive():

            async def stop_all() -> None:
                await asyncio.gather(*(server.stop(None) for server in self.servers))

            asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(START_TIMEOUT_S)
            for servicer in self.servicers:
                servicer.executor.shutdown()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(START_TIMEOUT_S)
            self.loop.close()
        return [0] * len(self.servers)

    def __enter__(self) -> InProcessShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def following(shards: InProcessShards, make_followers: Callable[[grpc.aio.Channel], list]) -> Iterator[list]:
    """Runs the serving followers that make_followers(channel to shard 0) builds on the shards'
    loop (their streams then answer one another without a thread hop) until the block ends;
    yields them."""

    async def start() -> tuple[grpc.aio.Channel, list, list[asyncio.Future]]:
        channel = grpc.aio.insecure_channel(shards.job.shards[0].address)
        followers = make_followers(channel)
        return channel, followers, [asyncio.ensure_future(f.run()) for f in followers]

    channel, followers, runs = asyncio.run_coroutine_threadsafe(start(), shards.loop).result(10)
    try:
        yield followers
    finally:

        async def stop() -> None:
            for run in runs:
                run.cancel()
            await channel.close()

        asyncio.run_coroutine_threadsafe(stop(), shards.loop).result(10)


@contextlib.asynccontextmanager
async def scripted_shard(servicer: ps_pb2_grpc.ParameterServerServicer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `servicer` (a test's own ParameterServer: a shard that answers as the test
    scripts it) served on a loopback port of this event loop; both stopped on exit."""
    server = grpc.aio.server()
    ps_pb2_grpc.add_ParameterServerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)
