"""Training snapshots: rank 0 coordinates, every shard writes its tables, rank 0 commits.

    all ranks:  reader positions --all_gather_object--> rank 0
    rank 0:     StageSnapshot(step) to every shard (parallel): each copies its tables -> {staged}
    all ranks:  barrier once every shard staged, so no push of the next step reaches a shard
                before it copied its tables; training goes on
    rank 0, on the round's thread, while training goes on: the shards write their copies
                -> their file records
                + extra/dense.pt (model and dense optimizer state_dicts, serialised at the step)
                + extra/trainer_state.json (step, every rank's reader position, torch RNG state)
                -> manifest.json (commit point) -> LATEST -> gc

A shard copies only what fits its snapshot.staging_bytes; a table past it is written before the
shard answers `staged`, training waiting, as every table was before staging. The next round waits
for the one before to end (within its own round_timeout_s), and so does the job's end (finish()).

A failed round (storage or a shard unavailable, a deadline passed) never fails the job. Until every
shard staged it (training waits), rank 0 tries it again after snapshot.retry_backoff_s (doubling),
up to snapshot.retries times within snapshot.round_timeout_s; once they have, training has moved
on and the tables cannot be taken again at the round's step: a shard's failure to write its copies
ends the round, and rank 0 tries only its own part again (the extras and the commit). A round
that ends so is skipped with a warning and counted (`SnapshotRounds`, in the summary). The next
round builds on the last committed snapshot, and each shard folds the changes of the skipped round
into it (ps/snapshot/ops.py ShardSnapshotter), so nothing is lost. A shard still writing the files
of an earlier round (given up past its round_timeout_s: its storage hangs) refuses a round of
another step at once: that round is skipped then, without a retry, and training is not held for it.

Resume (`embps launch --resume`): the shards load the step's tables before serving, each worker
loads the dense model, optimizer and its reader position, and training continues at step + 1.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import grpc
import pyarrow as pa
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter
from torch import nn

from ps import wire
from ps.errors import EmbpsError
from ps.job_config import SnapshotConfig
from ps.rpc import snapshot_pb2, snapshot_pb2_grpc
from ps.security import Role, SecurityConfig, open_channel
from ps.snapshot.files import SnapshotWriter, read_extra, read_manifest
from ps.snapshot.manifest import ShardRecord, SnapshotError
from ps.snapshot.ops import collect_garbage
from ps.snapshot.storage import StorageDeniedError
from worker.resume_check import DENSE, TRAINER_STATE, check_dense_optimizer, check_dense_state
from worker.train_config import TrainingJob

log = logging.getLogger("embps.worker")

# How long past round_timeout_s rank 0 waits for a try still in a storage call before it gives up.
STORAGE_GRACE_S = 10.0
# What a retry may cure: a shard or the storage unavailable, a deadline passed.
_TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


class SnapshotRounds:
    """Rounds of this job's snapshots so far, as Prometheus counters of their own registry (rank 0
    serves it on [train] metrics_port): committed, skipped after their tries, failed tries (of
    committed and skipped rounds alike), and the seconds rank 0's training waited for rounds (from
    a round's start until every shard staged it, or it ended: what a round costs training beyond
    the cores its writes take)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._committed = Counter("embps_snapshot_rounds_committed", "Snapshot rounds committed", registry=r)
        self._skipped = Counter(
            "embps_snapshot_rounds_skipped", "Snapshot rounds skipped after their tries (training went on)", registry=r
        )
        self._failed_tries = Counter(
            "embps_snapshot_tries_failed", "Tries of snapshot rounds that failed (then retried or skipped)", registry=r
        )
        self._waited = Counter(
            "embps_snapshot_training_wait_seconds", "Seconds rank 0's training waited for snapshot rounds", registry=r
        )

    def commit(self) -> None:
        self._committed.inc()

    def skip(self) -> None:
        self._skipped.inc()

    def fail_try(self) -> None:
        self._failed_tries.inc()

    def waited(self, seconds: float) -> None:
        self._waited.inc(seconds)

    def _count(self, name: str) -> int:
        return int(self.registry.get_sample_value(f"{name}_total") or 0)

    @property
    def committed(self) -> int:
        return self._count("embps_snapshot_rounds_committed")

    @property
    def skipped(self) -> int:
        return self._count("embps_snapshot_rounds_skipped")

    @property
    def failed_tries(self) -> int:
        return self._count("embps_snapshot_tries_failed")

    @property
    def training_waited_s(self) -> float:
        return float(self.registry.get_sample_value("embps_snapshot_training_wait_seconds_total") or 0.0)

    def as_dict(self) -> dict:
        return {
            "committed": self.committed,
            "skipped": self.skipped,
            "failed_tries": self.failed_tries,
            "training_waited_s": self.training_waited_s,
        }


@dataclass(frozen=True)
class _RoundPlan:
    """What every try of one round writes: taken on the training thread before the tries start."""

    step: int
    parent: int | None  # None: a full snapshot
    last_committed: int | None
    dense: bytes  # extra/dense.pt
    trainer_state: bytes  # extra/trainer_state.json


@dataclass
class _RoundOutcome:
    """What the round's thread and the training thread tell each other, under `lock`: whether the
    tries are done and committed, and whether the round was given up before they were. `released`
    is set once training may go on: every shard staged the round, or its tries are done."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)
    staged: bool = False  # every shard copied its tables: the round's step cannot be taken again
    done: bool = False
    committed: bool = False
    abandoned: bool = False
    error: BaseException | None = None  # what the tries raised past their own handling (a bug)

    def on_staged(self) -> None:
        with self.lock:
            self.staged = True
        self.released.set()


@dataclass
class _Tries:
    """One round's tries, on the round's thread: what they have done so far."""

    plan: _RoundPlan
    deadline: float
    outcome: _RoundOutcome
    records: list[ShardRecord] = field(default_factory=list)  # every shard's, once they wrote their files
    reached_commit: bool = False  # a try that failed past this point may have committed all the same


class _RoundFailed(Exception):
    """One try of a round failed; `transient` when another try may succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class _ShardStillWriting(Exception):
    """A shard refused the round at once: its files of an earlier step (`step`), whose round was
    given up or ended without them, are still being written (ps.errors.SnapshotWriteRunningError).
    The round is skipped without a retry: its storage hangs, and training is not held for it."""

    def __init__(self, shard: str, step: int, details: str) -> None:
        super().__init__(details)
        self.shard = shard
        self.step = step


class Checkpointer:
    """Takes the job's snapshots (a no-op without a [snapshot] section). Collective: every rank
    calls maybe_save at every step."""

    def __init__(self, job: TrainingJob, rank: int, world_size: int, resumed_step: int | None = None) -> None:
        self.job = job
        self.config: SnapshotConfig | None = job.ps.snapshot
        self.rank = rank
        self.world_size = world_size
        self._last_step = resumed_step
        self._count = 0
        # The next round is full: one that built on a snapshot failed past retrying (its parent
        # unusable: gone or damaged since). Each later incremental built on it too and failed alike,
        # and rounds are full by count of committed ones: the job took no snapshot again.
        self._full_next = False
        self.rounds = SnapshotRounds()
        # (step, its tries, their outcome) of the last round started: its files may still be written
        self._previous: tuple[int, threading.Thread, _RoundOutcome] | None = None

    def due(self, step: int) -> bool:
        if self.config is None:
            return False
        every = self.config.every_steps
        return step == self.job.train.steps or (every > 0 and step % every == 0)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, position: dict) -> None:
        """Takes snapshot `step`; collective. Returns once every shard has staged it (copied its
        tables as of `step`): rank 0 writes and commits the rest while training goes on (finish()
        waits for it). position: this rank's reader state after the batch of `step`
        (BatchReader.state())."""
        positions = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(positions, position)
        else:
            positions[0] = position
        if self.rank == 0:
            started = time.monotonic()
            try:
                self._start_round(step, model, optimizer, positions)
            finally:
                self.rounds.waited(time.monotonic() - started)
        if self.world_size > 1:
            dist.barrier()

    def _start_round(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, positions: list) -> None:
        """Rank 0: starts round `step` and returns once training may go on: every shard staged it,
        or the round ended (committed, or skipped with a warning), or it was given up.

        The tries run on a thread of their own, waited for here until round_timeout_s (and a grace
        of STORAGE_GRACE_S) has passed: the shards' part has the round's deadline, but rank 0's own
        storage calls (the dense model, the manifest, LATEST, gc) have none on local disk (a hung
        NFS mount) and one of request_timeout x max_attempts each on S3, and a try blocked in them
        held training past the timeout, forever or until the other ranks' barrier gave up and
        failed the job. A round staged, or given up, goes on on its thread: it has taken its tables
        at `step` (the dense model was serialised here, before training went on), moves LATEST only
        forward, and a round given up that commits later says so (a line, and the committed count);
        the next round waits for it within its own round_timeout_s, and is skipped if it still runs
        then, else builds on it if it committed (its shards forget what it carried, as after any
        committed round)."""
        config = self.config
        deadline = time.monotonic() + config.round_timeout_s
        if not self._wait_for_previous(max(0.0, deadline - time.monotonic())):
            log.warning(
                "snapshot step %d: SKIPPED: the round of step %d still runs (its files or commit past its "
                "round_timeout_s); training goes on", step, self._previous[0],
            )
            self.rounds.skip()
            return
        blob = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, blob)
        state = {
            "step": step,
            "world_size": self.world_size,
            "readers": positions,
            "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }
        full = self._last_step is None or self._full_next or self._count % config.full_every == 0
        plan = _RoundPlan(
            step=step,
            parent=None if full else self._last_step,
            last_committed=self._last_step,
            dense=blob.getvalue(),
            trainer_state=json.dumps(state).encode(),
        )
        outcome = _RoundOutcome()
        tries = threading.Thread(
            target=self._tries, args=(plan, deadline, outcome), name=f"snapshot-{step}", daemon=True
        )
        tries.start()
        self._previous = (step, tries, outcome)
        outcome.released.wait(max(0.0, deadline - time.monotonic()) + STORAGE_GRACE_S)
        with outcome.lock:
            outcome.abandoned = not (outcome.done or outcome.staged)
        if outcome.error is not None:
            raise outcome.error
        if outcome.abandoned:
            after = "is full" if self._last_step is None else f"builds on step {self._last_step}"
            log.warning(
                "snapshot step %d: SKIPPED: its shards have not staged it after round_timeout_s (%g s); training "
                "goes on, the next round %s", step, config.round_timeout_s, after,
            )
            self.rounds.skip()

    def _wait_for_previous(self, timeout: float) -> bool:
        """Waits (at most `timeout` s) for the last round started to end; False if it still runs.
        A round that ended committed is what the next incremental builds on."""
        previous = self._previous
        if previous is None:
            return True
        step, tries, outcome = previous
        tries.join(timeout)
        if tries.is_alive():
            return False
        self._previous = None
        if outcome.error is not None:
            raise outcome.error
        if outcome.committed:
            self._last_step = step
            self._count += 1
            self._full_next = False
        return True

    def finish(self) -> None:
        """Rank 0, once training ended (or to see a round's outcome): waits (at most
        round_timeout_s) for the last round to write its files and commit, so that the process's
        exit does not cut it short."""
        if self.config is None or self._previous is None:
            return
        step = self._previous[0]
        if not self._wait_for_previous(self.config.round_timeout_s):
            log.warning("snapshot step %d: its round still runs as the job ends; it is left unfinished", step)

    def _tries(self, plan: _RoundPlan, deadline: float, outcome: _RoundOutcome) -> None:
        """The tries of round plan.step (on the round's thread), then outcome.done, and the round
        counted (committed or skipped) unless it was given up: that one was counted skipped, and
        a try that commits after it is logged and counted here."""
        try:
            committed = self._try_round(plan, deadline, outcome)
        except BaseException as exc:  # a bug, not storage: raised again on the training thread, as before the thread
            with outcome.lock:
                outcome.done, outcome.error = True, exc
                late = outcome.abandoned or outcome.staged
            outcome.released.set()
            if late:
                log.error("snapshot step %d: its round failed after training went on", plan.step, exc_info=exc)
            return
        with outcome.lock:
            outcome.done, outcome.committed = True, committed
            late = outcome.abandoned
        outcome.released.set()
        if late and committed:
            log.warning(
                "snapshot step %d: committed late, after its round was reported SKIPPED; LATEST names it", plan.step
            )
        if committed:
            self.rounds.commit()
        elif not late:
            self.rounds.skip()

    def _try_round(self, plan: _RoundPlan, deadline: float, outcome: _RoundOutcome) -> bool:
        """Tries round plan.step until one try commits (True) or it gives up (False, logged). Once
        every shard staged it, a try only writes rank 0's part again (the shards' records in hand),
        and a shard's failure ends the round: its tables cannot be taken at plan.step again."""
        config = self.config
        backoff = config.retry_backoff_s
        tries = _Tries(plan, deadline, outcome)
        for attempt in range(config.retries + 1):
            try:
                if attempt and tries.reached_commit and self._is_committed(plan.step):
                    break
                self._write(tries)
                break
            except _ShardStillWriting as exc:
                self.rounds.fail_try()
                log.warning(
                    "snapshot step %d: SKIPPED: shard %s is still writing its files of step %d and refused it at "
                    "once (%s); training goes on, the next round %s",
                    plan.step, exc.shard, exc.step, exc, self._next_round(plan),
                )
                return False
            except _RoundFailed as exc:
                self.rounds.fail_try()
                left = deadline - time.monotonic()
                # A shard failed to write what it staged: training went on, the step cannot be taken again.
                lost_stage = outcome.staged and not tries.records
                if lost_stage or not exc.transient or attempt == config.retries or left <= backoff:
                    if not exc.transient and plan.parent is not None:
                        self._full_next = True
                    log.warning(
                        "snapshot step %d: SKIPPED after %d tr%s (%s); training goes on, the next round %s",
                        plan.step, attempt + 1, "y" if attempt == 0 else "ies", exc, self._next_round(plan),
                    )
                    return False
                log.warning(
                    "snapshot step %d: try %d failed (%s); again in %.1f s", plan.step, attempt + 1, exc, backoff
                )
                time.sleep(backoff)
                backoff *= 2
        return True

    def _next_round(self, plan: _RoundPlan) -> str:
        """What the round after a skipped plan.step builds on, for its warning."""
        if plan.last_committed is None or self._full_next:
            return "is full"
        return f"builds on step {plan.last_committed}"

    def _is_committed(self, step: int) -> bool:
        """Whether a try that got as far as the commit committed `step`; _RoundFailed (transient)
        when storage cannot tell: taken for "no", the round was written again, which the shards
        refuse for a committed step, and a committed round was reported SKIPPED (a review's repro:
        S3 down between the manifest and LATEST)."""
        try:
            read_manifest(self.config.uri, self.job.ps.job, step, self.config.storage)
        except SnapshotError:  # no manifest, or one that does not parse: not committed
            return False
        except (OSError, pa.ArrowException) as exc:
            raise _RoundFailed(f"cannot tell whether step {step} committed: {exc}", transient=True) from exc
        return True

    def _write(self, tries: _Tries) -> None:
        """One try of round tries.plan.step; _RoundFailed when it fails."""
        try:
            self._write_once(tries)
        except grpc.RpcError as exc:
            raise _RoundFailed(f"{exc.code().name}: {exc.details()}", exc.code() in _TRANSIENT_CODES) from exc
        except StorageDeniedError as exc:  # credentials or a bucket to fix: no later try would do better
            raise _RoundFailed(str(exc), transient=False) from exc
        except (OSError, pa.ArrowException) as exc:  # storage, StorageUnavailableError included
            raise _RoundFailed(str(exc), transient=True) from exc
        except EmbpsError as exc:
            raise _RoundFailed(str(exc), transient=False) from exc

    def _write_once(self, tries: _Tries) -> None:
        """The shards' part (unless tries.records already holds it: filled here), then rank 0's."""
        config, plan, records = self.config, tries.plan, tries.records
        kind = "full" if plan.parent is None else "incremental"
        if not records:
            request = snapshot_pb2.WriteSnapshotRequest(
                uri=config.uri, job=self.job.ps.job, step=plan.step, kind=kind, num_shards=len(self.job.ps.shards)
            )
            if plan.parent is not None:
                request.parent = plan.parent
            if plan.last_committed is not None:
                request.last_committed = plan.last_committed  # the shards forget what that step's write carried
            records.extend(
                _stage_on_shards(
                    [s.addresses() for s in self.job.ps.shards],
                    self.job.ps.security,
                    request,
                    max(1.0, tries.deadline - time.monotonic()),
                    tries.outcome.on_staged,
                )
            )
        writer = SnapshotWriter(
            config.uri,
            self.job.ps.job,
            plan.step,
            kind,
            plan.parent,
            num_shards=len(self.job.ps.shards),
            tables=self.job.ps.tables,
            storage_config=config.storage,
        )
        for record in records:
            writer.add_shard_record(record)
        writer.write_extra(DENSE, plan.dense)
        writer.write_extra(TRAINER_STATE, plan.trainer_state)
        tries.reached_commit = True
        writer.commit()
        if config.keep:
            try:
                collect_garbage(config.uri, self.job.ps.job, config.keep, config.storage)
            except (OSError, pa.ArrowException, EmbpsError) as exc:
                log.warning("snapshot step %d: committed, but removing old snapshots failed (%s)", plan.step, exc)


def _stage_on_shards(
    addresses: list[list[str]],
    security: SecurityConfig,
    request: snapshot_pb2.WriteSnapshotRequest,
    timeout: float,
    on_staged: Callable[[], None],
) -> list[ShardRecord]:
    """Each shard stages its part (StageSnapshot), then writes it; on_staged() once every shard
    has staged (on one of the calls' threads); returns every shard's records. addresses[s]: shard
    s's primary, then its standby (asked when the other answers UNAVAILABLE before staging: it may
    have taken over). When one shard fails, the others' calls are cancelled (a shard that staged
    writes its files all the same: its next StageSnapshot of that step waits for them, one of
    another step is refused while they are written, raised here as _ShardStillWriting). `timeout` bounds
    them all: a standby asked after its primary answered late gets what is left (with a timeout of
    its own, it could stage the round after rank 0 had given it up and training had gone on)."""
    deadline = time.monotonic() + timeout
    lock = threading.Lock()
    left = [len(addresses)]
    calls: list = []  # the streams, to cancel
    ending = threading.Event()

    def staged() -> None:
        with lock:
            left[0] -= 1
            everyone = left[0] == 0
        if everyone:
            on_staged()

    def stage(address: str, done_staging: list[bool]) -> list[ShardRecord]:
        with open_channel(address, security, Role.TRAINER) as channel:
            stub = snapshot_pb2_grpc.SnapshotControlStub(channel)
            stream = stub.StageSnapshot(request, timeout=max(0.0, deadline - time.monotonic()))
            with lock:
                calls.append(stream)
            if ending.is_set():
                stream.cancel()
            try:
                first = next(stream, None)
            except grpc.RpcError as err:
                writing = _writing_step(err)
                if writing is not None:
                    raise _ShardStillWriting(address, writing, err.details()) from err
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                # A shard of a release before StageSnapshot: the round waits for its files.
                reply = stub.WriteSnapshot(request, timeout=max(0.0, deadline - time.monotonic()))
                done_staging[0] = True
                staged()
                return [ShardRecord.from_dict(d) for d in json.loads(reply.records_json)]
            if first is None or not first.staged:
                raise EmbpsError(f"shard {address} did not answer StageSnapshot with `staged` first")
            done_staging[0] = True
            staged()
            written = next(stream, None)
            if written is None:
                raise EmbpsError(f"shard {address} ended StageSnapshot without its records")
            return [ShardRecord.from_dict(d) for d in json.loads(written.records_json)]

    def call(pair: list[str]) -> list[ShardRecord]:
        for address in pair[:-1]:
            done_staging = [False]
            try:
                return stage(address, done_staging)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or done_staging[0]:
                    raise
        return stage(pair[-1], [False])

    with ThreadPoolExecutor(len(addresses)) as pool:
        futures = [pool.submit(call, pair) for pair in addresses]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
        if failed:  # the first failure, not the cancellations it causes
            ending.set()
            with lock:
                for stream in calls:
                    stream.cancel()
            wait(futures)
            raise failed[0]
        return [r for f in futures for r in f.result()]


def _writing_step(err: grpc.RpcError) -> int | None:
    """The step a shard still writes, when `err` is its refusal of a round for it
    (FAILED_PRECONDITION with wire.WRITING_STEP_METADATA_KEY); None for any other error."""
    if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    for key, value in err.trailing_metadata() or ():
        if key == wire.WRITING_STEP_METADATA_KEY:
            return int(value)
    return None


def load_trainer_state(
    job: TrainingJob, step: int, rank: int, world_size: int, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Loads snapshot `step`'s dense model and optimizer into place; returns this rank's reader
    position (as saved by the same rank) and the step."""
    config = job.ps.snapshot
    if config is None:
        raise ValueError("snapshot: resuming needs a [snapshot] section")
    state = json.loads(read_extra(config.uri, job.ps.job, step, TRAINER_STATE, config.storage))
    if state["world_size"] != world_size:
        raise ValueError(
            f"train.workers: snapshot {step} was taken with {state['world_size']} workers, this run has {world_size}"
        )
    dense = torch.load(io.BytesIO(read_extra(config.uri, job.ps.job, step, DENSE, config.storage)))
    check_dense_state(job, step, dense["model"])
    try:
        model.load_state_dict(dense["model"])
    except RuntimeError as exc:  # a tower check_dense_state let through: torch's traceback named no field
        raise ValueError(f"model: snapshot step {step}'s dense tower does not fit the job's [model]: {exc}") from None
    check_dense_optimizer(job, step, dense["optimizer"])
    optimizer.load_state_dict(dense["optimizer"])
    # load_state_dict takes the saved groups' hyperparameters too: a run resumed with another
    # train.dense_lr (lowered, as one does) trained on at the snapshot's without a word.
    saved = {group["lr"] for group in optimizer.param_groups}
    if saved != {job.train.dense_lr}:
        log.warning("train.dense_lr: %g in the job, %s in snapshot step %d; the dense optimizer goes on at the "
                    "job's (its moments and accumulators from the snapshot)", job.train.dense_lr,
                    ", ".join(f"{lr:g}" for lr in sorted(saved)), step)
        for group in optimizer.param_groups:
            group["lr"] = job.train.dense_lr
    rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return {"step": state["step"], "reader": state["readers"][rank]}
