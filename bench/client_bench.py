"""`embps bench client`: what the serving client library costs the process that calls it.

An online ranker calls `ServingClient.lookup_many` for every request it scores, so the client's
CPU per call is the ranker's. A replica (`embps serve` of an export, as `bench serve` starts it)
holds `rows` rows in each of `tables` tables; one thread of this process calls it back to back,
in interleaved rounds:

    raw      LookupMany with the request serialised up front and the reply parsed by protobuf:
             the bare gRPC round trip (what `bench serve`'s Python generator sends), the yardstick
    client   ServingClient.lookup_many of the same keys: dedupe per table, the request, the
             reply's rows read, spread back to the caller's keys

and the same two for one table's `lookup`. Printed: CPU per call of each (this process's, from
time.process_time) and client / raw per round with the median, so figures of one run compare.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.keys import ZipfSampler, key_of_rank
from bench.machine import machine_facts
from bench.serve_targets import EmbpsServer, GrpcCaller, table_names

_WARMUP_CALLS = 20


@dataclass(frozen=True)
class ClientBenchConfig:
    rows: int = 20_000  # per table
    dim: int = 64
    tables: int = 26
    batch: int = 300  # keys per table per call
    zipf: float = 1.05
    calls: int = 300  # per measurement
    repeat: int = 3
    out: str | None = None

    def __post_init__(self) -> None:
        for name in ("rows", "dim", "tables", "batch", "calls", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.tables < 2:
            raise ValueError(f"tables: must be >= 2 (lookup_many reads several), got {self.tables}")
        if self.zipf < 0:
            raise ValueError(f"zipf: must be >= 0, got {self.zipf}")


def cpu_ms_per_call(call: Callable[[int], object], calls: int) -> float:
    """This process's CPU per call(i), i in [0, calls), after a warm-up."""
    for i in range(_WARMUP_CALLS):
        call(i)
    start = time.process_time()
    for i in range(calls):
        call(i)
    return (time.process_time() - start) / calls * 1e3


def _check_same_rows(rows: dict, reply, names: tuple[str, ...], dim: int) -> None:
    """Before timing anything: the client's rows of the first request are the bare call's, each
    found (a client that answered wrong would be timed for nothing)."""
    for name, result in zip(names, reply.results, strict=True):
        values, found = rows[name]
        expected = np.frombuffer(result.values, dtype="<f4").reshape(-1, dim)
        if not found.all() or not np.array_equal(values, expected):
            raise RuntimeError(f"bench client: ServingClient's rows of table {name} differ from the bare call's")


def run_client_bench(config: ClientBenchConfig) -> dict:
    from serving.client import ServingClient

    names = table_names(config.tables)
    sampler = ZipfSampler(config.rows, config.zipf, seed=0)
    # Keys of the export's rows (key_of_rank of ranks below `rows`): every one is found.
    requests = [
        {name: key_of_rank(sampler.ranks(config.batch)) for name in names} for _ in range(config.calls)
    ]
    flat = [np.concatenate([r[name] for name in names]) for r in requests]
    print(
        f"embps bench client: {config.tables} tables x {config.batch} keys a call (Zipf {config.zipf} over "
        f"{config.rows:,} rows each, dim {config.dim}), {config.calls} calls a measurement, {config.repeat} rounds"
    )
    rounds = []
    with tempfile.TemporaryDirectory(prefix="embps-bench-client-") as workdir:
        server = EmbpsServer.start(config.rows, config.dim, Path(workdir), tables=config.tables)
        try:
            raw_many = GrpcCaller(server.address, names, config.dim, flat)  # each batch split evenly: batch a table
            raw_one = GrpcCaller(server.address, names[0], config.dim, [r[names[0]] for r in requests])
            client = ServingClient([server.address], timeout_s=10.0, message_limit_bytes=64 << 20)
            calls, first = config.calls, names[0]
            try:
                _check_same_rows(client.lookup_many(requests[0]), raw_many.reply(0, 10.0), names, config.dim)
                for round_index in range(config.repeat):
                    figures = {
                        "raw_lookup_many_ms": cpu_ms_per_call(lambda i: raw_many.reply(i, 10.0), calls),
                        "client_lookup_many_ms": cpu_ms_per_call(lambda i: client.lookup_many(requests[i]), calls),
                        "raw_lookup_ms": cpu_ms_per_call(lambda i: raw_one.reply(i, 10.0), calls),
                        "client_lookup_ms": cpu_ms_per_call(lambda i: client.lookup(first, requests[i][first]), calls),
                    }
                    rounds.append(figures)
                    print(
                        f"round {round_index + 1}: CPU ms a call, lookup_many raw {figures['raw_lookup_many_ms']:.3f} "
                        f"client {figures['client_lookup_many_ms']:.3f} "
                        f"({figures['client_lookup_many_ms'] / figures['raw_lookup_many_ms']:.2f}x); lookup raw "
                        f"{figures['raw_lookup_ms']:.3f} client {figures['client_lookup_ms']:.3f} "
                        f"({figures['client_lookup_ms'] / figures['raw_lookup_ms']:.2f}x)"
                    )
            finally:
                client.close()
                raw_many.close()
                raw_one.close()
        finally:
            server.stop()
    many = statistics.median(r["client_lookup_many_ms"] / r["raw_lookup_many_ms"] for r in rounds)
    one = statistics.median(r["client_lookup_ms"] / r["raw_lookup_ms"] for r in rounds)
    print(f"ServingClient / the bare call, median of {config.repeat} rounds: lookup_many {many:.2f}x, "
          f"lookup {one:.2f}x")
    result = {
        "bench": "client", "config": asdict(config), "machine": machine_facts(), "rounds": rounds,
        "lookup_many_ratio": many, "lookup_ratio": one,
    }
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {config.out}")
    return result
