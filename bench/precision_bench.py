"""`embps bench precision`: the same training job with float32, float16 and int8 embedding rows.

Each run trains in one process (the trainer over in-process tables, worker/local_tables.py: the
same EmbeddingTable and optimizer as a shard) from the same seeds on the same batches, then
evaluates on the same held-out batches; the float32 run is the yardstick. Data:
  synthetic  the planted-signal synthetic job (worker/synthetic.py);
  criteo     Criteo-format TSV files: --criteo-train/--criteo-eval, or, without them, files this
             bench writes from the synthetic generator (label, 13 counts, 26 categorical values
             as hex), so the TSV reader and its key hashing are in the loop.
Reports eval AUC and logloss side by side and the AUC loss of float16 and int8 against float32.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.machine import machine_facts
from ps import toml_writer
from ps.job_config import JobConfig, ShardConfig, dump_job_config
from ps.table.config import OptimizerConfig, OptimizerKind, Storage, TableConfig

MAX_INT8_AUC_LOSS = 0.002  # the bound


@dataclass(frozen=True)
class PrecisionBenchConfig:
    steps: int = 400
    batch: int = 2048
    dim: int = 16
    num_keys: int = 100_000
    lr: float = 0.05
    eval_batches: int = 16
    data: str = "both"  # "synthetic" | "criteo" | "both"
    criteo_train: tuple[str, ...] = ()
    criteo_eval: tuple[str, ...] = ()
    seed: int = 0
    out: str | None = None


def _job_toml(config: PrecisionBenchConfig, storage: Storage, data: dict, synthetic: dict | None) -> str:
    table = TableConfig(
        "emb",
        dim=config.dim,
        storage=storage,
        seed=config.seed,
        optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=config.lr),
    )
    ps = dump_job_config(JobConfig(job=f"precision-{storage}", shards=(ShardConfig("127.0.0.1:1"),), tables=(table,)))
    train = {
        "workers": 1,
        "steps": config.steps,
        "batch_size": config.batch,
        "tables": ["emb"],
        "eval_batches": config.eval_batches,
        "output_dir": "unused",
    }
    sections = [
        toml_writer.table("train", train),
        toml_writer.table("model", {"bottom_sizes": [64, config.dim], "top_sizes": [64]}),
        toml_writer.table("data", data),
    ]
    if synthetic is not None:
        sections.append(toml_writer.table(("data", "synthetic"), synthetic))
    return ps + "\n" + toml_writer.document(sections)


def _train_and_evaluate(path: Path, config: PrecisionBenchConfig, label: str) -> dict[str, float]:
    from worker.data_sources import eval_batches, train_reader
    from worker.local_tables import LocalTables
    from worker.model import DLRMDenseTower
    from worker.train_config import load_training_job
    from worker.trainer import Trainer

    job = load_training_job(path)
    torch.manual_seed(config.seed)
    store = LocalTables(list(job.ps.tables))
    trainer = Trainer(job, DLRMDenseTower(job.model), store, rank=0, world_size=1)
    start = time.perf_counter()
    steps = 0
    with tqdm(total=config.steps, desc=label, unit="step") as progress:
        for batch in train_reader(job, 0, 1):
            if steps == config.steps:
                break
            trainer.train_step(trainer.pull(batch))
            steps += 1
            progress.update(1)
    held_out = eval_batches(job)
    if not held_out:
        raise ValueError(f"{label}: no held-out batches (give eval files with at least one global batch)")
    result = trainer.evaluate(held_out)
    if result["auc"] is None:
        raise ValueError(f"{label}: the held-out batches define no AUC (labels of one class, or the model diverged)")
    table = store.tables["emb"]
    return {
        **result,
        "steps": steps,
        "train_s": time.perf_counter() - start,
        "rows": table.size,
        "bytes_per_row": table.memory_bytes / max(1, table.size),
    }


def write_criteo_from_synthetic(path: Path, synthetic: dict, batch: int, first: int, count: int, split: str) -> None:
    """Global batches [first, first + count) of the synthetic job as a Criteo-format TSV: the
    label, counts whose log1p is the dense value, each sparse key as 16 hex digits."""
    from worker.data_options import SyntheticConfig
    from worker.synthetic import Split, SyntheticData

    data = SyntheticData(SyntheticConfig(global_batch_size=batch, **synthetic))
    with open(path, "w") as f:
        for index in range(first, first + count):
            b = data.global_batch(index, Split(split))
            counts = np.rint(np.expm1(b.dense.numpy().astype(np.float64))).astype(np.int64)
            keys = b.sparse.astype(np.int64).view(np.uint64)
            labels = b.labels.numpy().astype(np.int64)
            for i in range(labels.shape[0]):
                fields = [str(labels[i]), *map(str, counts[i]), *(f"{k:016x}" for k in keys[i])]
                f.write("\t".join(fields) + "\n")


def run_precision_bench(config: PrecisionBenchConfig) -> int:
    results: dict[str, object] = {"bench": "precision", "config": asdict(config), "machine": machine_facts()}
    datasets = ["synthetic", "criteo"] if config.data == "both" else [config.data]
    synthetic = {"num_keys": config.num_keys, "num_batches": config.steps + 1, "seed": config.seed}
    with tempfile.TemporaryDirectory(prefix="embps-bench-precision-") as tmp:
        workdir = Path(tmp)
        for dataset in datasets:
            if dataset == "synthetic":
                data, syn = {"source": "synthetic"}, synthetic
                source = "synthetic job"
            else:
                train_paths, eval_paths = list(config.criteo_train), list(config.criteo_eval)
                if not train_paths:
                    train_paths, eval_paths = [str(workdir / "train.tsv")], [str(workdir / "eval.tsv")]
                    print("writing Criteo-format TSV files from the synthetic generator", flush=True)
                    batch, steps, held_out = config.batch, config.steps, config.eval_batches
                    write_criteo_from_synthetic(Path(train_paths[0]), synthetic, batch, 0, steps, "train")
                    write_criteo_from_synthetic(Path(eval_paths[0]), synthetic, batch, 0, held_out, "eval")
                    source = "Criteo-format TSV written from the synthetic generator"
                else:
                    source = f"Criteo-format TSV {train_paths} (eval {eval_paths})"
                data = {"source": "criteo", "paths": train_paths, "eval_paths": eval_paths, "shuffle_files": False}
                syn = None
            runs: dict[str, dict] = {}
            for storage in Storage:
                path = workdir / f"{dataset}-{storage}.toml"
                path.write_text(_job_toml(config, storage, data, syn))
                runs[str(storage)] = _train_and_evaluate(path, config, f"{dataset} {storage}")
            base = runs["float32"]
            for r in runs.values():
                r["auc_loss_vs_float32"] = base["auc"] - r["auc"]
                r["logloss_gain_vs_float32"] = r["logloss"] - base["logloss"]
            results[dataset] = {"source": source, "runs": runs}
    _print(results, datasets)
    verdicts = [results[d]["runs"]["int8"]["auc_loss_vs_float32"] <= MAX_INT8_AUC_LOSS for d in datasets]
    results["int8_auc_loss_within_bound"] = all(verdicts)
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {config.out}")
    return 0


def _print(results: dict, datasets: list[str]) -> None:
    c = results["config"]
    print(
        f"\nembps bench precision: {c['steps']} steps of {c['batch']}, dim {c['dim']}, row-wise Adagrad lr {c['lr']}, "
        f"{c['eval_batches']} held-out batches"
    )
    for dataset in datasets:
        d = results[dataset]
        print(f"{dataset}: {d['source']}")
        print(f"  {'storage':8s} {'AUC':>8s} {'logloss':>8s} {'AUC loss':>9s} {'bytes/row':>10s} {'train s':>8s}")
        for storage, r in d["runs"].items():
            print(
                f"  {storage:8s} {r['auc']:8.4f} {r['logloss']:8.4f} {r['auc_loss_vs_float32']:+9.4f} "
                f"{r['bytes_per_row']:10.1f} {r['train_s']:8.1f}"
            )
        loss = d["runs"]["int8"]["auc_loss_vs_float32"]
        verdict = "within" if loss <= MAX_INT8_AUC_LOSS else "OVER"
        print(f"  int8 AUC loss {loss:+.4f}: {verdict} the {MAX_INT8_AUC_LOSS} bound")
