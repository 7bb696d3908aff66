"""Every table a replica follows on one training shard, over one SubscribeTables call.

    ShardFollower a ─ subscribe(request) ─┐                     ┌─> a's feed ─> a's messages
    ShardFollower b ─ subscribe(request) ─┼─> SubscribeTables ──┼─> b's feed ─> b's messages
    ShardFollower c ─ subscribe(request) ─┘   (one call a shard) └─> ended(b): b's stream raises
                                                                   its status; b resubscribes

Each follower runs as it would on a Subscribe call of its own (serving/follower.py: its resyncs,
back-off and status), and `subscribe` gives it its table's part of the shard's one call: its
request goes out on the call, the replies' messages for its table come back. A table's stream that
ends (a gap: FAILED_PRECONDITION) ends alone, and its follower subscribes again on the same call;
the call ending (the shard gone) ends every table's stream with the call's status, and the next
subscribe opens a new call, on the other of a shard and standby pair after UNAVAILABLE.

One call a shard rather than one a table: after a push or a commit the shard sends one message
for all its tables, and the replica reads one (ps/shard/table_streams.py says what that saves).
A shard that predates SubscribeTables (UNIMPLEMENTED) is followed with a Subscribe call a table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from ps.rpc import ps_pb2
from serving.follower import ShardFollower, switches_side

log = logging.getLogger("embps.serving")

# Messages a table's stream may have sent that its follower has not taken (the window of the call's
# per-stream flow control, ps.proto SubscribeTablesRequest): the follower gives credit back as it
# takes them, half a window at a time. A follower that waits (a table ahead of the consistent cut,
# waiting for the others) holds back its own table on the shard, never the call: one table's full
# queue blocking the call's reader held back the very table the cut waited for, for good.
FEED_MESSAGES = 4

_WAKE = object()  # put into an empty feed when it closes, for a follower waiting on it
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Feed:
    """One table's messages of the call, in order, then how its stream ended."""

    def __init__(self, stream_id: int, give_credit: Callable[[int, int], None]) -> None:
        self.stream_id = stream_id
        self.queue: asyncio.Queue = asyncio.Queue()  # at most FEED_MESSAGES, by the stream's credit
        self.closed = False
        self.error: BaseException | None = None
        self._give_credit = give_credit
        self._taken = 0  # messages taken since credit was last given back

    def close(self, error: BaseException | None) -> None:
        """No more messages: after the queued ones the stream ends (raising `error`, if any)."""
        if self.closed:
            return
        self.closed, self.error = True, error
        if self.queue.empty():
            self.queue.put_nowait(_WAKE)

    async def messages(self) -> AsyncIterator[ps_pb2.UpdateBatch]:
        while True:
            if self.closed and self.queue.empty():
                if self.error is not None:
                    raise self.error
                return
            message = await self.queue.get()
            if message is _WAKE:
                continue
            self._taken += 1
            if self._taken >= FEED_MESSAGES // 2 and not self.closed:
                self._give_credit(self.stream_id, self._taken)
                self._taken = 0
            yield message


def table_status(end: ps_pb2.TableStreamEnd) -> grpc.aio.AioRpcError:
    """The error a table's own Subscribe call would have raised, for its TableStreamEnd."""
    code = _CODES.get(end.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=end.message)


class ShardStreams:
    """Feeds every follower of one training shard (one ShardFollower per table, all of `shard`,
    built over the same channel or pair) from one SubscribeTables call at a time."""

    def __init__(self, followers: list[ShardFollower]) -> None:
        if not followers or len({f.shard for f in followers}) != 1:
            raise ValueError("ShardStreams: followers of exactly one shard")
        self.followers = followers
        self.shard = followers[0].shard
        self._feeds: dict[str, _Feed] = {}
        self._subscribe: dict[str, ps_pb2.SubscribeRequest] = {}  # by table, not yet written on the call
        self._stop: list[int] = []  # stream ids
        self._credit: dict[int, int] = {}  # stream id -> messages to give back
        self._next_stream_id = 1
        self._outbox = asyncio.Event()  # set while _subscribe, _stop or _credit has something
        self._per_table = False  # the shard answered UNIMPLEMENTED

    async def run(self) -> None:
        """Follows until cancelled; never raises for a shard that is down or misbehaves."""
        tasks = [asyncio.create_task(self._calls())]
        tasks += [asyncio.create_task(f.run(self.subscribe)) for f in self.followers]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def subscribe(self, request: ps_pb2.SubscribeRequest) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """One table's stream (a follower's Subscribe): its request goes out on the shard's call."""
        if self._per_table:
            return self._own_call(request)
        name = request.table
        request.stream_id, self._next_stream_id = self._next_stream_id, self._next_stream_id + 1
        feed = _Feed(request.stream_id, self._give_credit)
        old = self._feeds.get(name)
        if old is not None:
            old.close(None)
        self._feeds[name] = feed
        self._subscribe.pop(name, None)  # (re)inserted last: written in the order they came
        self._subscribe[name] = request
        self._outbox.set()
        return self._messages(name, feed)

    async def _messages(self, name: str, feed: _Feed) -> AsyncIterator[ps_pb2.UpdateBatch]:
        try:
            async for message in feed.messages():
                yield message
        finally:
            if self._feeds.get(name) is feed:  # its follower left (an error of its own): stop it there
                del self._feeds[name]
                self._subscribe.pop(name, None)
                if not feed.closed:
                    self._stop.append(feed.stream_id)
                    self._outbox.set()

    def _give_credit(self, stream_id: int, messages: int) -> None:
        self._credit[stream_id] = self._credit.get(stream_id, 0) + messages
        self._outbox.set()

    async def _own_call(self, request: ps_pb2.SubscribeRequest) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """A Subscribe call of the table's own (a shard without SubscribeTables); UNAVAILABLE
        moves every follower to the other of the pair, as the end of a shared call does."""
        lead = self.followers[0]
        side = lead.side
        try:
            async for message in lead.stub.Subscribe(request):
                yield message
        except grpc.aio.AioRpcError as err:
            if switches_side(err) and lead.side == side:
                for f in self.followers:
                    f.use_side(1 - side)
            raise

    async def _calls(self) -> None:
        """One call after another: each opens when a follower subscribes and none is open."""
        while not self._per_table:
            await self._outbox.wait()
            stub = self.followers[0].stub
            call = stub.SubscribeTables()
            writer = asyncio.create_task(self._write(call))
            try:
                error = await self._read(call)
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                call.cancel()
            # Every stream of the call ends with its status; their followers subscribe again.
            feeds, self._feeds = self._feeds, {}
            self._subscribe, self._stop, self._credit = {}, [], {}
            self._outbox.clear()
            for feed in feeds.values():
                feed.close(error if isinstance(error, grpc.aio.AioRpcError) else None)
            if isinstance(error, grpc.aio.AioRpcError):
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("shard %d does not serve SubscribeTables: a Subscribe call a table", self.shard)
                    self._per_table = True
                elif switches_side(error):
                    side = 1 - self.followers[0].side
                    for f in self.followers:
                        f.use_side(side)

    async def _write(self, call) -> None:
        """Writes the followers' subscribes and stops as they come, together when they come together."""
        while True:
            await self._outbox.wait()
            credit = [ps_pb2.StreamCredit(stream_id=i, messages=n) for i, n in self._credit.items()]
            request = ps_pb2.SubscribeTablesRequest(
                subscribe=self._subscribe.values(), stop=self._stop, window=FEED_MESSAGES, credit=credit
            )
            self._subscribe, self._stop, self._credit = {}, [], {}
            self._outbox.clear()
            await call.write(request)

    async def _read(self, call) -> BaseException | None:
        """Hands the call's messages to their tables' feeds and ends the streams it says ended,
        until the call ends; returns its error (None: the shard ended it without one)."""
        try:
            async for reply in call:
                for batch in reply.batches:
                    feed = self._feeds.get(batch.table)
                    if feed is not None and feed.stream_id == batch.stream_id:  # else stopped or replaced
                        if feed.queue.qsize() >= FEED_MESSAGES:  # never waits: one table must not hold the call
                            raise ValueError(f"SubscribeTables: table {batch.table!r} sent beyond its credit")
                        feed.queue.put_nowait(batch)
                for end in reply.ended:
                    feed = self._feeds.get(end.table)
                    if feed is not None and feed.stream_id == end.stream_id:
                        del self._feeds[end.table]
                        feed.close(table_status(end))
        except grpc.aio.AioRpcError as err:
            return err
        except ValueError as err:  # the shard broke the protocol: a new call
            log.error("shard %d: %s", self.shard, err)
            return err
        return None
