"""Subscribers that stop reading, against a real shard process: what a Subscribe stream holds while
its client takes nothing is bounded, full copies take turns, ranges take turns at the shard's
Subscribe memory, and a stalled stream is ended with a status that says why (ps/process/calls.py
_StallWatch, ps/shard/server.py STREAM_MESSAGE_BYTES, MAX_FULL_COPIES and SUBSCRIBE_MEMORY_BYTES).

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
from ps.shard.server import FULL_COPY_PATIENCE_SECONDS, MAX_FULL_COPIES, MERGE_BYTES_PER_KEY, STREAM_MESSAGE_BYTES
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import make_job, rss_bytes, start_shard, wait_serving
from tests.helpers.waiting import eventually, wait_until

ROWS = 300_000  # a full copy of dim 16: 21.6 MB, several messages of at most STREAM_MESSAGE_BYTES
DIM = 16
STALL_SECONDS = 1.0
TABLE = TableConfig("t", dim=DIM, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))


def _shard(workdir, stall_seconds: float, *args: str):
    """A shard (started with `args` too) whose table holds ROWS rows, and a stub with a large
    enough message limit."""
    job = make_job([TABLE])
    config = workdir / "job.toml"
    config.write_text(dump_job_config(job))
    log = workdir / "shard.log"
    proc = start_shard(config, 0, log, args=("--stream-stall-seconds", str(stall_seconds), *args))
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


def _ranges(job) -> tuple[float, float, float]:
    """(holding, waiting) Subscribe ranges, and the bytes they hold."""
    metrics = _metrics(job)
    holding, waiting = (
        metrics.get(("embps_subscribe_ranges", (("shard", "0"), ("state", state))), 0.0)
        for state in ("holding", "waiting")
    )
    return holding, waiting, metrics.get(("embps_subscribe_range_bytes", (("shard", "0"),)), 0.0)


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
        stalled_from = time.monotonic()  # the copies cannot have stalled before they were opened
        calls = [stub.Subscribe(ps_pb2.SubscribeRequest(table="t", full_sync=True), timeout=120)
                 for _ in range(MAX_FULL_COPIES)]
        wait_until(lambda: _full_copies(job) == (MAX_FULL_COPIES, 0), "every turn taken by copies nobody reads")
        start = time.monotonic()
        rows = _full_copy(stub)  # a subscriber that reads
        took, since_stalled = time.monotonic() - start, time.monotonic() - stalled_from
        assert len(rows) == ROWS
        # Its turn came once a copy had left a message untaken for the patience, not at the stall limit.
        assert since_stalled > FULL_COPY_PATIENCE_SECONDS and took < stall / 4, (since_stalled, took)
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


def test_ranges_wait_for_the_shards_subscribe_memory_and_a_stalled_one_gives_its_turn(tmp_path):
    """Live Subscribe streams from version 0 each read a range of every row (its keys, 2.4 MB here,
    and one message's rows with four copies of the message, 22.4 MB in all; until it is merged, a
    range is charged 56 bytes a key for the merge instead of 8): with --subscribe-memory-bytes
    room for one range held and one merging, two hold theirs and the others wait, holding nothing,
    however many open (before ranges took turns, each read its range at once: 10 more streams
    nobody read, 10 more copies of the rows). A subscriber that reads waits for a stalled holder's
    patience, not its stall limit, and hears heartbeats meanwhile (its link is alive)."""
    stall = 60.0
    # The keys of every row, one message's float32 rows, and four copies of that message.
    range_bytes = ROWS * 8 + 5 * min(ROWS * (8 + 4 * DIM), STREAM_MESSAGE_BYTES)
    merging = range_bytes + (MERGE_BYTES_PER_KEY - 8) * ROWS
    setup = _shard(tmp_path, stall, "--subscribe-memory-bytes", str(range_bytes + merging + (1 << 20)))
    job, proc, client, stub, log = next(setup)
    calls = []
    try:
        ended_before = _ended(job)

        def subscribe():
            return stub.Subscribe(ps_pb2.SubscribeRequest(table="t", from_version=0), timeout=120)

        stalled_from = time.monotonic()  # the holders cannot have stalled before they were opened
        calls = [subscribe() for _ in range(2)]
        wait_until(lambda: _ranges(job) == (2, 0, 2 * range_bytes), "two stalled streams holding their ranges")
        rss_holding = rss_bytes(proc.pid)
        waiting = [subscribe() for _ in range(10)]
        calls += waiting
        wait_until(lambda: _ranges(job) == (2, 10, 2 * range_bytes), "ten more streams waiting for the memory")
        grown = rss_bytes(proc.pid) - rss_holding
        assert grown < 40 << 20, f"10 waiting streams grew the shard by {grown / 2**20:.0f} MiB"
        for call in waiting:
            call.cancel()
        wait_until(lambda: _ranges(job) == (2, 0, 2 * range_bytes), "the waiting streams gone")

        start = time.monotonic()
        reader = subscribe()
        rows: dict[int, np.ndarray] = {}
        heartbeats = 0
        for batch in reader:  # heartbeats while it waits for the memory, one range of every row
            if batch.from_version == batch.to_version and not batch.keys:
                heartbeats += 1
                continue
            keys = np.frombuffer(batch.keys, dtype="<i8")
            rows.update(zip(keys.tolist(), np.frombuffer(batch.values, "<f4").reshape(-1, DIM), strict=True))
            if batch.last:
                break
        reader.cancel()
        took, since_stalled = time.monotonic() - start, time.monotonic() - stalled_from
        # Its turn came once a holder had left a message untaken for the patience, not at the stall limit.
        assert since_stalled > FULL_COPY_PATIENCE_SECONDS and took < stall / 4, (since_stalled, took)
        assert heartbeats >= 3, f"{heartbeats} heartbeats while it waited {took:.1f} s"  # alive, still at 0
        assert len(rows) == ROWS
        keys = np.arange(0, ROWS, 97, dtype=np.int64)
        np.testing.assert_array_equal(np.stack([rows[k] for k in keys.tolist()]), client.lookup("t", keys))
        assert _ended(job) - ended_before == 1  # one stalled holder ended for the reader
        assert "while other streams waited for the memory its range holds; resubscribe" in log.read_text()
        wait_until(lambda: _ranges(job) == (1, 0, range_bytes), "the reader's range given back")
    finally:
        for call in calls:
            call.cancel()
        setup.close()


def test_a_stalled_range_holds_its_keys_and_one_message_not_its_rows(tmp_path):
    """Six live streams from version 0 of a 100,000-row table of dim 128 (51 MB of rows) whose
    subscribers took one message each and then stopped: each holds the range's keys (0.8 MB) and
    the message being sent, since a range's rows are read a message at a time as it is sent.
    Before, each read all its rows at once and held them until its subscriber took the last
    message: six replicas catching up after a blip held six copies (+249 MiB here, +5 MiB now),
    and a push waited behind each whole read (docs/performance.md)."""
    rows, dim = 100_000, 128
    job = make_job([TableConfig("wide", dim=dim, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))])
    config = tmp_path / "job.toml"
    config.write_text(dump_job_config(job))
    log = tmp_path / "shard.log"
    proc = start_shard(config, 0, log, args=("--stream-stall-seconds", "60"))
    calls = []
    try:
        wait_serving(job.shards[0].address, proc, log_path=log)
        client = PSClient([job.shards[0].address], dims={"wide": dim})
        client.push("wide", np.arange(rows, dtype=np.int64), np.ones((rows, dim), np.float32))
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
        channel = grpc.insecure_channel(job.shards[0].address, options=options)
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        rss_before = rss_bytes(proc.pid)
        for _ in range(6):
            call = stub.Subscribe(ps_pb2.SubscribeRequest(table="wide", from_version=0), timeout=120)
            calls.append(call)
            first = next(call)  # the range has begun: before, all its rows were read by now
            assert first.keys and not first.last
        grown = rss_bytes(proc.pid) - rss_before
        range_rows = rows * dim * 4
        assert grown < range_rows, f"6 stalled ranges grew the shard by {grown / 2**20:.0f} MiB"
        keys = np.arange(0, rows, 89, dtype=np.int64)
        before = client.lookup("wide", keys)
        client.push("wide", keys, np.ones((keys.shape[0], dim), np.float32))  # the shard still takes pushes
        np.testing.assert_allclose(client.lookup("wide", keys), before - np.float32(0.1), rtol=1e-6, atol=1e-7)
        channel.close()
    finally:
        for call in calls:
            call.cancel()
        stop_pid(proc)
