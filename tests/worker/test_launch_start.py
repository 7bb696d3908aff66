"""How `embps launch` starts its shards: it waits while a start makes progress rather than for a
fixed time, a shard that does not come up is a restartable failure (not the end of the job), and a
newest snapshot that cannot be restored falls back to the previous complete one with a warning."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.ports import free_ports
from ps.client import PSClient
from ps.job_config import SnapshotConfig
from ps.process import children
from ps.snapshot.files import latest
from ps.snapshot.manifest import RETIRED_MANIFEST
from ps.snapshot.ops import ShardSnapshotter, collect_garbage
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.snapshot_files import shard_file
from tests.worker.training_jobs import trainer_extras, write_training_job
from worker import launcher
from worker.launch_config import ReplicaSpec
from worker.serving_fleet import ServingFleet
from worker.train_config import TrainingJob, load_training_job

TABLE = TableConfig(name="emb", dim=8, init_scale=0.1, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))


def one_shard_job(tmp_path: Path, snapshot: SnapshotConfig | None = None) -> TrainingJob:
    train = {"workers": 1, "steps": 10, "batch_size": 8, "tables": ["emb"], "output_dir": str(tmp_path / "out")}
    path, _ = write_training_job(tmp_path / "job.toml", [TABLE], 1, train, {"num_keys": 100}, snapshot=snapshot)
    return load_training_job(path)


def test_the_start_wait_lasts_as_long_as_the_start_makes_progress(tmp_path):
    log = tmp_path / "starting.log"
    log.touch()
    # The child plays a shard whose restore moves, then stalls: a byte of log every 50 ms for 2.5 s,
    # then nothing. Its sleeps are the behaviour under test; the test itself waits on nothing.
    writes = "import sys, time\nfor _ in range(50):\n    open(sys.argv[1], 'a').write('.')\n    time.sleep(0.05)\n"
    proc = subprocess.Popen([sys.executable, "-c", writes + "time.sleep(60)\n", str(log)])
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no progress"):
            children.wait_serving(
                f"127.0.0.1:{free_ports(1)[0]}", proc, "starter", timeout=1.0, progress=lambda: log.stat().st_size
            )
        waited = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    assert log.stat().st_size == 50
    assert waited >= 2.5  # the 2.5 s of writes, past a 1 s timeout; then 1 s without progress


def test_a_shard_that_does_not_start_is_a_restartable_failure(tmp_path):
    job = one_shard_job(tmp_path)
    host, port = job.ps.shards[0].address.rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        failure = launcher._run_attempt(
            job,
            launcher.LaunchOptions(job.path),
            True,
            None,
            tmp_path / "progress.jsonl",
            launcher._Failures(),
            None,
            launcher._AgentImport(),
        )
    # Found before the shard starts: another process there (another job's shard, say) answered the
    # launcher's health check for it while the shard failed to bind, and the workers started against it.
    assert failure == f"shards[0].address: {job.ps.shards[0].address} is taken by another process; the shard " \
        "cannot serve there", failure


def test_a_port_whose_last_connections_wait_in_time_wait_is_free_for_the_next_shard(tmp_path):
    """The check for a taken port bound without SO_REUSEADDR, as the shard's server does not: the
    connections of a shard stopped a moment before (TIME_WAIT on the port) failed every restart of
    the kill suite ("taken by another process")."""
    job = one_shard_job(tmp_path)
    host, port = job.ps.shards[0].address.rsplit(":", 1)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        listener.listen()
        with socket.create_connection((host, int(port))) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's end closes first: it waits in TIME_WAIT on the port
            client.recv(1)
    launcher._check_shard_ports_free(job)  # no _StartFailed


def test_replicas_started_by_an_attempt_whose_shards_failed_are_watched_from_the_next_one(tmp_path):
    """The first attempt starts the serving replicas beside the shards; when its shards did not
    come up it returned before the replicas' health wait, and later attempts never made it: the
    replicas ran unwatched for the whole job (a dead one was neither restarted nor reported)."""
    job = one_shard_job(tmp_path)
    out = tmp_path / "out"
    listen, metrics_port = free_ports(2)
    fleet = ServingFleet(job, (ReplicaSpec(f"127.0.0.1:{listen}", metrics_port),), out, 1, on_fatal=print)
    host, port = job.ps.shards[0].address.rsplit(":", 1)

    def attempt():
        return launcher._run_attempt(
            job, launcher.LaunchOptions(job.path), True, None, out / "progress.jsonl", launcher._Failures(), fleet,
            launcher._AgentImport(),
        )

    out.mkdir()
    try:
        with socket.socket() as taken:
            taken.bind((host, int(port)))
            taken.listen()
            failure = attempt()
        assert failure is not None and failure.startswith("shards[0].address: "), failure
        assert fleet.started and not fleet.watching
        assert attempt() is None
        assert fleet.watching
    finally:
        fleet.stop()


def test_a_corrupt_newest_snapshot_falls_back_to_the_previous_complete_one(tmp_path, capsys):
    uri = str(tmp_path / "snaps")
    job = one_shard_job(tmp_path, SnapshotConfig(uri))
    table = EmbeddingTable(TABLE)
    snapper = ShardSnapshotter({"emb": table}, 0)
    keys = np.arange(1, 1001, dtype=np.int64)
    table.apply_gradients(keys, np.ones((keys.shape[0], TABLE.dim), dtype=np.float32))
    snapper.snapshot(uri, job.ps.job, 10, extras=trainer_extras(job, 1, 10))
    at_10 = table.lookup(keys).numpy()
    table.apply_gradients(keys, np.ones((keys.shape[0], TABLE.dim), dtype=np.float32))
    snapper.snapshot(uri, job.ps.job, 20, kind="incremental", extras=trainer_extras(job, 1, 20))
    rows = shard_file(tmp_path / "snaps" / job.ps.job / "20", "emb", 0)
    data = bytearray(rows.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another checksum
    rows.write_bytes(bytes(data))
    out = tmp_path / "out"
    (shards, standbys), step = launcher._start_restorable_shards(job, out, 20, 1)
    try:
        assert step == 10
        printed = capsys.readouterr().out
        assert "WARNING: ps shard 0 cannot restore snapshot step 20" in printed
        assert "falling back to the previous complete snapshot, step 10" in printed
        log = (out / "logs" / "ps-0.log").read_text()
        assert "snapshot step 20 cannot be restored" in log and "sha256" in log
        with PSClient.from_job(job.ps) as client:
            np.testing.assert_array_equal(client.lookup("emb", keys), at_10)
        # Step 20 is out of use, its manifest kept beside its files: a resume no longer tries it,
        # gc keeps step 10 (before: it kept 20, the newest by number, and deleted 10), and the job
        # going on from 10 writes step 20 again when it gets there.
        assert "its manifest moved to" in printed
        assert (tmp_path / "snaps" / job.ps.job / "20" / RETIRED_MANIFEST).exists()
        assert latest(uri, job.ps.job) == 10
        assert collect_garbage(uri, job.ps.job, keep=1).kept == (10,)
        snapper.snapshot(uri, job.ps.job, 20)
        assert latest(uri, job.ps.job) == 20
    finally:
        children.stop_all(shards)


def test_a_corrupt_extra_of_the_newest_snapshot_falls_back_before_any_worker_reads_it(tmp_path, capsys):
    """The shards never read a step's extra files (the dense tower, the trainer's state); a
    corrupt one failed every worker at each restart, and the launcher never fell back."""
    uri = str(tmp_path / "snaps")
    job = one_shard_job(tmp_path, SnapshotConfig(uri))
    table = EmbeddingTable(TABLE)
    snapper = ShardSnapshotter({"emb": table}, 0)
    snapper.snapshot(uri, job.ps.job, 10, extras=trainer_extras(job, 1, 10))
    snapper.snapshot(uri, job.ps.job, 20, kind="incremental", extras=trainer_extras(job, 1, 20))
    extra = tmp_path / "snaps" / job.ps.job / "20" / "extra" / "dense.pt"
    data = bytearray(extra.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another checksum
    extra.write_bytes(bytes(data))
    (shards, standbys), step = launcher._start_restorable_shards(job, tmp_path / "out", 20, 1)
    try:
        assert step == 10
        printed = capsys.readouterr().out
        assert "snapshot step 20 cannot be resumed" in printed and "sha256" in printed
        assert latest(uri, job.ps.job) == 10
    finally:
        children.stop_all(shards)


def test_a_taken_train_metrics_port_names_the_field(tmp_path):
    """The worker ended in a traceback (OSError: Address already in use) that named no field."""
    import dataclasses

    from worker import worker_main

    job = one_shard_job(tmp_path)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, metrics_port=port))
        message = rf"^train\.metrics_port: cannot serve /metrics on port {port}: "
        with pytest.raises(worker_main.MetricsPortError, match=message):
            worker_main.run_worker(job, 0, 1)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_progress_bar_reads_a_line_written_in_two_parts_and_goes_on_past_a_cut_one(tmp_path):
    """The bar's thread parsed whatever readline() returned: a line rank 0 was still writing (or one
    a killed worker left cut short) raised, the thread died and the bar stood still for the run."""
    import json
    import threading
    from types import SimpleNamespace

    path = tmp_path / "progress.jsonl"
    path.write_text('{"step": 1, "total_steps": 10, "loss": 0.5, "samples_per_s": 10.0}\n{"step": 2, "los')
    stop = threading.Event()
    shown = threading.Thread(target=launcher._show_progress, args=(path, SimpleNamespace(train=SimpleNamespace(
        steps=10)), stop))
    shown.start()
    with open(path, "a") as f:
        f.write('s": 0.4, "samples_per_s": 11.0}\n{"step": 3, "lo\n')  # the first line ends; a cut one
        f.write(json.dumps({"step": 4, "loss": 0.3, "samples_per_s": 12.0}) + "\n")
        f.write(json.dumps({"done": True}) + "\n")
    shown.join(30)
    assert not shown.is_alive(), "the bar's thread did not reach the done line"
    stop.set()


def test_a_resume_of_a_finished_job_says_so_and_measures_nothing(tmp_path):
    """`embps launch --resume` of a job whose last snapshot is its last step trains nothing; its
    summary said 0 samples/s and a final loss of 0, and the launcher printed them as the run's."""
    import json

    job = one_shard_job(tmp_path, snapshot=SnapshotConfig(uri=str(tmp_path / "snaps"), every_steps=5))
    summary_path = Path(job.train.output_dir) / "summary.json"

    def launch(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "embps", "launch", str(job.path), *flags], cwd=Path(__file__)
                              .resolve().parents[2], capture_output=True, text=True, timeout=300)

    first = launch()
    assert first.returncode == 0, first.stderr[-3000:]
    finished = json.loads(summary_path.read_text())
    assert finished["steps"] == 10 and finished["final_loss"] > 0
    again = launch("--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(summary_path.read_text())
    assert resumed["steps"] == 10 and resumed["samples"] == 0 and resumed["resumed_from"] == 10
    assert resumed["final_loss"] is None and resumed["samples_per_s"] is None
    assert "the job was at its last step already (10): nothing left to train" in again.stdout


def test_a_shard_whose_config_refuses_its_snapshot_ends_the_job_without_restarts(tmp_path):
    """A table's capacity below the rows a shard must restore, past the launch-time check (its
    bound over an incremental chain is from below): the shard exited 1, the reason in its log
    only, and the launcher restarted the attempt until max_restarts, each failing the same way.
    The shard now exits EXIT_CONFIG_REFUSED and the attempt's failure is fatal, naming the reason."""
    import dataclasses

    uri = str(tmp_path / "snaps")
    capped = dataclasses.replace(TABLE, capacity=11)
    train = {"workers": 1, "steps": 10, "batch_size": 8, "tables": ["emb"], "output_dir": str(tmp_path / "out")}
    path, _ = write_training_job(tmp_path / "job.toml", [capped], 1, train, {"num_keys": 100},
                                 snapshot=SnapshotConfig(uri))
    job = load_training_job(path)
    table = EmbeddingTable(TABLE)  # no capacity: the snapshot's rows
    snapper = ShardSnapshotter({"emb": table}, 0)
    grads = np.ones((10, TABLE.dim), dtype=np.float32)
    table.apply_gradients(np.arange(10, dtype=np.int64), grads)
    snapper.snapshot(uri, job.ps.job, 10, extras=trainer_extras(job, 1, 10))
    table.apply_gradients(np.arange(6, 16, dtype=np.int64), grads)  # 16 rows; the manifests bound them at 10
    snapper.snapshot(uri, job.ps.job, 20, kind="incremental", extras=trainer_extras(job, 1, 20))
    launcher._check_resume(job, 20, 1)  # the launch-time check lets it through
    failures = launcher._Failures()
    failure = launcher._run_attempt(
        job, launcher.LaunchOptions(job.path), True, 20, tmp_path / "progress.jsonl", failures, None,
        launcher._AgentImport(),
    )
    assert failure is not None and failures.fatal is not None, (failure, failures.fatal)
    assert "ps shard 0 exited (code 2): shard 0: the job's config refuses snapshot step 20: " in failures.fatal
    assert "capacity" in failures.fatal and "not restarted" in failures.fatal, failures.fatal
