"""A shard's start: its port answers at once, NOT_SERVING while its tables are restored.

    bind the port, start the server: health NOT_SERVING, every embps call UNAVAILABLE
        ("shard 0 is restoring snapshot step 400: 12.0 of 40.0 MiB read (30%)")
    restore on a thread of its own: progress in the log and in the metrics (RestoreProgress)
    build the Shard and its services, install them (DeferredServices.open), health SERVING

A large restore takes minutes: a caller (the launcher, a Kubernetes probe) sees a live process
with a bound port that says it is not serving yet, instead of a refused connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import grpc

from ps import bulk_messages
from ps.shard.metrics import ShardMetrics

# A shard whose restore step cannot be used (corrupt, incomplete, missing) exits with this code,
# so that the launcher can fall back to an older snapshot instead of retrying the same one.
EXIT_SNAPSHOT_UNUSABLE = 4
# A shard whose restore the job's own config refuses (a table's capacity below the rows it must
# load, another sharding) exits with the CLI's status for a config error: the same start fails the
# same way, so the launcher ends the job naming the reason instead of spending its restarts on it.
EXIT_CONFIG_REFUSED = 2

_LOG_EVERY_FRACTION = 0.05
_LOG_EVERY_SECONDS = 10.0
_MIB = float(1 << 20)


class RestoreProgress:
    """Bytes of one restore read so far, in the metrics at once and in the log every 5 % (or every
    10 s, but only when bytes were read since: a log that grows means a restore that moves).
    Called from the restore thread; `describe` from any."""

    def __init__(self, shard: int, step: int, metrics: ShardMetrics, log: logging.Logger) -> None:
        self.shard = shard
        self.step = step
        self.metrics = metrics
        self.log = log
        self.total_bytes = 0
        self.read_bytes = 0
        self._logged_bytes = 0
        self._logged_at = time.monotonic()

    def start(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.metrics.restore_size.labels(str(self.shard)).set(total_bytes)
        self.metrics.restore_read.labels(str(self.shard)).set(0)
        self.log.info("shard %d: %s", self.shard, self.describe())

    def advance(self, num_bytes: int) -> None:
        self.read_bytes += num_bytes
        self.metrics.restore_read.labels(str(self.shard)).set(self.read_bytes)
        now = time.monotonic()
        step = max(1, int(self.total_bytes * _LOG_EVERY_FRACTION))
        done = self.read_bytes >= self.total_bytes > self._logged_bytes  # the last line says 100%
        if done or self.read_bytes - self._logged_bytes >= step or now - self._logged_at >= _LOG_EVERY_SECONDS:
            self._logged_bytes, self._logged_at = self.read_bytes, now
            self.log.info("shard %d: %s", self.shard, self.describe())

    def describe(self) -> str:
        percent = 100.0 * self.read_bytes / self.total_bytes if self.total_bytes else 0.0
        return (
            f"restoring snapshot step {self.step}: {self.read_bytes / _MIB:.1f} of {self.total_bytes / _MIB:.1f} MiB "
            f"read ({percent:.0f}%)"
        )


class _Collector:
    """Stands in for a grpc server in the generated add_*Servicer_to_server functions: keeps the
    method handlers they register, by full method name."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})


class DeferredServices(grpc.GenericRpcHandler):
    """The embps services of a port that is bound before they exist: every call of `methods` (full
    names, "/package.Service/Method") is answered UNAVAILABLE with `refusal()` as the message (and
    counted by `on_refused(method)`) until `open(add_functions)` installs the real servicers. Any
    other name is UNIMPLEMENTED, as once they are open: a metrics series a call of a made-up name
    made here was never freed."""

    def __init__(
        self, refusal: Callable[[], str], on_refused: Callable[[str], None], methods: frozenset[str]
    ) -> None:
        self.refusal = refusal
        self.on_refused = on_refused
        self.methods = methods
        self._handlers: dict[str, grpc.RpcMethodHandler] | None = None

    def open(self, add_servicers: Callable[[_Collector], None], bulk: dict[str, tuple[str, ...]]) -> None:
        """add_servicers(server) registers the servicers as on a grpc server; from now on they answer.
        bulk: {full method name: its request's bytes fields read without a copy}
        (ps/bulk_messages.py); every method may answer with a reply already encoded."""
        collector = _Collector()
        add_servicers(collector)
        self._handlers = bulk_messages.zero_copy_handlers(collector.handlers, bulk)

    def service(self, handler_call_details):
        if self._handlers is not None:
            return self._handlers.get(handler_call_details.method)
        if handler_call_details.method not in self.methods:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def refuse(request, context: grpc.aio.ServicerContext):
            self.on_refused(method)
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.refusal())

        return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=lambda data: data)


def run_in_daemon_thread(fn: Callable[[], object]) -> asyncio.Future:
    """fn() on a daemon thread, as a future of the running loop: a SIGTERM during a restore ends the
    process at once, where the loop's default executor would wait for the restore to finish."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: object, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def target() -> None:
        outcome, error = None, None
        try:
            outcome = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(settle, outcome, error)
        except RuntimeError:  # the loop is closed: the shard stopped while this ran
            pass

    threading.Thread(target=target, name="restore", daemon=True).start()
    return future
