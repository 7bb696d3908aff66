"""The gRPC server of one PS shard (grpc.aio): ParameterServer + health + reflection + /metrics.

    embps ps --config job.toml --shard I [--update-log-keys N] [--stream-stall-seconds S]
             [--subscribe-memory-bytes B]

Table operations are serialised (the tables are not thread-safe): small calls run inline on the
event loop, large ones on one tables thread so that the loop stays free to accept calls (see
`ParameterServerServicer.run`).
The port is bound at once: while a snapshot is restored the shard answers NOT_SERVING and refuses
calls with UNAVAILABLE, saying how far the restore got (ps/shard/startup.py); a restore step that
cannot be used exits with EXIT_SNAPSHOT_UNUSABLE.
Every call goes through the one call wrapper of ps/process/calls.py (errors become status codes,
`ShardCallSite` records the metrics); servicer methods hold no try/except. SIGTERM marks the
shard NOT_SERVING, lets in-flight calls finish (`grace` seconds), refuses new ones with
UNAVAILABLE and exits 0.

Subscribe streams (serving replicas) wait on a per-table event that every Push sets; a stream
takes its range's entries of the update log through `run` like any call, merges them off the
lock, and reads each message's rows through `run` as it makes the message, so it never sees a
half-applied push, and a push waits behind one message's reads, never a whole range.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ps import native, wire
from ps.job_config import JobConfig, load_job_config
from ps.process.calls import (
    DEFAULT_STREAM_STALL_SECONDS,
    CallSite,
    UndecodableRequests,
    current_stall_watch,
    stream_call,
    unary_call,
)
from ps.rpc import ps_pb2, ps_pb2_grpc, replication_pb2, snapshot_pb2, snapshot_pb2_grpc
from ps.security import add_port, ps_port_policy, server_interceptors
from ps.shard import commits
from ps.shard.commit_stream import committed_stream
from ps.shard.heartbeats import HeartbeatRoster, StreamHeartbeats
from ps.shard.metrics import UNKNOWN_TABLE, ShardMetrics, ShardReading, TableReading
from ps.shard.range_messages import ROW_KINDS, piece_fields, range_parts, range_pieces
from ps.shard.startup import (
    EXIT_CONFIG_REFUSED,
    EXIT_SNAPSHOT_UNUSABLE,
    DeferredServices,
    RestoreProgress,
    run_in_daemon_thread,
)
from ps.shard.stream_turns import StreamTurns
from ps.shard.table_streams import TableStreams, TableWatch
from ps.shard.update_log import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_KEYS, LogGapError, LogRange, merge_entries
from ps.table.row_store import device_unavailable_reason

log = logging.getLogger("embps.ps")


SERVICE_NAME = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name


SNAPSHOT_SERVICE_NAME = snapshot_pb2.DESCRIPTOR.services_by_name["SnapshotControl"].full_name
# Every method a shard's port may serve (ParameterServer, SnapshotControl, a pair's Replication).
SHARD_METHODS = frozenset(
    f"/{service.full_name}/{method.name}"
    for service in (
        ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
        snapshot_pb2.DESCRIPTOR.services_by_name["SnapshotControl"],
        replication_pb2.DESCRIPTOR.services_by_name["Replication"],
    )
    for method in service.methods
)


DRAIN_WINDOW_SECONDS = 0.3


_MESSAGE_SLACK = 1 << 16  # protobuf framing around the bulk bytes


INLINE_WORK_BYTES = 1 << 20  # calls moving more than this run off the event loop (about 0.2 ms of work)
READING_PATIENCE_S = 0.5  # how long a scrape waits for the table call in progress (read_tables)


HEARTBEAT_SECONDS = 0.5  # an idle Subscribe stream says "still here, still at version v" this often


# A Subscribe message carries at most this many bytes of keys and rows (or message_limit_bytes,
# when smaller): what a stream holds while its subscriber has not taken it (the message, its
# serialised copies) stays a few MiB whatever the table's size, the event loop builds one in about
# a millisecond, and a client with gRPC's default 4 MiB receive limit takes it, framing included.
# At the message limit (64 MiB by default) 30 subscribers that stopped reading made a 2M-row
# table's shard hold 8 GiB, and its pushes waited 0.9 s for the loop.
STREAM_MESSAGE_BYTES = 4_000_000


# Full copies (Subscribe with full_sync) that run at once on a shard; more wait their turn. Each
# holds the table's key list (8 bytes a row) and a change feed that every push updates.
MAX_FULL_COPIES = 4
# A running full copy whose subscriber has left a message untaken this long (or its stream's stall
# limit, if shorter) is ended when another copy waits for a turn (ps/shard/stream_turns.py).
FULL_COPY_PATIENCE_SECONDS = 5.0

# The bytes that a shard's Subscribe ranges hold at once, all streams together (`embps ps
# --subscribe-memory-bytes`): a live range its keys and the message it is sending (its rows are
# read a message at a time), the end of a full copy and a committed range their keys and rows.
# A stream starts a range only once that fits, and holds it until its subscriber has taken the
# range's messages; the others wait their turn, and
# one whose subscriber stalls gives its turn to a waiting one after FULL_COPY_PATIENCE_SECONDS
# (ps/shard/stream_turns.py). Before, each stream read its range whenever it was woken: 100
# subscribers from version 0 of a 150,000-row table (dim 64, 37.8 MiB of keys and rows) that read
# nothing grew its shard by 3 GB in 12 s, a copy of the rows per stream.
SUBSCRIBE_MEMORY_BYTES = 1 << 30
# A live range of at most this many keys and log entries is merged where its entries are read,
# serialised with the table calls (a push or a few: well under a millisecond); a larger one off the
# lock, on a thread of its own. The merge's Python runs per entry: 16,000 one-key pushes took 50 ms
# on the event loop, and 150 Subscribes from an old version held every other call for seconds.
INLINE_MERGE_KEYS = 16384
INLINE_MERGE_ENTRIES = 64
# What merging a range takes at its peak, per key of the log entries merged (np.unique's sorted
# copies and indices beside the concatenated keys): 48.5 measured over 819,000 keys.
MERGE_BYTES_PER_KEY = 56


# A connection whose peer takes no byte for this long is closed, and what the shard's replies to it
# held is freed: gRPC's keepalive timeout, which it also sets as the socket's TCP_USER_TIMEOUT, the
# bound the kernel puts on data unacknowledged or stuck behind a zero window. A stopped or hung
# worker with 20 lookups of 25 MB in flight had its shard hold 0.9 GB until then. (A client that
# keeps reading but opens no HTTP/2 window is not bounded so; see docs/reliability.md.)
FROZEN_PEER_SECONDS = 20

# The most seconds --grace and --stream-stall-seconds take: a day; more is a typo, not a plan.
MAX_FLAG_SECONDS = 86400.0

@dataclass(frozen=True)
class _Rows:
    """Rows as a Subscribe message carries them: dtype (ps_pb2.DType), data (n, row bytes) uint8."""

    dtype: int
    data: np.ndarray


_PUSH_METHODS = frozenset({"Push", "PushBatch", "PushMulti"})
# The table calls whose keys and gradients are read where they arrived (ps/bulk_messages.py).
_BULK_FIELDS = {
    "/embps.v1.ParameterServer/Lookup": ("keys",),
    "/embps.v1.ParameterServer/LookupMulti": ("keys",),
    "/embps.v1.ParameterServer/Push": wire.PUSH_BULK_FIELDS,
    "/embps.v1.ParameterServer/PushMulti": wire.PUSH_BULK_FIELDS,
}


def payload_bytes(request, trust_sizes: bool, sizes: np.ndarray | None = None) -> tuple[int, int]:
    """(key bytes, gradient bytes) of one table request (Lookup, Push, LookupMulti, PushMulti, a
    part of a batch; (0, 0) for Stats), the gradients' size taken from the keys and dims when
    trust_sizes: every read of a bytes field of a protobuf (upb) message copies the field (0.3 ms
    for the 5 MB of gradients of a large PushMulti on this VM), and the call reads them once
    already, to apply them.

    trust_sizes: for an estimate, or once the call was answered OK (its gradients were float32 of
    that size; a repeated push id is answered with the first push's answer, before any check, and
    counted as that push was). Otherwise the gradients are read and counted as they came.
    sizes: a multi-table request's table_sizes, where the caller has them already.
    """
    fields = request.DESCRIPTOR.fields_by_name  # not hasattr: it reads (copies) the field
    keys = len(request.keys) if "keys" in fields else 0
    if "grads" not in fields:
        return keys, 0
    if not trust_sizes:
        return keys, len(request.grads)
    if "offsets" in fields:
        if sizes is None:
            sizes = table_sizes(request.offsets, len(request.keys) // 8)
        dims = np.asarray(request.dims, dtype=np.float64)
        n = min(sizes.shape[0], dims.shape[0])
        return keys, 4 * int(np.dot(sizes[:n].astype(np.float64), dims[:n]))  # exact below 2^53, as checked sizes are
    return keys, keys // 8 * request.dim * 4


def table_sizes(offsets, num_keys: int) -> np.ndarray:
    """The keys of each table (T,) uint64 of a multi-table request's offsets (T + 1,) as they came,
    of its num_keys keys: unchecked when the call failed or repeated a push id, so the offsets are
    bounded by the keys the request carries and a step back counts 0, never an error (these only
    feed metrics). Taken as they came, one request's offset of 2^62 put the table's keys counter
    there for good (a float64 counter past 2^53 no longer moves by a call's keys)."""
    bounds = np.maximum.accumulate(np.minimum(np.asarray(offsets, dtype=np.uint64), np.uint64(num_keys)))
    return bounds[1:] - bounds[:-1]


def _tables_call(method: str) -> Callable:
    """A synchronous table method `fn(self, request) -> reply` as the RPC `method`: serialised
    through `run`, answered by the one call wrapper (ps/process/calls.py)."""

    def decorate(fn: Callable) -> Callable:
        async def on_tables(self: ParameterServerServicer, request):
            replication = self.replication
            if replication is None or method not in _PUSH_METHODS:
                return await self.run(fn, request)

            def applied(servicer: ParameterServerServicer, request):
                return fn(servicer, request), replication.sequence  # the last message this call forwarded

            # forward() sends the push on the replication link (the standby applies it while this
            # process does: inline when small, as without a standby); its ack settles it on the loop.
            reply, sequence = await self.run(applied, request)
            await replication.settle(sequence)  # acknowledged means applied on the standby too
            return reply

        return unary_call(method)(functools.wraps(fn)(on_tables))

    return decorate


class ShardCallSite(CallSite):
    """How the call wrapper labels and records this shard's calls (both services of its port)."""

    def __init__(self, shard, metrics: ShardMetrics) -> None:
        super().__init__(f"shard {shard.index}", log)
        self.tables = shard.tables
        self.metrics = metrics
        self.fence: Callable[[], None] | None = None  # a shard with a standby: ps/shard/replication.py
        # A shard with a standby: (raises unless this process's epoch is at least a client's of its lineage,
        # its epoch and lineage).
        self.epoch_fence: tuple[Callable[[int, str | None], None], Callable[[], tuple[int, str]]] | None = None

    @property
    def max_multi_tables(self) -> int:
        """The most tables one LookupMulti / PushMulti may name: more than the shard holds repeat one
        or name one it lacks, which the call refuses anyway (a batch's bound, if the shard holds fewer)."""
        return max(len(self.tables), wire.MAX_BATCH_PARTS)

    def check_open(self) -> None:
        super().check_open()
        if self.fence is not None:
            self.fence()

    def check_call(self, context: grpc.aio.ServicerContext) -> None:
        """Every client call carries the newest epoch its client has seen (metadata wire.EPOCH_METADATA_KEY) and
        its lineage (wire.LINEAGE_METADATA_KEY), every reply this process's: a deposed primary refuses a
        client that has already met its successor, whatever its own view of its lease (DESIGN.md section 10)."""
        if self.epoch_fence is None:
            return
        check, current = self.epoch_fence
        epoch, lineage = current()
        trailing = ((wire.EPOCH_METADATA_KEY, str(epoch)),)
        context.set_trailing_metadata(trailing + (((wire.LINEAGE_METADATA_KEY, lineage),) if lineage else ()))
        theirs: int | None = None
        their_lineage: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == wire.EPOCH_METADATA_KEY:
                # Not a uint64 in ASCII digits: no epoch (int() takes Unicode digits and refuses 4,300+ of them).
                theirs = int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else 0
            elif key == wire.LINEAGE_METADATA_KEY:
                their_lineage = "" if value == wire.NO_LINEAGE else value  # an epoch of a record without one
        if theirs is not None:
            check(theirs, their_lineage)

    def table_label(self, request) -> str:
        """The request's table; names the shard does not hold share one label, no table is ""."""
        return self.table_name_label(getattr(request, "table", None))

    def table_name_label(self, name: str | None) -> str:
        if name is None:
            return ""
        return name if name in self.tables else UNKNOWN_TABLE

    def record(self, method: str, table: str, code: grpc.StatusCode, seconds: float, request) -> None:
        m = self.metrics
        self.series(m.requests, table, method, code.name).inc()
        self.series(m.duration, table, method).observe(seconds)
        if request is None:
            return
        answered = code == grpc.StatusCode.OK
        if method in ("Lookup", "Push"):
            keys, grads = payload_bytes(request, answered)
            m.request_keys.add(table, method, keys // 8)
            self.series(m.request_bytes, table, method).inc(keys + grads)
        elif method in ("LookupMulti", "PushMulti"):
            try:
                wire.check_multi_shape(request, self.max_multi_tables)
            except ValueError:  # refused by its shape: its fields are not read here either (their bytes count)
                self.series(m.request_bytes, table, method).inc(len(request.keys) + len(getattr(request, "grads", b"")))
                return
            sizes = table_sizes(request.offsets, len(request.keys) // 8)
            names = list(request.tables)
            m.request_keys.add_tables(method, names, sizes.tolist(), self.tables)
            self.series(m.request_bytes, table, method).inc(sum(payload_bytes(request, answered, sizes)))
        elif method in ("LookupBatch", "PushBatch"):
            if len(request.requests) > wire.MAX_BATCH_PARTS:
                return  # refused before its parts were read; visiting them here took seconds of the loop
            for part in request.requests:
                part_table = self.table_name_label(part.table)
                keys, grads = payload_bytes(part, answered)
                m.request_keys.add(part_table, method, keys // 8)
                self.series(m.request_bytes, part_table, method).inc(keys + grads)


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    """Lookup / Push / Stats over one Shard. The decorated methods run through `run`."""

    def __init__(self, shard, metrics: ShardMetrics, subscribe_memory_bytes: int = SUBSCRIBE_MEMORY_BYTES) -> None:
        self.shard = shard
        self.metrics = metrics
        self.call_site = ShardCallSite(shard, metrics)
        self.replication = None  # ps/shard/replication.py, when the shard has a standby
        self.snapshots = None  # the shard's SnapshotControl (ps/shard/snapshot_service.py), once ShardPort.open ran
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tables")
        self._offloaded = 0
        # Held by whichever thread runs a table call: the loop (inline), the tables thread, or a
        # caller of run_blocking. Calls still start in order: none runs inline while one is offloaded.
        self._tables_lock = threading.Lock()
        self.loop = asyncio.get_running_loop()
        self._changed = {name: asyncio.Event() for name in shard.tables}  # pushes: live streams
        self._committed = {name: asyncio.Event() for name in shard.tables}  # commits only: committed streams
        self._subscribed = 0  # Subscribe streams open (wake_subscribers)
        self._table_calls: set[TableStreams] = set()  # SubscribeTables calls open (begin_drain)
        self.full_copies = StreamTurns(
            MAX_FULL_COPIES, FULL_COPY_PATIENCE_SECONDS, "another full copy waited for this one's turn"
        )
        self.heartbeats = HeartbeatRoster(self.notify, handoff_seconds=HEARTBEAT_SECONDS / 2)
        self.ranges = StreamTurns(
            subscribe_memory_bytes, FULL_COPY_PATIENCE_SECONDS, "other streams waited for the memory its range holds"
        )
        index = str(shard.index)  # read when /metrics is scraped
        metrics.full_copies.labels(index, "running").set_function(lambda: self.full_copies.running)
        metrics.full_copies.labels(index, "waiting").set_function(lambda: self.full_copies.waiting)
        metrics.range_memory.labels(index).set_function(lambda: self.ranges.held)
        metrics.ranges.labels(index, "holding").set_function(lambda: self.ranges.running)
        metrics.ranges.labels(index, "waiting").set_function(lambda: self.ranges.waiting)
        self._stream_bytes = min(shard.job.message_limit_bytes, STREAM_MESSAGE_BYTES)
        self._last_reading = ShardReading((), 0)
        metrics.tables.attach(self.read_tables)

    async def run(self, fn: Callable, request):
        """fn(self, request), serialised with every other table call.

        Small calls run inline on the event loop (a thread hop costs ~0.15 ms, as much as the
        work). Large ones go to the one tables thread, so the loop keeps accepting calls while
        they run: gRPC drains only calls it has handed to a handler, and cancels the rest at
        shutdown. Small calls also queue there while a large one is in progress, keeping order.
        """
        if hasattr(request, "offsets"):  # a multi-table request: its shape before payload_bytes reads it
            wire.check_multi_shape(request, self.call_site.max_multi_tables)
        parts = request.requests if hasattr(request, "requests") else [request]
        if len(parts) > wire.MAX_BATCH_PARTS:  # before the loop below, which visits each one
            raise ValueError(
                f"requests: at most {wire.MAX_BATCH_PARTS} parts in one batch, got {len(parts)} "
                "(LookupMulti / PushMulti carry many tables in one request)"
            )
        work_bytes = wire.BATCH_PART_WORK_BYTES * len(parts) if len(parts) > 1 else 0
        for part in parts:  # the reply's rows, the request's keys and gradients
            keys, grads = payload_bytes(part, trust_sizes=True)
            work_bytes += keys // 8 * 4 * getattr(part, "dim", 0) + keys + grads
        return await self.run_call(functools.partial(fn, self, request), work_bytes)

    async def run_call(self, call: Callable[[], object], work_bytes: int):
        """call(), serialised with every other table call; inline when work_bytes is small (see run).

        `_offloaded` counts calls handed to the tables thread until that thread is done with them,
        not until their callers stop waiting: a cancelled caller (deadline, disconnect) leaves its
        call running there, and no inline call may start beside it.
        """
        if work_bytes <= INLINE_WORK_BYTES and self._offloaded == 0 and self._tables_lock.acquire(blocking=False):
            try:
                return call()
            finally:
                self._tables_lock.release()
        self._offloaded += 1
        future = self.executor.submit(self.run_blocking, call)
        future.add_done_callback(self._call_done)
        return await asyncio.wrap_future(future)

    def run_blocking(self, call: Callable[[], object]):
        """call() on the calling thread, serialised with every other table call: for a thread that is
        not the event loop (the tables thread; a standby's replication link, which would otherwise
        hand each call to the tables thread and wait for it: two thread wake-ups a push)."""
        with self._tables_lock:
            return call()

    def _call_done(self, _future) -> None:
        """On the tables thread (or the loop, for a call cancelled before it ran)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._release_offloaded)

    def _release_offloaded(self) -> None:
        self._offloaded -= 1

    def read_tables(self) -> ShardReading:
        """The tables' figures for a scrape (on the metrics server's thread), read under the lock
        every table call holds, so never beside a call that changes them. A call that holds it for
        longer than READING_PATIENCE_S (a state copy, a large restore) leaves the scrape the
        figures of the one before."""
        if not self._tables_lock.acquire(timeout=READING_PATIENCE_S):
            return self._last_reading
        try:
            shard = self.shard
            tables = tuple(
                TableReading(
                    name=name,
                    rows=table.size,
                    memory_bytes=shard.memory_bytes(name),
                    row_bytes=4 * table.width,
                    pending_keys=table.num_pending,
                    version=table.version,
                    admissions=table.num_admitted,
                    evictions=table.num_evicted,
                    pending_dropped=table.num_pending_dropped,
                )
                for name, table in shard.tables.items()
            )
            reading = ShardReading(tables, shard.ledger.num_bytes)
        finally:
            self._tables_lock.release()
        self._last_reading = reading
        return reading

    def notify(self, table: str) -> None:
        """Wakes every Subscribe stream of `table`, live and committed (call on the event loop): the
        drain, a stream that takes its connection's heartbeats over."""
        self.notify_pushed(table)
        self.notify_committed(table)

    def notify_pushed(self, table: str) -> None:
        """Wakes the live Subscribe streams of `table`: a push (on the event loop)."""
        event = self._changed[table]
        self._changed[table] = asyncio.Event()
        event.set()

    def notify_committed(self, table: str) -> None:
        """Wakes the committed Subscribe streams of `table`: a commit (on the event loop). Each kind
        of stream sends one kind of change: woken by the other's too, a stream went back to sleep,
        a wake per table a push or commit for nothing."""
        event = self._committed[table]
        self._committed[table] = asyncio.Event()
        event.set()

    def begin_drain(self) -> None:
        """Refuses new calls from now on and ends the Subscribe streams with UNAVAILABLE."""
        self.call_site.draining = True
        for table in list(self._changed):
            self.notify(table)
        for streams in self._table_calls:
            streams.wake()

    @_tables_call("Lookup")
    def Lookup(self, request: ps_pb2.LookupRequest) -> bytes:
        return self.shard.lookup_encoded(request)

    @_tables_call("LookupBatch")
    def LookupBatch(self, request: ps_pb2.LookupBatchRequest) -> ps_pb2.LookupBatchResponse:
        if request.requests:
            self.shard.check_lookup_replies(request.requests)
        return ps_pb2.LookupBatchResponse(responses=[self.shard.lookup(r) for r in request.requests])

    @_tables_call("PushBatch")
    def PushBatch(self, request: ps_pb2.PushBatchRequest) -> ps_pb2.PushBatchResponse:
        self.shard.check_pushes(request.requests)  # all or nothing, as PushMulti
        return ps_pb2.PushBatchResponse(responses=[self.apply_push(r) for r in request.requests])

    @_tables_call("Push")
    def Push(self, request: ps_pb2.PushRequest) -> ps_pb2.PushResponse:
        return self.apply_push(request)

    @_tables_call("LookupMulti")
    def LookupMulti(self, request: ps_pb2.MultiLookupRequest) -> bytes:
        return self.shard.lookup_multi(request)

    @_tables_call("PushMulti")
    def PushMulti(self, request: ps_pb2.MultiPushRequest) -> ps_pb2.MultiPushResponse:
        return self.apply_push_multi(request)

    def apply_push_multi(self, request: ps_pb2.MultiPushRequest) -> ps_pb2.MultiPushResponse:
        """One multi-table push (serialised by the caller), with its metrics and Subscribe wake-up."""
        response, changed = self._replicated("PushMulti", request, self.shard.push_multi)
        if response.duplicate:
            for table in request.tables:
                self.metrics.duplicate_pushes.labels(self.call_site.table_name_label(table)).inc()
        if changed:
            self.wake_subscribers(changed)
        return response

    def _replicated(self, method: str, request, apply: Callable, sealed_tables: tuple[str, ...] = ()):
        """apply(request) here, forwarded to the standby first when the shard has one (so that both
        apply it at once), with this process's answer handed to the comparison (ps/shard/replication.py).
        The answer is apply's result, or its first item when it returns a tuple."""
        sequence = self.replication.forward(method, request, sealed_tables) if self.replication is not None else 0
        if not sequence:
            return apply(request)
        try:
            result = apply(request)
        except Exception as exc:
            from ps.shard.replication import error_text

            self.replication.answered(sequence, error=error_text(exc))
            raise
        answer = result[0] if isinstance(result, tuple) else result
        self.replication.answered(sequence, answer.SerializeToString())
        return result

    @unary_call("Commit")
    async def Commit(self, request: ps_pb2.CommitRequest) -> ps_pb2.CommitResponse:
        # Reads the rows each table's step touched: off the loop when there may be many.
        keys = sum(self.shard.logs[n].keys_after(c.last_version) for n, c in self.shard.commits.items())
        work_bytes = keys * 64 + len(request.dense_state)
        # Not settled with the standby: a commit it missed (the primary died first) is covered by the
        # next one it gets, and every push of the step is on it already (ps/shard/commits.py).
        return await self.run_call(functools.partial(self.apply_commit, request), work_bytes)

    def apply_commit(self, request: ps_pb2.CommitRequest, sealed_tables: tuple[str, ...] | None = None):
        """Records a committed step (serialised by the caller; ps/shard/commits.py), forwarded to the
        standby in apply order with the tables whose rows are sealed. sealed_tables: a standby's,
        the primary's choice; None: the tables a committed stream follows now."""
        if sealed_tables is None:
            sealed_tables = commits.sealing_tables(self.shard)
        else:
            # The primary's subscribers fail over here: once promoted, this process goes on sealing
            # their tables before they reconnect (else a commit in between is incomplete for them).
            commits.mark_followed(self.shard, sealed_tables)
        response = self._replicated(
            "Commit", request, lambda r: commits.commit(self.shard, r, sealed_tables), sealed_tables
        )
        self.wake_subscribers(list(self.shard.tables), committed=True)
        return response

    def wake_subscribers(self, tables: list[str], committed: bool = False) -> None:
        """notify_many(tables, committed) on the event loop (from any thread), if a Subscribe stream
        is open: a push on a shard nobody follows (a standby, a job without serving) wakes no loop.
        A stream counts itself before it first reads a table's head version, and a push moves the
        head before it reads the count, so a stream either sees the push or is woken by it.
        committed: a commit (committed streams), else a push (live streams)."""
        if self._subscribed:
            self.loop.call_soon_threadsafe(self.notify_many, tables, committed)

    def notify_many(self, tables: list[str], committed: bool = False) -> None:
        """notify_committed() or notify_pushed() for each table: one hop to the event loop for a
        multi-table push or a commit."""
        wake = self.notify_committed if committed else self.notify_pushed
        for table in tables:
            wake(table)

    def apply_push(self, request: ps_pb2.PushRequest) -> ps_pb2.PushResponse:
        """One push on the tables (serialised by the caller), with its metrics and Subscribe wake-up."""
        response = self._replicated("Push", request, self.shard.push)
        if response.duplicate:
            self.metrics.duplicate_pushes.labels(request.table).inc()
        else:
            self.wake_subscribers([request.table])
        return response

    @_tables_call("Stats")
    def Stats(self, request: ps_pb2.StatsRequest) -> ps_pb2.StatsResponse:
        return self.shard.stats()

    @stream_call("Subscribe")
    async def Subscribe(self, request: ps_pb2.SubscribeRequest) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """Every change of the table after request.from_version (or all rows, full_sync), then live
        changes, merged while the subscriber is busy; heartbeats while idle. See ps.proto."""
        async for reply in self._table_stream(request):
            yield reply

    @stream_call("SubscribeTables")
    async def SubscribeTables(
        self, requests: AsyncIterator[ps_pb2.SubscribeTablesRequest]
    ) -> AsyncIterator[bytes]:
        """Tables' Subscribe streams, started and stopped by the requests, all over this one call
        (ps/shard/table_streams.py); replies are SubscribeTablesReply, encoded."""
        streams = TableStreams(
            self._table_stream, self.shard.table, self.call_site.check_open, self._stream_bytes,
            max(wire.MAX_BATCH_PARTS, 4 * len(self.shard.tables)), self._table_stream_ended,
        )
        self._table_calls.add(streams)
        try:
            async for reply in streams.replies(requests):
                yield reply
        finally:
            self._table_calls.discard(streams)

    def _table_stream_ended(self, name: str, code: grpc.StatusCode, seconds: float) -> None:
        """A table's stream of a SubscribeTables call ended: counted by table and code, as a
        Subscribe call's end is (the call's own end is counted under table "")."""
        self.call_site.record("SubscribeTables", self.call_site.table_name_label(name), code, seconds, None)

    async def _table_stream(self, request: ps_pb2.SubscribeRequest) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """The messages of one table's Subscribe (served alone, or in SubscribeTables)."""
        shard, name = self.shard, request.table
        table = shard.table(name)
        if request.incarnation and request.incarnation != shard.incarnation and not request.full_sync:
            raise LogGapError(
                f"table {name!r}: the subscriber's rows come from incarnation {request.incarnation} of shard "
                f"{shard.index}, this is {shard.incarnation} (the shard restarted); resync with full_sync"
            )
        subscribers = self.metrics.subscribers.labels(name, str(shard.index))
        subscribers.inc()
        self._subscribed += 1
        group = request.heartbeat_group
        watch = current_stall_watch()
        seat = self.heartbeats.join(watch.context.peer(), group, name) if group else None
        if seat is not None and isinstance(watch, TableWatch):  # a SubscribeTables stream, held for credit at times
            watch.on_hold = functools.partial(self.heartbeats.hold, seat)
        beats = StreamHeartbeats(self.heartbeats, seat, self.metrics.heartbeats.labels(name, str(shard.index)))
        try:
            stored = request.stored_rows
            if request.committed:
                with commits.followed(shard.commits[name]):  # its table's commits seal rows meanwhile
                    async for reply in committed_stream(self, request, beats):
                        yield reply
                return
            if request.full_sync:
                position = 0
                async for reply in self._full_copy(name, stored):
                    position = reply.to_version
                    yield reply
            else:
                position = request.from_version
                shard.log(name).check(position, name)
                if shard.logs[name].head_version == position:
                    # Nothing to send: a heartbeat at once tells the subscriber that the stream is up
                    # (a replica counts a shard whose stream has not spoken as stale).
                    yield self._batch(name, position, position, last=True)
                    beats.sent()
            row_bytes = self._row_bytes(table, stored)
            while True:
                self.call_site.check_open()
                changed = self._changed[name]
                if shard.logs[name].head_version == position:
                    if await self.heartbeat_due(changed, beats):
                        yield self._batch(name, position, position, last=True)
                        beats.sent()
                    continue
                keys = shard.logs[name].keys_after(position)
                # Charged with the merge's temporaries until the merged range is known (then resized).
                turn = self.ranges.pending(
                    current_stall_watch(), MERGE_BYTES_PER_KEY * keys + self._range_hold(0, keys, row_bytes)
                )
                try:
                    while (hold := await turn.wait(HEARTBEAT_SECONDS)) is None:
                        if beats.due():  # waiting for the memory, still at `position`
                            yield self._batch(name, position, position, last=True)
                            beats.sent()
                except BaseException:
                    turn.abandon()
                    raise
                try:
                    # The log's entries under the lock (references, no copy), merged off it, and
                    # each message's rows read only as it is made: a push waits behind one
                    # message's reads, never behind a whole range (a reconnecting replica's can
                    # be a million rows), and the stream holds the keys and one message's rows.
                    keys = shard.logs[name].keys_after(position)  # again: pushes came while it waited its turn
                    pushes = shard.logs[name].head_version - position
                    if keys <= INLINE_MERGE_KEYS and pushes <= INLINE_MERGE_ENTRIES:  # a live follower's range
                        changes = await self.run_call(functools.partial(shard.changes_after, name, position), keys * 8)
                    else:
                        read = functools.partial(self._log_entries, name, position)
                        entries = await self.run_call(read, 0)  # versions position + 1, ... (contiguous)
                        changes = await asyncio.to_thread(merge_entries, position, position + len(entries), entries)
                        del entries
                    touched, deleted = changes.touched_keys.shape[0], changes.deleted_keys.shape[0]
                    self.ranges.resize(hold, self._range_hold(touched + deleted, touched, row_bytes))
                    self.metrics.stream_range.labels(str(shard.index)).observe(changes.to_version - position)
                    async for reply in self._live_range(name, table, changes, stored):
                        yield reply
                finally:
                    self.ranges.release(hold)
                position = changes.to_version
        finally:
            subscribers.dec()
            self._subscribed -= 1
            if seat is not None:
                self.heartbeats.leave(seat)

    @staticmethod
    async def heartbeat_due(changed: asyncio.Event, beats: StreamHeartbeats) -> bool:
        """Waits for `changed` (a table's next change); True when, instead, the stream sends a
        heartbeat now: it sends them and has been idle for HEARTBEAT_SECONDS."""
        if not beats.due():
            await changed.wait()  # woken by its table, the drain, or when it takes the heartbeats over
            return False
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):  # not wait_for: tests/test_cancellation.py
                await changed.wait()
        except TimeoutError:
            return True
        return False

    async def _full_copy(self, name: str, stored: bool) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """Every row of table `name`, streamed: the keys are listed at version v0, their rows read
        a message at a time as the subscriber takes them (never a copy of the table), and what
        changed meanwhile follows, read from a change feed the table keeps for this copy. So the
        copy converges however long the subscriber takes, beyond the update log's window; the
        last message's to_version says where the live ranges continue. At most MAX_FULL_COPIES
        run at once; a later one waits, holding nothing, until one of them ends, or until the
        subscriber of one has left a message untaken for FULL_COPY_PATIENCE_SECONDS, which ends
        that copy (ps/shard/stream_turns.py)."""
        table = self.shard.table(name)
        turn = await self.full_copies.acquire(current_stall_watch())
        try:
            async for reply in self._copy_rows(name, table, stored):
                yield reply
        finally:
            self.full_copies.release(turn)

    async def _copy_rows(self, name: str, table, stored: bool) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """_full_copy's messages, once it is the copy's turn."""
        dim = table.dim
        version, keys, feed = await self.run_call(functools.partial(self._begin_copy, name), table.size * 16)
        try:
            row_bytes = self._row_bytes(table, stored)
            rows_per = max(1, self._stream_bytes // (8 + row_bytes))
            for i in range(0, keys.shape[0], rows_per):
                chunk = keys[i : i + rows_per]
                rows = await self.run_call(
                    functools.partial(self._read_rows, name, chunk, stored), chunk.shape[0] * (8 + row_bytes)
                )
                yield self._batch(
                    name, 0, version, dim=dim, reset=i == 0, last=False, dtype=rows.dtype,
                    keys=wire.encode_keys(chunk), values=rows.data.tobytes(),
                )
            # Off the event loop: the feed is the tables thread's to read, and it may hold many keys.
            # Its rows are read with it, in one call: the copy is then the table at its to_version,
            # which a committed stream stamps with the step committed there (commit_stream.py). Read a
            # message at a time, as live ranges are, a push of the next step landing in between
            # put its rows into the cut of the step before (a review's repro: 1,416 of 150,000 rows).
            estimate = self.range_hold_bytes(feed.num_keys * (8 + row_bytes))
            hold = await self.ranges.acquire(current_stall_watch(), estimate)
            try:
                changes, rows = await self.run_call(
                    functools.partial(self._end_copy, name, feed, stored), INLINE_WORK_BYTES + 1
                )
                self.ranges.resize(hold, self.range_hold_bytes(range_bytes(changes, rows)))
                for reply in self._batches(name, dim, changes, rows, reset=keys.shape[0] == 0):
                    yield reply
            finally:
                self.ranges.release(hold)
        finally:
            table.close_change_feed(feed)

    def _range_hold(self, num_keys: int, num_rows: int, row_bytes: int) -> int:
        """What a live range of num_keys keys (touched and deleted), num_rows of them with rows,
        holds while it is sent (_live_range): its keys, and one message's rows with the copies
        range_hold_bytes counts."""
        return 8 * num_keys + self.range_hold_bytes(min(num_rows * (8 + row_bytes), self._stream_bytes))

    def range_hold_bytes(self, range_bytes: int) -> int:
        """What a stream holds while it sends a range of `range_bytes` keys and rows: the range,
        and four copies of the message it is sending (its fields' bytes, the message, its
        serialised copy, and gRPC's while the client does not take it). Charged with two, streams
        that stop reading held 1.6-1.7x --subscribe-memory-bytes (a review's measure of the RSS:
        +309 MiB for a 191 MiB bound, 50 streams)."""
        return range_bytes + 4 * min(range_bytes, self._stream_bytes)

    @staticmethod
    def _row_bytes(table, stored: bool) -> int:
        """Bytes of one of table's rows in a Subscribe message."""
        return wire.stored_row_bytes(str(table.storage) if stored else "float32", table.dim)

    def _begin_copy(self, name: str):
        table = self.shard.table(name)
        return table.version, table.keys(), table.open_change_feed()

    def _log_entries(self, name: str, from_version: int) -> tuple:
        """The update log entries of table `name` after from_version (LogGapError if it lost them)."""
        return self.shard.log(name).entries_after(from_version, name)

    def _end_copy(self, name: str, feed, stored: bool) -> tuple[LogRange, _Rows]:
        """What changed since _begin_copy, as a range ending at the current version, with its rows."""
        table = self.shard.table(name)
        changes = feed.take()
        if not changes.complete:
            raise LogGapError(
                f"table {name!r}: more than {feed.max_keys} keys changed during the full copy (or the table was "
                "reloaded); resync with full_sync"
            )
        rows = self._read_rows(name, changes.touched_keys, stored)
        return LogRange(0, table.version, changes.touched_keys, changes.deleted_keys, ()), rows

    async def _live_range(self, name: str, table, changes: LogRange, stored: bool) -> AsyncIterator[ps_pb2.UpdateBatch]:
        """The messages of one live range, each message's rows read as it is made (serialised with
        the table calls, one message's worth at a time). Rows are read at their current value, so a
        message may carry a row newer than the range's to_version (the next range sends that key
        again; a row evicted since reads as its init value until the next range deletes it), as a
        full copy's chunks always did: a subscriber holds the shard's rows once it ended a range
        that no push followed."""
        row_bytes = self._row_bytes(table, stored)
        dtype = wire.STORED_DTYPES[str(table.storage)] if stored else ps_pb2.FLOAT32
        for piece in range_pieces(changes, row_bytes, self._stream_bytes):
            rows = None
            if piece.kind in ROW_KINDS:
                keys = changes.touched_keys[piece.start : piece.stop]
                read = functools.partial(self._read_rows, name, keys, stored)
                rows = (await self.run_call(read, keys.shape[0] * (8 + row_bytes))).data
            yield self._batch(
                name,
                changes.from_version,
                changes.to_version,
                dim=table.dim,
                last=piece.last,
                dtype=dtype,
                **piece_fields(changes, piece, rows),
            )

    def _read_rows(self, name: str, keys: np.ndarray, stored: bool) -> _Rows:
        """The rows of keys as Subscribe sends them: as the table stores them, or float32."""
        if not stored:
            return _Rows(ps_pb2.FLOAT32, self.shard.read_rows(name, keys).view(np.uint8))
        _, words = self.shard.read_stored_rows(name, keys)
        return self._rows_of_words(name, words, stored)

    def _rows_of_words(self, name: str, words: np.ndarray, stored: bool) -> _Rows:
        """Rows (n, value_words) float32 words as table `name` stores them, as Subscribe sends
        them: as they are (stored) or decoded to float32."""
        table = self.shard.table(name)
        storage = str(table.storage)
        if stored:
            return _Rows(wire.STORED_DTYPES[storage], wire.encode_stored_rows(words, storage, table.dim))
        if storage == "float32":
            return _Rows(ps_pb2.FLOAT32, np.ascontiguousarray(words, dtype=np.float32).view(np.uint8))
        return _Rows(ps_pb2.FLOAT32, native.decode_words(table.storage, words, table.dim).view(np.uint8))

    def _batch(self, name: str, from_version: int, to_version: int, **fields) -> ps_pb2.UpdateBatch:
        return ps_pb2.UpdateBatch(
            table=name,
            shard=self.shard.index,
            incarnation=self.shard.incarnation,
            from_version=from_version,
            to_version=to_version,
            sent_time=time.time(),
            **{"dtype": ps_pb2.FLOAT32, **fields},
        )

    def _batches(self, name: str, dim: int, changes: LogRange, rows: _Rows, reset: bool):
        """The messages of one range, made as they are taken (range_messages.py): rows, then deleted
        keys, then acks, each at most STREAM_MESSAGE_BYTES (or the message limit)."""
        for i, part in enumerate(range_parts(changes, rows.data, self._stream_bytes)):
            yield self._batch(
                name,
                changes.from_version,
                changes.to_version,
                dim=dim,
                reset=reset and i == 0,
                last=part.last,
                dtype=rows.dtype,
                **part.fields,
            )


def range_bytes(changes: LogRange, rows: _Rows) -> int:
    """What a range read for Subscribe holds: its keys and rows."""
    return changes.touched_keys.nbytes + changes.deleted_keys.nbytes + rows.data.nbytes


def server_options(job: JobConfig) -> list[tuple[str, int]]:
    """Channel options of both sides: explicit message limits, no silent port sharing, the fixed
    receive window of bulk messages (pushes' gradients arrive here; ps/wire.py), and the bound on a
    peer that stopped reading (FROZEN_PEER_SECONDS)."""
    limit = job.message_limit_bytes + _MESSAGE_SLACK
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_timeout_ms", FROZEN_PEER_SECONDS * 1000),
        *wire.BULK_CHANNEL_OPTIONS,
    ]


@dataclass
class ShardPort:
    """A shard's server, bound and with health, before its tables exist (see ps/shard/startup.py):
    `open` builds the shard from restored states and lets its services answer."""

    job: JobConfig
    shard_index: int
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    services: DeferredServices
    metrics: ShardMetrics
    standby: bool = False  # this process is the shard's standby
    address: str = ""  # where it listens

    def build_shard(
        self,
        restore_step: int | None,
        log_max_keys: int = DEFAULT_MAX_KEYS,
        log_max_entries: int = DEFAULT_MAX_ENTRIES,
        progress: RestoreProgress | None = None,
    ):
        """The Shard, its tables loaded from snapshot `restore_step` (None: empty). Blocking: `embps
        ps` runs it on a thread while the port answers NOT_SERVING."""
        # torch and pyarrow come with these; `embps ps` may re-exec before they are imported
        from ps.shard.snapshot_service import restore_shard_states
        from ps.shard.state import Shard

        job, index = self.job, self.shard_index
        states = restore_shard_states(job, index, restore_step, progress) if restore_step is not None else None
        return Shard(job, index, log_max_entries=log_max_entries, log_max_keys=log_max_keys, initial_states=states)

    async def open(
        self, shard, restore_step: int | None, subscribe_memory_bytes: int = SUBSCRIBE_MEMORY_BYTES
    ) -> ParameterServerServicer:
        """Builds the servicers of `shard` (restored from `restore_step`), installs them and marks
        the port SERVING; returns the ParameterServer servicer."""
        from ps.shard.snapshot_service import SnapshotControlServicer

        job, shard_index = self.job, self.shard_index
        servicer = ParameterServerServicer(shard, self.metrics, subscribe_memory_bytes)
        snapshots = SnapshotControlServicer(
            job,
            shard_index,
            shard.tables,
            run_serialized=lambda call: servicer.run_call(call, work_bytes=INLINE_WORK_BYTES + 1),
            call_site=servicer.call_site,
            restored_step=restore_step,
        )
        servicer.snapshots = snapshots

        replication = None
        bulk = dict(_BULK_FIELDS)
        if job.shards[shard_index].standby:
            from ps.shard.replication import BULK_FIELDS, attach_replication

            bulk.update(BULK_FIELDS)
            replication = attach_replication(
                servicer, job, shard_index, self.address, self.standby, self.metrics.registry
            )

        def add_servicers(server) -> None:
            ps_pb2_grpc.add_ParameterServerServicer_to_server(servicer, server)
            snapshot_pb2_grpc.add_SnapshotControlServicer_to_server(snapshots, server)
            if replication is not None:
                replication.add_to_server(server)

        self.services.open(add_servicers, bulk)
        if replication is not None:
            try:
                await replication.start()
            except asyncio.CancelledError:  # stopped while it waited on the arbiter or its partner
                await replication.stop()
                raise
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return servicer


async def bind_shard(
    job: JobConfig,
    shard_index: int,
    address: str | None = None,
    metrics: ShardMetrics | None = None,
    standby: bool = False,
) -> ShardPort:
    """Builds (not starts) the shard's server bound to `address` (default: the job's; port 0 picks
    one), NOT_SERVING, every embps call answered UNAVAILABLE until ShardPort.open."""
    metrics = metrics if metrics is not None else ShardMetrics(shard_index)
    # Token checks come first: a caller without a valid token learns nothing, not even that its
    # request bytes do not parse.
    auth = server_interceptors(
        job.security, ps_port_policy(), lambda method, code: metrics.requests.labels("", method, code.name).inc()
    )
    server = grpc.aio.server(options=server_options(job), interceptors=[*auth, UndecodableRequests()])
    services = DeferredServices(
        refusal=lambda: f"shard {shard_index} is starting",
        on_refused=lambda method: metrics.requests.labels("", method, grpc.StatusCode.UNAVAILABLE.name).inc(),
        methods=SHARD_METHODS,
    )
    server.add_generic_rpc_handlers((services,))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            SNAPSHOT_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if address is None:
        address = job.shards[shard_index].standby if standby else job.shards[shard_index].address
    try:
        port = add_port(server, address, job.security)
    except RuntimeError as exc:  # grpc's "Failed to bind": the port is taken, or the host is not ours
        raise OSError(f"shard {shard_index}: cannot bind {address} ({exc})") from None
    if port == 0:
        raise OSError(f"shard {shard_index}: cannot bind {address}")
    return ShardPort(job, shard_index, server, port, health, services, metrics, standby, address)


async def create_server(
    job: JobConfig,
    shard_index: int,
    address: str | None = None,
    metrics: ShardMetrics | None = None,
    log_max_keys: int = DEFAULT_MAX_KEYS,
    log_max_entries: int = DEFAULT_MAX_ENTRIES,
    restore_step: int | None = None,
    standby: bool = False,
) -> tuple[grpc.aio.Server, int, ParameterServerServicer, HealthServicer]:
    """Builds (not starts) the shard's server bound to `address` (default: the job's; port 0 picks
    one), its tables restored from `restore_step` first. log_max_keys, log_max_entries bound each
    table's update log. Returns (server, bound port, servicer, health servicer). `embps ps` binds
    first and restores while the port answers NOT_SERVING (bind_shard, ShardPort.build_shard, .open)."""
    shard_port = await bind_shard(job, shard_index, address, metrics, standby)
    shard = shard_port.build_shard(restore_step, log_max_keys, log_max_entries)
    servicer = await shard_port.open(shard, restore_step)
    return shard_port.server, shard_port.port, servicer, shard_port.health


async def _restore(shard_port: ShardPort, restore_step: int, log_max_keys: int, stop: asyncio.Event):
    """The Shard restored from snapshot `restore_step`, loaded on a thread while the port answers
    NOT_SERVING; an exit status (int) instead when the restore fails or SIGTERM comes first."""
    from ps.errors import EmbpsError
    from ps.snapshot.manifest import SnapshotError
    from ps.snapshot.storage import StorageError

    index = shard_port.shard_index
    progress = RestoreProgress(index, restore_step, shard_port.metrics, log)
    shard_port.services.refusal = lambda: f"shard {index} is {progress.describe()}"
    restore = run_in_daemon_thread(lambda: shard_port.build_shard(restore_step, log_max_keys, progress=progress))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({restore, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not restore.done():
        log.info("shard %d: stopped while %s", index, progress.describe())
        return 0
    try:
        shard = restore.result()
    except SnapshotError as exc:
        log.error("shard %d: snapshot step %d cannot be restored: %s", index, restore_step, exc)
        return EXIT_SNAPSHOT_UNUSABLE
    except (StorageError, OSError) as exc:  # storage out of reach: a restart may find it back
        log.error("shard %d: restoring snapshot step %d failed: %s", index, restore_step, exc)
        return 1
    except (ValueError, EmbpsError) as exc:  # the job's config refuses it (EmbpsError: a capacity below the rows)
        log.error("shard %d: the job's config refuses snapshot step %d: %s", index, restore_step, exc)
        return EXIT_CONFIG_REFUSED
    log.info("shard %d: restored snapshot step %d (%.1f MiB read)", index, restore_step, progress.read_bytes / 2**20)
    return shard


async def _serve(
    job: JobConfig,
    shard_index: int,
    grace: float,
    log_max_keys: int,
    restore_step: int | None,
    standby_slot: str | None = None,
    stream_stall_seconds: float = DEFAULT_STREAM_STALL_SECONDS,
    subscribe_memory_bytes: int = SUBSCRIBE_MEMORY_BYTES,
) -> int:
    standby = standby_slot is not None
    address = job.shards[shard_index].address if standby_slot == "primary" else None
    try:
        shard_port = await bind_shard(job, shard_index, address, standby=standby)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    server, port, health = shard_port.server, shard_port.port, shard_port.health
    shard_config = job.shards[shard_index]
    if standby_slot == "standby":
        shard_config = dataclasses.replace(
            shard_config, address=shard_config.standby, metrics_port=shard_config.standby_metrics_port
        )
    try:
        metrics_port = shard_port.metrics.serve(shard_config.metrics_port, shard_config.host)
    except OSError as exc:
        field_name = "standby_metrics_port" if standby_slot == "standby" else "metrics_port"
        log.error(
            "shards[%d].%s: cannot serve /metrics on %s:%d: %s",
            shard_index, field_name, shard_config.host, shard_config.metrics_port, exc.strerror or exc,
        )
        await server.stop(None)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    restoring = f"; NOT_SERVING until snapshot step {restore_step} is restored" if restore_step is not None else ""
    log.info(
        "shard %d of job %r listening on %s (port %d; %s), metrics on %s:%d, pid %d%s",
        shard_index, job.job, shard_config.address, port, job.security.describe(), shard_config.host, metrics_port,
        os.getpid(), restoring,
    )
    if restore_step is None:
        shard = shard_port.build_shard(None, log_max_keys)
    else:
        shard = await _restore(shard_port, restore_step, log_max_keys, stop)
        if isinstance(shard, int):
            await server.stop(None)
            return shard
    # A pair's process may wait here for long (etcd out of reach, an earlier run's lease): a SIGTERM
    # meanwhile ends it (it waited on, and was SIGKILLed at the end of every grace period).
    opening = asyncio.ensure_future(shard_port.open(shard, restore_step, subscribe_memory_bytes))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not opening.done():
        log.info("shard %d: stopped before it could serve", shard_index)
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        await server.stop(None)
        return 0
    servicer = opening.result()
    servicer.call_site.stream_stall_seconds = stream_stall_seconds
    log.info("shard %d of job %r serving", shard_index, job.job)
    await stop.wait()
    log.info("shard %d: draining (grace %.1f s)", shard_index, grace)
    if servicer.replication is not None:
        await servicer.replication.stop()
    servicer.begin_drain()
    await health.enter_graceful_shutdown()
    # While the port is still open, calls that were already on their way reach a handler and get
    # UNAVAILABLE (retryable); server.stop() would cancel the ones not yet handed to a handler.
    await asyncio.sleep(min(grace, DRAIN_WINDOW_SECONDS))
    await server.stop(grace)
    log.info("shard %d: stopped", shard_index)
    return 0


def serve_shard(
    config: str | os.PathLike,
    shard: int,
    grace: float = 10.0,
    log_max_keys: int = DEFAULT_MAX_KEYS,
    restore_step: int | None = None,
    standby: str | None = None,
    stream_stall_seconds: float = DEFAULT_STREAM_STALL_SECONDS,
    subscribe_memory_bytes: int = SUBSCRIBE_MEMORY_BYTES,
) -> int:
    """Runs shard `shard` of the job in `config` until SIGTERM/SIGINT; returns the exit status.
    log_max_keys: keys each table's update log holds before it forgets its oldest pushes.
    stream_stall_seconds: a Subscribe stream whose client takes no message for this long is ended.
    subscribe_memory_bytes: the keys and rows Subscribe ranges hold at once (SUBSCRIBE_MEMORY_BYTES).
    restore_step: start from the tables of this snapshot step (the job's [snapshot] uri).
    standby: run as the shard's standby, at its "standby" address or (after a failover) at its
    "primary" one (ps/shard/replication.py); None: as its primary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job = load_job_config(config)
    # ValueError: the command line ends with one line naming the flag, exit status 2 (embps.cli), as
    # `embps serve`'s and every usage error's (these were SystemExit, status 1).
    if not 0 <= shard < len(job.shards):
        raise ValueError(f"--shard must be in [0, {len(job.shards)}) for {config}, got {shard}")
    if log_max_keys < 1:
        raise ValueError(f"--update-log-keys must be >= 1, got {log_max_keys}")
    if not (math.isfinite(grace) and 0 <= grace <= MAX_FLAG_SECONDS):
        raise ValueError(f"--grace must be a number of seconds in [0, {MAX_FLAG_SECONDS:g}], got {grace}")
    if not (math.isfinite(stream_stall_seconds) and 0 < stream_stall_seconds <= MAX_FLAG_SECONDS):
        raise ValueError(
            f"--stream-stall-seconds must be a number of seconds in (0, {MAX_FLAG_SECONDS:g}], "
            f"got {stream_stall_seconds}"
        )
    if subscribe_memory_bytes < 1:
        raise ValueError(f"--subscribe-memory-bytes must be >= 1, got {subscribe_memory_bytes}")
    if restore_step is not None and restore_step < 0:
        raise ValueError(f"--restore-step must be a snapshot step >= 0, got {restore_step}")
    if standby and not job.shards[shard].standby:
        raise ValueError(f"--standby: shards[{shard}] of {config} declares no standby address")
    if job.shards[shard].standby and job.arbiter is not None:
        job.arbiter.tls_context()  # its files, read before any port is bound (ValueError naming the field)
    for table in job.tables:
        if (reason := device_unavailable_reason(table.device)) is not None:
            raise ValueError(f"tables.{table.name}.device in {config}: {table.device!r} cannot hold rows "
                             f"on this machine: {reason}")
    return asyncio.run(
        _serve(job, shard, grace, log_max_keys, restore_step, standby, stream_stall_seconds, subscribe_memory_bytes)
    )
