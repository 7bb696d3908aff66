"""Partition: a PS shard's link goes down (`ip link set down` on its veth) while it keeps running.

    host 1: shard 0      host 2: shard 1 (the one cut)      host 3: embps launch --no-ps (workers)

- Clients of the cut shard fail within their deadline (plus a little slack) with UNAVAILABLE and
  a message naming the shard and the deadline: no hang, on an open connection or a new one.
- train.on_ps_unavailable = "abort": the worker exits non-zero naming the shard, and so does
  `embps launch`.
- train.on_ps_unavailable = "wait": training stalls while the link is down (the other shard's
  versions stop moving), resumes when it is back, and ends with the weights of an undisturbed
  run (the single-process reference, within 1e-5): no push was lost or applied twice.

The trainer's side of both modes is also checked in process, without namespaces, against tables
behind a link that loses answers (PartitionedTables): a retried push is the same prepared push,
so one that was applied before its answer got lost is not applied again.
"""

from __future__ import annotations

import json
import math
import re
import time

import grpc
import numpy as np
import pytest
import torch

from ps.client import PSClient, ShardUnavailableError
from ps.job_config import Deadlines
from tests.faults.namespaced_jobs import (
    assert_equals_reference,
    require_namespaces,
    seen_keys,
    shard_job,
    start_launch,
    start_shards,
    wait_exit,
    wait_for_step,
    write_job,
)
from tests.helpers.netns import host_network, remaining
from tests.helpers.processes import stop_pid
from worker import trainer as trainer_module
from worker.data_sources import train_reader
from worker.local_tables import LocalTables
from worker.model import DLRMDenseTower
from worker.train_config import PSUnavailablePolicy, TrainingJob, load_training_job, parse_training_job
from worker.trainer import Trainer

DEADLINE = 2.0  # seconds, lookups and pushes of the training jobs
CALL_DEADLINE = 1.0  # seconds, the calls of the client test (small ones)
SLACK = 0.5  # a failed call may end this much after its deadline (thread hand-offs, a loaded machine)
CUT_SECONDS = 4.0


def job_data(**train: object) -> dict:
    return {
        "job": "partition",
        "shards": [{"address": "10.0.0.1:50061"}],
        "tables": {"emb": {"dim": 4}},
        "train": {"workers": 1, "steps": 4, "batch_size": 8, **train},
        "data": {"synthetic": {"num_dense": 2, "num_sparse": 3, "num_keys": 50, "num_batches": 4}},
    }


def test_on_ps_unavailable_is_validated_and_errors_name_the_field():
    train = parse_training_job(job_data()).train
    assert train.on_ps_unavailable == PSUnavailablePolicy.ABORT and train.ps_unavailable_timeout_s == 600.0
    waiting = parse_training_job(job_data(on_ps_unavailable="wait", ps_unavailable_timeout_s=30)).train
    assert waiting.on_ps_unavailable == PSUnavailablePolicy.WAIT and waiting.ps_unavailable_timeout_s == 30
    with pytest.raises(ValueError, match="train.on_ps_unavailable: must be one of 'abort', 'wait', got 'retry'"):
        parse_training_job(job_data(on_ps_unavailable="retry"))
    # 1e300 s: torch's timedelta overflowed later, naming no field.
    for bad in (0, -1.0, math.inf, math.nan, 1e300):
        with pytest.raises(ValueError, match=r"ps_unavailable_timeout_s: must be a number of seconds in \(0, 604800\]"):
            parse_training_job(job_data(ps_unavailable_timeout_s=bad))
    with pytest.raises(ValueError, match=r"train.steps: must be at most 4,294,967,295 \(2\^32 - 1\)"):
        parse_training_job(job_data(steps=2**32))
    with pytest.raises(TypeError, match="train.ps_unavailable_timeout_s: must be a number"):
        parse_training_job(job_data(ps_unavailable_timeout_s="10s"))


class PartitionedTables(LocalTables):
    """In-process tables behind a link that drops for the first `outage_calls` sends of each push
    after `cut_after` pushes: the first of them reaches the tables and loses its answer (the worst
    case: applied, yet reported UNAVAILABLE), the others never arrive. Like a shard, it answers a
    push it has applied before from memory (by identity, where the shard goes by push id)."""

    ADDRESS = "10.0.0.2:50062"

    def __init__(self, job: TrainingJob, cut_after: int, outage_calls: int) -> None:
        super().__init__(list(job.ps.tables))
        self.cut_after = cut_after
        self.outage_calls = outage_calls
        self.sends: list[tuple[int, object]] = []  # (step, prepared push), every send
        self.applied: list[object] = []

    def send_push(self, prepared) -> None:
        step = prepared[1]
        self.sends.append((step, prepared))
        tries = sum(1 for s, _ in self.sends if s == step)
        if step > self.cut_after and tries <= self.outage_calls:
            if tries == 1:
                self._apply_once(prepared)
            raise ShardUnavailableError(
                f"PushBatch on shard {self.ADDRESS}: UNAVAILABLE: no answer", grpc.StatusCode.UNAVAILABLE, self.ADDRESS
            )
        self._apply_once(prepared)

    def _apply_once(self, prepared) -> None:
        if not any(p is prepared for p in self.applied):
            self.applied.append(prepared)
            super().send_push(prepared)


def small_job(**train: object) -> TrainingJob:
    data = job_data(**train)
    data["train"] |= {"steps": 6}
    data["data"]["synthetic"] |= {"num_batches": 6}
    return parse_training_job(data)


def train_steps(trainer: Trainer, job: TrainingJob) -> None:
    for batch in train_reader(job, 0, 1):
        trainer.train_step(trainer.pull(batch))


def test_wait_mode_s_collectives_outlast_how_long_a_step_may_wait():
    """While one rank re-sends under "wait", the others wait at the step's collectives: their
    process groups (worker/worker_main.py's, the async exchange group) get a timeout past the wait,
    never below torch's 30 minutes."""
    long_wait = parse_training_job(job_data(on_ps_unavailable="wait", ps_unavailable_timeout_s=7200.0)).train
    assert long_wait.collective_timeout.total_seconds() >= 7200.0 + 60
    for train in ({"on_ps_unavailable": "wait"}, {"on_ps_unavailable": "abort", "ps_unavailable_timeout_s": 7200.0}):
        assert parse_training_job(job_data(**train)).train.collective_timeout.total_seconds() == 1800.0


def test_the_collectives_outlast_a_snapshot_round_whose_tries_the_other_ranks_wait_for():
    """Rank 0 tries a snapshot round for up to snapshot.round_timeout_s while the other ranks wait
    at its barrier: a round timeout past the collectives' 30 minutes ended the job in gloo, where a
    round that fails is to be skipped with a warning."""
    data = job_data()
    data["snapshot"] = {"uri": "file:///tmp/snapshots", "round_timeout_s": 7200.0}
    job = parse_training_job(data)
    assert job.collective_timeout.total_seconds() >= 7200.0 + 60
    assert parse_training_job(job_data()).collective_timeout.total_seconds() == 1800.0
    data["snapshot"]["round_timeout_s"] = 1e300
    with pytest.raises(ValueError, match=r"snapshot.round_timeout_s: must be at most 604800 s"):
        parse_training_job(data)


def test_wait_mode_resends_the_same_push_so_an_applied_one_is_not_applied_again(monkeypatch):
    monkeypatch.setattr(trainer_module, "WAIT_PAUSE_SECONDS", 0.0)
    waiting = small_job(on_ps_unavailable="wait", ps_unavailable_timeout_s=30)
    partitioned = PartitionedTables(waiting, cut_after=2, outage_calls=3)
    torch.manual_seed(0)
    trainer = Trainer(waiting, DLRMDenseTower(waiting.model), partitioned, rank=0, world_size=1)
    train_steps(trainer, waiting)
    trainer.close()
    # Steps 3..6 each went out 4 times (3 lost, then answered), always the same prepared push.
    for step in range(1, 7):
        sent = [prepared for s, prepared in partitioned.sends if s == step]
        assert len(sent) == (1 if step <= 2 else 4) and all(p is sent[0] for p in sent), step
    assert len(partitioned.applied) == 6
    undisturbed = LocalTables(list(waiting.ps.tables))
    torch.manual_seed(0)
    reference = Trainer(waiting, DLRMDenseTower(waiting.model), undisturbed, rank=0, world_size=1)
    train_steps(reference, waiting)
    reference.close()
    keys = np.arange(50, dtype=np.int64)
    np.testing.assert_array_equal(partitioned.lookup("emb", keys), undisturbed.lookup("emb", keys))
    for name, value in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


def test_abort_mode_fails_at_once_and_wait_mode_gives_up_after_its_timeout(monkeypatch):
    monkeypatch.setattr(trainer_module, "WAIT_PAUSE_SECONDS", 0.05)
    aborting = small_job()
    partitioned = PartitionedTables(aborting, cut_after=2, outage_calls=1000)
    trainer = Trainer(aborting, DLRMDenseTower(aborting.model), partitioned, rank=0, world_size=1)
    with pytest.raises(ShardUnavailableError, match=f"shard {PartitionedTables.ADDRESS}: UNAVAILABLE"):
        train_steps(trainer, aborting)
    assert [s for s, _ in partitioned.sends] == [1, 2, 3]
    waiting = small_job(on_ps_unavailable="wait", ps_unavailable_timeout_s=0.3)
    partitioned = PartitionedTables(waiting, cut_after=2, outage_calls=1000)
    trainer = Trainer(waiting, DLRMDenseTower(waiting.model), partitioned, rank=0, world_size=1)
    start = time.monotonic()
    with pytest.raises(
        ShardUnavailableError, match=r"gave up after waiting \d+\.\d s \(train.ps_unavailable_timeout_s = 0.3\)"
    ):
        train_steps(trainer, waiting)
    assert 0.3 <= time.monotonic() - start < 5.0
    assert trainer.step == 3 and len(partitioned.sends) > 3


def expect_unavailable(call, address: str, deadline: float) -> float:
    """Runs call(), which must fail with UNAVAILABLE naming `address` and `deadline` within that
    deadline (plus SLACK); returns how long it took."""
    start = time.monotonic()
    with pytest.raises(ShardUnavailableError) as info:
        call()
    elapsed = time.monotonic() - start
    assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
    assert info.value.address == address
    assert f"on shard {address}: UNAVAILABLE" in str(info.value) and f"the {deadline:g} s deadline" in str(info.value)
    assert elapsed <= deadline + SLACK, f"failed after {elapsed:.2f} s, deadline {deadline} s: {info.value}"
    return elapsed


def test_a_cut_link_fails_lookups_and_pushes_within_the_deadline_with_unavailable(tmp_path):
    require_namespaces()
    with host_network(2, subnet="10.200.4") as net:
        kept, cut = net.hosts
        deadlines = Deadlines(lookup=CALL_DEADLINE, push=CALL_DEADLINE, stats=CALL_DEADLINE)
        ps = shard_job([kept, cut], "partition", deadlines)
        config = write_job(tmp_path / "job.toml", ps, steps=1, out=tmp_path / "out")
        shards = start_shards(ps, [kept, cut], config, tmp_path)
        try:
            keys = np.arange(400, dtype=np.int64)
            grads = np.full((keys.shape[0], 8), 0.1, dtype=np.float32)
            address = ps.shards[1].address
            with PSClient.from_job(ps) as client:
                before = client.lookup("sgd", keys)  # both connections open
                # A push whose call failed may or may not have reached the shard (its request can
                # sit in a TCP queue until the link is back): the safe retry re-sends the same ids.
                prepared = client.prepare_push([("sgd", keys, grads, None)], step=1)
                net.cut(cut)
                for _ in range(2):  # on the open connection, then on the reconnecting channel
                    expect_unavailable(lambda: client.lookup("sgd", keys), address, CALL_DEADLINE)
                    expect_unavailable(lambda: client.send_push(prepared), address, CALL_DEADLINE)
                with PSClient.from_job(ps) as fresh:  # a client that never reached the shard
                    expect_unavailable(lambda: fresh.lookup_many({"sgd": keys, "adam": keys}), address, CALL_DEADLINE)
                net.restore(cut)
                # Back within a few seconds: reconnect backoff is at most 1 s, one call's deadline 1 s.
                end, result = time.monotonic() + 10.0, None
                while result is None and time.monotonic() < end:
                    try:
                        result = client.send_push(prepared)
                    except ShardUnavailableError:
                        time.sleep(0.1)
                assert result is not None, "the shard did not answer within 10 s of the link coming back"
                after = client.lookup("sgd", keys)
            # SGD with lr 0.5, applied once on each shard however often the push was sent.
            np.testing.assert_allclose(after, before - 0.5 * grads, rtol=0, atol=1e-6)
        finally:
            for proc in reversed(shards):
                stop_pid(proc)
    assert remaining(net) == []


def abort_after_a_cut(tmp_path, subnet: str, name: str, **train: object) -> tuple[int, str, float, str]:
    """A job (train.on_ps_unavailable = "abort", `train` added) whose shard 1 is cut off at step 10;
    returns the launcher's exit code, its log, the seconds from the cut to its exit and the cut
    shard's address. Checks that the namespaces and links are gone."""
    require_namespaces()
    with host_network(3, subnet=subnet) as net:
        kept, cut, workers = net.hosts
        ps = shard_job([kept, cut], name, Deadlines(lookup=DEADLINE, push=DEADLINE, stats=DEADLINE))
        out = tmp_path / "out"
        # Far more steps than the test waits for: the job cannot finish before the cut.
        config = write_job(tmp_path / "job.toml", ps, steps=5000, out=out, on_ps_unavailable="abort", **train)
        procs = start_shards(ps, [kept, cut], config, tmp_path)
        log = tmp_path / "launch.log"
        try:
            launcher = start_launch(workers, config, log)
            procs.append(launcher)
            wait_for_step(out / "progress.jsonl", 10, launcher, log)
            net.cut(cut)
            cut_at = time.monotonic()
            code = wait_exit(launcher, log, timeout=90)
            took = time.monotonic() - cut_at
            print(f"the job failed {took:.1f} s after the cut")
        finally:
            for proc in reversed(procs):
                stop_pid(proc)
            net.restore(cut)
    assert remaining(net) == []
    return code, log.read_text(), took, ps.shards[1].address


@pytest.mark.slow
def test_abort_mode_the_worker_and_the_launcher_fail_naming_the_shard(tmp_path):
    code, text, took, address = abort_after_a_cut(tmp_path, "10.200.5", "abort", workers=1)
    assert code != 0, text[-4000:]
    assert f"PS shard {address} unavailable, stopping (train.on_ps_unavailable = abort)" in text, text[-4000:]
    assert re.search(r"embps launch: FAILED: worker rank 0\b.*\bcode 3\b", text), text[-4000:]
    # One call's deadline to notice, then the launcher's teardown; nowhere near a hang.
    assert took < DEADLINE + 20, f"the job took {took:.1f} s to fail after the cut"


@pytest.mark.slow
def test_abort_mode_two_async_workers_end_when_one_rank_s_push_fails(tmp_path):
    """Async, 2 workers: only rank 1 pushes to shard 1 (a rank pushes the keys of the shards it
    owns), so when shard 1 is cut its push fails while rank 0's succeeds. The ranks' exchange
    collectives must stay in step through that failure (before: rank 1 skipped the push's barrier
    and its next all_to_all met rank 0's barrier, and both ranks waited in gloo for its 30-minute
    timeout while the launcher saw no exit: 5 of 6 runs)."""
    code, text, took, address = abort_after_a_cut(tmp_path, "10.200.7", "abort-async", workers=2, mode="async")
    assert code != 0, text[-4000:]
    assert f"PS shard {address} unavailable, stopping" in text, text[-4000:]
    # Every failed rank is named, first to fail first; one of them says why.
    failed = re.search(r"embps launch: FAILED: (worker rank .*)", text)
    assert failed and "code 3" in failed.group(1), text[-4000:]
    assert took < DEADLINE + 30, f"the job took {took:.1f} s to fail after the cut"


def shard_versions(address: str) -> dict[str, int]:
    """The table versions of the shard at `address` (asked of it alone: the other one is cut)."""
    with PSClient([address]) as client:
        return {t.name: t.version for t in client.stats()[0].tables}


@pytest.mark.slow
def test_wait_mode_stalls_while_cut_and_resumes_to_the_undisturbed_result(tmp_path):
    require_namespaces()
    steps = 60
    with host_network(3, subnet="10.200.6") as net:
        kept, cut, workers = net.hosts
        ps = shard_job([kept, cut], "wait", Deadlines(lookup=DEADLINE, push=DEADLINE, stats=DEADLINE))
        out = tmp_path / "out"
        config = write_job(
            tmp_path / "job.toml", ps, steps=steps, out=out, on_ps_unavailable="wait", ps_unavailable_timeout_s=60.0
        )
        procs = start_shards(ps, [kept, cut], config, tmp_path)
        log = tmp_path / "launch.log"
        try:
            launcher = start_launch(workers, config, log)
            procs.append(launcher)
            with PSClient.from_job(ps) as client:
                reached = wait_for_step(out / "progress.jsonl", 10, launcher, log)
                assert reached < steps, "the job ended before the cut"
                net.cut(cut)
                time.sleep(0.5)  # the step in flight may still push to the kept shard
                stalled = shard_versions(ps.shards[0].address)
                time.sleep(CUT_SECONDS - 0.5)
                assert shard_versions(ps.shards[0].address) == stalled, "training went on while a shard was cut off"
                assert launcher.poll() is None, f"the job stopped during the cut:\n{log.read_text()[-4000:]}"
                net.restore(cut)
                assert wait_exit(launcher, log, timeout=120) == 0, log.read_text()[-6000:]
                seen = seen_keys(load_training_job(config))
                rows = {name: client.lookup(name, keys) for name, keys in seen.items()}
        finally:
            for proc in reversed(procs):
                stop_pid(proc)
    assert remaining(net) == []
    text = log.read_text()
    assert f"shard {ps.shards[1].address} unavailable, waiting up to 60 s" in text, text[-4000:]
    assert "the PS answers again after" in text, text[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps, summary
    assert_equals_reference(config, torch.load(out / "dense.pt"), rows)
