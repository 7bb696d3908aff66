"""The systems `embps bench serve` loads, each holding the same rows, and the load generator's
clients for them.

    rows: keys = key_of_rank(0 .. rows-1), values = row_values(keys, dim)  (n, dim) float32
    embps      an export of those rows (ps/snapshot/files.py's format) that a real `embps serve`
               replica loads at start; Lookup over gRPC, keys as little-endian int64 bytes
    redis      `redis-server` on 127.0.0.1, one float32 blob (dim * 4 bytes, LE) per key, the key
               being the key's 8 little-endian bytes; a lookup is one MGET of the batch
    inprocess  the replica's own lookup code (serving.store.TableReplica: C++ hash map + gather)
               called inside the client process, no RPC: the ceiling

Several tables (`tables` > 1, as an inference request that reads every feature's table): each
of the tables emb0 .. emb{T-1} holds the rows above, and a request of T * k keys is k keys per
table. embps answers it with one LookupMany (one RPC); Redis with one MGET of all T * k keys
(one command, one round trip; a row's Redis key is the table's index byte then the key's 8
bytes); inprocess with one TableReplica.lookup per table.

Each Target is a picklable frozen dataclass; `connect` runs in a client process and prepares
every request of the key pool up front, so a call does only the call and a check of the reply
(row count and length; a reply with a missing row is an error, not a success).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.keys import key_of_rank
from bench.loadgen import OK, native_code_names, native_module
from ps.process import children
from ps.process.python_command import python_path

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE = "emb"
JOB = "servebench"
ROW_SEED = 7
ROW_SCALE = 0.05
_MESSAGE_LIMIT = 64 << 20
_LOAD_CHUNK = 1 << 16  # rows per export / Redis loading step


def bench_keys(rows: int) -> np.ndarray:
    """The keys every system holds: (rows,) int64, key_of_rank(0 .. rows-1)."""
    return key_of_rank(np.arange(rows, dtype=np.int64))


def row_values(keys: np.ndarray, dim: int) -> np.ndarray:
    """The value of each key's row, a pure function of the key: (n, dim) float32."""
    from ps import native
    from ps.table.config import Initializer

    return native.init_values(ROW_SEED, Initializer.NORMAL, ROW_SCALE, keys, dim)


def table_names(tables: int) -> tuple[str, ...]:
    """The bench's table names: ("emb",) for one table, else emb0 .. emb{tables-1}."""
    return (TABLE,) if tables == 1 else tuple(f"{TABLE}{t}" for t in range(tables))


class GrpcCaller:
    """Serving.Lookup (one table) or Serving.LookupMany (several: each batch split evenly between
    them) with requests serialized up front; replies parsed and checked."""

    def __init__(self, address: str, table: str | Sequence[str], dim: int, batches: Sequence[np.ndarray]) -> None:
        import grpc

        from ps import wire
        from ps.rpc import serving_pb2

        self._grpc = grpc
        self._address = address
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
                ("grpc.max_send_message_length", _MESSAGE_LIMIT),
            ],
        )
        tables = (table,) if isinstance(table, str) else tuple(table)
        self._many = len(tables) > 1
        self._method = "/embps.v1.Serving/LookupMany" if self._many else "/embps.v1.Serving/Lookup"
        if self._many:
            self._lookup = self._channel.unary_unary(
                "/embps.v1.Serving/LookupMany", response_deserializer=serving_pb2.ServingLookupManyResponse.FromString
            )
        else:
            self._lookup = self._channel.unary_unary(
                "/embps.v1.Serving/Lookup", response_deserializer=serving_pb2.ServingLookupResponse.FromString
            )
        self._requests = []
        self._sizes = []
        for b in batches:
            parts = np.array_split(b, len(tables))
            lookups = [
                serving_pb2.ServingLookupRequest(table=t, keys=wire.encode_keys(k), dim=dim)
                for t, k in zip(tables, parts, strict=True)
            ]
            request = serving_pb2.ServingLookupManyRequest(lookups=lookups) if self._many else lookups[0]
            self._requests.append(request.SerializeToString())
            self._sizes.append([k.shape[0] for k in parts])

    def reply(self, batch_index: int, timeout: float):
        """The reply for batch `batch_index`: a ServingLookupResponse, or with several tables a
        ServingLookupManyResponse (grpc.RpcError on a failed call)."""
        return self._lookup(self._requests[batch_index], timeout=timeout)

    def call(self, batch_index: int, timeout: float) -> str:
        try:
            reply = self.reply(batch_index, timeout)
        except self._grpc.RpcError as exc:
            return exc.code().name
        results = list(reply.results) if self._many else [reply]
        sizes = self._sizes[batch_index]
        if len(results) != len(sizes):
            return "BAD_REPLY"
        for result, n in zip(results, sizes, strict=True):
            if len(result.values) != n * result.dim * 4 or len(result.found) != n:
                return "BAD_REPLY"
            if result.found.count(0):
                return "MISSING_ROWS"
        return OK

    def run_native(self, times: np.ndarray, t0: float, hard_end: float, timeout_s: float, concurrency: int):
        """The open-loop schedule in the native generator, on its own channel: the same requests,
        the same checks of each reply (every part's rows, every found flag)."""
        sent, done, codes = native_module().run_grpc(
            self._address, self._method, self._requests, self._sizes, self._many,
            np.ascontiguousarray(times, dtype=np.float64), t0, hard_end, timeout_s, concurrency, _MESSAGE_LIMIT,
        )
        return np.asarray(sent), np.asarray(done), native_code_names(codes)

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class EmbpsTarget:
    """A Serving.Lookup endpoint: our `embps serve`, or any server at `address` (dim 0: any).
    table: one name (Lookup), or several (LookupMany, each batch split between them)."""

    address: str
    table: str | tuple[str, ...] = TABLE
    dim: int = 0
    name: str = "embps"

    def connect(self, batches: Sequence[np.ndarray]) -> GrpcCaller:
        return GrpcCaller(self.address, self.table, self.dim, batches)


class RedisCaller:
    """MGET of the batch's key blobs over a pool of connections (one per thread in flight)."""

    def __init__(self, host: str, port: int, dim: int, batches: Sequence[np.ndarray], timeout: float,
                 tables: int = 1) -> None:
        import redis

        self._redis = redis
        self._host, self._port = host, port
        self._client = redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._keys = [
            [k for t, part in enumerate(np.array_split(b, tables)) for k in _redis_keys(part, t, tables)]
            for b in batches
        ]
        self._row_bytes = dim * 4

    def call(self, batch_index: int, timeout: float) -> str:
        keys = self._keys[batch_index]
        try:
            values = self._client.mget(keys)
        except self._redis.exceptions.TimeoutError:
            return "DEADLINE_EXCEEDED"
        except self._redis.exceptions.ConnectionError:
            return "UNAVAILABLE"
        except self._redis.exceptions.RedisError as exc:
            return type(exc).__name__
        if len(values) != len(keys) or None in values:
            return "MISSING_ROWS"
        return OK if sum(map(len, values)) == len(keys) * self._row_bytes else "BAD_REPLY"

    def run_native(self, times: np.ndarray, t0: float, hard_end: float, timeout_s: float, concurrency: int):
        """The open-loop schedule in the native generator: `concurrency` connections, each with one
        MGET in flight (as the Python threads, one connection each); every reply's rows checked."""
        commands = [_resp_command([b"MGET", *keys]) for keys in self._keys]
        sent, done, codes = native_module().run_redis(
            self._host, self._port, commands, [len(keys) for keys in self._keys], self._row_bytes,
            np.ascontiguousarray(times, dtype=np.float64), t0, hard_end, timeout_s, concurrency,
        )
        return np.asarray(sent), np.asarray(done), native_code_names(codes)

    def close(self) -> None:
        self._client.close()


def _resp_command(parts: Sequence[bytes]) -> bytes:
    """A Redis command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _redis_keys(keys: np.ndarray, table: int = 0, tables: int = 1) -> list[bytes]:
    """The Redis key of each key's row: its 8 little-endian bytes, after the table's index byte
    when there are several tables."""
    data = keys.astype("<i8").tobytes()
    prefix = bytes([table]) if tables > 1 else b""
    return [prefix + data[i : i + 8] for i in range(0, len(data), 8)]


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    dim: int
    timeout_s: float = 5.0  # redis-py sets socket timeouts per connection, not per call
    tables: int = 1
    name: str = "redis"

    def connect(self, batches: Sequence[np.ndarray]) -> RedisCaller:
        return RedisCaller(self.host, self.port, self.dim, batches, self.timeout_s, self.tables)


class InProcessCaller:
    """The replica's TableReplica.lookup on this process's own copy of the rows (one lookup per
    table; with several tables they share one copy of the rows)."""

    def __init__(self, rows: int, dim: int, batches: Sequence[np.ndarray], tables: int = 1) -> None:
        self._replica = in_process_replica(rows, dim)
        self._batches = [np.array_split(b, tables) for b in batches]

    def call(self, batch_index: int, timeout: float) -> str:
        for part in self._batches[batch_index]:
            _, found = self._replica.lookup(part)
            if not found.all():
                return "MISSING_ROWS"
        return OK

    def close(self) -> None:
        self._replica = None


def in_process_replica(rows: int, dim: int):
    """A serving.store.TableReplica (1 shard) holding the bench rows."""
    from ps.sharding import ShardMap
    from ps.table.config import TableConfig
    from serving.store import TableReplica

    replica = TableReplica(TableConfig(TABLE, dim=dim), ShardMap.uniform(1))
    keys = bench_keys(rows)
    for start in range(0, rows, _LOAD_CHUNK):
        part = keys[start : start + _LOAD_CHUNK]
        replica.shards[0].upsert(part, row_values(part, dim))
    return replica


@dataclass(frozen=True)
class InProcessTarget:
    rows: int
    dim: int
    tables: int = 1
    name: str = "inprocess"

    def connect(self, batches: Sequence[np.ndarray]) -> InProcessCaller:
        return InProcessCaller(self.rows, self.dim, batches, self.tables)





class EmbpsServer:
    """A real `embps serve` replica on 127.0.0.1 that starts from an export of the bench rows.

    The job it follows names one training shard on a port nothing listens on: no training runs,
    so the replica serves the export and its follower retries once a second (the Lookup path is
    the one a live replica runs; the delta stream is idle).
    """

    def __init__(self, proc: subprocess.Popen, address: str, dim: int, log_path: Path, tables: int = 1) -> None:
        self.proc = proc
        self.address = address
        self.dim = dim
        self.log_path = log_path
        self.tables = table_names(tables)
        self.target = EmbpsTarget(address, self.tables[0] if tables == 1 else self.tables, dim)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    @classmethod
    def start(cls, rows: int, dim: int, workdir: Path, timeout: float = 300.0, max_queue: int | None = None,
              export_uri: str | None = None, max_queue_bytes: int | None = None, tables: int = 1,
              lookup_threads: int | None = None, client_stall_seconds: float | None = None) -> EmbpsServer:
        """Starts a replica of the bench rows in workdir (its config and log there). max_queue,
        max_queue_bytes: the replica's load-shedding bounds (None: serve.toml's defaults; 0: no
        bound). export_uri: an export of the same rows already written (by write_export), shared
        by several replicas. tables: how many tables hold the rows (table_names); lookup_threads:
        the gate's (None: serve.toml's default, one per core); client_stall_seconds: serve.toml's
        (None: its default)."""
        from bench.ports import free_ports
        from ps.job_config import JobConfig, ShardConfig, dump_job_config
        from ps.process.malloc import MALLOC_TUNING
        from ps.table.config import TableConfig
        from serving.config import ExportSource, ServeConfig, dump_serve_config

        workdir.mkdir(parents=True, exist_ok=True)
        if export_uri is None:
            export_uri = (workdir / "export").resolve().as_uri()
            write_export(export_uri, rows, dim, tables)
        shard_port, shard_metrics, listen, metrics = free_ports(4)
        job = JobConfig(
            job=JOB,
            shards=(ShardConfig(f"127.0.0.1:{shard_port}", metrics_port=shard_metrics),),
            tables=tuple(TableConfig(name, dim=dim) for name in table_names(tables)),
            message_limit_bytes=_MESSAGE_LIMIT,
        )
        (workdir / "job.toml").write_text(dump_job_config(job))
        config = ServeConfig(
            job=job, listen=f"127.0.0.1:{listen}", metrics_port=metrics, tables=table_names(tables),
            export=ExportSource(export_uri, JOB),
        )
        if lookup_threads is not None:
            config = replace(config, lookup_threads=lookup_threads)
        if max_queue is not None:
            config = replace(config, max_queue=max_queue)
        if max_queue_bytes is not None:
            config = replace(config, max_queue_bytes=max_queue_bytes)
        if client_stall_seconds is not None:
            config = replace(config, client_stall_seconds=client_stall_seconds)
        config_path = workdir / "serve.toml"
        config_path.write_text(dump_serve_config(config, "job.toml"))
        log_path = workdir / "serve.log"
        env = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": python_path(str(REPO_ROOT))}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "embps", "serve", "--config", str(config_path), "--grace", "2"],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        server = cls(proc, config.listen, dim, log_path, tables)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout: float) -> None:
        """Waits until the replica's health says SERVING (its export is loaded by then)."""
        from serving.server import SERVICE_NAME

        try:
            children.wait_serving(self.address, self.proc, "embps serve", timeout, service=SERVICE_NAME)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}:\n{self.log_tail()}") from None

    def fetch(self, keys: np.ndarray, table: int = 0) -> np.ndarray:
        """keys (n,) int64 -> the rows (n, dim) float32 that table `table` serves (pre-run check)."""
        caller = GrpcCaller(self.address, self.tables[table], self.dim, [keys])
        try:
            reply = caller.reply(0, 10.0)
        finally:
            caller.close()
        return np.frombuffer(reply.values, dtype="<f4").reshape(keys.shape[0], self.dim)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        children.stop(self.proc)


def write_export(uri: str, rows: int, dim: int, tables: int = 1) -> None:
    """An export (kind "export", 1 shard, step 1) of the bench rows under uri/JOB, in each table."""
    from ps.snapshot.files import SnapshotWriter
    from ps.snapshot.manifest import SnapshotKind

    keys = np.sort(bench_keys(rows))
    values = row_values(keys, dim)
    writer = SnapshotWriter(uri, JOB, step=1, kind=SnapshotKind.EXPORT, num_shards=1)
    for name in table_names(tables):
        writer.write_values_shard(name, 0, keys, values, version=1, step=1)
    writer.commit()


class RedisServer:
    """`redis-server` on 127.0.0.1 (no persistence), loaded with the bench rows by pipelined MSET."""

    def __init__(self, proc: subprocess.Popen, port: int, dim: int, tables: int = 1) -> None:
        self.proc = proc
        self.port = port
        self.dim = dim
        self.tables = tables
        self.target = RedisTarget("127.0.0.1", port, dim, tables=tables)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    @staticmethod
    def available() -> str | None:
        """None if redis-server and redis-py are installed, else why the Redis side is skipped."""
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (Debian: apt-get install redis-server, or `make system-tools`)"
        try:
            import redis  # noqa: F401
        except ImportError:
            return "redis-py is not installed (pip install '.[bench]')"
        return None

    @classmethod
    def start(cls, rows: int, dim: int, workdir: Path, timeout: float = 60.0, tables: int = 1) -> RedisServer:
        import redis

        from bench.ports import free_ports

        workdir.mkdir(parents=True, exist_ok=True)
        (port,) = free_ports(1)
        cmd = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = cls(proc, port, dim, tables)
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
            end = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}; see {workdir / 'redis.log'}")
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > end:
                        raise TimeoutError(f"redis-server on port {port} not answering after {timeout} s") from None
                    time.sleep(0.05)
            server._load(client, rows)
            client.close()
        except BaseException:
            server.stop()
            raise
        return server

    def _load(self, client, rows: int) -> None:
        keys = bench_keys(rows)
        pipe = client.pipeline(transaction=False)
        step = 1024
        for start in range(0, rows, _LOAD_CHUNK):
            part = keys[start : start + _LOAD_CHUNK]
            blobs = row_values(part, self.dim).astype("<f4").tobytes()
            width = self.dim * 4
            for table in range(self.tables):
                names = _redis_keys(part, table, self.tables)
                for i in range(0, part.shape[0], step):
                    pipe.mset(
                        {names[j]: blobs[j * width : (j + 1) * width] for j in range(i, min(i + step, len(names)))}
                    )
                pipe.execute()
        held = client.dbsize()
        if held != rows * self.tables:
            raise RuntimeError(f"redis: holds {held} keys after loading {rows} rows in {self.tables} tables")

    def fetch(self, keys: np.ndarray, table: int = 0) -> np.ndarray:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        try:
            values = client.mget(_redis_keys(keys, table, self.tables))
        finally:
            client.close()
        if any(v is None for v in values):
            raise RuntimeError("redis: a bench key has no row")
        return np.frombuffer(b"".join(values), dtype="<f4").reshape(keys.shape[0], self.dim)

    def version(self) -> str:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
        return out.strip()

    def stop(self) -> None:
        children.stop(self.proc)


def check_rows(fetch, rows: int, dim: int, sample: int = 256, seed: int = 0, tables: int = 1) -> None:
    """Raises RuntimeError unless fetch(keys, table) returns row_values(keys) for a sample of the
    rows, in each table."""
    rng = np.random.default_rng(seed)
    keys = bench_keys(rows)[rng.integers(0, rows, min(sample, rows))]
    for table in range(tables):
        got = fetch(keys, table)
        if not np.array_equal(got, row_values(keys, dim)):
            raise RuntimeError(f"the served rows of table {table} differ from the bench rows")
