"""A benchmark stopped by a signal leaves nothing of its own running: SIGTERM ends it through its
cleanup (exit status 143), and its shards and client processes get SIGTERM from the kernel when it
dies even by SIGKILL (real `embps bench ps`, real shard and client processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ps.process.python_command import python_path
from tests.helpers.processes import alive, child_pids, command_line
from tests.helpers.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
# Still pushing when the signal comes (~40 s of pushes); rows, batch and batches keep its start short.
BENCH = ["bench", "ps", "--clients", "1", "--rows", "20000", "--batch", "256", "--batches", "20000"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_bench_takes_its_shards_and_clients_with_it(tmp_path, sig):
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:
        bench = subprocess.Popen(
            [sys.executable, "-m", "embps", *BENCH],
            cwd=REPO_ROOT,
            # A bench killed by SIGKILL cannot remove its temporary directory: in the test's, not /tmp.
            env={**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT)), "TMPDIR": str(tmp_path)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seen: dict[int, bytes] = {}

    def pushing() -> bool:
        """The shards serve and a client process runs (a phase started after the shards answered)."""
        seen.update({pid: command_line(pid) for pid in child_pids(bench.pid)})  # after exec, the child's own
        shards = [p for p, cmd in seen.items() if b"--shard" in cmd]
        clients = [p for p, cmd in seen.items() if b"spawn_main" in cmd]  # not multiprocessing's resource tracker
        return (len(shards) == 2 and bool(clients)) or bench.poll() is not None

    try:
        wait_until(pushing, "the bench's 2 shards and its client", timeout=120)
        assert bench.poll() is None, log.read_text()
        bench.send_signal(sig)
        code = bench.wait(timeout=90)
        if sig == signal.SIGTERM:
            assert code == 128 + signal.SIGTERM, f"exit status {code}: {log.read_text()[-2000:]}"
        wait_until(lambda: not any(alive(pid) for pid in seen), "the shards and the client to exit", timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
