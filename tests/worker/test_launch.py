"""`embps launch` end to end: learning, progress, summary, and no orphans on Ctrl-C or failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import REPO_ROOT
from tests.worker.training_jobs import write_training_job

TABLE = TableConfig(
    name="emb", dim=8, init_scale=0.05, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.05)
)
SYNTHETIC = {"num_dense": 4, "num_sparse": 8, "num_keys": 2000, "num_batches": 100000, "num_eval_batches": 4}


def job_file(tmp_path: Path, steps: int, eval_every: int = 0, mode: str = "sync") -> tuple[Path, Path]:
    out = tmp_path / "out"
    train = {
        "workers": 2,
        "steps": steps,
        "batch_size": 512,
        "dense_lr": 0.003,
        "tables": ["emb"],
        "eval_every": eval_every,
        "mode": mode,
        "staleness": 2,
        "eval_batches": 4,
        "output_dir": str(out),
    }
    path, _ = write_training_job(
        tmp_path / "job.toml", [TABLE], 2, train, SYNTHETIC, model={"bottom_sizes": [32, 8], "top_sizes": [32]}
    )
    return path, out


def start_launch(path: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embps", "launch", str(path), *flags],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def shard_index(pid: int) -> int:
    """The index of the PS shard process `pid`, from its `--shard I` argument (pids say nothing of it)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    return int(argv[argv.index(b"--shard") + 1])


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def wait_for_progress(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    progress = out / "progress.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if progress.exists() and progress.read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError("no progress line within the timeout")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_launch_learns_the_planted_signal_and_writes_a_summary(tmp_path, mode):
    path, out = job_file(tmp_path, steps=200, eval_every=100, mode=mode)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "embps", "launch", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Nothing left in the temporary directory (torch's elastic agent left a tree there per run)
    # but torch's compile cache, one directory per user that every run shares.
    assert sorted(p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["world_size"] == 2 and summary["mode"] == mode
    assert summary["eval_auc"] >= 0.75, summary
    assert 0 < summary["eval_logloss"] < 0.69
    assert [e["step"] for e in summary["evaluations"]] == [100, 200]
    assert summary["evaluations"][-1]["auc"] > summary["evaluations"][0]["auc"] - 0.02
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert records[-1]["done"] and any("auc" in r for r in records)
    assert "eval AUC" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "ctrl_c", "kill_ps_shard"])
def test_interrupt_or_failed_child_stops_every_process(tmp_path, how):
    """ctrl_c: SIGINT to the launcher's whole process group, as a terminal sends it, with restarts
    allowed. The shards got it too and stopped (exit 0), the launcher took that for a death and
    restarted the job: it trained on to the end, a Ctrl-C per restart (a review's repro)."""
    path, out = job_file(tmp_path, steps=100000)
    proc = start_launch(path, *(["--max-restarts", "2"] if how == "ctrl_c" else []))
    try:
        wait_for_progress(out, proc)
        children = descendants(proc.pid)
        shards = {shard_index(p): p for p in children if b"embps\x00ps" in Path(f"/proc/{p}/cmdline").read_bytes()}
        workers = [p for p in children if b"worker.worker_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert sorted(shards) == [0, 1] and len(workers) == 2, children
        if how == "sigint":
            os.kill(proc.pid, signal.SIGINT)
        elif how == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(shards[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    if how in ("sigint", "ctrl_c"):
        assert "signal SIGINT" in stderr or "interrupted" in stderr, stderr[-2000:]
        assert "restart 1/" not in stderr, stderr[-2000:]
        if how == "ctrl_c":  # the workers got the terminal's SIGINT too: a line each, no traceback
            assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr, stderr[-4000:]
    else:
        assert "ps shard 1" in stderr and "exited" in stderr, stderr[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.2)
    assert not [p for p in children if alive(p)], "orphaned child processes"


@pytest.mark.slow
def test_a_node_whose_rendezvous_host_stops_fails_naming_it(tmp_path):
    """Two nodes of one job on this machine: node 0 (the shards and the rendezvous' store) stopped
    by SIGTERM. Node 1's launcher ended on torch's RendezvousConnectionError traceback, with no
    "embps launch: FAILED" line (a review's repro); it says what failed now, exit non-zero."""
    from bench.ports import free_ports

    path, out = job_file(tmp_path, steps=100000)
    (port,) = free_ports(1)
    nodes = ("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1")
    first = start_launch(path, *nodes, "--node-rank", "0")
    second = start_launch(path, *nodes, "--node-rank", "1")
    try:
        wait_for_progress(out, first)
        os.kill(first.pid, signal.SIGTERM)
        first.communicate(timeout=90)
        _, stderr = second.communicate(timeout=90)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert second.returncode != 0
    assert "embps launch: FAILED: the workers' rendezvous at 127.0.0.1" in stderr, stderr[-3000:]
    # The workers' own tracebacks come prefixed with their rank; the launcher's was not.
    assert not [line for line in stderr.splitlines() if line.startswith("Traceback")], stderr[-3000:]
