"""Online scores from a serving replica, equal to the trainer's own predictions at the same step.

    raw features: dense (B, num_dense) float32, sparse (B, F) int64 keys, feature f in table
    feature_tables[f]
      --one LookupMany (every table's keys, deduplicated)--> rows (B, F, dim) at model version s
      --DenseModel(step = s), loaded once per step--> the dense tower of step s
      --tower(dense, rows)--> logits (B,), scores = sigmoid(logits)

A reply's rows and the tower are of the same step (DESIGN section 9), so a score equals what the
trainer computes at that step. Needs a replica with consistency = "step" and a job that publishes
the tower every step (train.publish_dense_every = 1; with k > 1 only every k-th step has one, and
a lookup at another step is answered again until its step has one). Imports torch (the replica
itself never does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from serving.client import ServingClient

MAX_TRIES = 8  # lookups tried while the replica's cut moves past the towers it keeps


@dataclass(frozen=True)
class Scores:
    """logits (B,) float32, scores = sigmoid(logits) (B,), model_version: the step of both."""

    logits: np.ndarray
    scores: np.ndarray
    model_version: int


class Scorer:
    """Scores raw features with the rows and the dense tower a replica serves at one step.

    build_tower() -> a torch nn.Module with forward(dense (B, num_dense), embeddings (B, F, dim))
    -> logits (B,), e.g. worker.model.DLRMDenseTower(config); its weights come from the replica.
    """

    def __init__(self, client: ServingClient, feature_tables: Sequence[str], build_tower: Callable[[], object]) -> None:
        if not feature_tables:
            raise ValueError("feature_tables: one table name per sparse feature, got none")
        self.client = client
        self.feature_tables = list(feature_tables)
        self.build_tower = build_tower
        self._tower = None
        self._tower_step = -1

    def score(self, dense, sparse: np.ndarray) -> Scores:
        """Scores of B samples: dense (B, num_dense) float32 (numpy or torch), sparse (B, F) int64."""
        import torch

        sparse = np.asarray(sparse)
        if sparse.ndim != 2 or sparse.shape[1] != len(self.feature_tables) or sparse.dtype != np.int64:
            raise ValueError(
                f"sparse: expected (B, {len(self.feature_tables)}) int64 keys (one column per feature), "
                f"got {sparse.shape} {sparse.dtype}"
            )
        dense = torch.as_tensor(dense, dtype=torch.float32)
        columns: dict[str, list[int]] = {}
        for f, table in enumerate(self.feature_tables):
            columns.setdefault(table, []).append(f)
        requests = {table: sparse[:, cols].reshape(-1) for table, cols in columns.items()}
        for _ in range(MAX_TRIES):
            rows, version = self.client.lookup_many_at_version(requests)
            if version == 0:
                raise ValueError('the replica serves no model version (consistency = "latest", or no cut yet)')
            tower = self._tower_of(version)
            if tower is None:
                continue  # the cut moved past the towers the replica keeps: look up again
            dim = next(iter(rows.values()))[0].shape[1]
            embeddings = torch.empty((sparse.shape[0], sparse.shape[1], dim), dtype=torch.float32)
            for table, cols in columns.items():
                values = torch.from_numpy(np.ascontiguousarray(rows[table][0], dtype=np.float32))
                embeddings[:, cols, :] = values.reshape(sparse.shape[0], len(cols), dim)
            with torch.no_grad():
                logits = tower(dense, embeddings)
            return Scores(logits.numpy(), torch.sigmoid(logits).numpy(), version)
        raise RuntimeError(f"no dense tower for the replica's steps after {MAX_TRIES} lookups")

    def _tower_of(self, step: int):
        """The tower of `step` (cached while steps repeat), or None when the replica has none of it."""
        if step == self._tower_step:
            return self._tower
        from worker.dense_publish import decode_dense

        try:
            reply = self.client.dense_model(step)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        tower = self.build_tower()
        tower.load_state_dict(decode_dense(reply.state, reply.format))
        tower.eval()
        self._tower, self._tower_step = tower, step
        return tower
