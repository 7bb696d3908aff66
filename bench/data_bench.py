"""`embps bench data`: input rows/s of the TSV and Parquet readers with W = 1, 2, 4 ranks as processes.

    generate N Criteo-like rows (Zipf categorical values over a large vocabulary, empty fields)
      -> one TSV file and one Parquet file (row groups of --row-group rows)
    for format in (tsv, parquet), for W in --workers:
      start W processes at once; rank r builds its reader (footers, byte ranges: its share) and
      reads every local batch of its share; it reports rows, parsed rows and seconds
    aggregate rows/s = rows of all ranks / slowest rank's seconds

Each rank is told LOCAL_WORLD_SIZE = W, as torchrun tells the ranks of one node, so its reader
sizes Arrow's thread pool to its part of the cores (worker/readers.py::configure_arrow). Besides
rows/s, each rank reports its process CPU time (all its threads, user + system) and minor page
faults over the measured window: CPU per row depends much less than rows/s on what else runs on
a shared machine, and it shows where extra work of W ranks goes (per-process start-up costs,
memory first touched, threads fighting for cores).

Yardstick: the same format with W = 1, measured in the same run. Since each rank parses only its
share, the aggregate of W ranks should stay near one rank's (the machine's cores bound it); when
every rank parsed every row, W ranks each got 1/W of one rank's rate. Each rank's parsed count is
checked against its share plus one unit (a row group, a byte range's lines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import flags
from bench.machine import machine_facts
from worker.data_options import ArrowMemoryPool

FORMATS = ("tsv", "parquet")
MIN_SCALING = 0.8  # aggregate of W ranks / one rank, the bound on a 2-core machine
MIN_PARQUET_ROWS_PER_S = 1_000_000


@dataclass(frozen=True)
class DataBenchConfig:
    rows: int = 1_000_000
    batch: int = 4096  # global batch size (divisible by every W)
    workers: tuple[int, ...] = (1, 2, 4)
    formats: tuple[str, ...] = FORMATS
    repeats: int = 3  # runs of each (format, W), interleaved; the best is kept (the machine is shared)
    row_group: int = 50_000  # Parquet rows per row group
    vocab: int = 200_000  # distinct values per categorical feature
    zipf: float = 1.05
    memory_pool: str = "auto"  # ReaderConfig.arrow_memory_pool of every rank
    shuffle_buffer: int = 0  # ReaderConfig.shuffle_buffer of every rank (rows)
    out: str | None = None


def write_data(config: DataBenchConfig, folder: Path) -> dict[str, Path]:
    """Writes the rows as Criteo TSV and as Parquet (typed numbers, string categoricals)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = config.rows
    vocab = pa.array([f"{v:08x}" for v in rng.integers(0, 1 << 32, size=config.vocab, dtype=np.uint64)])
    weights = 1.0 / np.arange(1, config.vocab + 1) ** config.zipf
    cdf = np.cumsum(weights / weights.sum())
    columns: dict[str, pa.Array] = {"label": pa.array(rng.integers(0, 2, size=n))}
    for i in range(13):
        values = np.floor(rng.exponential(20.0, size=n)).astype(np.int64)
        columns[f"I{i + 1}"] = pa.array(values, mask=rng.random(n) < 0.15)
    for f in range(26):
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), config.vocab - 1)
        values = vocab.take(pa.array(ranks))
        columns[f"C{f + 1}"] = pc_if_null(values, rng.random(n) < 0.1)
    table = pa.table(columns)
    paths = {"tsv": folder / "rows.tsv", "parquet": folder / "rows.parquet"}
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    pacsv.write_csv(table, paths["tsv"], write_options=options)
    # At least two row groups per rank at the largest W, so every rank has a share.
    row_group = max(1, min(config.row_group, n // (2 * max(config.workers))))
    pq.write_table(table, paths["parquet"], row_group_size=row_group)
    return paths


def pc_if_null(values, null_mask: np.ndarray):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pa.array(null_mask), pa.scalar(None, values.type), values)


def read_share(
    kind: str, path: str, batch: int, rank: int, world_size: int, memory_pool: str, shuffle_buffer: int = 0
) -> dict:
    """One rank: builds its reader and reads its whole share; returns its counts, seconds and CPU.

    It says "ready" once its imports are done and starts on the "go" line from stdin, so no
    rank reads while another still imports. The window starts before the reader is built."""
    from worker.criteo import CriteoTsvReader
    from worker.parquet_reader import ParquetReader
    from worker.readers import ReaderConfig

    cls = CriteoTsvReader if kind == "tsv" else ParquetReader
    config = ReaderConfig(
        global_batch_size=batch, drop_last=False, arrow_memory_pool=memory_pool, shuffle_buffer=shuffle_buffer
    )
    print("ready", flush=True)
    sys.stdin.readline()
    usage_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    cpu_start = time.process_time()
    reader = cls([path], config, rank, world_size)
    batches = iter(reader)
    rows = len(next(batches))
    first_seconds = time.perf_counter() - start
    first_cpu_seconds = time.process_time() - cpu_start
    rows += sum(len(b) for b in batches)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rank": rank,
        "rows": rows,
        "parsed": reader.num_parsed,
        "share": [u.part for u in reader.share(0)],
        "units": [[u.start, u.end] for u in reader.units_by_file[0]],  # by part
        "bad_rows": reader.num_bad_rows,
        "arrow_threads": reader.arrow_threads,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # every thread of the rank: its work, whatever else runs on the machine
        "system_cpu_seconds": usage.ru_stime - usage_start.ru_stime,  # page faults, reads, futexes
        "minor_faults": usage.ru_minflt - usage_start.ru_minflt,
        "first_batch_seconds": first_seconds,  # reader built, first local batch out
        "first_batch_cpu_seconds": first_cpu_seconds,
    }


def _run_ranks(kind: str, path: Path, config: DataBenchConfig, world_size: int) -> dict:
    code = (
        "import json, sys; from bench.data_bench import read_share; "
        "print(json.dumps(read_share(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "
        "sys.argv[6], int(sys.argv[7]))))"
    )
    root = Path(__file__).resolve().parent.parent
    # The ranks share this machine's cores, as the local ranks of one node do.
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(world_size)}
    load_average = os.getloadavg()[0]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                kind,
                str(path),
                str(config.batch),
                str(r),
                str(world_size),
                config.memory_pool,
                str(config.shuffle_buffer),
            ],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            proc.wait(timeout=60)
            raise RuntimeError(f"{kind} W={world_size}: a rank failed to start: {proc.stderr.read()[-2000:]}")
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    ranks = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} W={world_size}: a rank failed: {err[-2000:]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    rows = sum(r["rows"] for r in ranks)
    slowest = max(r["seconds"] for r in ranks)
    cpu = sum(r["cpu_seconds"] for r in ranks)
    return {
        "world_size": world_size,
        "rows": rows,
        "seconds": slowest,
        "rows_per_s": rows / slowest,
        "rows_per_cpu_s": rows / cpu,
        "cpu_ns_per_row": cpu / rows * 1e9,
        "system_cpu_seconds": sum(r["system_cpu_seconds"] for r in ranks),
        "minor_faults": sum(r["minor_faults"] for r in ranks),
        "first_batch_cpu_seconds": sum(r["first_batch_cpu_seconds"] for r in ranks),
        "load_average_1m": load_average,  # at the start: other work on the machine
        "ranks": ranks,
    }


def _check_share(kind: str, path: Path, run: dict) -> bool:
    """Each rank parsed exactly the rows of its units, at most its share of the rows plus one unit.

    A unit's rows: a row group's rows (Parquet), the lines that begin in a byte range (TSV)."""
    units = run["ranks"][0]["units"]
    if kind == "parquet":
        rows_in = [end for _, end in units]
    else:
        data = np.fromfile(path, dtype=np.uint8)
        starts = np.concatenate([[0], np.flatnonzero(data[:-1] == ord("\n")) + 1])
        rows_in = [int(np.searchsorted(starts, e) - np.searchsorted(starts, s)) for s, e in units]
    total = sum(rows_in)
    ok = True
    for rank in run["ranks"]:
        own = sum(rows_in[part] for part in rank["share"])
        rank["share_rows"] = own
        rank["within_share"] = rank["parsed"] == own and own <= -(-total // run["world_size"]) + max(rows_in)
        ok &= rank["within_share"]
    return ok


def run_data_bench(config: DataBenchConfig) -> int:
    try:
        ArrowMemoryPool(config.memory_pool)  # a bad name fails before any data is written
    except ValueError:
        choices = ", ".join(repr(p.value) for p in ArrowMemoryPool)
        raise ValueError(
            f"--memory-pool (arrow_memory_pool): must be one of {choices}, got {config.memory_pool!r}"
        ) from None
    if config.shuffle_buffer < 0:
        raise ValueError(f"--shuffle-buffer: must be >= 0 rows, got {config.shuffle_buffer}")
    unknown = [kind for kind in config.formats if kind not in FORMATS]
    if unknown or not config.formats:
        raise ValueError(f"--formats: expected some of {', '.join(FORMATS)}, got {', '.join(config.formats)}")
    if any(config.batch % w for w in config.workers):
        raise ValueError(f"--batch: must be divisible by every worker count {config.workers}, got {config.batch}")
    results: dict[str, object] = {"bench": "data", "config": asdict(config), "machine": machine_facts()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="embps-bench-data-") as tmp:
        print(f"[data] writing {config.rows:,} rows as TSV and Parquet", flush=True)
        paths = write_data(config, Path(tmp))
        best: dict[tuple[str, int], dict] = {}
        cpu_per_row: dict[tuple[str, int], list[float]] = {}
        for repeat in range(config.repeats):
            for kind in config.formats:
                for world_size in config.workers:
                    run = _run_ranks(kind, paths[kind], config, world_size)
                    ok &= _check_share(kind, paths[kind], run) and all(r["rows"] > 0 for r in run["ranks"])
                    parsed = ", ".join(f"{r['parsed']:,}" for r in run["ranks"])
                    cpu_per_row.setdefault((kind, world_size), []).append(run["cpu_ns_per_row"])
                    print(
                        f"[data] run {repeat + 1}/{config.repeats} {kind:7s} W={world_size}: "
                        f"{run['rows_per_s']:>12,.0f} rows/s in all, {run['cpu_ns_per_row']:>6,.0f} CPU-ns per row "
                        f"(system {run['system_cpu_seconds']:.2f} s, "
                        f"to first batches {run['first_batch_cpu_seconds']:.2f} s, "
                        f"{run['minor_faults']:,} page faults), load {run['load_average_1m']:.1f}; "
                        f"rows parsed per rank: {parsed}",
                        flush=True,
                    )
                    if (kind, world_size) not in best or run["rows_per_s"] > best[(kind, world_size)]["rows_per_s"]:
                        best[(kind, world_size)] = run
        for kind in config.formats:
            runs = [best[(kind, w)] for w in config.workers]
            one = float(np.median(cpu_per_row[(kind, config.workers[0])]))
            for run in runs:
                run["vs_one_rank"] = run["rows_per_s"] / runs[0]["rows_per_s"]
                median = float(np.median(cpu_per_row[(kind, run["world_size"])]))
                run["median_cpu_ns_per_row"] = median
                run["cpu_per_row_vs_one_rank"] = median / one
                print(
                    f"[data] best {kind:7s} W={run['world_size']}: {run['rows_per_s']:>12,.0f} rows/s "
                    f"({run['vs_one_rank']:.2f}x W={runs[0]['world_size']}); median {median:,.0f} CPU-ns per row "
                    f"({run['cpu_per_row_vs_one_rank']:.2f}x W={runs[0]['world_size']})",
                    flush=True,
                )
            results[kind] = runs
    scaling = {kind: min(r["vs_one_rank"] for r in results[kind]) for kind in config.formats}
    results["min_vs_one_rank"] = scaling
    results["checks"] = {
        "each_rank_within_its_share": ok,
        f"aggregate_at_least_{MIN_SCALING}x_one_rank": all(v >= MIN_SCALING for v in scaling.values()),
    }
    if "parquet" in results:
        results["checks"]["parquet_one_rank_rows_per_s"] = results["parquet"][0]["rows_per_s"]
    print(json.dumps(results["checks"], indent=2), flush=True)
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DataBenchConfig()
    parser.add_argument("--rows", type=flags.count, default=defaults.rows, help="rows written and read per format")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="global batch size")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated rank counts (the first is the yardstick)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats to read (tsv, parquet)")
    parser.add_argument(
        "--repeats", type=flags.count, default=defaults.repeats, help="runs of each case; the best is kept"
    )
    parser.add_argument("--row-group", type=flags.count, default=defaults.row_group, help="Parquet rows per row group")
    parser.add_argument(
        "--vocab", type=flags.count, default=defaults.vocab, help="distinct values per categorical feature"
    )
    parser.add_argument(
        "--memory-pool", default=defaults.memory_pool, help="Arrow allocator of the ranks (data.arrow_memory_pool)"
    )
    parser.add_argument(
        "--shuffle-buffer", type=int, default=defaults.shuffle_buffer, help="rows in each rank's shuffle buffer"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    workers = tuple(int(w) for w in args.workers.split(","))
    if not workers or min(workers) < 1:
        raise ValueError(f"--workers: need counts >= 1, got {args.workers!r}")
    config = DataBenchConfig(
        rows=args.rows,
        batch=args.batch,
        workers=workers,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        repeats=args.repeats,
        row_group=args.row_group,
        vocab=args.vocab,
        memory_pool=args.memory_pool,
        shuffle_buffer=args.shuffle_buffer,
        out=args.out,
    )
    return run_data_bench(config)
