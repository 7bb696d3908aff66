"""Snapshot rounds that fail never stop training: the real S3 server stopped during a round, and a
real full disk (a tiny tmpfs, tests/helpers/small_disk.py). Rank 0's Checkpointer (world size 1)
retries the round, skips it with a warning and a count, training pushes on, and once storage is
back the next round commits, building on the last committed snapshot with nothing lost: its
restore equals the live tables."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import worker.checkpoint
from bench.s3_server import READER_ACCESS_KEY, READER_SECRET_KEY, S3Server
from ps.client import PSClient
from ps.job_config import SnapshotConfig, dump_job_config
from ps.rpc import snapshot_pb2, snapshot_pb2_grpc
from ps.security import SecurityConfig
from ps.snapshot.files import latest, list_snapshots, restore
from ps.snapshot.storage import StorageConfig
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import start_shard, wait_serving
from tests.helpers.s3_server import StopsAtTableWrite
from tests.helpers.slow_link import SlowLink
from tests.helpers.small_disk import seen_by, small_disk_prefix
from tests.helpers.waiting import wait_until
from tests.worker.training_jobs import write_training_job
from worker.checkpoint import Checkpointer
from worker.train_config import TrainingJob, load_training_job

TABLE = TableConfig(name="emb", dim=8, init_scale=0.1, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))
RETRIES = 2


def training_job(tmp_path: Path, uri: str, storage: StorageConfig | None = None) -> TrainingJob:
    snapshot = SnapshotConfig(
        uri, every_steps=10, full_every=100, retries=RETRIES, retry_backoff_s=0.05, storage=storage or StorageConfig()
    )
    train = {"workers": 1, "steps": 100, "batch_size": 8, "tables": ["emb"], "output_dir": str(tmp_path / "out")}
    path, _ = write_training_job(tmp_path / "job.toml", [TABLE], 1, train, {"num_keys": 1000}, snapshot=snapshot)
    return load_training_job(path)


class Trainer:
    """What the rounds need of a training run: pushes to the real shards, a dense model."""

    def __init__(self, job: TrainingJob) -> None:
        self.job = job
        self.client = PSClient.from_job(job.ps)
        self.rng = np.random.default_rng(0)
        self.keys = np.empty(0, dtype=np.int64)
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.checkpointer = Checkpointer(job, rank=0, world_size=1)

    def push(self, num_keys: int) -> None:
        keys = self.rng.integers(0, 1 << 40, num_keys, dtype=np.int64)
        self.client.push("emb", keys, self.rng.standard_normal((num_keys, TABLE.dim), dtype=np.float32))
        self.keys = np.union1d(self.keys, keys)

    def snapshot(self, step: int) -> None:
        """One round, to its end: save() returns once the shards staged it (training could go on)."""
        self.checkpointer.save(step, self.model, self.optimizer, {"position": step})
        self.checkpointer.finish()

    def check_restore_equals_live(self, uri: str, storage: StorageConfig | None = None) -> None:
        state = restore(uri, self.job.ps.job, None, storage)["emb"][0]
        assert np.array_equal(state.keys, self.keys)
        np.testing.assert_array_equal(state.values, self.client.lookup("emb", self.keys))


def _first_round_on_s3(
    tmp_path: Path, start_shards
) -> tuple[S3Server, str, StorageConfig, TrainingJob, object, Trainer]:
    """A real S3 server, shards and a run whose step 10 is committed there, and pushes since: the
    caller kills the server when done."""
    server = S3Server.start(tmp_path / "s3")
    try:
        server.create_bucket("snaps")
        uri = "s3://snaps/job"
        # One S3 request try: the round's own retries are what is tested, without pyarrow's backoff.
        storage = replace(server.storage_config(), max_attempts=1)
        job = training_job(tmp_path, uri, storage)
        shards = start_shards(job.ps)
        run = Trainer(replace(job, ps=shards.job))
        run.push(500)
        run.snapshot(10)
        run.push(500)
    except BaseException:
        server.kill()
        raise
    return server, uri, storage, job, shards, run


def test_s3_stopped_during_a_round_skips_it_and_the_next_round_loses_nothing(tmp_path, start_shards, caplog):
    server, uri, storage, job, shards, run = _first_round_on_s3(tmp_path, start_shards)
    try:
        stage_on_shards = worker.checkpoint._stage_on_shards

        def stop_s3_after_the_shards_wrote(*args):
            records = stage_on_shards(*args)
            server.kill()  # the shards' files are in; the dense model and the manifest are not
            return records

        worker.checkpoint._stage_on_shards = stop_s3_after_the_shards_wrote
        try:
            with caplog.at_level(logging.WARNING, logger="embps.worker"):
                run.snapshot(20)
        finally:
            worker.checkpoint._stage_on_shards = stage_on_shards
        rounds = run.checkpointer.rounds
        assert (rounds.committed, rounds.skipped, rounds.failed_tries) == (1, 1, RETRIES + 1)
        assert "snapshot step 20: SKIPPED after 3 tries" in caplog.text
        # The shards staged and wrote the round once: the tries after the first write rank 0's part
        # only (training went on after the shards staged it; their tables cannot be taken at step 20 again).
        calls = shards.servicers[0].metrics.registry.get_sample_value(
            "embps_requests_total", {"table": "", "method": "StageSnapshot", "code": "OK"}
        )
        assert calls == 2  # steps 10 and 20
        run.push(500)  # training goes on
        server.restart()
        run.push(500)
        run.snapshot(30)
        assert run.checkpointer.rounds.committed == 2
        snapshots = list_snapshots(uri, job.ps.job, storage)
        assert [(m.step, m.kind, m.parent) for m in snapshots] == [(10, "full", None), (30, "incremental", 10)]
        run.check_restore_equals_live(uri, storage)
        run.client.close()
    finally:
        server.kill()  # its data is thrown away: no need for a graceful stop



def test_training_goes_on_while_the_shards_write_a_staged_round_which_holds_the_tables_at_its_step(
    tmp_path, start_shards
):
    """save() returns once every shard copied its tables (StageSnapshot's `staged`), not once their
    files are written: the storage here answers 1.5 s late (a slow link to a real S3 server), and
    pushes change the rows while the round still writes them. The committed snapshot holds the
    rows as they were at its step."""
    server = S3Server.start(tmp_path / "s3")
    try:
        server.create_bucket("snaps")
        with SlowLink(server.endpoint, delay=1.5) as link:
            storage = replace(server.storage_config(), endpoint_override=link.address)
            job = training_job(tmp_path, "s3://snaps/job", storage)
            shards = start_shards(job.ps)
            run = Trainer(replace(job, ps=shards.job))
            run.push(500)
            at_step = run.client.lookup("emb", run.keys)
            started = time.monotonic()
            run.checkpointer.save(10, run.model, run.optimizer, {"position": 10})
            round_thread = run.checkpointer._previous[1]
            keys = run.keys.copy()
            run.client.push("emb", keys, np.ones((keys.shape[0], TABLE.dim), dtype=np.float32))
            assert round_thread.is_alive(), "the push waited for the round's files"
            assert not np.array_equal(run.client.lookup("emb", keys), at_step)
            run.checkpointer.finish()
            assert run.checkpointer.rounds.committed == 1
            # Training waited for the staging only: each file's write took an answer 1.5 s late after it.
            assert run.checkpointer.rounds.training_waited_s < time.monotonic() - started - 1.5
            state = restore("s3://snaps/job", job.ps.job, 10, storage)["emb"][0]
            assert np.array_equal(state.keys, keys)
            np.testing.assert_array_equal(state.values, at_step)
            run.client.close()
    finally:
        server.kill()


def test_a_key_that_may_not_write_skips_the_round_at_once(tmp_path, start_shards, caplog):
    """S3 credentials that may read and list but not write (`embps launch`'s check of snapshot.uri
    lists, and passes): AccessDenied was taken for an outage and every round retried with backoff
    (5 + 10 + 20 s by default) while training waited, and its warnings said UNAVAILABLE. Now the
    shards answer PERMISSION_DENIED and the round is skipped after its first try."""
    server = S3Server.start(tmp_path / "s3")
    try:
        server.create_bucket("snaps")
        storage = replace(server.storage_config(READER_ACCESS_KEY, READER_SECRET_KEY), max_attempts=1)
        job = training_job(tmp_path, "s3://snaps/job", storage)
        shards = start_shards(job.ps)
        run = Trainer(replace(job, ps=shards.job))
        run.push(100)
        with caplog.at_level(logging.WARNING, logger="embps.worker"):
            run.snapshot(10)
        rounds = run.checkpointer.rounds
        assert (rounds.committed, rounds.skipped, rounds.failed_tries) == (0, 1, 1)
        assert "snapshot step 10: SKIPPED after 1 try (PERMISSION_DENIED: writing snaps/job/" in caplog.text
        assert "ACCESS_DENIED" in caplog.text
        refused = shards.servicers[0].metrics.registry.get_sample_value(
            "embps_requests_total", {"table": "", "method": "StageSnapshot", "code": "PERMISSION_DENIED"}
        )
        assert refused == 1
        run.push(100)  # training goes on
        run.client.close()
    finally:
        server.kill()


def test_a_round_whose_commit_storage_cannot_confirm_is_not_written_again(tmp_path, start_shards, caplog,
                                                                          monkeypatch):
    """S3 stops right after the manifest of step 20 is written (before LATEST). The tries after
    it asked whether the step committed, took "cannot tell" for "no", and ran the round on the
    shards again, which cannot write a committed step (a review's repro: the round reported
    SKIPPED, saying the next round builds on step 10). Now a try that reached the commit asks
    storage again and writes nothing again; skipped, it says it cannot tell whether the step
    committed (it did), and the next round builds on the last step it knows."""
    from ps.snapshot import storage as storage_module

    server, uri, storage, job, shards, run = _first_round_on_s3(tmp_path, start_shards)
    try:
        write = storage_module.write_bytes_atomic

        def stop_s3_once_the_manifest_is_in(fs, path, data):
            write(fs, path, data)
            if path.endswith("/20/manifest.json"):
                server.kill()

        monkeypatch.setattr(storage_module, "write_bytes_atomic", stop_s3_once_the_manifest_is_in)
        with caplog.at_level(logging.WARNING, logger="embps.worker"):
            run.snapshot(20)
        monkeypatch.setattr(storage_module, "write_bytes_atomic", write)
        rounds = run.checkpointer.rounds
        assert (rounds.committed, rounds.skipped, rounds.failed_tries) == (1, 1, RETRIES + 1)
        assert "cannot tell whether step 20 committed" in caplog.text
        rewrites = shards.servicers[0].metrics.registry.get_sample_value(
            "embps_requests_total", {"table": "", "method": "WriteSnapshot", "code": "UNAVAILABLE"}
        )
        assert rewrites is None, "the round was written again on the shards"
        run.push(500)
        server.restart()
        run.push(500)
        run.snapshot(30)
        snapshots = [(m.step, m.kind, m.parent) for m in list_snapshots(uri, job.ps.job, storage)]
        assert snapshots == [(10, "full", None), (20, "incremental", 10), (30, "incremental", 10)]
        run.check_restore_equals_live(uri, storage)
        run.client.close()
    finally:
        server.kill()


def test_full_disk_skips_the_round_and_training_goes_on(tmp_path, caplog):
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = small_disk_prefix(disk, 512 << 10)
    job = training_job(tmp_path, str(disk))
    config_path = tmp_path / "shard.toml"
    config_path.write_text(dump_job_config(job.ps))
    log_path = tmp_path / "shard.log"
    proc = start_shard(config_path, 0, log_path, prefix=prefix)
    try:
        wait_serving(job.ps.shards[0].address, proc, log_path=log_path)
        # The shard and this process (the coordinator) both write the snapshot on the tmpfs.
        uri = str(seen_by(proc.pid, disk))
        job = replace(job, ps=replace(job.ps, snapshot=replace(job.ps.snapshot, uri=uri)))
        run = Trainer(job)
        run.push(200)
        run.snapshot(10)
        ballast = Path(uri) / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, bytes(64 << 10))
        finally:
            os.close(fd)
        assert full.value.errno == errno.ENOSPC
        run.push(2000)
        with caplog.at_level(logging.WARNING, logger="embps.worker"):
            run.snapshot(20)
        assert run.checkpointer.rounds.skipped == 1
        # Once staged (training went on), a shard's failure to write ends the round: no retry.
        assert "snapshot step 20: SKIPPED after 1 try (UNAVAILABLE" in caplog.text
        assert "No space left on device" in caplog.text
        run.push(200)  # training goes on
        ballast.unlink()
        run.snapshot(30)
        assert run.checkpointer.rounds.committed == 2
        steps = [(m.step, m.parent) for m in list_snapshots(uri, job.ps.job)]
        assert steps == [(10, None), (30, 10)]
        run.check_restore_equals_live(uri)
        run.client.close()
    finally:
        proc.kill()
        proc.wait()


def _committed_once_with_a_1_s_round_timeout(tmp_path: Path, start_shards) -> tuple[str, TrainingJob, Trainer]:
    """A run on local snapshots with round_timeout_s 1 s whose step 10 committed: (uri, job, run)."""
    uri = str(tmp_path / "snaps")
    job = training_job(tmp_path, uri)
    job = replace(job, ps=replace(job.ps, snapshot=replace(job.ps.snapshot, round_timeout_s=1.0)))
    shards = start_shards(job.ps)
    run = Trainer(replace(job, ps=shards.job))
    run.push(200)
    run.snapshot(10)
    return uri, job, run


def test_a_commit_that_hangs_in_storage_holds_no_training_and_the_next_round_waits_for_it(
    tmp_path, start_shards, caplog, monkeypatch
):
    """Rank 0's own storage calls (the dense model, the manifest, LATEST, gc) had no deadline: a
    manifest write that hung (a hard-mounted NFS folder, a stalled S3 endpoint) held training past
    round_timeout_s, forever with one rank (a review's repro). They run once the shards staged the
    round, while training goes on: the next round waits for that one within its own timeout and is
    skipped while it still runs; the hung round, once storage answers, commits a whole snapshot of
    its step, which the next round builds on. At the job's end, finish() waits for it."""
    from ps.snapshot import storage as storage_module

    uri, job, run = _committed_once_with_a_1_s_round_timeout(tmp_path, start_shards)
    write = storage_module.write_bytes_new
    storage_answers = threading.Event()

    def hang_at_step_20_and_50(fs, path, data):
        if path.endswith(("/20/manifest.json", "/50/manifest.json")):
            storage_answers.wait(60)
        write(fs, path, data)

    def save(step: int) -> None:
        run.checkpointer.save(step, run.model, run.optimizer, {"position": step})

    monkeypatch.setattr(storage_module, "write_bytes_new", hang_at_step_20_and_50)
    run.push(200)
    with caplog.at_level(logging.WARNING, logger="embps.worker"):
        save(20)  # returns once the shards staged it: its manifest hangs on the round's thread
        run.push(200)  # training goes on
        save(30)
    assert "snapshot step 30: SKIPPED: the round of step 20 still runs" in caplog.text
    rounds = run.checkpointer.rounds
    assert (rounds.committed, rounds.skipped) == (1, 1)
    storage_answers.set()
    wait_until(lambda: latest(uri, job.ps.job) == 20, "the commit of step 20")
    wait_until(lambda: rounds.committed == 2, "the commit of step 20 to be counted")
    run.push(200)
    run.snapshot(40)
    assert rounds.committed == 3
    steps = [(m.step, m.parent) for m in list_snapshots(uri, job.ps.job)]
    assert steps == [(10, None), (20, 10), (40, 20)]
    assert latest(uri, job.ps.job) == 40
    run.check_restore_equals_live(uri)
    # The job's last round: finish() waits for it, so the process's exit does not cut it short.
    storage_answers.clear()
    run.push(200)
    save(50)
    assert rounds.committed == 3 and latest(uri, job.ps.job) == 40
    storage_answers.set()  # the round goes on to its commit while finish() waits for it
    run.checkpointer.finish()
    assert latest(uri, job.ps.job) == 50 and rounds.committed == 4
    run.client.close()


def test_shards_that_do_not_stage_within_round_timeout_skip_the_round_and_a_late_commit_counts(
    tmp_path, start_shards, caplog, monkeypatch
):
    """Training waits for a round only until its shards staged it, and at most round_timeout_s (and
    a grace): a round still not staged then is reported SKIPPED and goes on on its thread; if it
    commits later (a whole snapshot of its step: training waited for the staging), it says so and
    counts, and the next round builds on it."""
    monkeypatch.setattr(worker.checkpoint, "STORAGE_GRACE_S", 0.2)
    uri, job, run = _committed_once_with_a_1_s_round_timeout(tmp_path, start_shards)
    stage_on_shards = worker.checkpoint._stage_on_shards
    shards_answer = threading.Event()

    def held_before_the_shards(*args):
        shards_answer.wait(60)  # a call held past its deadline (what the grace is for)
        return stage_on_shards(*args)

    monkeypatch.setattr(worker.checkpoint, "_stage_on_shards", held_before_the_shards)
    run.push(200)
    with caplog.at_level(logging.WARNING, logger="embps.worker"):
        started = time.monotonic()
        run.checkpointer.save(20, run.model, run.optimizer, {"position": 20})
        assert time.monotonic() - started < 30, "the round held training past its timeout"
    assert "snapshot step 20: SKIPPED: its shards have not staged it after round_timeout_s (1 s)" in caplog.text
    rounds = run.checkpointer.rounds
    assert (rounds.committed, rounds.skipped) == (1, 1)
    monkeypatch.setattr(worker.checkpoint, "_stage_on_shards", stage_on_shards)
    with caplog.at_level(logging.WARNING, logger="embps.worker"):
        shards_answer.set()
        wait_until(lambda: latest(uri, job.ps.job) == 20, "the late commit of step 20")
        wait_until(lambda: rounds.committed == 2, "the late commit to be counted")
    assert "snapshot step 20: committed late, after its round was reported SKIPPED; LATEST names it" in caplog.text
    run.snapshot(30)
    assert [(m.step, m.parent) for m in list_snapshots(uri, job.ps.job)] == [(10, None), (20, 10), (30, 20)]
    assert (rounds.committed, rounds.skipped) == (3, 1)
    run.client.close()


def test_a_shard_whose_files_hang_refuses_the_next_rounds_at_once_and_training_does_not_wait(
    tmp_path, start_shards, caplog, monkeypatch
):
    """A shard's files of round 20 hang (the real S3 server stopped answering once it staged the
    round): the round is given up at its round_timeout_s while training goes on. Each later round
    waited round_timeout_s for the shard's `staged`, which it answered only once its files of step
    20 were written, never: training held at every round. The shard refuses them at once, and rank 0
    skips them without a retry; once the server answers again, the next round builds on step 10
    and carries every change since."""
    round_timeout_s = 10.0
    server = S3Server.start(tmp_path / "s3")
    hang = None
    try:
        server.create_bucket("snaps")
        uri = "s3://snaps/job"
        storage = replace(server.storage_config(), request_timeout=300.0)  # the hung write waits for the server
        job = training_job(tmp_path, uri, storage)
        job = replace(job, ps=replace(job.ps, snapshot=replace(job.ps.snapshot, round_timeout_s=round_timeout_s)))
        shards = start_shards(job.ps)
        run = Trainer(replace(job, ps=shards.job))
        run.push(500)
        run.snapshot(10)
        hang = StopsAtTableWrite(server, 20, monkeypatch)
        run.push(500)
        with caplog.at_level(logging.WARNING, logger="embps.worker"):
            run.checkpointer.save(20, run.model, run.optimizer, {"position": 20})  # returns once staged
            round_20 = run.checkpointer._previous[1]
            wait_until(lambda: not round_20.is_alive(), "round 20 to be given up at its round_timeout_s", timeout=60)
            for step in (30, 40):
                run.push(500)
                started = time.monotonic()
                run.checkpointer.save(step, run.model, run.optimizer, {"position": step})
                waited = time.monotonic() - started
                assert waited < 3.0, f"round {step} held training {waited:.1f} s (round_timeout_s {round_timeout_s:g})"
        address = shards.job.shards[0].address
        for step in (30, 40):
            assert (
                f"snapshot step {step}: SKIPPED: shard {address} is still writing its files of step 20 and refused "
                "it at once" in caplog.text
            )
        rounds = run.checkpointer.rounds
        assert (rounds.committed, rounds.skipped) == (1, 3)
        hang.resume()
        wait_until(lambda: shards.servicers[0].snapshots.writing() is None, "the files of step 20 to be written")
        run.push(500)
        run.snapshot(50)
        assert (rounds.committed, rounds.skipped) == (2, 3)
        snapshots = list_snapshots(uri, job.ps.job, storage)
        assert [(m.step, m.kind, m.parent) for m in snapshots] == [(10, "full", None), (50, "incremental", 10)]
        run.check_restore_equals_live(uri, storage)
        run.client.close()
    finally:
        if hang is not None:
            hang.resume()
        server.kill()


def test_a_round_whose_parent_became_unusable_is_skipped_and_the_next_one_is_full(tmp_path, start_shards, caplog):
    """Rounds are full by the count of committed ones (full_every), and an incremental commits only
    on a readable parent. A parent gone since it committed (an external `embps snapshot gc`, a
    damaged manifest) failed the round past retrying, and every later round built on it too: the
    job took no snapshot again. The round after such a failure is full."""
    uri = str(tmp_path / "snaps")
    job = training_job(tmp_path, uri)
    shards = start_shards(job.ps)
    run = Trainer(replace(job, ps=shards.job))
    run.push(200)
    run.snapshot(10)
    (Path(uri) / job.ps.job / "10" / "manifest.json").unlink()  # the parent, gone
    run.push(200)
    with caplog.at_level(logging.WARNING, logger="embps.worker"):
        run.snapshot(20)
    assert "snapshot step 20: SKIPPED after 1 try" in caplog.text and "the next round is full" in caplog.text
    run.push(200)
    run.snapshot(30)
    assert [(m.step, m.parent) for m in list_snapshots(uri, job.ps.job)] == [(30, None)]
    run.check_restore_equals_live(uri)
    run.push(200)
    run.snapshot(40)  # and the rounds build on it again
    assert [(m.step, m.parent) for m in list_snapshots(uri, job.ps.job)] == [(30, None), (40, 30)]
    run.check_restore_equals_live(uri)
    run.client.close()


def test_a_bug_in_a_round_s_try_is_raised_on_the_training_thread(tmp_path, start_shards, monkeypatch):
    """An exception the tries do not handle (a bug: a record that does not parse) killed the round's
    thread: the round was reported as still waiting for storage and skipped, every round, and only
    a thread's traceback said why (a review). It is raised on the training thread, as before the
    tries had a thread of their own."""
    job = training_job(tmp_path, str(tmp_path / "snaps"))
    shards = start_shards(job.ps)
    run = Trainer(replace(job, ps=shards.job))

    def unreadable(*_args) -> None:
        raise KeyError("tables.emb.shards.0: a record this version cannot read")

    monkeypatch.setattr(worker.checkpoint.Checkpointer, "_write_once", unreadable)
    with pytest.raises(KeyError, match="a record this version cannot read"):
        run.snapshot(10)
    assert run.checkpointer.rounds.skipped == 0
    run.client.close()


class _ScriptedSnapshots(snapshot_pb2_grpc.SnapshotControlServicer):
    """A shard's SnapshotControl that answers StageSnapshot after `delay` s: UNAVAILABLE, or
    `staged` and then an empty list of records."""

    def __init__(self, delay: float, unavailable: bool) -> None:
        self.delay, self.unavailable = delay, unavailable

    def StageSnapshot(self, request, context):
        time.sleep(self.delay)  # the shard's own time to answer, as scripted
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "deposed, answering late")
        yield snapshot_pb2.SnapshotProgress(staged=True)
        yield snapshot_pb2.SnapshotProgress(records_json="[]")


def test_a_standby_asked_after_its_primary_answered_late_gets_what_is_left_of_the_round(tmp_path):
    """The primary answers UNAVAILABLE 1.5 s into a round of 2 s; the standby, asked then, would
    stage 1 s later. It had a timeout of its own: it staged past the round's time, after rank 0
    had given the round up and training went on (its tables of a later step than the round's).
    It gets what is left of the round's time, and the round fails without staging."""
    servers = []
    try:
        addresses = []
        for delay, unavailable in ((1.5, True), (1.0, False)):
            server = grpc.server(ThreadPoolExecutor(2))
            snapshot_pb2_grpc.add_SnapshotControlServicer_to_server(_ScriptedSnapshots(delay, unavailable), server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            server.start()
            servers.append(server)
        staged = threading.Event()
        request = snapshot_pb2.WriteSnapshotRequest(uri=str(tmp_path), job="job", step=1, kind="full", num_shards=1)
        with pytest.raises(grpc.RpcError) as failed:
            worker.checkpoint._stage_on_shards([addresses], SecurityConfig(), request, 2.0, staged.set)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not staged.is_set()
    finally:
        for server in servers:
            server.stop(None)
