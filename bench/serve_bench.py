"""`embps bench serve`: latency under open-loop load of embps serving, Redis and an in-process lookup.

    embps bench serve --target all --sweep --slo-ms 10 --rows 1000000 --dim 64 --batch 64 --zipf 1.05

Every system holds the same rows (bench/serve_targets.py) and is checked against them before
any load. Then, one system at a time (so they never share the cores with each other):
  - `--rate R`: one open-loop run at R requests/s (bench/loadgen.py);
  - `--sweep`: runs at start_rate, start_rate * step, ... until p99 passes the SLO, an error
    appears or the achieved rate falls below 90% of the offered one, then bisects between the
    last passing and the first failing rate; reports the highest rate that met the SLO.
The result: a JSON file (every run, machine facts, the ratios), a PNG of p99 vs offered rate per
system, and a printed table. Server and client CPU per call come from /proc: where the time goes.

    --tables 26 --batch 16     every request reads 16 keys in each of 26 tables (one LookupMany;
                               for Redis one MGET of all 416 keys; see bench/serve_targets.py);
                               rows are per table, so --rows 40000 holds ~1M rows in all
    --lookup-threads 1,2       the embps replica once per thread count (embps-1t, embps-2t, ...)
    --generator python         the load from Python threads (grpcio, redis-py) instead of the native
                               generator (bench/loadgen.py): the same scheduler for every system
    --rate 300 --repeat 5      5 rounds, each starting and measuring every system once in turn:
                               server CPU per call of each round, each system's against the first
                               one's of the same round, and the medians. This machine's speed moves
                               from one minute to the next, so only figures of one round compare.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.loadgen import LoadSpec, run_load
from bench.serve_targets import EmbpsServer, EmbpsTarget, InProcessTarget, RedisServer, check_rows

SYSTEMS = ("embps", "redis", "inprocess")
MIN_ACHIEVED_FRACTION = 0.9  # achieved / offered below this: the system did not keep up


@dataclass(frozen=True)
class ServeBenchConfig:
    """One `embps bench serve` invocation; see the module docstring."""

    targets: tuple[str, ...] = SYSTEMS
    address: str | None = None  # an existing Serving.Lookup server instead of starting `embps serve`
    table: str = "emb"  # with address: the table to look up
    rows: int = 1_000_000
    dim: int = 64
    batch: int = 64  # keys per table per request
    tables: int = 1  # tables per request (bench/serve_targets.py: table_names)
    lookup_threads: tuple[int, ...] = ()  # embps once per count (embps-<n>t); (): the replica's default
    zipf: float = 1.05
    rate: float | None = None  # one run at this rate; None: sweep
    slo_ms: float = 10.0
    duration_s: float = 5.0
    warmup_s: float = 1.0
    clients: int = 2
    concurrency: int = 32
    start_rate: float = 500.0
    step_factor: float = 1.5
    max_steps: int = 14
    refine_steps: int = 2
    max_rate: float = 200_000.0
    out: str | None = None
    plot: str | None = None
    generator: str = "auto"  # bench/loadgen.py GENERATORS
    repeat: int = 1  # with rate: rounds, each system once per round in order (see run_serve_bench)

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in SYSTEMS]
        if not self.targets or unknown:
            raise ValueError(f"targets: each must be one of {', '.join(SYSTEMS)}, got {list(self.targets)}")
        if not 1 <= self.tables <= 255:
            raise ValueError(f"tables: must be in [1, 255], got {self.tables}")
        if any(n < 1 for n in self.lookup_threads):
            raise ValueError(f"lookup_threads: each must be >= 1, got {list(self.lookup_threads)}")
        for name in ("rows", "dim", "batch", "clients", "concurrency", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("slo_ms", "duration_s", "start_rate", "max_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")
        if self.repeat < 1 or (self.repeat > 1 and self.rate is None):
            raise ValueError(f"repeat: must be >= 1, and more than 1 only with a fixed rate; got {self.repeat}")
        if not self.step_factor > 1:
            raise ValueError(f"step_factor: must be > 1, got {self.step_factor}")
        if self.refine_steps < 0 or self.warmup_s < 0 or self.zipf < 0:
            raise ValueError("refine_steps, warmup_s, zipf: must be >= 0")
        if self.address is not None and self.address.count(":") < 1:
            raise ValueError(f"address: must be host:port, got {self.address!r}")
        # A server of its own: no replica here to give threads to, and one table (`table`) looked up.
        if self.address is not None and self.lookup_threads:
            raise ValueError("lookup_threads: sets the threads of a replica this bench starts; not with address")
        if self.address is not None and self.tables != 1:
            raise ValueError(f"tables: with address one table is looked up (table = {self.table!r}), got {self.tables}")

    def load_spec(self, rate: float) -> LoadSpec:
        return LoadSpec(
            rate=rate, duration_s=self.duration_s, warmup_s=self.warmup_s, clients=self.clients,
            concurrency=self.concurrency, batch=self.batch * self.tables, rows=self.rows, zipf=self.zipf,
            generator=self.generator,
        )


def meets_slo(run: dict, slo_ms: float) -> bool:
    """No errors, p99 within the SLO, and the system kept up with the offered rate."""
    return (
        run["error_count"] == 0
        and run["latency_ms"]["p99"] <= slo_ms
        and run["achieved_qps"] >= MIN_ACHIEVED_FRACTION * run["offered_qps"]
    )


def _run(config: ServeBenchConfig, target, rate: float, pids: list[int]) -> dict:
    run = run_load(target, config.load_spec(rate), pids)
    run["meets_slo"] = meets_slo(run, config.slo_ms)
    lat = run["latency_ms"]
    print(
        f"  {target.name:>9} offered {run['offered_qps']:>9.0f}/s achieved {run['achieved_qps']:>9.0f}/s "
        f"p50 {lat['p50']:6.2f} p99 {lat['p99']:7.2f} p99.9 {lat['p99.9']:7.2f} max {lat['max']:7.2f} ms "
        f"errors {run['error_count']:>5} | CPU/call server {_ms(run['server_cpu_ms_per_call'])} "
        f"client {_ms(run['client_cpu_ms_per_call'])} ({run['generator']}) {'ok' if run['meets_slo'] else 'FAILS SLO'}",
        flush=True,
    )
    return run


def _ratio(value: float | None) -> str:
    return f"{'-':>12}" if value is None else f"{value:>11.2f}x"


def _finite(value: object) -> object:
    """value with every NaN/inf float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _ms(value: float | None) -> str:
    return "   -  " if value is None else f"{value:5.3f}"


def sweep(config: ServeBenchConfig, target, pids: list[int]) -> list[dict]:
    """Geometric steps up to the first failing rate (at most max_steps), then refine_steps
    bisections (geometric means) between the best passing and the first failing rate."""
    runs: list[dict] = []
    rate = config.start_rate
    best, failed = None, None
    for _ in range(config.max_steps):
        run = _run(config, target, rate, pids)
        runs.append(run)
        if not run["meets_slo"]:
            failed = rate
            break
        best = rate
        if rate >= config.max_rate:
            break
        rate = min(rate * config.step_factor, config.max_rate)
    for _ in range(config.refine_steps if best is not None and failed is not None else 0):
        rate = math.sqrt(best * failed)
        run = _run(config, target, rate, pids)
        runs.append(run)
        if run["meets_slo"]:
            best = rate
        else:
            failed = rate
    return sorted(runs, key=lambda r: r["target_qps"])


def summarize(runs: list[dict], sweep_mode: bool) -> dict:
    """The figures of a system: its best run that met the SLO (sweep) or its one run."""
    passing = [r for r in runs if r["meets_slo"]]
    chosen = max(passing, key=lambda r: r["offered_qps"]) if sweep_mode and passing else None
    if not sweep_mode:
        chosen = runs[0]
    if chosen is None:
        return {"max_qps_at_slo": 0.0, "keys_per_s_at_slo": 0.0, "p99_ms_at_slo": None, "run": None}
    return {
        "max_qps_at_slo": chosen["offered_qps"] if chosen["meets_slo"] else 0.0,
        "keys_per_s_at_slo": chosen["keys_per_s"] if chosen["meets_slo"] else 0.0,
        "p99_ms_at_slo": chosen["latency_ms"]["p99"],
        "run": chosen,
    }


def _threads(name: str) -> int | None:
    """The lookup threads of system `name`: embps-<n>t -> n; embps -> None (the replica's default)."""
    return int(name[len("embps-"):-1]) if name.startswith("embps-") else None


def _system(name: str, config: ServeBenchConfig, workdir: Path) -> tuple[dict, object | None]:
    """Starts (and checks) one system; returns ({"status", ...}, the started server or None)."""
    if name == "embps" and config.address is not None:
        return {"status": "ok", "address": config.address}, None
    if name.startswith("embps"):
        server = EmbpsServer.start(
            config.rows, config.dim, workdir / name, tables=config.tables, lookup_threads=_threads(name)
        )
        return {"status": "ok", "address": server.address, "lookup_threads": _threads(name)}, server
    if name == "redis":
        reason = RedisServer.available()
        if reason is not None:
            print(f"redis: skipped: {reason}")
            return {"status": "skipped", "reason": reason}, None
        server = RedisServer.start(config.rows, config.dim, workdir / "redis", tables=config.tables)
        return {"status": "ok", "address": f"127.0.0.1:{server.port}", "version": server.version()}, server
    return {"status": "ok"}, None


def _target(name: str, config: ServeBenchConfig, server):
    if name.startswith("embps"):
        target = EmbpsTarget(config.address, config.table, 0) if server is None else server.target
        return replace(target, name=name)
    if name == "redis":
        return server.target
    return InProcessTarget(config.rows, config.dim, config.tables)


def run_system(name: str, config: ServeBenchConfig, workdir: Path) -> dict:
    """Starts one system, checks its rows, runs the load (one rate or a sweep), stops it."""
    info, server = _system(name, config, workdir)
    if info["status"] != "ok":
        return info
    try:
        if server is not None:
            check_rows(server.fetch, config.rows, config.dim, tables=config.tables)
        target = _target(name, config, server)
        pids = server.pids if server is not None else []
        print(f"{name}: {'sweep' if config.rate is None else f'rate {config.rate:g}/s'}", flush=True)
        if config.rate is None:
            runs = sweep(config, target, pids)
        else:
            runs = [_run(config, target, config.rate, pids)]
    finally:
        if server is not None:
            server.stop()
    return {**info, "runs": runs, **summarize(runs, config.rate is None)}


def ratios(systems: dict[str, dict]) -> dict[str, dict[str, float]]:
    """keys/s at the SLO of each system divided by that of each other system."""
    rates = {n: s["keys_per_s_at_slo"] for n, s in systems.items() if s.get("status") == "ok"}
    return {a: {b: (ra / rb if rb else None) for b, rb in rates.items() if b != a} for a, ra in rates.items()}


def print_table(config: ServeBenchConfig, systems: dict[str, dict], table_ratios: dict) -> None:
    mode = f"max rate with p99 <= {config.slo_ms:g} ms" if config.rate is None else f"at {config.rate:g} req/s"
    print(f"\n{mode}; {_batch(config)}, {'uniform' if config.zipf == 0 else f'Zipf {config.zipf:g}'} keys, "
          f"{config.rows:,} rows x dim {config.dim}{' per table' if config.tables > 1 else ''}")
    others = [n for n in systems if systems[n].get("status") == "ok"]
    header = f"{'system':>10} {'req/s':>9} {'keys/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU ms/call':>15} "
    header += f"{'cli CPU ms/call':>15} " + " ".join(f"{'vs ' + n:>12}" for n in others)
    print(header)
    for name, s in systems.items():
        if s.get("status") != "ok":
            print(f"{name:>10} skipped: {s.get('reason')}")
            continue
        run = s["run"]
        p50 = run["latency_ms"]["p50"] if run else math.nan
        p99 = s["p99_ms_at_slo"] if s["p99_ms_at_slo"] is not None else math.nan
        server_cpu = run["server_cpu_ms_per_call"] if run else None
        client_cpu = run["client_cpu_ms_per_call"] if run else None
        cells = " ".join(_ratio(table_ratios[name].get(o)) if o != name else f"{'':>12}" for o in others)
        print(
            f"{name:>10} {s['max_qps_at_slo']:>9.0f} {s['keys_per_s_at_slo']:>11,.0f} {p50:>7.2f} {p99:>7.2f} "
            f"{_ms(server_cpu):>15} {_ms(client_cpu):>15} {cells}"
        )


def _batch(config: ServeBenchConfig) -> str:
    if config.tables == 1:
        return f"batch {config.batch}"
    return f"{config.tables} tables x {config.batch} keys per request"


def write_plot(path: str, config: ServeBenchConfig, systems: dict[str, dict]) -> None:
    """p99 latency vs offered rate, one line per system, the SLO as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in systems.items():
        if s.get("status") != "ok":
            continue
        runs = sorted(s["runs"], key=lambda r: r["offered_qps"])
        ax.plot([r["offered_qps"] for r in runs], [r["latency_ms"]["p99"] for r in runs], marker="o", label=name)
    ax.axhline(config.slo_ms, color="grey", linestyle="--", label=f"SLO {config.slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"{_batch(config)}, Zipf {config.zipf:g}, {config.rows:,} rows x {config.dim}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def facts() -> dict[str, object]:
    """machine_facts plus the versions of what the systems run on."""
    import importlib.metadata

    from bench.machine import machine_facts

    out = machine_facts()
    for package in ("grpcio", "protobuf", "redis", "hiredis"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _server_cpu(system: dict) -> float | None:
    """The server CPU per call of a system's run; None where the run had refused or failed calls
    (its CPU is not that of the work offered: no CPU ratio or median rests on it)."""
    run = system.get("run") if system.get("status") == "ok" else None
    if run is None or run.get("error_count", 0):
        return None
    return run.get("server_cpu_ms_per_call")


def median_round(results: list[dict]) -> dict:
    """One system's figures over its rounds: those of the round with the median server CPU per
    call (the lower median), with every round under "rounds"; a single round as it is."""
    if len(results) == 1:
        return results[0]
    measured = sorted((r for r in results if _server_cpu(r) is not None), key=_server_cpu)
    chosen = measured[(len(measured) - 1) // 2] if measured else results[0]
    return {**chosen, "rounds": results}


def round_cpu_ratios(rounds: dict[str, list[dict]]) -> dict[str, list[float | None]]:
    """Each system's server CPU per call over the first system's, round by round."""
    names = list(rounds)
    first = rounds[names[0]]
    out: dict[str, list[float | None]] = {}
    for name in names[1:]:
        ratios_of_rounds = []
        for mine, theirs in zip(rounds[name], first, strict=True):
            a, b = _server_cpu(mine), _server_cpu(theirs)
            ratios_of_rounds.append(a / b if a is not None and b else None)
        out[name] = ratios_of_rounds
    return out


def print_rounds(rounds: dict[str, list[dict]], cpu_ratios: dict[str, list[float | None]]) -> None:
    names = list(rounds)
    print(f"\nserver CPU ms per call, round by round (ratios: over {names[0]} in the same round)")
    for name in names:
        cells = " ".join(_ms(_server_cpu(r)) for r in rounds[name])
        line = f"{name:>10} {cells}"
        if name in cpu_ratios:
            known = sorted(v for v in cpu_ratios[name] if v is not None)
            line += "   " + " ".join(_ratio(v).strip() for v in cpu_ratios[name])
            if known:
                line += f"   median {known[(len(known) - 1) // 2]:.2f}x"
        print(line)


def run_serve_bench(config: ServeBenchConfig) -> int:
    targets = config.targets
    if config.lookup_threads and "embps" in targets and config.address is None:
        at = targets.index("embps")
        threads = tuple(f"embps-{n}t" for n in config.lookup_threads)
        targets = targets[:at] + threads + targets[at + 1:]
    if config.address is not None:
        targets = tuple(t for t in targets if t == "embps") or ("embps",)
        config = replace(config, targets=targets)
    print(
        f"embps bench serve: {', '.join(targets)}; {config.rows:,} rows x dim {config.dim}, {_batch(config)}, "
        f"{'uniform' if config.zipf == 0 else f'Zipf {config.zipf:g}'} keys; {config.clients} client processes x "
        f"{config.concurrency} in flight; {config.warmup_s:g} s warm-up + {config.duration_s:g} s per run",
        flush=True,
    )
    rounds: dict[str, list[dict]] = {name: [] for name in targets}
    with tempfile.TemporaryDirectory(prefix="embps-bench-serve-") as tmp:
        for index in range(config.repeat):
            if config.repeat > 1:
                print(f"round {index + 1} of {config.repeat}", flush=True)
            # Every other round in the reverse order, so that no system always runs first (or after
            # the same one) in a round: a drift within a round would weigh on one side only.
            for name in targets if index % 2 == 0 else targets[::-1]:
                rounds[name].append(run_system(name, config, Path(tmp) / f"round{index}"))
    systems = {name: median_round(results) for name, results in rounds.items()}
    table_ratios = ratios(systems)
    print_table(config, systems, table_ratios)
    cpu_ratios = round_cpu_ratios(rounds)
    if config.repeat > 1:
        print_rounds(rounds, cpu_ratios)
    result = {"bench": "serve", "config": asdict(config), "machine": facts(), "systems": systems,
              "ratios": table_ratios, "server_cpu_ratios_by_round": cpu_ratios}
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
        print(f"wrote {config.out}")
    if config.plot:
        write_plot(config.plot, config, systems)
        print(f"wrote {config.plot}")
    return 0
