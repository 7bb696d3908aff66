"""Malformed and stray replication streams against a real standby (issue 21; "every server survives
any client").

A shard pair (etcd as the arbiter, plaintext, so that the stream reaches the servicer) takes
hypothesis-drawn Replicate streams on the standby's port, beside the primary's own stream: junk
bytes, and ReplicateRequests whose epoch, sequence, method, request, handshake fields and state
chunks are drawn from the values that matter (the pair's epoch, the one after it, 0, the maximum),
valid pushes included, mangled or not. Every stream must end OK or with a status of the contract
(never UNKNOWN or INTERNAL: an unmapped exception). Afterwards the pair must still do its job: a
push through the primary is acknowledged, the pair is in sync again (a stray message the standby
applied makes the primary's next one a gap: it goes on alone, then copies its state over), and
after a SIGKILL of the primary the promoted standby answers every acknowledged push, bit for bit.
"""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.ports import free_ports
from ps import wire
from ps.client import PSClient
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, ShardConfig
from ps.rpc import ps_pb2, replication_pb2
from ps.shard.arbiter import Arbiter
from ps.shard.replication import ROLE_VALUES
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import ShardPair
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

TABLE = TableConfig("user", dim=4, seed=7, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))
REPLICATE = "/{}/Replicate".format(replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name)
CONTRACT = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})
TIMEOUT = 5.0
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
FUZZ_SETTINGS = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def pair(etcd, tmp_path_factory):
    """One shard's pair, joined."""
    workdir = tmp_path_factory.mktemp("fuzz-replication")
    ports = free_ports(4)
    job = JobConfig(
        job="fuzz-replication",
        shards=(ShardConfig(f"127.0.0.1:{ports[0]}", metrics_port=ports[1], standby=f"127.0.0.1:{ports[2]}",
                            standby_metrics_port=ports[3]),),
        tables=(TABLE,),
        deadlines=Deadlines(lookup=20.0, push=20.0, stats=5.0),
        push_dedupe_window=1 << 20,
        arbiter=ArbiterConfig(endpoints=etcd.endpoint, lease_seconds=2),
    )
    pair = ShardPair.start(job, workdir)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def standby_channel(pair):
    job = pair.job
    with grpc.insecure_channel(job.shards[0].standby) as channel:
        yield channel


def _push_request(keys: np.ndarray, step: int) -> bytes:
    grads = np.full((keys.shape[0], TABLE.dim), 0.5, dtype=np.float32)
    return ps_pb2.PushRequest(
        table=TABLE.name, keys=wire.encode_keys(keys), grads=grads.tobytes(), step=step,
        push_id=ps_pb2.PushId(client_id="fuzz", sequence=step),
    ).SerializeToString()


epochs = st.sampled_from((0, 1, 2, 3, UINT64_MAX))
sequences = st.sampled_from((0, 1, 2, 3, 1 << 40, UINT64_MAX))
methods = st.sampled_from(("", "Push", "PushMulti", "Commit", "TableRows", "TableState", "Ledger", "StateDone", "nope"))
names = st.sampled_from((TABLE.name, "", "nope", "表", "x" * 300))
junk = st.binary(max_size=64)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A push (valid, cut short or extended), or junk, as the `request` field."""
    keys = np.arange(draw(st.integers(0, 5)), dtype=np.int64)
    valid = _push_request(keys, draw(st.integers(0, 3)))
    how = draw(st.sampled_from(("valid", "valid", "cut", "extended", "junk")))
    if how == "cut" and valid:
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "extended":
        return valid + draw(st.binary(min_size=1, max_size=8))
    return draw(junk) if how == "junk" else valid


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """One message of a Replicate stream: junk bytes (one in eight) or a drawn ReplicateRequest."""
    if draw(st.integers(0, 7)) == 0:
        return draw(junk)
    versions = [
        replication_pb2.TableVersion(table=draw(names), version=draw(st.sampled_from((0, 1, 5, UINT64_MAX))))
        for _ in range(draw(st.integers(0, 2)))
    ]
    return replication_pb2.ReplicateRequest(
        epoch=draw(epochs),
        sequence=draw(sequences),
        method=draw(methods),
        request=draw(requests()),
        incarnation=draw(st.sampled_from((0, 1, UINT64_MAX))),
        versions=versions,
        shard=draw(st.sampled_from((0, 1, UINT32_MAX))),
        state=draw(junk),
        rows=draw(junk),
        table=draw(names),
        last=draw(st.booleans()),
        sealed_tables=draw(st.lists(names, max_size=2)),
    ).SerializeToString()


@FUZZ_SETTINGS
@given(stream=st.lists(messages(), min_size=1, max_size=4))
def test_fuzz_replicate_streams_to_the_standby(standby_channel, stream):
    call = standby_channel.stream_stream(REPLICATE, request_serializer=None, response_deserializer=None)
    try:
        for _ in call(iter(stream), timeout=TIMEOUT):
            pass
    except grpc.RpcError as err:
        assert err.code() in CONTRACT, f"{err.code().name}: {err.details()}"


def _stream_status(channel: grpc.Channel, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    call = channel.stream_stream(REPLICATE, request_serializer=None, response_deserializer=None)
    try:
        for _ in call(iter(messages), timeout=TIMEOUT):
            pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_a_stray_stream_can_neither_apply_a_push_nor_move_the_standby_to_another_epoch(pair, standby_channel):
    """A valid push at the next sequences, on a stream without a handshake, is refused whatever the
    sequence; a handshake at an epoch the arbiter does not record is refused before it is read."""
    job = pair.job
    epoch = Arbiter(job.arbiter, job.job, 0, "test").read()[0].epoch
    for sequence in (1, 2, 3):
        push = replication_pb2.ReplicateRequest(
            epoch=epoch, sequence=sequence, method="Push", request=_push_request(np.arange(3, dtype=np.int64), 1)
        )
        code, details = _stream_status(standby_channel, [push.SerializeToString()])
        assert (code, "does not follow" in details) == (grpc.StatusCode.FAILED_PRECONDITION, True), (code, details)
    for stray in (epoch + 1, 1 << 40):
        hello = replication_pb2.ReplicateRequest(
            epoch=stray, incarnation=1, versions=[replication_pb2.TableVersion(table=TABLE.name, version=0)]
        )
        code, details = _stream_status(standby_channel, [hello.SerializeToString()])
        assert (code, "the arbiter records" in details) == (grpc.StatusCode.FAILED_PRECONDITION, True), (code, details)


def test_a_handshake_at_the_recorded_epoch_from_another_primary_or_lineage_is_refused(pair, standby_channel):
    """The epoch's number alone let a handshake by: a primary of a record etcd lost (another
    lineage, its lease not yet run out) or another process at the recorded number took the standby
    from its primary. The handshake names its primary and lineage, both checked against the record."""
    job = pair.job
    record = Arbiter(job.arbiter, job.job, 0, "test").read()[0]
    versions = [replication_pb2.TableVersion(table=TABLE.name, version=0)]
    for primary, lineage in (("127.0.0.1:1", record.lineage), (record.primary, "another-lineage")):
        hello = replication_pb2.ReplicateRequest(
            epoch=record.epoch, incarnation=1, versions=versions, primary=primary, lineage=lineage
        )
        code, details = _stream_status(standby_channel, [hello.SerializeToString()])
        assert (code, "the arbiter records" in details) == (grpc.StatusCode.FAILED_PRECONDITION, True), (code, details)


def _role(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next(line for line in text.splitlines() if line.startswith("embps_shard_role{"))
    return float(line.rsplit(" ", 1)[1])


def test_the_pair_is_whole_after_the_fuzz_and_its_standby_holds_every_acknowledged_push(pair):
    """Runs after the fuzz and the stray streams (file order): the pair still acknowledges, is in
    sync, and fails over with every acknowledged push."""
    job = pair.job
    keys = np.arange(40, dtype=np.int64)
    grads = np.random.default_rng(11).standard_normal((6, keys.shape[0], TABLE.dim)).astype(np.float32)
    with PSClient.from_job(job, max_attempts=200) as client:
        client.push(TABLE.name, keys, grads[0], step=100)
        wait_until(lambda: _role(job.shards[0].metrics_port) == ROLE_VALUES["sync"], "the pair in sync again", 60)
        for step in range(1, 6):
            client.push(TABLE.name, keys, grads[step], step=100 + step)
        before = client.lookup(TABLE.name, keys)
        pair.fail_over()
        after = client.lookup(TABLE.name, keys)
    np.testing.assert_array_equal(after, before)
    assert pair.standby.poll() is None, pair.logs[1].read_text()[-3000:]
