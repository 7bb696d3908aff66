"""Kill suite: SIGKILL one process of a running sync job (a worker, a PS shard, a serving replica,
or the launcher itself) at a random moment after its first snapshot; `embps launch` restarts what
it must ([launch] max_restarts), and the job ends as if nothing had happened.

One job: 2 workers, 2 shards (an Adam table with count admission, an FTRL table with TTL
eviction), 2 serving replicas, STEPS tiny steps, a snapshot every EVERY steps. A reference run
without any kill gives the final state. Each kill run checks:

- The exact-resume property: at the final snapshot every (table, shard) has the reference's keys,
  values, optimizer state, frequencies, pending (admission) keys and last steps, and the dense
  model and optimizer are bit-equal. A restart that kept a shard's memory (pushes past the
  snapshot applied twice), restored only the dead shard, or resumed the workers elsewhere than
  the shards would change them.
- No acknowledged push lost past the last snapshot: a push acknowledged after snapshot S lives
  only in its shard's memory, which the restart drops; it is not lost if and only if the workers
  push it again, that is if they resume exactly at S with the shards restored to S. So: the
  launcher restarts from a complete snapshot at or after the LATEST one committed before the kill
  (it names S; the last attempt's summary says it resumed from S), and every (table, shard) ends
  at the reference's version. A table's version counts the pushes it applied (each Push + 1; a
  restore sets the snapshot's count), so a push lost or applied twice past S moves it even where
  the rows could coincide.
- Serving answered every lookup meanwhile: a client thread looks up trained keys on the replicas
  round-robin and tries the other replica on UNAVAILABLE, as a real client would; no lookup may
  go unanswered from the moment both replicas serve until rank 0 reports the job done. After a
  training restart, every replica serves rows from the restarted shards (a new incarnation in its
  replies: it resynced and kept answering while they were down). The launcher kill is the
  exception by design: every child dies with the launcher, replicas included, so lookups pause
  from the kill until the resumed launch's replicas serve.

The launcher kill writes its snapshots to a real S3 server, so the resume reads tables, dense model,
optimizer and reader state back from S3; the other kills restart from local disk.

The random moment comes from a seed printed by each test (EMBPS_KILL_SEED=<seed> repeats it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.ports import free_ports
from ps import wire
from ps.job_config import SnapshotConfig
from ps.rpc import serving_pb2, serving_pb2_grpc
from ps.snapshot.files import latest, list_snapshots, read_extra, restore
from ps.snapshot.storage import StorageConfig
from ps.table.config import AdmissionConfig, AdmissionKind, EvictionConfig, OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import REPO_ROOT
from tests.worker.test_launch import alive, descendants
from tests.worker.training_jobs import write_training_job
from worker.features import keys_from_values

STEPS = 200
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
EVERY = 20
MAX_RESTARTS = 2
TRAIN_TABLES = ["adam", "ftrl", "adam", "ftrl"]  # table of each sparse feature
SYNTHETIC = {"num_dense": 3, "num_sparse": 4, "num_keys": 400, "num_batches": STEPS, "num_eval_batches": 1}
LAUNCH_TIMEOUT_S = 240
HOT_KEYS = 40  # the most frequent values of each feature: rows that training keeps changing


@dataclass
class Job:
    path: Path
    name: str
    uri: str
    out: Path
    replicas: list[str] = field(default_factory=list)  # listen addresses
    storage: StorageConfig | None = None  # of `uri` (S3 settings; None: local disk)

    @property
    def progress(self) -> Path:
        return self.out / "progress.jsonl"


def write_job(
    tmp_path: Path, name: str, num_replicas: int, uri: str | None = None, storage: StorageConfig | None = None
) -> Job:
    """The job's TOML; snapshots under `uri` (default: local disk in tmp_path) with `storage`."""
    out = tmp_path / f"out-{name}"
    train = {
        "workers": 2,
        "steps": STEPS,
        "batch_size": 64,
        "tables": TRAIN_TABLES,
        "dense_lr": 0.01,
        "eval_batches": 1,
        "output_dir": str(out),
    }
    uri = uri if uri is not None else str(tmp_path / f"snapshots-{name}")
    snapshot = SnapshotConfig(uri=uri, every_steps=EVERY, full_every=3, storage=storage)
    path, _ = write_training_job(tmp_path / f"{name}.toml", TABLES, 2, train, SYNTHETIC, job=name, snapshot=snapshot)
    replicas = [f"127.0.0.1:{port}" for port in free_ports(num_replicas)]
    lines = ["", "[launch]", f"max_restarts = {MAX_RESTARTS}"]
    for address in replicas:
        lines += ["", "[[launch.serving]]", f'listen = "{address}"']
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return Job(path, name, uri, out, replicas, storage)


def start_launch(job: Job, log: Path, *extra: str) -> subprocess.Popen:
    # A launcher killed by SIGKILL cannot remove its temporary directory: in the test's, not /tmp.
    scratch = job.out.parent / "tmpdir"
    scratch.mkdir(exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "embps", "launch", str(job.path), *extra],
            cwd=REPO_ROOT,
            env={**os.environ, "TMPDIR": str(scratch)},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL for a launcher and everything below it (a failed test leaves nothing running)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Waits for the launcher; its output (progress bar lines dropped)."""
    try:
        proc.wait(LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
    text = log.read_text(errors="replace").replace("\r", "\n")
    return "\n".join(line for line in text.splitlines() if not line.startswith("train:"))


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


def final_state(job: Job) -> tuple[dict, bytes]:
    assert latest(job.uri, job.name, job.storage) == STEPS
    return restore(job.uri, job.name, STEPS, job.storage), read_extra(job.uri, job.name, STEPS, "dense.pt", job.storage)


def assert_same_final_state(job: Job, reference: tuple[dict, bytes]) -> None:
    """Tables (version included: a push lost or applied twice past the snapshot moves it) and
    dense state, exactly."""
    want_tables, want_dense = reference
    got_tables, got_dense = final_state(job)
    assert_same_dense(got_dense, want_dense)
    assert_same_tables(got_tables, want_tables)


def progress_step(job: Job) -> int:
    lines = job.progress.read_text().splitlines() if job.progress.exists() else []
    return json.loads(lines[-1]).get("step", 0) if lines else 0


def job_done(job: Job) -> bool:
    lines = job.progress.read_text().splitlines() if job.progress.exists() else []
    return bool(lines) and bool(json.loads(lines[-1]).get("done"))


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"launcher exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def replicas_serving(job: Job) -> bool:
    for address in job.replicas:
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
    return True


class LookupClient:
    """Looks up hot trained keys on the replicas round-robin, from a thread, as a real client does:
    on UNAVAILABLE the same lookup goes to the next replica; a lookup no replica answers (or one
    that fails otherwise) is recorded as unanswered. Replies' per-shard incarnations are kept, to
    see the replicas resync from restarted shards. Once `training_over()` says the job is done, the
    launcher stops its replicas, by design: a lookup no replica answers then ends the lookups
    instead of counting as unanswered."""

    def __init__(self, addresses: list[str], training_over: Callable[[], bool]) -> None:
        self.training_over = training_over
        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.stubs = [serving_pb2_grpc.ServingStub(c) for c in self.channels]
        self.requests = []
        for table in sorted(set(TRAIN_TABLES)):
            features = [f for f, t in enumerate(TRAIN_TABLES) if t == table]
            keys = np.concatenate([keys_from_values(np.arange(HOT_KEYS, dtype=np.uint64), f) for f in features])
            self.requests.append(serving_pb2.ServingLookupRequest(table=table, keys=wire.encode_keys(keys)))
        self.answered: list[tuple[float, int]] = []  # (time.monotonic(), replica)
        self.unanswered: list[str] = []
        self.failovers = 0
        self.rows_found = 0  # keys answered with a trained row (found), over all replies
        # (replica, table, shard) -> [(time.monotonic(), incarnation)] at each change, in order
        self.incarnations: dict[tuple[int, str, int], list[tuple[float, int]]] = {}
        self.paused = threading.Event()
        self._busy = threading.Lock()  # held by the thread through each lookup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._next = 0

    def start(self) -> None:
        self._thread.start()

    def serving_rows_of_every_shard(self, expected: int) -> bool:
        """Whether replies have shown rows of a shard process (an incarnation) for `expected`
        (replica, table, shard) triples."""
        latest = [seen[-1][1] for seen in list(self.incarnations.values())]
        return len(latest) == expected and all(latest)

    def stop(self) -> None:
        """Stops the lookups (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for channel in self.channels:
            channel.close()

    def pause(self) -> None:
        """Stops the lookups until paused is cleared; returns once no lookup is in flight (one sent
        before would otherwise meet the replicas' planned death and count as unanswered)."""
        self.paused.set()
        with self._busy:
            pass

    def answered_after(self, moment: float, replica: int | None = None) -> int:
        return sum(1 for t, r in self.answered if t > moment and replica in (None, r))

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(0.01):
            with self._busy:
                if self.paused.is_set():
                    continue
                # every table on every replica
                self._lookup(self.requests[count // len(self.stubs) % len(self.requests)])
            count += 1

    def _lookup(self, request: serving_pb2.ServingLookupRequest) -> None:
        errors = []
        first, self._next = self._next, (self._next + 1) % len(self.stubs)
        for attempt in range(len(self.stubs)):
            replica = (first + attempt) % len(self.stubs)
            try:
                reply = self.stubs[replica].Lookup(request, timeout=2.0)
            except grpc.RpcError as err:
                errors.append(f"replica {replica}: {err.code().name} {err.details()}")
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue  # down or stopping: the next replica may answer
                break  # any other error is an answer of the wrong kind
            self.answered.append((time.monotonic(), replica))
            self.failovers += attempt > 0
            self.rows_found += int(np.frombuffer(reply.found, dtype=np.uint8).sum())
            for served in reply.shards:
                seen = self.incarnations.setdefault((replica, request.table, served.shard), [])
                if not seen or seen[-1][1] != served.incarnation:
                    seen.append((time.monotonic(), served.incarnation))
            return
        if self.training_over():
            self._stop.set()
            return
        self.unanswered.append("; ".join(errors))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, bytes]:
    """The final state of the job run once, undisturbed (no replicas: they change nothing)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    job = write_job(tmp_path, "reference", num_replicas=0)
    log = tmp_path / "launch.log"
    started = time.monotonic()
    proc = start_launch(job, log)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    print(f"reference run: {time.monotonic() - started:.0f} s")
    return final_state(job)


def kill_seed() -> int:
    seed = int(os.environ.get("EMBPS_KILL_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"kill seed {seed} (EMBPS_KILL_SEED={seed} repeats this run)")
    return seed


def children_of_kind(launcher: int, kind: str) -> list[int]:
    """Live processes of `kind` below the launcher, by command line."""
    needle = {"worker": b"worker.worker_main", "ps": b"embps\x00ps\x00", "serving": b"embps\x00serve\x00"}[kind]
    found = []
    for pid in sorted(descendants(launcher)):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def assert_all_die(pids, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    survivors = [p for p in pids if alive(p)]
    assert not survivors, f"{what} outlived the launcher by {within} s: {survivors}"


def index_of(pid: int, kind: str, job: Job) -> int:
    """A victim's index as the launcher names it: the worker's RANK, the shard's --shard, the
    replica's position in [[launch.serving]]."""
    if kind == "worker":
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if kind == "ps":
        return int(argv[argv.index(b"--shard") + 1])
    config = Path(argv[argv.index(b"--config") + 1].decode())
    return int(re.fullmatch(r"replica-(\d+)\.toml", config.name).group(1))


def kill_at_random_moment(job: Job, proc: subprocess.Popen, log: Path, rng: random.Random) -> int:
    """Waits for the first snapshot and a random step after it, then a random fraction of a
    second; returns the LATEST snapshot step just before the kill (the caller kills)."""
    kill_step = rng.randrange(EVERY + 5, STEPS - 60)
    delay = rng.uniform(0.0, 0.1)
    print(f"kill after step {kill_step} + {delay:.3f} s")
    wait_until(lambda: latest(job.uri, job.name, job.storage) is not None, proc, log, "first snapshot")
    wait_until(lambda: progress_step(job) >= kill_step, proc, log, f"step {kill_step}")
    time.sleep(delay)
    assert not job_done(job), "the job finished before the kill"
    before = latest(job.uri, job.name, job.storage)
    assert before is not None
    return before


def launch_with_replicas(
    tmp_path: Path, uri: str | None = None, storage: StorageConfig | None = None
) -> tuple[Job, Path, subprocess.Popen, LookupClient]:
    """The job with 2 serving replicas (snapshots under `uri`, see write_job), launched, and a
    lookup client for them (not started)."""
    job = write_job(tmp_path, "killed", num_replicas=2, uri=uri, storage=storage)
    log = tmp_path / "launch.log"
    return job, log, start_launch(job, log), LookupClient(job.replicas, lambda: job_done(job))


NAMES = {"worker": "worker rank", "ps": "ps shard", "serving": "serving replica"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["worker", "ps", "serving"])
def test_sigkill_of_a_child_is_restarted_and_the_job_ends_as_if_undisturbed(tmp_path, reference, kind):
    rng = random.Random(kill_seed())
    started = time.monotonic()
    job, log, proc, client = launch_with_replicas(tmp_path)
    try:
        wait_until(lambda: replicas_serving(job), proc, log, "serving replicas")
        client.start()
        if kind != "serving":
            # Replicas show rows at a committed step (consistency = "step"): before the kill, every
            # one must serve the first shards' rows, or a resync from the restarted ones proves nothing.
            wait_until(lambda: client.serving_rows_of_every_shard(2 * 2 * len(job.replicas)), proc, log,
                       "every replica serving rows of every shard")
        before = kill_at_random_moment(job, proc, log, rng)
        victim = rng.choice(children_of_kind(proc.pid, kind))
        index = index_of(victim, kind, job)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"killed {NAMES[kind]} {index} (pid {victim}); LATEST snapshot was {before}")
        wait_until(lambda: job_done(job), proc, log, "the end of training", LAUNCH_TIMEOUT_S)
        client.stop()
        output = finish(proc, log)
    except BaseException:
        kill_tree(proc)
        raise
    finally:
        client.stop()
    print(f"run with a kill: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, output[-4000:]
    died = re.escape(f"{NAMES[kind]} {index} (pid {victim}) exited (killed by SIGKILL)")
    summary = json.loads((job.out / "summary.json").read_text())
    if kind == "serving":
        assert re.search(died + rf"; restart 1/{MAX_RESTARTS} of this replica", output), output[-4000:]
        assert "from snapshot step" not in output, f"a replica's death restarted the training:\n{output[-4000:]}"
        assert summary["resumed_from"] is None
        assert client.failovers >= 1, "the client never met the dead replica: the test proved nothing"
        starts = (job.out / "logs" / f"serve-{index}.log").read_text().count("serving replica of job")
        assert starts == 2, f"replica {index} started {starts} times"
    else:
        match = re.search(died + rf"[^;\n]*; restart 1/{MAX_RESTARTS} from snapshot step (\d+)", output)
        assert match, output[-4000:]
        step = int(match.group(1))
        assert before <= step < STEPS and step in {m.step for m in list_snapshots(job.uri, job.name, job.storage)}
        assert summary["resumed_from"] == step and summary["steps"] == STEPS
        assert len(client.incarnations) == 2 * 2 * len(job.replicas), client.incarnations.keys()
        for (replica, table, shard), seen in client.incarnations.items():
            at_kill = [incarnation for t, incarnation in seen if t <= killed_at][-1]
            assert at_kill != 0 and seen[-1][1] not in (0, at_kill), (
                f"replica {replica} never served {table} shard {shard} from the restarted shard: {seen}"
            )
    assert not client.unanswered, client.unanswered[:5]
    assert client.rows_found > 0, "the lookups never met a trained row"
    assert client.answered_after(killed_at) >= 20, "too few lookups after the kill to say serving held"
    assert_same_final_state(job, reference)


@pytest.mark.slow
def test_sigkill_of_the_launcher_kills_every_child_and_resume_ends_as_if_undisturbed(tmp_path, reference, s3):
    """The launcher, and with it every child, killed; `embps launch --resume` continues from the
    LATEST snapshot, here on the real S3 server (the restarts of the other kills read local disk)."""
    rng = random.Random(kill_seed())
    started = time.monotonic()
    job, log, proc, client = launch_with_replicas(tmp_path, s3.fresh_uri(), s3.config)
    resume_log = tmp_path / "resume.log"
    resumed = None
    children: set[int] = set()
    try:
        wait_until(lambda: replicas_serving(job), proc, log, "serving replicas")
        client.start()
        before = kill_at_random_moment(job, proc, log, rng)
        children = descendants(proc.pid)
        kinds = {kind: children_of_kind(proc.pid, kind) for kind in NAMES}
        assert [len(kinds[k]) for k in NAMES] == [2, 2, 2], kinds
        client.pause()  # the replicas die with the launcher, by design
        # Stopped shards neither die nor answer: a worker blocked on one outlives the launcher
        # unless the launcher's death kills it (else it would wait for the PS deadline, 10 s).
        for pid in kinds["ps"]:
            os.kill(pid, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"killed the launcher (pid {proc.pid}); LATEST snapshot was {before}")
        assert_all_die([*kinds["worker"], *kinds["serving"]], within=5.0, what="workers and replicas")
        for pid in kinds["ps"]:
            os.kill(pid, signal.SIGCONT)  # the SIGTERM of their PDEATHSIG waited for this
        assert_all_die(children, within=10.0, what="children")

        resumed = start_launch(job, resume_log, "--resume")
        wait_until(lambda: replicas_serving(job), resumed, resume_log, "serving replicas of the resumed launch")
        resumed_at = time.monotonic()
        client.paused.clear()
        wait_until(lambda: job_done(job), resumed, resume_log, "the end of training", LAUNCH_TIMEOUT_S)
        client.stop()
        output = finish(resumed, resume_log)
    except BaseException:
        for launcher in (proc, resumed):
            if launcher is not None:
                kill_tree(launcher)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    finally:
        client.stop()
    print(f"run with a launcher kill and a resume: {time.monotonic() - started:.0f} s")
    assert resumed.returncode == 0, output[-4000:]
    match = re.search(r"resuming job 'killed' from snapshot step (\d+)", output)
    assert match, output[-4000:]
    step = int(match.group(1))
    assert before <= step < STEPS
    summary = json.loads((job.out / "summary.json").read_text())
    assert summary["resumed_from"] == step and summary["steps"] == STEPS
    assert {m.kind for m in list_snapshots(job.uri, job.name, job.storage)} == {"full", "incremental"}
    assert not client.unanswered, client.unanswered[:5]
    assert client.rows_found > 0, "the lookups never met a trained row"
    assert client.answered_after(resumed_at) >= 20
    assert_same_final_state(job, reference)

