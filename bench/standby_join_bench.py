"""`embps bench standby-join`: what a new standby's state copy costs the primary's pushes.

    primary + standby (etcd as the arbiter), one table of --rows rows filled by pushes
    SIGKILL the standby -> the primary goes on alone
    a client pushes --batch keys back to back -> start a new standby -> it copies the state, catches up, is in sync

The primary copies its rows while it goes on alone, a piece between two pushes, then the rows
written since; only the rest (layout, counters, the rows written since their copy) is taken at one
point of its apply order (ps/shard/replication.py), and a push that arrives meanwhile waits for it:
the longest push of the join shows that stall. Printed: the table's bytes, the join's phases
(copying, catching up, in sync) from the primary's role gauge, the pushes' p50 before the join and
the longest one during it, the primary's RSS before the join and at its peak during it, and the new
standby's peak RSS (sampled every 20 ms).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.ports import loopback_shards
from bench.ps_bench import REPO_ROOT, start_etcd, start_shards
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, dump_job_config
from ps.process import children
from ps.process.python_command import python_path
from ps.shard.replication import ROLE_VALUES
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig

TABLE = "emb"
FILL_KEYS = 65_536  # keys per push while filling


@dataclass(frozen=True)
class StandbyJoinBenchConfig:
    rows: int = 2_000_000
    dim: int = 64
    batch: int = 1024  # keys per push during the join
    timeout_s: float = 600.0  # for the join
    out: str | None = None


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Pusher:
    """Pushes `batch` keys of the filled range back to back on a thread; keeps (end time, latency)."""

    def __init__(self, job: JobConfig, config: StandbyJoinBenchConfig) -> None:
        from ps.client import PSClient

        self._client = PSClient.from_job(job, deadlines=Deadlines(push=600.0, lookup=60.0, stats=60.0))
        self._config = config
        self._stop = threading.Event()
        self.pushes: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        grads = (rng.standard_normal((self._config.batch, self._config.dim)) * 0.01).astype(np.float32)
        try:
            while not self._stop.is_set():
                keys = rng.choice(self._config.rows, self._config.batch, replace=False).astype(np.int64)
                t0 = time.monotonic()
                self._client.push(TABLE, keys, grads)
                t1 = time.monotonic()
                self.pushes.append((t1, t1 - t0))
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        self._client.close()
        if self.error is not None:
            raise RuntimeError(f"a push failed during the join: {self.error}") from self.error


def _fill(job: JobConfig, config: StandbyJoinBenchConfig) -> float:
    from ps.client import PSClient

    start = time.monotonic()
    grads = np.full((FILL_KEYS, config.dim), 0.01, dtype=np.float32)
    with PSClient.from_job(job, deadlines=Deadlines(push=600.0, lookup=60.0, stats=60.0)) as client:
        for first in range(0, config.rows, FILL_KEYS):
            keys = np.arange(first, min(first + FILL_KEYS, config.rows), dtype=np.int64)
            client.push(TABLE, keys, grads[: keys.shape[0]])
            done = first + keys.shape[0]
            print(f"\rfilling: {done:,} / {config.rows:,} rows", end="", flush=True)
    print()
    return time.monotonic() - start


def _wait_role(port: int, roles: set[str], deadline: float, what: str, on_tick=None) -> float:
    values = {ROLE_VALUES[r] for r in roles}
    while time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        if _metric(port, "embps_shard_role") in values:
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit(f"embps bench standby-join: {what} did not happen in time")


def run_standby_join_bench(config: StandbyJoinBenchConfig) -> int:
    (shard,) = loopback_shards(1, standbys=True)
    table = TableConfig(TABLE, dim=config.dim, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.01))
    job = JobConfig(job="bench", shards=(shard,), tables=(table,), deadlines=Deadlines(push=600.0, stats=60.0))
    with tempfile.TemporaryDirectory(prefix="embps-bench-standby-join-") as workdir:
        etcd = start_etcd(Path(workdir))
        procs: list[subprocess.Popen] = []
        try:
            job = dataclasses.replace(job, arbiter=ArbiterConfig(endpoints=etcd.endpoint))
            procs = start_shards(job, Path(workdir), True)
            primary, standby = procs
            _wait_role(shard.metrics_port, {"sync"}, time.monotonic() + 60, "the pair in sync")
            fill_s = _fill(job, config)
            table_bytes = config.rows * (8 + 4 * 2 * config.dim + 8)
            print(f"filled {config.rows:,} rows (dim {config.dim}, Adagrad: ~{table_bytes / 2**20:,.0f} MiB) "
                  f"in {fill_s:.1f} s")
            standby.kill()
            standby.wait()
            _wait_role(shard.metrics_port, {"alone"}, time.monotonic() + 60, "the primary going on alone")
            pusher = _Pusher(job, config)
            pusher.start()
            while len(pusher.pushes) < 50 and pusher.error is None:
                time.sleep(0.02)
            rss_before = _rss_bytes(primary.pid)
            rss_peak = [rss_before]
            sample = lambda: rss_peak.append(_rss_bytes(primary.pid))  # noqa: E731
            joined_at = time.monotonic()
            config_path = Path(workdir) / "job.toml"
            config_path.write_text(dump_job_config(job))
            with open(Path(workdir) / "shard-0-standby-2.log", "wb") as log:
                procs[1] = children.popen_dying_with_parent(
                    [sys.executable, "-m", "embps", "ps", "--config", str(config_path), "--shard", "0", "--standby"],
                    cwd=REPO_ROOT,
                    env={**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT))},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = joined_at + config.timeout_s

            standby_peak = [0]

            def tick() -> None:
                sample()
                with contextlib.suppress(OSError):  # it may have exited: checked below
                    standby_peak.append(_rss_bytes(procs[1].pid))
                if procs[1].poll() is not None:
                    log_text = (Path(workdir) / "shard-0-standby-2.log").read_text(errors="replace")
                    raise SystemExit(f"embps bench standby-join: the new standby exited ({procs[1].returncode}): "
                                     f"{log_text[-2000:]}")

            print("new standby started; waiting for the copy", flush=True)
            copying = _wait_role(shard.metrics_port, {"copying", "catching", "sync"}, deadline, "the copy", tick)
            print(f"copying ({copying - joined_at:.1f} s)", flush=True)
            catching = _wait_role(shard.metrics_port, {"catching", "sync"}, deadline, "the catch-up", tick)
            print(f"catching up ({catching - joined_at:.1f} s)", flush=True)
            in_sync = _wait_role(shard.metrics_port, {"sync"}, deadline, "the pair in sync again", tick)
            print(f"in sync ({in_sync - joined_at:.1f} s)", flush=True)
            settle_until = time.monotonic() + 1.0
            while time.monotonic() < settle_until:
                sample()
                time.sleep(0.02)
            pusher.stop()
            # The primary's account of the copy: the rows sent while it went on alone, each round of
            # rows written since their copy, and what was taken at one point.
            copy_lines = [line.split("): ", 1)[-1] for line in (Path(workdir) / "shard-0.log").read_text().splitlines()
                          if any(w in line for w in ("copy round", "rows sent", "state sent"))]
        finally:
            children.stop_all(procs)
            etcd.stop()
    before = [lat for end, lat in pusher.pushes if end < joined_at]
    during = [lat for end, lat in pusher.pushes if joined_at <= end <= in_sync + 1.0]
    result = {
        "config": dataclasses.asdict(config),
        "table_mib": table_bytes / 2**20,
        "copy_starts_s": copying - joined_at,
        "copy_s": catching - copying,
        "catch_up_s": in_sync - catching,
        "push_p50_before_ms": float(np.percentile(before, 50) * 1e3),
        "push_max_during_ms": float(max(during) * 1e3),
        "pushes_during": len(during),
        # (when it began, in s after the new standby started; how long it took, in ms)
        "longest_pushes": sorted(((end - lat - joined_at, lat * 1e3) for end, lat in pusher.pushes
                                  if joined_at <= end <= in_sync + 1.0), key=lambda p: -p[1])[:5],
        "primary_rss_before_mib": rss_before / 2**20,
        "primary_rss_peak_mib": max(rss_peak) / 2**20,
        "standby_rss_peak_mib": max(standby_peak) / 2**20,
        "primary_copy_log": copy_lines,
    }
    print(
        f"join: copy began {result['copy_starts_s']:.2f} s after the standby started, copy {result['copy_s']:.2f} s, "
        f"catch-up {result['catch_up_s']:.2f} s\n"
        f"pushes of {config.batch} keys: p50 before {result['push_p50_before_ms']:.1f} ms, longest during the join "
        f"{result['push_max_during_ms']:.1f} ms ({len(during)} pushes); the longest began at "
        + ", ".join(f"{t:.2f} s ({ms:.0f} ms)" for t, ms in result["longest_pushes"]) + "\n"
        f"primary RSS {result['primary_rss_before_mib']:,.0f} MiB before, "
        f"peak {result['primary_rss_peak_mib']:,.0f} MiB; the new standby's peak "
        f"{result['standby_rss_peak_mib']:,.0f} MiB\n"
        "the primary's copy: " + "; ".join(copy_lines)
    )
    if config.out:
        Path(config.out).write_text(json.dumps(result, indent=2))
    return 0
