"""An async job publishes its dense tower with its commits, as a sync job does.

Before, rank 0's push thread committed each async step without the tower: a replica beside an
async job served rows but no DenseModel, and its Scorer could not score. Now the tower of step t
(read on the training thread right after step t's update) goes with Commit(t), which follows
every rank's push of t: the replica's cut at the last step scores as the trainer predicts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ps.client import PSClient
from serving.config import Consistency, DefaultRow
from tests.helpers.processes import REPO_ROOT, ShardCluster
from tests.serving.replicas import ServingReplica
from tests.worker.test_training_sync import score_held_out
from tests.worker.training_jobs import OPTIMIZER_TABLES, write_training_job
from worker.train_config import load_training_job

STEPS = 20
TRAIN = {
    "workers": 2,
    "steps": STEPS,
    "batch_size": 64,
    "mode": "async",
    "staleness": 2,
    "dense_optimizer": "adam",
    "dense_lr": 0.01,
    "tables": [t.name for t in OPTIMIZER_TABLES],
    "eval_batches": 2,
}
SYNTHETIC = {
    "num_dense": 3, "num_sparse": len(OPTIMIZER_TABLES), "num_keys": 300, "num_batches": STEPS,
    "num_eval_batches": 2, "seed": 5,
}


@pytest.mark.slow
def test_a_replica_beside_an_async_job_scores_as_the_trainer_predicts(tmp_path):
    out = tmp_path / "out"
    path, ps = write_training_job(
        tmp_path / "job.toml", OPTIMIZER_TABLES, 2, TRAIN | {"output_dir": str(out)}, SYNTHETIC
    )
    job = load_training_job(path)
    with ShardCluster.start(ps, tmp_path / "shards") as cluster, ServingReplica.start(
        cluster, tmp_path / "replica", consistency=Consistency.STEP, default=DefaultRow.INIT
    ) as serving:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             "--log-dir", str(tmp_path / "agent"), "-m", "worker.worker_main", "--config", str(path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        with PSClient.from_job(cluster.job) as client:
            scores, logits = score_held_out(job, client, serving, torch.load(out / "dense.pt"))
    for score, want in zip(scores, logits, strict=True):
        assert score.model_version == STEPS
        diff = abs(score.logits - want).max()
        assert diff <= 1e-6, f"online logits differ from the trainer's by {diff}"
