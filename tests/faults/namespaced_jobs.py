"""Training jobs whose processes run on simulated hosts (network namespaces, tests/helpers/netns.py).

    ps = shard_job([ps_host, ps_host], "job")         # shard i at hosts[i].address:50061+i
    config = write_job(tmp_path / "job.toml", ps, steps=12, out=tmp_path / "out")
    shards = start_shards(ps, [ps_host, ps_host], config, tmp_path)        # SERVING when it returns
    launcher = start_launch(worker_host, config, tmp_path / "launch.log")  # embps launch --no-ps

Every address in the files written here is a host's own address on the test bridge: nothing says
127.0.0.1 or localhost, so a component that quietly assumed one machine would fail. The test
process (root namespace) reaches every host through the bridge.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from ps.job_config import Deadlines, JobConfig, ShardConfig
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.netns import Host, unavailable_reason
from tests.helpers.processes import REPO_ROOT, stop_pid, wait_serving
from tests.worker.reference_training import train_reference
from tests.worker.test_multinode import MODEL, SYNTHETIC, TRAIN
from tests.worker.test_training_sync import train_reference_keys
from tests.worker.training_jobs import OPTIMIZER_TABLES, training_toml
from worker.train_config import TrainingJob, load_training_job

SHARD_PORT = 50061
METRICS_PORT = 9171
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def require_namespaces() -> None:
    """Skips the calling test, saying why, where network namespaces cannot be made."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"simulated hosts need network namespaces: {reason}")


def shard_job(hosts: Sequence[Host], job: str, deadlines: Deadlines | None = None) -> JobConfig:
    """A PS job with shard i on hosts[i] (a host may hold several), the five optimizer tables."""
    shards = tuple(
        ShardConfig(address=f"{host.address}:{SHARD_PORT + i}", metrics_port=METRICS_PORT + i)
        for i, host in enumerate(hosts)
    )
    return JobConfig(
        job=job,
        shards=shards,
        tables=tuple(OPTIMIZER_TABLES),
        deadlines=deadlines if deadlines is not None else Deadlines(lookup=10.0, push=10.0, stats=5.0),
    )


def write_job(path: Path, ps: JobConfig, steps: int, out: Path, workers: int = 2, **train: object) -> Path:
    """The two-node test's sync job (five optimizer tables, global batches of 64) over `ps`, for
    `steps` steps; `train` adds [train] fields."""
    section = TRAIN | {"workers": workers, "steps": steps, "output_dir": str(out), **train}
    synthetic = SYNTHETIC | {"num_batches": steps}
    path.write_text(training_toml(ps, section, MODEL, {"source": "synthetic"}, synthetic))
    return path


def assert_no_loopback(*paths: Path) -> None:
    for path in paths:
        text = path.read_text()
        for name in LOOPBACK_NAMES:
            assert name not in text, f"{path} names {name}: every address must be a host's own\n{text}"


def start_shards(ps: JobConfig, hosts: Sequence[Host], config: Path, workdir: Path) -> list[subprocess.Popen]:
    """`embps ps --shard i` on hosts[i]; returns once every shard answers its health check (asked
    from the test process, across the bridge). Stops what it started if one fails to come up."""
    procs: list[subprocess.Popen] = []
    logs = [workdir / f"shard-{i}.log" for i in range(len(hosts))]
    try:
        for i, host in enumerate(hosts):
            argv = [sys.executable, "-m", "embps", "ps", "--config", str(config), "--shard", str(i), "--grace", "1"]
            with open(logs[i], "wb") as log:
                env = {"PYTHONPATH": python_path(str(REPO_ROOT)), **MALLOC_TUNING}
                procs.append(host.popen(argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
        for i, shard in enumerate(ps.shards):
            wait_serving(shard.address, procs[i], log_path=logs[i])
    except BaseException:
        for proc in reversed(procs):
            stop_pid(proc)
        raise
    return procs


def start_launch(host: Host, config: Path, log: Path) -> subprocess.Popen:
    """`embps launch config --no-ps` on `host`: its workers rendezvous on that host and reach the
    shards at the job's addresses."""
    argv = [sys.executable, "-m", "embps", "launch", str(config), "--no-ps", "--local-addr", host.address]
    # gloo binds the interface named here; the namespace's host name resolves to no address of it
    env = {"PYTHONPATH": python_path(str(REPO_ROOT)), "GLOO_SOCKET_IFNAME": host.ifname}
    with open(log, "wb") as f:
        return host.popen(argv, env=env, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)


def wait_exit(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """The exit code of `proc`, failing the test with the end of its log if it runs past `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.args} still running after {timeout} s:\n{log.read_text()[-4000:]}") from None


def wait_for_step(progress: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> int:
    """Waits until rank 0's progress lines reach `step`; returns the step reached."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if progress.exists():
            steps = [json.loads(line).get("step", 0) for line in progress.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before step {step}:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no progress to step {step} after {timeout} s:\n{log.read_text()[-4000:]}")


def seen_keys(job: TrainingJob) -> dict[str, np.ndarray]:
    """Keys each table sees over the job, sorted (from the data alone)."""
    return train_reference_keys(job)[2]


def assert_equals_reference(config: Path, dense: dict[str, torch.Tensor], rows: dict[str, np.ndarray]) -> None:
    """The dense model and every touched row (rows[table]: values of seen_keys' keys) equal a
    single-process run of the same job within 1e-5 (sync mode is deterministic)."""
    job = load_training_job(config)
    model, tables, _ = train_reference(job)
    for name, reference in model.state_dict().items():
        diff = (dense[name] - reference).abs().max().item()
        assert diff <= 1e-5, f"dense parameter {name}: max abs diff {diff}"
    for name, keys in seen_keys(job).items():
        want = np.stack([tables[name].lookup(int(k)).detach().numpy() for k in keys])
        diff = np.abs(rows[name] - want).max()
        assert diff <= 1e-5, f"table {name}: max abs diff {diff} from the single-process reference"
        init = np.asarray(EmbeddingTable(job.ps.table(name)).lookup(keys))
        assert np.abs(rows[name] - init).max() > 1e-3, f"table {name} did not train"
