"""Follows one training shard's Subscribe stream for one table and applies it to the replica.

    connect ── Subscribe(from_version = served version, incarnation) ──> ranges, in version order
       ^            | FAILED_PRECONDITION (log gap, shard restarted, version went back)
       |            v
       |       Subscribe(full_sync): rows built into a fresh ShardRows, swapped in at `last`
       | UNAVAILABLE / stream ends: mark disconnected (stale after the threshold), back off, retry
       +──────────────────────────────────────────────────────────────────────────────────────

Rows travel as the PS table stores them (SubscribeRequest.stored_rows): a replica whose
storage_dtype is the table's storage keeps them bit for bit, another decodes and re-encodes.

Lookups keep reading the current ShardRows throughout: a dead shard leaves the last rows in place,
and a resync is invisible until its copy is complete. A range that does not start at the served
version (a gap the stream itself shows) is refused and forces a full resync too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from ps import wire
from ps.rpc import ps_pb2, ps_pb2_grpc
from serving.cut import ModelCut
from serving.cut_follow import follow_committed
from serving.metrics import ServingMetrics
from serving.store import ShardRows, TableReplica

log = logging.getLogger("embps.serving")

BACKOFF_START_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 1.0
# A message on a connection refreshes its other streams' last message at most this often.
LINK_REFRESH_SECONDS = 0.25


# Opens one table's stream: a Subscribe call, or the table's part of a SubscribeTables call.
Subscribe = Callable[[ps_pb2.SubscribeRequest], AsyncIterator[ps_pb2.UpdateBatch]]


def switches_side(error: grpc.aio.AioRpcError) -> bool:
    """A stream's end after which a follower with a standby tries the other of the pair."""
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class StreamGapError(Exception):
    """A range of the stream does not continue the served version: the replica must resync."""


@dataclass
class FollowerStatus:
    """What the health details and metrics report about one (table, shard) stream."""

    connected: bool = False
    last_message: float = 0.0  # time.monotonic() of the last message (or of the follower's start)
    num_resyncs: int = 0
    last_error: str = ""


class ConnectionLink:
    """The followers that may stream over one channel (a training shard, or its standby). Their
    streams are one heartbeat group (ps.proto SubscribeRequest.heartbeat_group, `group`): on an
    idle shard only one of them hears from it, so a message on any stream of the link is news
    that the shard and the connection are alive for all of them. A follower's own stream still
    decides whether it is connected (its first message; an error ends that)."""

    def __init__(self) -> None:
        self.group = uuid.uuid4().hex
        self.followers: list[ShardFollower] = []
        self._refreshed = 0.0

    def heard(self, now: float) -> None:
        """A message arrived on one of the connection's streams (at time.monotonic() `now`)."""
        if now - self._refreshed < LINK_REFRESH_SECONDS:
            return
        self._refreshed = now
        for follower in self.followers:
            if follower.link is self:
                follower.heard_on_link(now)


class ShardFollower:
    """Keeps replica.shards[shard] in step with table `replica.name` on the PS shard at `channel`."""

    def __init__(
        self,
        replica: TableReplica,
        shard: int,
        channel: grpc.aio.Channel,
        metrics: ServingMetrics,
        *,
        cut: ModelCut | None = None,
        with_dense: bool = False,
        standby_channel: grpc.aio.Channel | None = None,
        link_changed: asyncio.Event | None = None,
        links: dict[int, ConnectionLink] | None = None,
    ) -> None:
        """cut: consistency = "step" (serving/cut_follow.py); with_dense: this stream also brings
        the dense tower (one follower of shard 0). standby_channel: the shard's standby. link_changed:
        set whenever this stream goes down or comes back (the replica's monitor then looks at once). The stream
        goes to the other of the pair after UNAVAILABLE; a promoted standby has the primary's
        incarnation, rows and update log, so the follower continues from its served version there
        (ps/shard/replication.py). links: the replica's ConnectionLink of each channel (by id),
        shared by the followers of that channel; None: links of this follower's own."""
        self.cut = cut
        self.with_dense = with_dense
        self.replica = replica
        self.shard = shard
        links = links if links is not None else {}
        self._pair: list[tuple[ps_pb2_grpc.ParameterServerStub, ConnectionLink]] = []
        for c in (channel, standby_channel):
            if c is not None:
                if id(c) not in links:
                    links[id(c)] = ConnectionLink()
                link = links[id(c)]
                link.followers.append(self)
                self._pair.append((ps_pb2_grpc.ParameterServerStub(c), link))
        self.stub, self.link = self._pair[0]
        self.metrics = metrics
        self.status = FollowerStatus(last_message=time.monotonic())
        self._labels = (replica.name, str(shard))
        self._need_full_sync = False
        self._mid_range = False  # a range is being written into the served rows, its last message not yet in
        self._link_changed = link_changed
        self._report_link()

    def _report_link(self) -> None:
        """Tells the native store the stream's state (the gate's replies carry `stale` from it)."""
        self.replica.set_link(self.shard, self.status.connected, self.status.last_message)

    @property
    def rows(self) -> ShardRows:
        return self.replica.shards[self.shard]

    def stale(self, threshold_seconds: float) -> bool:
        """True while the stream is down or has been silent for more than threshold_seconds."""
        silent = time.monotonic() - self.status.last_message
        return not self.status.connected or silent > threshold_seconds

    async def run(self, subscribe: Subscribe | None = None) -> None:
        """Follows until cancelled; never raises for a shard that is down or misbehaves. Each
        stream is subscribe(request) (serving/shard_streams.py: the table's part of the shard's
        one call, which also moves to the other of a pair), by default a Subscribe call of its own."""
        pause = BACKOFF_START_SECONDS
        while True:
            error = await self.follow_once(subscribe or self.stub.Subscribe)
            if subscribe is None and isinstance(error, grpc.aio.AioRpcError) and switches_side(error):
                self.use_side(1 - self.side)
            pause = await self.back_off(pause, error)

    async def follow_once(self, subscribe: Subscribe) -> BaseException | None:
        """One stream, subscribe(request) giving its messages, until it ends: returns what ended
        it (None: the stream just ended), status and flags set (a resync next after a gap)."""
        error: BaseException | None = None
        try:
            await self._follow(subscribe)
            self.status.last_error = "stream ended"
        except grpc.aio.AioRpcError as err:
            error = err
            self.status.last_error = f"{err.code().name}: {err.details()}"
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.info("table %s shard %s: %s; resyncing", *self._labels, self.status.last_error)
                self._need_full_sync = True
        except StreamGapError as err:
            error = err
            self.status.last_error = str(err)
            log.warning("table %s shard %s: %s; resyncing", *self._labels, err)
            self._need_full_sync = True
        except (ValueError, TypeError) as err:  # a message that does not decode (dim, lengths)
            error = err
            self.status.last_error = f"bad message: {err}"
            log.error("table %s shard %s: %s", *self._labels, self.status.last_error)
            self._need_full_sync = True
        self.status.connected = False
        self._report_link()
        self._changed()
        return error

    @property
    def side(self) -> int:
        """Which of the pair the follower talks to: 0 the shard, 1 its standby."""
        return 0 if self.stub is self._pair[0][0] else 1

    def use_side(self, side: int) -> None:
        """Talk to the shard (0) or its standby (1) from the next stream on; one of a pair stays put."""
        self.stub, self.link = self._pair[side % len(self._pair)]

    async def back_off(self, pause: float, error: BaseException | None) -> float:
        """Waits before the next stream; returns the wait after that. Talking a moment ago (a shard
        that just went, its standby about to take over): retry soon, on the other of the pair if
        there is one. Down for longer (both of a pair too): back off. A resync starts soon."""
        if self.status.last_message > time.monotonic() - BACKOFF_MAX_SECONDS or (
            isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.FAILED_PRECONDITION
        ):
            pause = BACKOFF_START_SECONDS
        await asyncio.sleep(pause)
        return min(2 * pause, BACKOFF_MAX_SECONDS)

    def mark_message(self) -> None:
        """A message arrived: the stream is connected and talking, and so is its connection."""
        came_back = not self.status.connected
        self.status.connected = True
        self.status.last_message = now = time.monotonic()
        self._report_link()
        self.link.heard(now)
        if came_back:
            self._changed()

    def heard_on_link(self, now: float) -> None:
        """Another stream of this follower's link brought a message at `now`: a connected stream
        counts as talking (an idle shard sends one heartbeat stream a link, ConnectionLink)."""
        if self.status.connected:
            self.status.last_message = now
            self._report_link()

    def _changed(self) -> None:
        if self._link_changed is not None:
            self._link_changed.set()

    def count_resync(self, rows: ShardRows) -> None:
        """A full copy is complete (`rows`)."""
        self._need_full_sync = False
        self.status.num_resyncs += 1
        self.metrics.resyncs.labels(*self._labels).inc()
        log.info("table %s shard %s: full copy of %d rows", *self._labels, rows.size)

    async def _follow(self, subscribe: Subscribe) -> None:
        if self.cut is not None:
            await follow_committed(self, self.cut, self.with_dense, subscribe)
            return
        rows = self.rows
        # Rows loaded from an export carry a version but no incarnation: the shard may since have
        # restarted from an older snapshot and reached that version with other rows, so the first
        # contact takes a full copy rather than risk mixing two histories.
        full = self._need_full_sync or (rows.incarnation == 0 and rows.version > 0)
        request = ps_pb2.SubscribeRequest(
            table=self.replica.name, from_version=rows.version, incarnation=rows.incarnation, full_sync=full,
            stored_rows=True, heartbeat_group=self.link.group,
        )
        building: ShardRows | None = None
        acks: list[ps_pb2.VersionAck] = []
        observed = False  # this stream's gauges set once; after that only when the version moves
        self._mid_range = False
        try:
            async for batch in subscribe(request):
                self.mark_message()
                if batch.reset:
                    building = ShardRows(self.replica.dim, self.replica.dtype)
                target = building if building is not None else self.rows
                if batch.from_version != target.version and not (building is not None or batch.reset):
                    raise StreamGapError(
                        f"range ({batch.from_version}, {batch.to_version}] does not follow served version "
                        f"{target.version}"
                    )
                if target.incarnation and batch.incarnation != target.incarnation:
                    raise StreamGapError(
                        f"incarnation {batch.incarnation} differs from the served {target.incarnation}"
                    )
                self._mid_range = building is None and not batch.last
                await self._apply(target, batch)
                acks.extend(batch.acks)
                if not batch.last:
                    continue
                changed = target.version != batch.to_version or building is not None or bool(acks) or not observed
                target.version = batch.to_version
                target.incarnation = batch.incarnation
                if building is not None:
                    self.replica.replace_shard(self.shard, building)
                    building = None
                    self._need_full_sync = False
                    self.status.num_resyncs += int(full)
                    self.metrics.resyncs.labels(*self._labels).inc(int(full))
                    log.info("table %s shard %s: full copy of %d rows at version %d", *self._labels, target.size,
                             target.version)
                if changed:  # not for a heartbeat: same version, nothing acknowledged
                    self._observe(target, acks)
                    observed = True
                acks = []
        finally:
            # Part of a range written into the served rows before they had a known history
            # (incarnation 0): the shard may restart as another incarnation before the range
            # ends, and the next stream, unchecked, would go on over the old one's rows.
            if self._mid_range and self.rows.incarnation == 0:
                self._need_full_sync = True

    async def _apply(self, target: ShardRows, batch: ps_pb2.UpdateBatch) -> None:
        """Writes one message's rows and deletions (off the event loop when it is large)."""
        if not batch.keys and not batch.deleted_keys:
            return  # a heartbeat, or the end of a range
        keys = wire.decode_keys(batch.keys)
        deleted = wire.decode_keys(batch.deleted_keys, "deleted_keys")
        if keys.shape[0] == 0 and deleted.shape[0] == 0:
            return
        storage, values = wire.decode_stored_rows(batch.values, keys.shape[0], self.replica.dim, batch.dtype)

        def write() -> None:
            if keys.shape[0]:
                target.upsert_rows(keys, values, storage)
            if deleted.shape[0]:
                target.erase(deleted)

        if keys.shape[0] + deleted.shape[0] <= 2048:
            write()
        else:
            await asyncio.to_thread(write)
        self.metrics.applied_rows.labels(*self._labels).inc(keys.shape[0])

    def _observe(self, target: ShardRows, acks: list[ps_pb2.VersionAck]) -> None:
        now = time.time()
        staleness = self.metrics.staleness.labels(self._labels[1])
        for ack in acks:
            staleness.observe(max(0.0, now - ack.ack_time))
        self.metrics.version.labels(*self._labels).set(target.version)
        self.metrics.rows.labels(*self._labels).set(target.size)
