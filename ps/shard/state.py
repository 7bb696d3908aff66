"""The state of one PS shard: its tables, the keys it owns, the push ids it remembers, and the
update log of each table (what Subscribe streams to serving replicas).

Everything here is synchronous and not thread-safe: the server calls it from one thread (its
event loop), so table operations are serialised without locks. Errors are domain errors
(ValueError, UnknownTableError, WrongShardError, CapacityError); the server maps them to codes.
"""

from __future__ import annotations

import secrets
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from ps import bulk_messages, native, wire
from ps.errors import UnknownTableError, WrongShardError
from ps.job_config import JobConfig
from ps.rpc import ps_pb2
from ps.shard.commits import DEFAULT_SHARD_COMMIT_BYTES, MAX_STEP, MIN_TABLE_COMMIT_BYTES, CommitLog, DenseStates
from ps.shard.update_log import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_KEYS, LogRange, UpdateLog, table_log_bytes
from ps.table import multi
from ps.table.config import AdmissionKind, EvictionPolicy
from ps.table.embedding_table import ApplyResult, EmbeddingTable
from ps.table.state import TableState

_REPLY_FRAMING_BYTES = 32  # one LookupResponse's fields besides its values (generous)
MAX_REMEMBERED_CLIENTS = 4096
MAX_CLIENT_ID_BYTES = 256
DEFAULT_LEDGER_BYTES = 32 << 20
# What one remembered push costs, measured (tests/ps/test_server.py: ~300 bytes): its node and slot
# in its client's ordered dict and in the ledger's order of puts, the (client, sequence) key, the
# sequence, and the answer packed into 32 bytes.
LEDGER_ENTRY_BYTES = 320
_ANSWER = struct.Struct("<4Q")  # version, num_updated, num_inserted, num_evicted
LEDGER_CLIENT_BYTES = 400  # a client's own dict and its slot in the client table, plus its id


class PushLedger:
    """Answers of the recent pushes of each client, so a retried push is applied once.

    Keeps the last `window` sequences of each of the last MAX_REMEMBERED_CLIENTS client ids, in
    at most `max_bytes` (estimated per entry and per client). Over the bytes, the oldest answers
    are forgotten first, whoever pushed them: a client's newest push (the one it may be retrying)
    goes last. Forgetting the least recently pushing client whole forgot, with clients pushing in
    turn, the newest push of the client about to push next. Over the client count, the least
    recently pushing client is forgotten whole. A client retries a push within seconds, long before
    `window` newer pushes of its own. Answers are kept packed: version, num_updated, num_inserted,
    num_evicted.
    """

    def __init__(
        self, window: int, max_clients: int = MAX_REMEMBERED_CLIENTS, max_bytes: int = DEFAULT_LEDGER_BYTES
    ) -> None:
        self.window = window
        self.max_clients = max_clients
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._clients: OrderedDict[str, OrderedDict[int, bytes]] = OrderedDict()
        self._order: OrderedDict[tuple[str, int], None] = OrderedDict()  # every entry, oldest put first

    def get_raw(self, client_id: str, sequence: int) -> bytes | None:
        """The packed answer recorded for (client_id, sequence), or None."""
        seen = self._clients.get(client_id)
        return None if seen is None else seen.get(sequence)

    def get(self, client_id: str, sequence: int) -> ps_pb2.PushResponse | None:
        """The answer recorded for (client_id, sequence), or None if it was not applied (or forgotten)."""
        answer = self.get_raw(client_id, sequence)
        if answer is None:
            return None
        if isinstance(answer, MultiAnswer):
            raise ValueError(
                f"push_id: sequence {sequence} of client {client_id!r} was a PushMulti; a Push may not reuse it"
            )
        version, num_updated, num_inserted, num_evicted = _ANSWER.unpack(answer)
        return ps_pb2.PushResponse(
            version=version, num_updated=num_updated, num_inserted=num_inserted, num_evicted=num_evicted
        )

    def put(self, client_id: str, sequence: int, response: ps_pb2.PushResponse) -> None:
        r = response
        self.put_raw(client_id, sequence, _ANSWER.pack(r.version, r.num_updated, r.num_inserted, r.num_evicted))

    def put_raw(self, client_id: str, sequence: int, answer: bytes) -> None:
        """Records a packed answer (a multi-table push keeps its whole serialised reply)."""
        check_client_id(client_id)
        # One object per client id: each parsed request brings its own copy of the id, and every
        # entry's key held one (up to ~300 bytes more an entry than counted: 64 MiB for a 32 MiB bound).
        client_id = sys.intern(client_id)
        seen = self._clients.get(client_id)
        if seen is None:
            seen = self._clients[client_id] = OrderedDict()
            self.num_bytes += LEDGER_CLIENT_BYTES + len(client_id)
        else:
            self._clients.move_to_end(client_id)
        previous = seen.get(sequence)
        if previous is not None:
            self.num_bytes -= _entry_bytes(previous)
            self._order.move_to_end((client_id, sequence))
        else:
            self._order[(client_id, sequence)] = None
        seen[sequence] = answer
        self.num_bytes += _entry_bytes(answer)
        if len(seen) > self.window:
            self._forget_entry(client_id, next(iter(seen)))
        while len(self._clients) > self.max_clients:
            self._forget_client(next(iter(self._clients)))
        while self.num_bytes > self.max_bytes and len(self._order) > 1:
            self._forget_entry(*next(iter(self._order)))

    def export(self) -> list:
        """Every remembered answer, oldest first, in runs of one client's:
        [[client_id, [[sequence, answer, multi]]]] (answer as bytes; multi: a PushMulti's reply;
        a client may have several runs). load() of it rebuilds this memory, its order included."""
        runs: list = []
        for client, sequence in self._order:
            answer = self._clients[client][sequence]
            if not runs or runs[-1][0] != client:
                runs.append([client, []])
            runs[-1][1].append([sequence, bytes(answer), isinstance(answer, MultiAnswer)])
        return runs

    def load(self, exported: list) -> None:
        """Replaces the memory with an export() (a standby's copy of its primary's)."""
        self._clients = OrderedDict()
        self._order = OrderedDict()
        self.num_bytes = 0
        for client, entries in exported:
            for sequence, answer, is_multi in entries:
                self.put_raw(client, int(sequence), MultiAnswer(answer) if is_multi else bytes(answer))

    def _forget_entry(self, client_id: str, sequence: int) -> None:
        seen = self._clients[client_id]
        self.num_bytes -= _entry_bytes(seen.pop(sequence))
        del self._order[(client_id, sequence)]
        if not seen:
            del self._clients[client_id]
            self.num_bytes -= LEDGER_CLIENT_BYTES + len(client_id)

    def _forget_client(self, client_id: str) -> None:
        for sequence in list(self._clients[client_id]):
            self._forget_entry(client_id, sequence)


class MultiAnswer(bytes):
    """A PushMulti's serialised reply as the ledger keeps it (told apart from a Push's packed answer)."""


def _entry_bytes(answer: bytes) -> int:
    """What one remembered answer costs: the measured entry, plus what a long answer holds beyond 32 bytes."""
    return LEDGER_ENTRY_BYTES + max(0, len(answer) - _ANSWER.size)


def check_client_id(client_id: str) -> None:
    """ValueError unless client_id is at most MAX_CLIENT_ID_BYTES long (UTF-8)."""
    size = len(client_id.encode())
    if size > MAX_CLIENT_ID_BYTES:
        raise ValueError(
            f"push_id.client_id: at most {MAX_CLIENT_ID_BYTES} bytes (the shard remembers it for every push "
            f"it deduplicates), got {size}"
        )


class Shard:
    """Shard `index` of `job`: one EmbeddingTable per table of the job, holding the keys it owns."""

    def __init__(
        self,
        job: JobConfig,
        index: int,
        log_max_entries: int = DEFAULT_MAX_ENTRIES,
        log_max_keys: int = DEFAULT_MAX_KEYS,
        initial_states: Mapping[str, TableState] | None = None,
    ) -> None:
        """log_max_entries, log_max_keys: bounds of each table's update log (see UpdateLog), beside
        its share of DEFAULT_SHARD_LOG_BYTES.
        initial_states: table name -> state to start from (a restored snapshot); the update logs
        start at the restored versions."""
        if not 0 <= index < len(job.shards):
            raise ValueError(f"shard: must be in [0, {len(job.shards)}) for job {job.job!r}, got {index}")
        self.job = job
        self.index = index
        self.shard_map = job.shard_map
        self.tables = {t.name: EmbeddingTable(t) for t in job.tables}
        for name, state in (initial_states or {}).items():
            self.table(name).load(state)
        self.ledger = PushLedger(job.push_dedupe_window)
        # Subscribers compare it to the one their rows came from: a restarted shard may reach the
        # same version numbers with other rows.
        self.incarnation = secrets.randbits(63) | 1
        log_bytes = table_log_bytes(len(self.tables))
        self.logs = {
            name: UpdateLog(table.version, log_max_entries, log_max_keys, log_bytes)
            for name, table in self.tables.items()
        }
        # Committed steps (ps/shard/commits.py): restored tables start at a committed state.
        base_step = max((t.step for t in self.tables.values()), default=0)
        commit_bytes = max(MIN_TABLE_COMMIT_BYTES, DEFAULT_SHARD_COMMIT_BYTES // max(1, len(self.tables)))
        self.commits = {
            name: CommitLog(t.value_words, t.version, base_step, commit_bytes) for name, t in self.tables.items()
        }
        self.dense = DenseStates()

    def table(self, name: str) -> EmbeddingTable:
        """The table called `name`, or UnknownTableError."""
        table = self.tables.get(name)
        if table is None:
            raise UnknownTableError(
                f"table {name!r} is not declared in job {self.job.job!r}; tables: {', '.join(sorted(self.tables))}"
            )
        return table

    def check_owned(self, keys: np.ndarray) -> None:
        """Raises WrongShardError unless every key of keys (n,) int64 maps to this shard."""
        if self.shard_map.num_shards == 1 or keys.shape[0] == 0:
            return
        if native.first_foreign_key(keys, self.shard_map.buckets, self.index) >= 0:
            owners = self.shard_map.shard_of(keys)
            wrong = owners != self.index
            first = int(np.flatnonzero(wrong)[0])
            raise WrongShardError(
                f"{int(wrong.sum())} of {keys.shape[0]} keys belong to other shards (keys[{first}] = "
                f"{int(keys[first])} belongs to shard {int(owners[first])}, this is shard {self.index}); "
                "route keys with the job's shard map"
            )

    def check_lookup_replies(self, requests: list[ps_pb2.LookupRequest]) -> None:
        """ValueError naming the limit when the replies of `requests` (one message) would exceed
        the job's message_limit_bytes: checked before any reply is built."""
        total = 0
        for request in requests:
            table = self.table(request.table)
            total += len(request.keys) // 8 * table.dim * 4 + _REPLY_FRAMING_BYTES
        limit = self.job.message_limit_bytes
        if total > limit:
            table = self.table(requests[0].table)
            raise ValueError(
                f"keys: the reply would be {total:,} bytes, over message_limit_bytes {limit:,}; split the request "
                f"(at most {limit // (4 * table.dim):,} keys of table {table.name!r} at dim {table.dim} per call)"
            )

    def lookup(self, request: ps_pb2.LookupRequest) -> ps_pb2.LookupResponse:
        """values (n, dim) float32 of keys (n,) int64; unknown keys read as their init value."""
        table, values = self._read(request)
        return ps_pb2.LookupResponse(
            values=values.tobytes(), dim=table.dim, dtype=ps_pb2.FLOAT32, version=table.version
        )

    def lookup_encoded(self, request: ps_pb2.LookupRequest) -> bytes:
        """lookup's reply, serialised with its values copied once (ps/bulk_messages.py)."""
        table, values = self._read(request)
        reply = ps_pb2.LookupResponse(dim=table.dim, dtype=ps_pb2.FLOAT32, version=table.version)
        return bulk_messages.encode(reply, values=values)

    def _read(self, request: ps_pb2.LookupRequest) -> tuple[EmbeddingTable, np.ndarray]:
        table = self.table(request.table)
        wire.check_dim(request.dim, table.dim, table.name)
        self.check_lookup_replies([request])
        keys = wire.decode_keys(request.keys)
        self.check_owned(keys)
        step = _read_step(request)
        return table, np.ascontiguousarray(table.read(keys, table.step if step is None else step), dtype="<f4")

    def push(self, request: ps_pb2.PushRequest) -> ps_pb2.PushResponse:
        """Applies grads (n, dim) of keys (n,) once per push id; a repeat returns the first answer."""
        table = self.table(request.table)
        push_id = request.push_id
        if push_id.client_id:
            check_client_id(push_id.client_id)
            previous = self.ledger.get(push_id.client_id, push_id.sequence)
            if previous is not None:
                previous.duplicate = True
                return previous
        keys, grads, counts, step = self._decode_push(request, table)
        result = table.apply_gradients(keys, grads, step=step, counts=counts)
        self.logs[table.name].append(table.version, _log_keys(result), result.evicted_keys, time.time())
        response = ps_pb2.PushResponse(
            version=table.version,
            num_updated=result.num_updated,
            num_inserted=result.num_inserted,
            num_evicted=int(result.evicted_keys.shape[0]),
        )
        if push_id.client_id:
            self.ledger.put(push_id.client_id, push_id.sequence, response)
        return response

    def _decode_push(
        self, request: ps_pb2.PushRequest, table: EmbeddingTable
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]:
        """A Push's (keys (n,), grads (n, dim), counts (n,) or None, step or None), checked against
        `table` and this shard's keys."""
        wire.check_dim(request.dim, table.dim, table.name)
        keys = wire.decode_keys(request.keys)
        grads = wire.decode_values(request.grads, keys.shape[0], table.dim, request.dtype, "grads")
        counts = wire.decode_counts(request.counts, keys.shape[0])
        self.check_owned(keys)
        return keys, grads, counts, request.step if request.HasField("step") else None

    def check_pushes(self, requests) -> None:
        """Raises what push() would raise for any of `requests` (a PushBatch's parts), before any
        is applied: its parts were applied one by one, so a bad later part (a NaN, another dim, a
        key of another shard, a full table) failed the call after the earlier parts had changed
        their tables, as PushMulti, checked whole first, never did. A table with several parts and
        no eviction policy is checked for room with all their keys at once (at the latest of their
        steps), as the rows the earlier parts add are there when the later ones come; with a policy
        a later part may evict an earlier part's rows, so each part's own check is the one."""
        parts: dict[str, list[tuple[np.ndarray, np.ndarray | None, int | None]]] = {}
        for request in requests:
            table = self.table(request.table)
            push_id = request.push_id
            if push_id.client_id:
                check_client_id(push_id.client_id)
                if self.ledger.get(push_id.client_id, push_id.sequence) is not None:
                    continue  # a repeat: answered with its first answer, nothing applied
            keys, grads, counts, step = self._decode_push(request, table)
            table.check_push(keys, grads, step, counts)
            parts.setdefault(table.name, []).append((keys, counts, step))
        for name, table_parts in parts.items():
            table = self.tables[name]
            if len(table_parts) < 2 or table.config.eviction.policy != EvictionPolicy.NONE:
                continue
            keys = np.concatenate([k for k, _, _ in table_parts])
            counts = None
            if any(c is not None for _, c, _ in table_parts):
                counts = np.concatenate([np.ones(k.shape[0], np.int64) if c is None else c for k, c, _ in table_parts])
            step = max(table.version + 1 + i if s is None else s for i, (_, _, s) in enumerate(table_parts))
            # A probability admission draws each key's coin at its part's own step and count so far,
            # which one check at the latest step does not: a batch it passed could fail in a later
            # part, the earlier ones applied. Such a table is checked for every new key's row.
            every_new_key = table.config.admission.kind == AdmissionKind.PROBABILITY
            table.check_room(keys, counts, step, every_new_key=every_new_key)

    def multi_tables(self, names, dims) -> list[EmbeddingTable]:
        """The tables of a multi-table request, each once, with the dims it expects."""
        if len(dims) != len(names):
            raise ValueError(f"dims: {len(dims)} dims for {len(names)} tables")
        if len(set(names)) != len(names):
            raise ValueError("tables: a table appears more than once in one request")
        tables = [self.table(name) for name in names]
        for table, dim in zip(tables, dims, strict=True):
            wire.check_dim(dim, table.dim, table.name)
        return tables

    def lookup_multi(self, request: ps_pb2.MultiLookupRequest) -> bytes:
        """Every table's keys in one buffer -> every table's values in one buffer (one native call):
        the serialised MultiLookupResponse, its values gathered straight into it."""
        tables = self.multi_tables(request.tables, request.dims)
        keys = wire.decode_keys(request.keys)
        offsets = wire.decode_offsets(request.offsets, len(tables), keys.shape[0])
        reply_bytes = int(np.dot(np.diff(offsets), [4 * t.dim for t in tables])) if tables else 0
        limit = self.job.message_limit_bytes
        if reply_bytes + _REPLY_FRAMING_BYTES * len(tables) > limit:
            raise ValueError(
                f"keys: the reply would be {reply_bytes:,} bytes, over message_limit_bytes {limit:,}; split the request"
            )
        self.check_owned(keys)
        header = ps_pb2.MultiLookupResponse(dtype=ps_pb2.FLOAT32, versions=[t.version for t in tables])
        step = _read_step(request)
        steps = [t.step if step is None else step for t in tables]
        return multi.lookup_tables_reply(tables, keys, offsets, header, "values", steps)

    def push_multi(self, request: ps_pb2.MultiPushRequest) -> tuple[ps_pb2.MultiPushResponse, list[str]]:
        """Applies every table's gradients once per push id; a repeat returns the first answer.
        Returns the reply and the names of the tables it changed (none for a repeat). A repeat is
        checked as the first was (its tables, each once): answered unchecked, a repeat naming a
        million tables held the event loop for seconds while its duplicate was counted per name."""
        tables = self.multi_tables(request.tables, request.dims)
        push_id = request.push_id
        if push_id.client_id:
            check_client_id(push_id.client_id)
            previous = self.ledger.get_raw(push_id.client_id, push_id.sequence)
            if previous is not None:
                if not isinstance(previous, MultiAnswer):
                    raise ValueError(
                        f"push_id: sequence {push_id.sequence} of client {push_id.client_id!r} was a Push; "
                        "a PushMulti may not reuse it"
                    )
                response = ps_pb2.MultiPushResponse.FromString(previous)
                response.duplicate = True
                return response, []
        keys = wire.decode_keys(request.keys)
        offsets = wire.decode_offsets(request.offsets, len(tables), keys.shape[0])
        num_values = int(np.dot(np.diff(offsets), [t.dim for t in tables])) if tables else 0
        grad_bytes, itemsize = request.grads, wire.value_dtype(request.dtype).itemsize
        if len(grad_bytes) != num_values * itemsize:
            raise ValueError(
                f"grads: byte length {len(grad_bytes)} does not match the request's {num_values} values (each "
                f"table's keys x its dim) x {itemsize} bytes = {num_values * itemsize}"
            )
        grads = wire.decode_values(grad_bytes, num_values, 1, request.dtype, "grads").reshape(-1)
        counts = wire.decode_counts(request.counts, keys.shape[0])
        if counts is not None:
            native.check_counts(counts)
        native.check_gradients(grads, None)  # tables of different dims: the flat position
        self.check_owned(keys)
        step = request.step if request.HasField("step") else None
        results = multi.push_tables(tables, keys, offsets, grads, counts, step)  # checks the step first
        now = time.time()
        versions = []
        num_updated = num_inserted = num_evicted = 0
        for table, result in zip(tables, results, strict=True):
            self.logs[table.name].append(table.version, _log_keys(result), result.evicted_keys, now)
            versions.append(table.version)
            num_updated += result.num_updated
            num_inserted += result.num_inserted
            num_evicted += int(result.evicted_keys.shape[0])
        response = ps_pb2.MultiPushResponse(
            versions=versions, num_updated=num_updated, num_inserted=num_inserted, num_evicted=num_evicted
        )
        if push_id.client_id:
            self.ledger.put_raw(push_id.client_id, push_id.sequence, MultiAnswer(response.SerializeToString()))
        return response, [t.name for t in tables]

    def log(self, name: str) -> UpdateLog:
        """The update log of table `name` (UnknownTableError if there is none)."""
        self.table(name)
        return self.logs[name]

    def changes_after(self, name: str, from_version: int) -> LogRange:
        """The merged changes of table `name` after from_version; LogGapError if the log lost them."""
        return self.log(name).range_after(from_version, name)

    def read_rows(self, name: str, keys: np.ndarray) -> np.ndarray:
        """Current values (n, dim) float32 of keys (n,) int64 of table `name`."""
        return self.table(name).read(keys)

    def read_stored_rows(self, name: str, keys: np.ndarray) -> tuple[str, np.ndarray]:
        """(storage, rows (n, value_words) float32 words as table `name` stores them) of keys (n,)."""
        table = self.table(name)
        return str(table.storage), table.lookup_stored(keys)

    def memory_bytes(self, name: str) -> int:
        """What table `name` holds on this shard: the table itself, its update log and its commit log."""
        return self.table(name).memory_bytes + self.logs[name].memory_bytes + self.commits[name].memory_bytes

    def stats(self) -> ps_pb2.StatsResponse:
        return ps_pb2.StatsResponse(
            job=self.job.job,
            shard=self.index,
            num_shards=len(self.job.shards),
            tables=[
                ps_pb2.TableStats(
                    name=t.name,
                    dim=t.dim,
                    rows=t.size,
                    memory_bytes=self.memory_bytes(t.name),
                    version=t.version,
                    step=t.step,
                    num_admitted=t.num_admitted,
                    num_evicted=t.num_evicted,
                )
                for t in self.tables.values()
            ],
        )


def _log_keys(result: ApplyResult) -> np.ndarray:
    """The unique keys (t,) int64 a push created or updated, as its update-log entry keeps them: in
    no order (the log's readers merge and sort: UpdateLog.range_after), in an array of their own,
    so that one table's entry does not hold a multi-table push's whole buffer."""
    keys = result.updated_keys
    return keys if keys.base is None else keys.copy()


def _read_step(request: ps_pb2.LookupRequest | ps_pb2.MultiLookupRequest) -> int | None:
    """The step a lookup reads its rows for (EmbeddingTable.read), None when the request names
    none: each table's step on this shard then (the last step pushed to it)."""
    if not request.HasField("step"):
        return None
    if request.step > MAX_STEP:
        raise ValueError(f"step: must be in [0, 2^32 - 1] (a push's step), got {request.step}")
    return request.step
