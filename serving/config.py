"""The config of one serving replica: one TOML file (serve.toml), validated into frozen dataclasses.

    job_config = "job.toml"        # the training job's TOML (shards, tables), relative to this file;
                                   # or an inline [job] table with the same fields
    listen = "127.0.0.1:50200"     # host:port of the read-only Serving service (neither it nor
                                   # metrics_port may be a port the job's shards use on this machine)
    metrics_port = 9200            # Prometheus /metrics on the listen host (0: pick a free port)
    tables = ["user"]              # tables to serve (default: every table of the job)
    default = "zeros"              # row of a key without a row: "zeros" or "init" (the table's
                                   # deterministic init, as the PS would return it)
    storage_dtype = "float32"      # "float16" halves memory, "int8" (row-wise) about quarters it;
                                   # lookups may still reply in float32
    stale_after_seconds = 2.0      # a shard silent this long is stale (health, metrics)
    max_queue = 256                # the most Lookups admitted and not yet answered: one more is
                                   # answered RESOURCE_EXHAUSTED at once, unparsed (load shedding,
                                   # see serving/shedding.py); 0: no bound, every call waits its
                                   # turn and latency grows with the backlog (for comparisons)
    max_queue_bytes = 268435456    # with the serving gate: the most request + reply bytes the
                                   # admitted Lookups may hold (256 MiB); past it more are shed
                                   # the same way (one Lookup is always admitted); 0: no bound
    lookup_threads = 0             # with the serving gate: threads answering Lookups (0: one per
                                   # core of this machine)
    client_stall_seconds = 10.0    # with the serving gate: a Lookup whose client has not sent its
                                   # whole request this long after it was taken (it holds no place
                                   # meanwhile), or a call whose client has not taken its reply
                                   # this long after it was sent, is cancelled, a Lookup's place
                                   # and bytes back in the bounds (a client that stops sending or
                                   # reading would hold its call for good; 0: never)
    consistency = "step"           # "step": every reply at one committed training step across
                                   # shards and tables (the cut, serving/cut.py); "latest": each
                                   # shard as fresh as its stream, no model_version
    max_waiting_bytes = 268435456  # step: deltas received beyond the cut (256 MiB); past it the
                                   # streams ahead of the cut pause (the shards merge what follows)

    [export]                       # optional: start from the latest export, then follow the deltas
    uri = "file:///data/exports"   # or s3://bucket/prefix (credentials from AWS_* variables)
    job = "ctr"                    # default: the training job's name

Every error names the field and the rule, e.g. `stale_after_seconds: must be a number of seconds > 0, got 0`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from ps import toml_writer
from ps.errors import ConfigTypeError
from ps.job_config import (
    LOOPBACK_HOSTS,
    JobConfig,
    load_job_config,
    parse_address,
    parse_job_config,
    same_bind_host,
    shard_endpoints,
)
from ps.snapshot.storage import check_uri
from ps.toml_reader import read_toml, toml_path

# 256 small lookups are ~0.1 s of one replica's CPU (~0.34 ms each): a full queue adds at most about
# that much latency, far below client deadlines, while it absorbs bursts of a few hundred calls.
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_QUEUE_BYTES = 256 << 20
DEFAULT_MAX_WAITING_BYTES = 256 << 20
DEFAULT_CLIENT_STALL_SECONDS = 10.0


class DefaultRow(StrEnum):
    ZEROS = "zeros"
    INIT = "init"


class Consistency(StrEnum):
    STEP = "step"  # one committed step across every shard and table per reply (DESIGN section 9)
    LATEST = "latest"  # each (table, shard) as fresh as its stream


class StorageDType(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"  # row-wise: uint8 codes + float32 scale and bias per row (csrc/row_codec.h)


@dataclass(frozen=True)
class ExportSource:
    """Where the replica's initial rows come from: <uri>/<job>/LATEST (see ps/snapshot/files.py)."""

    uri: str
    job: str


@dataclass(frozen=True)
class ServeConfig:
    """One serving replica. `tables` are the names it serves, all of `job` by default."""

    job: JobConfig
    listen: str
    metrics_port: int = 0
    tables: tuple[str, ...] = ()
    default: DefaultRow = DefaultRow.ZEROS
    storage_dtype: StorageDType = StorageDType.FLOAT32
    stale_after_seconds: float = 2.0
    max_queue: int = DEFAULT_MAX_QUEUE
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    lookup_threads: int = 0
    client_stall_seconds: float = DEFAULT_CLIENT_STALL_SECONDS
    export: ExportSource | None = None
    consistency: Consistency = Consistency.STEP
    max_waiting_bytes: int = DEFAULT_MAX_WAITING_BYTES

    @property
    def host(self) -> str:
        """The host `listen` names, an IPv6 one without its brackets (as sockets take it)."""
        return parse_address("listen", self.listen, lowest_port=0)[0]


_FIELDS = {
    "job_config", "job", "listen", "metrics_port", "tables", "default", "storage_dtype", "stale_after_seconds",
    "max_queue", "max_queue_bytes", "lookup_threads", "client_stall_seconds", "export", "consistency",
    "max_waiting_bytes",
}


def load_serve_config(path: str | Path) -> ServeConfig:
    """Reads and validates serve.toml; ValueError (ConfigTypeError for a wrong type) names the bad field."""
    path = toml_path(path)
    data = read_toml(path)
    return parse_serve_config(data, path.parent)


def parse_serve_config(data: dict, base_dir: Path = Path(".")) -> ServeConfig:
    """A parsed serve.toml (dict) -> ServeConfig; job_config paths are relative to base_dir."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field; known fields: {', '.join(sorted(_FIELDS))}")
    if ("job_config" in data) == ("job" in data):
        raise ValueError("job_config: give exactly one of job_config (a path) or an inline [job] table")
    if "job_config" in data:
        job_path = data["job_config"]
        if not isinstance(job_path, str) or not job_path:
            raise ConfigTypeError(f"job_config: must be a path to the job's TOML, got {job_path!r}")
        if not (base_dir / job_path).is_file():
            raise ValueError(f"job_config: {base_dir / job_path}: no such file")
        job = load_job_config(base_dir / job_path)
    else:
        if not isinstance(data["job"], dict):
            raise ConfigTypeError(f"job: must be a table of the job's fields, got {data['job']!r}")
        job = parse_job_config(data["job"], base_dir)
    listen = data.get("listen")
    host, port = parse_address("listen", listen, lowest_port=0)
    metrics_port = data.get("metrics_port", 0)
    if isinstance(metrics_port, bool) or not isinstance(metrics_port, int) or not 0 <= metrics_port < 65536:
        raise ValueError(f"metrics_port: must be an integer in [0, 65535], got {metrics_port!r}")
    _check_not_a_shard_port(job, host, port, metrics_port)
    known_tables = [t.name for t in job.tables]
    tables = data.get("tables", known_tables)
    if not isinstance(tables, list) or not tables or not all(isinstance(t, str) for t in tables):
        raise ConfigTypeError(f"tables: must be a non-empty list of table names, got {tables!r}")
    for name in tables:
        if name not in known_tables:
            raise ValueError(f"tables: {name!r} is not a table of job {job.job!r} ({', '.join(known_tables)})")
    stale = data.get("stale_after_seconds", 2.0)
    if isinstance(stale, bool) or not isinstance(stale, (int, float)) or not math.isfinite(stale) or stale <= 0:
        raise ValueError(f"stale_after_seconds: must be a number of seconds > 0, got {stale!r}")
    max_queue = data.get("max_queue", DEFAULT_MAX_QUEUE)
    # gRPC's backlog option (the fallback without the gate) is a C int.
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or not 0 <= max_queue <= 2**31 - 1:
        raise ValueError(
            "max_queue: must be an integer in [0, 2147483647] (Lookups waiting before more are shed; 0: no bound), "
            f"got {max_queue!r}"
        )
    max_queue_bytes = data.get("max_queue_bytes", DEFAULT_MAX_QUEUE_BYTES)
    if isinstance(max_queue_bytes, bool) or not isinstance(max_queue_bytes, int) or not 0 <= max_queue_bytes < 2**63:
        raise ValueError(
            "max_queue_bytes: must be an integer in [0, 2**63 - 1] (request + reply bytes of the Lookups waiting "
            f"before more are shed; 0: no bound), got {max_queue_bytes!r}"
        )
    lookup_threads = data.get("lookup_threads", 0)
    if isinstance(lookup_threads, bool) or not isinstance(lookup_threads, int) or not 0 <= lookup_threads <= 1024:
        raise ValueError(
            f"lookup_threads: must be an integer in [0, 1024] (threads answering Lookups; 0: one per core), "
            f"got {lookup_threads!r}"
        )
    stall = data.get("client_stall_seconds", DEFAULT_CLIENT_STALL_SECONDS)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not math.isfinite(stall) or stall < 0:
        raise ValueError(
            f"client_stall_seconds: must be a number of seconds >= 0 (0: a client that stops sending or reading "
            f"holds its place for good), got {stall!r}"
        )
    max_waiting = data.get("max_waiting_bytes", DEFAULT_MAX_WAITING_BYTES)
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
        raise ValueError(
            f"max_waiting_bytes: must be an integer >= 1 (bytes of deltas held beyond the cut), got {max_waiting!r}"
        )
    return ServeConfig(
        job=job,
        listen=listen,
        metrics_port=metrics_port,
        tables=tuple(dict.fromkeys(tables)),
        default=_enum(DefaultRow, "default", data.get("default", "zeros")),
        storage_dtype=_enum(StorageDType, "storage_dtype", data.get("storage_dtype", "float32")),
        stale_after_seconds=float(stale),
        max_queue=max_queue,
        max_queue_bytes=max_queue_bytes,
        lookup_threads=lookup_threads,
        client_stall_seconds=float(stall),
        export=_export(data.get("export"), job.job),
        consistency=_enum(Consistency, "consistency", data.get("consistency", "step")),
        max_waiting_bytes=max_waiting,
    )


def _check_not_a_shard_port(job: JobConfig, host: str, port: int, metrics_port: int) -> None:
    """The replica's ports may not be one its job's shards (primaries, standbys, their metrics)
    serve on this machine: gRPC binds with SO_REUSEPORT, so a replica on a shard's address would
    start without complaint and take half of that shard's calls."""
    if metrics_port and metrics_port == port:
        raise ValueError(f"metrics_port: must differ from the port of listen ({host}:{port}), got {metrics_port}")
    bare_host = host.removeprefix("[").removesuffix("]")
    for (shard_host, shard_port), where in shard_endpoints(job.shards).items():
        if not _same_machine(bare_host, shard_host):
            continue
        for name, mine in (("listen", port), ("metrics_port", metrics_port)):
            if mine == shard_port:
                raise ValueError(
                    f"{name}: {host}:{mine} is {where} ({shard_host}:{shard_port}) of job {job.job!r}; "
                    "a replica needs ports of its own"
                )


def _same_machine(listen_host: str, shard_host: str) -> bool:
    """Whether a replica binding listen_host and a shard at shard_host (both without IPv6 brackets)
    share their sockets' ports: hosts that clash as two shards' would (same_bind_host), or a
    replica on every interface and a shard it reaches on loopback."""
    if same_bind_host(listen_host, shard_host):
        return True
    if listen_host == "0.0.0.0":
        return shard_host in ("localhost", "127.0.0.1")
    return listen_host == "::" and shard_host in LOOPBACK_HOSTS


def _enum(cls: type[StrEnum], name: str, value: object) -> StrEnum:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name}: must be one of {choices}, got {value!r}") from None


def _export(raw: object, job: str) -> ExportSource | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"export: must be a table with uri (and job), got {raw!r}")
    unknown = sorted(set(raw) - {"uri", "job"})
    if unknown:
        raise ValueError(f"export.{unknown[0]}: unknown field; known fields: job, uri")
    uri = raw.get("uri")
    if not isinstance(uri, str) or "://" not in uri:
        raise ValueError(f"export.uri: must be a URI like file:///path or s3://bucket/prefix, got {uri!r}")
    check_uri(uri, "export.uri")
    export_job = raw.get("job", job)
    if not isinstance(export_job, str) or not export_job:
        raise ConfigTypeError(f"export.job: must be the job name the export was written under, got {export_job!r}")
    return ExportSource(uri, export_job)


def dump_serve_config(config: ServeConfig, job_config_path: str) -> str:
    """A serve.toml that load_serve_config reads back as `config` (its job from job_config_path)."""
    top = {
        "job_config": job_config_path,
        "listen": config.listen,
        "metrics_port": config.metrics_port,
        "tables": config.tables,
        "default": config.default,
        "storage_dtype": config.storage_dtype,
        "stale_after_seconds": config.stale_after_seconds,
        "max_queue": config.max_queue,
        "max_queue_bytes": config.max_queue_bytes,
        "lookup_threads": config.lookup_threads,
        "client_stall_seconds": config.client_stall_seconds,
        "consistency": config.consistency,
        "max_waiting_bytes": config.max_waiting_bytes,
    }
    blocks = [toml_writer.assignments(top)]
    if config.export is not None:
        blocks.append(toml_writer.table("export", asdict(config.export)))
    return toml_writer.document(blocks)
