"""An open-loop load generator: Poisson arrivals at a target rate, latency from the scheduled time.

    parent ── spawn ──> client process c of C (rate / C each, its own seed)
                          schedule: arrival times t_0 < t_1 < ... over warmup + duration (Poisson)
                          key pool: `pool_batches` batches of `batch` keys (Zipf(alpha) or uniform)
                          `concurrency` threads take the next arrival i, sleep until t_i, send,
                          and record latency_i = completion_i - t_i
           <── histograms, counts by status code, CPU time ──

Open loop: an arrival is due at its scheduled time whether or not earlier calls have come back.
At most `concurrency` calls per process are in flight; an arrival that finds every thread busy
is sent as soon as one frees up and its latency still counts from its scheduled time, so a slow
server cannot hide its queueing (no coordinated omission). `send_lag` (sent - scheduled) is
reported beside the latency: it is that queueing plus the generator's own lateness. Failed calls
get their latency too, per status code (`error_latency_ms`: e.g. how fast a shed call comes back).

The generator: `native` (default where built: csrc/load_gen.h, `_embps_loadgen`) runs each client
process's schedule on one C++ thread, the same scheduler for gRPC and Redis, a few microseconds of
client CPU per call; `python` runs it on `concurrency` Python threads, each making its Caller's
calls (grpcio, redis-py: more client CPU per call than either server spends, so on a small machine
that shares its cores with the server it caps what the bench sees). `auto`: native where the
module is built and the target's caller has `run_native`, else python; the same for a closed loop.
The result says which one ran (`generator`).

Only arrivals scheduled inside the measurement window [warmup, warmup + duration) are counted.
Bounded: every process stops sending at warmup + duration + drain; arrivals not sent by then are
counted as UNSENT (an error); each call has a deadline that ends by then too. A call that the
generator sent so late that this end cut its deadline short, and that ran out of it, is counted as
LATE, not DEADLINE_EXCEEDED: sent when it was due, it would have had a longer deadline. UNSENT and
LATE mean the generator could not keep its schedule: its own lag (too little CPU), or every call it
may have in flight waiting on a target that queues; they are reported apart (`generator_errors`)
as well as among the errors. The parent waits at most that
long plus a margin, and terminates every client process on the way out (Ctrl-C too).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bench.histogram import LogHistogram
from bench.machine import process_cpu_seconds

OK = "OK"
UNSENT = "UNSENT"  # scheduled in the window, never sent before the run's hard end
LATE = "LATE"  # sent late, and out of time only because the run's hard end cut its deadline short
GENERATOR_CODES = (UNSENT, LATE)  # the generator could not keep its schedule
_CLOSED_LOOP_CHUNK = 100_000  # calls per native schedule of a closed loop (closed_loop_native)
_DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
_START_DELAY_S = 0.3  # between "every client is ready" and the first arrival
_RESULT_MARGIN_S = 60.0  # beyond the hard end, for a client to report before it is terminated


class Caller(Protocol):
    """One client process's connection to a target. It may also offer `run_native(times, t0,
    hard_end, timeout_s, concurrency) -> (sent, done, codes)`: the whole open-loop schedule in
    the native generator (see native_module), with codes as names (None: never sent)."""

    def call(self, batch_index: int, timeout: float) -> str:
        """Looks up key batch `batch_index` of the pool; returns OK or an error code's name."""
        ...

    def close(self) -> None: ...


GENERATORS = ("auto", "native", "python")
# gRPC status codes by number (grpc.StatusCode's names), for the native generator's codes.
_GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)


def native_module():
    """The native generator (`_embps_loadgen`, built with the serving gate where grpc++ is), or None."""
    try:
        import _embps_loadgen
    except ImportError:
        return None
    return _embps_loadgen


def native_code_names(codes: Sequence[int]) -> list[str | None]:
    """The native generator's codes -> names: gRPC status names, MISSING_ROWS, BAD_REPLY,
    SERVER_ERROR (Redis's error reply); None for an arrival never sent."""
    module = native_module()
    own = {module.UNSENT: None, module.MISSING_ROWS: "MISSING_ROWS", module.BAD_REPLY: "BAD_REPLY",
           module.SERVER_ERROR: "SERVER_ERROR"}
    return [own[c] if c in own else _GRPC_CODES[c] for c in codes]


class Target(Protocol):
    """A system under load; picklable, so it travels to the client processes."""

    name: str

    def connect(self, batches: Sequence[np.ndarray]) -> Caller:
        """A Caller over the key pool batches (each (batch,) int64), requests prepared up front."""
        ...


@dataclass(frozen=True)
class LoadSpec:
    """One run. rate: arrivals per second over all client processes (open loop); None: closed
    loop, each process keeps `concurrency` calls in flight, sending the next one as soon as one
    returns (the system's capacity at that many calls in flight); latency is then counted from the
    send, and the measurement window holds the calls sent inside it."""

    rate: float | None
    duration_s: float = 5.0
    warmup_s: float = 1.0
    clients: int = 2
    concurrency: int = 32  # threads (calls in flight) per client process
    batch: int = 64
    rows: int = 1_000_000
    zipf: float = 1.05  # 0: uniform over the rows
    seed: int = 0
    timeout_s: float = 5.0  # deadline of one call
    drain_s: float = 2.0  # after the last arrival, how long calls still in flight may take
    pool_batches: int = 2048  # distinct key batches per client process, reused in turn
    max_requests: int = 5_000_000  # per client process: bounds the schedule's memory and time
    setup_timeout_s: float = 180.0  # for every client process to connect and prepare
    generator: str = "auto"  # GENERATORS: see the module docstring

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator: must be one of {', '.join(GENERATORS)}, got {self.generator!r}")
        self._check()

    def uses_native(self, caller: object) -> bool:
        """Whether a client process runs this spec with the native generator over `caller`."""
        if self.generator == "python":
            return False
        available = native_module() is not None and hasattr(caller, "run_native")
        if self.generator == "native" and not available:
            raise RuntimeError(
                "generator: native requested, but _embps_loadgen is not built (grpc++ missing) "
                "or this target has no native caller"
            )
        return available

    def _check(self) -> None:
        positive = {
            "rate": 1.0 if self.rate is None else self.rate, "duration_s": self.duration_s, "clients": self.clients,
            "concurrency": self.concurrency, "batch": self.batch, "rows": self.rows, "timeout_s": self.timeout_s,
            "pool_batches": self.pool_batches, "max_requests": self.max_requests,
            "setup_timeout_s": self.setup_timeout_s,
        }
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be > 0, got {value!r}")
        for name, value in {"warmup_s": self.warmup_s, "drain_s": self.drain_s, "zipf": self.zipf}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be >= 0, got {value!r}")
        if self.rate is None:
            return
        expected = self.rate / self.clients * (self.warmup_s + self.duration_s)
        if expected > self.max_requests:
            raise ValueError(
                f"rate: {self.rate:g}/s over {self.warmup_s + self.duration_s:g} s is {expected:,.0f} arrivals per "
                f"client process, above max_requests {self.max_requests:,}; shorten the run or add clients"
            )

    @property
    def window_s(self) -> tuple[float, float]:
        return self.warmup_s, self.warmup_s + self.duration_s


def arrival_times(rate: float, horizon_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals at `rate` per second in [0, horizon_s): sorted (n,) float64 seconds."""
    expected = rate * horizon_s
    size = int(expected + 6 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, size=size))
    while times[-1] < horizon_s:  # a tail beyond 6 sigma: extend (at most a few rounds)
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=size))])
    return times[times < horizon_s]


def key_pool(spec: LoadSpec, seed: int) -> list[np.ndarray]:
    """spec.pool_batches batches of spec.batch keys (int64), Zipf(spec.zipf) or uniform ranks."""
    from bench.keys import ZipfSampler, key_of_rank

    if spec.zipf > 0:
        ranks = ZipfSampler(spec.rows, spec.zipf, seed=seed).ranks(spec.pool_batches * spec.batch)
    else:
        ranks = np.random.default_rng(seed).integers(0, spec.rows, spec.pool_batches * spec.batch)
    return list(key_of_rank(ranks).reshape(spec.pool_batches, spec.batch))


def closed_loop_native(
    caller: Caller, spec: LoadSpec, t0: float, hard_end: float, chunk: int = _CLOSED_LOOP_CHUNK
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """A closed loop in the native generator: (sent, done, codes) of the calls it sent, in send
    order. Every call of a schedule is due at t0, so the scheduler sends the next one as soon as one
    of the `concurrency` in flight ends, in index order (the sent ones are a prefix), until the
    run's hard end (the calls sent after the measurement window are not counted; stopping at the
    window's end would cut the deadlines of the calls in flight there). Schedules of `chunk` calls
    follow each other while the window lasts, so memory stays bounded whatever the rate; between
    two of them the calls in flight end before the next ones start (a dip once per chunk)."""
    parts = []
    while True:
        sent, done, codes = caller.run_native(np.zeros(chunk), t0, hard_end, spec.timeout_s, spec.concurrency)
        sent_calls = int(np.count_nonzero(~np.isnan(sent)))
        parts.append((sent[:sent_calls], done[:sent_calls], codes[:sent_calls]))
        if sent_calls < chunk or time.monotonic() >= t0 + spec.warmup_s + spec.duration_s:
            break
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [code for p in parts for code in p[2]])


def _run_client(target: Target, spec: LoadSpec, index: int, ready, start_at, go, results) -> None:
    """One client process: prepare, wait for the common start, run the schedule, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    rng = np.random.default_rng([spec.seed, index])
    if spec.rate is not None:
        times = arrival_times(spec.rate / spec.clients, spec.warmup_s + spec.duration_s, rng)
    caller = target.connect(key_pool(spec, seed=spec.seed * 1000 + index))
    try:
        first = caller.call(0, spec.timeout_s)
        if first != OK:
            raise RuntimeError(f"{target.name}: the first call failed with {first}")
        ready.put(index)
        if not go.wait(spec.setup_timeout_s):
            return
        t0 = start_at.value
        counter = itertools.count()
        hard_end = t0 + spec.warmup_s + spec.duration_s + spec.drain_s
        if spec.rate is None:
            calls: list[tuple[float, float, str]] = []  # (sent, done, code); list.append is thread-safe

            def closed_worker() -> None:
                while (now := time.monotonic()) < t0 + spec.warmup_s + spec.duration_s:
                    timeout = max(1e-3, min(spec.timeout_s, hard_end - now))
                    code = caller.call(next(counter) % spec.pool_batches, timeout)
                    calls.append((now, time.monotonic(), code))

        else:
            n = times.shape[0]
            sent = np.full(n, np.nan)
            done = np.full(n, np.nan)
            codes: list[str | None] = [None] * n
        native = spec.uses_native(caller)

        def worker() -> None:
            while True:
                i = next(counter)
                if i >= n:
                    return
                due = t0 + times[i]
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                    now = time.monotonic()
                if now >= hard_end:
                    return
                sent[i] = now
                deadline = min(spec.timeout_s, hard_end - now)
                code = caller.call(i % spec.pool_batches, max(1e-3, deadline))
                done[i] = time.monotonic()
                if code == _DEADLINE_EXCEEDED and deadline < min(spec.timeout_s, hard_end - due):
                    code = LATE  # it would have had more time, had it been sent when it was due
                codes[i] = code

        cpu0 = time.process_time()
        if native and spec.rate is None:
            sent, done, codes = closed_loop_native(caller, spec, t0, hard_end)
        elif native:
            sent, done, codes = caller.run_native(times, t0, hard_end, spec.timeout_s, spec.concurrency)
            deadline = np.minimum(spec.timeout_s, hard_end - sent)
            late = deadline < np.minimum(spec.timeout_s, hard_end - (t0 + times))
            codes = [LATE if c == _DEADLINE_EXCEEDED and late[i] else c for i, c in enumerate(codes)]
        else:
            run = worker if spec.rate is not None else closed_worker
            threads = [threading.Thread(target=run, daemon=True) for _ in range(spec.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, hard_end + spec.timeout_s - time.monotonic()))
        cpu = time.process_time() - cpu0
        if spec.rate is None:  # the send time stands for the scheduled time
            if not native:
                calls.sort()
                sent = np.array([c[0] for c in calls], dtype=np.float64).reshape(-1)
                done = np.array([c[1] for c in calls], dtype=np.float64).reshape(-1)
                codes = [c[2] for c in calls]
            times = sent - t0
    finally:
        caller.close()
    lo, hi = spec.window_s
    in_window = np.flatnonzero((times >= lo) & (times < hi))
    latency, lag = LogHistogram(), LogHistogram()
    window_codes = Counter(codes[i] or UNSENT for i in in_window)
    ok = np.array([i for i in in_window if codes[i] == OK], dtype=np.int64)
    latency.record(done[ok] - (t0 + times[ok]))
    failed: dict[str, list[int]] = {}
    for i in in_window:
        if codes[i] not in (OK, None):
            failed.setdefault(codes[i], []).append(i)
    error_latency = {}
    for code, indices in failed.items():
        hist = LogHistogram()
        hist.record(done[indices] - (t0 + times[indices]))
        error_latency[code] = hist.to_dict()
    was_sent = in_window[~np.isnan(sent[in_window])]
    lag.record(np.maximum(sent[was_sent] - (t0 + times[was_sent]), 0.0))
    service = LogHistogram()  # answered calls from their send: the target's time without the generator's lag
    service.record(done[ok] - sent[ok])
    results.put(
        {
            "index": index,
            "latency": latency.to_dict(),
            "send_lag": lag.to_dict(),
            "service_latency": service.to_dict(),
            "sent": int(was_sent.shape[0]),
            "error_latency": error_latency,
            "codes": dict(window_codes),
            "scheduled": int(in_window.shape[0]),
            "window_start": t0 + lo,
            "last_ok_done": float(done[ok].max()) if ok.shape[0] else None,
            "ok_total": sum(1 for c in codes if c == OK),  # warm-up included, as the client's CPU is
            # Answered calls that ended within the measured window, over which the server's CPU
            # is taken (run_load): the server's CPU per call.
            "ok_done_in_window": int(
                np.count_nonzero(np.array([c == OK for c in codes], dtype=bool) & (done >= t0 + lo) & (done < t0 + hi))
            ),
            "cpu_s": cpu,
            "generator": "native" if native else "python",
        }
    )


def _stop_all(procs: list) -> None:
    procs = [p for p in procs if p.pid is not None]  # started ones only
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_load(target: Target, spec: LoadSpec, server_pids: Sequence[int] = ()) -> dict[str, object]:
    """Runs spec against target from spec.clients processes; returns the merged result.

    server_pids: processes whose CPU time is reported per answered call (the server's share of
    the work), both taken over the measured window only (spec.window_s, after the warm-up): taken
    from the start signal to the last report, it held the server's start-up work still running
    (a replica's first seconds after it serves), the idle start delay and the drain, and read
    15-30% high for a replica at 300 calls/s (found by a review). Every client process is gone
    when this returns or raises.
    """
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_run_client, args=(target, spec, i, ready, start_at, go, results), daemon=True)
        for i in range(spec.clients)
    ]
    try:
        for p in procs:
            p.start()
        setup_end = time.monotonic() + spec.setup_timeout_s
        for _ in procs:
            _get(ready, setup_end, procs, "connect")
        wall0 = time.monotonic()
        start_at.value = time.monotonic() + _START_DELAY_S
        go.set()
        closed = f"closed loop, {spec.concurrency} calls in flight each"
        load = f"{spec.rate:g} calls/s" if spec.rate is not None else closed
        print(
            f"  {target.name}: {spec.clients} client processes connected; load starts "
            f"({spec.warmup_s + spec.duration_s:g} s, {load})",
            file=sys.stderr,
            flush=True,
        )
        hard_end = start_at.value + spec.warmup_s + spec.duration_s + spec.drain_s + spec.timeout_s
        lo, hi = spec.window_s
        server_cpu = None
        if server_pids:
            _sleep_until(start_at.value + lo)
            cpu0 = sum(process_cpu_seconds(pid) for pid in server_pids)
            _sleep_until(start_at.value + hi)
            server_cpu = sum(process_cpu_seconds(pid) for pid in server_pids) - cpu0
        reports = [_get(results, hard_end + _RESULT_MARGIN_S, procs, "report") for _ in procs]
        wall = time.monotonic() - wall0
        for p in procs:
            p.join(10)
    finally:
        _stop_all(procs)
    return _merge(target.name, spec, reports, server_cpu, wall)


def _sleep_until(moment: float) -> None:
    """Sleeps until time.monotonic() reaches `moment` (at once if it has)."""
    time.sleep(max(0.0, moment - time.monotonic()))


def _get(queue, deadline: float, procs: list, what: str) -> object:
    """The next item of queue, or RuntimeError when every client died or the deadline passed."""
    import queue as queue_module

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"client processes did not {what} in time")
        try:
            return queue.get(timeout=min(remaining, 0.5))
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"client process exited with {dead[0].exitcode} before it could {what}") from None


def _merge(
    name: str, spec: LoadSpec, reports: list[dict], server_cpu: float | None, wall_s: float
) -> dict[str, object]:
    """server_cpu: the servers' CPU seconds over the measured window (spec.window_s); wall_s: from
    the start signal to the last report (the clients' CPU is over it)."""
    latency = LogHistogram()
    lag = LogHistogram()
    service = LogHistogram()
    codes: Counter[str] = Counter()
    error_latency: dict[str, LogHistogram] = {}
    for r in reports:
        latency.merge(LogHistogram.from_dict(r["latency"]))
        lag.merge(LogHistogram.from_dict(r["send_lag"]))
        service.merge(LogHistogram.from_dict(r["service_latency"]))
        codes.update(r["codes"])
        for code, hist in r["error_latency"].items():
            error_latency.setdefault(code, LogHistogram()).merge(LogHistogram.from_dict(hist))
    scheduled = sum(r["scheduled"] for r in reports)
    ok = codes.pop(OK, 0)
    window_start = min(r["window_start"] for r in reports)
    last = [r["last_ok_done"] for r in reports if r["last_ok_done"] is not None]
    span = max([spec.duration_s] + [t - window_start for t in last])
    achieved = ok / span
    # CPU per answered call: a shed or failed call costs a server little, and counting it made a
    # system that sheds look cheaper per call.
    ok_total = sum(r["ok_total"] for r in reports)
    ok_in_window = sum(r["ok_done_in_window"] for r in reports)
    client_cpu = sum(r["cpu_s"] for r in reports)
    ms = {k: v * 1e3 for k, v in latency.percentiles().items()}
    return {
        "target": name,
        "target_qps": spec.rate,
        "offered_qps": scheduled / spec.duration_s,
        "sent_qps": sum(r["sent"] for r in reports) / spec.duration_s,
        "achieved_qps": achieved,
        "keys_per_s": achieved * spec.batch,
        "requests": scheduled,
        "ok": ok,
        "errors": dict(codes),
        "error_count": sum(codes.values()),
        "generator_errors": {code: codes[code] for code in GENERATOR_CODES if codes.get(code)},
        "latency_ms": {**ms, "mean": latency.mean * 1e3},
        "send_lag_ms": {k: v * 1e3 for k, v in lag.percentiles((50, 99)).items()},
        "service_latency_ms": {k: v * 1e3 for k, v in service.percentiles((50, 99)).items()},
        "error_latency_ms": {
            code: {k: v * 1e3 for k, v in hist.percentiles((50, 99)).items()} for code, hist in error_latency.items()
        },
        "latency_histogram": latency.to_dict(),
        "client_cpu_ms_per_call": client_cpu / max(ok_total, 1) * 1e3,
        "server_cpu_ms_per_call": None if server_cpu is None else server_cpu / max(ok_in_window, 1) * 1e3,
        "client_cores": client_cpu / wall_s,  # cores the client processes used, on average over the run
        "server_cores": None if server_cpu is None else server_cpu / spec.duration_s,
        "wall_s": wall_s,
        "duration_s": spec.duration_s,
        "warmup_s": spec.warmup_s,
        "clients": spec.clients,
        "concurrency": spec.concurrency,
        "batch": spec.batch,
        "generator": "+".join(sorted({r["generator"] for r in reports})),
    }
