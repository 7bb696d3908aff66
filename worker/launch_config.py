"""The `[launch]` section of a job's TOML: what `embps launch` does beyond starting the job once.

    [launch]
    max_restarts = 3                    # restarts after a worker or PS shard dies (default 0)

    [[launch.serving]]                  # serving replicas started beside the job (default none)
    listen = "127.0.0.1:50200"          # host:port of the replica's read-only Serving service
    metrics_port = 9200                 # Prometheus /metrics (0: pick a free port)

max_restarts bounds two things, counted apart: restarts of the training (every worker and every
shard, from the LATEST snapshot) and, for each serving replica, restarts of that replica alone.
A replica's death costs training nothing, so it never uses up the training's restarts.

A replica binds `listen` and, unless it is 0, metrics_port on the listen host: neither may be a
host:port that a PS shard (its address, metrics_port, standby, standby_metrics_port) or another
replica binds, or one of the two could not start.

Errors name the field: `launch.serving[1].listen: must be 'host:port' ...`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ps.errors import ConfigTypeError
from ps.job_config import ShardConfig, build_config, claim_endpoint, parse_address, shard_endpoints
from ps.toml_reader import read_toml, toml_path

MAX_RESTARTS_LIMIT = 1000


@dataclass(frozen=True)
class ReplicaSpec:
    """One `embps serve` replica of the job: it serves every table, following the job's shards."""

    listen: str
    metrics_port: int = 0


@dataclass(frozen=True)
class LaunchSettings:
    """`[launch]`: max_restarts (see the module docstring) and the serving replicas."""

    max_restarts: int = 0
    serving: tuple[ReplicaSpec, ...] = ()


def load_launch_settings(
    path: str | Path, shards: Sequence[ShardConfig] = (), train_metrics_port: int | None = None
) -> LaunchSettings:
    """The `[launch]` section of the job TOML at `path` (defaults when it has none); `shards` and
    `train_metrics_port` as for parse_launch_settings."""
    path = toml_path(path)
    data = read_toml(path)
    return parse_launch_settings(data.get("launch", {}), shards, train_metrics_port)


def parse_launch_settings(
    raw: object, shards: Sequence[ShardConfig], train_metrics_port: int | None = None
) -> LaunchSettings:
    """A parsed `[launch]` table -> LaunchSettings. `shards`: the job's shards; a replica may bind
    none of the host:port pairs they bind, nor `train_metrics_port` (rank 0's, on every interface
    of the launcher's node, where the replicas run too)."""
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"launch: must be a table ([launch]), got {raw!r}")
    replicas_raw = raw.get("serving", [])
    if not isinstance(replicas_raw, list):
        raise ConfigTypeError(
            f"launch.serving: must be an array of tables ([[launch.serving]]), got {replicas_raw!r}"
        )
    settings = build_config(LaunchSettings, {k: v for k, v in raw.items() if k != "serving"}, "launch")
    check_max_restarts("launch.max_restarts", settings.max_restarts)
    taken = shard_endpoints(shards)
    if train_metrics_port:
        taken["0.0.0.0", train_metrics_port] = "train.metrics_port (rank 0's, on every interface)"
    replicas = []
    for i, entry in enumerate(replicas_raw):
        where = f"launch.serving[{i}]"
        if not isinstance(entry, dict):
            raise ConfigTypeError(f"{where}: must be a table with listen and metrics_port, got {entry!r}")
        replica = build_config(ReplicaSpec, entry, where)
        host, port = parse_address(f"{where}.listen", replica.listen)
        if not 0 <= replica.metrics_port < 65536:
            raise ValueError(f"{where}.metrics_port: must be in [0, 65535], got {replica.metrics_port}")
        _claim(taken, host, port, f"{where}.listen")
        _claim(taken, host, replica.metrics_port, f"{where}.metrics_port")
        replicas.append(replica)
    return LaunchSettings(max_restarts=settings.max_restarts, serving=tuple(replicas))


def check_max_restarts(path: str, value: int) -> None:
    """`path` (launch.max_restarts or --max-restarts) must be an integer in [0, MAX_RESTARTS_LIMIT]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{path}: must be an integer, got {value!r}")
    if not 0 <= value <= MAX_RESTARTS_LIMIT:
        raise ValueError(f"{path}: must be in [0, {MAX_RESTARTS_LIMIT}], got {value}")


def _claim(taken: dict[tuple[str, int], str], host: str, port: int, where: str) -> None:
    """claim_endpoint (ps/job_config.py): ValueError if a shard or an earlier replica binds
    host:port already, as only one of the two could start; said plainly for a shard's own address."""
    other = taken.get((host, port)) if port else None
    if other is not None and other.endswith(("].address", "].standby")):
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ValueError(f"{where}: {shown!r} is a PS shard's address ({other})")
    claim_endpoint(taken, host, port, where)
