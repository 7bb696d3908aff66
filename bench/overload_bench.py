"""`embps bench serve --overload 3`: a replica offered 3x its capacity, with and without load shedding.

    embps bench serve --overload 3 --max-queue 16 --rows 100000 --batch 64 --out overload.json

Two real `embps serve` replicas of the same rows (bench/serve_targets.py), loaded one at a time:
  1. capacity: a closed loop (each call sent when one in flight returns) on the unbounded replica,
     which sheds nothing, with as many calls in flight as the overload runs may have (clients x
     concurrency), in the same generator; its answered rate is the capacity. With fewer calls in
     flight a closed loop measures their round trip, not the replica: 8 in flight (the bench before
     2026-12-04, then in Python threads) answered 819 calls/s of 2,048 keys against 1 lookup thread
     here (2 cores) while the same replica answered 1,619 open loop, and on a 16-core host 666
     against 1,983: "3x capacity" was no overload at all.
  2. the bounded replica (max_queue) offered factor x capacity, open loop (bench/loadgen.py);
  3. the unbounded replica (max_queue = 0) offered the same rate.
For each overload run: the cores the replica and the bench's own client processes used (on a
machine that runs both, the clients' share is taken from the replica: its answered rate under
overload is then below what it answers with the machine to itself), offered and answered rates,
the shed fraction (RESOURCE_EXHAUSTED from the serving gate, serving/gate.py; without the gate,
EMBPS_SERVING_GATE=0 or a build without grpc++, RESOURCE_EXHAUSTED from the replica's own bound and
CANCELLED from gRPC's core, whose queue has the same bound, or RESOURCE_EXHAUSTED there too under
GRPC_EXPERIMENTS=ph2_server; the replicas inherit both variables), and p50/p99 latency of
answered and of shed calls, counted from each call's scheduled time. The generator holds at most
clients x concurrency calls in flight; an unbounded replica's backlog beyond that waits in the
generator, whose latency still counts it (no coordinated omission). What the generator itself
could not do (calls never sent, or sent too late to have their deadline: bench/loadgen.py's UNSENT
and LATE) is reported apart, with its send lag, and is not counted among the replica's errors.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.loadgen import GENERATOR_CODES, OK, LoadSpec, run_load
from bench.serve_bench import _finite, facts
from bench.serve_targets import EmbpsServer, write_export
from serving.gate import unavailable_reason
from serving.shedding import core_refusal_code

SHED = "RESOURCE_EXHAUSTED"  # refused by the serving gate, or by the replica's own bound without it
CORE_SHED = "CANCELLED"  # without the gate: refused by gRPC's default core transport; the bench never cancels
GENERATOR_KEPT_UP = 0.9  # the bounded run sent at least this share of the offered rate
_POOL_KEYS = 1 << 22  # keys per client process's pool of prepared requests (32 MiB), whatever the batch


@dataclass(frozen=True)
class OverloadBenchConfig:
    """One `embps bench serve --overload` invocation; see the module docstring."""

    factor: float = 3.0
    max_queue: int = 16
    rows: int = 100_000
    dim: int = 64
    batch: int = 64
    zipf: float = 1.05
    duration_s: float = 5.0
    warmup_s: float = 1.0
    clients: int = 2
    concurrency: int = 32  # open-loop calls in flight per client process: must exceed max_queue in all
    lookup_threads: int | None = None  # the replicas' (None: serve.toml's default, one per core)
    out: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"factor: must be > 1 (times the capacity), got {self.factor}")
        for name in ("max_queue", "rows", "dim", "batch", "clients", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.clients * self.concurrency <= self.max_queue:
            raise ValueError(
                f"concurrency: clients x concurrency ({self.clients * self.concurrency}) must exceed max_queue "
                f"({self.max_queue}), or the generator can never fill the queue and nothing is shed"
            )
        if self.lookup_threads is not None and self.lookup_threads < 1:
            raise ValueError(f"lookup_threads: must be >= 1, got {self.lookup_threads}")
        if not self.duration_s > 0 or self.warmup_s < 0 or self.zipf < 0:
            raise ValueError("duration_s: must be > 0; warmup_s, zipf: must be >= 0")

    def spec(self, rate: float | None, concurrency: int) -> LoadSpec:
        return LoadSpec(
            rate=rate, duration_s=self.duration_s, warmup_s=self.warmup_s, clients=self.clients,
            concurrency=concurrency, batch=self.batch, rows=self.rows, zipf=self.zipf,
            pool_batches=max(8, min(2048, _POOL_KEYS // self.batch)),
        )


def summarize(run: dict) -> dict:
    """The overload figures of one run: rates, shed fraction, latency of answered and shed calls."""
    shed = run["errors"].get(SHED, 0) + run["errors"].get(CORE_SHED, 0)
    latencies = [run["error_latency_ms"][code] for code in (SHED, CORE_SHED) if code in run["error_latency_ms"]]
    shed_latency = max(latencies, key=lambda h: h.get("p99", 0.0), default={})  # the slower of the two
    return {
        "offered_qps": run["offered_qps"],
        "sent_qps": run["sent_qps"],
        "answered_qps": run["achieved_qps"],
        "shed_fraction": shed / run["requests"] if run["requests"] else 0.0,
        "shed_by_code": {code: run["errors"].get(code, 0) for code in (SHED, CORE_SHED)},
        "answered_p50_ms": run["latency_ms"]["p50"],
        "answered_p99_ms": run["latency_ms"]["p99"],
        "answered_service_p99_ms": run["service_latency_ms"]["p99"],
        "shed_p50_ms": shed_latency.get("p50"),
        "shed_p99_ms": shed_latency.get("p99"),
        "other_errors": {
            code: n for code, n in run["errors"].items() if code not in (OK, SHED, CORE_SHED, *GENERATOR_CODES)
        },
        "generator_errors": run["generator_errors"],
        "send_lag_p99_ms": run["send_lag_ms"]["p99"],
        "replica_cores": run["server_cores"],
        "client_cores": run["client_cores"],
    }


def _line(name: str, s: dict) -> str:
    shed = "" if s["shed_p50_ms"] is None else f", shed p50 {s['shed_p50_ms']:.1f} p99 {s['shed_p99_ms']:.1f} ms"
    return (
        f"  {name:>9}: offered {s['offered_qps']:7.0f}/s answered {s['answered_qps']:7.0f}/s shed "
        f"{s['shed_fraction']:6.1%} | answered p50 {s['answered_p50_ms']:8.1f} p99 {s['answered_p99_ms']:8.1f} ms"
        f"{shed} | other errors {s['other_errors'] or 'none'} | cores used: replica {s['replica_cores']:.2f}, "
        f"the bench's clients {s['client_cores']:.2f} | generator: sent {s['sent_qps']:.0f}/s, send lag p99 "
        f"{s['send_lag_p99_ms']:.1f} ms, {s['generator_errors'] or 'no'} calls it could not make in time"
    )


def run_overload_bench(config: OverloadBenchConfig) -> int:
    print(
        f"embps bench serve --overload {config.factor:g}: {config.rows:,} rows x dim {config.dim}, batch "
        f"{config.batch}, max_queue {config.max_queue}; {config.clients} client processes; "
        f"{config.warmup_s:g} s warm-up + {config.duration_s:g} s per run",
        flush=True,
    )
    without_gate = unavailable_reason()
    print("replicas behind the serving gate" if without_gate is None else f"replicas without the serving gate: "
          f"{without_gate}", flush=True)
    with tempfile.TemporaryDirectory(prefix="embps-bench-overload-") as tmp:
        export_uri = (Path(tmp) / "export").resolve().as_uri()
        print("writing the export and starting two replicas (max_queue 0 and max_queue "
              f"{config.max_queue})", flush=True)
        write_export(export_uri, config.rows, config.dim)
        bounded = EmbpsServer.start(config.rows, config.dim, Path(tmp) / "bounded", max_queue=config.max_queue,
                                    export_uri=export_uri, lookup_threads=config.lookup_threads)
        try:
            unbounded = EmbpsServer.start(config.rows, config.dim, Path(tmp) / "unbounded", max_queue=0,
                                          export_uri=export_uri, lookup_threads=config.lookup_threads)
            try:
                print(f"capacity: closed loop on the unbounded replica, {config.clients * config.concurrency} calls "
                      "in flight", flush=True)
                capacity = run_load(unbounded.target, config.spec(None, config.concurrency), unbounded.pids)
                rate = config.factor * capacity["achieved_qps"]
                print(
                    f"  capacity {capacity['achieved_qps']:.0f}/s (cores used: replica {capacity['server_cores']:.2f}, "
                    f"the bench's clients {capacity['client_cores']:.2f}); offering {rate:.0f}/s to each replica",
                    flush=True,
                )
                runs = {}
                for name, server in (("bounded", bounded), ("unbounded", unbounded)):
                    runs[name] = run_load(server.target, config.spec(rate, config.concurrency), server.pids)
                    print(_line(name, summarize(runs[name])), flush=True)
                sent = runs["bounded"]["sent_qps"]
                if sent < GENERATOR_KEPT_UP * rate:
                    # Only the bounded run: against the unbounded replica the backlog waits in the generator.
                    print(
                        f"warning: the generator sent {sent:.0f}/s of the {rate:.0f}/s offered to the bounded replica: "
                        "this machine cannot offer that overload beside the replica, and the latencies above count "
                        "the generator's lag; larger calls (--batch) need fewer of them",
                        flush=True,
                    )
            finally:
                unbounded.stop()
        finally:
            bounded.stop()
    result = {
        "bench": "serve_overload",
        "config": asdict(config),
        "machine": facts(),
        # The replicas inherit this process's environment and build: they run the gate where it does.
        "gate": without_gate is None,
        "without_gate": without_gate,
        "core_refusal": None if without_gate is None else core_refusal_code().name,
        "capacity_qps": capacity["achieved_qps"],
        "capacity": capacity,
        "offered_rate": rate,
        **{name: {**summarize(run), "max_queue": config.max_queue if name == "bounded" else 0, "run": run}
           for name, run in runs.items()},
    }
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
        print(f"wrote {config.out}")
    return 0
