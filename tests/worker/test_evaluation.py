"""An evaluation the held-out rows do not define (labels of one class: AUC; logits not finite:
both metrics) reports None with a warning; it ended the job with a ValueError after its last step,
before the model and the summary were written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.in_process import InProcessShards
from tests.worker.training_jobs import write_training_job
from worker.train_config import load_training_job
from worker.worker_main import run_worker


def test_held_out_labels_of_one_class_give_no_auc_and_the_job_still_writes_its_model(tmp_path: Path, caplog):
    table = TableConfig(name="t0", dim=4, init_scale=0.1, seed=1, optimizer=OptimizerConfig(kind=OptimizerKind.SGD))
    out = tmp_path / "out"
    train = {"workers": 1, "steps": 4, "batch_size": 16, "mode": "sync", "dense_lr": 0.01, "tables": ["t0"],
             "eval_batches": 1, "eval_every": 2, "output_dir": str(out)}
    # bias 30: every label is 1.
    synthetic = {"num_dense": 2, "num_sparse": 3, "num_keys": 50, "num_batches": 8, "num_eval_batches": 1,
                 "bias": 30.0}
    path, ps = write_training_job(tmp_path / "job.toml", [table], 2, train, synthetic)
    with InProcessShards.start(ps) as shards:
        job = load_training_job(path)
        summary = run_worker(replace(job, ps=replace(job.ps, shards=shards.job.shards)), 0, 1)
    assert summary["eval_auc"] is None and summary["eval_logloss"] > 0.0, summary
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert (out / "dense.pt").is_file()
    assert json.loads((out / "summary.json").read_text())["eval_auc"] is None
    assert "all 16 held-out labels are 1: AUC is undefined" in caplog.text


def test_evaluation_reads_the_rows_of_its_own_step_not_the_next(tmp_path: Path):
    """predict() read the rows for the next step: with a TTL, a row last pushed ttl_steps ago,
    alive at this step, read as its init, and the eval scored the next step's rows with this
    step's tower (logits off by up to 0.25 in a review's job of ttl_steps = 1)."""
    import numpy as np
    import torch

    from ps.table.config import EvictionConfig
    from worker.data_sources import eval_batches, train_reader
    from worker.local_tables import LocalTables
    from worker.model import DLRMDenseTower
    from worker.trainer import Trainer

    table = TableConfig(name="t", dim=4, init_scale=0.1, seed=1, eviction=EvictionConfig(ttl_steps=1),
                        optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.2))
    train = {"workers": 1, "steps": 6, "batch_size": 32, "mode": "sync", "dense_lr": 0.01, "tables": ["t"],
             "eval_batches": 1, "output_dir": str(tmp_path / "out")}
    synthetic = {"num_dense": 2, "num_sparse": 3, "num_keys": 200, "num_batches": 6, "num_eval_batches": 1}
    path, _ = write_training_job(tmp_path / "job.toml", [table], 1, train, synthetic)
    job = load_training_job(path)
    torch.manual_seed(0)
    model = DLRMDenseTower(job.model)
    trainer = Trainer(job, model, LocalTables(list(job.ps.tables)), rank=0, world_size=1)
    batches = list(train_reader(job, 0, 1))
    for batch in batches:
        trainer.train_step(trainer.pull(batch))
    trainer.drain()
    held_out = eval_batches(job)[0]
    stored = trainer.pull(held_out, trainer.step)  # the rows as step 6 left them
    assert not np.array_equal(stored.values, trainer.pull(held_out, trainer.step + 1).values)  # the case
    with torch.no_grad():
        want = model(held_out.dense, trainer._embeddings(stored, torch.from_numpy(stored.values)))
    torch.testing.assert_close(trainer.predict(held_out), want, rtol=0, atol=0)
    trainer.close()


def test_held_out_click_probabilities_give_no_auc_and_a_logloss(tmp_path: Path, caplog):
    """Labels of 0.5 (the readers take click probabilities in [0, 1]): evaluate raised "labels: must
    be 0 or 1" and the job ended before its model was written (a review's repro)."""
    from worker.criteo import CriteoTsvReader
    from worker.local_tables import LocalTables
    from worker.model import DLRMDenseTower
    from worker.readers import ReaderConfig
    from worker.train_config import parse_training_job
    from worker.trainer import Trainer

    data = tmp_path / "soft.tsv"
    data.write_text("1\t3\tabc\n0\t1\tdef\n0.5\t2\tabc\n0\t\t\n")
    config = ReaderConfig(global_batch_size=4, num_dense=1, num_sparse=1, drop_last=False)
    batches = list(CriteoTsvReader([str(data)], config))
    job = parse_training_job({
        "job": "j", "shards": [{"address": "127.0.0.1:1"}], "tables": {"emb": {"dim": 4}},
        "train": {"workers": 1, "steps": 2, "batch_size": 4},
        "model": {"bottom_sizes": [4], "top_sizes": [4]},
        "data": {"source": "criteo", "paths": [str(data)], "num_dense": 1, "num_sparse": 1},
    })
    trainer = Trainer(job, DLRMDenseTower(job.model), LocalTables(list(job.ps.tables)), 0, 1)
    try:
        trainer.train_step(trainer.pull(batches[0]))
        metrics = trainer.evaluate(batches)
    finally:
        trainer.close()
    assert metrics["auc"] is None and 0 < metrics["logloss"] < 5, metrics
    assert "held-out labels other than 0 and 1" in caplog.text
