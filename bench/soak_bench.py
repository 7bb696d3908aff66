"""`embps bench soak`: one shard process under a long push stream; does a push cost the same, and
the shard hold the same memory, after an hour as after a minute?

    shard (capacity + LRU + count admission with a small max_pending + TTL) <── Push, one at a time
    each push: `hot` keys from a range larger than the capacity (rows admitted, updated, evicted)
               + `fresh` never-seen keys (pending admission forever: the unbounded id space)
    phase "off": no snapshots (no change tracking); phase "on": a snapshot every `snapshot_every`
               pushes to a local folder (full every 4th, the others incremental), the oldest deleted
    phase "follow": what a serving replica makes a shard do: two Subscribe streams follow the table
               (one committed, one live) and every push is followed by a Commit of its step; pushes
               of `follow_keys` hot keys, so that the update log (bounded by keys and entries) and
               the commit log (by bytes and commits) hold many entries once the phase is long

    every bound of the shard (capacity, max_pending, the update log's keys) is reached within the
    warm-up, so that a phase measures the steady state and not the filling of a bounded structure

    young twin: after a phase's pushes, a fresh shard process with the same table gets the same
               kind of pushes alongside the soaked one: a warm-up, then a last tenth in which every
               push to the soaked shard is followed by one to the young one

Per push it records the wall time of the call, the shard's CPU time during it (from /proc) and its
RSS. The checks: the soaked shard's CPU per push in its last tenth within `max_growth` of the young
twin's in the same moments, and its RSS in the last tenth within `max_rss_growth` of the first
tenth's. Comparing with a twin measured at the same moments is what makes the check about the
shard and not the machine: on a quiet 2-core VM the same shard's CPU per push moved by -40% to
+85% between its first and last tenth (CPU frequency, neighbours, the twin itself), and a
yardstick doing other work (a push of fixed keys to a plain table) drifted by other amounts, so
that the ratio to it still moved by 20% under a busy loop. Both processes run on one CPU, so they
share its neighbours. The first tenth's figures are reported beside them. tests/ps/test_soak.py
runs it for a few thousand pushes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.ports import free_ports
from ps.process.python_command import python_path

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE = "emb"
JOB = "soak"
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_FULL_EVERY = 4
_ADDR_NO_RANDOMIZE = 0x0040000  # personality(2): kept across the shard's exec of itself
PHASE_TITLES = {"off": "snapshots off", "on": "snapshots on", "follow": "followed by a replica's streams"}


@dataclass(frozen=True)
class SoakConfig:
    capacity: int = 5_000
    dim: int = 8
    hot: int = 600  # keys per push from a hot range of 1.6 x capacity
    fresh: int = 600  # never-seen keys per push
    min_count: int = 2
    max_pending: int = 20_000
    ttl_steps: int = 400
    # Keys the table's update log keeps (the shard's --update-log-keys): ~700 keys a push reach it
    # within the warm-up. With the shard's default (1M keys, ~1,500 pushes) the log still filled
    # during the measured pushes: RSS grew 7-9% by the last tenth, and a 1,400-push shard cost
    # 1.07-1.22x its 320-push twin, against 0.98-1.05x once both logs are full.
    update_log_keys: int = 100_000
    warmup: int = 200  # pushes before each phase's measurement
    pushes: int = 1_000  # measured pushes per phase (a multiple of 10 * snapshot_every * 4)
    seconds: float | None = None  # instead of `pushes`: measure each phase for this long
    snapshot_every: int = 25
    follow_keys: int = 16  # keys per push in phase "follow"
    phases: tuple[str, ...] = ("off", "on", "follow")
    # Two shards past every bound, pushed in turn on one CPU, differ by a factor fixed for the
    # pair's life: the soaked one after 1,400 pushes cost 0.98x-1.19x its twin over 24 phases
    # (quiet and under a busy loop), the same main thread doing the same work. The growth this
    # must catch is larger: a log read whole on each push cost 1.67x after 1,300 pushes.
    max_growth: float = 1.3
    max_rss_growth: float = 1.1
    out: str | None = None
    plot: str | None = None


@dataclass
class PhaseRecord:
    """One phase: per measured push of the soaked shard, wall seconds, its CPU seconds (its
    snapshot round included) and RSS bytes; the young twin's CPU seconds per push alongside the
    last len(cpu_young_s) of them."""

    name: str
    wall_s: list[float] = field(default_factory=list)
    cpu_push_s: list[float] = field(default_factory=list)
    cpu_young_s: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    snapshots: int = 0

    def cpu_per_push_ms(self) -> np.ndarray:
        """The shard's CPU milliseconds during each measured push (n,)."""
        return np.array(self.cpu_push_s) * 1e3

    def summary(self) -> dict:
        """First and last tenth (the last: the pushes alongside the young twin): median wall ms,
        median and mean shard CPU ms per push (snapshot rounds included in the mean), RSS (median
        of the first, max of the last); the young twin's median CPU ms. cpu_ratio: last tenth over
        the young twin's; raw_cpu_ratio: last tenth over first."""
        n = len(self.wall_s)
        w = len(self.cpu_young_s)
        wall = np.array(self.wall_s) * 1e3
        cpu = self.cpu_per_push_ms()
        young = float(np.median(np.array(self.cpu_young_s) * 1e3))
        rss = np.array(self.rss_bytes, dtype=np.float64)

        def tenth(part: slice) -> dict:
            return {
                "wall_ms_median": float(np.median(wall[part])),
                "cpu_ms_median": float(np.median(cpu[part])),
                "cpu_ms_mean": float(cpu[part].mean()),
            }

        first = {**tenth(slice(0, w)), "rss_bytes_median": float(np.median(rss[:w]))}
        last = {**tenth(slice(n - w, n)), "rss_bytes_max": float(rss[-w:].max())}
        return {
            "pushes": n,
            "snapshots": self.snapshots,
            "first_tenth": first,
            "last_tenth": last,
            "wall_ratio": last["wall_ms_median"] / first["wall_ms_median"],
            "young_cpu_ms_median": young,
            "cpu_ratio": last["cpu_ms_median"] / young,
            "raw_cpu_ratio": last["cpu_ms_median"] / first["cpu_ms_median"],
            "cpu_mean_ratio": last["cpu_ms_mean"] / first["cpu_ms_mean"],
            "rss_ratio": last["rss_bytes_max"] / first["rss_bytes_median"],
        }


def _proc_cpu_rss(pid: int) -> tuple[float, int]:
    """(CPU seconds of the process's live threads, RSS bytes). CPU comes from the scheduler's
    per-thread nanosecond counters where the kernel keeps them, else from clock ticks."""
    try:
        cpu = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                cpu += int(f.read().split()[0])
        cpu_s = cpu / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / _TICKS
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE
    return cpu_s, rss


# Run by a Python of its own, which then becomes the shard: a preexec_fn would fork this process,
# and with Subscribe streams read on other threads (the follow phase) grpc skips its fork handlers
# then, which can leave the child dead before its exec. Without one, subprocess forks nothing here.
_PINNED = """
import ctypes, os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
ctypes.CDLL(None).personality(int(sys.argv[2]))  # refused (-1) by some seccomp profiles: random layouts then
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def _pinned_to_one_cpu(argv: list[str]) -> list[str]:
    """`python argv...` run on this machine's last CPU with no address-space randomisation: the
    soaked shard and its young twin (every thread) on the same CPU, so that both meet the same
    neighbours (another process on that CPU or its SMT sibling), and each with the same address
    layout. With random layouts, a shard past every bound cost 0.96x-1.16x of another pushed in
    turn over 7 runs under a busy loop, a factor fixed for the pair's lifetime; with one layout,
    1.01x-1.06x over 4 runs."""
    cpu = max(os.sched_getaffinity(0))
    return [sys.executable, "-c", _PINNED, str(cpu), str(_ADDR_NO_RANDOMIZE), *argv]


class SoakShard:
    """A real `embps ps` shard process for the soak, with a stub and a snapshot coordinator."""

    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        from ps.job_config import Deadlines, JobConfig, ShardConfig, SnapshotConfig, dump_job_config
        from ps.process import children
        from ps.table.config import (
            AdmissionConfig,
            AdmissionKind,
            EvictionConfig,
            EvictionPolicy,
            OptimizerConfig,
            OptimizerKind,
            TableConfig,
        )

        self.config = config
        self.workdir = workdir
        workdir.mkdir(exist_ok=True)
        self.snapshot_uri = str(workdir / "snapshots")
        table = TableConfig(
            TABLE,
            dim=config.dim,
            capacity=config.capacity,
            optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.01),
            admission=AdmissionConfig(AdmissionKind.COUNT, min_count=config.min_count, max_pending=config.max_pending),
            eviction=EvictionConfig(ttl_steps=config.ttl_steps, policy=EvictionPolicy.LRU),
        )
        port, metrics_port = free_ports(2)
        self.job = JobConfig(
            job=JOB,
            shards=(ShardConfig(address=f"127.0.0.1:{port}", metrics_port=metrics_port),),
            tables=(table,),
            deadlines=Deadlines(lookup=30.0, push=30.0, stats=30.0),
            snapshot=SnapshotConfig(self.snapshot_uri),  # the shard writes snapshots there alone
        )
        config_path = workdir / "job.toml"
        config_path.write_text(dump_job_config(self.job))
        env = {**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT))}
        cmd = _pinned_to_one_cpu([
            "-m", "embps", "ps", "--config", str(config_path), "--shard", "0",
            "--update-log-keys", str(config.update_log_keys),
        ])
        with open(workdir / "shard.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            children.wait_serving(self.job.shards[0].address, self.proc, "soak shard", timeout=120.0)
        except BaseException:
            children.stop(self.proc)
            raise
        import grpc

        from ps.rpc import ps_pb2_grpc, snapshot_pb2_grpc

        self.channel = grpc.insecure_channel(self.job.shards[0].address)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)
        self.snapshots = snapshot_pb2_grpc.SnapshotControlStub(self.channel)
        self._last_snapshot: int | None = None
        self.num_snapshots = 0
        self._streams: list = []

    def push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
        from ps.rpc import ps_pb2

        request = ps_pb2.PushRequest(
            table=TABLE, keys=keys.astype("<i8").tobytes(), grads=grads.tobytes(), dim=self.config.dim, step=step
        )
        self.stub.Push(request, timeout=30.0)

    def commit(self, step: int) -> None:
        """Records step `step` as complete, as rank 0 of a sync job does after each step."""
        from ps.rpc import ps_pb2

        self.stub.Commit(ps_pb2.CommitRequest(step=step), timeout=30.0)

    def follow(self) -> None:
        """Starts two Subscribe streams on the table, as serving replicas follow it: one committed
        (consistency "step") and one live; each is read to its end on a thread of its own, until close()."""
        import threading

        from ps.rpc import ps_pb2

        for committed in (True, False):
            request = ps_pb2.SubscribeRequest(table=TABLE, full_sync=True, committed=committed, stored_rows=True)
            stream = self.stub.Subscribe(request)
            self._streams.append(stream)
            threading.Thread(target=_drain, args=(stream,), daemon=True).start()

    def snapshot(self, step: int) -> None:
        """One snapshot round, as the trainer's coordinator runs it: write on the shard, commit here."""
        from ps.rpc import snapshot_pb2
        from ps.snapshot.files import ShardRecord, SnapshotWriter
        from ps.snapshot.ops import collect_garbage

        full = self._last_snapshot is None or self.num_snapshots % _FULL_EVERY == 0
        kind, parent = ("full", None) if full else ("incremental", self._last_snapshot)
        request = snapshot_pb2.WriteSnapshotRequest(uri=self.snapshot_uri, job=JOB, step=step, kind=kind, num_shards=1)
        if parent is not None:
            request.parent = parent
        reply = self.snapshots.WriteSnapshot(request, timeout=600.0)
        writer = SnapshotWriter(self.snapshot_uri, JOB, step, kind, parent, num_shards=1, tables=self.job.tables)
        for record in json.loads(reply.records_json):
            writer.add_shard_record(ShardRecord.from_dict(record))
        writer.commit()
        collect_garbage(self.snapshot_uri, JOB, keep=2)
        self._last_snapshot = step
        self.num_snapshots += 1

    def close(self) -> None:
        from ps.process import children

        for stream in self._streams:
            stream.cancel()
        self.channel.close()
        children.stop(self.proc)


def _drain(stream) -> None:
    """Reads a Subscribe stream until it ends (cancelled at close(), or the shard stopped)."""
    import grpc

    try:
        for _ in stream:
            pass
    except grpc.RpcError:
        pass


class _PushStream:
    """The pushes one shard gets in a phase: keys drawn from its own generator, a snapshot round
    every snapshot_every of its pushes when snapshots are on (phase "on"), a Commit after each push
    and two streams following the table (phase "follow")."""

    def __init__(self, shard: SoakShard, rng: np.random.Generator, phase: str) -> None:
        config = shard.config
        self.shard, self.rng = shard, rng
        self.snapshots, self.commits = phase == "on", phase == "follow"
        self.hot, self.fresh = (config.follow_keys, 0) if self.commits else (config.hot, config.fresh)
        self.grads = rng.standard_normal((self.hot + self.fresh, config.dim)).astype(np.float32)
        self.hot_range = int(1.6 * config.capacity)
        self.pushes = 0
        if self.commits:
            shard.follow()

    def push(self, step: int) -> tuple[float, float, int, bool]:
        """One push (and its snapshot round or Commit): (wall seconds, shard CPU seconds, RSS bytes,
        whether a snapshot was taken). The CPU of a stream's message about a push falls mostly in
        the next push's interval, as the streams send after the Commit returns."""
        config = self.shard.config
        keys = np.concatenate(
            [self.rng.integers(0, self.hot_range, self.hot), self.rng.integers(1 << 40, 1 << 62, self.fresh)]
        )
        cpu_before = _proc_cpu_rss(self.shard.proc.pid)[0]
        t0 = time.perf_counter()
        self.shard.push(keys, self.grads, step)
        self.pushes += 1
        if self.commits:
            self.shard.commit(step)
        snapshot = self.snapshots and self.pushes % config.snapshot_every == 0
        if snapshot:
            self.shard.snapshot(step)
        wall = time.perf_counter() - t0
        cpu, rss = _proc_cpu_rss(self.shard.proc.pid)
        return wall, cpu - cpu_before, rss, snapshot


def run_phase(
    shard: SoakShard,
    name: str,
    rng: np.random.Generator,
    first_step: int,
    start_twin: Callable[[], SoakShard],
    progress: Callable[[str], None] | None = None,
) -> tuple[PhaseRecord, int]:
    """Warm-up, the measured pushes of one phase, then its last tenth alongside a young twin
    (start_twin(): a fresh shard, warmed up alongside first); returns the record and the next step."""
    config = shard.config
    soaked = _PushStream(shard, rng, name)
    record = PhaseRecord(name)
    step = first_step
    start = time.monotonic()

    def measured(wall: float, cpu: float, rss: int, snapshot: bool) -> None:
        record.snapshots += snapshot
        record.wall_s.append(wall)
        record.cpu_push_s.append(cpu)
        record.rss_bytes.append(rss)
        record.elapsed_s.append(time.monotonic() - start)
        if progress is not None and len(record.wall_s) % 200 == 0:
            progress(f"phase {name}: {len(record.wall_s)} pushes, {wall * 1e3:.1f} ms, RSS {rss / 2**20:.0f} MiB")

    for _ in range(config.warmup):
        soaked.push(step)
        step += 1
    start = time.monotonic()

    def more() -> bool:
        if config.seconds is None:
            return len(record.wall_s) < config.pushes
        return time.monotonic() - start < config.seconds

    while more():
        measured(*soaked.push(step))
        step += 1
    tenth = max(1, len(record.wall_s) // 10)
    twin_shard = start_twin()
    try:
        if shard.num_snapshots and not soaked.snapshots:
            # The soaked shard tracks changes for incremental snapshots since its first one (an
            # earlier phase's): so must the twin, or it does less work a push.
            twin_shard.snapshot(step)
        twin = _PushStream(twin_shard, np.random.default_rng(rng.integers(1 << 62)), name)
        for i in range(config.warmup + tenth):
            measured(*soaked.push(step))
            _, cpu, _, _ = twin.push(step)
            if i >= config.warmup:
                record.cpu_young_s.append(cpu)
            step += 1
    finally:
        twin_shard.close()
    return record, step


def run_soak(config: SoakConfig, progress: Callable[[str], None] | None = None) -> dict[str, PhaseRecord]:
    """Every phase of `config` on one shard process (a fresh temporary folder), each phase's last
    tenth beside a young twin of its own; records by phase."""
    rng = np.random.default_rng(0)
    records = {}
    with tempfile.TemporaryDirectory(prefix="embps-soak-") as tmp:
        shard = SoakShard(config, Path(tmp) / "soaked")
        try:
            step = 1
            for name in config.phases:
                records[name], step = run_phase(
                    shard, name, rng, step, lambda name=name: SoakShard(config, Path(tmp) / f"twin-{name}"), progress
                )
        finally:
            shard.close()
    return records


def write_plot(path: str, config: SoakConfig, records: dict[str, PhaseRecord]) -> None:
    """Push latency (wall and shard CPU, rolling medians) and RSS over time, one column per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(records), figsize=(6 * len(records), 6), squeeze=False, sharex="col")
    for col, (name, r) in enumerate(records.items()):
        t = np.array(r.elapsed_s) / 60
        window = max(1, len(t) // 100)
        wall = np.array(r.wall_s) * 1e3
        cpu = r.cpu_per_push_ms()
        rolling = np.array([np.median(wall[max(0, j - window) : j + 1]) for j in range(len(wall))])
        cpu_mean = np.convolve(cpu, np.ones(window) / window, mode="same")
        axes[0, col].plot(t, wall, ",", alpha=0.3, color="grey")
        axes[0, col].plot(t, rolling, label="wall, rolling median")
        axes[0, col].plot(t, cpu_mean, label="shard CPU, rolling mean")
        young = np.median(np.array(r.cpu_young_s) * 1e3)
        axes[0, col].plot(t[-len(r.cpu_young_s):], np.full(len(r.cpu_young_s), young), label="young twin's CPU, median")
        axes[0, col].set_ylabel("push (ms)")
        axes[0, col].set_title(PHASE_TITLES[name])
        axes[0, col].legend()
        axes[1, col].plot(t, np.array(r.rss_bytes) / 2**20)
        axes[1, col].set_ylabel("shard RSS (MiB)")
        axes[1, col].set_xlabel("minutes")
        for ax in axes[:, col]:
            ax.grid(True, alpha=0.3)
    follow = f"; phase follow: {config.follow_keys} hot keys a push" if "follow" in records else ""
    fig.suptitle(
        f"capacity {config.capacity:,}, {config.hot} hot + {config.fresh} fresh keys a push, dim {config.dim}, "
        f"max_pending {config.max_pending:,}, ttl {config.ttl_steps}{follow}"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_soak_bench(config: SoakConfig) -> int:
    from bench.machine import machine_facts

    length = f"{config.seconds / 60:g} min" if config.seconds is not None else f"{config.pushes} pushes"
    print(f"embps bench soak: phases {', '.join(config.phases)}, {length} each after {config.warmup} warm-up pushes",
          flush=True)
    records = run_soak(config, progress=lambda line: print(line, flush=True))
    summaries = {name: r.summary() for name, r in records.items()}
    ok = True
    for name, s in summaries.items():
        good = s["cpu_ratio"] <= config.max_growth and s["rss_ratio"] <= config.max_rss_growth
        ok &= good
        print(
            f"{PHASE_TITLES[name]}: {s['pushes']} pushes, {s['snapshots']} snapshots; median push "
            f"{s['first_tenth']['wall_ms_median']:.2f} -> {s['last_tenth']['wall_ms_median']:.2f} ms "
            f"(x{s['wall_ratio']:.2f}); shard CPU per push, median {s['first_tenth']['cpu_ms_median']:.2f} -> "
            f"{s['last_tenth']['cpu_ms_median']:.2f} ms (x{s['raw_cpu_ratio']:.2f}), the young twin's beside the "
            f"last tenth {s['young_cpu_ms_median']:.2f} ms (x{s['cpu_ratio']:.2f}, bound {config.max_growth}), mean "
            f"x{s['cpu_mean_ratio']:.2f}; "
            f"RSS x{s['rss_ratio']:.3f} (bound {config.max_rss_growth}) {'ok' if good else 'FAILED'}"
        )
    result = {"bench": "soak", "config": asdict(config), "machine": machine_facts(), "phases": summaries}
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {config.out}")
    if config.plot:
        write_plot(config.plot, config, records)
        print(f"wrote {config.plot}")
    return 0 if ok else 1
