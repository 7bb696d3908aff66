"""Multi-host without a cluster: PS shards, workers and a serving replica on three simulated hosts.

    host 1 (PS):       embps ps --shard 0, embps ps --shard 1     at 10.200.2.1:50061, :50062
    host 2 (workers):  embps launch --no-ps                       2 workers, rendezvous on host 2
    host 3 (serving):  embps serve                                at 10.200.2.3:50300, follows both shards

Every address in the job and serve files is a host's own address on the bridge (no 127.0.0.1, no
localhost), so a component that assumed one machine fails here. The job must train to the
single-process reference, and the replica must serve exactly the shards' rows. The namespaces
(tests/helpers/netns.py) must be gone afterwards, also when the body of the test raised.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from ps.client import PSClient
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from serving.config import ServeConfig, dump_serve_config
from serving.server import SERVICE_NAME
from tests.faults.namespaced_jobs import (
    assert_equals_reference,
    assert_no_loopback,
    require_namespaces,
    seen_keys,
    shard_job,
    start_launch,
    start_shards,
    wait_exit,
    write_job,
)
from tests.helpers import netns
from tests.helpers.netns import HostNetwork, host_network, remaining, subnet_claim
from tests.helpers.processes import REPO_ROOT, stop_pid
from tests.serving.replicas import ServingReplica
from worker.train_config import load_training_job

STEPS = 12
SERVE_PORT = 50300


def ip_netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_cleanup_removes_every_namespace_when_the_body_raises():
    require_namespaces()
    seen: list[HostNetwork] = []
    with pytest.raises(RuntimeError, match="the test body failed"):
        with host_network(3, subnet="10.200.3") as net:
            seen.append(net)
            assert {h.namespace for h in net.hosts} <= ip_netns_names(), "the namespaces were never made"
            raise RuntimeError("the test body failed")
    (net,) = seen
    assert not {h.namespace for h in net.hosts} & ip_netns_names()
    assert remaining(net) == [], f"left behind after the body raised: {remaining(net)}"


def test_cleanup_removes_what_was_made_when_building_fails(monkeypatch):
    require_namespaces()
    """The veth of the second host fails to come up: the first host, the second namespace and the
    bridge exist by then, and must go too."""
    made: list[str] = []
    real_ip = netns._ip

    def failing_ip(*args: str, check: bool = True):
        if args[:2] == ("link", "add") and args[2].endswith("2") and "veth" in args:
            raise RuntimeError(f"injected: ip {' '.join(args)} failed")
        if args[:2] == ("netns", "add") or args[:2] == ("link", "add"):
            made.append(args[2])
        return real_ip(*args, check=check)

    monkeypatch.setattr(netns, "_ip", failing_ip)
    with pytest.raises(RuntimeError, match="injected: ip link add ev.*2 type veth"):
        with host_network(3, subnet="10.200.3"):
            pytest.fail("the body ran on a network that could not be built")
    monkeypatch.undo()
    namespaces = [name for name in made if name.startswith("embps-") and not name.startswith("embps-probe-")]
    assert len(namespaces) == 2 and any(name.startswith("ev") for name in made), made
    assert not set(namespaces) & ip_netns_names(), f"namespaces left behind: {namespaces}"
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    for name in made:
        if not name.startswith("embps-"):
            assert f" {name}:" not in links and f" {name}@" not in links, f"link {name} left behind"


_HOLD_SUBNET = """
import sys
from tests.helpers.netns import subnet_claim
with subnet_claim("10.250.9"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_subnet_that_another_process_holds_is_waited_for_until_it_ends():
    """make test's workers (and concurrent runs) build networks at once: one on a subnet another
    process holds waits, and gets it once that process has ended. Needs no namespaces."""
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SUBNET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(AssertionError, match="subnet 10.250.9, held by another process"):
            with subnet_claim("10.250.9", timeout=0.5):
                pytest.fail("claimed a subnet that another live process holds")
        other.stdin.close()
        with subnet_claim("10.250.9", timeout=30):
            assert other.wait(timeout=30) == 0
    finally:
        other.kill()
        other.wait()


def start_replica(host: netns.Host, serve: ServeConfig, config_path, log_path) -> ServingReplica:
    """`embps serve` on `host`, reached from the test process at `serve.listen`."""
    env = {"PYTHONPATH": python_path(str(REPO_ROOT)), **MALLOC_TUNING}
    with open(log_path, "wb") as log:
        proc = host.popen(
            [sys.executable, "-m", "embps", "serve", "--config", str(config_path), "--grace", "1"],
            env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    replica = ServingReplica(serve, proc, log_path, grpc.insecure_channel(serve.listen))
    try:
        replica.wait_health(SERVICE_NAME)
    except BaseException:
        replica.stop()
        raise
    return replica


@pytest.mark.slow
def test_shards_workers_and_a_replica_on_three_hosts_train_and_serve_the_same_rows(tmp_path):
    require_namespaces()
    with host_network(3, subnet="10.200.2") as net:
        ps_host, worker_host, serve_host = net.hosts
        ps = shard_job([ps_host, ps_host], "netns")
        out = tmp_path / "out"
        config = write_job(tmp_path / "job.toml", ps, STEPS, out)
        listen = f"{serve_host.address}:{SERVE_PORT}"
        serve = ServeConfig(job=ps, listen=listen, metrics_port=9300, tables=tuple(t.name for t in ps.tables))
        serve_path = tmp_path / "serve.toml"
        serve_path.write_text(dump_serve_config(serve, str(config)))
        assert_no_loopback(config, serve_path)
        procs: list[subprocess.Popen] = []
        replica = None
        try:
            procs += start_shards(ps, [ps_host, ps_host], config, tmp_path)
            replica = start_replica(serve_host, serve, serve_path, tmp_path / "serve.log")
            log = tmp_path / "launch.log"
            launcher = start_launch(worker_host, config, log)
            procs.append(launcher)
            assert wait_exit(launcher, log, timeout=240) == 0, log.read_text()[-6000:]

            seen = seen_keys(load_training_job(config))
            with PSClient.from_job(ps) as client:
                rows = {name: client.lookup(name, keys) for name, keys in seen.items()}
                versions = {(t.name, s): t.version for s, stats in enumerate(client.stats()) for t in stats.tables}
            for (table, shard), version in versions.items():
                assert version > 0, f"{table} shard {shard} never got a push"
                replica.wait_version(table, shard, version)
            for name, keys in seen.items():
                values, found, _ = replica.lookup(name, keys)
                assert found.all(), f"{name}: the replica lacks {int((~found).sum())} trained rows"
                np.testing.assert_array_equal(values, rows[name], err_msg=f"{name}: replica rows != shard rows")
        finally:
            if replica is not None:
                replica.stop()
            for proc in reversed(procs):
                stop_pid(proc)
        assert_equals_reference(config, torch.load(out / "dense.pt"), rows)
    assert remaining(net) == [], f"network pieces left behind: {remaining(net)}"
