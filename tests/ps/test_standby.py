"""Shard standbys with real processes: etcd as the arbiter, a primary and a standby per shard.

- SIGKILL of the primary at a seeded random moment while a client pushes back to back: the standby
  promotes itself through etcd (epoch + 1), the client fails over with the same push ids. The
  first primary started again (as a restarted pod would be) finds the other primary alive and
  becomes its standby, gets a copy of the state and the pushes
  since, and the pair is in sync again; SIGKILL of the promoted primary: the new standby takes
  over (epoch 3). Its tables (values, optimizer state, admission counters, evictions, versions)
  end bit-equal to an in-process shard that applied every acknowledged push once; pushes
  acknowledged before, sent again, are duplicates (the push-id memory was copied and replicated).
  Both stalls are printed.
- A stopped standby (SIGSTOP): the primary's push waits until the arbiter records the primary
  alone, then it is acknowledged (never before); the record says so.
- etcd stopped for a while: pushes go on while the standby follows; etcd back, the lease holds.
  Then a primary killed with no push in flight: a serving follower goes on from the promoted
  standby at its version, without a full resync.
- A serving replica with consistency = "step" (`embps serve`) follows the pair while a trainer pushes
  and commits steps; the primary is SIGKILLed: the replica follows the promoted standby, whose
  commit log came over the replication stream, without a full resync, and its cut moves on.

EMBPS_STANDBY_SEED=<seed> repeats a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from bench.ports import free_ports
from ps import wire
from ps.client import PSClient
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, ShardConfig, SnapshotConfig, dump_job_config
from ps.process.children import stop as stop_pid
from ps.rpc import ps_pb2, ps_pb2_grpc, replication_pb2, serving_pb2, snapshot_pb2, snapshot_pb2_grpc
from ps.shard.arbiter import Arbiter, Membership, membership_key
from ps.shard.replication import ROLE_VALUES
from ps.shard.state import Shard
from ps.snapshot.files import ShardRecord, SnapshotWriter, restore
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    Initializer,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from serving.config import Consistency
from serving.follower import ShardFollower
from serving.metrics import ServingMetrics
from serving.store import TableReplica
from tests.helpers.etcd_proxy import EtcdProxy
from tests.helpers.processes import ShardPair, start_shard, stop_process
from tests.helpers.waiting import wait_until
from tests.serving.replicas import ServingReplica

TABLES = (
    TableConfig(
        name="adam",
        dim=8,
        init_scale=0.1,
        optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.02),
        admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2),
    ),
    TableConfig(
        name="ftrl",
        dim=4,
        init_scale=0.1,
        optimizer=OptimizerConfig(kind=OptimizerKind.FTRL, lr=0.3, l1=0.001),
        eviction=EvictionConfig(ttl_steps=5),
    ),
)
LEASE_S = 1
KEYS = 300
REPLICATE = "/{}/Replicate".format(replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name)


def pair_job(
    etcd_endpoint: str, name: str, tables: tuple[TableConfig, ...] = TABLES, snapshot_uri: str | None = None
) -> JobConfig:
    """A job of one shard with a standby; snapshot_uri: its [snapshot] uri (shard_state writes there)."""
    ports = free_ports(4)
    shard = ShardConfig(
        address=f"127.0.0.1:{ports[0]}",
        metrics_port=ports[1],
        standby=f"127.0.0.1:{ports[2]}",
        standby_metrics_port=ports[3],
    )
    return JobConfig(
        job=name,
        shards=(shard,),
        tables=tables,
        deadlines=Deadlines(lookup=20.0, push=20.0, stats=5.0),
        push_dedupe_window=1 << 20,  # the push-id memory outlasts the test: old pushes stay repeats
        arbiter=ArbiterConfig(endpoints=etcd_endpoint, lease_seconds=LEASE_S),
        snapshot=SnapshotConfig(snapshot_uri) if snapshot_uri is not None else None,
    )


def metrics(port: int) -> dict[str, float]:
    """The samples of a Prometheus page, by name with labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def seed(tag: str) -> random.Random:
    value = int(os.environ.get("EMBPS_STANDBY_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"{tag}: seed {value} (EMBPS_STANDBY_SEED={value} repeats it)")
    return random.Random(value)


def make_push(client: PSClient, rng: np.random.Generator, step: int):
    """One step's multi-table push: some keys of each table, with gradients."""
    keys, offsets, grads = [], [0], []
    for table in TABLES:
        k = np.unique(rng.integers(0, KEYS, size=40)).astype(np.int64)
        keys.append(k)
        offsets.append(offsets[-1] + k.shape[0])
        grads.append(rng.standard_normal((k.shape[0], table.dim)).astype(np.float32).reshape(-1))
    names = [t.name for t in TABLES]
    return client.prepare_push_multi(names, np.concatenate(keys), offsets, np.concatenate(grads), step=step)


def shard_state(job: JobConfig, address: str, step: int) -> dict:
    """Every table of the shard at `address`, written as a snapshot under the job's [snapshot] uri
    and read back (TableState)."""
    uri = job.snapshot.uri
    request = snapshot_pb2.WriteSnapshotRequest(uri=uri, job=job.job, step=step, kind="full", num_shards=1)
    with grpc.insecure_channel(address) as channel:
        reply = snapshot_pb2_grpc.SnapshotControlStub(channel).WriteSnapshot(request, timeout=30)
    writer = SnapshotWriter(uri, job.job, step, "full", num_shards=1, tables=job.tables)
    for record in json.loads(reply.records_json):
        writer.add_shard_record(ShardRecord.from_dict(record))
    writer.commit()
    return {name: shards[0] for name, shards in restore(uri, job.job, step).items()}


def assert_bit_equal(got: dict, reference: Shard) -> None:
    for name, table in reference.tables.items():
        want = table.export()
        state = got[name]
        for field in ("keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts"):
            np.testing.assert_array_equal(getattr(state, field), getattr(want, field), err_msg=f"{name}.{field}")
        assert (state.version, state.step) == (want.version, want.step), name


def test_sigkill_of_the_primary_fails_over_then_a_new_standby_catches_up_and_takes_over_too(etcd, tmp_path):
    """Primary A killed: B takes over alone. A new standby started where A was gets B's state and
    the pushes since, then B is killed too: the new standby takes over (epoch 3), bit-equal."""
    rng = seed("failover")
    job = pair_job(etcd.endpoint, "failover", snapshot_uri=(tmp_path / "snaps").as_uri())
    pair = ShardPair.start(job, tmp_path)
    reference = Shard(job, 0)
    client = PSClient.from_job(job, client_id="trainer-0")
    data = np.random.default_rng(rng.randrange(1 << 32))
    acked: list[tuple[float, object]] = []  # (time.monotonic() of the ack, prepared push)
    errors: list[BaseException] = []
    stop = threading.Event()
    arbiter = Arbiter(job.arbiter, job.job, 0, "test")

    def push_all() -> None:
        try:
            step = 0
            while not stop.is_set():
                step += 1
                prepared = make_push(client, data, step)
                client.send_push(prepared)
                acked.append((time.monotonic(), prepared))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def kill_at_random(pid: int, what: str) -> float:
        more = len(acked) + rng.randrange(5, 30)
        wait_until(lambda: len(acked) >= more or errors, f"{more} pushes")
        time.sleep(rng.uniform(0, 0.01))
        os.kill(pid, signal.SIGKILL)
        print(f"killed {what} after push {len(acked)}")
        return time.monotonic()

    def stall_after(moment: float) -> float:
        wait_until(lambda: (acked and acked[-1][0] > moment + 0.5) or errors, "pushes after the kill")
        times = [t for t, _ in acked]
        return max(b - a for a, b in zip(times, times[1:], strict=False) if b > moment)

    new_standby = None
    try:
        pusher = threading.Thread(target=push_all)
        pusher.start()
        first_kill = kill_at_random(pair.primary.pid, "the primary")
        print(f"failover stall: {stall_after(first_kill):.2f} s (lease {LEASE_S} s)")
        assert "PROMOTED" in pair.log(1), pair.log(1)[-3000:]
        promoted = metrics(job.shards[0].standby_metrics_port)
        assert promoted['embps_failovers_total{shard="0"}'] == 1 and promoted['embps_shard_epoch{shard="0"}'] == 2
        assert promoted['embps_shard_role{shard="0"}'] == ROLE_VALUES["alone"]
        new_log = tmp_path / "new-standby.log"
        before_copy = acked[-1][1]
        # Started as the primary was (a restarted pod): it finds the partner primary and alive, and
        # becomes its standby (embps launch starts `--standby primary` directly).
        new_standby = start_shard(pair.config, 0, new_log)
        wait_until(lambda: pair.log(1).count("joined") == 1 or errors, "the new standby catching up", 60)
        assert "starting as its standby" in new_log.read_text() and "state copied" in new_log.read_text()
        membership, _ = arbiter.read()
        assert membership == Membership(job.shards[0].standby, job.shards[0].address, 2, True, membership.lineage)
        promoted = metrics(job.shards[0].standby_metrics_port)
        assert promoted['embps_shard_role{shard="0"}'] == ROLE_VALUES["sync"]
        assert 'embps_replication_lag_pushes{shard="0"}' in promoted
        assert promoted['embps_state_copy_bytes_total{shard="0"}'] > 0  # it copied its state
        second_kill = kill_at_random(pair.standby.pid, "the promoted standby")
        print(f"second failover stall: {stall_after(second_kill):.2f} s")
        stop.set()
        pusher.join(60)
        assert not pusher.is_alive() and not errors, errors
        assert "PROMOTED" in new_log.read_text(), new_log.read_text()[-3000:]
        for _, prepared in acked:
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        # The second promoted standby holds every acknowledged push once, bit for bit.
        got = shard_state(job, job.shards[0].address, 1)
        assert_bit_equal(got, reference)
        # Its push-id memory came with the copy and the pushes: acknowledged pushes sent again are
        # repeats (the last one before the new standby started, so before the copy, and the last).
        for prepared in (before_copy, acked[-1][1]):
            assert client.send_push(prepared).num_duplicates == len(prepared.calls)
        membership, _ = arbiter.read()
        assert (membership.primary, membership.epoch, membership.standby) == (job.shards[0].address, 3, "")
        # Client calls carry the epoch: the client learnt epoch 3 from the replies, and a process
        # refuses a call from a client that has seen a newer epoch than its own (a deposed primary
        # that still trusts its lease: a paused process, a clock that jumped).
        assert client._epochs == [3]
        with grpc.insecure_channel(job.shards[0].address) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            _, rpc = stub.Stats.with_call(ps_pb2.StatsRequest(), metadata=((wire.EPOCH_METADATA_KEY, "3"),), timeout=10)
            assert (wire.EPOCH_METADATA_KEY, "3") in tuple(rpc.trailing_metadata())
            with pytest.raises(grpc.RpcError) as info:
                stub.Stats(ps_pb2.StatsRequest(), metadata=((wire.EPOCH_METADATA_KEY, "4"),), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "seen epoch 4" in info.value.details()
            # An epoch that is not a uint64 names none (as a missing one), never an error of
            # Python's int(), which refuses 4,300 digits or more.
            stub.Stats(ps_pb2.StatsRequest(), metadata=((wire.EPOCH_METADATA_KEY, "9" * 5000),), timeout=10)
    finally:
        stop.set()
        client.close()
        pair.stop()
        if new_standby is not None:
            stop_pid(new_standby)


def _started_pair(job: JobConfig, workdir) -> tuple[ShardPair, PSClient, Arbiter]:
    """A pair of shard 0 of `job` joined, a trainer's client of it and a reader of its record."""
    pair = ShardPair.start(job, workdir)
    return pair, PSClient.from_job(job, client_id="trainer-0"), Arbiter(job.arbiter, job.job, 0, "test")


def _push_steps(client: PSClient, data: np.random.Generator, steps: range) -> list:
    """One push of each step, each acknowledged before the next; the pushes, prepared."""
    acked = []
    for step in steps:
        acked.append(make_push(client, data, step))
        client.send_push(acked[-1])
    return acked


def _restart_without_data(etcd, data) -> None:
    """etcd started again without its data folder `data` (a pod without a persistent disk)."""
    import shutil

    etcd.stop()
    shutil.rmtree(data)
    etcd.restart()


def _started_over(pair: ShardPair, etcd, job: JobConfig, tmp_path) -> ShardPair:
    """Both processes of `pair` stopped, etcd started again without its data, and a pair of the
    same job started anew (under tmp_path / "again"): it begins at epoch 1 of a new lineage."""
    pair.stop()
    _restart_without_data(etcd, tmp_path / "etcd" / "data")
    (tmp_path / "again").mkdir()
    return ShardPair.start(job, tmp_path / "again")


def _stop_pair(pair: ShardPair, client: PSClient, restarted) -> None:
    """A test's processes stopped: the restarted primary first (it may wait on the others), then a
    standby resumed if paused, the client and the pair."""
    if restarted is not None:
        stop_pid(restarted)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pair.standby.pid, signal.SIGCONT)
    client.close()
    pair.stop()


def test_a_primary_restarted_before_its_standby_took_over_waits_for_it_and_loses_nothing(etcd, tmp_path):
    """A primary killed and started again (a restarted pod: the same command) before its standby
    in sync had promoted took the shard itself once the old lease expired (epoch + 1, its own
    empty state), and the standby, which held every acknowledged push, then copied that state over
    them. Now, while the standby's key lives in the arbiter, the restarted process waits; the
    standby takes over and the restarted one becomes its standby. Here the standby is paused
    (SIGSTOP) while the test holds its key for it, so the restarted process meets the record
    before the standby's promotion, every time."""
    job = pair_job(etcd.endpoint, "restarted", snapshot_uri=(tmp_path / "snaps").as_uri())
    pair, client, arbiter = _started_pair(job, tmp_path)
    reference = Shard(job, 0)
    holder = Arbiter(dataclasses.replace(job.arbiter, lease_seconds=60), job.job, 0, job.shards[0].standby)
    restarted, restarted_log = None, tmp_path / "restarted.log"
    try:
        acked = _push_steps(client, np.random.default_rng(5), range(1, 21))
        synced = arbiter.read()[0]
        assert synced.sync and synced.standby == job.shards[0].standby, synced
        # The standby's own key, under its own lease: what a restarted primary meets.
        own = {"standby": job.shards[0].standby, "epoch": synced.epoch, "in_sync": True}
        wait_until(lambda: json.loads(arbiter.standby_alive() or "{}") == own, "the standby's key")
        os.kill(pair.standby.pid, signal.SIGSTOP)
        holder.hold_standby(synced.epoch, True)  # as the standby's own renewals would, paused
        os.kill(pair.primary.pid, signal.SIGKILL)
        restarted = start_shard(pair.config, 0, restarted_log)
        wait_until(lambda: "waiting for it to take over" in restarted_log.read_text(), "the restarted primary waiting")
        assert arbiter.read()[0] == synced  # it took nothing
        os.kill(pair.standby.pid, signal.SIGCONT)
        wait_until(lambda: arbiter.read()[0].primary == job.shards[0].standby, "the standby's promotion", 30)
        holder.release_standby()
        wait_until(lambda: "joined" in pair.log(1), "the restarted process joining as the standby", 60)
        assert "starting as its standby" in restarted_log.read_text()
        for prepared in acked:
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        assert_bit_equal(shard_state(job, job.shards[0].standby, 1), reference)
        assert client.send_push(acked[-1]).num_duplicates == len(acked[-1].calls)
    finally:
        _stop_pair(pair, client, restarted)
        holder.release_standby()


def test_a_standby_back_after_its_lease_refuses_the_older_state_of_a_restarted_primary(etcd, tmp_path):
    """Past the standby's lease (paused longer than it), a primary restarted in its partner's place
    takes the shard, with an error in its log; when the standby is back it refuses that primary's
    state copy (its tables are behind the standby's, which holds acknowledged pushes), logged
    critical, instead of copying the older state over them."""
    job = pair_job(etcd.endpoint, "behind")
    pair, client, arbiter = _started_pair(job, tmp_path)
    restarted, restarted_log = None, tmp_path / "restarted.log"
    try:
        _push_steps(client, np.random.default_rng(6), range(1, 11))
        synced = arbiter.read()[0]
        assert synced.sync, synced
        own = {"standby": job.shards[0].standby, "epoch": synced.epoch, "in_sync": True}
        wait_until(lambda: json.loads(arbiter.standby_alive() or "{}") == own, "the standby knowing it is in sync")
        os.kill(pair.standby.pid, signal.SIGSTOP)
        os.kill(pair.primary.pid, signal.SIGKILL)
        restarted = start_shard(pair.config, 0, restarted_log)
        wait_until(lambda: arbiter.read()[0].epoch == synced.epoch + 1, "the restarted primary's take", 30)
        wait_until(lambda: "took the shard" in restarted_log.read_text(), "the take's line")
        os.kill(pair.standby.pid, signal.SIGCONT)
        wait_until(lambda: "refusing its state copy" in pair.log(1), "the standby refusing the older state", 30)
        assert "state copied" not in pair.log(1)
    finally:
        _stop_pair(pair, client, restarted)


def test_a_standby_does_not_grow_with_the_keys_pushes_touch(etcd, tmp_path):
    """A standby tracked the changes of every push for an incremental snapshot after a failover,
    and nothing ever took them: every key pushed and every key evicted stayed, up to 4M a table
    (twice the capacity with one), while its primary, which takes them at each snapshot, stayed
    flat. Fresh keys every step, rows evicted after 5 steps: both hold about the same."""
    job = pair_job(etcd.endpoint, "flat")
    pair = ShardPair.start(job, tmp_path)
    client = PSClient.from_job(job, client_id="trainer-0")
    try:
        for step in range(1, 201):
            keys = np.arange(step * 1000, step * 1000 + 1000, dtype=np.int64)
            grads = np.ones(1000 * 4, dtype=np.float32)
            client.send_push(client.prepare_push_multi(["ftrl"], keys, [0, 1000], grads, step=step))
        label = 'embps_table_memory_bytes{shard="0",table="ftrl"}'
        primary = metrics(job.shards[0].metrics_port)[label]
        standby = metrics(job.shards[0].standby_metrics_port)[label]
        assert standby < 1.2 * primary, (standby, primary)
    finally:
        client.close()
        pair.stop()


def test_etcd_losing_its_data_under_a_pair_in_sync_loses_no_acknowledged_push(tmp_path):
    """etcd restarted with its data gone (a member's disk lost): the primary's lease is gone, so it
    deposes itself; the standby saw no record and never promoted (the shard answered nothing for
    good), and the primary started again took epoch 1 with its empty state and copied it over the
    standby's acknowledged pushes. Now the standby, last seen in sync, takes the shard an epoch
    further, and the restarted primary waits for it and becomes its standby."""
    from tests.helpers.etcd import start_etcd

    etcd = start_etcd(tmp_path / "etcd")
    job = pair_job(etcd.endpoint, "wiped", snapshot_uri=(tmp_path / "snaps").as_uri())
    pair, client, arbiter = _started_pair(job, tmp_path)
    reference = Shard(job, 0)
    restarted = None
    data = np.random.default_rng(7)
    try:
        acked = _push_steps(client, data, range(1, 21))
        wait_until(lambda: json.loads(arbiter.standby_alive() or "{}").get("in_sync"), "the standby in sync")
        _restart_without_data(etcd, tmp_path / "etcd" / "data")
        wait_until(lambda: (arbiter.read()[0] or Membership("", "", 0, False)).primary == job.shards[0].standby,
                   "the standby taking the shard", 30)
        assert pair.primary.wait(30) == 0  # deposed: its lease went with etcd's data
        acked.append(make_push(client, data, 21))
        client.send_push(acked[-1])
        restarted = start_shard(pair.config, 0, tmp_path / "restarted.log")
        wait_until(lambda: "joined" in pair.log(1), "the restarted process joining as the standby", 60)
        for prepared in acked:
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        assert_bit_equal(shard_state(job, job.shards[0].standby, 1), reference)
        assert client.send_push(acked[0]).num_duplicates == len(acked[0].calls)
    finally:
        _stop_pair(pair, client, restarted)
        etcd.stop()


def test_a_standby_that_missed_its_primary_going_on_alone_does_not_take_a_lost_record(tmp_path):
    """A standby in sync, paused while its primary went on alone and acknowledged pushes alone,
    then etcd losing its data: the standby, still taking itself for in sync, took the shard without
    those pushes (sent again, they applied again). It takes a lost record only when it heard its
    primary within half a lease; a primary started again then takes the shard (the standby's key
    no longer says in sync), and the standby refuses its older state rather than copy it."""
    from tests.helpers.etcd import start_etcd

    etcd = start_etcd(tmp_path / "etcd")
    job = pair_job(etcd.endpoint, "missed")
    pair, client, arbiter = _started_pair(job, tmp_path)
    restarted, restarted_log = None, tmp_path / "restarted.log"
    data = np.random.default_rng(8)
    try:
        _push_steps(client, data, range(1, 11))
        wait_until(lambda: json.loads(arbiter.standby_alive() or "{}").get("in_sync"), "the standby in sync")
        stop_process(pair.standby.pid)
        _push_steps(client, data, range(11, 16))  # acknowledged alone, once the arbiter records the primary alone
        assert arbiter.read()[0].sync is False
        _restart_without_data(etcd, tmp_path / "etcd" / "data")
        os.kill(pair.standby.pid, signal.SIGCONT)
        assert pair.primary.wait(30) == 0  # deposed: its lease went with etcd's data
        try:
            wait_until(lambda: json.loads(arbiter.standby_alive() or "{}").get("in_sync") is False,
                       "the standby's key no longer saying in sync")
        except AssertionError as exc:  # once in a suite run: what the standby did is in its log
            key = arbiter.standby_alive()
            raise AssertionError(f"{exc}; key {key!r}; standby log:\n{pair.log(1)[-4000:]}") from None
        restarted = start_shard(pair.config, 0, restarted_log)
        wait_until(lambda: "refusing its state copy" in pair.log(1), "the standby refusing the older state", 30)
        assert arbiter.read()[0].primary == job.shards[0].address  # the restarted process took it
        assert "PROMOTED" not in pair.log(1)
    finally:
        _stop_pair(pair, client, restarted)
        etcd.stop()


def test_a_pair_started_over_at_epoch_1_is_reached_by_a_client_that_saw_a_later_epoch(tmp_path):
    """etcd restarted without its data (no persistent disk) and both processes of a pair started
    again: the pair begins at epoch 1. A client that had seen epoch 2 sent it on every call and both
    processes refused it for good (deposed: a client has seen epoch 2). The record now carries a
    lineage, drawn when it is written where none was, and epochs compare within one lineage: the
    client reaches the new pair, and a process still refuses a client that saw a newer epoch of its
    own lineage (a deposed primary that trusts its lease stays fenced)."""
    from tests.helpers.etcd import start_etcd

    etcd = start_etcd(tmp_path / "etcd")
    job = pair_job(etcd.endpoint, "anew")
    pair, client, arbiter = _started_pair(job, tmp_path)
    again = None
    data = np.random.default_rng(9)
    try:
        _push_steps(client, data, range(1, 3))
        pair.fail_over()
        _push_steps(client, data, range(3, 5))  # answered by the promoted standby: the client saw epoch 2
        before = arbiter.read()[0]
        assert (before.epoch, client._epochs) == (2, [2])
        again = _started_over(pair, etcd, job, tmp_path)
        after = arbiter.read()[0]
        assert after.epoch == 1
        _push_steps(client, data, range(5, 7))
        assert client._epochs == [1]
        assert after.lineage and before.lineage and after.lineage != before.lineage
        with grpc.insecure_channel(job.shards[0].address) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            for lineage, answered in ((after.lineage, False), (before.lineage, True)):
                metadata = ((wire.EPOCH_METADATA_KEY, "2"), (wire.LINEAGE_METADATA_KEY, lineage))
                if answered:
                    _, rpc = stub.Stats.with_call(ps_pb2.StatsRequest(), metadata=metadata, timeout=10)
                    assert (wire.LINEAGE_METADATA_KEY, after.lineage) in tuple(rpc.trailing_metadata())
                    continue
                with pytest.raises(grpc.RpcError) as info:
                    stub.Stats(ps_pb2.StatsRequest(), metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "seen epoch 2" in info.value.details()
    finally:
        client.close()
        pair.stop()
        if again is not None:
            again.stop()
        etcd.stop()


def test_a_pair_started_over_is_reached_by_a_client_that_saw_an_epoch_of_a_record_without_a_lineage(tmp_path):
    """A record written before lineages keeps none through every later epoch (promotions copy it),
    and a client that learnt such an epoch sent no lineage key: the shard took it for a client
    older than lineages and compared its epoch across them, so once etcd lost the record and the
    pair started over (a new lineage, epoch 1), a client that had seen epoch 3 was refused for good.
    It now names the record's want of a lineage (wire.NO_LINEAGE): the pair started over answers it,
    and a process of the lineage-less record still refuses a client that saw a newer epoch of it."""
    from tests.helpers.etcd import start_etcd

    etcd = start_etcd(tmp_path / "etcd")
    job = pair_job(etcd.endpoint, "legacy")
    writer = Arbiter(job.arbiter, job.job, 0, "test")
    old = Membership(job.shards[0].address, job.shards[0].standby, 1, True)  # as a release before lineages wrote it
    writer.etcd.put(membership_key(job.job, 0), json.dumps({k: v for k, v in dataclasses.asdict(old).items()
                                                            if k != "lineage"}))
    pair, client, arbiter = _started_pair(job, tmp_path)
    again = None
    data = np.random.default_rng(10)
    try:
        _push_steps(client, data, range(1, 3))
        pair.fail_over()
        _push_steps(client, data, range(3, 5))  # answered by the promoted standby
        before = arbiter.read()[0]
        assert (before.epoch, before.lineage, client._epochs, client._lineages) == (3, "", [3], [""])
        with grpc.insecure_channel(job.shards[0].standby) as channel:
            metadata = ((wire.EPOCH_METADATA_KEY, "4"), (wire.LINEAGE_METADATA_KEY, wire.NO_LINEAGE))
            with pytest.raises(grpc.RpcError) as info:
                ps_pb2_grpc.ParameterServerStub(channel).Stats(ps_pb2.StatsRequest(), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "seen epoch 4" in info.value.details()
        again = _started_over(pair, etcd, job, tmp_path)
        after = arbiter.read()[0]
        assert after.epoch == 1 and after.lineage
        _push_steps(client, data, range(5, 7))
        assert (client._epochs, client._lineages) == ([1], [after.lineage])
    finally:
        client.close()
        pair.stop()
        if again is not None:
            again.stop()
        etcd.stop()


def test_a_standby_at_a_later_epoch_of_a_lost_record_judges_the_state_of_a_pair_started_over(tmp_path):
    """A standby at epoch 2 (a failover, the first primary started again as its standby), paused
    while its primary went on alone, then etcd losing its data: the primary started again takes
    epoch 1 of a new lineage. The standby refused its handshake for good as of an epoch it was past
    (2 > 1, across lineages), before the rule for a primary behind it could run: the restarted
    primary stayed joining. Epochs now compare within one lineage: the handshake reaches that rule,
    and the standby, last seen in sync and holding acknowledged pushes the primary lacks, refuses its
    older state (logged critical) for an operator to choose."""
    from tests.helpers.etcd import start_etcd

    etcd = start_etcd(tmp_path / "etcd")
    job = pair_job(etcd.endpoint, "past")
    pair, client, arbiter = _started_pair(job, tmp_path)
    first, second = job.shards[0].address, job.shards[0].standby
    standby, standby_log = None, tmp_path / "standby.log"
    restarted, restarted_log = None, tmp_path / "restarted.log"
    data = np.random.default_rng(11)
    try:
        _push_steps(client, data, range(1, 3))
        pair.fail_over()
        standby = start_shard(pair.config, 0, standby_log)  # finds its partner primary: becomes its standby
        own = {"standby": first, "epoch": 2, "in_sync": True}
        wait_until(lambda: json.loads(arbiter.standby_alive() or "{}") == own, "the first process in sync at epoch 2",
                   60)
        _push_steps(client, data, range(3, 6))
        lost = arbiter.read()[0]
        stop_process(standby.pid)
        _push_steps(client, data, range(6, 8))  # acknowledged alone, once the arbiter records the primary alone
        assert arbiter.read()[0].sync is False
        _restart_without_data(etcd, tmp_path / "etcd" / "data")
        os.kill(standby.pid, signal.SIGCONT)
        assert pair.standby.wait(30) == 0  # deposed: its lease went with etcd's data
        wait_until(lambda: json.loads(arbiter.standby_alive() or "{}").get("in_sync") is False,
                   "the standby's key no longer saying in sync")
        # The second process started again as a primary (its partner: the first).
        swapped = dataclasses.replace(job.shards[0], address=second, standby=first,
                                      metrics_port=job.shards[0].standby_metrics_port,
                                      standby_metrics_port=job.shards[0].metrics_port)
        config = tmp_path / "swapped.toml"
        config.write_text(dump_job_config(dataclasses.replace(job, shards=(swapped,))))
        restarted = start_shard(config, 0, restarted_log)
        wait_until(lambda: "refusing its state copy" in standby_log.read_text(), "the standby refusing the older state",
                   30)
        started_over = arbiter.read()[0]
        assert (started_over.primary, started_over.epoch) == (second, 1)
        assert started_over.lineage != lost.lineage
        assert "past it" not in restarted_log.read_text()
        assert "PROMOTED" not in standby_log.read_text()
    finally:
        for process in (restarted, standby):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                stop_pid(process)
        client.close()
        pair.stop()
        etcd.stop()


def test_a_stopped_standby_holds_acks_until_the_arbiter_records_the_primary_alone(etcd, tmp_path):
    job = pair_job(etcd.endpoint, "alone")
    pair = ShardPair.start(job, tmp_path)
    client = PSClient.from_job(job, client_id="trainer-0")
    data = np.random.default_rng(7)
    arbiter = Arbiter(job.arbiter, job.job, 0, "test")
    try:
        client.send_push(make_push(client, data, 1))
        assert arbiter.read()[0].sync
        lag = 'embps_replication_lag_pushes{shard="0"}'
        assert metrics(job.shards[0].metrics_port)[lag] == 0
        # Before the stop: the standby's last acknowledgement (a heartbeat, every lease / 8) may come
        # while stop_process waits for every thread to stop, and the primary's wait runs from it.
        started = time.monotonic()
        stop_process(pair.standby.pid)  # every thread: one woken by a push could still apply it
        with ThreadPoolExecutor(1) as pusher:
            pushed = pusher.submit(client.send_push, make_push(client, data, 2))
            # The push waits for the standby: the lag says so (it was set on acks only, and read 0).
            wait_until(lambda: metrics(job.shards[0].metrics_port)[lag] == 1 or pushed.done(), "the lag to show it")
            assert not pushed.done(), "acknowledged before the lag showed the waiting push"
            pushed.result(timeout=60)
        waited = time.monotonic() - started
        membership, _ = arbiter.read()
        print(f"push acknowledged {waited:.2f} s after the standby stopped")
        # It waits about a lease from the standby's last acknowledgement; half a lease is slack for
        # a loaded machine, and still tells a wait from an acknowledgement at once.
        assert waited >= LEASE_S / 2, "acknowledged before the standby applied it or the arbiter recorded it"
        assert (membership.standby, membership.sync) == ("", False), membership
        assert "going on ALONE" in pair.log(0)
        client.send_push(make_push(client, data, 3))  # alone now: no wait
        assert metrics(job.shards[0].metrics_port)[lag] == 0  # no standby is owed a push
    finally:
        os.kill(pair.standby.pid, signal.SIGCONT)
        client.close()
        pair.stop()


@pytest.mark.parametrize("lease_expired", [False, True], ids=["lease-alive", "lease-expired"])
def test_a_promotion_whose_answer_etcd_lost_still_makes_the_standby_primary(etcd, tmp_path, lease_expired):
    """The standby's promotion (one etcd transaction) commits but its answer is lost (a proxy
    between the standby and etcd drops the reply): the record names the standby primary at epoch
    2 while the standby, seeing etcd unavailable, would go on as a standby. It finds its own take
    in the record at its next look and serves as primary with every acknowledged push (before: it
    stayed a standby, the shard answered nothing, and the first primary started again would have
    copied its older state over it). lease-expired: etcd stays out of the standby's reach until
    the take's lease expired (the leader key with it), so the standby takes the record again, at
    epoch 3."""
    proxy = EtcdProxy.start(etcd.endpoint)
    job = pair_job(etcd.endpoint, f"answer-lost-{int(lease_expired)}", snapshot_uri=(tmp_path / "snaps").as_uri())
    pair = ShardPair.start(job, tmp_path, standby_arbiter=proxy.endpoint)
    reference = Shard(job, 0)
    client = PSClient.from_job(job, client_id="trainer-0")
    data = np.random.default_rng(5)
    arbiter = Arbiter(job.arbiter, job.job, 0, "test")
    acked = []
    try:
        for step in range(1, 6):
            acked.append(make_push(client, data, step))
            client.send_push(acked[-1])
        proxy.lose_next_txn.set()
        os.kill(pair.primary.pid, signal.SIGKILL)
        if lease_expired:
            proxy.refuse_after_loss.set()
        assert proxy.lost.wait(30), "the standby's promotion never reached etcd"
        if lease_expired:
            assert arbiter.read()[0].primary == job.shards[0].standby
            wait_until(lambda: not arbiter.leader_alive(), "the take's lease to expire")
            proxy.refuse.clear()
        wait_until(lambda: "PROMOTED" in pair.log(1), "the standby's promotion", 30)
        promoted_at = time.monotonic()
        acked.append(make_push(client, data, 6))
        client.send_push(acked[-1])  # fails over to the standby, now primary
        membership, _ = arbiter.read()
        assert (membership.primary, membership.epoch) == (job.shards[0].standby, 3 if lease_expired else 2), membership
        assert ("its answer lost" in pair.log(1)) != lease_expired, pair.log(1)[-3000:]
        for prepared in acked:
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        assert_bit_equal(shard_state(job, job.shards[0].standby, 1), reference)
        # It renews the lease its take went under: the leader key outlives two leases (a lease
        # nobody renews is gone after one, and a process could take the shard from under it).
        wait_until(lambda: time.monotonic() - promoted_at > 2 * LEASE_S or not arbiter.leader_alive(),
                   "two leases after the promotion, or the leader key gone")
        assert arbiter.etcd.get(arbiter.leader_key).value == job.shards[0].standby
        assert "deposed" not in pair.log(1)
    finally:
        client.close()
        pair.stop()
        proxy.stop()


def test_a_primary_stopped_while_a_push_waits_for_its_ack_ends_at_once(etcd, tmp_path):
    """SIGTERM to a primary whose push waits for the standby's ack (the standby is stopped, and the
    primary has not yet recorded itself alone): stopping ends the link, so that push is answered
    UNAVAILABLE at once and the primary exits within its drain window, not at the end of its grace
    (5 s here) with the push cancelled (before: the push waited for an ack that no task read)."""
    job = pair_job(etcd.endpoint, "stop-waiting")
    # A lease long enough that the primary cannot record itself alone before the test stops it.
    job = dataclasses.replace(job, arbiter=dataclasses.replace(job.arbiter, lease_seconds=10))
    pair = ShardPair.start(job, tmp_path)
    client = PSClient.from_job(job, client_id="trainer-0")
    data = np.random.default_rng(11)
    outcome: list[BaseException | None] = []

    def versions() -> float:  # of the primary's tables: a push moves them once applied there
        samples = metrics(job.shards[0].metrics_port)
        return sum(value for name, value in samples.items() if name.startswith("embps_table_version"))

    try:
        client.send_push(make_push(client, data, 1))
        stop_process(pair.standby.pid)
        applied = versions()
        push = make_push(client, data, 2)
        pushing = threading.Thread(target=lambda: outcome.append(_error_of(client.send_push, push)))
        pushing.start()
        wait_until(lambda: versions() > applied, "the push applied on the primary, waiting for its ack")
        started = time.monotonic()
        pair.primary.send_signal(signal.SIGTERM)
        code = pair.primary.wait(timeout=30)
        took = time.monotonic() - started
        assert code == 0, pair.log(0)[-3000:]
        print(f"the primary stopped {took:.2f} s after SIGTERM")
        assert "going on ALONE" not in pair.log(0)  # the push still waited for its ack when stopped
        assert took < 3.5, f"the primary took {took:.1f} s to stop (grace 5 s)\n{pair.log(0)[-3000:]}"
    finally:
        os.kill(pair.standby.pid, signal.SIGCONT)
        client.close()
        pair.stop()
    pushing.join(timeout=30)
    assert outcome and outcome[0] is not None  # not acknowledged: the standby never applied it


def test_a_primary_stopped_by_sigterm_hands_the_shard_to_its_standby_at_once(etcd, tmp_path):
    """SIGTERM to a primary in sync (a rolling restart, a pod moved): it revokes its lease once it
    acknowledges nothing more, so its standby takes the shard at its next look, not after the
    lease expired (10 s here; before, the shard answered nothing for that long), and holds every
    acknowledged push; pushes sent again after the failover are repeats."""
    job = pair_job(etcd.endpoint, "handover", snapshot_uri=(tmp_path / "snaps").as_uri())
    job = dataclasses.replace(job, arbiter=dataclasses.replace(job.arbiter, lease_seconds=10))
    pair, client, arbiter = _started_pair(job, tmp_path)
    reference = Shard(job, 0)
    try:
        acked = _push_steps(client, np.random.default_rng(17), range(1, 11))
        synced = arbiter.read()[0]
        assert synced.sync and synced.standby == job.shards[0].standby, synced
        started = time.monotonic()
        pair.primary.send_signal(signal.SIGTERM)
        wait_until(lambda: arbiter.read()[0].primary == job.shards[0].standby, "the standby's promotion", 30)
        took = time.monotonic() - started
        print(f"the standby took over {took:.2f} s after SIGTERM (lease 10 s)")
        assert took < 5, f"the standby took over {took:.1f} s after SIGTERM: the lease was not given back"
        assert pair.primary.wait(timeout=30) == 0, pair.log(0)[-3000:]
        assert client.send_push(acked[-1]).num_duplicates == len(acked[-1].calls)
        for prepared in acked:
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        assert_bit_equal(shard_state(job, job.shards[0].standby, 1), reference)
    finally:
        client.close()
        pair.stop()


def _error_of(call, *args) -> BaseException | None:
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001 - the test looks at whichever error it was
        return exc
    return None


def test_a_link_taken_from_the_primary_ends_its_stream_and_the_pair_joins_again(etcd, tmp_path):
    """A second handshake at the recorded epoch (a caller with the trainer's token, or the primary
    reconnecting while its old stream lingers) makes the standby follow that stream and close the
    primary's replication link: the primary's stream ends with it at once, the primary records
    itself alone in etcd, then joins again with a new link; every acknowledged push is on the
    standby, which the SIGKILL of the primary shows bit for bit."""
    job = pair_job(etcd.endpoint, "link-taken")
    pair = ShardPair.start(job, tmp_path)
    client = PSClient.from_job(job, client_id="trainer-0", max_attempts=200)
    data = np.random.default_rng(8)
    arbiter = Arbiter(job.arbiter, job.job, 0, "test")
    primary_metrics = job.shards[0].metrics_port
    try:
        client.send_push(make_push(client, data, 1))
        membership = arbiter.read()[0]
        assert membership.sync, membership
        with grpc.insecure_channel(job.shards[0].address) as channel:
            stats = ps_pb2_grpc.ParameterServerStub(channel).Stats(ps_pb2.StatsRequest(), timeout=5)
        hello = replication_pb2.ReplicateRequest(
            epoch=membership.epoch, incarnation=1,
            versions=[replication_pb2.TableVersion(table=t.name, version=t.version) for t in stats.tables],
        )
        release = threading.Event()

        def stray_messages():
            yield hello.SerializeToString()
            release.wait(30)

        with grpc.insecure_channel(job.shards[0].standby) as channel:
            call = channel.stream_stream(REPLICATE, request_serializer=None,
                                         response_deserializer=replication_pb2.ReplicateAck.FromString)(
                stray_messages(), timeout=60)
            ack = next(call)
            assert ack.link_port and len(ack.link_key) == 32, ack
            wait_until(lambda: metrics(primary_metrics).get('embps_standby_lost_total{shard="0"}') == 1.0,
                       "the primary records itself alone", 30)
            release.set()
        assert "replication link" in pair.log(0), pair.log(0)[-3000:]
        wait_until(lambda: arbiter.read()[0].sync, "the pair in sync again", 60)
        for step in range(2, 6):
            client.send_push(make_push(client, data, step))
        before = client.lookup("adam", np.arange(KEYS, dtype=np.int64))
        pair.fail_over()
        after = client.lookup("adam", np.arange(KEYS, dtype=np.int64))
        np.testing.assert_array_equal(after, before)
    finally:
        client.close()
        pair.stop()


class Following:
    """A serving follower of table `name` of shard 0 (ShardFollower on grpc.aio, as a replica runs
    it), on a thread of its own, given both addresses of the pair."""

    def __init__(self, job: JobConfig, name: str) -> None:
        self.job = job
        self.replica = TableReplica(job.table(name), job.shard_map)
        self.follower: ShardFollower | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        wait_until(lambda: self._stop is not None, "the follower's loop")

    async def _main(self) -> None:
        shard = self.job.shards[0]
        primary, standby = grpc.aio.insecure_channel(shard.address), grpc.aio.insecure_channel(shard.standby)
        self.follower = ShardFollower(self.replica, 0, primary, ServingMetrics(), standby_channel=standby)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        task = asyncio.ensure_future(self.follower.run())
        await self._stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await primary.close()
        await standby.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_training_goes_on_while_the_arbiter_is_down_and_serving_follows_a_failover(etcd, tmp_path):
    """etcd down for 3 leases: pushes go on, nobody promotes. Then, etcd back and no push in
    flight, the primary is killed: a serving follower goes on from the promoted standby at its
    version (same incarnation, same update log), without a full resync, to the final rows."""
    job = pair_job(etcd.endpoint, "arbiter-down", snapshot_uri=(tmp_path / "snaps").as_uri())
    pair = ShardPair.start(job, tmp_path)
    client = PSClient.from_job(job, client_id="trainer-0")
    data = np.random.default_rng(11)
    reference = Shard(job, 0)
    following = Following(job, "adam")
    try:
        etcd.stop()
        ended = time.monotonic() + 3 * LEASE_S
        step = 0
        while time.monotonic() < ended:
            step += 1
            prepared = make_push(client, data, step)
            client.send_push(prepared)
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        etcd.restart()
        step += 1
        prepared = make_push(client, data, step)
        client.send_push(prepared)
        for _, request in prepared.calls:
            reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        print(f"{step} pushes, {step - 1} of them with etcd down")
        assert step > 5
        assert "PROMOTED" not in pair.log(1) and "deposed" not in pair.log(0)
        assert_bit_equal(shard_state(job, job.shards[0].address, step), reference)

        version = reference.tables["adam"].version
        wait_until(lambda: following.replica.shards[0].version == version, "the follower at the primary's version")
        os.kill(pair.primary.pid, signal.SIGKILL)
        for _ in range(5):
            step += 1
            prepared = make_push(client, data, step)
            client.send_push(prepared)
            for _, request in prepared.calls:
                reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))
        version = reference.tables["adam"].version
        wait_until(lambda: following.replica.shards[0].version == version, "the follower at the new primary's")
        keys, values = following.replica.shards[0].export()
        want = reference.tables["adam"].export()
        order = np.argsort(keys)
        np.testing.assert_array_equal(keys[order], want.keys)
        np.testing.assert_array_equal(values[order], want.values)
        assert following.follower.status.num_resyncs == 0, following.follower.status
    finally:
        following.stop()
        if etcd.proc.poll() is not None:
            etcd.restart()
        client.close()
        pair.stop()


def test_a_cut_replica_follows_the_promoted_standby_without_a_full_resync(etcd, tmp_path):
    """consistency = "step": every push of step s acknowledged, then Commit(s), as a sync trainer
    does. The primary is SIGKILLed between steps: the trainer goes on at the promoted standby, and
    the replica follows it from its cut (same incarnation, the commits came over the replication
    stream with the rows the primary sealed), never resyncing, up to the last step, even though it
    reconnects only after the trainer's commits at the promoted standby."""
    sgd = TableConfig("user", dim=4, initializer=Initializer.ZEROS, optimizer=OptimizerConfig(kind=OptimizerKind.SGD,
                                                                                              lr=1.0))
    job = pair_job(etcd.endpoint, "cut-failover", (sgd,))
    pair = ShardPair.start(job, tmp_path)
    replica = ServingReplica.start(SimpleNamespace(job=job, config_path=pair.config), tmp_path, "cut",
                                   consistency=Consistency.STEP)
    client = PSClient.from_job(job, client_id="trainer-0")
    keys = np.arange(1, 65, dtype=np.int64)
    grads = -np.ones((keys.shape[0], 4), dtype=np.float32)  # every step adds 1: a row holds its step

    def train(first: int, last: int) -> None:
        for step in range(first, last + 1):
            client.push_many([("user", keys, grads, None)], step=step)
            client.commit(step, f"dense tower of step {step}".encode(), "bytes")

    def served_step() -> int:
        values, found, reply = replica.lookup("user", keys)
        assert found.all() or not found.any(), found
        assert np.all(values == values[0, 0]), f"one reply mixes steps: {np.unique(values)}"
        assert not found.any() or values[0, 0] == reply.model_version, (values[0, 0], reply.model_version)
        return reply.model_version

    def resyncs() -> int:
        return sum(s.num_resyncs for s in replica.status().shards)

    try:
        train(1, 5)
        wait_until(lambda: served_step() == 5, "the replica's cut at step 5")
        before = resyncs()
        incarnation = replica.status().shards[0].incarnation
        # The replica is held while the trainer commits at the promoted standby: it reconnects only
        # after those commits, which the standby sealed although no stream of its own followed it.
        stop_process(replica.proc.pid)
        try:
            os.kill(pair.primary.pid, signal.SIGKILL)
            train(6, 10)
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        assert "PROMOTED" in pair.log(1), pair.log(1)[-3000:]
        wait_until(lambda: served_step() == 10, "the replica's cut at step 10, from the promoted standby", 60)
        status = replica.status()
        assert (status.model_version, status.newest_step) == (10, 10)
        assert resyncs() == before, (before, status)
        assert status.shards[0].incarnation == incarnation
        dense = replica.stub.DenseModel(serving_pb2.DenseModelRequest(), timeout=5)
        assert (dense.step, dense.state) == (10, b"dense tower of step 10")
    finally:
        replica.stop()
        client.close()
        pair.stop()


def test_job_config_standby_needs_an_arbiter():
    from ps.job_config import parse_job_config

    doc = {"job": "j", "shards": [{"address": "127.0.0.1:1", "standby": "127.0.0.1:2"}], "tables": {"t": {"dim": 4}}}
    with pytest.raises(ValueError, match=r"shards\[0\]\.standby: a standby needs \[arbiter\]"):
        parse_job_config(doc)
    doc["shards"][0]["standby"] = "127.0.0.1:1"
    doc["arbiter"] = {"endpoints": "http://127.0.0.1:2379"}
    with pytest.raises(ValueError, match=r"shards\[0\]\.standby: '127.0.0.1:1' is also shards\[0\]\.address"):
        parse_job_config(doc)
    doc["shards"][0]["standby"] = "127.0.0.1:2"
    # A port that is no number passed, then the shard's first etcd call ended it with a traceback.
    for endpoints, bad in (("127.0.0.1:2379", "127.0.0.1:2379"), ("http://127.0.0.1:23x79", "http://127.0.0.1:23x79"),
                           ("http://127.0.0.1", "http://127.0.0.1"), ("http://a:1,,http://b:2", None)):
        doc["arbiter"] = {"endpoints": endpoints}
        message = rf"arbiter\.endpoints: '{re.escape(bad)}' is not http\[s\]://host:port" if bad else "expected http"
        with pytest.raises(ValueError, match=message):
            parse_job_config(doc)
    doc["arbiter"] = {"endpoints": "http://127.0.0.1:2379", "lease_seconds": 0}
    with pytest.raises(ValueError, match=r"arbiter\.lease_seconds: must be in \[1, 3600\], got 0"):
        parse_job_config(doc)
    parsed = parse_job_config({**doc, "arbiter": {"endpoints": "http://127.0.0.1:2379"}})
    assert parsed.shards[0].addresses() == ["127.0.0.1:1", "127.0.0.1:2"]


def test_job_config_standbys_with_tokens_need_the_shard_token():
    """With tokens on, Replication takes the shard role's token alone (a worker's trainer token may
    not take a standby's stream from its primary), so a job with standbys must name one; a job
    without standbys, or without tokens, needs none."""
    from ps.job_config import parse_job_config

    doc = {
        "job": "j",
        "shards": [{"address": "127.0.0.1:1", "standby": "127.0.0.1:2"}],
        "tables": {"t": {"dim": 4}},
        "arbiter": {"endpoints": "http://127.0.0.1:2379"},
        "security": {"tokens": {"trainer": {"env": "T"}, "replica": {"env": "R"}}},
    }
    with pytest.raises(ValueError, match=r"^security\.tokens\.shard: a job with standbys and tokens needs"):
        parse_job_config(doc)
    doc["security"]["tokens"]["shard"] = {"env": "S"}
    assert parse_job_config(doc).security.tokens.shard.env == "S"
    del doc["security"]["tokens"]["shard"]
    alone = {k: v for k, v in doc.items() if k != "arbiter"} | {"shards": [{"address": "127.0.0.1:1"}]}
    assert parse_job_config(alone).security.tokens.shard is None
    assert not parse_job_config({k: v for k, v in doc.items() if k != "security"}).security.auth


def test_a_primary_waiting_for_etcd_at_start_stops_on_sigterm(tmp_path):
    """A pair's process waits at start for the arbiter (out of reach here), and waited on through
    SIGTERM: every stop of a job or a pod ended in SIGKILL at the end of its grace period."""
    # Bound and never listening for the whole test: etcd's connections are refused, and no server
    # another test starts can take the port meanwhile.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        job = pair_job(f"http://127.0.0.1:{taken.getsockname()[1]}", "waiting")
        config_path = tmp_path / "job.toml"
        config_path.write_text(dump_job_config(job))
        log_path = tmp_path / "shard.log"
        proc = start_shard(config_path, 0, log_path)
        try:
            wait_until(lambda: "arbiter unreachable at start" in log_path.read_text(), "the shard to wait for etcd")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert "stopped before it could serve" in log_path.read_text()
        finally:
            stop_pid(proc)
