"""One rank of an async job against real shards, recording when its lookups start and when its
pushes are acknowledged (tests/worker/test_async_staleness.py runs it under torch.distributed.run).

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.worker.async_ranks \
        --config JOB.toml --out DIR --slow-rank 1 --push-delay 0.1

Writes DIR/rank<r>.json: {"lookups": [[step, start]], "pushes": [[step, sent, acknowledged]],
"commits": [[step, sent, acknowledged]]} (time.monotonic()), and appends each acknowledged
commit's step to DIR/commits.txt as it comes (a job that fails writes no rank<r>.json).
--fail-push R:S makes rank R's push of step S fail, as a shard's error would.
time.monotonic is one clock for every process of the machine, so the ranks' records compare.
The slow rank sleeps push_delay before each push: without a wait for the other ranks' pushes, a
fast rank's lookup would then reach the slow rank's shards before their updates.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ps.client import PSClient
from worker.data_sources import train_reader
from worker.model import DLRMDenseTower
from worker.train_config import load_training_job
from worker.trainer import Trainer


class RecordingClient(PSClient):
    """A PSClient that records when each lookup round starts, and when each push and commit is sent
    and acknowledged."""

    trainer: Trainer | None = None
    push_delay = 0.0
    fail_step: int | None = None  # this rank's push of that step raises
    commit_log: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.lookups: list[tuple[int, float]] = []
        self.pushes: list[tuple[int, float, float]] = []
        self.commits: list[tuple[int, float, float]] = []
        self._steps: dict[int, int] = {}  # id of a prepared push (frozen) -> its step, until sent

    def lookup_multi_grouped(self, tables, keys, offsets, step=None):
        # The pull thread runs during step t for step t + 1; the first pull comes before step 1.
        with self.lock:
            self.lookups.append((step, time.monotonic()))
        return super().lookup_multi_grouped(tables, keys, offsets, step)

    def prepare_push_multi(self, *args, step=None, **kwargs):
        prepared = super().prepare_push_multi(*args, step=step, **kwargs)
        with self.lock:
            self._steps[id(prepared)] = step
        return prepared

    def send_push(self, prepared):
        time.sleep(self.push_delay)
        if self._steps.get(id(prepared)) == self.fail_step:
            raise RuntimeError(f"push of step {self.fail_step} failed (injected)")
        sent = time.monotonic()
        result = super().send_push(prepared)
        with self.lock:
            self.pushes.append((self._steps.pop(id(prepared)), sent, time.monotonic()))
        return result

    def commit(self, step, dense_state=b"", dense_format=""):
        sent = time.monotonic()
        result = super().commit(step, dense_state, dense_format)
        with self.lock:
            self.commits.append((step, sent, time.monotonic()))
            if self.commit_log is not None:
                with open(self.commit_log, "a") as log:
                    log.write(f"{step}\n")
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--slow-rank", type=int, default=1)
    parser.add_argument("--push-delay", type=float, default=0.1)
    parser.add_argument("--fail-push", default=None, help="RANK:STEP")
    args = parser.parse_args()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    job = load_training_job(Path(args.config))
    torch.manual_seed(job.model.seed)
    client = RecordingClient.from_job(job.ps, client_id=f"rank{rank}")
    client.push_delay = args.push_delay if rank == args.slow_rank else 0.0
    client.commit_log = Path(args.out, "commits.txt")
    if args.fail_push is not None:
        failing_rank, failing_step = (int(v) for v in args.fail_push.split(":"))
        client.fail_step = failing_step if rank == failing_rank else None
    trainer = Trainer(job, DLRMDenseTower(job.model), client, rank, world_size)
    client.trainer = trainer
    batches = list(train_reader(job, rank, world_size))[: job.train.steps]
    pulled = trainer.pull(batches[0])
    for i in range(len(batches)):
        _, pulled = trainer.train_step(pulled, batches[i + 1] if i + 1 < len(batches) else None)
    trainer.drain()
    trainer.close()
    client.close()
    record = {"lookups": client.lookups, "pushes": client.pushes, "commits": client.commits}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
