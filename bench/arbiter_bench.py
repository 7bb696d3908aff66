"""What the arbiter costs at rest: CPU per etcd call, and an idle shard pair's CPU per second.

    embps bench arbiter [--calls 400] [--seconds 10] [--lease 2]

A pair of shards talks to etcd all the time, trained or not: the primary renews its lease every
lease/4, the standby renews its own key's lease as often and reads the membership record with the
leader key (one range read) every lease/8, to promote within an eighth of a lease of the primary's
lease ending. With the default 2 s lease that is 8 calls a second per pair, so a call's cost, times
the shards of a job, is CPU taken from training or serving on every host, and from etcd.

Part 1, per call, in one run: EtcdClient calls (a range read and a lease renewal in turn) on a
connection kept open between calls (what the arbiter does) and on a fresh connection per call (each
call's idle connections closed after it: what it did before), over http and, where `openssl` can
make a throwaway CA, over https with client certificates (a TLS handshake per fresh connection).
CPU from /proc: the calling process's, and etcd's. Part 2: a primary and its standby started with
`embps ps`, idle, over `--seconds`: the CPU per second of each and of etcd (its own raft ticks,
every 25 ms as bench/etcd_server.py starts it, included), over http and https.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.etcd_server import EtcdServer, EtcdTls, etcd_missing
from bench.machine import machine_facts, process_cpu_seconds
from bench.ports import loopback_shards
from ps.etcd import EtcdClient
from ps.job_config import ArbiterConfig, Deadlines, JobConfig
from ps.process import children
from ps.shard.arbiter import Membership, membership_key
from ps.table.config import TableConfig


@dataclass(frozen=True)
class ArbiterBenchConfig:
    calls: int = 400  # etcd calls per measured case (part 1)
    seconds: float = 10.0  # idle pair measured this long (part 2)
    lease_seconds: int = 2
    out: str | None = None

    def __post_init__(self) -> None:
        if self.calls < 1 or self.seconds <= 0 or self.lease_seconds < 1:
            raise ValueError("calls, seconds, lease: must be positive")


def _openssl_pki(directory: Path) -> dict[str, Path] | None:
    """A CA, a server certificate for 127.0.0.1 (client use too: etcd's gateway dials its own gRPC
    port with it) and a client certificate, by the openssl command; None where it cannot."""
    if shutil.which("openssl") is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    names = ("ca", "ca_key", "server", "server_key", "client", "client_key")
    files = {name: directory / f"{name}.pem" for name in names}
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    try:
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", "/CN=bench-ca", "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
        for leaf in ("server", "client"):
            csr = directory / f"{leaf}.csr"
            run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN=bench-{leaf}",
                "-keyout", str(files[f"{leaf}_key"]), "-out", str(csr))
            run("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey", str(files["ca_key"]),
                "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(files[leaf]))
    except subprocess.CalledProcessError as exc:
        print(f"  https skipped: openssl failed: {exc.stderr.decode(errors='replace')[-300:]}")
        return None
    return files


def _per_call(client: EtcdClient, etcd_pid: int, calls: int, fresh: bool) -> dict[str, float]:
    """Client and etcd CPU (ms) and wall time per call; `fresh`: a new connection for every call."""
    client.put("/embps/bench/arbiter", "x")
    lease = client.grant(60)
    client.close()
    cpu0, etcd0, wall0 = time.process_time(), process_cpu_seconds(etcd_pid), time.monotonic()
    for i in range(calls):
        if i % 2:
            client.get("/embps/bench/arbiter")
        else:
            client.keepalive(lease)
        if fresh:
            client.close()
    cpu1, etcd1, wall1 = time.process_time(), process_cpu_seconds(etcd_pid), time.monotonic()
    client.revoke(lease)
    client.close()
    return {
        "client_ms": (cpu1 - cpu0) / calls * 1e3,
        "etcd_ms": (etcd1 - etcd0) / calls * 1e3,
        "wall_ms": (wall1 - wall0) / calls * 1e3,
    }


def _schemes(workdir: Path) -> list[tuple[str, EtcdTls | None, ArbiterConfig]]:
    """("http", None, its arbiter), and ("https", etcd's TLS files, an arbiter with a client
    certificate) where openssl can make a throwaway CA; the arbiters' endpoints are placeholders."""
    schemes: list[tuple[str, EtcdTls | None, ArbiterConfig]] = [("http", None, ArbiterConfig(endpoints="http://x:1"))]
    pki = _openssl_pki(workdir / "pki")
    if pki is not None:
        arbiter = ArbiterConfig(
            endpoints="https://127.0.0.1:1", tls_ca=str(pki["ca"]),
            client_cert=str(pki["client"]), client_key=str(pki["client_key"]),
        )
        schemes.append(("https", EtcdTls(pki["server"], pki["server_key"], pki["ca"], arbiter.tls_context()), arbiter))
    return schemes


def _calls_part(config: ArbiterBenchConfig, workdir: Path, schemes: list) -> list[dict]:
    results = []
    for scheme, tls, _ in schemes:
        with EtcdServer.start(workdir / f"etcd-{scheme}", tls=tls) as etcd:
            client = EtcdClient(etcd.endpoint, tls=tls.client if tls else None)
            _per_call(client, etcd.proc.pid, min(config.calls, 50), fresh=False)  # warm both up
            for round_ in range(2):  # kept and fresh in turn, first one then the other
                for fresh in ((False, True) if round_ == 0 else (True, False)):
                    r = _per_call(client, etcd.proc.pid, config.calls, fresh)
                    r.update(scheme=scheme, connection="fresh" if fresh else "kept", round=round_ + 1)
                    results.append(r)
                    print(f"  {scheme:>5} {r['connection']:>5} round {r['round']}: CPU per call: caller "
                          f"{r['client_ms']:.3f} ms, etcd {r['etcd_ms']:.3f} ms; wall {r['wall_ms']:.3f} ms",
                          flush=True)
    return results


def _idle_pair_part(config: ArbiterBenchConfig, workdir: Path, schemes: list) -> list[dict]:
    from bench.ps_bench import start_shards

    results = []
    for scheme, tls, arbiter in schemes:
        with EtcdServer.start(workdir / f"etcd-pair-{scheme}", tls=tls) as etcd:
            job = JobConfig(
                job=f"bench-arbiter-{scheme}", shards=loopback_shards(1, True), tables=(TableConfig("t", dim=8),),
                deadlines=Deadlines(stats=60.0),
                arbiter=dataclasses.replace(arbiter, endpoints=etcd.endpoint, lease_seconds=config.lease_seconds),
            )
            procs: list[subprocess.Popen] = []
            pair_dir = workdir / f"pair-{scheme}"
            pair_dir.mkdir()
            try:
                procs += start_shards(job, pair_dir, malloc_tuned=True)
                pids = {"primary": procs[0].pid, "standby": procs[1].pid, "etcd": etcd.proc.pid}
                _wait_in_sync(job, etcd, tls)  # measured from the pair's steady state, not its join
                before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
                wall0 = time.monotonic()
                time.sleep(config.seconds)
                wall = time.monotonic() - wall0
                after = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
            finally:
                children.stop_all(procs, 30.0)
        per_second = {name: (after[name] - before[name]) / wall * 1e3 for name in pids}
        print(f"  {scheme:>5}: CPU ms per second: " + ", ".join(f"{n} {v:.1f}" for n, v in per_second.items())
              + f" (lease {config.lease_seconds} s, {wall:.1f} s)", flush=True)
        results.append({"scheme": scheme, "ms_per_second": per_second, "seconds": wall})
    return results


def _wait_in_sync(job: JobConfig, etcd: EtcdServer, tls: EtcdTls | None, timeout: float = 120.0) -> None:
    """Returns once etcd records shard 0's pair in sync (the standby joined and caught up);
    TimeoutError after `timeout` seconds."""
    client = EtcdClient(etcd.endpoint, tls=tls.client if tls else None)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            record = client.get(membership_key(job.job, 0))
            if record is not None and Membership.load(record.value).sync:
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise TimeoutError(f"the pair of shard 0 not in sync within {timeout:g} s")


def run_arbiter_bench(config: ArbiterBenchConfig) -> int:
    if (missing := etcd_missing()) is not None:
        print(f"embps bench arbiter: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="embps-bench-arbiter-") as tmp:
        workdir = Path(tmp)
        print(f"etcd calls ({config.calls} per case, CPU from /proc):", flush=True)
        schemes = _schemes(workdir)
        calls = _calls_part(config, workdir, schemes)
        print(f"an idle primary and standby over {config.seconds:g} s:", flush=True)
        pair = _idle_pair_part(config, workdir, schemes)
    results = {"config": dataclasses.asdict(config), "machine": machine_facts(), "calls": calls, "idle_pair": pair}
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=2))
    return 0
