"""`embps bench ps`: lookup and push rates through local shard processes over gRPC.

Shards and client processes share this machine's cores. Each phase runs C client processes
(C in --clients) that each make `batches` calls of `batch` Zipf keys, all started together; a
call is one PSClient.lookup/push, i.e. one RPC per shard in parallel. Printed beside the rates:
the in-process EmbeddingTable rate on the same key stream (the ceiling without RPC), and the
server and client CPU time per call, which say where the time goes. The server's is also given in
empty gRPC calls measured in the same run (bench/rpc_floor.py): a call is one RPC per shard, so 2
shards that each spent one empty call's CPU read 2.0 (with standbys, the standbys' CPU counts too).

--tables N makes each call one multi-table round: the batch's keys spread over N tables (batch / N
each), one LookupMulti or PushMulti RPC per shard, as a trainer's step sends them; the in-process
line is then the same rounds through ps/table/multi.py without RPC.

--standbys both runs the same phases on shards without and with a standby each (etcd started here
as the arbiter; a push is acknowledged once the standby applied it) and prints each phase's rate
with standbys as a ratio of the one without, measured in the same run: both clusters are up at
once, and each phase without standbys is followed at once by the same phase with them (before,
each mode had its own cluster, started in turn, and one pair of phases ~15 s apart moved from
0.57x to 0.74x between runs on a shared machine). --repeat N runs N rounds, each mode once per
round, and gives each round's ratio and their median.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.keys import ZipfSampler
from bench.machine import process_cpu_seconds
from bench.ports import loopback_shards
from bench.rpc_floor import measure_rpc_floor
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, dump_job_config
from ps.process import children
from ps.process.python_command import python_path
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE = "emb"


@dataclass(frozen=True)
class PSBenchConfig:
    shards: int = 2
    dim: int = 64
    batch: int = 4096
    batches: int = 300
    rows: int = 1_000_000
    zipf: float = 1.05
    clients: tuple[int, ...] = (1, 4)
    tables: int = 1  # > 1: each call is one LookupMulti / PushMulti round over this many tables
    malloc: str = "tuned"  # "tuned", "default" or "both": glibc thresholds of the shard processes
    standbys: str = "off"  # "off", "on" or "both": a standby per shard
    repeat: int = 1  # rounds, each mode once per round
    out: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.tables <= self.batch:
            raise ValueError(f"tables: must be in [1, batch = {self.batch}], got {self.tables}")
        if self.repeat < 1:
            raise ValueError(f"repeat: must be >= 1, got {self.repeat}")


def _tables(config: PSBenchConfig) -> tuple[TableConfig, ...]:
    names = [TABLE] if config.tables == 1 else [f"{TABLE}{i}" for i in range(config.tables)]
    optimizer = OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.01)
    return tuple(TableConfig(name, dim=config.dim, optimizer=optimizer) for name in names)


def _table_offsets(config: PSBenchConfig) -> np.ndarray:
    """(tables + 1,) where each table's keys start in a call's batch (the last takes the remainder)."""
    offsets = np.arange(config.tables + 1, dtype=np.int64) * (config.batch // config.tables)
    offsets[-1] = config.batch
    return offsets


def start_shards(job: JobConfig, workdir: Path, malloc_tuned: bool) -> list[subprocess.Popen]:
    """Every shard of `job` (and its standby, where it has one) as `embps ps` processes, logs in
    `workdir`; returns once every shard answers Stats. Primary then standby, shard by shard."""
    from ps.client import PSClient

    config_path = workdir / "job.toml"
    config_path.write_text(dump_job_config(job))
    env = {**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT))}
    flags = [] if malloc_tuned else ["--no-malloc-tuning"]
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)
    procs = []
    for i, shard in enumerate(job.shards):
        cmd = [sys.executable, "-m", "embps", "ps", "--config", str(config_path), "--shard", str(i), *flags]
        for role, extra in (("", []), ("-standby", ["--standby"] if shard.standby else None)):
            if extra is None:
                continue
            with open(workdir / f"shard-{i}{role}.log", "wb") as log:
                procs.append(  # SIGTERM when this process dies, even by SIGKILL
                    children.popen_dying_with_parent(
                        [*cmd, *extra], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
    with PSClient.from_job(job, max_attempts=10_000, deadlines=Deadlines(stats=60.0)) as client:
        client.stats()  # retried on UNAVAILABLE until every shard serves
    return procs


def _client_main(job: JobConfig, config: PSBenchConfig, verb: str, seed: int, barrier, queue, bench_pid: int) -> None:
    """One client process: warm up, wait for the others, make `batches` calls, report."""
    from ps.client import PSClient

    children.die_with_parent()  # a bench killed by SIGKILL leaves no client calling on
    if os.getppid() != bench_pid:  # it died before the prctl: no signal will come
        return

    sampler = ZipfSampler(config.rows, config.zipf, seed=seed)
    pool = [sampler.keys(config.batch) for _ in range(min(config.batches, 64))]
    rng = np.random.default_rng(seed)
    grads = (rng.standard_normal((config.batch, config.dim)) * 0.01).astype(np.float32)
    names = [t.name for t in job.tables]
    offsets = _table_offsets(config)
    with PSClient.from_job(job) as client:
        if config.tables > 1 and verb == "lookup":
            call = lambda k: client.lookup_multi(names, k, offsets)  # noqa: E731
        elif config.tables > 1:
            call = lambda k: client.send_push(client.prepare_push_multi(names, k, offsets, grads))  # noqa: E731
        else:
            call = (lambda k: client.lookup(TABLE, k)) if verb == "lookup" else (lambda k: client.push(TABLE, k, grads))
        for keys in pool[:3]:
            call(keys)
        barrier.wait()
        latencies = np.empty(config.batches)
        cpu0 = time.process_time()
        start = time.monotonic()
        for i in range(config.batches):
            t0 = time.perf_counter()
            call(pool[i % len(pool)])
            latencies[i] = time.perf_counter() - t0
        end = time.monotonic()
        cpu = time.process_time() - cpu0
    queue.put({"start": start, "end": end, "cpu": cpu, "latencies": latencies.tolist()})


def _phase(job: JobConfig, config: PSBenchConfig, procs, verb: str, clients: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    queue = ctx.Queue()
    workers = [
        ctx.Process(
            target=_client_main,
            args=(job, config, verb, 1000 * clients + i, barrier, queue, os.getpid()),
            daemon=True,
        )
        for i in range(clients)
    ]
    for w in workers:
        w.start()
    barrier.wait(timeout=300)
    server_cpu0 = [process_cpu_seconds(p.pid) for p in procs]
    results = [queue.get(timeout=600) for _ in workers]
    server_cpu = sum(process_cpu_seconds(p.pid) for p in procs) - sum(server_cpu0)
    for w in workers:
        w.join(60)
    calls = clients * config.batches
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    latencies = np.concatenate([r["latencies"] for r in results])
    return {
        "verb": verb,
        "clients": clients,
        "keys_per_s": calls * config.batch / wall,
        "calls_per_s": calls / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "server_cpu_ms_per_call": server_cpu / calls * 1e3,
        "client_cpu_ms_per_call": sum(r["cpu"] for r in results) / calls * 1e3,
        "wall_s": wall,
    }


def _in_process(config: PSBenchConfig) -> dict:
    """The same key stream through the tables in this process: the rate without RPC (one
    EmbeddingTable; with --tables, ps/table/multi.py's rounds, the shard's own path)."""
    import torch

    from ps.table.embedding_table import EmbeddingTable

    torch.set_num_threads(1)
    tables = [EmbeddingTable(t) for t in _tables(config)]
    sampler = ZipfSampler(config.rows, config.zipf, seed=1)
    batches = [sampler.keys(config.batch) for _ in range(min(config.batches, 64))]
    grads = (np.random.default_rng(0).standard_normal((config.batch, config.dim)) * 0.01).astype(np.float32)
    if config.tables == 1:
        lookup, push = tables[0].lookup, lambda k: tables[0].apply_gradients(k, grads)
    else:
        lookup, push = _multi_rounds(config, tables, grads)
    for keys in batches:
        push(keys)
    out = {"unique_fraction": float(np.mean([np.unique(b).shape[0] / b.shape[0] for b in batches]))}
    for verb, fn in (("lookup", lookup), ("push", push)):
        start = time.perf_counter()
        for i in range(config.batches):
            fn(batches[i % len(batches)])
        out[f"{verb}_keys_per_s"] = config.batches * config.batch / (time.perf_counter() - start)
    return out


def _multi_rounds(
    config: PSBenchConfig, tables: list, grads: np.ndarray
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], None]]:
    """(lookup(keys), push(keys)) of one multi-table round in process: what a shard does with a
    LookupMulti, and with a PushMulti whose client summed each table's equal keys (as PSClient does)."""
    from ps import native
    from ps.table import multi

    offsets = _table_offsets(config)
    tags = np.repeat(np.arange(config.tables, dtype=np.int64), np.diff(offsets))
    sightings = np.ones(grads.shape[0], dtype=np.float32)  # one a key

    def push(keys: np.ndarray) -> None:
        distinct, sums, starts, counts = native.sum_by_table_key(keys, tags, grads, config.tables, counts=sightings)
        multi.push_tables(tables, distinct, starts, sums.reshape(-1), np.rint(counts).astype(np.int64), None)

    return (lambda keys: multi.lookup_tables(tables, keys, offsets)), push


def start_etcd(workdir: Path):
    """A real etcd for the standbys' arbiter (SystemExit saying why when it cannot run here)."""
    from bench.etcd_server import EtcdServer, etcd_missing

    missing = etcd_missing()
    if missing is not None:
        raise SystemExit(f"embps bench ps: --standbys needs etcd as the arbiter: {missing}")
    return EtcdServer.start(workdir / "etcd")


def _standby_ratios(phases: list[dict]) -> list[dict]:
    """keys/s with standbys over keys/s without, for each (malloc, verb, clients) measured both ways:
    one ratio per round (the two phases of one round), in "rounds", and their median, "ratio"."""
    by_key = {(p["malloc"], p["verb"], p["clients"], p["standby"], p.get("round", 1)): p for p in phases}
    rounds: dict[tuple[str, str, int], list[float]] = {}
    for (malloc, verb, clients, standby, round_), with_ in by_key.items():
        without = by_key.get((malloc, verb, clients, False, round_))
        if standby and without is not None:
            rounds.setdefault((malloc, verb, clients), []).append(with_["keys_per_s"] / without["keys_per_s"])
    return [
        {"malloc": malloc, "verb": verb, "clients": clients, "ratio": float(np.median(ratios)), "rounds": ratios}
        for (malloc, verb, clients), ratios in rounds.items()
    ]


def _start_cluster(
    config: PSBenchConfig, standby: bool, tuned: bool, stack: contextlib.ExitStack
) -> tuple[JobConfig, list[subprocess.Popen]]:
    """The bench's shards (each with a standby, and etcd as their arbiter, when `standby`) on fresh
    ports in a folder of their own, serving; `stack` stops them and removes the folder."""
    job = JobConfig(
        job="bench",
        shards=loopback_shards(config.shards, standby),
        tables=_tables(config),
        deadlines=Deadlines(lookup=60.0, push=60.0, stats=60.0),
    )
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="embps-bench-ps-")))
    if standby:
        etcd = start_etcd(workdir)
        stack.callback(etcd.stop)
        job = dataclasses.replace(job, arbiter=ArbiterConfig(endpoints=etcd.endpoint))
    procs: list[subprocess.Popen] = []
    stack.callback(children.stop_all, procs, 30.0)
    procs += start_shards(job, workdir, tuned)
    return job, procs


def run_ps_bench(config: PSBenchConfig) -> int:
    from bench.machine import machine_facts

    mallocs = {"tuned": [True], "default": [False], "both": [False, True]}[config.malloc]
    with_standbys = {"off": [False], "on": [True], "both": [False, True]}[config.standbys]
    spread = f" over {config.tables} tables (LookupMulti / PushMulti)" if config.tables > 1 else ""
    print(
        f"embps bench ps: {config.shards} shards, dim {config.dim}, batch {config.batch}{spread}, Zipf({config.zipf}) "
        f"over {config.rows:,} keys, {config.batches} calls per client, {os.cpu_count()} cores shared"
    )
    results: dict[str, object] = {"config": asdict(config), "machine": machine_facts()}
    in_process = _in_process(config)
    results["in_process"] = in_process
    print(
        f"in-process table (1 thread): lookup {in_process['lookup_keys_per_s'] / 1e6:.2f} M keys/s, "
        f"push {in_process['push_keys_per_s'] / 1e6:.2f} M keys/s; "
        f"{in_process['unique_fraction']:.0%} of a batch's keys are unique"
    )
    floor = measure_rpc_floor()
    results["rpc_floor"] = asdict(floor)
    print(
        f"empty gRPC call (grpc.aio server, one blocking client): {floor.calls_per_s:,.0f} calls/s, CPU per call "
        f"server {floor.server_cpu_ms:.3f} ms, client {floor.client_cpu_ms:.3f} ms"
    )
    header = (
        f"{'round':>5} {'malloc':>8} {'standby':>7} {'verb':>6} {'clients':>7} {'M keys/s':>9} {'calls/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'server CPU ms/call':>19} {'in empty calls':>15} {'client CPU ms/call':>19}"
    )
    print(header)
    phases = []
    for round_ in range(1, config.repeat + 1):
        for tuned in mallocs:
            with contextlib.ExitStack() as stack:
                # Every cluster of the round at once, so that the phases compared (with and without
                # standbys) run back to back, seconds apart, on a machine that moves between minutes.
                clusters = [(standby, *_start_cluster(config, standby, tuned, stack)) for standby in with_standbys]
                for verb in ("push", "lookup"):
                    for clients in config.clients:
                        # With and without standbys in turn, first one then the other every
                        # other round: a drift within a round weighs on neither side only.
                        for standby, job, procs in clusters if round_ % 2 else clusters[::-1]:
                            r = _phase(job, config, procs, verb, clients)
                            r.update(malloc="tuned" if tuned else "default", standby=standby, round=round_)
                            r["server_empty_calls"] = r["server_cpu_ms_per_call"] / floor.server_cpu_ms
                            phases.append(r)
                            print(
                                f"{round_:>5} {r['malloc']:>8} {'yes' if standby else 'no':>7} {verb:>6} "
                                f"{clients:>7} {r['keys_per_s'] / 1e6:>9.2f} "
                                f"{r['calls_per_s']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                                f"{r['server_cpu_ms_per_call']:>19.2f} {r['server_empty_calls']:>15.1f} "
                                f"{r['client_cpu_ms_per_call']:>19.2f}"
                            )
    results["phases"] = phases
    if len(with_standbys) == 2:
        results["standby_ratios"] = _standby_ratios(phases)
        for r in results["standby_ratios"]:
            each = f" (rounds {' '.join(f'{x:.2f}x' for x in r['rounds'])}, median)" if len(r["rounds"]) > 1 else ""
            print(
                f"with standbys / without ({r['malloc']} malloc): {r['verb']} x{r['clients']} clients "
                f"{r['ratio']:.2f}x{each}" + (" (target >= 0.7x)" if r["verb"] == "push" else "")
            )
    results["max_rusage_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {config.out}")
    return 0
