"""Child processes of `embps launch`: PS shards and serving replicas started, health-checked and
stopped by pid; each dies with the launcher, even when the launcher is killed with SIGKILL (the
child arranges that itself: ps.process.children.die_with_launcher). Each runs in a session of its
own, so a terminal's Ctrl-C (SIGINT to the whole foreground group) reaches the launcher, which
stops them, and not them: they stopped on it by themselves (exit 0), and the launcher took that
for a death to restart the job from (with max_restarts > 0 it trained on to the end).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ps.process.python_command import python_module


def start_shard(
    config_path: str, index: int, log_path: Path, restore_step: int | None = None, standby: str | None = None
) -> subprocess.Popen:
    """`python -m embps ps --config config_path --shard index [--restore-step S] [--standby SLOT]`,
    output to log_path (standby: "standby" or "primary", the address it takes)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    restore = ["--restore-step", str(restore_step)] if restore_step is not None else []
    restore += ["--standby", standby] if standby else []
    argv, env = python_module("embps", "ps", "--config", config_path, "--shard", str(index), *restore)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_replica(config_path: Path, log_path: Path) -> subprocess.Popen:
    """`python -m embps serve --config config_path` (a serve.toml), output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv, env = python_module("embps", "serve", "--config", str(config_path))
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
