"""Training snapshots: rank 0 coordinates, every shard writes its tables, rank 0 commits.

    all ranks:  reader positions --all_gather_object--> rank 0
    rank 0:     WriteSnapshot(step) to every shard (parallel) -> their file records
                + extra/dense.pt (model and dense optimizer state_dicts)
                + extra/trainer_state.json (step, every rank's reader position, torch RNG state)
                -> manifest.json (commit point) -> LATEST -> gc
    all ranks:  barrier, so no push of the next step reaches a shard before it wrote its files

Resume (`embps launch --resume`): the shards load the step's tables before serving, each worker
loads the dense model, optimizer and its reader position, and training continues at step + 1.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import nn

from ps.job_config import SnapshotConfig
from ps.rpc import snapshot_pb2, snapshot_pb2_grpc
from ps.security import Role, SecurityConfig, open_channel
from ps.snapshot.files import SnapshotWriter, read_extra
from ps.snapshot.manifest import ShardRecord
from ps.snapshot.ops import collect_garbage
from worker.train_config import TrainingJob

DENSE = "dense.pt"
TRAINER_STATE = "trainer_state.json"
_WRITE_DEADLINE_S = 600.0


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

    def due(self, step: int) -> bool:
        if self.config is None:
            return False
        every = self.config.every_steps
        return step == self.job.train.steps or (every > 0 and step % every == 0)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, position: dict) -> None:
        """Writes and commits snapshot `step`; collective. position: this rank's reader state
        after the batch of `step` (BatchReader.state())."""
        positions = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(positions, position)
        else:
            positions[0] = position
        if self.rank == 0:
            self._write(step, model, optimizer, positions)
        if self.world_size > 1:
            dist.barrier()
        self._last_step = step
        self._count += 1

    def _write(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, positions: list) -> None:
        config = self.config
        full = self._last_step is None or self._count % config.full_every == 0
        kind, parent = ("full", None) if full else ("incremental", self._last_step)
        request = snapshot_pb2.WriteSnapshotRequest(
            uri=config.uri, job=self.job.ps.job, step=step, kind=kind, num_shards=len(self.job.ps.shards)
        )
        if parent is not None:
            request.parent = parent
        records = _write_on_shards(self.job.ps.addresses, self.job.ps.security, request)
        writer = SnapshotWriter(
            config.uri,
            self.job.ps.job,
            step,
            kind,
            parent,
            num_shards=len(self.job.ps.shards),
            tables=self.job.ps.tables,
            storage_config=config.storage,
        )
        for record in records:
            writer.add_shard_record(record)
        blob = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, blob)
        writer.write_extra(DENSE, blob.getvalue())
        state = {
            "step": step,
            "world_size": self.world_size,
            "readers": positions,
            "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }
        writer.write_extra(TRAINER_STATE, json.dumps(state).encode())
        writer.commit()
        if config.keep:
            collect_garbage(config.uri, self.job.ps.job, config.keep, config.storage)


def _write_on_shards(
    addresses: list[str], security: SecurityConfig, request: snapshot_pb2.WriteSnapshotRequest
) -> list[ShardRecord]:
    def call(address: str) -> list[ShardRecord]:
        with open_channel(address, security, Role.TRAINER) as channel:
            reply = snapshot_pb2_grpc.SnapshotControlStub(channel).WriteSnapshot(request, timeout=_WRITE_DEADLINE_S)
        return [ShardRecord.from_dict(d) for d in json.loads(reply.records_json)]

    with ThreadPoolExecutor(len(addresses)) as pool:
        return [r for records in pool.map(call, addresses) for r in records]


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
    model.load_state_dict(dense["model"])
    optimizer.load_state_dict(dense["optimizer"])
    rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return {"step": state["step"], "reader": state["readers"][rank]}
