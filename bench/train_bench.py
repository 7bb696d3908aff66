"""`embps bench train`: training samples/s through the PS (sync and async) versus in process.

Same model (DLRM-style), same synthetic Criteo-shaped data, same run:
  - ps-sync / ps-async: `embps launch` with W workers and S shards on this machine;
  - in-process: one process, the same trainer with the tables in its own memory (no RPC, no
    all_to_all), using every core.
Rates are measured from the first step to the last (process start-up excluded), and the PS runs
report rank 0's time split: lookup, compute (forward, backward, DDP all-reduce), all_to_all, push.
--standbys adds ps-sync with a standby per shard (etcd as the arbiter, started here) to each round,
and prints its rate as a ratio of ps-sync's. --serving does the same with a serving replica beside
the job (`[[launch.serving]]`, consistency "step"), which follows every table of every shard as
production mirrors training: what a live replica costs the training on the same machine.
With `--peer torchrec`, each round also trains the same model on the same data with TorchRec
(bench/torchrec_peer.py: DistributedModelParallel over W gloo ranks, table-wise, fused row-wise
Adagrad) and reports embps / TorchRec.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.machine import machine_facts
from bench.ports import free_ports, loopback_shards
from ps import toml_writer
from ps.job_config import ArbiterConfig, JobConfig, dump_job_config
from ps.process.python_command import python_path
from ps.table.config import EvictionConfig, EvictionPolicy, OptimizerConfig, OptimizerKind, TableConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TrainBenchConfig:
    steps: int = 60
    batch: int = 2048
    dim: int = 64
    num_tables: int = 26
    num_keys: int = 100_000
    workers: int = 2
    shards: int = 2
    staleness: int = 1
    shared_table: bool = False  # all features in one table (keys are salted per feature)
    capacity: int | None = None  # rows per shard and table, LRU eviction (in process: capacity x shards)
    repeat: int = 1  # runs of each mode, interleaved; the fastest counts (a shared machine's noise is one-sided)
    standbys: bool = False  # also ps sync with a standby per shard
    serving: bool = False  # also ps sync with a serving replica following the job
    peer: str | None = None  # "torchrec": TorchRec's DistributedModelParallel in the same rounds
    torchrec_path: str = str(REPO_ROOT / ".venv" / "torchrec")  # where `make torchrec` installs it
    out: str | None = None


def _job_toml(
    config: TrainBenchConfig, mode: str, out: Path, arbiter: str | None = None, serving: bool = False,
    in_process: bool = False,
) -> str:
    """arbiter: etcd's endpoint; then every shard has a standby. serving: `embps launch` starts a
    serving replica of every table beside the job. in_process: the tables hold every shard's rows
    (the in-process run's one table per feature gets config.capacity x shards)."""
    num_tables = 1 if config.shared_table else config.num_tables
    bound: dict = {}
    if config.capacity is not None:
        capacity = config.capacity * (config.shards if in_process else 1)
        bound = {"capacity": capacity, "eviction": EvictionConfig(policy=EvictionPolicy.LRU)}
    tables = tuple(
        TableConfig(
            f"t{i}", dim=config.dim, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.05), **bound
        )
        for i in range(num_tables)
    )
    shards = loopback_shards(config.shards, standbys=bool(arbiter))
    job = JobConfig(job=f"bench-{mode}{'-standby' if arbiter else ''}", shards=shards, tables=tables)
    if arbiter:
        job = replace(job, arbiter=ArbiterConfig(endpoints=arbiter))
    ps = dump_job_config(job)
    train = {
        "workers": config.workers,
        "steps": config.steps,
        "batch_size": config.batch,
        "mode": mode,
        "staleness": config.staleness,
        "tables": [f"t{i}" for i in range(num_tables)],
        "output_dir": str(out),
    }
    synthetic = {"num_sparse": config.num_tables, "num_keys": config.num_keys, "num_batches": config.steps + 1}
    blocks = [
        toml_writer.table("train", train),
        toml_writer.table("model", {"bottom_sizes": [256, config.dim], "top_sizes": [256, 64]}),
        toml_writer.table("data", {"source": "synthetic"}),
        toml_writer.table(("data", "synthetic"), synthetic),
    ]
    if serving:
        listen, metrics_port = free_ports(2)
        replica = {"listen": f"127.0.0.1:{listen}", "metrics_port": metrics_port}
        blocks.append(toml_writer.table(("launch", "serving"), replica, array=True))
    return ps + "\n" + toml_writer.document(blocks)


def _run_ps(
    config: TrainBenchConfig, mode: str, workdir: Path, arbiter: str | None = None, serving: bool = False
) -> dict:
    name = f"{mode}-standby" if arbiter else f"{mode}-serving" if serving else mode
    out = workdir / name
    path = workdir / f"{name}.toml"
    path.write_text(_job_toml(config, mode, out, arbiter, serving))
    standbys = " (a standby each)" if arbiter else ""
    replica = " and a serving replica" if serving else ""
    print(
        f"[{name}] embps launch: {config.workers} workers, {config.shards} shards{standbys}{replica}, "
        f"{config.steps} steps",
        flush=True,
    )
    result = subprocess.run(
        [sys.executable, "-m", "embps", "launch", str(path)],
        cwd=REPO_ROOT,
        timeout=1800,
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed: {result.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"samples_per_s": summary["samples_per_s"], "times_rank0": summary["times_rank0"]}


def _run_in_process(config: TrainBenchConfig, workdir: Path) -> dict:
    from ps.process.malloc import tune_malloc_here
    from worker.data_sources import train_reader
    from worker.local_tables import LocalTables
    from worker.model import DLRMDenseTower
    from worker.train_config import load_training_job
    from worker.trainer import Trainer

    path = workdir / "in-process.toml"
    path.write_text(_job_toml(config, "sync", workdir / "in-process", in_process=True))
    job = load_training_job(path)
    tune_malloc_here()  # as a worker does (worker/worker_main.py): the yardstick gets what the workers get
    torch.set_num_threads(os.cpu_count() or 1)
    store = LocalTables(list(job.ps.tables))
    trainer = Trainer(job, DLRMDenseTower(job.model), store, rank=0, world_size=1)
    reader = iter(train_reader(job, 0, 1))
    print(f"[in-process] 1 process, {config.steps} steps", flush=True)
    # The window the PS runs' workers time (worker/worker_main.py) and the TorchRec peer's: from
    # before the first batch is read and its rows looked up to the last step's end.
    start = time.perf_counter()
    pulled = trainer.pull_timed(next(reader))
    for step in range(config.steps):
        _, _ = trainer.train_step(pulled)
        if step + 1 < config.steps:
            pulled = trainer.pull_timed(next(reader))
    elapsed = time.perf_counter() - start
    return {"samples_per_s": config.steps * config.batch / elapsed, "times": trainer.times.as_dict()}


def _run_with_standbys(config: TrainBenchConfig, workdir: Path) -> dict:
    from bench.etcd_server import EtcdServer, etcd_missing

    missing = etcd_missing()
    if missing is not None:
        raise SystemExit(f"embps bench train: --standbys needs etcd as the arbiter: {missing}")
    with EtcdServer.start(workdir / "etcd") as etcd:
        return _run_ps(config, "sync", workdir, etcd.endpoint)


def check_peer(config: TrainBenchConfig) -> str | None:
    """None when the peer can run, else why not (before any run starts)."""
    if config.peer is None:
        return None
    if config.peer != "torchrec":
        return f"--peer: only 'torchrec' is known, got {config.peer!r}"
    if config.capacity is not None:
        return "--capacity: TorchRec's tables have no capacity and evict nothing; run the peer without it"
    probe = subprocess.run(
        [sys.executable, "-c", "import torchrec.distributed.model_parallel"],
        cwd=REPO_ROOT,
        env=_peer_env(config),
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"--peer torchrec: torchrec is not importable from {config.torchrec_path} ({last}); "
            "`make torchrec` installs it there (or pass --torchrec-path)"
        )
    return None


def _peer_env(config: TrainBenchConfig) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": python_path(config.torchrec_path, str(REPO_ROOT))}


def _run_torchrec(config: TrainBenchConfig, workdir: Path) -> dict:
    path = workdir / "torchrec.toml"
    path.write_text(_job_toml(config, "sync", workdir / "torchrec"))
    out = workdir / "torchrec.json"
    (port,) = free_ports(1)
    print(f"[torchrec] DistributedModelParallel: {config.workers} gloo ranks, {config.steps} steps", flush=True)
    env = {**_peer_env(config), "WORLD_SIZE": str(config.workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.torchrec_peer", "--config", str(path), "--out", str(out)],
            cwd=REPO_ROOT,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(config.workers)
    ]
    errors = [p.communicate(timeout=1800)[1] for p in ranks]
    failed = [(rank, p.returncode) for rank, p in enumerate(ranks) if p.returncode != 0]
    if failed:
        rank, code = failed[0]
        raise RuntimeError(f"torchrec rank {rank} failed (exit {code}): {errors[rank][-2000:]}")
    return json.loads(out.read_text())


# (run, yardstick) pairs whose ratio is reported round by round
_ROUND_RATIOS = (
    ("ps_sync", "in_process"),
    ("ps_async", "in_process"),
    ("ps_sync_standby", "ps_sync"),
    ("ps_sync_serving", "ps_sync"),
    ("ps_sync", "torchrec"),
    ("ps_async", "torchrec"),
)


def round_ratios(runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """"run/yardstick" -> the ratio of their samples/s in each round. The runs of one round share
    the machine's moment; the fastest of each mode (the table) may pair runs of different moments,
    and on this shared VM the in-process rate moves by a third from one round to the next."""
    out = {}
    for run, yardstick in _ROUND_RATIOS:
        if run in runs and yardstick in runs:
            pairs = zip(runs[run], runs[yardstick], strict=True)
            out[f"{run}/{yardstick}"] = [a["samples_per_s"] / b["samples_per_s"] for a, b in pairs]
    return out


def measure(config: TrainBenchConfig) -> dict:
    """In process, ps sync and ps async on one model shape, one after the other."""
    results: dict[str, object] = {"bench": "train", "config": asdict(config), "machine": machine_facts()}
    runs: dict[str, list[dict]] = {"in_process": [], "ps_sync": [], "ps_async": []}
    if config.standbys:
        runs["ps_sync_standby"] = []
    if config.serving:
        runs["ps_sync_serving"] = []
    if config.peer == "torchrec":
        runs["torchrec"] = []
    for attempt in range(config.repeat):
        with tempfile.TemporaryDirectory(prefix="embps-bench-train-") as tmp:
            workdir = Path(tmp)
            if config.repeat > 1:
                print(f"round {attempt + 1} of {config.repeat}", flush=True)
            order = [
                ("in_process", functools.partial(_run_in_process, config, workdir)),
                ("ps_sync", functools.partial(_run_ps, config, "sync", workdir)),
                ("ps_sync_standby", functools.partial(_run_with_standbys, config, workdir)),
                ("ps_sync_serving", functools.partial(_run_ps, config, "sync", workdir, serving=True)),
                ("ps_async", functools.partial(_run_ps, config, "async", workdir)),
                ("torchrec", functools.partial(_run_torchrec, config, workdir)),
            ]
            # Every other round in the reverse order: no run always comes first, or after the same
            # one, so a drift within a round does not weigh on one side of a ratio only.
            for name, run in order if attempt % 2 == 0 else order[::-1]:
                if name in runs:
                    runs[name].append(run())
    for name, tries in runs.items():
        results[name] = max(tries, key=lambda r: r["samples_per_s"])
        results[name]["all_samples_per_s"] = [r["samples_per_s"] for r in tries]
    results["round_ratios"] = round_ratios(runs)
    return results


def print_results(results: dict) -> None:
    config = TrainBenchConfig(**results["config"])
    base = results["in_process"]["samples_per_s"]
    layout = "one shared table" if config.shared_table else f"{config.num_tables} tables"
    bound = "" if config.capacity is None else f", full tables of {config.capacity:,} rows per shard (LRU)"
    print(
        f"\nembps bench train: dim {config.dim}, {config.num_tables} sparse features in {layout}, "
        f"global batch {config.batch}, {config.num_keys:,} keys per feature{bound}"
    )
    print(f"{'run':16s} {'samples/s':>10s} {'vs in-process':>14s}   rank-0 seconds: lookup / compute / a2a / push")
    for name in ("in_process", "ps_sync", "ps_sync_standby", "ps_sync_serving", "ps_async"):
        if name not in results:
            continue
        r = results[name]
        t = r.get("times_rank0") or r["times"]
        print(
            f"{name:16s} {r['samples_per_s']:10,.0f} {r['samples_per_s'] / base:13.2f}x   "
            f"{t['lookup_s']:.2f} / {t['compute_s']:.2f} / {t['all_to_all_s']:.2f} / {t['push_s']:.2f}"
        )
    print(
        "  (rank 0's training thread: in sync runs push includes the barrier after it and the wait for the "
        "previous step's Commit; in async runs lookup and push are its waits for the prefetched lookup and "
        "for pushes in flight, whose exchange and RPCs run on the push thread, untimed)"
    )
    if "ps_sync_standby" in results:
        ratio = results["ps_sync_standby"]["samples_per_s"] / results["ps_sync"]["samples_per_s"]
        print(f"ps sync with standbys / without: {ratio:.2f}x (target >= 0.8x)")
    if "ps_sync_serving" in results:
        ratio = results["ps_sync_serving"]["samples_per_s"] / results["ps_sync"]["samples_per_s"]
        print(f"ps sync with a serving replica beside it / without: {ratio:.2f}x")
    if "torchrec" in results:
        peer = results["torchrec"]["samples_per_s"]
        print(
            f"{'torchrec':16s} {peer:10,.0f} {peer / base:13.2f}x   "
            f"DistributedModelParallel, {config.workers} gloo ranks, table-wise, fused row-wise Adagrad"
        )
        print(
            f"embps / TorchRec: sync {results['ps_sync']['samples_per_s'] / peer:.2f}x, "
            f"async {results['ps_async']['samples_per_s'] / peer:.2f}x"
        )
    rounds = results.get("round_ratios", {})
    if any(len(ratios) > 1 for ratios in rounds.values()):
        print("ratios round by round (the runs of one round are measured one after the other):")
        for pair, ratios in rounds.items():
            each = " ".join(f"{r:.2f}x" for r in ratios)
            print(f"  {pair.replace('/', ' / '):28s} {each}   median {statistics.median(ratios):.2f}x")


def shapes(config: TrainBenchConfig) -> list[TrainBenchConfig]:
    """The model shapes of `--shapes all`: the configured tables, the same features in one shared
    table, and 200 tables of dim 16 (a model with many small features)."""
    return [
        replace(config, shared_table=False),
        replace(config, shared_table=True),
        replace(config, shared_table=False, num_tables=200, dim=16),
    ]


def run_train_bench(config: TrainBenchConfig, all_shapes: bool = False) -> int:
    if (problem := check_peer(config)) is not None:
        print(f"embps bench train: {problem}", file=sys.stderr)
        return 2
    runs = [measure(c) for c in (shapes(config) if all_shapes else [config])]
    for results in runs:
        print_results(results)
    if config.out:
        # The first shape at the top (what `embps bench report` reads), the others beside it.
        Path(config.out).write_text(json.dumps({**runs[0], "other_shapes": runs[1:]}, indent=2))
        print(f"wrote {config.out}")
    return 0
