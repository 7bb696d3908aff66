"""Subscribers that stop reading, against a real shard process: what a Subscribe stream holds while
its client takes nothing is bounded, full copies take turns, and a stalled stream is ended with a
status that says why (ps/process/calls.py _StallWatch, ps/shard/server.py STREAM_MESSAGE_BYTES and
MAX_FULL_COPIES).

Before these bounds, 30 full_sync streams that never read a 2M-row table's shard made it hold 8 GiB,
and its pushes waited 0.9 s for the event loop."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ps.client import PSClient
from ps.job_config import dump_job_config
from ps.process.children import stop as stop_pid
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.shard.server import FULL_COPY_PATIENCE_SECONDS, MAX_FULL_COPIES
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import make_job, rss_bytes, start_shard, wait_serving
from tests.helpers.waiting import eventually, wait_until

ROWS = 300_000  # a full copy of dim 16: 21.6 MB, several messages of at most STREAM_MESSAGE_BYTES
DIM = 16
STALL_SECONDS = 1.0
TABLE = TableConfig("t", dim=DIM, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))


def _shard(workdir, stall_seconds: float):
    """A shard whose table holds ROWS rows, and a stub with a large enough message limit."""
    job = make_job([TABLE])
    config = workdir / "job.toml"
    config.write_text(dump_job_config(job))
    log = workdir / "shard.log"
    proc = start_shard(config, 0, log, args=("--stream-stall-seconds", str(stall_seconds)))
    try:
        wait_serving(job.shards[0].address, proc, log_path=log)
        client = PSClient([job.shards[0].address], dims={"t": DIM})
        keys = np.arange(ROWS, dtype=np.int64)
        client.push("t", keys, np.ones((ROWS, DIM), np.float32))
        # No BDP probes: a stream nobody reads then holds gRPC's 64 KiB window of its copy. With
        # them, the window a client offers moves from run to run and can reach megabytes (ps/wire.py),
        # so a stream "not read" could take its whole 21.6 MB copy into the client's buffers and
        # its copy end on its own. One suite run failed in a way that fits (the stalled copies
        # never settled at 3 running); a failure now prints the copies' state.
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
        channel = grpc.insecure_channel(job.shards[0].address, options=options)
        yield job, proc, client, ps_pb2_grpc.ParameterServerStub(channel), log
        channel.close()
    finally:
        stop_pid(proc)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    yield from _shard(tmp_path_factory.mktemp("slow_subscribers"), STALL_SECONDS)


def _metrics(job) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{job.shards[0].metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _ended(job) -> float:
    """Subscribe streams the shard ended for a client that took nothing (their recorded status)."""
    labels = (("code", "RESOURCE_EXHAUSTED"), ("method", "Subscribe"), ("table", "t"))
    return _metrics(job).get(("embps_requests_total", labels), 0.0)


def _full_copies(job) -> tuple[float, float]:
    """(running, waiting) full copies."""
    metrics = _metrics(job)
    return tuple(
        metrics.get(("embps_subscribe_full_copies", (("shard", "0"), ("state", state))), 0.0)
        for state in ("running", "waiting")
    )


def _full_copy(stub) -> dict[int, np.ndarray]:
    """Every row a full_sync stream sends until it follows live (its first heartbeat)."""
    rows: dict[int, np.ndarray] = {}
    stream = stub.Subscribe(ps_pb2.SubscribeRequest(table="t", full_sync=True), timeout=60)
    for batch in stream:
        keys = np.frombuffer(batch.keys, dtype="<i8")
        values = np.frombuffer(batch.values, dtype="<f4").reshape(keys.shape[0], DIM)
        rows.update(zip(keys.tolist(), values, strict=True))
        if batch.to_version and batch.from_version == batch.to_version:
            stream.cancel()
            break
    return rows


def test_a_subscriber_that_stops_reading_is_ended_and_told_why(shard):
    job, _, _, stub, _ = shard
    before = _ended(job)
    stream = stub.Subscribe(ps_pb2.SubscribeRequest(table="t", full_sync=True), timeout=60)
    wait_until(lambda: _ended(job) > before, "the shard to end the stream its client does not read")
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stream:
            pass
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"took no message for {STALL_SECONDS:g} s" in raised.value.details()


def test_stalled_full_copies_hold_little_take_turns_and_leave_the_shard_serving(shard):
    job, proc, client, stub, log = shard
    streams = 3 * MAX_FULL_COPIES
    ended_before = _ended(job)
    rss_before = rss_bytes(proc.pid)
    calls = [stub.Subscribe(ps_pb2.SubscribeRequest(table="t", full_sync=True), timeout=120) for _ in range(streams)]
    seen = {"running": 0.0, "waiting": 0.0, "rss": 0}
    keys = np.arange(0, ROWS, 97, dtype=np.int64)

    def all_ended() -> bool:
        running, waiting = _full_copies(job)
        seen["running"] = max(seen["running"], running)
        seen["waiting"] = max(seen["waiting"], waiting)
        seen["rss"] = max(seen["rss"], rss_bytes(proc.pid))
        client.push("t", keys, np.full((keys.shape[0], DIM), 0.5, np.float32))  # the shard still takes pushes
        return _ended(job) - ended_before >= streams

    wait_until(all_ended, f"the shard to end {streams} full copies nobody reads", timeout=60)
    assert seen["running"] == MAX_FULL_COPIES, f"at most {MAX_FULL_COPIES} full copies run at once: {seen}"
    assert seen["waiting"] > 0, seen
    # A stalled copy holds its key list (2.4 MB here), a message of at most 4 MB and that message's
    # serialised copies; with every stream at the 64 MiB message limit it was the whole table (21.6
    # MB) several times over for each of the 12, and none was ever given back.
    grown = seen["rss"] - rss_before
    assert grown < 250 << 20, f"the shard grew by {grown / 2**20:.0f} MiB for {streams} streams nobody reads"
    for call in calls:
        call.cancel()

    rows = _full_copy(stub)
    assert len(rows) == ROWS
    expected = client.lookup("t", keys)
    np.testing.assert_array_equal(np.stack([rows[k] for k in keys.tolist()]), expected)
    assert "took no message" in log.read_text()


def test_a_waiting_full_copy_ends_a_stalled_one_after_the_patience_not_the_stall_limit(tmp_path):
    """Subscribers that stop reading hold every full copy's turn: a replica that needs a resync
    then waits FULL_COPY_PATIENCE_SECONDS, not the stream stall limit (here 60 s), and one stalled
    copy is ended for it, told why; the others, which nobody waits for, keep theirs."""
    stall = 60.0
    setup = _shard(tmp_path, stall)
    job, _, _, stub, log = next(setup)
    calls = []
    try:
        ended_before = _ended(job)
        calls = [stub.Subscribe(ps_pb2.SubscribeRequest(table="t", full_sync=True), timeout=120)
                 for _ in range(MAX_FULL_COPIES)]
        wait_until(lambda: _full_copies(job) == (MAX_FULL_COPIES, 0), "every turn taken by copies nobody reads")
        start = time.monotonic()
        rows = _full_copy(stub)  # a subscriber that reads
        took = time.monotonic() - start
        assert len(rows) == ROWS
        assert FULL_COPY_PATIENCE_SECONDS - 0.5 < took < stall / 4, f"the reading copy took {took:.1f} s"
        left_running = eventually(lambda: _full_copies(job) == (MAX_FULL_COPIES - 1, 0), timeout=30)
        assert left_running, f"(running, waiting) full copies: {_full_copies(job)}, not 3 stalled ones left"
        assert _ended(job) - ended_before == 1  # one stalled copy ended for it; the others keep their turns
        assert "while another full copy waited for this one's turn" in log.read_text()
        codes = []
        for call in calls:  # read now: the ended one's status follows the messages it had sent
            try:
                for batch in call:
                    if batch.to_version and batch.from_version == batch.to_version:
                        codes.append("following live")  # its copy went on once read
                        break
            except grpc.RpcError as err:
                codes.append(f"{err.code().name}: {err.details()}")
        ended = [code for code in codes if code != "following live"]
        assert len(ended) == 1 and len(codes) == MAX_FULL_COPIES, codes
        assert ended[0].startswith("RESOURCE_EXHAUSTED: Subscribe: the client took no message for "), ended
        assert ended[0].endswith("while another full copy waited for this one's turn; resubscribe"), ended
    finally:
        for call in calls:
            call.cancel()
        setup.close()
