"""`embps launch job.toml`: a whole training job on this machine (or this node of a cluster).

    launcher ─┬─ PS shard 0..S-1      python -m embps ps --config job.toml --shard i   (node 0)
              └─ elastic agent ─ worker rank 0..W-1  python -m worker.worker_main --config job.toml

On several nodes every node runs `embps launch job.toml --nnodes N --node-rank R --rdzv-endpoint
HOST:PORT`, where HOST is node 0's address: node 0 hosts the c10d store, every node joins the
rendezvous under the job's name, and each node starts train.workers processes (W = N x workers).
Workers find the PS shards at the addresses of the job file, so they may be DNS names; with
`--no-ps` a node starts no shards (they run elsewhere, e.g. on Kubernetes).

Workers start through torch.distributed's elastic launcher (c10d rendezvous, the machinery of
torchrun), never a hand-made rendezvous. The launcher shows a progress bar fed by rank 0's
progress lines, writes the summary, and on Ctrl-C, SIGTERM or any failed process stops every
child and exits non-zero naming the failed component.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from worker import processes
from worker.train_config import TrainingJob, load_training_job


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

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes: must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank: must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("--rdzv-endpoint: a job on several nodes needs node 0's host:port for the rendezvous")


class _Failure:
    """The first component that failed, set from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.message: str | None = None

    def set(self, message: str) -> None:
        with self._lock:
            if self.message is None:
                self.message = message


def launch(options: LaunchOptions) -> int:
    job = load_training_job(options.config_path)
    out = Path(job.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "progress.jsonl"
    progress_path.write_text("")
    (out / "summary.json").unlink(missing_ok=True)  # only this run's rank 0 may leave one
    failure = _Failure()
    start_ps = options.node_rank == 0 if options.start_ps is None else options.start_ps
    shards: list = []
    stop_watch = threading.Event()
    resume_step = None
    try:
        if options.resume:
            resume_step = _latest_step(job)
            print(f"embps launch: resuming job {job.ps.job!r} from snapshot step {resume_step}", flush=True)
        if start_ps:
            shards = _start_shards(job, out, resume_step)
            watcher = threading.Thread(target=_watch_shards, args=(shards, failure, stop_watch), daemon=True)
            watcher.start()
        bar = threading.Thread(target=_show_progress, args=(progress_path, job, stop_watch), daemon=True)
        bar.start()
        _run_workers(job, options, progress_path, failure, resume_step)
    except KeyboardInterrupt:
        failure.set("interrupted (Ctrl-C)")
    except RuntimeError as exc:
        failure.set(str(exc))
    finally:
        stop_watch.set()
        for proc in shards:
            processes.stop(proc)
    if failure.message is not None:
        print(f"embps launch: FAILED: {failure.message}", file=sys.stderr)
        return 1
    summary_path = out / "summary.json"
    if not summary_path.exists():
        print(f"embps launch: done: node {options.node_rank}'s workers finished; global rank 0 writes the summary")
        return 0
    summary = json.loads(summary_path.read_text())
    auc = summary.get("eval_auc")
    print(
        f"embps launch: done: {summary.get('steps')} steps, {summary.get('samples_per_s', 0):,.0f} samples/s, "
        f"final loss {summary.get('final_loss', float('nan')):.4f}"
        + (f", eval AUC {auc:.4f}" if auc is not None else "")
        + f"; summary in {summary_path}"
    )
    return 0


def _latest_step(job: TrainingJob) -> int:
    from ps.snapshot import latest

    if job.ps.snapshot is None:
        raise RuntimeError("--resume: the job has no [snapshot] section, so there is nothing to resume from")
    step = latest(job.ps.snapshot.uri, job.ps.job, job.ps.snapshot.storage)
    if step is None:
        raise RuntimeError(f"--resume: no complete snapshot of job {job.ps.job!r} under {job.ps.snapshot.uri}")
    return step


def _start_shards(job: TrainingJob, out: Path, restore_step: int | None) -> list:
    config_path = job.path
    shards = []
    for index in range(len(job.ps.shards)):
        shards.append(processes.start_shard(config_path, index, out / "logs" / f"ps-{index}.log", restore_step))
    for index, (proc, shard) in enumerate(zip(shards, job.ps.shards, strict=True)):
        try:
            processes.wait_serving(shard.address, proc, f"ps shard {index}", security=job.ps.security)
        except RuntimeError:
            for p in shards:
                processes.stop(p)
            raise
    return shards


def _watch_shards(shards: list, failure: _Failure, stop: threading.Event) -> None:
    """A shard that exits during training fails the job: record it and stop the workers."""
    while not stop.wait(0.2):
        for index, proc in enumerate(shards):
            if proc.poll() is not None:
                failure.set(f"ps shard {index} (pid {proc.pid}) exited with code {proc.returncode}")
                os.kill(os.getpid(), signal.SIGTERM)
                return


def _show_progress(path: Path, job: TrainingJob, stop: threading.Event) -> None:
    bar = tqdm(total=job.train.steps, desc="train", unit="step", dynamic_ncols=True)
    with open(path) as f:
        while True:
            line = f.readline()
            if not line:
                if stop.wait(0.2):
                    break
                continue
            record = json.loads(line)
            if record.get("done"):
                break
            bar.n = record["step"]
            postfix = {"loss": f"{record['loss']:.4f}", "samples/s": f"{record['samples_per_s']:,.0f}"}
            if "auc" in record:
                postfix["eval_auc"] = f"{record['auc']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
    bar.close()


def _run_workers(
    job: TrainingJob, options: LaunchOptions, progress_path: Path, failure: _Failure, resume_step: int | None
) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["EMBPS_PROGRESS_FILE"] = str(progress_path)
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
    )
    entry = [sys.executable, "-m", "worker.worker_main", "--config", job.path]
    if resume_step is not None:
        entry += ["--resume-step", str(resume_step)]
    start = time.monotonic()
    try:
        elastic_launch(config, entrypoint=entry[0])(*entry[1:])
    except ChildFailedError as exc:
        ranks = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(exc.failures.items()))
        failure.set(f"worker {ranks} failed after {time.monotonic() - start:.0f} s; see the log above")
    except SignalException as exc:
        failure.set(f"stopped by signal {exc.sigval.name}")
