"""consistency = "step" on real processes: two shards whose streams reach the replicas at different
speeds (shard 1's through a slow link), steps pushed and committed as a sync trainer does; no
Lookup or LookupMany reply ever mixes steps (native gate and Python path), the same run shows
that "latest" replicas do mix them, and the dense tower of the served step comes with them."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from ps import wire
from ps.client import PSClient
from ps.job_config import dump_job_config
from ps.rpc import serving_pb2
from ps.table.config import Initializer, OptimizerConfig, OptimizerKind, TableConfig
from serving.config import Consistency
from tests.helpers.processes import ShardCluster, make_job
from tests.helpers.slow_link import SlowLink
from tests.helpers.waiting import wait_until
from tests.serving.replicas import ServingReplica

TABLES = ("user", "item")
STEPS = 40  # at least; the trainer goes on until every replica has served a step mid-run
MAX_STEPS = 2000


def sgd_table(name: str) -> TableConfig:
    """Rows start at 0 and every push of gradient -1 adds 1: after step s a pushed key's row is s."""
    return TableConfig(name, dim=4, initializer=Initializer.ZEROS,
                       optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0))


def lookup_many(replica: ServingReplica, keys: np.ndarray) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    request = serving_pb2.ServingLookupManyRequest(
        lookups=[serving_pb2.ServingLookupRequest(table=t, keys=wire.encode_keys(keys)) for t in TABLES]
    )
    reply = replica.stub.LookupMany(request, timeout=10)
    values = [np.frombuffer(r.values, np.float32).reshape(-1, 4) for r in reply.results]
    found = [np.frombuffer(r.found, np.uint8).astype(bool) for r in reply.results]
    assert all(r.model_version == reply.model_version for r in reply.results)
    return reply.model_version, values, found


def steps_in(values: list[np.ndarray], found: list[np.ndarray]) -> set[float]:
    """The steps the rows of one reply are at (a key without a row has not been pushed: step 0)."""
    return {float(x) for v, f in zip(values, found, strict=True) for x in np.where(f[:, None], v, 0.0).ravel()}


@pytest.fixture
def slow_shard_cluster(tmp_path):
    job = make_job([sgd_table(t) for t in TABLES], num_shards=2)
    cluster = ShardCluster.start(job, tmp_path)
    try:
        with SlowLink(job.shards[1].address, delay=0.25) as link:
            shards = (job.shards[0], dataclasses.replace(job.shards[1], address=link.address))
            proxied = dataclasses.replace(job, shards=shards)
            path = tmp_path / "proxied.toml"
            path.write_text(dump_job_config(proxied))
            yield cluster, dataclasses.replace(cluster, job=proxied, config_path=path)
    finally:
        cluster.stop()


def test_no_reply_mixes_steps_while_shards_stream_at_different_speeds(slow_shard_cluster, tmp_path):
    cluster, proxied = slow_shard_cluster
    keys = np.arange(1, 65, dtype=np.int64)
    assert set(cluster.job.shard_map.shard_of(keys).tolist()) == {0, 1}
    grads = -np.ones((keys.shape[0], 4), dtype=np.float32)
    replicas = {
        "gate": ServingReplica.start(proxied, tmp_path, "step-gate", consistency=Consistency.STEP),
        "python": ServingReplica.start(proxied, tmp_path, "step-python", env={"EMBPS_SERVING_GATE": "0"},
                                       consistency=Consistency.STEP),
        "latest": ServingReplica.start(proxied, tmp_path, "latest", consistency=Consistency.LATEST),
    }
    done = threading.Event()
    seen_enough = threading.Event()  # each replica has shown what the test looks for while training ran
    errors: list[BaseException] = []
    last_step = [0]

    def train() -> None:  # a sync trainer's order: every push of step s acknowledged, then Commit(s)
        try:
            with PSClient.from_job(cluster.job) as client:
                step = 0
                # A loaded machine can start the replicas' streams late: training goes on until they
                # have served a step while it ran (or MAX_STEPS, and the asserts below say which not).
                while step < STEPS or (not seen_enough.is_set() and step < MAX_STEPS):
                    step += 1
                    client.push_many([(t, keys, grads, None) for t in TABLES], step=step)
                    client.commit(step, f"dense tower of step {step}".encode(), "bytes")
                    last_step[0] = step
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    trainer = threading.Thread(target=train)
    try:
        trainer.start()
        seen: dict[str, set[int]] = {name: set() for name in replicas}
        mixed_latest = 0
        while not done.is_set():
            for name, replica in replicas.items():
                version, values, found = lookup_many(replica, keys)
                steps = steps_in(values, found)
                if name == "latest":
                    assert version == 0
                    mixed_latest += len(steps) > 1
                    continue
                assert steps == {float(version)}, f"{name}: one reply at model version {version} holds steps {steps}"
                seen[name].add(version)
                _, found_one, reply = replica.lookup("item", keys)
                one = np.frombuffer(reply.values, np.float32).reshape(-1, 4)
                assert steps_in([one], [found_one]) == {float(reply.model_version)}
            if mixed_latest and all(seen[name] - {0} for name in ("gate", "python")):
                seen_enough.set()
        trainer.join()
        assert not errors, errors
        final = last_step[0]
        for name in ("gate", "python"):
            replica = replicas[name]
            wait_until(lambda r=replica: lookup_many(r, keys)[0] == final, f"{name} at step {final}")
            version, values, found = lookup_many(replica, keys)
            assert steps_in(values, found) == {float(final)} and all(f.all() for f in found)
            dense = replica.stub.DenseModel(serving_pb2.DenseModelRequest(), timeout=5)
            assert (dense.step, dense.state, dense.format) == (final, f"dense tower of step {final}".encode(), "bytes")
            status = replica.status()
            assert (status.model_version, status.newest_step) == (final, final)
            assert len(seen[name]) > 1, f"{name} served only versions {seen[name]} while training ran"
        # The same run without the cut: shard 0's rows run ahead of shard 1's in most replies.
        assert mixed_latest > 0
        # A replica restarted after the job takes full copies that end at the last commit.
        replicas["gate"].stop()
        replicas["gate"] = ServingReplica.start(proxied, tmp_path, "step-gate-again", consistency=Consistency.STEP)
        wait_until(lambda: lookup_many(replicas["gate"], keys)[0] == final, f"the restarted replica at step {final}")
        version, values, found = lookup_many(replicas["gate"], keys)
        assert steps_in(values, found) == {float(final)} and all(f.all() for f in found)
        assert replicas["gate"].stub.DenseModel(serving_pb2.DenseModelRequest(), timeout=5).step == final
    finally:
        done.set()
        trainer.join()
        for replica in replicas.values():
            replica.stop()
