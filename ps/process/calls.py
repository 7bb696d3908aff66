"""What every embps gRPC server does around a call: one wrapper for the servicer methods of every
server (and the serving gate's Lookup handler), one mapping from domain errors to status codes,
and INVALID_ARGUMENT for request bytes that do not parse.

    request bytes --parse (`decode`)--> message, or the parse error
        --> wrapper (`unary_call`, `stream_call`, `answer_call`):
              parse error -> INVALID_ARGUMENT; server draining, storage failing -> UNAVAILABLE
              servicer method; what it raises -> `status_of` (INTERNAL: traceback logged, not sent)
              CallSite.record(method, table label, code, seconds, message)
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ps import wire
from ps.errors import (
    CapacityError,
    EmbpsError,
    LogGapError,
    NotPrimaryError,
    SnapshotWriteRunningError,
    UnknownTableError,
    WrongShardError,
)
from ps.snapshot.manifest import SnapshotError
from ps.snapshot.storage import StorageDeniedError, StorageError

DEFAULT_STREAM_STALL_SECONDS = 60.0  # see StallWatch


class ShuttingDownError(EmbpsError):
    """The server is draining and takes no new calls (gRPC UNAVAILABLE)."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from domain errors to gRPC status codes (and the message sent)."""
    if isinstance(exc, StorageDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, (ShuttingDownError, StorageError, NotPrimaryError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, UnknownTableError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (WrongShardError, LogGapError, SnapshotError, SnapshotWriteRunningError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the traceback is in the server's log"


def trailers_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata an error's status carries beside its message, for the caller's code to
    tell one refusal from others of the same code (the message is for people)."""
    if isinstance(exc, SnapshotWriteRunningError):
        return ((wire.WRITING_STEP_METADATA_KEY, str(exc.step)),)
    return ()


async def _abort(context: grpc.aio.ServicerContext, call: _Call, exc: Exception) -> None:
    """Ends the call with exc's status (`status_of`) and trailing metadata (`trailers_of`, after any
    the call set before: a paired shard's epoch)."""
    trailers = trailers_of(exc)
    if trailers:
        context.set_trailing_metadata(tuple(context.trailing_metadata() or ()) + trailers)
    await context.abort(*call.end(exc))


class CallSite(abc.ABC):
    """What one server tells the call wrapper: whether it takes calls, and how it labels and records
    them. `name` says who refuses while draining ("shard 0"); `log` gets INTERNAL tracebacks."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self.log = log
        self.draining = False
        # A server stream whose client takes no message for this long is ended (see stream_call).
        self.stream_stall_seconds = DEFAULT_STREAM_STALL_SECONDS
        self._series: dict[tuple, Any] = {}  # (metric, label values) -> its child (see series)

    def check_open(self) -> None:
        """Raises ShuttingDownError once the server drains (set `draining`)."""
        if self.draining:
            raise ShuttingDownError(f"{self.name} is shutting down")

    def check_call(self, context: grpc.aio.ServicerContext) -> None:
        """A unary call's metadata, before its method runs: raises to refuse the call; may set
        trailing metadata. Nothing by default (a shard with a standby checks the epoch)."""
        return None

    def series(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), looked up once per label values for `record`: labels() costs
        microseconds, and a multi-table call counts the keys of each of its tables. The values must
        be bounded (table names, with unknown ones under one label; methods; status codes)."""
        key = (metric, labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    @abc.abstractmethod
    def table_label(self, request: Any | None) -> str:
        """The `table` label of a call's metrics; request is None when its bytes did not parse."""

    @abc.abstractmethod
    def record(self, method: str, table: str, code: grpc.StatusCode, seconds: float, request: Any | None) -> None:
        """Records one call that reached its method: `method` is the short name ("Lookup"), `seconds`
        the time from handler entry to reply, request None when its bytes did not parse."""


class _Undecodable:
    """What a request that is not a valid protobuf message parses to (see `decode`)."""

    def __init__(self, error: ValueError) -> None:
        self.error = error


def decode(parse: Callable[[bytes], Any], data: bytes, method: str) -> Any:
    """parse(data), or a stand-in that the call wrapper answers INVALID_ARGUMENT (method: the full
    name, "/embps.v1.ParameterServer/Lookup", as it appears in the message)."""
    try:
        return parse(data)
    except DecodeError as exc:
        return _Undecodable(ValueError(f"request: not a valid message for {method}: {exc}"))


def parse_error(message: Any) -> ValueError | None:
    """The error of request bytes that did not parse (what `decode` returned for them), else None:
    for a request stream's handler, which sees each message (a unary call's wrapper checks it)."""
    return message.error if isinstance(message, _Undecodable) else None


class _Call:
    """One call from handler entry to its status."""

    def __init__(self, site: CallSite, method: str, request: Any) -> None:
        self.start = time.perf_counter()
        self.site = site
        self.method = method
        self.request = None if isinstance(request, _Undecodable) else request
        self.table = site.table_label(self.request)
        self.parse_error = request.error if isinstance(request, _Undecodable) else None

    def admit(self) -> None:
        """Raises what the call is answered with instead of running its method."""
        if self.parse_error is not None:
            raise self.parse_error
        self.site.check_open()

    def stalled(self, why: str) -> None:
        """Records a server stream ended because its client took no message (`why`: the status message)."""
        self.site.log.warning("%s of table %r: %s; the stream is ended", self.method, self.table, why)
        seconds_open = time.perf_counter() - self.start
        self.site.record(self.method, self.table, grpc.StatusCode.RESOURCE_EXHAUSTED, seconds_open, self.request)

    def cancelled(self, context: grpc.aio.ServicerContext) -> None:
        """Records a call grpc.aio cancelled (its client went away, or its deadline passed) before
        it ended: such calls were counted nowhere, though a push may have been applied by then."""
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= 0
        code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        self.site.record(self.method, self.table, code, time.perf_counter() - self.start, self.request)

    def end(self, exc: Exception | None = None) -> tuple[grpc.StatusCode, str]:
        """Records the call; returns its status code and message (OK without `exc`)."""
        code, message = (grpc.StatusCode.OK, "") if exc is None else status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            self.site.log.error("%s on table %r failed", self.method, self.table, exc_info=exc)
        self.site.record(self.method, self.table, code, time.perf_counter() - self.start, self.request)
        return code, message


UnaryMethod = Callable[[Any, Any], Awaitable[Any]]
StreamMethod = Callable[[Any, Any], AsyncIterator[Any]]


def unary_call(method: str) -> Callable[[UnaryMethod], Callable]:
    """Makes `async def fn(self, request) -> reply` the grpc.aio handler of the RPC `method`, on a
    servicer whose `call_site` is its server's CallSite (see the module docstring)."""

    def decorate(fn: UnaryMethod) -> Callable:
        @functools.wraps(fn)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            call = _Call(self.call_site, method, request)
            try:
                call.admit()
                self.call_site.check_call(context)
                reply = await fn(self, request)
            except asyncio.CancelledError:
                call.cancelled(context)
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become status codes
                await _abort(context, call, exc)
            call.end()
            return reply

        return handler

    return decorate


class StallWatch:
    """Ends a server stream whose client took no message for `seconds`.

    grpc.aio writes a message the handler yields, then resumes it: a client that stops reading
    (flow control full) leaves the handler suspended at its yield for good, holding what it read for
    the message and the next (a full copy's key list and its turn, a range's rows). Nothing in the
    handler runs then, so the watch is a timer armed at each yield and disarmed when the handler
    resumes. When it fires it queues the call's status, RESOURCE_EXHAUSTED with `message` (the
    client gets it after the messages it has not read yet), and cancels the call's task, which
    frees what the handler held. The status can follow a message still being written only once the
    initial metadata went out, so stream_call sends them first. A handler reads its own watch with
    `current_stall_watch()`; `end_now` lets it end another stream's earlier (a full copy waiting
    for the turn of one whose client stalled, ps/shard/stream_turns.py)."""

    def __init__(self, seconds: float, context: grpc.aio.ServicerContext, message: str) -> None:
        self.seconds = seconds
        self.context = context
        self.message = message
        self.task = asyncio.current_task()
        self.fired = False
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None  # the loop's time at the yield the client has not taken yet

    def arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._armed_at = loop.time()
        self._timer = loop.call_later(self.seconds, self._fire)

    def disarm(self) -> None:
        self._armed_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def waiting_seconds(self) -> float:
        """How long the client has left the message it was last handed untaken (0: it took it)."""
        return 0.0 if self._armed_at is None else asyncio.get_running_loop().time() - self._armed_at

    def end_now(self, message: str) -> None:
        """Ends the stream now as if it had stalled, with `message` (once: a second call does nothing)."""
        if not self.fired:
            self.disarm()
            self.message = message
            self._fire()

    def _fire(self) -> None:
        self.fired = True
        self._timer = None
        status = asyncio.get_running_loop().create_task(
            self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message)
        )
        status.add_done_callback(_sent_or_dropped)
        if self.task is not None:
            self.task.cancel()


_current_watch: contextvars.ContextVar[StallWatch | None] = contextvars.ContextVar("stall_watch", default=None)


def current_stall_watch() -> StallWatch | None:
    """The StallWatch of the server stream this task answers (None outside stream_call's handlers)."""
    return _current_watch.get()


def use_stall_watch(watch) -> None:
    """Makes `watch` (StallWatch's interface: context, seconds, fired, waiting_seconds, end_now) this
    task's current_stall_watch(): a stream carried inside another call has a watch of its own
    (ps/shard/table_streams.py)."""
    _current_watch.set(watch)


def _sent_or_dropped(task: asyncio.Task) -> None:
    """The stalled stream's status task ends with abort's AbortError once the status is queued, or
    with a batch error when the client left first: either way there is nothing left to do."""
    if not task.cancelled():
        task.exception()


def stream_call(method: str) -> Callable[[StreamMethod], Callable]:
    """unary_call for a server-streaming method: `async def fn(self, request)` yields the replies;
    the call is recorded when the stream ends. A client that takes no message for the call site's
    `stream_stall_seconds` gets its stream ended (StallWatch), recorded as RESOURCE_EXHAUSTED."""

    def decorate(fn: StreamMethod) -> Callable:
        @functools.wraps(fn)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            call = _Call(self.call_site, method, request)
            seconds = self.call_site.stream_stall_seconds
            stalled = f"{method}: the client took no message for {seconds:g} s; resubscribe"
            watch = StallWatch(seconds, context, stalled)
            # grpc.aio runs each call in a task of its own, whose context is its own copy: the
            # value is this call's alone, and ends with its task (no reset, which a generator closed
            # from another context could not do).
            _current_watch.set(watch)
            try:
                call.admit()
                await context.send_initial_metadata(())
                async for reply in fn(self, request):
                    watch.arm()
                    yield reply
                    watch.disarm()
            except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed at its yield
                if not watch.fired:  # a stalled stream is recorded below
                    call.cancelled(context)
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become status codes
                await _abort(context, call, exc)
            finally:
                watch.disarm()
                if watch.fired:
                    call.stalled(watch.message)
            call.end()

        return handler

    return decorate


def answer_call(
    site: CallSite, method: str, request: Any, fn: Callable[[Any], Any]
) -> tuple[grpc.StatusCode, str, Any]:
    """unary_call for a handler that is not grpc.aio's (the serving gate's Lookup, on the gate's
    threads): (code, message, fn(request), or None when the code is not OK)."""
    call = _Call(site, method, request)
    try:
        call.admit()
        reply = fn(request)
    except Exception as exc:  # noqa: BLE001 - the one place errors become status codes
        code, message = call.end(exc)
        return code, message, None
    call.end()
    return grpc.StatusCode.OK, "", reply


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Lets the call wrapper answer request bytes that do not parse as the method's message.

    grpc.aio answers a request deserializer's exception with UNKNOWN, before any handler runs;
    here the deserializer of every embps method returns the error instead (`decode`): the wrapper
    of a unary-request method answers it INVALID_ARGUMENT and counts it like any other bad
    request; a request stream's handler (Replicate) gets it as a message (`parse_error`).
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/embps."):
            return handler
        parse = functools.partial(decode, handler.request_deserializer, method=method)
        return handler._replace(request_deserializer=parse)
