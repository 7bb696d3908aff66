"""`embps launch job.toml`: a whole training job on this machine (or this node of a cluster).

    launcher ─┬─ PS shard 0..S-1      python -m embps ps --config job.toml --shard i   (node 0)
              ├─ serving replica i    python -m embps serve --config <out>/serving/replica-i.toml
              └─ elastic agent ─ worker rank 0..W-1  python -m worker.worker_main --config job.toml

On several nodes every node runs `embps launch job.toml --nnodes N --node-rank R --rdzv-endpoint
HOST:PORT`, where HOST is node 0's address: node 0 hosts the c10d store, every node joins the
rendezvous under the job's name, and each node starts train.workers processes (W = N x workers).
Workers find the PS shards at the addresses of the job file, so they may be DNS names; with
`--no-ps` a node starts no shards (they run elsewhere, e.g. on Kubernetes).

Workers start through torch.distributed's elastic launcher (c10d rendezvous, the machinery of
torchrun), never a hand-made rendezvous. The launcher shows a progress bar fed by rank 0's
progress lines, writes the summary, and on Ctrl-C or SIGTERM stops every child and exits
non-zero. Every child dies with the launcher, even when the launcher is killed with SIGKILL
(PDEATHSIG); `embps launch --resume` then continues from the LATEST snapshot.

Restarts ([launch] max_restarts, or --max-restarts): when a worker or a PS shard dies, the
launcher stops every worker and every shard and starts them all again from the LATEST complete
snapshot (from the start when there is none yet), up to max_restarts times; past that, or with
max_restarts = 0, the job fails naming the component. All shards restart, not only the dead one:
a live shard holds the pushes of the steps after the snapshot, and the workers push those steps
again, so keeping it would apply them twice. Restarting everything from one snapshot keeps the
exact-resume property: the job ends with the weights of a run that was never disturbed. Only
complete snapshots count (ps/snapshot/files.py `latest` trusts a manifest, never a half-written step),
and the step is read after every worker is stopped, so no snapshot can be committed meanwhile.
Torch elastic's own restarts stay off (max_restarts=0 there): it would restart the workers alone.
Serving replicas are restarted alone (see worker/serving_fleet.py).

Standbys ([[shards]] standby): the launcher starts each shard's standby beside its primary (from
the same snapshot step). When one process of a pair dies the other goes on (the standby takes over
through the arbiter, or the primary goes on alone): a line says so, nothing restarts, and a new
standby starts in the dead one's place (it copies the primary's state, then is synchronous again);
only a shard that lost both processes ends the attempt.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ps.job_config import parse_address
from ps.process import children
from ps.process.python_command import python_module
from ps.shard.server import SERVICE_NAME
from ps.shard.startup import EXIT_CONFIG_REFUSED, EXIT_SNAPSHOT_UNUSABLE
from ps.snapshot.storage import StorageError
from worker import processes
from worker.data_paths import check_held_out, expand_paths
from worker.launch_config import check_max_restarts, load_launch_settings
from worker.serving_fleet import ServingFleet
from worker.train_config import DataSource, TrainingJob, load_training_job


@dataclass(frozen=True)
class LaunchOptions:
    config_path: str
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the c10d store; None: standalone on this node
    run_id: str | None = None
    start_ps: bool | None = None  # None: node 0 starts the shards
    resume: bool = False  # continue from the job's LATEST snapshot
    # Address the other nodes reach this node at (its workers' MASTER_ADDR when it is rank 0 of
    # the rendezvous); None: torch's default, this host's fully qualified name.
    local_addr: str | None = None
    max_restarts: int | None = None  # None: the job's [launch] max_restarts

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes: must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank: must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("--rdzv-endpoint: a job on several nodes needs node 0's host:port for the rendezvous")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not _is_host(host) or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"--rdzv-endpoint: must be node 0's 'host:port' with a port in [1, 65535] and a host name "
                    f"(letters, digits, '.', '-', '_'), an IPv4 address or an [IPv6] one, got {self.rdzv_endpoint!r}"
                )
        if self.local_addr is not None and not _is_host(self.local_addr):
            raise ValueError(
                f"--local-addr: must be a host name (letters, digits, '.', '-', '_') or an IP address, "
                f"got {self.local_addr!r}"
            )
        if self.max_restarts is not None:
            check_max_restarts("--max-restarts", self.max_restarts)


def _is_host(host: str) -> bool:
    """Whether torch's rendezvous takes `host` (its rule: parse_rendezvous_endpoint), checked here so
    that a bad flag fails before the launch touches train.output_dir."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return bool(re.fullmatch(r"[\w.:-]+", host, flags=re.ASCII))


# A shard's start fails when this long passes without progress (its log grows as it restores).
START_STALL_S = 90.0


class _ComponentDied(Exception):
    """Raised in the main thread (by the SIGUSR1 handler) to stop the workers of this attempt."""


class _Failures:
    """What failed, reported from watcher threads to the main thread.

    A watcher records the cause, then sends SIGUSR1 to this process; the handler raises
    _ComponentDied in the main thread only while it is `armed`, that is inside the elastic agent's
    run, which then stops the workers. Outside that window the main thread reads `cause` itself
    (it arms first and reads after, so no report falls between the two)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cause: str | None = None  # the first death of this attempt (retried within max_restarts)
        self.fatal: str | None = None  # a failure no restart helps with (a replica out of restarts)
        self.armed = False  # written by the main thread only (the handler runs there too)

    def report(self, message: str, fatal: bool = False) -> None:
        """From a watcher thread: records the failure and interrupts the main thread."""
        self.record(message, fatal)
        os.kill(os.getpid(), signal.SIGUSR1)

    def record(self, message: str, fatal: bool = False) -> None:
        """Records the failure (the main thread's own: nothing to interrupt)."""
        with self._lock:
            if fatal and self.fatal is None:
                self.fatal = message
            elif not fatal and self.cause is None:
                self.cause = message

    def new_attempt(self) -> None:
        with self._lock:
            self.cause = None

    def first(self) -> str | None:
        with self._lock:
            return self.fatal or self.cause

    def on_signal(self, signum: int, frame: object) -> None:
        if self.armed:
            self.armed = False
            raise _ComponentDied()


_AGENT_MODULES = (
    "torch.distributed.elastic.multiprocessing.api",
    "torch.distributed.elastic.multiprocessing.errors",
    "torch.distributed.launcher.api",
)


class _AgentImport:
    """Imports torch's elastic agent (~2 s of CPU) on a thread of its own, while the main thread
    starts the shards and replicas, which need no torch; `wait` before the first use."""

    def __init__(self) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embps-import-agent", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for name in _AGENT_MODULES:
                importlib.import_module(name)
        except BaseException as exc:  # handed to the main thread by wait()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _signal_exception(exc: BaseException) -> signal.Signals | None:
    """The signal of torch elastic's SignalException (raised by its agent or by
    _raise_signal_exception), else None. Torch may not be imported yet, and then `exc` is not one."""
    api = sys.modules.get("torch.distributed.elastic.multiprocessing.api")
    if api is not None and isinstance(exc, api.SignalException):
        return exc.sigval
    return None


def _stopping(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or stop signal a _ComponentDied was raised over, if any: a child that dies while
    the launcher stops for a signal (torch's agent shutting the workers down) must not turn the
    stop into a component death, which a restart would answer."""
    context = exc.__context__
    while context is not None:
        if isinstance(context, KeyboardInterrupt) or _signal_exception(context) is not None:
            return context
        context = context.__context__
    return None


def _raise_signal_exception(signum: int, frame: object) -> None:
    """SIGTERM outside the elastic agent's run: unwind as the agent does, so children are stopped."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def launch(options: LaunchOptions) -> int:
    """Runs the job; 0 when it finished, 1 when it failed. Every check of the job file and the flags
    (ValueError naming the field or flag) comes before train.output_dir is touched, so a refused
    launch leaves the previous run's progress and summary as they were."""
    job = load_training_job(options.config_path)
    settings = load_launch_settings(options.config_path, job.ps.shards, job.train.metrics_port)
    max_restarts = settings.max_restarts if options.max_restarts is None else options.max_restarts
    start_ps = options.node_rank == 0 if options.start_ps is None else options.start_ps
    if max_restarts and (options.nnodes > 1 or not start_ps):
        source = "launch.max_restarts" if options.max_restarts is None else "--max-restarts"
        raise ValueError(
            f"{source}: restarts need one launcher that owns every worker and shard (a single-node "
            f"launch that starts the shards); got {max_restarts} with --nnodes {options.nnodes}"
            + ("" if start_ps else " and no shards on this node")
            + "; use --max-restarts 0 and the cluster's restart policy"
        )
    out = Path(job.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.output_dir: {str(out)!r} exists and is not a folder")
    if job.data.source != DataSource.SYNTHETIC:
        try:  # here, not in every rank once the shards run: a line before anything starts
            if job.data.eval_paths:
                check_held_out(job.data.paths, job.data.eval_paths, job.data.storage)
            else:
                expand_paths(job.data.paths, job.data.storage, "data.paths")
        except OSError as exc:  # a path missing or out of reach: its message names the field and the path
            raise ValueError(str(exc)) from None
    world_size = options.nnodes * job.train.workers
    _check_snapshot_folder(job)
    restore = _latest_step(job) if options.resume else None
    if restore is not None:
        _check_resume(job, restore, world_size)
    if not options.resume and start_ps:
        _refuse_an_earlier_run(job)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # it named a parent of the folder, and not the field
        raise ValueError(f"train.output_dir: cannot create {str(out)!r}: {exc.strerror}") from None
    progress_path = out / "progress.jsonl"
    progress_path.write_text("")
    (out / "summary.json").unlink(missing_ok=True)  # only this run's rank 0 may leave one
    failures = _Failures()
    signal.signal(signal.SIGUSR1, failures.on_signal)
    signal.signal(signal.SIGTERM, _raise_signal_exception)
    os.environ[children.LAUNCHER_PID_ENV] = str(os.getpid())
    stop_bar = threading.Event()
    fleet: ServingFleet | None = None
    failure: str | None = None
    restarts = 0
    finished: str | None = None  # the summary of a failed attempt whose rank 0 trained to the end
    agent = _AgentImport()
    bar: threading.Thread | None = None
    try:
        if restore is not None:
            tqdm.write(f"embps launch: resuming job {job.ps.job!r} from snapshot step {restore}")
            sys.stdout.flush()
        bar = threading.Thread(target=_show_progress, args=(progress_path, job, stop_bar), daemon=True)
        bar.start()
        if start_ps and settings.serving:
            fleet = ServingFleet(
                job, settings.serving, out, max_restarts, on_fatal=lambda message: failures.report(message, fatal=True)
            )
        while True:
            failures.new_attempt()
            failure = _run_attempt(job, options, start_ps, restore, progress_path, failures, fleet, agent)
            if failure is None or failures.fatal is not None:
                failure = failures.fatal or failure
                break
            if restarts >= max_restarts:
                if max_restarts:
                    failure += f"; no restarts left (max_restarts = {max_restarts})"
                break
            restarts += 1
            if (out / "summary.json").exists():  # a rank failed after rank 0 finished (its final eval, say)
                finished = (out / "summary.json").read_text()
            try:
                restore = _latest_or_none(job)
            except StorageError as exc:  # after pyarrow's own retries: the job cannot pick its step
                failure += f"; cannot restart: the snapshots are out of reach ({exc})"
                break
            origin = f"from snapshot step {restore}" if restore is not None else "from the start (no snapshot yet)"
            tqdm.write(f"embps launch: {failure}; restart {restarts}/{max_restarts} {origin}")
            sys.stdout.flush()
    except KeyboardInterrupt:
        failure = "interrupted (Ctrl-C)"
    except Exception as exc:
        if (signum := _signal_exception(exc)) is not None:
            failure = f"stopped by signal {signum.name}"
        elif isinstance(exc, RuntimeError):
            failure = str(exc)
        else:
            raise
    finally:
        stop_bar.set()
        if fleet is not None:
            fleet.stop()
        if bar is not None:
            bar.join(5)  # the bar closed (its line ended) before the last line is printed after it
    if failure is not None:
        print(f"embps launch: FAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    summary_path = out / "summary.json"
    if not summary_path.exists():
        print(f"embps launch: done: node {options.node_rank}'s workers finished; global rank 0 writes the summary")
        return 0
    summary = _run_summary(summary_path, finished)
    bad = summary.get("input_bad_rows") or 0
    if summary.get("samples") == 0:
        if summary.get("resumed_from") is not None and summary.get("resumed_from") == summary.get("steps"):
            print(f"embps launch: done: the job was at its last step already ({summary.get('steps')}): nothing left "
                  f"to train; summary in {summary_path}")
            return 0
        # A fresh run (or a resume before the last step) that trained nothing: its input held no
        # batch. It said "done: the job was at its last step already" and exited 0.
        parsed = summary.get("input_rows_parsed") or 0
        print(f"embps launch: FAILED: no step trained: data.paths gave no batch ({parsed:,} rows read, {bad:,} of "
              f"them bad); summary in {summary_path}", file=sys.stderr, flush=True)
        return 1
    auc = summary.get("eval_auc")
    skipped = summary.get("snapshots", {}).get("skipped", 0)
    print(
        f"embps launch: done: {summary.get('steps')} steps, {summary.get('samples_per_s', 0):,.0f} samples/s, "
        f"final loss {summary.get('final_loss', float('nan')):.4f}"
        + (f", eval AUC {auc:.4f}" if auc is not None else "")
        + (f", {skipped} snapshot round{'s' * (skipped > 1)} SKIPPED" if skipped else "")
        + (f", {bad:,} bad input row{'s' * (bad > 1)} skipped" if bad else "")
        + (f", after {restarts} restart{'s' * (restarts > 1)}" if restarts else "")
        + f"; summary in {summary_path}"
    )
    return 0


def _run_summary(path: Path, finished: str | None) -> dict:
    """The run's summary: the last attempt's (at `path`), unless it was a restart from the last
    step's snapshot with nothing left to train and an earlier attempt trained to the end (finished:
    its summary.json, written before a rank failed): that one, written back. The restart's own
    said "nothing left to train" with no loss or rate, over the run's real summary."""
    summary = json.loads(path.read_text())
    if finished is not None and summary.get("samples") == 0 and summary.get("resumed_from") == summary.get("steps"):
        earlier = json.loads(finished)
        if earlier.get("steps") == summary.get("steps") and earlier.get("samples"):
            path.write_text(finished)
            return earlier
    return summary


def _run_attempt(
    job: TrainingJob,
    options: LaunchOptions,
    start_ps: bool,
    restore: int | None,
    progress_path: Path,
    failures: _Failures,
    fleet: ServingFleet | None,
    agent: _AgentImport,
) -> str | None:
    """Starts the shards (restored from snapshot `restore`, or an older one where it is unusable),
    the serving replicas the first time, then the workers (resuming where the shards are); stops
    the shards again. Returns None when the workers finished, else what died or did not start
    (RuntimeError when a serving replica does not start)."""
    out = Path(job.train.output_dir)
    shards: list = []
    standbys: list = []
    stop_watch = threading.Event()
    # The watcher starts a new standby only holding this lock, and only while stop_watch is clear; the
    # stop below sets stop_watch holding it and then lists the processes to stop, so a new standby is
    # started before that list (and stopped with the rest) or not at all. Without it, one decided on
    # as the attempt stopped was left running, and a restart's start could find its port taken.
    starting = threading.Lock()
    try:
        if fleet is not None and not fleet.started:
            fleet.start()  # beside the shards: both take seconds to come up
        if start_ps:
            try:
                world_size = options.nnodes * job.train.workers
                (shards, standbys), restore = _start_restorable_shards(job, out, restore, world_size)
            except _ConfigRefused as exc:
                failures.record(f"{exc}; not restarted (the same start would fail the same way)", fatal=True)
                return str(exc)
            except _StartFailed as exc:
                return str(exc)
            threading.Thread(
                target=_watch_shards, args=(job, out, shards, standbys, failures, stop_watch, starting), daemon=True
            ).start()
        if fleet is not None and not fleet.watching:
            # The first attempt whose shards came up: an attempt whose shards did not returned
            # before this, and its replicas, started, were left unwatched for the whole job.
            fleet.wait()
        agent.wait()
        failed = _run_workers(job, options, progress_path, failures, restore)
    except _ComponentDied as exc:  # the handler fired just after the workers' run ended
        if (stop := _stopping(exc)) is not None:
            raise stop from None
        failed = failures.first()
    else:
        # Workers that fail on a dead shard's account may exit before the watcher's next look:
        # name the shard, the cause.
        dead = [(i, p) for i, p in enumerate(shards) if _pair_dead(p, standbys[i])]
        if failed is not None and dead and failures.cause is None:
            failed = _shard_exit(*dead[0])
    finally:
        with starting:
            stop_watch.set()
            stopping = [p for p in (*shards, *standbys) if p is not None]
        children.stop_all(stopping)
    return failed


def _latest_step(job: TrainingJob) -> int:
    """The step --resume starts from; ValueError naming the flag when there is none or the
    snapshots cannot be listed (one line, not a traceback)."""

    if job.ps.snapshot is None:
        raise ValueError("--resume: the job has no [snapshot] section, so there is nothing to resume from")
    try:
        step = _latest_or_none(job)
    except StorageError as exc:
        raise ValueError(f"--resume: cannot list the snapshots under {job.ps.snapshot.uri}: {exc}") from None
    if step is None:
        raise ValueError(f"--resume: no complete snapshot of job {job.ps.job!r} under {job.ps.snapshot.uri}")
    return step


def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to `endpoint` ("host:port", an IPv6 host in brackets) opens within 2 s."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
    except (OSError, ValueError):
        return False
    return True


def _check_resume(job: TrainingJob, step: int, world_size: int) -> None:
    """ValueError naming the field when the job, as its file says now, cannot go on from the step
    --resume restores (worker/resume_check.py: train.workers, train.dense_optimizer, a table's dim
    or capacity, [model], the data's widths, a snapshot without the trainer's files): found once the
    shards and workers had started, it failed every one of them, and every restart. A step whose
    extra files are unusable is one the start falls back from (_start_restorable_shards), so the
    check goes on to the step before it; a step whose table files are (found by the shards) is
    checked by that fallback, in _check_extras."""
    current: int | None = step
    try:
        while current is not None:
            try:
                _check_extras(job, current, world_size)
                return
            except _SnapshotUnusable:
                current = _latest_or_none(job, before=current)
    except (StorageError, _StartFailed) as exc:
        raise ValueError(f"--resume: cannot read snapshot step {current} under {job.ps.snapshot.uri}: {exc}") from None


def _check_snapshot_folder(job: TrainingJob) -> None:
    """ValueError naming snapshot.uri when a local one is not a folder and cannot become one (an
    existing file, or a path under one): every snapshot round then failed on "Not a directory" and
    was skipped with a warning, and the job ended 0 with no snapshot. A path that does not exist yet
    is fine (the first round makes it); remote storage has no such files."""
    from ps.snapshot.storage import file_in_the_way, open_uri

    if job.ps.snapshot is None:
        return
    uri = job.ps.snapshot.uri
    try:
        filesystem, root = open_uri(uri, job.ps.snapshot.storage)
    except StorageError as exc:
        raise ValueError(f"snapshot.uri: cannot open {uri}: {exc}") from None
    if (file := file_in_the_way(filesystem, root)) is None:
        return
    under = "" if file == os.path.abspath(root) else f": {file!r} is a file"
    raise ValueError(f"snapshot.uri: {uri!r} is not a folder{under}")


def _refuse_an_earlier_run(job: TrainingJob) -> None:
    """ValueError naming snapshot.uri when a fresh launch (no --resume) finds committed snapshots of
    its job there: a restart resumes from the job's newest step, which would be the earlier run's,
    and every snapshot round of this run would find its step committed already."""

    if job.ps.snapshot is None:
        return
    try:
        step = _latest_or_none(job)
    except StorageError as exc:
        raise ValueError(f"snapshot.uri: cannot list the snapshots under {job.ps.snapshot.uri}: {exc}") from None
    if step is not None:
        raise ValueError(
            f"snapshot.uri: {job.ps.snapshot.uri} already holds snapshots of job {job.ps.job!r} (newest step "
            f"{step}): pass --resume to go on from it, or give this run another job name or snapshot.uri"
        )


def _latest_or_none(job: TrainingJob, before: int | None = None) -> int | None:
    """The job's newest complete snapshot step (older than `before` when given); None without
    [snapshot] or when there is none."""
    from ps.snapshot.files import latest

    if job.ps.snapshot is None:
        return None
    return latest(job.ps.snapshot.uri, job.ps.job, job.ps.snapshot.storage, before=before)


class _StartFailed(Exception):
    """A shard did not come up (it exited, or its start stalled): a restartable failure."""


class _ConfigRefused(_StartFailed):
    """A shard's start was refused by the job's own config (it exited EXIT_CONFIG_REFUSED): a
    restart would fail the same way, so the job ends naming the reason."""


class _SnapshotUnusable(_StartFailed):
    """A shard could not restore its snapshot step (corrupt or incomplete): restarting from the
    same step cannot help, an older one may."""


def _start_restorable_shards(
    job: TrainingJob, out: Path, restore: int | None, world_size: int
) -> tuple[tuple[list, list], int | None]:
    """The shards started from snapshot `restore`, or from the newest complete snapshot before it
    when a shard finds it unusable (a warning each time); returns them and the step they hold.
    _StartFailed when they do not come up, or when no older snapshot is left; ValueError naming
    the field when the job cannot go on from the step (_check_extras)."""
    while True:
        try:
            _check_extras(job, restore, world_size)
            return _start_shards(job, out, restore), restore
        except _SnapshotUnusable as exc:
            retired = _retire(job, restore)
            try:
                older = _latest_or_none(job, before=restore)
            except StorageError as unreachable:  # a restart may find the storage back
                raise _StartFailed(
                    f"{exc}{retired}; cannot list the snapshots before step {restore}: {unreachable}"
                ) from None
            if older is None:
                raise _StartFailed(
                    f"{exc}{retired}; no complete snapshot before step {restore} to fall back to"
                ) from None
            tqdm.write(
                f"embps launch: WARNING: {exc}{retired}; falling back to the previous complete snapshot, step {older}"
            )
            sys.stdout.flush()
            restore = older


def _check_extras(job: TrainingJob, step: int | None, world_size: int) -> None:
    """_SnapshotUnusable when an extra file of `step` (dense tower, trainer state: read by the
    workers, never by the shards) is corrupt or missing: found after the shards restored, it
    failed every worker at each restart, and the job never fell back. ValueError naming the field
    when the job run by `world_size` workers cannot go on from the step (worker/resume_check.py):
    a config to fix, which neither a restart nor an older snapshot mends, nor retiring this one."""
    from ps.snapshot.files import open_snapshot
    from ps.snapshot.manifest import SnapshotError
    from worker.resume_check import check_resumable

    if step is None or job.ps.snapshot is None:
        return
    try:
        snapshot = open_snapshot(job.ps.snapshot.uri, job.ps.job, step, job.ps.snapshot.storage)
        extras = {name: snapshot.read_extra(name) for name in sorted(snapshot.manifest.extra)}
        check_resumable(job, snapshot, extras, world_size)
    except SnapshotError as exc:
        raise _SnapshotUnusable(f"snapshot step {step} cannot be resumed: {exc}") from None
    except StorageError as exc:  # storage out of reach: a restart may find it back
        raise _StartFailed(f"snapshot step {step}: cannot read its extra files: {exc}") from None


def _retire(job: TrainingJob, step: int | None) -> str:
    """Takes an unusable snapshot step out of use (ps/snapshot/files.py retire); returns what the
    warning adds: where its manifest went, or why it stayed."""
    from ps.snapshot.files import retire
    from ps.snapshot.manifest import SnapshotError

    if step is None or job.ps.snapshot is None:
        return ""
    try:
        return f" (its manifest moved to {retire(job.ps.snapshot.uri, job.ps.job, step, job.ps.snapshot.storage)})"
    except (SnapshotError, StorageError, ValueError) as exc:
        return f" (left in place: {exc})"


def _start_shards(job: TrainingJob, out: Path, restore_step: int | None) -> tuple[list, list]:
    """Starts every shard (and its standby, if any) and waits until each serves: as long as its
    restore makes progress (its log grows), up to START_STALL_S without any. _StartFailed
    (_SnapshotUnusable) otherwise. Returns the primaries and the standbys (None: none), by shard."""
    config_path = job.path
    _check_shard_ports_free(job)
    logs = [out / "logs" / f"ps-{index}.log" for index in range(len(job.ps.shards))]
    standby_logs = [out / "logs" / f"ps-{index}-standby.log" for index in range(len(job.ps.shards))]
    shards = [processes.start_shard(config_path, i, log, restore_step) for i, log in enumerate(logs)]
    standbys = [
        processes.start_shard(config_path, i, standby_logs[i], restore_step, "standby") if shard.standby else None
        for i, shard in enumerate(job.ps.shards)
    ]
    waits = [(i, shards[i], shard.address, logs[i], "") for i, shard in enumerate(job.ps.shards)]
    waits += [
        (i, standbys[i], shard.standby, standby_logs[i], " standby")
        for i, shard in enumerate(job.ps.shards)
        if shard.standby
    ]
    started = [*shards, *(p for p in standbys if p is not None)]
    try:
        _wait_started(job, restore_step, waits, started)
    except BaseException:
        # A signal (SIGTERM, Ctrl-C) while they start: the caller holds no handle on them yet.
        children.stop_all(started)
        raise
    return shards, standbys


def _check_shard_ports_free(job: TrainingJob) -> None:
    """_StartFailed naming the field when a shard's address (or its standby's) is a port another
    process listens on: that process's health answer was taken for the shard's, while the shard
    itself failed to bind, and the workers started against it (another job's shard, say)."""
    for index, shard in enumerate(job.ps.shards):
        for field, address in (("address", shard.address), ("standby", shard.standby)):
            if not address:
                continue
            host, port = parse_address(f"shards[{index}].{field}", address)
            try:
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                    # As the shard's server binds: connections of a shard stopped a moment ago, in
                    # TIME_WAIT, do not hold the port; a process listening there does.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise _StartFailed(
                        f"shards[{index}].{field}: {address} is taken by another process; the shard cannot serve there"
                    ) from None  # any other error (not this host's address): the shard's own start says it


def _wait_started(job: TrainingJob, restore_step: int | None, waits: list, started: list) -> None:
    """Waits for each (index, proc, address, log, role) of `waits` to serve; _StartFailed
    (_SnapshotUnusable) when one does not, every process of `started` stopped first."""
    for index, proc, address, log, role in waits:
        try:
            children.wait_serving(
                address,
                proc,
                f"ps shard {index}{role}",
                START_STALL_S,
                security=job.ps.security,
                service=SERVICE_NAME,
                progress=lambda log=log: log.stat().st_size,
            )
        except (RuntimeError, TimeoutError) as exc:
            children.stop_all(started)
            if proc.returncode == EXIT_SNAPSHOT_UNUSABLE:
                raise _SnapshotUnusable(
                    f"ps shard {index}{role} cannot restore snapshot step {restore_step} (see {log})"
                ) from None
            if proc.returncode == EXIT_CONFIG_REFUSED:
                raise _ConfigRefused(
                    f"ps shard {index}{role} exited ({children.describe_exit(proc.returncode)}): "
                    f"{_last_error(log) or 'its config refused its start'} (see {log})"
                ) from None
            raise _StartFailed(f"{exc} (see {log})") from None


def _last_error(log: Path) -> str | None:
    """The message of the last ERROR line of a shard's log (its reason for exiting), or None."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        _, found, message = line.partition(" ERROR ")
        if found:
            return message.strip()
    return None


def _pair_dead(primary, standby) -> bool:
    """Whether a shard lost every process of it (its primary, and its standby if it has one)."""
    return (primary is None or primary.poll() is not None) and (standby is None or standby.poll() is not None)


# New standbys the launcher starts for one shard in one attempt; past them the pair stays one process.
MAX_NEW_STANDBYS = 3


def _watch_shards(
    job: TrainingJob,
    out: Path,
    shards: list,
    standbys: list,
    failures: _Failures,
    stop: threading.Event,
    starting: threading.Lock,
) -> None:
    """A shard that lost every process during training ends the attempt: report it, which stops the
    workers. When one process of a pair exits the other goes on (ps/shard/replication.py): the
    launcher says so and starts a new standby in its place (`embps ps --standby`), which copies the
    primary's state and catches up; shards[i] and standbys[i] are updated in place, holding
    `starting`, and only while `stop` is clear (the attempt's stop sets it holding `starting`)."""
    started = [0] * len(shards)
    while not stop.wait(0.2):
        for index in range(len(shards)):
            if stop.is_set():
                return
            if _pair_dead(shards[index], standbys[index]):
                failures.report(_shard_exit(index, shards[index]))
                return
            for slot, members, what in (
                ("primary", shards, "the other process of the pair takes over"),
                ("standby", standbys, "the primary goes on alone once the arbiter records it"),
            ):
                member = members[index]
                if member is None or member.poll() is None:
                    continue
                line = (
                    f"embps launch: ps shard {index} {slot} (pid {member.pid}) exited "
                    f"({children.describe_exit(member.returncode)}); {what}"
                )
                with starting:
                    if stop.is_set():  # the attempt stops its shards (the exit may be its own doing)
                        return
                    if started[index] < MAX_NEW_STANDBYS:
                        started[index] += 1
                        log = out / "logs" / f"ps-{index}-new-standby-{started[index]}.log"
                        members[index] = processes.start_shard(job.path, index, log, standby=slot)
                        line += f"; a new standby starts (pid {members[index].pid}, log {log})"
                    else:
                        members[index] = None
                        line += f"; no new standby (already started {MAX_NEW_STANDBYS})"
                tqdm.write(line)
                sys.stdout.flush()


def _shard_exit(index: int, proc) -> str:
    if proc is None:
        return f"ps shard {index} lost both processes of its pair"
    return f"ps shard {index} (pid {proc.pid}) exited ({children.describe_exit(proc.returncode)})"


def _show_progress(path: Path, job: TrainingJob, stop: threading.Event) -> None:
    bar = tqdm(total=job.train.steps, desc="train", unit="step", dynamic_ncols=True)
    partial = ""  # a line rank 0 is still writing: read again until its newline
    with open(path) as f:
        while True:
            line = f.readline()
            if not line:
                if stop.wait(0.2):
                    break
                continue
            partial += line
            if not partial.endswith("\n"):
                continue
            try:
                record = json.loads(partial)
            except json.JSONDecodeError:  # a line cut short by a killed worker: the next one is whole
                continue
            finally:
                partial = ""
            if record.get("done"):
                break
            bar.n = record["step"]
            postfix = {"loss": f"{record['loss']:.4f}", "samples/s": f"{record['samples_per_s']:,.0f}"}
            if record.get("auc") is not None:
                postfix["eval_auc"] = f"{record['auc']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
    bar.close()


def _run_workers(
    job: TrainingJob, options: LaunchOptions, progress_path: Path, failures: _Failures, resume_step: int | None
) -> str | None:
    """One elastic run of every local worker; None when they all finished, else what failed.
    A SIGINT/SIGTERM (SignalException) propagates: it stops the job, restarts or not."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["EMBPS_PROGRESS_FILE"] = str(progress_path)
    # The agent's per-rank directories (for its redirects and error files, neither of which a
    # worker uses: its output goes to the launcher's) would be left in /tmp after every run.
    agent_dir = tempfile.TemporaryDirectory(prefix="embps-elastic-")
    config = LaunchConfig(
        min_nodes=options.nnodes,
        max_nodes=options.nnodes,
        nproc_per_node=job.train.workers,
        run_id=options.run_id or (f"embps-{uuid.uuid4().hex[:8]}" if options.rdzv_endpoint is None else job.ps.job),
        role="worker",
        rdzv_backend="c10d",
        rdzv_endpoint=options.rdzv_endpoint or "localhost:0",
        rdzv_configs={"is_host": options.node_rank == 0} if options.rdzv_endpoint else {},
        local_addr=options.local_addr,
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=agent_dir.name),
    )
    resume = ("--resume-step", str(resume_step)) if resume_step is not None else ()
    entry, env = python_module("worker.worker_main", "--config", job.path, *resume)
    if "PYTHONPATH" in env:  # torch's agent gives its workers this process's environment
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    start = time.monotonic()
    failures.armed = True
    try:
        if failures.first() is not None:
            return failures.first()
        elastic_launch(config, entrypoint=entry[0])(*entry[1:])
        return None
    except _ComponentDied as exc:
        if (stop := _stopping(exc)) is not None:
            raise stop from None
        return failures.first()
    except RendezvousError as exc:
        # Node 0's store is gone (its launcher stopped or its machine went away) or never came: this
        # node's agent raised it through elastic_launch, and the launcher ended on torch's traceback.
        where = options.rdzv_endpoint or "this node"
        return f"the workers' rendezvous at {where} failed ({type(exc).__name__}: {exc}); is node 0's launcher running?"
    except ChildFailedError as exc:
        if failures.first() is not None:  # a shard died first; the workers failed on its account
            return failures.first()
        # Every failed rank, first to fail first: torch stamps a failure with the second it saw it,
        # so ranks that end together (one on a shard's account, code 3, the others of its
        # collectives' error) tie, and naming one alone could hide the cause.
        failed = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        ranks = ", ".join(  # not "; ": the launcher's line goes on "; restart ..." after it
            f"worker rank {rank} (pid {failure.pid}) exited ({children.describe_exit(failure.exitcode)})"
            for rank, failure in failed
        )
        seconds = time.monotonic() - start
        if options.rdzv_endpoint is not None and options.node_rank != 0 and not _reachable(options.rdzv_endpoint):
            # Node 0's store went away: this node's workers, connected to it, fail on it too, and
            # one of the two ways torch reports it wins the race (RendezvousError above, or theirs).
            return (
                f"the workers' rendezvous at {options.rdzv_endpoint} went away ({ranks} after {seconds:.0f} s, "
                "their output above); is node 0's launcher running?"
            )
        return f"{ranks} after {seconds:.0f} s (the workers' output is above)"
    finally:
        failures.armed = False
        # Torch's agent records its workers only once every one of them started: a signal raised in
        # between (SIGTERM, Ctrl-C, a component's SIGUSR1) lost the started ones, which its shutdown
        # never stopped (tests/worker/test_launch_stop.py). This process's children miss none.
        children.stop_children(entry)
        agent_dir.cleanup()
