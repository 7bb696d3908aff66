"""ServingClient: the reader's side of serving replicas (Serving.Lookup and Serving.LookupMany).

    client = ServingClient.from_job(load_job_config("job.toml"), ["10.0.0.5:50200", "10.0.0.6:50200"])
    values, found = client.lookup("user", user_ids)                        # (n, dim), (n,) bool
    rows = client.lookup_many({"user": user_ids, "item": item_ids})         # one RPC for every table
    item_values, item_found = rows["item"]

Each call sends every key once (duplicates are looked up once and copied back in the caller's
order; the reply's rows are read where they arrived and copied once, into the arrays returned),
goes to the next replica in turn (round robin over `addresses`), and has a deadline (`timeout_s`,
for the call as a whole, failovers included). A replica that answers UNAVAILABLE
(down, unreachable, shutting down) or RESOURCE_EXHAUSTED (its queue is full: load shedding) is
skipped and the call goes to the next one; when every replica refused, ReplicasUnavailableError
names each one's answer. Any other status (INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED, ...)
is the caller's to see and is raised as the grpc.RpcError it is, without trying another replica.
A call whose request or reply would pass the message limit (a request of more bytes than
message_limit_bytes is not sent; a replica refuses such a reply, RESOURCE_EXHAUSTED "over
message_limit_bytes") is split into parts, answered at one model version, within the same deadline.

TLS and the reader's bearer token come from the job's `[security]` (ps/security's channels: TLS
files and token are re-read when they change).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from ps import bulk_messages, native, wire
from ps.job_config import JobConfig
from ps.rpc import ps_pb2, serving_pb2, serving_pb2_grpc
from ps.security import RECONNECT_OPTIONS, Role, SecurityConfig, open_channel

# CANCELLED: a replica without the gate sheds in gRPC's core, which answers so (serving/shedding.py);
# this client never cancels its own calls.
FAILOVER_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)
DEFAULT_TIMEOUT_S = 1.0
# A replica whose attempt failed (let the deadline pass: hung, SIGSTOPped, far slower than the others;
# or refused: UNAVAILABLE, RESOURCE_EXHAUSTED) is tried after the others for this long,
SLOW_REPLICA_SECONDS = 10.0
# when the attempt itself took at least this share of the call's timeout_s: one given what the replicas
# before it left (one that refused late, the earlier parts of a split lookup) and missing it has not shown
# it is slow, and one that refuses at once costs the calls that begin at it nothing.
SLOW_REPLICA_FAIR_SHARE = 0.5
_OVER_LIMIT = "over message_limit_bytes"  # a replica's refusal of a reply too large (serving_lookup.cpp, server.py)
# gRPC's own refusal of a message over a channel's or server's limit (a request: "Sent message larger than
# max" in this client, "Received message larger than max" in a replica of a smaller limit).
_LARGER_THAN_MAX = "message larger than max"
_VERSION_TRIES = 3
_MESSAGE_SLACK = 1 << 16
_DTYPES = {np.dtype(np.float32): ps_pb2.FLOAT32, np.dtype(np.float16): ps_pb2.FLOAT16}
_SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
_BULK = ("values", "found")  # a reply's rows and flags: read in place, not copied by protobuf


def _lookup_reply(data: bytes) -> bulk_messages.BulkMessage:
    return bulk_messages.parse(serving_pb2.ServingLookupResponse, data, _BULK)


def _lookup_many_reply(data: bytes) -> tuple[serving_pb2.ServingLookupManyResponse, list[bulk_messages.BulkMessage]]:
    """(the reply without its results, the results in order)."""
    return bulk_messages.parse_repeated(
        serving_pb2.ServingLookupManyResponse, data, "results", serving_pb2.ServingLookupResponse, _BULK
    )


class _ReplyTooLarge(Exception):
    """A replica refused a lookup whose reply would pass the message limit: split it."""


class _VersionMoved(Exception):
    """Two parts of a split lookup were answered at different model versions."""


class ReplicasUnavailableError(RuntimeError):
    """Every replica answered UNAVAILABLE or RESOURCE_EXHAUSTED to one call. `answers`: (address,
    status code, message) per replica tried, in order."""

    def __init__(self, answers: list[tuple[str, grpc.StatusCode, str]]) -> None:
        self.answers = answers
        tried = "; ".join(f"{address}: {code.name} ({message})" for address, code, message in answers)
        super().__init__(f"no serving replica answered: {tried}")


@dataclass(frozen=True)
class _Replica:
    address: str
    channel: grpc.Channel
    stub: serving_pb2_grpc.ServingStub
    lookup: grpc.UnaryUnaryMultiCallable  # Serving/Lookup, its reply parsed by _lookup_reply
    lookup_many: grpc.UnaryUnaryMultiCallable  # Serving/LookupMany, by _lookup_many_reply

    @classmethod
    def open(cls, address: str, channel: grpc.Channel) -> _Replica:
        lookup = channel.unary_unary(
            f"/{_SERVICE}/Lookup",
            request_serializer=serving_pb2.ServingLookupRequest.SerializeToString,
            response_deserializer=_lookup_reply,
        )
        lookup_many = channel.unary_unary(
            f"/{_SERVICE}/LookupMany",
            request_serializer=serving_pb2.ServingLookupManyRequest.SerializeToString,
            response_deserializer=_lookup_many_reply,
        )
        return cls(address, channel, serving_pb2_grpc.ServingStub(channel), lookup, lookup_many)


class ServingClient:
    """Lookups against one or more serving replicas of the same tables; thread-safe.

    addresses: host:port of each replica; security: the job's [security] (TLS, reader token);
    timeout_s: the deadline of each call; dtype: of the values returned (and sent), float32 or
    float16; message_limit_bytes: the largest message either way (the job's limit).
    """

    def __init__(
        self,
        addresses: Sequence[str],
        security: SecurityConfig | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        dtype: np.dtype | type = np.float32,
        message_limit_bytes: int = 64 << 20,
    ) -> None:
        if isinstance(addresses, str) or not addresses:
            raise ValueError(f"addresses: give a non-empty list of host:port, got {addresses!r}")
        for address in addresses:
            if not isinstance(address, str) or ":" not in address:
                raise ValueError(f"addresses: each must be 'host:port', got {address!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if np.dtype(dtype) not in _DTYPES:
            raise ValueError(f"dtype: must be float32 or float16, got {np.dtype(dtype)}")
        security = security if security is not None else SecurityConfig()
        self.timeout_s = float(timeout_s)
        self.dtype = np.dtype(dtype)
        self.message_limit_bytes = message_limit_bytes
        limit = message_limit_bytes + _MESSAGE_SLACK
        # A replica that comes back after a restart is answered again within a second.
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            *RECONNECT_OPTIONS,
        ]
        role = Role.READER if security.auth else None
        self._replicas = []
        for address in addresses:
            self._replicas.append(_Replica.open(address, open_channel(address, security, role, options)))
        self._turn = itertools.count()
        self._slow_until = [0.0] * len(self._replicas)  # time.monotonic() until which each is tried last

    @classmethod
    def from_job(cls, job: JobConfig, addresses: Sequence[str], **kwargs) -> ServingClient:
        """A client of the replicas at `addresses` that serve `job`: its [security] and message limit."""
        kwargs.setdefault("security", job.security)
        kwargs.setdefault("message_limit_bytes", job.message_limit_bytes)
        return cls(addresses, **kwargs)

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self._replicas]

    def lookup(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keys (n,) int64 -> (values (n, dim) in self.dtype, found (n,) bool); row i for keys[i]."""
        unique, inverse = _dedupe(keys)
        ((values, found),), _ = self._gather([(table, unique)], many=False)
        return _spread(values, found, inverse)

    def lookup_many(self, requests: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{table: keys (n,) int64} -> {table: (values (n, dim), found (n,) bool)}, in one call."""
        return self.lookup_many_at_version(requests)[0]

    def lookup_many_at_version(
        self, requests: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
        """As lookup_many, with the model version every row is at (the replica's cut: a training
        step; 0 from a replica with consistency = "latest")."""
        if not requests:
            return {}, 0
        tables = list(requests)
        keys = [native.as_keys(requests[t], f"requests[{t!r}]") for t in tables]
        offsets = np.zeros(len(tables) + 1, dtype=np.int64)
        np.cumsum([k.shape[0] for k in keys], out=offsets[1:])
        unique, unique_offsets, inverse = native.unique_by_segment(np.concatenate(keys), offsets)
        lookups = [(t, unique[unique_offsets[i] : unique_offsets[i + 1]]) for i, t in enumerate(tables)]
        rows, version = self._gather(lookups, many=True)
        spread = {
            t: _spread(values, found, inverse[offsets[i] : offsets[i + 1]])
            for i, (t, (values, found)) in enumerate(zip(tables, rows, strict=True))
        }
        return spread, version

    def _gather(self, lookups: list[tuple[str, np.ndarray]], many: bool) -> tuple[list[tuple], int]:
        """[(table, distinct keys)] -> ([(values, found) of those keys, per lookup], model version),
        in one call when its reply fits the message limit, else in parts (see _fetch) that all
        answer at one model version: tried again from the start, up to _VERSION_TRIES times, when
        the replica's cut moved between two parts. Every part goes to the replica that answered
        the one before (another only when it fails over): parts spread over the replicas in turn
        came back at different versions on every try whenever two replicas held different cuts (one
        behind the other, as a replica cut off from a shard keeps its last cut), and such a lookup
        always failed."""
        deadline = time.monotonic() + self.timeout_s
        for _ in range(_VERSION_TRIES):
            replica = [next(self._turn) % len(self._replicas)]
            try:
                return self._fetch(lookups, many, deadline, replica)
            except _VersionMoved:
                continue
        raise RuntimeError(
            f"a lookup over message_limit_bytes was split, and the replicas' model version moved between its "
            f"parts {_VERSION_TRIES} times; ask again, or for fewer keys at once"
        )

    def _fetch(
        self, lookups: list[tuple[str, np.ndarray]], many: bool, deadline: float, replica: list[int]
    ) -> tuple[list[tuple], int]:
        """One call for `lookups`, first to replica[0] (set to the one that answers; see _call); a
        request over the message limit, or a reply the replica refuses as over it, is split in two
        (lookups, or a lookup's keys) and each half fetched the same way: before, the refusal
        (RESOURCE_EXHAUSTED) was taken for load shedding, every replica was asked the same, and
        the caller got ReplicasUnavailableError for a request that could never be answered (a
        request: 8 bytes a key, more than a reply's row at dim 1, or dim 3 in float16)."""
        dtype = _DTYPES[self.dtype]
        requests = [
            serving_pb2.ServingLookupRequest(table=t, keys=wire.encode_keys(k), dtype=dtype) for t, k in lookups
        ]
        try:
            if many:
                request = serving_pb2.ServingLookupManyRequest(lookups=requests)
            else:
                (request,) = requests
            if (size := request.ByteSize()) > self.message_limit_bytes:
                raise _ReplyTooLarge(f"a request of {size} bytes, over message_limit_bytes {self.message_limit_bytes}")
            if many:
                reply, results = self._call(lambda to, timeout: to.lookup_many(request, timeout=timeout),
                                            deadline, replica)
                if len(results) != len(lookups):
                    raise RuntimeError(f"LookupMany: {len(results)} results for {len(lookups)} lookups")
            else:
                reply = self._call(lambda to, timeout: to.lookup(request, timeout=timeout), deadline, replica)
                results = [reply]
            rows = [_unique_rows(result, k.shape[0]) for (_, k), result in zip(lookups, results, strict=True)]
            return rows, reply.model_version
        except _ReplyTooLarge as refused:
            if len(lookups) == 1 and lookups[0][1].shape[0] <= 1:
                raise ValueError(f"keys: one key's reply is over message_limit_bytes ({refused})") from None
        if len(lookups) > 1:
            half = len(lookups) // 2
            parts = (lookups[:half], lookups[half:])
        else:
            table, keys = lookups[0]
            half = keys.shape[0] // 2
            parts = ([(table, keys[:half])], [(table, keys[half:])])
        (left, version), (right, other) = (self._fetch(part, many, deadline, replica) for part in parts)
        if version != other:
            raise _VersionMoved
        if len(lookups) > 1:
            return left + right, version
        (left_values, left_found), (right_values, right_found) = left[0], right[0]
        return [(np.concatenate([left_values, right_values]), np.concatenate([left_found, right_found]))], version

    def dense_model(self, step: int = 0) -> serving_pb2.DenseModelResponse:
        """The dense tower a replica serves with step `step` (0: its current cut's): step, state, format.
        grpc.RpcError NOT_FOUND when the replica holds none of that step."""
        request = serving_pb2.DenseModelRequest(step=step)
        return self._call(lambda replica, timeout: replica.stub.DenseModel(request, timeout=timeout))

    def _call(self, call, deadline: float | None = None, start: list[int] | None = None):
        """call(replica, timeout) on the replicas in turn until one answers or `deadline`
        (time.monotonic; default timeout_s from now) passes, beginning with the next in turn, or
        with start[0] where given (then set to the replica that answered). _ReplyTooLarge, at once,
        when a replica refuses the reply as over the message limit, or gRPC a message (every replica
        would).

        A replica whose attempt failed after SLOW_REPLICA_FAIR_SHARE of timeout_s or more (it let the
        deadline pass: hung, SIGSTOPped, far slower than the others; or it refused late: shedding
        behind a slow link) is tried after the others for SLOW_REPLICA_SECONDS: a replica that takes
        calls and answers none, or refuses them late, failed every call in its turn, half the calls
        of a two-replica client (the ones after it had the sliver left); now about one call in
        SLOW_REPLICA_SECONDS. Each attempt has the whole time left (a slow replica still answers; a
        hedge beside it cost ~0.2 ms of client CPU a call in `bench client`). What counts is the
        attempt's own time, not the time it was given: a healthy replica tried after a late refuser
        got the sliver left and missed it, and marking it sent every call to the late refuser first."""
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout_s
        first = next(self._turn) % len(self._replicas) if start is None else start[0]
        now = time.monotonic()
        order = [(first + i) % len(self._replicas) for i in range(len(self._replicas))]
        if any(self._slow_until[index] > now for index in order):
            order.sort(key=lambda index: self._slow_until[index] > now)  # stable: the turn's order otherwise
        fair_share = self.timeout_s * SLOW_REPLICA_FAIR_SHARE
        answers = []
        for index in order:
            replica = self._replicas[index]
            started = time.monotonic()
            remaining = deadline - started
            if remaining <= 0:
                break
            try:
                answer = call(replica, remaining)
                if start is not None:
                    start[0] = index
                return answer
            except grpc.RpcError as exc:
                details = exc.details() or ""
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (
                    _OVER_LIMIT in details or _LARGER_THAN_MAX in details
                ):
                    raise _ReplyTooLarge(details) from None
                failed = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or exc.code() in FAILOVER_CODES
                if failed and (ended := time.monotonic()) - started >= fair_share:
                    self._slow_until[index] = ended + SLOW_REPLICA_SECONDS
                if exc.code() not in FAILOVER_CODES:
                    raise
                answers.append((replica.address, exc.code(), exc.details() or ""))
        if len(answers) < len(self._replicas):
            answers.append(("(deadline)", grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"timeout_s {self.timeout_s:g} passed before every replica was tried"))
        raise ReplicasUnavailableError(answers)

    def close(self) -> None:
        for replica in self._replicas:
            replica.channel.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dedupe(keys: np.ndarray, name: str = "keys") -> tuple[np.ndarray, np.ndarray]:
    """(unique keys in first-occurrence order, inverse): keys == unique[inverse]. One native
    hash pass (np.unique sorts, at ~3x the time for a request's few hundred keys)."""
    keys = native.as_keys(keys, name)
    unique, _, inverse = native.unique_by_segment(keys, np.array([0, keys.shape[0]], dtype=np.int64))
    return unique, inverse


def _unique_rows(reply: bulk_messages.BulkMessage, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The reply's rows (n, dim) and found flags (n,) of its n keys: views of the reply's bytes."""
    dtype = np.dtype("<f2") if reply.dtype == ps_pb2.FLOAT16 else np.dtype("<f4")
    if len(reply.values) != n * reply.dim * dtype.itemsize or len(reply.found) != n:
        raise RuntimeError(
            f"Lookup reply: {len(reply.values)} value bytes and {len(reply.found)} flags for {n} keys "
            f"of dim {reply.dim}"
        )
    return np.frombuffer(reply.values, dtype=dtype).reshape(n, reply.dim), np.frombuffer(reply.found, dtype=np.uint8)


def _spread(values: np.ndarray, found: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the distinct keys spread back to the caller's keys (new arrays: the reply's
    bytes are read, not kept)."""
    return values[inverse].astype(values.dtype.newbyteorder("="), copy=False), found[inverse].astype(bool)
