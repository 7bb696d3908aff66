"""PSClient: lookup and push against the shards of a job, one RPC per shard, in parallel.

    keys (n,) --dedupe--> unique (u,) --shard map--> per shard: positions (m_s,) into unique
        --split at the message limit--> one RPC per chunk, all in flight at once
        --replies--> values (u, dim) --inverse--> values (n, dim), row i for keys[i]

Every call has a deadline (retries included). Lookups and pushes are retried on UNAVAILABLE
with backoff until the deadline or `max_attempts` (8 by default, 256 for a shard with a standby),
whichever comes first; a push carries a push id (client id, sequence) that the shard
remembers, so a retried push is applied once. A shard with a standby has two addresses: after
UNAVAILABLE from one (dead, deposed, or the standby refusing) the next attempt goes to the other,
with the same push ids, so a failover applies nothing twice (ps/shard/replication.py).
gRPC errors become embps exceptions in one place, `_translate`; the client never returns partial
results. A shard that gives no answer before the deadline (down, partitioned, or too slow to
matter) is ShardUnavailableError with code UNAVAILABLE, whatever gRPC said last
(DEADLINE_EXCEEDED on a silent link): never a hang.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import grpc
import numpy as np

from ps import bulk_messages, native, wire
from ps.errors import CapacityError, EmbpsError, UnknownTableError, WrongShardError
from ps.job_config import DEFAULT_DEDUPE_WINDOW, DEFAULT_MESSAGE_LIMIT, Deadlines, JobConfig
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.security import RECONNECT_OPTIONS, Role, SecurityConfig, open_channel
from ps.sharding import ShardMap

_SLACK = 4096  # protobuf framing and small fields around the bulk bytes of one message
# A shard takes client ids of at most 256 bytes; each client adds "-" and 12 hex digits of its own.
MAX_CLIENT_NAME_BYTES = 256 - 13
# CANCELLED by the server comes from a shard stopping before any handler saw the call: nothing was
# applied, and a retried push is deduplicated by its push id anyway.
_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_FAILOVER_ATTEMPTS = 256
_FAILOVER_MAX_BACKOFF_S = 0.1
_FAILOVER_ATTEMPT_MIN_S = 2.0


class RPCError(EmbpsError):
    """A shard answered with an error status. `code` is the grpc.StatusCode, `address` the shard."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, address: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.address = address

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(RPCError, ValueError):
    """INVALID_ARGUMENT: the request was malformed (lengths, dim, dtype, non-finite gradients)."""


class TableNotFoundError(RPCError, UnknownTableError):
    """NOT_FOUND: the shard holds no such table."""


class NotOwnerError(RPCError, WrongShardError):
    """FAILED_PRECONDITION: keys were sent to a shard that does not own them."""


class TableFullError(RPCError, CapacityError):
    """RESOURCE_EXHAUSTED: the table is full and has no eviction policy."""


class ShardUnavailableError(RPCError, ConnectionError):
    """No answer from the shard within the call's deadline, after the retries it allowed; `code`
    is always UNAVAILABLE (the last gRPC status, often DEADLINE_EXCEEDED, is in the message)."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: TableNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: NotOwnerError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TableFullError,
}
# Codes that mean "the shard did not answer": the caller sees them all as UNAVAILABLE.
_NO_ANSWER_CODES = _RETRY_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}


def _translate(
    err: grpc.RpcError,
    method: str,
    address: str,
    deadline_seconds: float | None = None,
    attempts: int = 1,
    spent_seconds: float | None = None,
) -> RPCError:
    """The one place a grpc.RpcError becomes an embps exception. `deadline_seconds` (None: the call
    ended on max_attempts first), `attempts` and `spent_seconds` describe the whole call, retries
    included, for the message of a shard that never answered."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code in _NO_ANSWER_CODES:
        if deadline_seconds is not None:
            within = f" within the {deadline_seconds:g} s deadline"
        elif spent_seconds is not None:
            within = f" in {spent_seconds:.1f} s (max_attempts reached before the deadline)"
        else:
            within = ""
        message = (
            f"{method} on shard {address}: UNAVAILABLE: no answer from the shard{within} "
            f"({attempts} attempt{'s' if attempts != 1 else ''}; last: {code.name}: {details})"
        )
        return ShardUnavailableError(message, grpc.StatusCode.UNAVAILABLE, address)
    cls = _ERRORS.get(code, RPCError)
    if cls is TableFullError and (not method.startswith("Push") or "message larger than max" in details):
        # Only a push meets a full table: elsewhere, or a push gRPC refused, it is a size limit
        # (gRPC's own, on either side), not a table to make room in.
        cls = RPCError
    return cls(f"{method} on shard {address}: {code.name}: {details}", code, address)


@dataclass
class PushResult:
    """What one push changed, summed over shards. versions[s]: shard s's table version after it."""

    num_updated: int = 0
    num_inserted: int = 0
    num_evicted: int = 0
    num_duplicates: int = 0  # RPCs a shard had already applied (answered from its push-id memory)
    versions: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedPush:
    """The RPCs of one push round with their push ids, from PSClient.prepare_push.

    Sending it again re-sends the same push ids, so a shard that applied part of it before an
    outage answers that part from its push-id memory instead of applying it twice. This is how a
    caller retries a push past one call's deadline (the trainer's wait mode); a fresh push_many
    would draw new ids and could apply the same gradients twice.
    """

    # PushMulti: each request serialised (ps/bulk_messages.py)
    calls: list[tuple[int, ps_pb2.PushRequest]] | list[tuple[int, bytes]]
    batched: bool  # several tables: the calls to one shard travel in PushBatch RPCs
    method: str = "Push"  # "PushMulti": the calls are multi-table requests (prepare_push_multi)


@dataclass
class _LookupPlan:
    """The RPCs of one table's lookup and how to put their replies back in the caller's order."""

    num_keys: int
    dim: int
    num_unique: int
    inverse: np.ndarray | None
    calls: list[tuple[int, ps_pb2.LookupRequest]] = field(default_factory=list)
    spans: list[np.ndarray] = field(default_factory=list)  # positions into the unique keys, per call

    def finish(self, replies: list) -> np.ndarray:
        """Replies of `calls`, in order -> values (num_keys, dim)."""
        if not replies:
            return np.empty((self.num_keys, self.dim), dtype=np.float32)
        for reply in replies:
            if reply.dim != self.dim:
                raise ValueError(f"lookup reply: rows of dim {reply.dim}, the table's dim is {self.dim}")
        # Replies concatenated hold unique[order]; one gather puts every row where the caller wants it.
        values = np.concatenate(
            [
                wire.decode_values(reply.values, chunk.shape[0], self.dim, reply.dtype)
                for chunk, reply in zip(self.spans, replies, strict=True)
            ]
        )
        order = np.concatenate(self.spans)
        row_of = np.empty(self.num_unique, dtype=np.int64)
        row_of[order] = np.arange(self.num_unique, dtype=np.int64)
        return np.take(values, row_of if self.inverse is None else row_of[self.inverse], axis=0)


class PSClient:
    """Talks to the shards at `addresses` (index = shard number of `shard_map`). Thread-safe."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        shard_map: ShardMap | None = None,
        dims: Mapping[str, int] | None = None,
        message_limit_bytes: int = DEFAULT_MESSAGE_LIMIT,
        deadlines: Deadlines | None = None,
        client_id: str | None = None,
        max_attempts: int = 8,
        backoff_seconds: float = 0.05,
        security: SecurityConfig | None = None,
        role: Role = Role.TRAINER,
        standbys: Sequence[str] = (),
        push_dedupe_window: int = DEFAULT_DEDUPE_WINDOW,
    ) -> None:
        """standbys: shard s's standby address at index s ("" or absent: none). push_dedupe_window:
        the shards' (the job's), the push ids of one client each shard remembers."""
        if not addresses:
            raise ValueError("addresses: need at least one shard address")
        if len(standbys) > len(addresses):  # before any channel opens
            raise ValueError(f"standbys: {len(standbys)} given for {len(addresses)} shards")
        self.addresses = list(addresses)
        self._closed = False
        self.shard_map = shard_map if shard_map is not None else ShardMap.uniform(len(self.addresses))
        if self.shard_map.num_shards != len(self.addresses):
            raise ValueError(
                f"shard_map: maps keys to {self.shard_map.num_shards} shards, {len(self.addresses)} addresses given"
            )
        if message_limit_bytes <= 2 * _SLACK:
            raise ValueError(f"message_limit_bytes: must be > {2 * _SLACK}, got {message_limit_bytes}")
        self.message_limit_bytes = message_limit_bytes
        self.deadlines = deadlines if deadlines is not None else Deadlines()
        if client_id is not None and not 1 <= len(client_id.encode()) <= MAX_CLIENT_NAME_BYTES:
            # An empty id turns the shards' repeat check off; past the limit every push is refused.
            raise ValueError(f"client_id: 1 to {MAX_CLIENT_NAME_BYTES} bytes of UTF-8, got {client_id!r}")
        # A name the caller gives is made this instance's own: a shard knows a repeated push by
        # (client_id, sequence), and every client's sequences start at 1, so two clients of one
        # name (a process restarted with it) had the second's pushes answered as the first's
        # repeats, and never applied. A push is re-sent with its ids as prepared (send_push).
        self.client_id = f"{client_id}-{uuid.uuid4().hex[:12]}" if client_id is not None else uuid.uuid4().hex
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.push_dedupe_window = push_dedupe_window
        self._dims = dict(dims or {})
        self._sequence = itertools.count(1)
        options = [
            ("grpc.max_send_message_length", message_limit_bytes + _SLACK),
            ("grpc.max_receive_message_length", message_limit_bytes + _SLACK),
            *RECONNECT_OPTIONS,
            # A connection whose peer went silent (cut link) is closed after a missed ping instead
            # of holding calls until TCP gives up; pings only go out while calls are in flight.
            ("grpc.keepalive_time_ms", 10000),
            ("grpc.keepalive_timeout_ms", 5000),
            *wire.BULK_CHANNEL_OPTIONS,  # lookups' rows arrive here
        ]
        # TLS and the role's bearer token when the job's [security] has them (ps/security.py).
        self._channels = [open_channel(a, security or SecurityConfig(), role, options) for a in self.addresses]
        self._stubs = [_stub(c) for c in self._channels]
        # Each shard's stubs: its primary's, then its standby's; self._stubs[s] is the one in use.
        self._pairs = [[stub] for stub in self._stubs]
        for shard, standby in enumerate(standbys):
            if standby:
                channel = open_channel(standby, security or SecurityConfig(), role, options)
                self._channels.append(channel)
                self._pairs[shard].append(_stub(channel))
        self._max_backoff = 1.0
        self._retry_codes = _RETRY_CODES
        self._paired = any(len(pair) == 2 for pair in self._pairs)
        self._epochs = [0] * len(self._pairs)  # the newest epoch each paired shard's replies carried
        self._lineages = [""] * len(self._pairs)  # ... and its lineage ("": none known)
        self._epochs_lock = threading.Lock()  # replies of one shard arrive on several threads
        if self._paired:
            # A failover takes about a lease; the other address answers (or refuses) at once, so
            # retries stay frequent to meet the new primary soon, and the deadline bounds them.
            self.max_attempts = max(max_attempts, _FAILOVER_ATTEMPTS)
            self._max_backoff = _FAILOVER_MAX_BACKOFF_S
            # A primary cut off the network answers nothing: an attempt ends after a part of the
            # deadline, and the next one goes to the other address.
            self._retry_codes = _RETRY_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}
        # Enough threads for the RPCs of a multi-table round (lookup_many / push_many) to overlap.
        self._pool = ThreadPoolExecutor(max(16, 2 * len(self.addresses)), thread_name_prefix="ps-client")
        # A paired shard's attempt that ran past its cap waits here for its answer (_patient); one
        # given up (the other of the pair answered) holds its thread until its deadline.
        self._waits = ThreadPoolExecutor(max(16, 4 * len(self.addresses)), thread_name_prefix="ps-client-wait")

    @classmethod
    def from_job(cls, job: JobConfig, **kwargs) -> PSClient:
        """A client for every shard of `job`, with its shard map, table dims, limits, deadlines and
        security (TLS, and the trainer's token unless role= says otherwise)."""
        kwargs.setdefault("dims", {t.name: t.dim for t in job.tables})
        kwargs.setdefault("message_limit_bytes", job.message_limit_bytes)
        kwargs.setdefault("deadlines", job.deadlines)
        kwargs.setdefault("security", job.security)
        kwargs.setdefault("standbys", [s.standby for s in job.shards])
        kwargs.setdefault("push_dedupe_window", job.push_dedupe_window)
        return cls(job.addresses, shard_map=job.shard_map, **kwargs)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
        self._waits.shutdown(wait=False)  # an answer no one waits for ends with its channel, below
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dim(self, table: str) -> int:
        """The table's dim (from the constructor, or asked of shard 0 once)."""
        if table not in self._dims:
            for t in self.stats()[0].tables:
                self._dims.setdefault(t.name, t.dim)
            if table not in self._dims:
                address = self.addresses[0]
                raise TableNotFoundError(f"table {table!r} is not on shard {address}", None, address)
        return self._dims[table]

    def lookup(self, table: str, keys: np.ndarray, step: int | None = None) -> np.ndarray:
        """keys (n,) int64, may repeat -> values (n, dim) float32, row i for keys[i]. step: the
        training step the rows are read for (a table's rows past eviction.ttl_steps at that step
        read as their init value); None: each shard's last step pushed to the table."""
        return self.lookup_many({table: keys}, step)[table]

    def lookup_many(self, requests: Mapping[str, np.ndarray], step: int | None = None) -> dict[str, np.ndarray]:
        """Several tables in one round: {table: keys (n_t,)} -> {table: values (n_t, dim_t)}.

        Every RPC of every table is in flight at once, under one deadline. step: as in lookup.
        """
        plans = [self._plan_lookup(table, keys, step) for table, keys in requests.items()]
        calls = [c for plan in plans for c in plan.calls]
        call = self._call_batched if len(plans) > 1 else self._call_all
        replies = call("Lookup", calls, self.deadlines.lookup)
        out, start = {}, 0
        for table, plan in zip(requests, plans, strict=True):
            out[table] = plan.finish(replies[start : start + len(plan.calls)])
            start += len(plan.calls)
        return out

    def _plan_lookup(self, table: str, keys: np.ndarray, step: int | None) -> _LookupPlan:
        keys = native.as_keys(keys)
        dim = self.dim(table)
        unique, inverse = _unique(keys)
        plan = _LookupPlan(keys.shape[0], dim, unique.shape[0], inverse)
        per_key = max(8, 4 * dim)
        for shard, positions in enumerate(self.shard_map.split(unique)):
            for chunk in self._chunks(positions, per_key):
                request = ps_pb2.LookupRequest(table=table, keys=wire.encode_keys(unique[chunk]), dim=dim, step=step)
                plan.calls.append((shard, request))
                plan.spans.append(chunk)
        return plan

    def push(
        self,
        table: str,
        keys: np.ndarray,
        grads: np.ndarray,
        step: int | None = None,
        counts: np.ndarray | None = None,
    ) -> PushResult:
        """keys (n,) int64, may repeat; grads (n, dim) float32. Gradients of equal keys are summed
        here and sent once, with the number of sightings as counts. step: the training step
        (default: each shard's table version + 1). Each RPC is applied once, even when retried."""
        return self.push_many([(table, keys, grads, counts)], step)

    def push_many(
        self, items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], step: int | None = None
    ) -> PushResult:
        """Several tables in one round: items of (table, keys (n,), grads (n, dim), counts (n,) or
        None), as in push; every RPC is in flight at once, under one deadline."""
        return self.send_push(self.prepare_push(items, step))

    def prepare_push(
        self, items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], step: int | None = None
    ) -> PreparedPush:
        """The RPCs of push_many(items, step), push ids assigned, not sent (see PreparedPush).
        ValueError for a table named twice: each item is one optimizer step, so its keys would take
        two (sum the gradients into one item instead)."""
        tables = [item[0] for item in items]
        if len(set(tables)) != len(tables):
            raise ValueError("items: a table appears more than once in one push")
        calls = [c for table, keys, grads, counts in items for c in self._plan_push(table, keys, grads, counts, step)]
        return PreparedPush(calls, batched=len(items) > 1)

    def send_push(self, prepared: PreparedPush) -> PushResult:
        """Sends a prepared push; sending the same one again applies nothing twice. ValueError, before
        anything is sent, when it makes more calls to one shard than the shard remembers push ids
        of a client (push_dedupe_window): sent again, the ids of its first calls were forgotten by
        then, and those calls applied twice (a review's repro: 10 calls, window 4, most keys' rows
        updated twice)."""
        calls = prepared.calls
        most = max(Counter(shard for shard, _ in calls).values(), default=0)
        if most > self.push_dedupe_window:
            raise ValueError(
                f"push_dedupe_window: {self.push_dedupe_window} push ids, and this push sends {most} calls to one "
                f"shard (split at message_limit_bytes {self.message_limit_bytes:,}): sent again, some would apply "
                "twice; raise push_dedupe_window or message_limit_bytes"
            )
        result = PushResult()
        if prepared.method == "PushMulti":
            replies = self._call_all("PushMulti", calls, self.deadlines.push)
        else:
            call = self._call_batched if prepared.batched else self._call_all
            replies = call("Push", calls, self.deadlines.push)
        for (shard, _), reply in zip(calls, replies, strict=True):
            result.num_updated += reply.num_updated
            result.num_inserted += reply.num_inserted
            result.num_evicted += reply.num_evicted
            result.num_duplicates += int(reply.duplicate)
            version = max(reply.versions, default=0) if prepared.method == "PushMulti" else reply.version
            result.versions[shard] = max(result.versions.get(shard, 0), version)
        return result

    # -- multi-table rounds: every table's keys in one buffer, one RPC per shard ---------------

    def lookup_multi(
        self, tables: Sequence[str], keys: np.ndarray, offsets: np.ndarray, step: int | None = None
    ) -> np.ndarray:
        """Every table of a round in one LookupMulti RPC per shard (split only at the message limit).

        keys (n,) int64, table after table: table i's keys are keys[offsets[i] : offsets[i + 1]]
        (T + 1 offsets, 0 first). Returns the values flat, float32, table after table: table i's
        (n_i, dim_i) rows in key order (reshape to (n, dim) when every dim is equal). step: as in
        lookup.
        """
        layout = _MultiLayout.of(self, tables, keys, offsets)
        out = np.empty(int(layout.value_starts[-1]), dtype=np.float32)
        for chunk, values in self._lookup_multi_replies(layout, step):
            layout.put(out, chunk, values)
        return out

    def lookup_multi_grouped(
        self, tables: Sequence[str], keys: np.ndarray, offsets: np.ndarray, step: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """lookup_multi without putting the rows back in key order, for tables of one dim:
        (values (n, dim) float32 in the order the shards answered, shard after shard; positions
        (n,) int64, row j holding keys[positions[j]], or None when the rows are in key order).

        For a caller that indexes its rows anyway (the trainer folds positions into its gather
        of the rows per feature): it saves lookup_multi's scatter of every row into key order,
        and its rows come grouped by shard, so by owner rank (the sparse exchange sends them
        without another gather). step: as in lookup."""
        layout = _MultiLayout.of(self, tables, keys, offsets)
        if layout.tables and not layout.equal_dim:
            raise ValueError(
                f"tables: lookup_multi_grouped needs tables of one dim, got {sorted(set(layout.dim_of.values()))}"
            )
        dim = layout.equal_dim
        out = np.empty((layout.keys.shape[0], dim), dtype=np.float32)
        spans, start = [], 0
        for chunk, values in self._lookup_multi_replies(layout, step):
            out[start : start + chunk.shape[0]] = values.reshape(-1, dim)
            start += chunk.shape[0]
            spans.append(chunk)
        return out, np.concatenate(spans) if spans else None

    def _lookup_multi_replies(self, layout: _MultiLayout, step: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The LookupMulti RPCs of a round, one per shard (split only at the message limit), all in
        flight at once: (positions into the keys, their values flat in that order) per RPC."""
        calls, spans = [], []
        for shard, chunk, names, sizes in self._plan_multi(layout, extra_per_key=8):
            header = ps_pb2.MultiLookupRequest(
                tables=names, dims=[layout.dim_of[name] for name in names], offsets=_offsets_of(sizes), step=step
            )
            request = bulk_messages.encode(header, keys=wire.keys_buffer(layout.keys[chunk]))
            calls.append((shard, request))
            spans.append(chunk)
        replies = self._call_all("LookupMulti", calls, self.deadlines.lookup)
        out = []
        for chunk, reply in zip(spans, replies, strict=True):
            total = int(layout.key_dims[chunk].sum())
            out.append((chunk, wire.decode_values(reply.values, total, 1, reply.dtype).reshape(-1)))
        return out

    def prepare_push_multi(
        self,
        tables: Sequence[str],
        keys: np.ndarray,
        offsets: np.ndarray,
        grads: np.ndarray,
        counts: np.ndarray | None = None,
        step: int | None = None,
        distinct: bool = False,
    ) -> PreparedPush:
        """One push round of every table as PushMulti RPCs (one per shard, split only at the
        message limit), push ids assigned, not sent. keys and offsets as in lookup_multi; grads
        float32 flat, table after table (n_i, dim_i) rows, or (n, dim) when every dim is equal;
        counts (n,) int64 or None. Gradients of equal keys of a table are summed here and sent
        once (as push does), so a split round still applies one step per key; distinct=True says
        the keys of each table are already distinct (the trainer's), which skips that pass."""
        layout = _MultiLayout.of(self, tables, keys, offsets)
        grads = np.asarray(grads)
        if grads.dtype != np.float32:
            raise TypeError(f"grads: expected dtype float32, got {grads.dtype}")
        flat = np.ascontiguousarray(grads).reshape(-1)
        if flat.shape[0] != layout.value_starts[-1]:
            raise ValueError(
                f"grads: expected {int(layout.value_starts[-1])} values (keys x their table's dim), got {flat.shape[0]}"
            )
        if counts is not None:
            counts = native.as_keys(counts, "counts")
            if counts.shape != layout.keys.shape:
                raise ValueError(f"counts: expected shape {layout.keys.shape}, got {counts.shape}")
            native.check_counts(counts)  # here: counts all <= 1 are not sent, and the shard would count 0 as 1
        if not distinct:
            layout, flat, counts = layout.summed(self, flat, counts)
        _refuse_bad_gradients(flat, layout.describe_value)
        if counts is not None and counts.shape[0] and int(counts.max()) <= 1:
            counts = None
        calls = []
        for shard, chunk, names, sizes in self._plan_multi(layout, extra_per_key=16):
            header = ps_pb2.MultiPushRequest(
                tables=names,
                dims=[layout.dim_of[name] for name in names],
                offsets=_offsets_of(sizes),
                dtype=ps_pb2.FLOAT32,
                push_id=ps_pb2.PushId(client_id=self.client_id, sequence=next(self._sequence)),
            )
            if step is not None:
                header.step = step
            request = bulk_messages.encode(
                header,
                keys=wire.keys_buffer(layout.keys[chunk]),
                grads=wire.values_buffer(layout.take(flat, chunk)),
                counts=wire.keys_buffer(counts[chunk]) if counts is not None else b"",
            )
            calls.append((shard, request))
        return PreparedPush(calls, batched=False, method="PushMulti")

    def _plan_multi(
        self, layout: _MultiLayout, extra_per_key: int
    ) -> list[tuple[int, np.ndarray, list[str], list[int]]]:
        """(shard, positions into the keys, tables present, keys per table) per RPC: the keys of
        each shard in table order, cut where a message would pass the limit."""
        limit = self.message_limit_bytes - _SLACK - sum(len(t) + 24 for t in layout.tables)
        plans = []
        for shard, positions in enumerate(self.shard_map.split(layout.keys)):
            if positions.shape[0] == 0:
                continue
            cost = np.cumsum(4 * layout.key_dims[positions] + extra_per_key)
            cuts = [0]
            while cuts[-1] < positions.shape[0]:
                spent = cost[cuts[-1] - 1] if cuts[-1] else 0
                cuts.append(max(cuts[-1] + 1, int(np.searchsorted(cost, spent + limit, side="right"))))
            for a, b in zip(cuts[:-1], cuts[1:], strict=False):
                chunk = positions[a:b]
                per_table = np.bincount(layout.table_of[chunk], minlength=len(layout.tables))
                present = np.flatnonzero(per_table)
                plans.append((shard, chunk, [layout.tables[i] for i in present], per_table[present].tolist()))
        return plans

    def _plan_push(
        self, table: str, keys: np.ndarray, grads: np.ndarray, counts: np.ndarray | None, step: int | None
    ) -> list[tuple[int, ps_pb2.PushRequest]]:
        keys = native.as_keys(keys)
        dim = self.dim(table)
        grads = np.asarray(grads)
        if grads.dtype != np.float32:
            raise TypeError(f"grads: expected dtype float32, got {grads.dtype}")
        if grads.shape != (keys.shape[0], dim):
            raise ValueError(f"grads: expected shape ({keys.shape[0]}, {dim}), got {grads.shape}")
        if counts is not None:
            counts = native.as_keys(counts, "counts")
            if counts.shape != keys.shape:
                raise ValueError(f"counts: expected shape {keys.shape}, got {counts.shape}")
            native.check_counts(counts)  # here: counts all <= 1 are not sent, and the shard would count 0 as 1
        unique, sums, sightings = native.dedupe_sum(keys, np.ascontiguousarray(grads), counts, dim)
        _refuse_bad_gradients(sums, lambda at: _key_and_row(unique[at // dim], keys))
        send_counts = sightings.shape[0] and int(sightings.max()) > 1
        per_key = 8 + 4 * dim + (8 if send_counts else 0)
        calls = []
        for shard, positions in enumerate(self.shard_map.split(unique)):
            for chunk in self._chunks(positions, per_key):
                request = ps_pb2.PushRequest(
                    table=table,
                    keys=wire.encode_keys(unique[chunk]),
                    grads=wire.encode_values(sums[chunk], dim, "grads"),
                    dim=dim,
                    dtype=ps_pb2.FLOAT32,
                    push_id=ps_pb2.PushId(client_id=self.client_id, sequence=next(self._sequence)),
                    counts=wire.encode_keys(sightings[chunk]) if send_counts else b"",
                )
                if step is not None:
                    request.step = step
                calls.append((shard, request))
        return calls

    def commit(self, step: int, dense_state: bytes = b"", dense_format: str = "") -> list[ps_pb2.CommitResponse]:
        """Tells every shard that step `step` is complete (every push of steps <= step acknowledged
        everywhere); dense_state, the dense tower at that step, goes to shard 0 only. Replies in
        shard order. Safe to repeat."""
        calls = [
            (s, ps_pb2.CommitRequest(step=step, **({"dense_state": dense_state, "dense_format": dense_format}
                                                   if s == 0 and dense_state else {})))
            for s in range(len(self.addresses))
        ]
        return self._call_all("Commit", calls, self.deadlines.push)

    def stats(self) -> list[ps_pb2.StatsResponse]:
        """One StatsResponse per shard, in shard order."""
        calls = [(s, ps_pb2.StatsRequest()) for s in range(len(self.addresses))]
        return self._call_all("Stats", calls, self.deadlines.stats)

    def _chunks(self, positions: np.ndarray, bytes_per_key: int) -> list[np.ndarray]:
        if positions.shape[0] == 0:
            return []
        per_chunk = max(1, (self.message_limit_bytes - _SLACK) // bytes_per_key)
        return [positions[i : i + per_chunk] for i in range(0, positions.shape[0], per_chunk)]

    def _call_batched(self, method: str, calls: list[tuple[int, object]], deadline_seconds: float) -> list:
        """Like _call_all, but the calls to one shard travel together in LookupBatch/PushBatch
        RPCs of up to the message limit: one RPC per shard per round instead of one per table."""
        if len({shard for shard, _ in calls}) == len(calls):
            return self._call_all(method, calls, deadline_seconds)
        batch_type = {"Lookup": ps_pb2.LookupBatchRequest, "Push": ps_pb2.PushBatchRequest}[method]
        groups: list[tuple[int, list[int]]] = []
        open_group: dict[int, tuple[int, int]] = {}  # shard -> (index in groups, bytes so far)
        limit = self.message_limit_bytes - _SLACK
        for i, (shard, request) in enumerate(calls):
            size = request.ByteSize() + 16
            if method == "Lookup":  # the reply is what grows: dim float32 words a key
                size = max(size, len(request.keys) // 8 * 4 * self.dim(request.table) + 64)
            current = open_group.get(shard)
            if current is None or current[1] + size > limit or len(groups[current[0]][1]) >= wire.MAX_BATCH_PARTS:
                groups.append((shard, []))
                current = (len(groups) - 1, 0)
            groups[current[0]][1].append(i)
            open_group[shard] = (current[0], current[1] + size)
        batches = [(shard, batch_type(requests=[calls[i][1] for i in members])) for shard, members in groups]
        replies: list = [None] * len(calls)
        batch_replies = self._call_all(method + "Batch", batches, deadline_seconds)
        for (_, members), reply in zip(groups, batch_replies, strict=True):
            for i, part in zip(members, reply.responses, strict=True):
                replies[i] = part
        return replies

    def _call_all(self, method: str, calls: list[tuple[int, object]], deadline_seconds: float) -> list:
        """Sends every (shard, request) at once; retries those that fail with UNAVAILABLE until
        `deadline_seconds` after the first send; returns the replies in call order."""
        if self._closed:
            raise RuntimeError("PSClient: closed; calls need a new client")
        if not calls:
            return []
        end = time.monotonic() + deadline_seconds
        replies: list = [None] * len(calls)
        pending = list(range(len(calls)))
        slow: set[int] = set()  # calls whose last attempt on a paired shard ran past its cap
        attempt = 0
        while True:
            attempt += 1
            # Each RPC's timeout is taken when it starts: with more RPCs than the pool has threads,
            # one that waited in the pool's queue with a timeout taken here ran past `end` (a call
            # of 42 RPCs with a 1 s deadline raised after 3 s).
            cap = max(_FAILOVER_ATTEMPT_MIN_S, deadline_seconds / 4) if self._paired else None
            # The last call runs on this thread, the others on the pool: sync grpc's .future()
            # would start a polling thread per call, which costs more than the call itself.
            futures = [
                (i, self._pool.submit(self._invoke, method, calls[i], end, cap, i in slow)) for i in pending[:-1]
            ]
            outcomes = [(pending[-1], self._invoke(method, calls[pending[-1]], end, cap, pending[-1] in slow))]
            outcomes += [(i, future.result()) for i, future in futures]
            retry, failure = [], None
            for i, outcome in sorted(outcomes, key=lambda pair: pair[0]):
                if not isinstance(outcome, grpc.RpcError):
                    replies[i] = outcome
                    continue
                if outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED and len(self._pairs[calls[i][0]]) == 2:
                    slow.add(i)
                else:
                    slow.discard(i)
                if outcome.code() in self._retry_codes:
                    retry.append(i)
                if failure is None or failure[1].code() in self._retry_codes:
                    failure = (i, outcome)
            if failure is None:
                return replies
            i, err = failure
            pause = min(self.backoff_seconds * 2 ** (attempt - 1), self._max_backoff)
            past_deadline = time.monotonic() + pause >= end
            if err.code() not in self._retry_codes or attempt == self.max_attempts or past_deadline:
                # Said as it ended: the deadline, or max_attempts before it (the message claimed the
                # deadline either way: "within the 30 s deadline" after 3.6 s and 8 attempts).
                waited = deadline_seconds if past_deadline or attempt != self.max_attempts else None
                spent = deadline_seconds - (end - time.monotonic())
                raise _translate(err, method, self.addresses[calls[i][0]], waited, attempt, spent) from None
            time.sleep(pause)
            pending = retry

    def _invoke(
        self, method: str, call: tuple[int, object], end: float, cap: float | None = None, patient: bool = False
    ):
        """One blocking RPC that ends by `end` (time.monotonic); returns the reply or the
        grpc.RpcError (never raises it): DEADLINE_EXCEEDED, unsent, when `end` passed before it
        could start. A paired shard's attempt ends after at most `cap` seconds (a primary cut off
        the network answers nothing: the next attempt asks the other of the pair too); `patient`:
        the call's previous attempt ran past the cap (see _patient)."""
        shard, request = call
        timeout = end - time.monotonic()
        if timeout <= 0:
            return _NotSent(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before this RPC could start")
        pair, stub = self._pairs[shard], self._stubs[shard]
        if len(pair) == 1:
            try:
                return getattr(stub, method)(request, timeout=timeout)
            except grpc.RpcError as err:
                return err
        if patient and cap is not None:
            return self._patient(method, shard, request, end, cap)
        outcome = self._attempt(stub, method, shard, request, timeout if cap is None else min(timeout, cap))
        if isinstance(outcome, grpc.RpcError) and outcome.code() in _RETRY_CODES and self._stubs[shard] is stub:
            self._stubs[shard] = pair[1] if stub is pair[0] else pair[0]  # the other of the pair
        return outcome

    def _attempt(self, stub, method: str, shard: int, request, timeout: float):
        """One RPC to a paired shard's process; the reply or the grpc.RpcError. The call carries the
        newest epoch seen of the shard and its lineage, so a deposed primary that still believes in
        its lease refuses it (ps/shard/server.py check_call). An epoch of a record without a lineage
        goes with wire.NO_LINEAGE: with no lineage key at all the shard takes the client for an older
        one and compares its epoch across lineages, and a pair started over where etcd lost that
        record (a new lineage, epoch 1) refused it for good."""
        with self._epochs_lock:
            epoch, lineage = self._epochs[shard], self._lineages[shard]
        metadata = ((wire.EPOCH_METADATA_KEY, str(epoch)), (wire.LINEAGE_METADATA_KEY, lineage or wire.NO_LINEAGE))
        try:
            reply, rpc = getattr(stub, method).with_call(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as err:
            return err
        self._note_epoch(shard, rpc)
        return reply

    def _attempt_until(self, stub, method: str, shard: int, request, end: float):
        """_attempt with the time left until `end` when it starts (it may wait for a thread first)."""
        timeout = end - time.monotonic()
        if timeout <= 0:
            return _NotSent(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before this RPC could start")
        return self._attempt(stub, method, shard, request, timeout)

    def _patient(self, method: str, shard: int, request, end: float, cap: float):
        """An attempt after one that ran past `cap`: that process may be slow rather than cut off
        (a big batch, a loaded shard, a primary waiting for a slow standby's ack). Before, each
        attempt was cut at the cap and the next went to the other of the pair, which refused it as
        the standby: a healthy shard slower than the cap never answered a client told of its
        standby. Now the slow one is asked again with the whole time left, its answer awaited on a
        thread of self._waits, while the other is asked every `cap` seconds: the first answer wins
        (a push both get is applied once: its push id), and an answer of the other makes it the
        one in use (it took over)."""
        pair = self._pairs[shard]
        slow = self._stubs[shard]
        other = pair[1] if slow is pair[0] else pair[0]
        waiting = self._waits.submit(self._attempt_until, slow, method, shard, request, end)
        while True:
            left = end - time.monotonic()
            try:
                outcome = waiting.result(timeout=max(0.0, min(cap, left)))
            except FutureTimeout:
                if left <= 0:  # its answer, if it comes now, is past the deadline
                    return _NotSent(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within the deadline")
            else:
                if isinstance(outcome, grpc.RpcError) and outcome.code() in _RETRY_CODES and self._stubs[shard] is slow:
                    self._stubs[shard] = other
                return outcome
            answer = self._attempt(other, method, shard, request, max(0.001, min(cap, end - time.monotonic())))
            if not isinstance(answer, grpc.RpcError):
                self._stubs[shard] = other
                return answer
            if answer.code() not in self._retry_codes:
                return answer


    def _note_epoch(self, shard: int, rpc: grpc.Call) -> None:
        """Keeps the newest epoch a reply carried. One of another lineage replaces it whatever its
        number: the process that answered accepted this client's epoch as not of its lineage (a pair
        started over where etcd lost its record, at epoch 1 again), and keeping the old number made
        every later call refused by that pair."""
        epoch, lineage = None, ""
        for key, value in rpc.trailing_metadata() or ():
            if key == wire.EPOCH_METADATA_KEY and value.isascii() and value.isdigit() and len(value) <= 20:
                epoch = int(value)
            elif key == wire.LINEAGE_METADATA_KEY and value.isascii() and value.isalnum() and len(value) <= 64:
                lineage = value
        if epoch is None:
            return
        with self._epochs_lock:
            if lineage != self._lineages[shard]:
                self._epochs[shard], self._lineages[shard] = epoch, lineage
            else:
                self._epochs[shard] = max(self._epochs[shard], epoch)


class _NotSent(grpc.RpcError):
    """The outcome of an RPC that was never sent (its code and details, as a failed call's)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _stub(channel: grpc.Channel) -> ps_pb2_grpc.ParameterServerStub:
    """The generated stub, except that the table calls also take requests already serialised by
    ps/bulk_messages.py, and a lookup reply's values are read where they arrived: the megabytes of
    a multi-table round are copied once on the way out and not at all on the way in."""
    stub = ps_pb2_grpc.ParameterServerStub(channel)
    for method, reply in (
        ("Lookup", bulk_messages.parser(ps_pb2.LookupResponse, ("values",))),
        ("LookupMulti", bulk_messages.parser(ps_pb2.MultiLookupResponse, ("values",))),
        ("Push", ps_pb2.PushResponse.FromString),
        ("PushMulti", ps_pb2.MultiPushResponse.FromString),
    ):
        call = channel.unary_unary(
            f"/embps.v1.ParameterServer/{method}",
            request_serializer=bulk_messages.serialize,
            response_deserializer=reply,
            _registered_method=True,
        )
        setattr(stub, method, call)
    return stub


def _offsets_of(sizes: list[int]) -> list[int]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def _refuse_bad_gradients(values: np.ndarray, describe: Callable[[int], str]) -> None:
    """ValueError, before anything is sent, when a gradient a push would send (a key's sum in it)
    is NaN, infinite or beyond +-MAX_GRADIENT: each shard refuses such a push whole, and the shards
    without the bad key would have applied theirs. describe(flat position) names its key."""
    if (bad := native.first_bad_gradient(values)) is None:
        return
    position, what = bad
    raise ValueError(
        f"grads: {what} {describe(position)} (the sum of its gradients in this push); the whole push is refused, "
        "on every shard, so that one bad gradient cannot poison a row"
    )


def _key_and_row(key: int, keys: np.ndarray) -> str:
    """A key of a push and the caller's first row of it."""
    return f"for key {int(key)} (row {int(np.flatnonzero(keys == key)[0])})"


@dataclass
class _MultiLayout:
    """Where each key of a multi-table round sits: its table, its dim, its values' start."""

    tables: list[str]
    dim_of: dict[str, int]
    keys: np.ndarray
    offsets: np.ndarray  # (T + 1,) where each table's keys start
    table_of: np.ndarray  # (n,) table index of each key
    key_dims: np.ndarray  # (n,) dim of each key's table
    value_starts: np.ndarray  # (T + 1,) where each table's values start in the flat buffer
    equal_dim: int  # the common dim, or 0 when the tables' dims differ

    @classmethod
    def of(cls, client: PSClient, tables: Sequence[str], keys: np.ndarray, offsets: np.ndarray) -> _MultiLayout:
        tables = list(tables)
        if len(set(tables)) != len(tables):
            raise ValueError("tables: a table appears more than once")
        keys = native.as_keys(keys)
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.shape != (len(tables) + 1,) or offsets[0] != 0 or offsets[-1] != keys.shape[0]:
            raise ValueError(f"offsets: expected {len(tables) + 1} offsets from 0 to {keys.shape[0]}")
        sizes = np.diff(offsets)
        if (sizes < 0).any():
            raise ValueError("offsets: must not decrease")
        dims = np.array([client.dim(t) for t in tables], dtype=np.int64)
        table_of = np.repeat(np.arange(len(tables), dtype=np.int64), sizes)
        value_starts = np.zeros(len(tables) + 1, dtype=np.int64)
        np.cumsum(sizes * dims, out=value_starts[1:])
        equal = int(dims[0]) if dims.shape[0] and (dims == dims[0]).all() else 0
        dim_of = dict(zip(tables, dims.tolist(), strict=True))
        return cls(tables, dim_of, keys, offsets, table_of, dims[table_of], value_starts, equal)

    def summed(
        self, client: PSClient, flat: np.ndarray, counts: np.ndarray | None
    ) -> tuple[_MultiLayout, np.ndarray, np.ndarray]:
        """The layout of each table's distinct keys, their summed grads (flat) and sightings."""
        keys, grads, sightings = [], [], []
        for i, table in enumerate(self.tables):
            a, b = self.offsets[i], self.offsets[i + 1]
            dim = self.dim_of[table]
            part = flat[self.value_starts[i] : self.value_starts[i + 1]].reshape(-1, dim)
            unique, sums, seen = native.dedupe_sum(self.keys[a:b], part, None if counts is None else counts[a:b], dim)
            keys.append(unique)
            grads.append(sums.reshape(-1))
            sightings.append(seen)
        offsets = np.zeros(len(self.tables) + 1, dtype=np.int64)
        np.cumsum([k.shape[0] for k in keys], out=offsets[1:])
        merged = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        layout = _MultiLayout.of(client, self.tables, merged, offsets)
        flat = np.concatenate(grads) if grads else np.zeros(0, dtype=np.float32)
        return layout, flat, np.concatenate(sightings) if sightings else np.zeros(0, dtype=np.int64)

    def describe_value(self, position: int) -> str:
        """Whose value is at `position` of the flat value buffer: its key and table."""
        t = int(np.searchsorted(self.value_starts, position, side="right")) - 1
        key = int(self.keys[self.offsets[t] + (position - int(self.value_starts[t])) // self.dim_of[self.tables[t]]])
        return f"for key {key} of table {self.tables[t]!r}"

    def _index(self, chunk: np.ndarray) -> np.ndarray:
        """Positions in the flat value buffer of the values of keys `chunk`, in chunk order."""
        d = self.key_dims[chunk]
        t = self.table_of[chunk]
        starts = self.value_starts[t] + (chunk - self.offsets[t]) * d
        within = np.arange(int(d.sum()), dtype=np.int64) - np.repeat(np.cumsum(d) - d, d)
        return np.repeat(starts, d) + within

    def take(self, flat: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """The values of keys `chunk` from a flat buffer, in chunk order."""
        if chunk.shape[0] == self.keys.shape[0]:  # every key, in order (positions are sorted): no gather
            return flat
        if self.equal_dim:
            return flat.reshape(-1, self.equal_dim)[chunk]
        return flat[self._index(chunk)]

    def put(self, flat: np.ndarray, chunk: np.ndarray, values: np.ndarray) -> None:
        """flat[values of keys chunk] = values (flat, chunk order)."""
        if self.equal_dim:
            flat.reshape(-1, self.equal_dim)[chunk] = values.reshape(-1, self.equal_dim)
        else:
            flat[self._index(chunk)] = values


def _unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """keys (n,) -> (unique (u,) int64, inverse (n,) int64 with unique[inverse] == keys), or
    (keys, None) when the keys are already distinct."""
    # Sized for every key, so it never grows. 64 sub-maps: a map per call pays for its sub-map
    # headers (1,024 cost 0.08 ms at 512 keys) and one array probes slower at 100k keys.
    seen = native.HashMap(keys.shape[0], sub_maps=64)
    inverse, _ = seen.find_or_insert(keys)
    if seen.size == keys.shape[0]:
        return keys, None
    unique = np.empty(seen.size, dtype=np.int64)
    unique[inverse] = keys
    return unique, inverse
