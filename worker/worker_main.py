"""Entry point of one training worker process, started by torch.distributed's elastic agent
(`embps launch`, or `torchrun ... -m worker.worker_main --config job.toml`).

Reads RANK / WORLD_SIZE from the environment the launcher hands over, joins the process group
(gloo: the dense tower trains on CPU), trains, and on rank 0 writes progress lines (JSON, one per log
step) to $EMBPS_PROGRESS_FILE when set, then `summary.json` and `dense.pt` into train.output_dir.

A PS shard that stays unavailable (train.on_ps_unavailable = "abort", or "wait" past its timeout)
ends the worker with exit code EXIT_PS_UNAVAILABLE and a line on stderr naming the shard.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from ps.client import PSClient, ShardUnavailableError
from ps.process.children import die_with_launcher
from ps.process.exit import exit_process
from ps.process.malloc import tune_malloc_here
from ps.process.metrics import serve_metrics
from worker.checkpoint import Checkpointer, load_trainer_state
from worker.data_sources import eval_batches, ranks_may_differ_in_batches, train_reader
from worker.model import DLRMDenseTower
from worker.train_config import TrainingJob, load_training_job
from worker.trainer import Trainer

LOG_EVERY = 10
EXIT_PS_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


class MetricsPortError(Exception):
    """train.metrics_port cannot be served (taken by another process): the worker ends with a line."""


def run_worker(
    job: TrainingJob, rank: int, world_size: int, progress_path: str | None = None, resume_step: int | None = None
) -> dict:
    """Trains `job` as rank `rank` of `world_size` (from snapshot `resume_step` when given);
    returns the summary (complete on rank 0)."""
    if job.train.batch_size % world_size:
        raise ValueError(f"train.batch_size: must be divisible by the {world_size} workers, got {job.train.batch_size}")
    torch.manual_seed(job.model.seed)
    model = DLRMDenseTower(job.model)
    client = PSClient.from_job(job.ps, client_id=f"{job.ps.job}-rank{rank}-{uuid.uuid4().hex[:8]}")
    trainer = Trainer(job, model, client, rank, world_size)
    reader = train_reader(job, rank, world_size)
    if resume_step is not None:
        resumed = load_trainer_state(job, resume_step, rank, world_size, model, trainer.optimizer)
        reader.restore(resumed["reader"])
        trainer.step = resumed["step"]
    checkpointer = Checkpointer(job, rank, world_size, resumed_step=resume_step)
    if rank == 0 and job.train.metrics_port is not None:
        try:
            serve_metrics(job.train.metrics_port, "0.0.0.0", checkpointer.rounds.registry)
        except OSError as exc:  # a traceback ended the worker, naming no field
            raise MetricsPortError(
                f"train.metrics_port: cannot serve /metrics on port {job.train.metrics_port}: {exc.strerror or exc}"
            ) from None
    first_step = trainer.step
    stream = iter(reader)
    agree = world_size > 1 and ranks_may_differ_in_batches(job)

    def next_batch_or_none():
        """The next local batch, None when this rank's stream or any other rank's has ended."""
        start = time.perf_counter()
        batch = next(stream, None)
        trainer.times.data_wait += time.perf_counter() - start
        if agree:
            have = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            batch = batch if int(have.item()) else None
        return batch

    held_out = eval_batches(job) if rank == 0 else []
    progress = open(progress_path, "a", buffering=1) if (progress_path and rank == 0) else None
    evaluations: list[dict] = []
    losses: collections.deque[float] = collections.deque(maxlen=LOG_EVERY)  # a list grew by every step of the run
    start = time.perf_counter()
    local_rows = job.train.batch_size // world_size
    slowest_step = 0.0  # a step's data, lookups, compute and push (no snapshot round): a failover shows here
    try:
        batch = next_batch_or_none() if trainer.step < job.train.steps else None
        pulled = trainer.pull_timed(batch) if batch is not None else None
        while pulled is not None and trainer.step < job.train.steps:
            step_started = time.perf_counter()
            # after the batch this step trains on (taken only for a snapshot: it copies the shuffle buffer)
            position = reader.state() if checkpointer.due(trainer.step + 1) else None
            next_batch = next_batch_or_none() if trainer.step + 1 < job.train.steps else None
            loss, prefetched = trainer.train_step(pulled, next_batch)
            losses.append(loss)
            if prefetched is None and next_batch is not None:
                prefetched = trainer.pull_timed(next_batch)
            pulled = prefetched
            if trainer.step > first_step + 1:  # the first step also warms up
                slowest_step = max(slowest_step, time.perf_counter() - step_started)
            step = trainer.step
            due_eval = job.train.eval_every and step % job.train.eval_every == 0
            if step % LOG_EVERY == 0 or due_eval or step == job.train.steps or pulled is None:
                mean_loss = _global_mean(sum(losses) / len(losses), world_size)
                record = {
                    "step": step,
                    "total_steps": job.train.steps,
                    "loss": mean_loss,
                    "samples_per_s": (step - first_step) * local_rows * world_size / (time.perf_counter() - start),
                }
                if due_eval:
                    trainer.drain()
                    if rank == 0 and held_out:
                        record.update(trainer.evaluate(held_out))
                        evaluations.append({"step": step, **{k: record[k] for k in ("auc", "logloss")}})
                if progress is not None:
                    progress.write(json.dumps(record) + "\n")
            if checkpointer.due(step):
                trainer.drain()
                checkpointer.save(step, model, trainer.optimizer, position)
        trainer.drain()
        checkpointer.finish()  # a round's late commit, before the summary counts the rounds
        elapsed = time.perf_counter() - start
        trained = trainer.step - first_step
        summary = {
            "job": job.ps.job,
            "steps": trainer.step,
            "resumed_from": resume_step,
            "world_size": world_size,
            "mode": job.train.mode.value,
            "samples": trained * job.train.batch_size,
            "seconds": elapsed,
            "samples_per_s": trained * job.train.batch_size / elapsed if elapsed else 0.0,
            "final_loss": _global_mean(sum(losses) / max(1, len(losses)), world_size),
            "times_rank0": trainer.times.as_dict(),
            "slowest_step_s_rank0": slowest_step,
            "evaluations": evaluations,
            "snapshots": checkpointer.rounds.as_dict(),
        }
        if trained == 0:  # resumed at its last step, or no row: no loss or rate was measured (they read as 0)
            summary.update(final_loss=None, samples_per_s=None)
        summary.update(_input_rows(reader, world_size))
        if rank == 0:
            if held_out and (not evaluations or evaluations[-1]["step"] != trainer.step):
                final = trainer.evaluate(held_out)
                evaluations.append({"step": trainer.step, **final})
            if evaluations:
                summary.update(eval_auc=evaluations[-1]["auc"], eval_logloss=evaluations[-1]["logloss"])
            out = Path(job.train.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / "dense.pt")
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            if progress is not None:
                progress.write(json.dumps({"done": True, **summary}) + "\n")
        if world_size > 1:
            dist.barrier()
        return summary
    finally:
        close_stream = getattr(stream, "close", None)
        if close_stream is not None:
            close_stream()  # stops the reader's read-ahead thread
        trainer.close()
        client.close()
        if progress is not None:
            progress.close()


def _input_rows(reader, world_size: int) -> dict[str, int]:
    """Rows the ranks' file readers parsed and the bad ones they skipped, summed over the ranks
    (read-ahead included), after each rank logs its own total; {} for synthetic data. Every rank
    calls it (an all-reduce), with the same kind of reader."""
    if not hasattr(reader, "num_bad_rows"):
        return {}
    reader.log_bad_rows_total()
    counts = torch.tensor([reader.num_parsed, reader.num_bad_rows], dtype=torch.int64)
    if world_size > 1:
        dist.all_reduce(counts)
    return {"input_rows_parsed": int(counts[0]), "input_bad_rows": int(counts[1])}


def _global_mean(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    tune_malloc_here()  # no page faults for every step's large tensors (ps/process/malloc.py)
    faulthandler.enable()  # a fatal signal (SIGABRT from C++, SIGSEGV) prints every thread's Python stack
    parser = argparse.ArgumentParser(prog="worker.worker_main", description="one embps training worker")
    parser.add_argument("--config", required=True, help="job TOML")
    parser.add_argument("--resume-step", type=int, default=None, help="continue from this snapshot step")
    args = parser.parse_args(argv)
    job = load_training_job(args.config)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # Workers of one node share its cores: without this each one starts a thread per core and
    # they oversubscribe the machine (the PS shards run on the same cores too).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if world_size > 1:
        # gloo on a CUDA host too: the dense tower, its gradients and the exchanged sparse rows are
        # CPU tensors (only PS tables' rows can live on a GPU), and nccl carries CUDA tensors alone.
        dist.init_process_group(backend="gloo", timeout=job.collective_timeout)
    try:
        run_worker(job, rank, world_size, os.environ.get("EMBPS_PROGRESS_FILE"), args.resume_step)
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches every process of the job: a line, no traceback
        print(f"embps worker rank {rank}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except ShardUnavailableError as exc:
        print(
            f"embps worker rank {rank}: PS shard {exc.address} unavailable, stopping "
            f"(train.on_ps_unavailable = {job.train.on_ps_unavailable.value}): {exc}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_PS_UNAVAILABLE
    except MetricsPortError as exc:
        print(f"embps worker rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())
