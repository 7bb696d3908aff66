"""SubscribeTables: several tables' Subscribe streams carried by one call.

    requests: subscribe [a, b, c] ... stop [b] ... subscribe [b (full_sync)] ...
        table a's stream ──> message ─┐
        table b's stream ──> message ─┼─> one SubscribeTablesReply: what is ready, up to the size
        table c's stream ──> message ─┘   bound, then the streams that ended (TableStreamEnd)

Each table's stream is the generator Subscribe serves (ps/shard/server.py), unchanged, run in a
task of its own: after a commit every followed table's stream wakes, makes its range, and the reply
that leaves next carries them all, where one Subscribe call per table sent a message each (the
per-message cost of a gRPC stream, on both sides, was most of a replica's cost to the shard).

A stream makes its next message only after its previous one was handed to gRPC, as under
Subscribe, so rows are read as late as they were (a slow subscriber gets merged ranges) and one
table holds at most one message here. With a window (SubscribeTablesRequest.window) a stream also
waits for its subscriber's credit before it makes its next message: a table whose subscriber is
busy waits here, its ranges merging, and holds back neither the call nor the other tables (on one
call's flow control alone, a busy table held back every table). A stream that fails ends alone,
with the status its own call would have had; the subscriber starts it again on the same call (a
resync: full_sync). A failure that is the process's (UNAVAILABLE: draining, no longer primary)
ends the call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from ps.bulk_messages import field_parts
from ps.errors import CapacityError
from ps.process.calls import StallWatch, current_stall_watch, parse_error, status_of, use_stall_watch
from ps.rpc import ps_pb2

log = logging.getLogger("embps.ps")

_END_MESSAGE_CHARS = 4096  # of a TableStreamEnd's message (an unknown table's lists the shard's tables)
_BATCHES = ps_pb2.SubscribeTablesReply.DESCRIPTOR.fields_by_name["batches"].number
_ENDED = ps_pb2.SubscribeTablesReply.DESCRIPTOR.fields_by_name["ended"].number

OpenStream = Callable[[ps_pb2.SubscribeRequest], AsyncIterator[ps_pb2.UpdateBatch]]


class _Credit:
    """What one stream may still send: `left` messages (None: no bound)."""

    def __init__(self, window: int) -> None:
        self.left: int | None = window or None
        self.granted = asyncio.Event()

    def give(self, messages: int) -> None:
        if self.left is not None:
            self.left += messages
            self.granted.set()


@dataclass
class _Stream:
    """One table's stream of the call: its id, what it may still send, when it started, its task,
    its watch (within the call; None outside a stream call)."""

    stream_id: int
    credit: _Credit
    started: float = field(default_factory=time.perf_counter)
    task: asyncio.Task | None = None
    watch: TableWatch | None = None


class TableWatch:
    """A table stream's StallWatch inside the call (the interface StreamTurns and the heartbeats
    read): its client is waiting to take a message while the call's is (the call's own watch), or
    while the stream waits for credit. Waiting for credit for the call's stall seconds ends the
    table's stream (in the call), as a Subscribe stream's client that takes nothing is ended.
    `on_hold(held)`, when the stream sets it, hears when its credit runs out and when it is given
    more (its heartbeat seat: a stream without credit does not send its group's heartbeats,
    ps/shard/heartbeats.py)."""

    def __init__(self, call: StallWatch, end: Callable[[str], None], message: str) -> None:
        self.context = call.context
        self.seconds = call.seconds
        self.message = message
        self.fired = False
        self.on_hold: Callable[[bool], None] | None = None
        self._call = call
        self._end = end
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        self._timer = loop.call_later(self.seconds, self.end_now, self.message)

    def disarm(self) -> None:
        self._since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def held(self, held: bool) -> None:
        """The stream's credit ran out (True) or it was given more (False)."""
        if self.on_hold is not None:
            self.on_hold(held)

    def waiting_seconds(self) -> float:
        own = 0.0 if self._since is None else asyncio.get_running_loop().time() - self._since
        return max(own, self._call.waiting_seconds())

    def end_now(self, message: str) -> None:
        if not self.fired:
            self.fired = True
            self.disarm()
            self._end(message)


class TableStreams:
    """The table streams of one SubscribeTables call, and the replies that carry them."""

    def __init__(
        self, open_stream: OpenStream, known: Callable[[str], None], check_open: Callable[[], None], max_bytes: int,
        max_entries: int, on_end: Callable[[str, grpc.StatusCode, float], None],
    ) -> None:
        """open_stream(request): one table's Subscribe messages; known(name) raises for a table
        the shard does not hold; check_open() raises once the server drains (see wake); max_bytes:
        a reply's messages (a bigger message goes alone); max_entries: the subscribes, stops and
        credits one request may hold, and the ends the client may leave untaken (4x the shard's
        tables is plenty: a replica asks for, gives credit to and stops each table at most once a
        request): past them the call ends, for a request of 20,000 unknown names held the shard's
        loop for seconds. on_end(table, code, seconds open): a table's stream ended (recorded as a
        Subscribe call's end is: the shard's embps_requests counts them by table and code)."""
        self._open = open_stream
        self._on_end = on_end
        self._known = known
        self._check_open = check_open
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._streams: dict[str, _Stream] = {}  # the running streams, by table
        self._names: dict[int, str] = {}  # stream_id -> the table of a running stream
        # Messages made and not yet sent, oldest first: (table, message or its bytes, what its stream awaits).
        self._ready: deque[tuple[str, ps_pb2.UpdateBatch | bytes, asyncio.Future]] = deque()
        self._ended: dict[str, ps_pb2.TableStreamEnd] = {}  # by table, oldest first
        self._failure: BaseException | None = None  # ends the call
        self._changed = asyncio.Event()

    def start(self, request: ps_pb2.SubscribeRequest, window: int = 0) -> None:
        """Starts table request.table's stream (replacing one that runs); window: see ps.proto."""
        name = request.table
        self._drop(name)
        stream = _Stream(request.stream_id, _Credit(window))
        try:
            self._known(name)
        except Exception as exc:  # noqa: BLE001 - answered as that table's end
            self._end(name, stream, exc)
            return
        self._streams[name] = stream
        self._names[stream.stream_id] = name
        stream.task = asyncio.create_task(self._pump(name, request, stream))

    def _running(self, stream_id: int) -> tuple[str, _Stream] | None:
        """(table, stream) of the running stream called stream_id, if there is one."""
        name = self._names.get(stream_id)
        stream = self._streams.get(name) if name is not None else None
        return (name, stream) if stream is not None and stream.stream_id == stream_id else None

    def stop(self, stream_id: int) -> None:
        """Ends the stream called stream_id, if it runs."""
        if (running := self._running(stream_id)) is not None:
            self._drop(running[0])

    def _stall(self, name: str, stream: _Stream, message: str) -> None:
        """Ends `stream` (of table `name`), if it still runs, RESOURCE_EXHAUSTED: its client left
        it waiting (see TableWatch), or another stream waited for its turn."""
        if self._streams.get(name) is stream:
            self._drop(name)
            self._end(name, stream, CapacityError(message))

    def wake(self) -> None:
        """Looks at the call again now: the server began to drain (the call then ends UNAVAILABLE,
        whether or not a table's stream runs to find out)."""
        self._changed.set()

    def _forget(self, name: str) -> _Stream | None:
        """Takes table `name`'s running stream out of the call's books; returns it."""
        stream = self._streams.pop(name, None)
        if stream is not None and self._names.get(stream.stream_id) == name:
            del self._names[stream.stream_id]
        return stream

    def _drop(self, name: str) -> None:
        """Ends table `name`'s stream, if it runs, dropping what it made and has not sent."""
        stream = self._forget(name)
        if stream is not None and stream.task is not None:
            stream.task.cancel()
        if any(entry[0] == name for entry in self._ready):
            for entry in [e for e in self._ready if e[0] == name]:
                self._ready.remove(entry)
                entry[2].cancel()
        self._ended.pop(name, None)

    def _end(self, name: str, stream: _Stream, exc: BaseException) -> None:
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("SubscribeTables: table %r's stream failed", name, exc_info=exc)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            log.warning("SubscribeTables: table %r: %s; the stream is ended", name, message)
        self._on_end(name, code, time.perf_counter() - stream.started)
        if code == grpc.StatusCode.UNAVAILABLE and self._failure is None:
            self._failure = exc  # the process's, not the table's: the call ends
        self._ended.pop(name, None)  # (re)inserted last: ends go out in the order they came
        self._ended[name] = ps_pb2.TableStreamEnd(
            table=name, code=code.value[0], message=message[:_END_MESSAGE_CHARS], stream_id=stream.stream_id
        )
        if len(self._ended) > self._max_entries and self._failure is None:
            self._failure = CapacityError(
                f"SubscribeTables: more than {self._max_entries} ended streams the client has not taken; read the "
                "replies"
            )
        self._changed.set()

    async def _pump(self, name: str, request: ps_pb2.SubscribeRequest, stream: _Stream) -> None:
        """Moves the table's messages into the ready queue one at a time: the next is made once
        the previous left and the stream has credit. Its end is recorded unless it was stopped."""
        loop = asyncio.get_running_loop()
        call_watch = current_stall_watch()
        watch = None
        if call_watch is not None:
            stalled = f"the client gave no credit for {call_watch.seconds:g} s; resubscribe"
            watch = TableWatch(call_watch, functools.partial(self._stall, name, stream), stalled)
            use_stall_watch(watch)  # this task's: the table's stream reads it (its turns, its heartbeats)
            stream.watch = watch
        credit = stream.credit
        messages = self._open(request)
        try:
            while True:
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    raise RuntimeError(f"table {name!r}: its stream ended") from None  # they end only by failing
                # Made first, then held for credit, as a Subscribe stream's message is made and then
                # held by the call's flow control: the stream went past its previous message, so a
                # range all sent has let its memory turn go (waiting for credit before making the
                # next, the last message's range kept it, and other tables' ranges waited for it).
                while credit.left is not None and credit.left <= 0:
                    credit.granted.clear()
                    if watch is not None:
                        watch.arm()
                    try:
                        await credit.granted.wait()
                    finally:
                        if watch is not None:
                            watch.disarm()
                if credit.left is not None:
                    credit.left -= 1
                    if credit.left == 0 and watch is not None:
                        # Held from now: a stream without credit that took its group's heartbeats
                        # over waited for its first, made it, and only then handed them on, the
                        # shard silent meanwhile for each such stream in turn.
                        watch.held(True)
                message.stream_id = request.stream_id
                sent = loop.create_future()
                self._ready.append((name, message, sent))
                self._changed.set()
                await sent
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered as that table's end
            if self._streams.get(name) is stream:
                self._forget(name)
                self._end(name, stream, exc)
        finally:
            await messages.aclose()  # its cleanup (subscriber count, heartbeat seat, memory turn) now

    async def _take(self, requests: AsyncIterator[ps_pb2.SubscribeTablesRequest]) -> None:
        """Starts and stops streams as the requests say; a request that does not parse ends the call."""
        try:
            async for message in requests:
                if (error := parse_error(message)) is not None:
                    raise error
                entries = len(message.subscribe) + len(message.stop) + len(message.credit)
                if entries > self._max_entries:
                    raise ValueError(
                        f"SubscribeTablesRequest: {entries} subscribes and stops in one request, at most "
                        f"{self._max_entries} (one a table)"
                    )
                for stream_id in message.stop:
                    self.stop(stream_id)
                for entry in message.subscribe:
                    self.start(entry, message.window)
                for grant in message.credit:
                    if (running := self._running(grant.stream_id)) is not None:
                        stream = running[1]
                        was_out = stream.credit.left == 0
                        stream.credit.give(grant.messages)
                        if was_out and stream.credit.left and stream.watch is not None:
                            stream.watch.held(False)
        except Exception as exc:  # noqa: BLE001 - the call ends with it
            if self._failure is None:
                self._failure = exc
            self._changed.set()

    def _reply(self) -> tuple[bytes, list[asyncio.Future]]:
        """The next reply, encoded (each message serialised once, not copied into a reply message
        first), and the futures of the messages it carries: the ready messages up to the size
        bound, then, once none is left, the streams that ended."""
        parts: list[bytes] = []
        taken: list[asyncio.Future] = []
        size = 0
        while self._ready:
            name, message, sent = self._ready[0]
            data = message if isinstance(message, bytes) else message.SerializeToString()
            if taken and size + len(data) > self._max_bytes:
                self._ready[0] = (name, data, sent)  # serialised once, sent with the next reply
                break
            self._ready.popleft()
            parts += field_parts(_BATCHES, data)
            taken.append(sent)
            size += len(data)
        while not self._ready and self._ended:  # the ends within the same bound
            name = next(iter(self._ended))
            data = self._ended[name].SerializeToString()
            if parts and size + len(data) > self._max_bytes:
                break
            del self._ended[name]
            parts += field_parts(_ENDED, data)
            size += len(data)
        return b"".join(parts), taken

    async def replies(
        self, requests: AsyncIterator[ps_pb2.SubscribeTablesRequest]
    ) -> AsyncIterator[bytes]:
        """The call's replies (SubscribeTablesReply, encoded), its requests read meanwhile; raises
        what ends the call."""
        taker = asyncio.create_task(self._take(requests))
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                try:
                    self._check_open()
                except Exception as exc:  # noqa: BLE001 - the call ends with it (UNAVAILABLE)
                    self._failure = self._failure or exc
                while (self._ready or self._ended) and self._failure is None:
                    reply, taken = self._reply()
                    yield reply
                    for sent in taken:
                        if not sent.done():
                            sent.set_result(None)
                if self._failure is not None:
                    raise self._failure
        finally:
            taker.cancel()
            pumps = [stream.task for stream in self._streams.values() if stream.task is not None]
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(taker, *pumps, return_exceptions=True)
