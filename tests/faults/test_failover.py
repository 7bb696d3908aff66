"""Standby failover in a whole job: 2 workers x 2 shards, sync, every shard with a standby, etcd as
the arbiter, `embps launch` with no restarts allowed (max_restarts = 0: a restart would fail it).

In one run, at seeded random steps:
- SIGKILL of one shard's primary: its standby takes over through the arbiter;
- later, SIGKILL of the other shard's standby: its primary goes on alone once the arbiter recorded it;
- after each, the launcher starts a new standby in the dead one's place.
The job snapshots every 20 steps (incremental on a full one), so the promoted standby writes
incremental snapshots of changes the old primary tracked in part. The job finishes without a
restart, and the final tables (values, optimizer state, counters, pending
keys, versions) and the dense model are bit-equal to an undisturbed run without standbys. The stall
(the slowest step of rank 0) is printed.

The tables and data are the kill suite's (tests/faults/test_kill.py), at fewer steps. A run
repeats with EMBPS_KILL_SEED=<seed>.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.ports import free_ports
from ps.job_config import ArbiterConfig, Deadlines, SnapshotConfig
from ps.snapshot.files import read_extra, restore
from tests.faults.test_kill import (
    TABLES,
    TRAIN_TABLES,
    assert_same_dense,
    assert_same_tables,
    children_of_kind,
    finish,
    kill_seed,
    kill_tree,
    progress_step,
    start_launch,
    wait_until,
)
from tests.helpers.processes import make_job
from tests.worker.training_jobs import training_toml

STEPS = 70
SYNTHETIC = {"num_dense": 3, "num_sparse": 4, "num_keys": 400, "num_batches": STEPS, "num_eval_batches": 1}


class _Job:
    def __init__(self, path: Path, name: str, uri: str, out: Path) -> None:
        self.path, self.name, self.uri, self.out = path, name, uri, out

    @property
    def progress(self) -> Path:
        return self.out / "progress.jsonl"


def write_job(tmp_path: Path, name: str, etcd_endpoint: str | None) -> _Job:
    """The job's TOML (with a standby per shard and [arbiter] when etcd_endpoint is given)."""
    out = tmp_path / f"out-{name}"
    uri = str(tmp_path / f"snapshots-{name}")
    ps = make_job(tables=TABLES, num_shards=2, job=name, deadlines=Deadlines(lookup=20.0, push=20.0, stats=5.0))
    # Incremental snapshots on a full one: after a failover the promoted standby writes them.
    ps = replace(ps, snapshot=SnapshotConfig(uri=uri, every_steps=20, full_every=4))
    if etcd_endpoint is not None:
        ports = free_ports(4)
        shards = tuple(
            replace(s, standby=f"127.0.0.1:{ports[2 * i]}", standby_metrics_port=ports[2 * i + 1])
            for i, s in enumerate(ps.shards)
        )
        ps = replace(ps, shards=shards, arbiter=ArbiterConfig(endpoints=etcd_endpoint, lease_seconds=1))
    train = {
        "workers": 2,
        "steps": STEPS,
        "batch_size": 64,
        "tables": TRAIN_TABLES,
        "dense_lr": 0.01,
        "eval_batches": 1,
        "output_dir": str(out),
    }
    text = training_toml(ps, train, {"bottom_sizes": [8], "top_sizes": [16]}, {"source": "synthetic"}, SYNTHETIC)
    path = tmp_path / f"{name}.toml"
    path.write_text(text + "\n[launch]\nmax_restarts = 0\n")
    return _Job(path, name, uri, out)


def final_state(job: _Job) -> tuple[dict, bytes]:
    return restore(job.uri, job.name, STEPS), read_extra(job.uri, job.name, STEPS, "dense.pt")


def run(job: _Job, log: Path, victim=None) -> str:
    """Launches the job, lets `victim(proc)` act once, waits for the end; returns the output."""
    proc = start_launch(job, log)
    try:
        if victim is not None:
            victim(proc)
        output = finish(proc, log)
    except BaseException:
        kill_tree(proc)
        raise
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> tuple[dict, bytes]:
    """The job's final state, run once without standbys and without faults."""
    tmp_path = tmp_path_factory.mktemp("undisturbed")
    job = write_job(tmp_path, "undisturbed", None)
    started = time.monotonic()
    run(job, tmp_path / "launch.log")
    print(f"undisturbed run: {time.monotonic() - started:.0f} s")
    return final_state(job)


def shard_processes(launcher: int, standby: bool) -> list[int]:
    """The launcher's primaries (standby=False) or standbys, by their command line."""
    found = []
    for pid in children_of_kind(launcher, "ps"):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if (b"--standby" in argv) == standby:
            found.append(pid)
    return found


def kill(job: _Job, proc, log: Path, rng: random.Random, role: str, shard: int, steps: range) -> dict:
    """SIGKILLs the primary or the standby of `shard` at a random step of `steps`; what it killed."""
    step = rng.choice(steps)
    wait_until(lambda: progress_step(job) >= step, proc, log, f"step {step}")
    time.sleep(rng.uniform(0.0, 0.1))
    for pid in shard_processes(proc.pid, standby=role == "standby"):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if int(argv[argv.index(b"--shard") + 1]) == shard:
            os.kill(pid, signal.SIGKILL)
            print(f"killed the {role} of shard {shard} (pid {pid}) after step {progress_step(job)}")
            return {"pid": pid, "shard": shard, "role": role}
    raise AssertionError(f"no {role} of shard {shard} below the launcher")


@pytest.mark.slow
def test_sigkill_of_a_primary_and_of_a_standby_needs_no_restart(tmp_path, etcd, undisturbed):
    """One run: the primary of one shard dies, later the standby of the other."""
    rng = random.Random(kill_seed())
    job = write_job(tmp_path, "failover", etcd.endpoint)
    log = tmp_path / "launch.log"
    primary_shard = rng.randrange(2)
    killed: list[dict] = []

    def faults(proc) -> None:
        killed.append(kill(job, proc, log, rng, "primary", primary_shard, range(8, 18)))
        killed.append(kill(job, proc, log, rng, "standby", 1 - primary_shard, range(18, 28)))

    started = time.monotonic()
    output = run(job, log, faults)
    print(f"run with the kills: {time.monotonic() - started:.0f} s")
    summary = json.loads((job.out / "summary.json").read_text())
    print(f"stall: the slowest step of rank 0 took {summary['slowest_step_s_rank0']:.2f} s (lease 1 s)")
    for victim in killed:
        died = f"ps shard {victim['shard']} {victim['role']} (pid {victim['pid']}) exited (killed by SIGKILL)"
        assert died in output, output[-4000:]
        # Whether it catches up before the end depends on the machine (seconds to start, the job
        # trains on meanwhile); tests/ps/test_standby.py shows a new standby catching up and taking over.
        assert re.search(re.escape(died) + r".*a new standby starts \(pid \d+, log \S+\)", output), output[-4000:]
    assert "restart" not in output and summary["resumed_from"] is None and summary["steps"] == STEPS
    logs = job.out / "logs"
    promoted = (logs / f"ps-{primary_shard}-standby.log").read_text()
    alone = (logs / f"ps-{1 - primary_shard}.log").read_text()
    assert "PROMOTED" in promoted and "going on ALONE" in alone
    want_tables, want_dense = undisturbed
    got_tables, got_dense = final_state(job)
    assert_same_dense(got_dense, want_dense)
    assert_same_tables(got_tables, want_tables)
