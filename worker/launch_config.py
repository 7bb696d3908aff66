"""The `[launch]` section of a job's TOML: what `embps launch` does beyond starting the job once.

    [launch]
    max_restarts = 3                    # restarts after a worker or PS shard dies (default 0)

    [[launch.serving]]                  # serving replicas started beside the job (default none)
    listen = "127.0.0.1:50200"          # host:port of the replica's read-only Serving service
    metrics_port = 9200                 # Prometheus /metrics (0: pick a free port)

max_restarts bounds two things, counted apart: restarts of the training (every worker and every
shard, from the LATEST snapshot) and, for each serving replica, restarts of that replica alone.
A replica's death costs training nothing, so it never uses up the training's restarts.

Errors name the field: `launch.serving[1].listen: must be 'host:port' ...`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from ps.job_config import build_config

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


def load_launch_settings(path: str | Path, shard_addresses: tuple[str, ...] | list[str] = ()) -> LaunchSettings:
    """The `[launch]` section of the job TOML at `path` (defaults when it has none)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    return parse_launch_settings(data.get("launch", {}), shard_addresses)


def parse_launch_settings(raw: object, shard_addresses: tuple[str, ...] | list[str]) -> LaunchSettings:
    """A parsed `[launch]` table -> LaunchSettings; a replica may not listen on a shard's address."""
    if not isinstance(raw, dict):
        raise TypeError(f"launch: must be a table ([launch]), got {raw!r}")
    replicas_raw = raw.get("serving", [])
    if not isinstance(replicas_raw, list):
        raise TypeError(f"launch.serving: must be an array of tables ([[launch.serving]]), got {replicas_raw!r}")
    settings = build_config(LaunchSettings, {k: v for k, v in raw.items() if k != "serving"}, "launch")
    check_max_restarts("launch.max_restarts", settings.max_restarts)
    replicas = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(replicas_raw):
        where = f"launch.serving[{i}]"
        replica = build_config(ReplicaSpec, entry, where)
        host, _, port = replica.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{where}.listen: must be 'host:port' with a port in [1, 65535], got {replica.listen!r}")
        if not 0 <= replica.metrics_port < 65536:
            raise ValueError(f"{where}.metrics_port: must be in [0, 65535], got {replica.metrics_port}")
        if replica.listen in seen:
            other = seen[replica.listen]
            raise ValueError(f"{where}.listen: {replica.listen!r} is also launch.serving[{other}].listen")
        if replica.listen in shard_addresses:
            raise ValueError(f"{where}.listen: {replica.listen!r} is a PS shard's address")
        seen[replica.listen] = i
        replicas.append(replica)
    return LaunchSettings(max_restarts=settings.max_restarts, serving=tuple(replicas))


def check_max_restarts(path: str, value: int) -> None:
    """`path` (launch.max_restarts or --max-restarts) must be an integer in [0, MAX_RESTARTS_LIMIT]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{path}: must be an integer, got {value!r}")
    if not 0 <= value <= MAX_RESTARTS_LIMIT:
        raise ValueError(f"{path}: must be in [0, {MAX_RESTARTS_LIMIT}], got {value}")
