"""A shard's primary cut off the network (network namespaces, tests/helpers/netns.py).

The primary runs in one namespace, its standby in another, etcd and the pushing client in the root
namespace on the bridge. At a seeded random push the primary's link goes down: its lease expires in
etcd, the standby promotes itself (epoch 2), and the client's next attempt (after a part of its
deadline) goes to it with the same push ids. A push tried from inside the cut-off namespace (the
only place that still reaches the old primary) is refused once its lease ended; with the link back,
etcd tells the old primary its lease is gone and it says it was deposed. The new primary's tables
are bit-equal to an in-process shard that applied every acknowledged push once.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import numpy as np
import pytest

from ps.client import PSClient
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, ShardConfig, SnapshotConfig, dump_job_config
from ps.process.children import stop as stop_pid
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from ps.rpc import ps_pb2
from ps.shard.arbiter import Arbiter
from ps.shard.state import Shard
from tests.helpers.etcd import start_etcd
from tests.helpers.netns import NetnsUnavailable, host_network
from tests.helpers.processes import REPO_ROOT, wait_serving
from tests.helpers.waiting import wait_until
from tests.ps.test_standby import TABLES, assert_bit_equal, make_push, shard_state

LEASE_S = 1
STEPS = 60
# Run inside the cut-off namespace: one push to the old primary alone, no retries past 1.5 s.
TRY_PUSH = """
import sys, numpy as np
from ps.client import PSClient
c = PSClient([sys.argv[1]], dims={"adam": 8, "ftrl": 4}, max_attempts=1)
try:
    c.push("adam", np.arange(4, dtype=np.int64), np.ones((4, 8), np.float32))
    print("ACKNOWLEDGED")
except Exception as exc:
    print("REFUSED", exc)
"""


def test_a_primary_cut_off_the_network_is_replaced_and_acknowledges_nothing(tmp_path):
    try:
        network = host_network(2, subnet="10.213.0")
        net = network.__enter__()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    value = int(os.environ.get("EMBPS_STANDBY_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"partition: seed {value} (EMBPS_STANDBY_SEED={value} repeats it)")
    rng = random.Random(value)
    etcd = start_etcd(tmp_path / "etcd", host=net.runner_address)
    primary_host, standby_host = net.hosts
    job = JobConfig(
        job="partition",
        shards=(ShardConfig(address=f"{primary_host.address}:7000", standby=f"{standby_host.address}:7000"),),
        tables=TABLES,
        deadlines=Deadlines(lookup=8.0, push=8.0, stats=5.0),
        arbiter=ArbiterConfig(endpoints=etcd.endpoint, lease_seconds=LEASE_S),
        snapshot=SnapshotConfig((tmp_path / "snaps").as_uri()),
    )
    config = tmp_path / "partition.toml"
    config.write_text(dump_job_config(job))
    env = {**MALLOC_TUNING, "PYTHONPATH": python_path(str(REPO_ROOT))}
    shard = [sys.executable, "-m", "embps", "ps", "--config", str(config), "--shard", "0", "--grace", "2"]
    logs = [tmp_path / "primary.log", tmp_path / "standby.log"]
    procs = []
    client = None
    try:
        with open(logs[1], "ab") as out:
            procs.append(standby_host.popen([*shard, "--standby"], env=env, cwd=REPO_ROOT, stdout=out, stderr=out))
        with open(logs[0], "ab") as out:
            procs.append(primary_host.popen(shard, env=env, cwd=REPO_ROOT, stdout=out, stderr=out))
        wait_serving(job.shards[0].standby, procs[0], log_path=logs[1])
        wait_serving(job.shards[0].address, procs[1], log_path=logs[0])
        wait_until(lambda: "joined" in logs[0].read_text(), "the standby joining the primary")

        client = PSClient.from_job(job, client_id="trainer-0")
        reference = Shard(job, 0)
        data = np.random.default_rng(rng.randrange(1 << 32))
        acked: list = []
        errors: list = []

        def push_all() -> None:
            try:
                for step in range(1, STEPS + 1):
                    prepared = make_push(client, data, step)
                    client.send_push(prepared)
                    acked.append((time.monotonic(), prepared))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        pusher = threading.Thread(target=push_all)
        pusher.start()
        cut_after = rng.randrange(5, STEPS // 2)
        wait_until(lambda: len(acked) >= cut_after or errors, f"{cut_after} pushes")
        net.cut(primary_host)
        cut_at = time.monotonic()
        print(f"cut the primary off after push {len(acked)}")
        pusher.join(120)
        assert not errors, errors
        times = [t for t, _ in acked]
        stall = max(b - a for a, b in zip(times, times[1:], strict=False) if b > cut_at)
        print(f"failover stall after the cut: {stall:.2f} s (lease {LEASE_S} s, attempt timeout 2 s)")
        assert "PROMOTED" in logs[1].read_text()

        tried = primary_host.run([sys.executable, "-c", TRY_PUSH, job.shards[0].address], env=env, cwd=REPO_ROOT)
        print(f"push to the cut-off primary: {tried.stdout.strip()} {tried.stderr.strip()[-300:]}")
        assert tried.stdout.startswith("REFUSED") and "UNAVAILABLE" in tried.stdout, tried.stdout + tried.stderr

        net.restore(primary_host)
        wait_until(lambda: "deposed" in logs[0].read_text(), "the old primary learning it was deposed")
        membership, _ = Arbiter(job.arbiter, job.job, 0, "test").read()
        assert (membership.primary, membership.epoch) == (job.shards[0].standby, 2)
        for _, prepared in acked:
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        assert_bit_equal(shard_state(job, job.shards[0].standby, STEPS), reference)
    finally:
        if client is not None:
            client.close()
        for proc in procs:
            stop_pid(proc)
        etcd.stop()
        network.__exit__(None, None, None)
