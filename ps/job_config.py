"""The job config: one TOML file declaring the shards, the tables and the RPC limits.

    job = "ctr"
    message_limit_bytes = 67108864      # largest gRPC message either side sends (default 64 MiB)

    [deadlines]                         # seconds a client waits for one call, retries included
    lookup = 10.0
    push = 30.0
    stats = 5.0

    [sharding]                          # optional; default: equal contiguous bucket ranges
    bucket_ranges = [[0, 32768, 0], [32768, 65536, 1]]

    [[shards]]
    address = "127.0.0.1:50051"         # host:port the shard's gRPC server binds (IPv6: "[::1]:50051")
    metrics_port = 9101                 # Prometheus /metrics (0: pick a free port); no two fields of
                                        # the job may bind one host:port

    [tables.user]                       # every TableConfig field; the table's name is its key
    dim = 16
    capacity = 1000000
    optimizer = { kind = "adagrad", lr = 0.05 }

    [security]                          # optional: TLS, mutual TLS, bearer tokens per role (ps/security/)
    tls_cert = "certs/server.pem"
    tls_key = "certs/server.key"
    tokens.trainer = { file = "secrets/trainer.token" }

Relative paths are relative to the TOML file.
Every error names the field and the rule, e.g. `tables.user.dim: must be in [1, 65536], got 0`.
"""

from __future__ import annotations

import dataclasses
import math
import ssl
import types
import typing
import urllib.parse
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import numpy as np

from ps import toml_writer
from ps.errors import ConfigTypeError
from ps.etcd import parse_endpoints
from ps.names import NAME_RULE, is_name
from ps.security import SecurityConfig, dump_security, parse_security
from ps.security.config import config_path
from ps.sharding import ShardMap
from ps.snapshot.storage import StorageConfig, check_uri
from ps.table.config import AdmissionConfig, EvictionConfig, OptimizerConfig, TableConfig
from ps.toml_reader import read_toml, toml_path

DEFAULT_MESSAGE_LIMIT = 64 << 20
DEFAULT_DEDUPE_WINDOW = 4096  # push ids of one client a shard remembers (push_dedupe_window)
_MIN_MESSAGE_LIMIT = 64 << 10
# gRPC's message-size options are C ints, and the processes set them 64 KiB above the limit
# (protobuf framing around the bulk bytes).
MAX_MESSAGE_LIMIT = 2**31 - 1 - (1 << 16)
# A one-key push or lookup beside its row's values: its key, the table's name (at most 200 bytes),
# protobuf's tags and lengths, the push id.
_ONE_ROW_FRAMING = 1 << 10
# A day: gRPC turns a deadline past ~1e9 s into one already expired, so every call would fail.
MAX_DEADLINE_S = 86400.0


@dataclass(frozen=True)
class Deadlines:
    """Seconds a client call may take, retries included; every call has one."""

    lookup: float = 10.0
    push: float = 30.0
    stats: float = 5.0


@dataclass(frozen=True)
class ShardConfig:
    """One shard process: the gRPC `address` ("host:port") and its Prometheus port; optionally a
    `standby` ("host:port", with `standby_metrics_port`) that applies every push before the
    primary acknowledges it (ps/shard/replication.py; needs [arbiter])."""

    address: str
    metrics_port: int = 0
    standby: str = ""
    standby_metrics_port: int = 0

    def addresses(self) -> list[str]:
        """Where this shard may answer: the primary's address, then the standby's (if any)."""
        return [self.address, self.standby] if self.standby else [self.address]

    @property
    def host(self) -> str:
        """The address's host as a socket binds it (an IPv6 host without its brackets)."""
        return parse_address("address", self.address)[0]

    @property
    def port(self) -> int:
        return parse_address("address", self.address)[1]


def parse_address(where: str, address: object, lowest_port: int = 1) -> tuple[str, int]:
    """'host:port' (an IPv6 host in brackets: '[::1]:50051') -> (host without brackets, port);
    ValueError naming `where` unless the port is in [lowest_port, 65535] (0: a listen address
    whose port the system picks) and the host is not empty."""
    rule = f"must be 'host:port' with a port in [{lowest_port}, 65535] (an IPv6 host in brackets: '[::1]:port')"
    if not isinstance(address, str):
        raise ValueError(f"{where}: {rule}, got {address!r}")
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]") and ":" in host:
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        host = ""
    if not colon or not host or not port.isascii() or not port.isdigit() or not lowest_port <= int(port) < 65536:
        raise ValueError(f"{where}: {rule}, got {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class ArbiterConfig:
    """Who decides which of a shard's pair is primary (`[arbiter]`): etcd, reached over its v3
    JSON gateway at `endpoints` ("http://host:port" or "https://host:port", comma-separated for
    several). The primary holds a lease of `lease_seconds`; its standby may take over that long
    after it stopped renewing (the failover's stall is about that).

    Over https: `tls_ca`, the CA that signed etcd's certificate (default: the system's), and
    `client_cert` / `client_key`, this process's certificate for an etcd that requires one
    (`--client-cert-auth`): whoever can write the membership records chooses each shard's
    primary, so a shared etcd wants both. Paths relative to the TOML file; read at the shard's
    start (a file that does not load ends it with a line naming the field)."""

    endpoints: str
    lease_seconds: int = 2
    tls_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS of the https endpoints (None: plain http): ValueError naming the field whose
        file does not load."""
        if urllib.parse.urlsplit(parse_endpoints(self.endpoints)[0]).scheme != "https":  # HTTPS:// too
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"arbiter.tls_ca: cannot load {self.tls_ca}: {exc}") from None
        if self.client_cert is not None:
            try:
                context.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"arbiter.client_cert: cannot load {self.client_cert} with arbiter.client_key {self.client_key}: "
                    f"{exc}"
                ) from None
        return context


@dataclass(frozen=True)
class SnapshotConfig:
    """Where and how often a training job snapshots itself (`[snapshot]`).

    uri: pyarrow.fs URI the snapshots go under (file://, s3://, hdfs://, or a local path).
    every_steps: steps between snapshots; 0 snapshots only at the end of training.
    full_every: every n-th snapshot is full, the others incremental on the one before.
    keep: complete snapshots kept after each new one (0: keep all).
    retries: tries after the first when a round fails (storage or a shard unavailable); past them
    the round is skipped with a warning and training goes on.
    retry_backoff_s: seconds before the first retry, doubled before each next one.
    round_timeout_s: a round's tries together, deadlines included; keep it under torch.distributed's
    collective timeout (30 min with gloo), as every rank waits for the round.
    staging_bytes: what each shard may hold in copies of its tables per round (estimated as about
    twice the rows' bytes), so that training goes on while they are written; a table past it is
    written while training waits. 0: training waits for every file.
    storage: S3 endpoint, region, credentials; unset fields come from the AWS_* variables.
    """

    uri: str
    every_steps: int = 0
    full_every: int = 4
    keep: int = 0
    retries: int = 3
    retry_backoff_s: float = 5.0
    round_timeout_s: float = 540.0
    staging_bytes: int = 1 << 30
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass(frozen=True)
class JobConfig:
    """A whole job. `shard_map` maps the 2^16 buckets to indexes of `shards`."""

    job: str
    shards: tuple[ShardConfig, ...]
    tables: tuple[TableConfig, ...]
    message_limit_bytes: int = DEFAULT_MESSAGE_LIMIT
    deadlines: Deadlines = field(default_factory=Deadlines)
    shard_map: ShardMap | None = None
    push_dedupe_window: int = DEFAULT_DEDUPE_WINDOW
    snapshot: SnapshotConfig | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)
    arbiter: ArbiterConfig | None = None

    def __post_init__(self) -> None:
        if self.shard_map is None:
            object.__setattr__(self, "shard_map", ShardMap.uniform(max(1, len(self.shards))))

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.shards]

    def table(self, name: str) -> TableConfig:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"job {self.job!r} has no table {name!r}")


def load_job_config(path: str | Path) -> JobConfig:
    """Reads and validates a TOML job config; ValueError (ConfigTypeError for a wrong type) names the bad field."""
    path = toml_path(path)
    return parse_job_config(read_toml(path), path.resolve().parent)


# Sections of the same job file that other components read (the training workers, `embps deploy
# render`, `embps launch`); the PS skips them, so one file describes the whole job.
OTHER_SECTIONS = frozenset({"train", "model", "data", "deploy", "launch"})
PS_SECTIONS = frozenset({
    "job", "shards", "tables", "message_limit_bytes", "deadlines", "sharding", "push_dedupe_window", "snapshot",
    "security", "arbiter",
})


def parse_job_config(data: dict, base_dir: Path | None = None) -> JobConfig:
    """A parsed TOML document (dict) -> a validated JobConfig; relative paths ([security]) are
    joined to base_dir (the TOML's directory)."""
    _reject_unknown("", data, PS_SECTIONS | OTHER_SECTIONS)  # a misspelled [train] is not "unknown to the PS"
    data = {k: v for k, v in data.items() if k not in OTHER_SECTIONS}
    job = data.get("job")
    if not is_name(job):
        raise ValueError(f"job: must be {NAME_RULE}, got {job!r}")
    shards = _parse_shards(data.get("shards"))
    tables = _parse_tables(data.get("tables"))
    limit = data.get("message_limit_bytes", DEFAULT_MESSAGE_LIMIT)
    _check_int("message_limit_bytes", limit, _MIN_MESSAGE_LIMIT, MAX_MESSAGE_LIMIT)
    for table in tables:  # a push or lookup of one key must fit: no split could send it
        if 4 * table.dim + _ONE_ROW_FRAMING > limit:
            raise ValueError(
                f"tables.{table.name}.dim: one row of dim {table.dim} ({4 * table.dim:,} bytes with its framing up to "
                f"{4 * table.dim + _ONE_ROW_FRAMING:,}) does not fit message_limit_bytes {limit:,}: raise the limit or "
                "lower the dim"
            )
    window = data.get("push_dedupe_window", DEFAULT_DEDUPE_WINDOW)
    _check_int("push_dedupe_window", window, 1, 1 << 24)
    deadlines = build_config(Deadlines, _table_of(data, "deadlines"), "deadlines")
    for f in fields(Deadlines):
        value = getattr(deadlines, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DEADLINE_S:
            raise ValueError(
                f"deadlines.{f.name}: must be a number of seconds in (0, {MAX_DEADLINE_S:g}], got {value!r}"
            )
    sharding = _table_of(data, "sharding")
    _reject_unknown("sharding", sharding, {"bucket_ranges"})
    if "bucket_ranges" in sharding:
        ranges = sharding["bucket_ranges"]
        if not isinstance(ranges, list):
            raise ConfigTypeError(f"sharding.bucket_ranges: must be a list of [start, stop, shard], got {ranges!r}")
        shard_map = ShardMap.from_ranges(len(shards), ranges, "sharding.bucket_ranges")
        unused = sorted(set(range(len(shards))) - set(shard_map.buckets.tolist()))
        if unused:
            raise ValueError(f"sharding.bucket_ranges: shards {unused} own no bucket")
    else:
        shard_map = ShardMap.uniform(len(shards))
    snapshot = None
    if "snapshot" in data:
        snapshot = build_config(SnapshotConfig, _table_of(data, "snapshot"), "snapshot")
        check_uri(snapshot.uri, "snapshot.uri")
        _check_int("snapshot.every_steps", snapshot.every_steps, 0, 2**32 - 1)
        _check_int("snapshot.full_every", snapshot.full_every, 1, 2**31)
        _check_int("snapshot.keep", snapshot.keep, 0, 2**31)
        _check_int("snapshot.retries", snapshot.retries, 0, 100)
        _check_int("snapshot.staging_bytes", snapshot.staging_bytes, 0, 2**62)
        for name in ("retry_backoff_s", "round_timeout_s"):
            value = getattr(snapshot, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"snapshot.{name}: must be a number of seconds > 0, got {value!r}")
        snapshot.storage.validate("snapshot.storage")
    security = parse_security(data["security"], base_dir) if "security" in data else SecurityConfig()
    arbiter = _parse_arbiter(data["arbiter"], base_dir) if "arbiter" in data else None
    if arbiter is None and any(s.standby for s in shards):
        first = next(i for i, s in enumerate(shards) if s.standby)
        raise ValueError(
            f"shards[{first}].standby: a standby needs [arbiter] endpoints (etcd decides which of the pair is "
            "primary; shards never decide alone)"
        )
    if security.auth and security.tokens.shard is None and any(s.standby for s in shards):
        raise ValueError(
            "security.tokens.shard: a job with standbys and tokens needs the shard role's token: a primary "
            "streams its pushes to its standby with it, and the standby's port takes no other token for that "
            "(a worker's trainer token may not take the stream from the primary)"
        )
    return JobConfig(
        job=job,
        shards=shards,
        tables=tables,
        message_limit_bytes=limit,
        deadlines=deadlines,
        shard_map=shard_map,
        push_dedupe_window=window,
        snapshot=snapshot,
        security=security,
        arbiter=arbiter,
    )


def _parse_arbiter(raw: object, base_dir: Path | None) -> ArbiterConfig:
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"arbiter: must be a table ([arbiter]), got {raw!r}")
    arbiter = build_config(ArbiterConfig, raw, "arbiter")
    if not isinstance(arbiter.endpoints, str) or not arbiter.endpoints.strip():
        raise ValueError(f"arbiter.endpoints: must be 'http://host:port[,...]' (etcd), got {arbiter.endpoints!r}")
    endpoints = parse_endpoints(arbiter.endpoints)
    _check_int("arbiter.lease_seconds", arbiter.lease_seconds, 1, 3600)
    files = {name: getattr(arbiter, name) for name in ("tls_ca", "client_cert", "client_key")}
    for name, value in files.items():
        if value is not None:
            files[name] = config_path(f"arbiter.{name}", value, base_dir)
    if (files["client_cert"] is None) != (files["client_key"] is None):
        pair = ("client_cert", "client_key")
        given, missing = pair if files["client_cert"] is not None else pair[::-1]
        raise ValueError(f"arbiter.{missing}: required with arbiter.{given}")
    given = [name for name, value in files.items() if value is not None]
    schemes = {urllib.parse.urlsplit(e).scheme for e in endpoints}
    if given and schemes != {"https"}:
        raise ValueError(f"arbiter.{given[0]}: TLS files need every endpoint https://, got {arbiter.endpoints!r}")
    if len(schemes) > 1:
        raise ValueError(f"arbiter.endpoints: all http:// or all https://, got {arbiter.endpoints!r}")
    return dataclasses.replace(arbiter, **files)



def _parse_shards(raw: object) -> tuple[ShardConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"shards: must be a non-empty array of tables ([[shards]]), got {raw!r}")
    shards = []
    for i, entry in enumerate(raw):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise ConfigTypeError(f"{where}: must be a table with address and metrics_port, got {entry!r}")
        shard = build_config(ShardConfig, entry, where)
        parse_address(f"{where}.address", shard.address)
        _check_int(f"{where}.metrics_port", shard.metrics_port, 0, 65535)
        _check_int(f"{where}.standby_metrics_port", shard.standby_metrics_port, 0, 65535)
        if shard.standby:
            parse_address(f"{where}.standby", shard.standby)
        shards.append(shard)
    shard_endpoints(shards)  # two fields binding one port: raises
    return tuple(shards)


def shard_endpoints(shards: Sequence[ShardConfig]) -> dict[tuple[str, int], str]:
    """(host without brackets, port) -> the field that binds it, for every port the shards bind:
    addresses, metrics ports, standbys and their metrics ports (a port 0, picked free at start, is
    left out). ValueError naming both fields if two of them bind the same host:port."""
    taken: dict[tuple[str, int], str] = {}
    for i, shard in enumerate(shards):
        binds = [("address", shard.address, "metrics_port", shard.metrics_port)]
        if shard.standby:
            binds.append(("standby", shard.standby, "standby_metrics_port", shard.standby_metrics_port))
        for address_field, address, metrics_field, metrics_port in binds:
            host, port = parse_address(f"shards[{i}].{address_field}", address)
            claim_endpoint(taken, host, port, f"shards[{i}].{address_field}")
            claim_endpoint(taken, host, metrics_port, f"shards[{i}].{metrics_field}")
    return taken


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def same_bind_host(a: str, b: str) -> bool:
    """Whether servers binding one port on hosts a and b (without brackets) clash."""
    return b in _clashing_hosts(a)


def _clashing_hosts(host: str) -> tuple[str, ...]:
    """The hosts whose binding of a port clashes with `host`'s: itself, and localhost (which binds
    both loopbacks) against a loopback."""
    if host == "localhost":
        return tuple(LOOPBACK_HOSTS)
    return (host, "localhost") if host in LOOPBACK_HOSTS else (host,)


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # every interface: clashes with any host on its port


def claim_endpoint(taken: dict[tuple[str, int], str], host: str, port: int, where: str) -> None:
    """Records that field `where` binds host:port (0: a free port, never a clash); ValueError if an
    earlier field binds the same one, or any host's where either is a wildcard (only one of the
    two servers could start)."""
    if port == 0:
        return
    clashing = _clashing_hosts(host)
    for (other, other_port), other_where in taken.items():
        if other_port == port and (other in clashing or host in WILDCARD_HOSTS or other in WILDCARD_HOSTS):
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ValueError(f"{where}: {shown!r} is also {other_where}; only one of the two could bind it")
    taken[host, port] = where


def _parse_tables(raw: object) -> tuple[TableConfig, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"tables: must declare at least one table ([tables.NAME] with dim), got {raw!r}")
    tables = []
    for name, entry in raw.items():
        where = f"tables.{toml_writer.key(name)}"  # as the file spells it: tables."v1.user"
        if not isinstance(entry, dict):
            raise ConfigTypeError(f"{where}: must be a table of fields, got {entry!r}")
        if "name" in entry and entry["name"] != name:
            raise ValueError(f"{where}.name: the table's name is its key {name!r}, got {entry['name']!r}")
        entry = {**entry, "name": name}
        tables.append(build_config(TableConfig, entry, where).validate(where))
    return tuple(tables)


_NESTED = {OptimizerConfig, AdmissionConfig, EvictionConfig, Deadlines, ShardConfig, StorageConfig}


def build_config(cls: type, data: dict, where: str):
    """Builds dataclass `cls` from a TOML table: unknown and missing fields name their path,
    StrEnum fields are converted (bad values list the choices), lists become tuples where the
    field is a tuple, ints, floats, strings and bools are type-checked, nested configs recurse."""
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{where}: must be a table of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    _reject_unknown(where, data, names)
    kwargs = {}
    for f in fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{path}: required field is missing")
            continue
        value = data[f.name]
        hint = _strip_optional(hints[f.name])
        if hint in _NESTED or dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigTypeError(f"{path}: must be a table of fields, got {value!r}")
            value = build_config(hint, value, path)
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigTypeError(f"{path}: must be a list, got {value!r}")
            value = tuple(value)
        elif hint is bool and not isinstance(value, bool):
            raise ConfigTypeError(f"{path}: must be true or false, got {value!r}")
        elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigTypeError(f"{path}: must be an integer, got {value!r}")
        elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigTypeError(f"{path}: must be a number, got {value!r}")
        elif hint is str and not isinstance(value, str):
            raise ConfigTypeError(f"{path}: must be a string, got {value!r}")
        elif isinstance(hint, type) and issubclass(hint, StrEnum):
            try:
                value = hint(value)
            except ValueError:
                choices = ", ".join(repr(m.value) for m in hint)
                raise ValueError(f"{path}: must be one of {choices}, got {value!r}") from None
        kwargs[f.name] = value
    return cls(**kwargs)


def _strip_optional(hint: object) -> object:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _table_of(data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigTypeError(f"{key}: must be a table ([{key}]), got {value!r}")
    return value


def _reject_unknown(where: str, data: dict, known: set[str]) -> None:
    for key in data:
        if key not in known:
            path = f"{where}.{key}" if where else key
            raise ValueError(f"{path}: unknown field; known fields: {', '.join(sorted(known))}")


def _check_int(path: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{path}: must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{path}: must be in [{low}, {high}], got {value}")


def dump_job_config(job: JobConfig) -> str:
    """A TOML text that load_job_config reads back as `job` (used by tests and the benchmark)."""
    top = {"job": job.job, "message_limit_bytes": job.message_limit_bytes, "push_dedupe_window": job.push_dedupe_window}
    blocks = [toml_writer.assignments(top), toml_writer.table("deadlines", dataclasses.asdict(job.deadlines))]
    if job.shard_map != ShardMap.uniform(len(job.shards)):
        blocks.append(toml_writer.table("sharding", {"bucket_ranges": _ranges(job.shard_map)}))
    blocks += [toml_writer.table("shards", dataclasses.asdict(s), array=True) for s in job.shards]
    for t in job.tables:
        table_fields = {name: v for name, v in dataclasses.asdict(t).items() if name != "name"}
        blocks.append(toml_writer.table(("tables", t.name), table_fields))
    if job.snapshot is not None:
        blocks.append(toml_writer.table("snapshot", dataclasses.asdict(job.snapshot)))
    if job.arbiter is not None:
        blocks.append(toml_writer.table("arbiter", dataclasses.asdict(job.arbiter)))
    blocks.append(dump_security(job.security))
    return toml_writer.document(blocks)


def _ranges(shard_map: ShardMap) -> list[list[int]]:
    b = shard_map.buckets
    starts = [0, *(int(i) for i in np.flatnonzero(b[1:] != b[:-1]) + 1)]
    stops = [*starts[1:], len(b)]
    return [[a, z, int(b[a])] for a, z in zip(starts, stops, strict=True)]
