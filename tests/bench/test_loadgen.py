"""The open-loop schedule, the config checks, and the sweep's pass/fail logic on real runs of the
in-process target (real client processes, real lookups)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen import LoadSpec, arrival_times, key_pool, run_load
from bench.serve_bench import ServeBenchConfig, median_round, meets_slo, round_cpu_ratios, summarize, sweep
from bench.serve_targets import InProcessTarget, bench_keys


def test_arrivals_are_poisson_at_the_rate() -> None:
    rng = np.random.default_rng(0)
    times = arrival_times(2_000.0, 10.0, rng)
    assert times[0] >= 0 and times[-1] < 10.0 and np.all(np.diff(times) > 0)
    assert abs(times.shape[0] - 20_000) < 4 * np.sqrt(20_000)
    gaps = np.diff(times)
    assert abs(gaps.mean() - 1 / 2_000) < 0.03 / 2_000
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03  # exponential: coefficient of variation 1
    counts = np.histogram(times, bins=100, range=(0, 10))[0]  # Poisson: variance = mean
    assert 0.6 < counts.var() / counts.mean() < 1.5


def test_key_pool_draws_only_bench_keys_with_zipf_skew() -> None:
    spec = LoadSpec(rate=1, rows=1000, batch=64, pool_batches=100, zipf=1.05)
    pool = np.concatenate(key_pool(spec, seed=1))
    assert pool.shape == (6400,) and np.isin(pool, bench_keys(1000)).all()
    top = np.mean(pool == bench_keys(1)[0])
    assert top > 0.05  # rank 0 of Zipf(1.05) over 1000 rows has p ~ 0.13; uniform would give 0.001
    uniform = np.concatenate(key_pool(LoadSpec(rate=1, rows=1000, batch=64, pool_batches=100, zipf=0), seed=1))
    assert np.mean(uniform == bench_keys(1)[0]) < 0.01


@pytest.mark.parametrize(
    ("field", "value"), [("rate", 0), ("duration_s", -1), ("clients", 0), ("concurrency", 0), ("warmup_s", -1)]
)
def test_load_spec_names_the_bad_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        LoadSpec(**{"rate": 10.0, field: value})


def test_load_spec_bounds_the_schedule() -> None:
    with pytest.raises(ValueError, match="max_requests"):
        LoadSpec(rate=1e6, duration_s=100, clients=1, max_requests=1000)


def test_serve_bench_config_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="targets"):
        ServeBenchConfig(targets=("memcached",))
    with pytest.raises(ValueError, match="step_factor"):
        ServeBenchConfig(step_factor=1.0)
    with pytest.raises(ValueError, match="repeat"):
        ServeBenchConfig(repeat=2)  # a sweep: rounds only at a fixed rate
    with pytest.raises(ValueError, match="repeat"):
        ServeBenchConfig(rate=300, repeat=0)
    # With a server of its own (address), the bench starts no replica to give threads to, and
    # looks up one table: both were accepted, ignored or mislabelled.
    with pytest.raises(ValueError, match="lookup_threads: sets the threads of a replica this bench starts"):
        ServeBenchConfig(address="127.0.0.1:1", lookup_threads=(1, 2))
    with pytest.raises(ValueError, match="tables: with address one table is looked up"):
        ServeBenchConfig(address="127.0.0.1:1", tables=4)


def test_rounds_give_the_median_round_and_ratios_within_each_round() -> None:
    def system(cpu: float | None) -> dict:
        return {"status": "ok", "run": {"server_cpu_ms_per_call": cpu}}

    rounds = {"embps": [system(0.3), system(0.1), system(0.2)], "redis": [system(0.2), system(0.2), system(None)]}
    chosen = median_round(rounds["embps"])
    assert chosen["run"]["server_cpu_ms_per_call"] == 0.2 and len(chosen["rounds"]) == 3
    assert median_round([system(0.5)]) == system(0.5)  # one round: as it is
    assert round_cpu_ratios(rounds) == {"redis": [pytest.approx(2 / 3), 2.0, None]}
    # A round whose run refused or failed calls gives no CPU figure: its CPU is not the work offered.
    shed = {"status": "ok", "run": {"server_cpu_ms_per_call": 0.05, "error_count": 12}}
    assert round_cpu_ratios({"embps": [shed, system(0.1)], "redis": [system(0.2), system(0.2)]}) == {
        "redis": [None, 2.0]
    }
    assert median_round([shed, system(0.3), system(0.1)])["run"]["server_cpu_ms_per_call"] == 0.1


def test_low_rate_run_is_counted_from_the_schedule() -> None:
    spec = LoadSpec(rate=200, duration_s=1.5, warmup_s=0.3, clients=2, concurrency=4, rows=2_000)
    run = run_load(InProcessTarget(rows=2_000, dim=8), spec)
    assert run["error_count"] == 0 and run["ok"] == run["requests"]
    assert abs(run["offered_qps"] - 200) < 0.25 * 200  # Poisson count over 1.5 s
    assert abs(run["achieved_qps"] - run["offered_qps"]) <= 0.1 * run["offered_qps"]
    lat = run["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert run["latency_histogram"]["count"] == run["ok"]


def test_sweep_stops_at_the_first_failing_rate_and_reports_the_best_passing_one() -> None:
    config = ServeBenchConfig(
        targets=("inprocess",), rows=2_000, dim=8, start_rate=100, step_factor=2, max_steps=2, refine_steps=0,
        duration_s=0.6, warmup_s=0.2, clients=1, concurrency=4, slo_ms=1_000,
    )
    runs = sweep(config, InProcessTarget(rows=2_000, dim=8), [])
    assert [r["target_qps"] for r in runs] == [100, 200]  # both pass: stops after max_steps
    best = summarize(runs, sweep_mode=True)
    assert best["max_qps_at_slo"] == runs[1]["offered_qps"]
    failing = dict(runs[1], latency_ms=dict(runs[1]["latency_ms"], p99=2_000.0))
    assert not meets_slo(failing, config.slo_ms)
    assert summarize([runs[0], dict(failing, meets_slo=False)], True)["max_qps_at_slo"] == runs[0]["offered_qps"]
    assert not meets_slo(dict(runs[0], error_count=1), config.slo_ms)
    assert not meets_slo(dict(runs[0], achieved_qps=0.5 * runs[0]["offered_qps"]), config.slo_ms)


def test_closed_loop_run_counts_every_call_from_its_send() -> None:
    spec = LoadSpec(rate=None, duration_s=0.5, warmup_s=0.2, clients=2, concurrency=2, rows=2_000)
    run = run_load(InProcessTarget(rows=2_000, dim=8), spec)
    assert run["error_count"] == 0 and run["generator_errors"] == {} and run["ok"] == run["requests"] > 0
    assert run["sent_qps"] == run["offered_qps"]  # a closed loop schedules a call by sending it
    assert run["service_latency_ms"]["p99"] <= run["latency_ms"]["max"]


def test_cpu_per_call_is_per_answered_call() -> None:
    """1,000 answered calls on 1 s of server CPU, and 1,000 shed ones that cost next to nothing:
    0.5 ms a call was reported (every call that completed), where the answered ones cost 1.0."""
    from bench.histogram import LogHistogram
    from bench.loadgen import OK, _merge

    empty = LogHistogram().to_dict()
    report = {
        "latency": empty, "send_lag": empty, "service_latency": empty, "error_latency": {},
        "codes": {OK: 1000, "RESOURCE_EXHAUSTED": 1000}, "scheduled": 2000, "sent": 2000, "window_start": 0.0,
        "last_ok_done": 1.0, "ok_total": 1000, "ok_done_in_window": 1000, "cpu_s": 0.5, "generator": "python",
    }
    run = _merge("embps", LoadSpec(rate=2000.0, duration_s=1.0), [report], server_cpu=1.0, wall_s=1.0)
    assert run["server_cpu_ms_per_call"] == pytest.approx(1.0)
    assert run["client_cpu_ms_per_call"] == pytest.approx(0.5)


def test_server_cpu_is_taken_over_the_measured_window_only() -> None:
    """A server that works half a second after it starts (a replica's start-up), then serves: its
    CPU per call counts the calls of the measured window and the CPU spent in it. Taken from the
    start signal to the last report, it held that work: here 0.5 s over some 700 calls (a
    replica at 300 calls/s read 15-30% high; found by a review)."""
    import subprocess
    import sys

    # Burns half a second of CPU, then idles, blocked on its stdin until it is killed.
    busy = "import sys, time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\nsys.stdin.read()"
    server = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE)
    try:
        spec = LoadSpec(rate=200, duration_s=2.0, warmup_s=1.5, clients=1, concurrency=4, rows=2_000)
        run = run_load(InProcessTarget(rows=2_000, dim=8), spec, [server.pid])
    finally:
        server.kill()
        server.wait()
    assert run["error_count"] == 0
    assert run["server_cpu_ms_per_call"] < 0.2, run["server_cpu_ms_per_call"]  # the burn ended in the warm-up
