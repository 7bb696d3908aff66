"""Async mode keeps at most `staleness` steps of pushes in flight, and prefetches the next lookup."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ps.table.config import TableConfig
from tests.helpers.processes import REPO_ROOT, ShardCluster
from tests.worker.training_jobs import write_training_job
from worker.data_sources import train_reader
from worker.local_tables import LocalTables
from worker.model import DLRMDenseTower
from worker.train_config import Mode, parse_training_job
from worker.trainer import Trainer

GATE_DEADLINE_S = 60.0  # a push held this long means the trainer waits for a push it may miss


class SlowPushTables(LocalTables):
    """Real in-process tables that record, at each lookup, how many earlier steps' pushes it cannot
    see yet: the lookup for step t runs while step t - 1 computes, so it misses steps up to t - 1
    whose pushes are not applied.

    gate_staleness k (async): the push of step s is held until the lookup for step s + k has been
    recorded, the latest lookup that may miss it. So every lookup runs as stale as the trainer lets
    it, whatever the machine's load: a trainer that waits for the pushes it must (steps <= t - k - 1
    before the lookup for t) sees exactly k missing from step k + 1 on; one that waits for fewer
    sees more; one that waits for more holds its push past GATE_DEADLINE_S and the step fails.
    delay_s: each push sleeps that long first (sync: a slow push the step must still wait for).
    """

    def __init__(self, tables: list[TableConfig], gate_staleness: int | None = None, delay_s: float = 0.0) -> None:
        super().__init__(tables)
        self.lock = threading.Condition()
        self.trainer: Trainer | None = None
        self.max_missed = 0
        self.pushed_steps: list[int] = []
        self.commits: list[tuple[int, int, bool]] = []  # (step, pushes applied then, with a dense tower)
        self.gate_staleness = gate_staleness
        self.released_through = 0  # pushes of steps <= this may apply (gate_staleness set)
        self.delay_s = delay_s

    def lookup_multi(self, tables, keys, offsets, step=None):
        with self.lock:
            looking_up_for = step
            applied = len(self.pushed_steps)  # pushes apply in step order (one push thread)
            self.max_missed = max(self.max_missed, looking_up_for - 1 - applied)
            if self.gate_staleness is not None:
                self.released_through = max(self.released_through, looking_up_for - self.gate_staleness)
                self.lock.notify_all()
        return super().lookup_multi(tables, keys, offsets, step)

    def release_all(self) -> None:
        """Lets every push apply (before drain: the last steps' pushes have no later lookup)."""
        with self.lock:
            self.gate_staleness = None
            self.lock.notify_all()

    def commit(self, step: int, dense_state: bytes = b"", dense_format: str = "") -> None:
        """Records each commit with the pushes applied when it came (every step <= it must be)."""
        with self.lock:
            self.commits.append((step, len(self.pushed_steps), bool(dense_state)))
        super().commit(step, dense_state, dense_format)

    def send_push(self, prepared) -> None:
        step = prepared[1]
        with self.lock:
            released = self.lock.wait_for(
                lambda: self.gate_staleness is None or step <= self.released_through, timeout=GATE_DEADLINE_S
            )
        if not released:
            raise TimeoutError(
                f"push of step {step} held {GATE_DEADLINE_S:g} s: no lookup for step {step + self.gate_staleness} "
                "came, so the trainer waited for a push its staleness lets it miss"
            )
        time.sleep(self.delay_s)
        super().send_push(prepared)
        with self.lock:
            self.pushed_steps.append(step)


def job(mode: str, staleness: int):
    data = {
        "job": "async",
        "shards": [{"address": "127.0.0.1:1"}],
        "tables": {"emb": {"dim": 4}},
        "train": {"workers": 1, "steps": 12, "batch_size": 32, "mode": mode, "staleness": staleness},
        "model": {"bottom_sizes": [8], "top_sizes": [8]},
        "data": {"synthetic": {"num_dense": 2, "num_sparse": 3, "num_keys": 50, "num_batches": 12}},
    }
    return parse_training_job(data)


@pytest.mark.parametrize("staleness", [1, 3])
def test_lookups_miss_at_most_staleness_steps_of_pushes(staleness):
    j = job("async", staleness)
    assert j.train.mode == Mode.ASYNC
    store = SlowPushTables(list(j.ps.tables), gate_staleness=staleness)
    trainer = Trainer(j, DLRMDenseTower(j.model), store, rank=0, world_size=1)
    store.trainer = trainer
    batches = list(train_reader(j, 0, 1))
    pulled = trainer.pull(batches[0])
    for i in range(len(batches)):
        _, prefetched = trainer.train_step(pulled, batches[i + 1] if i + 1 < len(batches) else None)
        pulled = prefetched
        if i + 1 < len(batches):
            assert pulled is not None and pulled.batch is batches[i + 1]
    store.release_all()
    trainer.drain()
    trainer.close()
    assert store.pushed_steps == list(range(1, len(batches) + 1))
    # Each push waits for the last lookup that may miss it, so lookups run as stale as allowed
    # (from step staleness + 1 on), and no staler.
    assert store.max_missed == staleness
    # Step s is committed right after its push, before the push of s + 1 (the same thread): the
    # committed rows are exactly step s's, and with them the tower after step s's update (read
    # on the training thread): the model at the end of step s, as a snapshot of it would hold.
    assert store.commits == [(step, step, True) for step in range(1, len(batches) + 1)]


def test_sync_mode_pushes_before_the_step_returns():
    j = replace(job("sync", 0), train=replace(job("sync", 0).train, mode=Mode.SYNC))
    store = SlowPushTables(list(j.ps.tables), delay_s=0.05)
    trainer = Trainer(j, DLRMDenseTower(j.model), store, rank=0, world_size=1)
    store.trainer = trainer
    batches = list(train_reader(j, 0, 1))
    for i, batch in enumerate(batches[:4]):
        trainer.train_step(trainer.pull(batch))
        assert store.pushed_steps == list(range(1, i + 2))
    trainer.drain()
    # Each Commit came after its step's push and before the next step's (it runs beside the next
    # step's lookups and compute, and the step waits for it before its all_to_all and push), with
    # the step's dense tower.
    assert store.commits == [(step, step, True) for step in range(1, 5)]
    assert store.max_missed == 0
    trainer.close()


def test_two_ranks_lookups_and_commits_wait_for_every_ranks_pushes(tmp_path):
    """Each rank pushes the keys of the shards it owns, so a rank's own push being acknowledged
    says nothing of the other's shards. With one rank's pushes slowed: a lookup for step t starts
    only after every rank's push of step t - staleness - 1 was acknowledged, and rank 0's
    Commit(s) only after every rank's push of step s was, and before any push of step s + 1 is sent
    (so the shards' committed rows are exactly step s's)."""
    staleness, steps, workers = 1, 10, 2
    result, out = _run_async_ranks(tmp_path, steps, workers, "--slow-rank", "1", "--push-delay", "0.1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
    sent = [{step: at for step, at, _ in r["pushes"]} for r in records]
    acked = [{step: at for step, _, at in r["pushes"]} for r in records]
    assert all(sorted(pushes) == list(range(1, steps + 1)) for pushes in acked)
    checked = 0
    for rank, record in enumerate(records):
        assert [step for step, _ in record["lookups"]] == list(range(1, steps + 1))
        for step, started in record["lookups"]:
            for other in range(workers):
                for pushed in range(1, step - staleness):
                    assert acked[other][pushed] < started, (
                        f"rank {rank}'s lookup for step {step} started {acked[other][pushed] - started:.3f} s "
                        f"before rank {other}'s push of step {pushed} was acknowledged; it must wait for it"
                    )
                    checked += 1
    assert checked > 0
    commits = records[0]["commits"]
    assert [step for step, _, _ in commits] == list(range(1, steps + 1))
    for step, commit_sent, commit_acked in commits:
        for other in range(workers):
            assert acked[other][step] < commit_sent, f"Commit({step}) sent before rank {other}'s push of it was in"
            if step < steps:
                assert commit_acked < sent[other][step + 1], (
                    f"rank {other} pushed step {step + 1} before Commit({step})"
                )


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_a_step_one_rank_failed_to_push_is_not_committed(tmp_path, failing_rank):
    """Async: a rank whose push of step s fails still joins the step's exchange (else the ranks
    would wait in gloo), and that was a barrier: rank 0 went on to Commit(s) on every shard,
    those that never got the failed rank's rows included, and replicas served that cut. Rank 0's
    own failure surfaces on its training thread a step later: the steps queued meanwhile are not
    committed either."""
    result, out = _run_async_ranks(tmp_path, 6, 2, "--push-delay", "0", "--fail-push", f"{failing_rank}:3")
    assert result.returncode != 0
    assert "push of step 3 failed (injected)" in result.stdout + result.stderr
    committed = [int(line) for line in (out / "commits.txt").read_text().split()]
    assert committed == [1, 2], committed


def _run_async_ranks(tmp_path: Path, steps: int, workers: int, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """An async job of `steps` over 2 shards, its ranks run by tests/worker/async_ranks.py (args:
    its flags) under torch.distributed.run; (the run, the folder of its records)."""
    table = TableConfig(name="emb", dim=4, init_scale=0.1, seed=1)
    train = {"workers": workers, "steps": steps, "batch_size": 32, "mode": "async", "staleness": 1}
    synthetic = {"num_dense": 2, "num_sparse": 3, "num_keys": 200, "num_batches": steps}
    path, ps = write_training_job(tmp_path / "job.toml", [table], 2, train, synthetic)
    out = tmp_path / "records"
    out.mkdir()
    with ShardCluster.start(ps, tmp_path / "shards"):
        result = subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                "--log-dir", str(tmp_path / "agent"),  # the agent's per-rank directories: in /tmp otherwise
                "-m", "tests.worker.async_ranks", "--config", str(path), "--out", str(out), *args,
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip
    return result, out

