"""The serving replica process (grpc.aio): read-only Serving (Lookup, LookupMany, Status) + health
+ reflection
+ /metrics, fed by one ShardFollower per (table, training shard), a shard's all over one stream
(serving/shard_streams.py).

    embps serve --config serve.toml

Start: the latest export (if configured and committed), then the followers subscribe from its
versions. Lookups run on the event loop (small) or a thread (large) and read ShardRows, which
the followers write concurrently (see serving/store.py for why a reader never sees half a row).
Health: "" and embps.v1.Serving are SERVING while the replica answers, even with every PS down
(it keeps the last weights); "embps.v1.Serving/shard-<s>" is NOT_SERVING while shard s is stale;
the Status RPC gives the details. Every call grpc.aio answers goes through the one call
wrapper of ps/process/calls.py (errors become status codes, `ReplicaCallSite` records metrics);
the gate's native Lookups count the same metrics in C++ (serving/metrics.py merges them).
SIGTERM: NOT_SERVING, in-flight calls finish within the grace, exit 0.
Public port: the native gate (serving/gate.py) listens there; it answers Lookups on its own
threads without Python (`gate_lookups`: csrc/serving_lookup.h reads the native row store of
serving/store.py) and forwards every other call to this grpc.aio server on a private
Unix socket. Overload: beyond `max_queue` Lookups admitted and not answered, the gate answers more
RESOURCE_EXHAUSTED at once, in C++. Without the gate (built without grpc++, or
EMBPS_SERVING_GATE=0) this server listens itself and sheds as serving/shedding.py says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ps import wire
from ps.errors import CapacityError, UnknownTableError
from ps.process.calls import CallSite, UndecodableRequests, unary_call
from ps.process.metrics import LATENCY_BUCKETS
from ps.rpc import ps_pb2, serving_pb2, serving_pb2_grpc
from ps.security import (
    RECONNECT_OPTIONS,
    Role,
    TokenAuth,
    add_port,
    open_aio_channel,
    server_interceptors,
    serving_port_policy,
)
from ps.security.config import RELOAD_CHECK_S
from serving.config import Consistency, ServeConfig, load_serve_config
from serving.core_calls import CoreCallCounts, counts_core_calls, server_ids
from serving.cut import ModelCut
from serving.follower import ConnectionLink, ShardFollower
from serving.gate import (
    GateCounts,
    GateDirectory,
    GateIdentity,
    NativeLookups,
    ServingGate,
    native_lookups,
    unavailable_reason,
)
from serving.metrics import ServingMetrics
from serving.shard_streams import ShardStreams
from serving.shedding import (
    LOOKUP_METHODS,
    LookupQueue,
    core_backlog_options,
    core_refusal_code,
)
from serving.store import TableReplica

log = logging.getLogger("embps.serving")

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
_MESSAGE_SLACK = 1 << 16
INLINE_LOOKUP_KEYS = 1 << 16  # larger lookups run on a thread so the loop keeps taking calls
STALE_RECHECK_SECONDS = 0.2  # while a shard is stale: how often the monitor looks whether it is fresh again
# How often the gate is given the current tokens: just after a token file's next check is due
# (ps/security/tokens.py), so a changed file reaches the gate within about RELOAD_CHECK_S.
TOKEN_CHECK_SECONDS = RELOAD_CHECK_S + 0.01
_REPLY_DTYPES = {ps_pb2.DTYPE_UNSPECIFIED: np.float32, ps_pb2.FLOAT32: np.float32, ps_pb2.FLOAT16: np.float16}
SHOWN_NAME_CHARS = 64  # as the gate's shown_name (csrc/serving_lookup.cpp)


def shown_name(name: str) -> str:
    """A name a caller sent, for a message: its repr, cut after SHOWN_NAME_CHARS characters with
    its size in bytes after it. Whole, a long name escaped in the status passed gRPC's 16 KiB bound
    on a client's trailers, which then saw RESOURCE_EXHAUSTED instead of NOT_FOUND."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name.encode('utf-8', 'surrogatepass'))} bytes)"


@dataclass
class Replica:
    """The tables this replica serves and the followers that feed them."""

    config: ServeConfig
    tables: dict[str, TableReplica]
    followers: list[ShardFollower] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    export_step: int | None = None
    cut: ModelCut | None = None  # consistency = "step"
    link_changed: asyncio.Event = field(default_factory=asyncio.Event)  # a follower's stream went down or came back

    def table(self, name: str) -> TableReplica:
        replica = self.tables.get(name)
        if replica is None:
            raise UnknownTableError(
                f"table {shown_name(name)} is not served here; tables: {', '.join(sorted(self.tables))}"
            )
        return replica


class ReplicaCallSite(CallSite):
    """How the call wrapper labels and records the replica's calls (grpc.aio's and the gate's)."""

    def __init__(self, tables: Container[str], metrics: ServingMetrics) -> None:
        super().__init__("the serving replica", log)
        self.tables = tables
        self.metrics = metrics

    def table_label(self, request) -> str:
        """The request's table; names not served here share one label, no table is ""."""
        table = getattr(request, "table", "")
        return table if table in self.tables or not table else "unknown"

    def record(self, method: str, table: str, code: grpc.StatusCode, seconds: float, request) -> None:
        self.series(self.metrics.requests, table, method, code.name).inc()
        self.series(self.metrics.request_duration, table, method, code.name).observe(seconds)


class ServingServicer(serving_pb2_grpc.ServingServicer):
    """Lookup, LookupMany and Status over a Replica. No method writes."""

    def __init__(self, replica: Replica, metrics: ServingMetrics) -> None:
        self.replica = replica
        self.metrics = metrics
        self.call_site = ReplicaCallSite(replica.tables, metrics)
        self._followers: dict[tuple[str, int], list[ShardFollower]] = {}
        self._lookup_series: dict[str, tuple] = {}
        for f in replica.followers:
            self._followers.setdefault((f.replica.name, f.shard), []).append(f)

    @unary_call("Lookup")
    async def Lookup(self, request: serving_pb2.ServingLookupRequest) -> serving_pb2.ServingLookupResponse:
        if len(request.keys) <= 8 * INLINE_LOOKUP_KEYS:
            return self.answer_lookup(request)
        return await asyncio.to_thread(self.answer_lookup, request)

    @unary_call("LookupMany")
    async def LookupMany(self, request: serving_pb2.ServingLookupManyRequest) -> serving_pb2.ServingLookupManyResponse:
        if len(request.lookups) > wire.MAX_BATCH_PARTS:  # the gate's bound (csrc/serving_lookup.cpp)
            raise ValueError(
                f"lookups: at most {wire.MAX_BATCH_PARTS} lookups in one LookupMany, got more; split the call"
            )
        if sum(len(lookup.keys) for lookup in request.lookups) <= 8 * INLINE_LOOKUP_KEYS:
            return self.answer_lookup_many(request)
        return await asyncio.to_thread(self.answer_lookup_many, request)

    def check_reply_size(self, table, request: serving_pb2.ServingLookupRequest, before: int) -> None:
        """CapacityError (RESOURCE_EXHAUSTED) when the reply, `before` bytes of it already built
        (a LookupMany's earlier results), would pass the job's message_limit_bytes with this
        lookup's; checked once the lookup itself was (table, dim, dtype, keys), before any row is
        read, with the gate's estimate and message (csrc/serving_lookup.cpp): values, found flags,
        dim and dtype, a version entry per shard and LookupMany's framing of each result. (The
        whole call was checked first, with another estimate: a call near the limit was answered by
        one front end and refused by the other, and a bad lookup beyond it got RESOURCE_EXHAUSTED
        here, its own code from the gate.)"""
        n = len(request.keys) // 8
        value_bytes = n * table.dim * (2 if request.dtype == ps_pb2.FLOAT16 else 4)
        total = before + value_bytes + n + 80 + len(table.shards) * 48
        limit = self.replica.config.job.message_limit_bytes
        if total > limit:
            raise CapacityError(
                f"keys: the reply would be about {total} bytes, over message_limit_bytes {limit}; split the request"
            )

    def answer_lookup_many(
        self, request: serving_pb2.ServingLookupManyRequest
    ) -> serving_pb2.ServingLookupManyResponse:
        """The reply to a LookupMany: each lookup answered as answer_lookup would, all at one model
        version; the first bad one raises its error, its message prefixed by `lookups[i]: `."""

        def answer(version: int | None) -> serving_pb2.ServingLookupManyResponse:
            reply = serving_pb2.ServingLookupManyResponse()
            before = 0  # the results so far, framed (reply.ByteSize() encodes them: megabytes a call)
            for i, lookup in enumerate(request.lookups):
                try:
                    size = self.fill_lookup(lookup, reply.results.add(), version, before)  # in place: no copy
                except (UnknownTableError, CapacityError, ValueError, TypeError) as exc:
                    raise type(exc)(f"lookups[{i}]: {exc}") from exc
                before += _framed(size)
            return reply

        reply, version = self._at_one_version(answer)
        reply.model_version = version
        return reply

    def answer_lookup(self, request: serving_pb2.ServingLookupRequest) -> serving_pb2.ServingLookupResponse:
        """The reply to a Lookup, on any thread (rows are read safely while followers write them);
        raises what `status_of` maps to a status code."""

        def answer(version: int | None) -> serving_pb2.ServingLookupResponse:
            reply = serving_pb2.ServingLookupResponse()
            self.fill_lookup(request, reply, version)
            return reply

        reply, version = self._at_one_version(answer)
        reply.model_version = version
        return reply

    def _at_one_version(self, answer):
        """(answer(version), version) at one model version of the cut; (answer(None), 0) without one."""
        cut = self.replica.cut
        return (answer(None), 0) if cut is None else cut.read(answer)

    def fill_lookup(self, request: serving_pb2.ServingLookupRequest, reply: serving_pb2.ServingLookupResponse,
                    version: int | None = None, before: int = 0) -> int:
        """Writes the answer to `request` at model `version` into the empty message `reply`;
        `before`: bytes of a LookupMany's reply built before it (check_reply_size). Returns the
        reply's serialized size, counted without encoding its rows."""
        start = time.perf_counter()
        table = self.replica.table(request.table)
        if request.dim and request.dim != table.dim:
            raise ValueError(f"dim: table {table.name!r} has dim {table.dim}, the request says {request.dim}")
        if request.dtype not in _REPLY_DTYPES:
            raise ValueError(f"dtype: unsupported dtype {request.dtype}; supported: FLOAT32, FLOAT16")
        dtype = _REPLY_DTYPES[request.dtype]
        keys = wire.decode_keys(request.keys)
        self.check_reply_size(table, request, before)
        values, found, served_versions = table.lookup_served(keys, dtype, version)
        reply.model_version = version or 0
        reply.dim = table.dim
        reply.dtype = ps_pb2.FLOAT16 if dtype == np.float16 else ps_pb2.FLOAT32
        for s, (shard_version, incarnation) in enumerate(served_versions):
            served = reply.shards.add()
            served.shard = s
            served.version = shard_version
            served.incarnation = incarnation
            served.stale = self.stale(table.name, s)
        size = reply.ByteSize()  # before the rows and flags: a few bytes a shard to encode
        for name, data in (("values", values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()),
                           ("found", found.view(np.uint8).tobytes())):
            setattr(reply, name, data)
            size += _framed(len(data)) if data else 0
        looked_up, missing, duration = self._table_metrics(table.name)
        looked_up.inc(keys.shape[0])
        missing.inc(int(keys.shape[0] - np.count_nonzero(found)))
        duration.observe(time.perf_counter() - start)
        return size

    def _table_metrics(self, table: str) -> tuple:
        """(keys, missing keys, lookup duration) series of `table`, looked up once."""
        series = self._lookup_series.get(table)
        if series is None:
            m = self.metrics
            series = self._lookup_series[table] = (
                m.lookup_keys.labels(table), m.lookup_missing.labels(table), m.lookup_duration.labels(table)
            )
        return series

    @unary_call("Status")
    async def Status(self, request: serving_pb2.ServingStatusRequest) -> serving_pb2.ServingStatusResponse:
        now = time.monotonic()
        threshold = self.replica.config.stale_after_seconds
        return serving_pb2.ServingStatusResponse(
            shards=[
                serving_pb2.ShardStatus(
                    table=f.replica.name,
                    shard=f.shard,
                    version=f.rows.version,
                    incarnation=f.rows.incarnation,
                    connected=f.status.connected,
                    stale=f.stale(threshold),
                    seconds_since_message=now - f.status.last_message,
                    rows=f.rows.size,
                    num_resyncs=f.status.num_resyncs,
                    last_error=f.status.last_error,
                )
                for f in self.replica.followers
            ],
            **self._cut_status(),
        )

    def _cut_status(self) -> dict[str, int]:
        cut = self.replica.cut
        if cut is None:
            return {}
        return {"model_version": cut.version, "newest_step": max(cut.newest.values()),
                "waiting_bytes": max(0, cut.waiting_bytes)}

    @unary_call("DenseModel")
    async def DenseModel(self, request: serving_pb2.DenseModelRequest) -> serving_pb2.DenseModelResponse:
        """The dense tower published with the served step (NOT_FOUND when none was)."""
        cut = self.replica.cut
        if cut is None:
            raise UnknownTableError('no dense tower: this replica serves consistency = "latest" (no model version)')
        step = request.step or cut.version
        dense = cut.dense_recent.get(step)
        if dense is None:
            have = f"it holds those of steps {sorted(cut.dense_recent)}" if cut.dense_recent else "none was published"
            raise UnknownTableError(f"no dense tower of step {step} (the served step is {cut.version}; {have})")
        return serving_pb2.DenseModelResponse(step=dense[0], format=dense[1], state=dense[2])

    def stale(self, table: str, shard: int) -> bool:
        threshold = self.replica.config.stale_after_seconds
        return any(f.stale(threshold) for f in self._followers.get((table, shard), ()))


def gate_lookups(replica: Replica, auth: TokenAuth | None) -> NativeLookups:
    """The serving gate's Lookup and LookupMany handler: token check, parsing, lookup, reply and
    metrics in C++ (csrc/serving_lookup.h), over the tables' native stores, with the status codes
    and messages of ServingServicer and TokenAuth. `refresh_tokens` keeps its tokens current."""
    native = native_lookups(
        [table.native for table in replica.tables.values()], LATENCY_BUCKETS, replica.config.stale_after_seconds,
        auth is not None, replica.config.job.message_limit_bytes,
    )
    refresh_tokens(native, auth)
    return native


def _framed(size: int) -> int:
    """Bytes of a length-delimited field of `size` bytes (fields numbered below 16): tag, length, body."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def refresh_tokens(native: NativeLookups, auth: TokenAuth | None) -> None:
    """Gives the gate the current tokens that may call Lookup (a token file may have changed)."""
    if auth is not None:
        native.set_tokens(auth.tokens_for(LOOKUP_METHODS))


def channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    """Options of the replica's channels to the PS: the job's message limit, quick reconnects."""
    limit = config.job.message_limit_bytes + _MESSAGE_SLACK
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        *RECONNECT_OPTIONS,
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
    ]


async def build_replica(config: ServeConfig, metrics: ServingMetrics) -> Replica:
    """The replica's tables (from the latest export, if any) and its followers (not started)."""
    job = config.job
    tables = {
        name: TableReplica(job.table(name), job.shard_map, config.default, config.storage_dtype)
        for name in config.tables
    }
    replica = Replica(config, tables)
    if config.export is not None:
        from serving.export_load import load_latest_export

        replica.export_step = await asyncio.to_thread(load_latest_export, config.export, tables)
    replica.channels = [
        open_aio_channel(a, job.security, Role.REPLICA, channel_options(config)) for a in job.addresses
    ]
    if config.consistency == Consistency.STEP:
        replica.cut = ModelCut(tables, metrics, config.max_waiting_bytes, replica.export_step or 0)
    standbys = [
        open_aio_channel(shard.standby, job.security, Role.REPLICA, channel_options(config)) if shard.standby else None
        for shard in job.shards
    ]
    replica.channels += [c for c in standbys if c is not None]
    links: dict[int, ConnectionLink] = {}
    for t, table in enumerate(tables.values()):
        for s, (channel, standby) in enumerate(zip(replica.channels, standbys, strict=False)):
            with_dense = t == 0 and s == 0
            replica.followers.append(ShardFollower(
                table, s, channel, metrics, cut=replica.cut, with_dense=with_dense, standby_channel=standby,
                link_changed=replica.link_changed, links=links,
            ))
    return replica


def message_limit(config: ServeConfig) -> int:
    """The largest message the replica's ports take or send, in bytes."""
    return config.job.message_limit_bytes + _MESSAGE_SLACK


async def create_server(
    config: ServeConfig, address: str | None = None, metrics: ServingMetrics | None = None, gated: bool = False
) -> tuple[grpc.aio.Server, int, ServingServicer, HealthServicer, TokenAuth | None]:
    """Builds (not starts) the replica's server bound to `address` (default: config.listen; port
    0 picks one). Returns (server, bound port, servicer, health servicer, its token check).

    gated: the server sits behind the gate (serving/gate.py), `address` is its Unix socket, and it
    binds it in plaintext (the gate ends TLS) without a queue bound of its own (the gate's holds)."""
    metrics = metrics if metrics is not None else ServingMetrics()
    replica = await build_replica(config, metrics)
    servicer = ServingServicer(replica, metrics)
    limit = message_limit(config)
    auth = server_interceptors(
        config.job.security,
        serving_port_policy(),
        lambda method, code: metrics.requests.labels("", method, code.name).inc(),
    )
    queue = [] if gated else [LookupQueue(config.max_queue, metrics)]  # LookupQueue first
    servers_before = server_ids()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),
            *([] if gated else core_backlog_options(config.max_queue)),
        ],
        interceptors=[*queue, *auth, UndecodableRequests()],
    )
    _count_core_calls(metrics, server_ids() - servers_before)
    serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = address if address is not None else config.listen
    try:
        port = server.add_insecure_port(address) if gated else add_port(server, address, config.job.security)
    except RuntimeError:  # grpc's "Failed to bind": the port is taken, or the host is not ours
        port = 0
    if port == 0:
        raise OSError(f"listen: cannot bind {address}")
    token_auth = next((i for i in auth if isinstance(i, TokenAuth)), None)
    return server, port, servicer, health, token_auth


def _count_core_calls(metrics: ServingMetrics, created: set[int]) -> None:
    """Exports gRPC core's call counts of the server just created (serving/core_calls.py)."""
    unavailable = counts_core_calls()
    if unavailable is None and len(created) != 1:
        unavailable = f"{len(created)} servers were created at once in this process, not one"
    if unavailable is not None:
        log.info("calls refused by gRPC's core are not in the metrics: %s", unavailable)
        return
    metrics.registry.register(CoreCallCounts(created.pop()))


async def monitor(
    servicer: ServingServicer, health: HealthServicer, on_tick: Callable[[], None] | None = None
) -> None:
    """Keeps each shard's health ("embps.v1.Serving/shard-<s>") and `stale` gauge in step with its
    streams, and calls `on_tick` (the gate's tokens) every TOKEN_CHECK_SECONDS.

    It wakes only when something can have changed: at once when a stream goes down or comes back
    (`Replica.link_changed`), when a fresh shard could turn stale (its stream's last message +
    stale_after_seconds), and every STALE_RECHECK_SECONDS while a connected stream is silent past
    it (its next message makes the shard fresh). A fixed short tick would wake an idle replica
    several times a second, and at a few hundred Lookups a second that background is a good part
    of the replica's CPU per Lookup; the gauges that change with time alone are read at scrape
    time (serving/metrics.py's StreamGauges)."""
    replica, m = servicer.replica, servicer.metrics
    threshold = replica.config.stale_after_seconds
    was_stale: dict[int, bool] = {}
    tokens_due = 0.0
    while True:
        replica.link_changed.clear()
        now = time.monotonic()
        stale: dict[int, bool] = {}
        for f in replica.followers:
            stale[f.shard] = stale.get(f.shard, False) or f.stale(threshold)
        for shard, is_stale in stale.items():
            if was_stale.get(shard) != is_stale:
                m.stale.labels(str(shard)).set(int(is_stale))
                status = health_pb2.HealthCheckResponse
                await health.set(f"{SERVICE_NAME}/shard-{shard}", status.NOT_SERVING if is_stale else status.SERVING)
                log.info("shard %d is %s", shard, "stale" if is_stale else "fresh")
        was_stale = stale
        if on_tick is not None and now >= tokens_due:
            on_tick()
            tokens_due = time.monotonic() + TOKEN_CHECK_SECONDS
        wake = tokens_due if on_tick is not None else now + TOKEN_CHECK_SECONDS
        talking = [f for f in replica.followers if f.status.connected]
        if any(f.stale(threshold) for f in talking):
            wake = min(wake, now + STALE_RECHECK_SECONDS)
        elif talking:
            # f.stale() is "silent > threshold": look just after the first moment it can be true.
            wake = min(wake, min(f.status.last_message for f in talking) + threshold + 0.005)
        try:
            async with asyncio.timeout(max(0.0, wake - time.monotonic())):  # not wait_for: tests/test_cancellation.py
                await replica.link_changed.wait()
        except TimeoutError:
            pass


async def _serve(config: ServeConfig, grace: float) -> int:
    metrics = ServingMetrics()
    metrics.lookup_queue_limit.set(config.max_queue)
    without_gate = unavailable_reason()
    directory = None if without_gate else GateDirectory()
    try:
        return await _serve_on(config, grace, metrics, directory, without_gate)
    finally:
        if directory is not None:
            directory.close()


async def _serve_on(
    config: ServeConfig, grace: float, metrics: ServingMetrics, directory: GateDirectory | None,
    without_gate: str | None,
) -> int:
    gated = directory is not None
    try:
        server, port, servicer, health, token_auth = await create_server(
            config, directory.upstream if gated else None, metrics=metrics, gated=gated
        )
    except OSError as exc:  # a port taken is one line naming the field, as for `embps ps`, not a traceback
        log.error("%s (the port is taken, or the host is not this machine's)", exc)
        return 1
    lookups = gate_lookups(servicer.replica, token_auth) if gated else None
    if lookups is not None:
        metrics.add_native_calls(lookups)
    try:
        metrics_port = metrics.serve(config.metrics_port, config.host)
    except OSError as exc:
        log.error("metrics_port: cannot serve /metrics on %s:%d: %s", config.host, config.metrics_port,
                  exc.strerror or exc)
        await server.stop(None)
        return 1
    metrics.add_stream_gauges(servicer.replica.followers, list(servicer.replica.tables.values()))
    stop = asyncio.Event()
    by_shard: dict[int, list[ShardFollower]] = {}
    for f in servicer.replica.followers:
        by_shard.setdefault(f.shard, []).append(f)
    followers = {asyncio.create_task(ShardStreams(group).run()): f"shard {shard}'s followers"
                 for shard, group in by_shard.items()}
    failed = stop_when_any_fails(followers, stop)
    tasks = list(followers)
    on_tick = (lambda: refresh_tokens(lookups, token_auth)) if lookups is not None and token_auth else None
    tasks.append(asyncio.create_task(monitor(servicer, health, on_tick)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    gate = identity = counts = None
    try:
        if gated:
            if config.job.security.tls:
                identity = GateIdentity(config.job.security, directory.path)
            try:
                gate = ServingGate(
                    config.listen, directory.upstream, LOOKUP_METHODS, lookups, config.max_queue,
                    message_limit(config), identity, config.max_queue_bytes, config.lookup_threads,
                    config.client_stall_seconds,
                )
            except OSError as exc:
                log.error("%s (the port is taken, or the host is not this machine's)", exc)
                return 1
            port = gate.port
            counts = GateCounts(gate)
            metrics.replace_queue_metrics(counts)
            metrics.native_calls.gate = gate
        log.info(
            "serving replica of job %r on %s (port %d; %s), metrics on %s:%d, tables %s, export step %s, pid %d",
            config.job.job, config.listen, port, config.job.security.describe(), config.host, metrics_port,
            ", ".join(config.tables),
            servicer.replica.export_step, os.getpid(),
        )
        if gated:
            log.info("serving gate: %s lookup threads", config.lookup_threads or f"{os.cpu_count()} (one per core)")
        if gated and config.max_queue:
            log.info("overload: more than %d Lookups waiting are refused RESOURCE_EXHAUSTED by the serving gate",
                     config.max_queue)
        elif config.max_queue:
            log.info(
                "overload: more than %d Lookups waiting are refused, RESOURCE_EXHAUSTED by this replica and %s by "
                "gRPC's core (no serving gate: %s)", config.max_queue, core_refusal_code().name, without_gate,
            )
        await stop.wait()
        log.info("draining (grace %.1f s)", grace)
        servicer.call_site.draining = True
        if lookups is not None:
            lookups.set_draining(True)
        await health.enter_graceful_shutdown()
    finally:
        if gate is not None:
            await asyncio.to_thread(gate.shutdown, grace)
            metrics.native_calls.gate = None  # with `counts`, the last references but this function's
            if counts is not None:
                metrics.registry.unregister(counts)
            log.info("serving gate stopped")
        if identity is not None:
            identity.close()
        await server.stop(grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in servicer.replica.channels:
            await channel.close()
    if failed:
        log.error("stopped: %s failed", ", ".join(failed))
        return 1
    log.info("stopped")
    return 0


def stop_when_any_fails(tasks: dict[asyncio.Task, str], stop: asyncio.Event) -> list[str]:
    """Sets `stop` when a task of `tasks` (task: what it is) ends with an error; returns the list the
    names of the failed ones are added to. A follower handles what a shard may send (resyncs,
    reconnects); one that raised anyway (a bug, memory) no longer follows its shard, and the
    replica served its rows as current: it stops instead, exit 1, for its supervisor to restart."""
    failed: list[str] = []

    def ended(task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        failed.append(tasks[task])
        log.critical("%s failed; the replica stops rather than serve rows that no longer follow the shard",
                     tasks[task], exc_info=task.exception())
        stop.set()

    for task in tasks:
        task.add_done_callback(ended)
    return failed


def serve_replica(config_path: str | os.PathLike, grace: float = 5.0) -> int:
    """Runs the serving replica of `config_path` until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(load_serve_config(config_path), grace))
