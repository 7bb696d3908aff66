"""Real shard processes for tests: free loopback ports, `python -m embps ps`, health wait, stop by pid.

job = make_job(tables=[TableConfig("user", dim=8)], num_shards=2)
with ShardCluster.start(job, tmp_path) as cluster:
    client = PSClient.from_job(cluster.job)
    ...
# every process got SIGTERM (then SIGKILL after a timeout); exit codes are in cluster.exit_codes
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.ports import free_ports
from ps.job_config import Deadlines, JobConfig, ShardConfig, dump_job_config
from ps.process import children
from ps.process.children import stop as stop_pid
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from ps.security import SecurityConfig
from ps.shard.arbiter import Arbiter
from ps.shard.server import SERVICE_NAME
from ps.table.config import TableConfig
from tests.helpers.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is `pid` now (any of its threads), from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def command_line(pid: int) -> bytes:
    """`pid`'s argv joined by NULs; b"" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """True while pid runs (a zombie left for its reaped parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rss_bytes(pid: int) -> int:
    """The resident memory of `pid` (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def thread_states(pid: int) -> list[str]:
    """The state letter of each thread of `pid` (R, S, D, T for stopped, ...); [] once it is gone."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return states


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP to `pid`, returning once every one of its threads is stopped. kill() returns before
    that: one thread takes the signal and then stops the others, so until it has run (a busy
    machine may not run it for milliseconds) another thread woken by its own event, a socket
    read, can still run (a standby's link thread applying and acknowledging one more push)."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _all_stopped(thread_states(pid)), f"pid {pid} stopped", timeout)


def _all_stopped(states: list[str]) -> bool:
    return bool(states) and all(state in "Tt" for state in states)


def make_job(
    tables: list[TableConfig],
    num_shards: int = 1,
    job: str = "test",
    message_limit_bytes: int = 64 << 20,
    deadlines: Deadlines | None = None,
) -> JobConfig:
    """A job on fresh free loopback ports: num_shards shards, each with its own metrics port."""
    ports = free_ports(2 * num_shards)
    shards = tuple(
        ShardConfig(address=f"127.0.0.1:{ports[2 * i]}", metrics_port=ports[2 * i + 1]) for i in range(num_shards)
    )
    return JobConfig(
        job=job,
        shards=shards,
        tables=tuple(tables),
        message_limit_bytes=message_limit_bytes,
        deadlines=deadlines if deadlines is not None else Deadlines(lookup=10.0, push=10.0, stats=5.0),
    )


def start_shard(
    config_path: Path,
    index: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    prefix: tuple[str, ...] = (),
) -> subprocess.Popen:
    """Starts `python -m embps ps --config config_path --shard index [args]` from the repo root,
    behind `prefix` when given (a command that execs the rest, e.g. tests/helpers/small_disk.py)."""
    environment = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": python_path(str(REPO_ROOT)), **(env or {})}
    shard = ["-m", "embps", "ps", "--config", str(config_path), "--shard", str(index), "--grace", "5", *args]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [*prefix, sys.executable, *shard],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_serving(
    address: str,
    proc: subprocess.Popen,
    timeout: float = 60.0,
    log_path: Path | None = None,
    security: SecurityConfig | None = None,
) -> None:
    """Waits until the shard at `address` serves (ps.process.children.wait_serving); the error of
    a shard that exits or never serves carries its log."""
    try:
        children.wait_serving(address, proc, f"shard at {address}", timeout, security, service=SERVICE_NAME)
    except (RuntimeError, TimeoutError) as exc:
        raise type(exc)(f"{exc}:\n{log_path.read_text() if log_path else ''}") from None





@dataclass
class ShardCluster:
    """The processes of one job's shards; `procs[i]` serves `job.shards[i]`."""

    job: JobConfig
    config_path: Path
    procs: list[subprocess.Popen]
    log_paths: list[Path]
    exit_codes: list[int | None] = field(default_factory=list)

    @classmethod
    def start(
        cls, job: JobConfig, workdir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> ShardCluster:
        """Every shard of `job` (`embps ps ... [args]`), returned once each serves."""
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / f"{job.job}.toml"
        config_path.write_text(dump_job_config(job))
        logs = [workdir / f"{job.job}-shard-{i}.log" for i in range(len(job.shards))]
        procs = [start_shard(config_path, i, logs[i], env, args) for i in range(len(job.shards))]
        cluster = cls(job, config_path, procs, logs)
        try:
            for i, shard in enumerate(job.shards):
                wait_serving(shard.address, procs[i], log_path=logs[i], security=job.security)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def restart(self, index: int) -> None:
        """Starts shard `index` again (after it was stopped or killed) and waits until it serves."""
        self.procs[index] = start_shard(self.config_path, index, self.log_paths[index])
        shard = self.job.shards[index]
        wait_serving(shard.address, self.procs[index], log_path=self.log_paths[index], security=self.job.security)

    def log(self, index: int) -> str:
        return self.log_paths[index].read_text()

    def stop(self) -> list[int | None]:
        children.stop_all(self.procs)  # SIGTERM to every shard first: they drain at once
        self.exit_codes = [p.returncode for p in self.procs]
        return self.exit_codes

    def __enter__(self) -> ShardCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def with_limit(job: JobConfig, message_limit_bytes: int) -> JobConfig:
    """The same job with another message limit (the client side of a split test)."""
    return replace(job, message_limit_bytes=message_limit_bytes)


@dataclass
class ShardPair:
    """The primary and standby processes of shard 0 of a job with a standby, joined."""

    job: JobConfig
    config: Path  # the job TOML both processes read
    primary: subprocess.Popen
    standby: subprocess.Popen
    logs: tuple[Path, Path]  # primary's, standby's

    @classmethod
    def start(cls, job: JobConfig, workdir: Path, standby_arbiter: str | None = None) -> ShardPair:
        """Starts the standby, then the primary; returns once the standby joined (the primary's
        log says so). The job's [security] is used for the health waits. standby_arbiter: the
        etcd endpoints the standby alone is given (a proxy between it and etcd), in a config of
        its own."""
        config = workdir / f"{job.job}.toml"
        config.write_text(dump_job_config(job))
        standby_config = config
        if standby_arbiter is not None:
            standby_config = workdir / f"{job.job}-standby.toml"
            arbiter = replace(job.arbiter, endpoints=standby_arbiter)
            standby_config.write_text(dump_job_config(replace(job, arbiter=arbiter)))
        logs = (workdir / f"{job.job}-primary.log", workdir / f"{job.job}-standby.log")
        standby = start_shard(standby_config, 0, logs[1], args=("--standby",))
        primary = start_shard(config, 0, logs[0])
        pair = cls(job, config, primary, standby, logs)
        try:
            wait_serving(job.shards[0].standby, standby, log_path=logs[1], security=job.security)
            wait_serving(job.shards[0].address, primary, log_path=logs[0], security=job.security)
            wait_until(lambda: "joined" in logs[0].read_text(), "the standby joining the primary")
        except BaseException:
            pair.stop()
            raise
        return pair

    def log(self, which: int) -> str:
        """The primary's (0) or the standby's (1) log so far."""
        return self.logs[which].read_text()

    def fail_over(self) -> None:
        """SIGKILL of the primary; returns once etcd records the standby as primary, an epoch later."""
        arbiter = Arbiter(self.job.arbiter, self.job.job, 0, "test")
        epoch = arbiter.read()[0].epoch
        os.kill(self.primary.pid, signal.SIGKILL)
        wait_until(lambda: arbiter.read()[0].epoch == epoch + 1, "the standby's promotion", 30)
        membership = arbiter.read()[0]
        assert membership.primary == self.job.shards[0].standby, membership

    def stop(self) -> None:
        for proc in (self.primary, self.standby):
            stop_pid(proc)
