"""Exact resume through S3: a sync job killed with SIGKILL (launcher and every child) at a random
step and resumed from its LATEST snapshot on S3 ends bit-equal to a run that was never killed."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ps.job_config import SnapshotConfig
from ps.snapshot.files import latest, list_snapshots, read_extra, restore
from ps.table.config import AdmissionConfig, AdmissionKind, EvictionConfig, OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import REPO_ROOT
from tests.worker.test_launch import alive, descendants
from tests.worker.training_jobs import write_training_job

STEPS = 100  # ~20 ms a step: the job must outlive the kill by far more than the test's reaction
TABLES = [
    TableConfig(
        name="adam",
        dim=8,
        init_scale=0.1,
        optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.02),
        admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2),
    ),
    TableConfig(
        name="ftrl",
        dim=8,
        init_scale=0.1,
        optimizer=OptimizerConfig(kind=OptimizerKind.FTRL, lr=0.3, l1=0.001),
        eviction=EvictionConfig(ttl_steps=6),
    ),
]
SYNTHETIC = {"num_dense": 3, "num_sparse": 4, "num_keys": 400, "num_batches": STEPS, "num_eval_batches": 1}


def write_job(tmp_path: Path, name: str, uri: str, storage) -> Path:
    train = {
        "workers": 2,
        "steps": STEPS,
        "batch_size": 64,
        "tables": ["adam", "ftrl", "adam", "ftrl"],
        "dense_lr": 0.01,
        "eval_batches": 1,
        "output_dir": str(tmp_path / f"out-{name}"),
    }
    snapshot = SnapshotConfig(uri=uri, every_steps=4, full_every=3, storage=storage)
    path, _ = write_training_job(tmp_path / f"{name}.toml", TABLES, 2, train, SYNTHETIC, job=name, snapshot=snapshot)
    return path


def launch(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embps", "launch", str(path), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_state(uri: str, job: str, storage) -> tuple[dict, bytes]:
    assert latest(uri, job, storage) == STEPS
    return restore(uri, job, STEPS, storage), read_extra(uri, job, STEPS, "dense.pt", storage)


def assert_same_dense(got: bytes, want: bytes) -> None:
    """Model and dense optimizer state, tensor by tensor, bit for bit."""
    got_state, want_state = (torch.load(io.BytesIO(blob)) for blob in (got, want))
    for name, tensor in want_state["model"].items():
        assert torch.equal(got_state["model"][name], tensor), f"dense parameter {name} differs"
    for index, state in want_state["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(got_state["optimizer"]["state"][index][key], tensor), f"optimizer {index}.{key}"


def assert_same_tables(got_tables: dict, want_tables: dict) -> None:
    """Every (table, shard) of two restored snapshots: rows, optimizer state, counters, pending
    keys, version and step, exactly. A version counts the pushes its table applied."""
    assert got_tables.keys() == want_tables.keys()
    for table, shards in want_tables.items():
        assert got_tables[table].keys() == shards.keys(), table
        for shard, want in shards.items():
            got = got_tables[table][shard]
            for name in ("keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts"):
                np.testing.assert_array_equal(
                    getattr(got, name), getattr(want, name), err_msg=f"{table}/{shard}.{name}"
                )
            assert (got.version, got.step) == (want.version, want.step), f"{table}/{shard} version, step"


@pytest.fixture
def store(s3):
    """Snapshots on the real S3 server. The same kill and resume on local disk is the kill suite's
    launcher test (tests/faults/test_kill.py), which checks the same bit-exact end state."""
    return lambda: (s3.fresh_uri(), s3.config)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, store):
    uri_ref, storage = store()
    reference = launch(write_job(tmp_path, "reference", uri_ref, storage))
    assert reference.returncode == 0, reference.stderr[-3000:]

    uri, storage = store()
    path = write_job(tmp_path, "killed", uri, storage)
    # Progress lines come every 10 steps, so the kill follows the line at or after kill_after: at
    # least 40 steps (~0.8 s here) before the job would end.
    kill_after = random.Random().randint(9, STEPS - 40)
    proc = subprocess.Popen(
        [sys.executable, "-m", "embps", "launch", str(path)],
        cwd=REPO_ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = tmp_path / "out-killed" / "progress.jsonl"
    deadline = time.monotonic() + 180
    step = 0
    children: set[int] = set()
    while time.monotonic() < deadline and step < kill_after and proc.poll() is None:
        children = descendants(proc.pid)  # known before the moment comes, so the kill is immediate
        lines = progress.read_text().splitlines() if progress.exists() else []
        step = json.loads(lines[-1]).get("step", 0) if lines else 0
        time.sleep(0.02)
    assert proc.poll() is None, f"job ended before the kill: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in children:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(alive(p) for p in children):
        time.sleep(0.1)
    killed_at = latest(uri, "killed", storage)
    assert killed_at is not None and killed_at < STEPS, f"snapshot {killed_at} after the kill at step >= {kill_after}"

    resumed = launch(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from snapshot step {killed_at}" in resumed.stdout
    summary = json.loads((tmp_path / "out-killed" / "summary.json").read_text())
    assert summary["resumed_from"] == killed_at and summary["steps"] == STEPS

    want_tables, want_dense = final_state(uri_ref, "reference", storage)
    got_tables, got_dense = final_state(uri, "killed", storage)
    assert_same_dense(got_dense, want_dense)
    kinds = {m.kind for m in list_snapshots(uri, "killed", storage)}
    assert kinds == {"full", "incremental"}
    assert_same_tables(got_tables, want_tables)
