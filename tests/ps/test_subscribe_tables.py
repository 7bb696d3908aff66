"""SubscribeTables on a real shard process: many tables' streams over one call, each started,
ended and stopped on its own, the call going on."""

from __future__ import annotations

import functools
import queue
import signal
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ps import wire
from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.table.config import TableConfig
from tests.helpers.processes import ShardCluster, make_job
from tests.helpers.waiting import wait_until

TABLES = ("a", "b", "c")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    job = make_job([TableConfig(name, dim=4) for name in TABLES], num_shards=1)
    with ShardCluster.start(job, tmp_path_factory.mktemp("subscribe-tables")) as c:
        yield c


class Call:
    """A SubscribeTables call: requests written as the test goes, replies read one at a time."""

    def __init__(self, cluster: ShardCluster) -> None:
        self.channel = grpc.insecure_channel(cluster.job.shards[0].address)
        self._requests: queue.Queue = queue.Queue()
        stub = ps_pb2_grpc.ParameterServerStub(self.channel)
        self.replies = stub.SubscribeTables(iter(self._requests.get, None), timeout=60)
        self._next_id = 1

    def subscribe(self, table: str, window: int = 0, **fields) -> int:
        """Starts a stream of `table` (with that credit window); returns its stream_id."""
        stream_id, self._next_id = self._next_id, self._next_id + 1
        request = ps_pb2.SubscribeRequest(table=table, stream_id=stream_id, stored_rows=True, **fields)
        self._requests.put(ps_pb2.SubscribeTablesRequest(subscribe=[request], window=window))
        return stream_id

    def give_credit(self, stream_id: int, messages: int) -> None:
        credit = ps_pb2.StreamCredit(stream_id=stream_id, messages=messages)
        self._requests.put(ps_pb2.SubscribeTablesRequest(credit=[credit]))

    def stop(self, stream_id: int) -> None:
        self._requests.put(ps_pb2.SubscribeTablesRequest(stop=[stream_id]))

    def until(self, done) -> Iterator[ps_pb2.SubscribeTablesReply]:
        """Replies until done(reply) is true (that one included)."""
        for reply in self.replies:
            yield reply
            if done(reply):
                return
        raise AssertionError("the call ended")

    def first(self, wanted) -> ps_pb2.SubscribeTablesReply:
        """The first reply for which wanted(reply) is true (the ones before it are read and left)."""
        return list(self.until(wanted))[-1]

    def close(self) -> None:
        self.replies.cancel()
        self._requests.put(None)
        self.channel.close()


@pytest.fixture
def call(cluster):
    c = Call(cluster)
    yield c
    c.close()


def heard_all(ids: set[int]):
    """done() for Call.until: every stream in `ids` has sent a complete message (heartbeat or range)."""
    pending = set(ids)

    def done(reply: ps_pb2.SubscribeTablesReply) -> bool:
        pending.difference_update(b.stream_id for b in reply.batches if b.last)
        return not pending

    return done


def ranges(reply: ps_pb2.SubscribeTablesReply) -> dict[int, ps_pb2.UpdateBatch]:
    """The messages of `reply` that end a range with rows, by stream_id."""
    return {b.stream_id: b for b in reply.batches if b.last and b.to_version > b.from_version}


def table_ends(job, table: str) -> dict[str, float]:
    """The shard's count of table `table`'s SubscribeTables streams that ended, by code."""
    with urllib.request.urlopen(f"http://127.0.0.1:{job.shards[0].metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == "embps_requests_total" and sample.labels.get("method") == "SubscribeTables"
        and sample.labels.get("table") == table
    }


def head_versions(client: PSClient) -> dict[str, int]:
    return {t.name: t.version for t in client.stats()[0].tables}


def _all_ranges_in(got: dict, carrying: list, wanted: set[int], reply: ps_pb2.SubscribeTablesReply) -> bool:
    """done() for Call.until: adds the reply's ranges to `got` (by stream_id) and their number to
    `carrying`; true once every stream in `wanted` has sent one."""
    if found := ranges(reply):
        carrying.append(len(found))
        got.update(found)
    return wanted <= set(got)


def test_replies_carry_the_ranges_of_every_table_a_push_touched(cluster, call):
    """Three tables followed on one call: each push to all three comes back as each table's range
    with its own table's rows, and a reply carries several tables' ranges at once (one Subscribe
    call a table sent a message each). One reply for all three is the rule, not a promise: a
    stream whose read found the tables' lock taken (another thread's call) goes to the tables'
    thread and makes its range after the next reply left (a fresh clone under load once saw a
    push's ranges come in two replies), so it is asked of one push of ten."""
    with PSClient.from_job(cluster.job) as client:
        versions = head_versions(client)
        ids = {name: call.subscribe(name, from_version=versions[name]) for name in TABLES}
        list(call.until(heard_all(set(ids.values()))))  # each stream says it is up (a heartbeat)
        keys = np.array([5, 6, 7], np.int64)
        names = list(TABLES)
        in_one_reply = 0
        for push in range(10):
            client.send_push(client.prepare_push_multi(
                names, np.tile(keys, 3), np.arange(0, 10, 3, dtype=np.int64), np.ones((9, 4), np.float32)))
            got: dict[int, ps_pb2.UpdateBatch] = {}
            carrying: list[int] = []  # ranges a reply carried, of each reply that carried any
            list(call.until(functools.partial(_all_ranges_in, got, carrying, set(ids.values()))))
            in_one_reply += carrying == [len(TABLES)]
            for name, stream_id in ids.items():
                batch = got[stream_id]
                assert batch.table == name and batch.from_version == versions[name] + push
                np.testing.assert_array_equal(wire.decode_keys(batch.keys), keys)
                values = wire.decode_values(batch.values, 3, 4)
                np.testing.assert_array_equal(values, client.lookup(name, keys))
        assert in_one_reply >= 1, "no push's ranges came in one reply"


def test_a_failed_stream_ends_alone_and_starts_again_on_the_same_call(cluster, call):
    """A table asked for with another incarnation ends FAILED_PRECONDITION in the reply, an unknown
    table NOT_FOUND, while the other table's stream goes on; the failed table, asked for again with
    full_sync on the same call, gets its full copy."""
    with PSClient.from_job(cluster.job) as client:
        client.push("a", np.array([1, 2], np.int64), np.ones((2, 4), np.float32))
        versions = head_versions(client)
        wrong = call.subscribe("a", from_version=versions["a"], incarnation=12345)
        unknown = call.subscribe("nope")
        fine = call.subscribe("b", from_version=versions["b"])
        ended: dict[int, ps_pb2.TableStreamEnd] = {}
        heard = heard_all({fine})
        for reply in call.until(lambda r: heard(r) and len(ended) == 2):
            ended.update((e.stream_id, e) for e in reply.ended)
        assert ended[wrong].table == "a" and ended[wrong].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "restarted" in ended[wrong].message
        assert ended[unknown].code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in ended[unknown].message

        again = call.subscribe("a", full_sync=True)
        copy = [b for r in call.until(lambda r: any(b.stream_id == again and b.last for b in r.batches))
                for b in r.batches if b.stream_id == again]
        assert copy[0].reset and copy[-1].to_version == versions["a"]
        copied = np.concatenate([wire.decode_keys(b.keys) for b in copy])
        rows = {t.name: t.rows for t in client.stats()[0].tables}
        assert copied.shape[0] == rows["a"] and {1, 2} <= set(copied.tolist())

        client.push("b", np.array([9], np.int64), np.ones((1, 4), np.float32))
        reply = call.first(lambda r: fine in ranges(r))
        assert wire.decode_keys(ranges(reply)[fine].keys).tolist() == [9]


def test_a_stopped_stream_sends_nothing_more(cluster, call):
    """After `stop`, a push to that table sends nothing for its stream; asked for again (a new
    stream_id), it continues from the version given."""
    with PSClient.from_job(cluster.job) as client:
        versions = head_versions(client)
        kept, stopped = call.subscribe("a", from_version=versions["a"]), call.subscribe("b", from_version=versions["b"])
        list(call.until(heard_all({kept, stopped})))
        call.stop(stopped)
        probe = call.subscribe("c", from_version=versions["c"])  # requests are taken in order: the stop is done
        list(call.until(heard_all({probe})))
        names = ["a", "b"]
        client.send_push(client.prepare_push_multi(
            names, np.array([3, 3], np.int64), np.array([0, 1, 2], np.int64), np.ones((2, 4), np.float32)))
        reply = call.first(lambda r: bool(ranges(r)))
        assert set(ranges(reply)) == {kept} and all(b.stream_id != stopped for b in reply.batches)
        again = call.subscribe("b", from_version=versions["b"])
        reply = call.first(lambda r: again in ranges(r))
        assert wire.decode_keys(ranges(reply)[again].keys).tolist() == [3]


def test_a_stream_sends_no_more_than_its_credit(cluster, call):
    """window 1: table c's stream sends its first message (a heartbeat), then nothing while three
    pushes to a and c bring a's ranges; given credit for two messages, c sends the range it made
    at the first push (held for credit, as a Subscribe stream's message is held by flow control)
    and then one range with the two later pushes merged."""
    with PSClient.from_job(cluster.job) as client:
        versions = head_versions(client)
        free, bounded = call.subscribe("a", from_version=versions["a"]), call.subscribe(
            "c", window=1, from_version=versions["c"])
        list(call.until(heard_all({free, bounded})))
        for key in (11, 12, 13):
            client.send_push(client.prepare_push_multi(
                ["a", "c"], np.array([key, key], np.int64), np.array([0, 1, 2], np.int64),
                np.ones((2, 4), np.float32)))
            replies = list(call.until(lambda r: free in ranges(r)))
            assert all(b.stream_id != bounded for r in replies for b in r.batches), "c sent beyond its credit"
        call.give_credit(bounded, 2)
        sent: list[ps_pb2.UpdateBatch] = []
        for reply in call.until(lambda r: bool(sent) and sent[-1].to_version == versions["c"] + 3):
            sent.extend(b for b in reply.batches if b.stream_id == bounded and b.last)
        c = versions["c"]
        assert [(b.from_version, b.to_version) for b in sent] == [(c, c + 1), (c + 1, c + 3)]
        assert [sorted(wire.decode_keys(b.keys).tolist()) for b in sent] == [[11], [12, 13]]


def test_a_stream_waiting_for_credit_hands_its_group_s_heartbeats_to_the_next(cluster, call):
    """On an idle shard the oldest stream of a heartbeat group sends the group's heartbeats, and a
    replica reads any of them as news that the shard is alive. A stream whose subscriber gives no
    credit (a table ahead of the replica's consistent cut, its follower waiting) sent them into
    its window until it was full, then nothing, and neither did the others: the shard went silent
    and the replica counted it stale. The next stream of the group takes them over meanwhile."""
    with PSClient.from_job(cluster.job) as client:
        versions = head_versions(client)
    group = "waiting-for-credit"
    held = call.subscribe("a", window=2, from_version=versions["a"], heartbeat_group=group)
    beating = call.subscribe("b", from_version=versions["b"], heartbeat_group=group)
    heard = {held: 0, beating: 0}

    def count(reply: ps_pb2.SubscribeTablesReply) -> bool:
        for batch in reply.batches:
            heard[batch.stream_id] = heard.get(batch.stream_id, 0) + 1
        return heard[held] >= 2 and heard[beating] >= 3  # b's first, then two of the group's

    list(call.until(count))
    assert heard[held] == 2, heard  # its window: its first heartbeat and one of the group's
    call.give_credit(held, 2)  # a is in line again; b goes on sending the group's
    after: list[int] = []
    list(call.until(lambda r: after.extend(b.stream_id for b in r.batches) or after.count(beating) >= 3))
    assert after.count(held) <= 1, after  # at most the heartbeat it had made while it still sent them


def test_a_stream_left_without_credit_ends_alone(tmp_path):
    """A shard with --stream-stall-seconds 1: a stream waiting for credit for that long ends
    RESOURCE_EXHAUSTED in a reply, saying so, as a Subscribe stream whose client takes nothing; the
    call and its other stream go on."""
    job = make_job([TableConfig("a", dim=4), TableConfig("b", dim=4)], num_shards=1)
    cluster = ShardCluster.start(job, tmp_path, args=("--stream-stall-seconds", "1"))
    with cluster, PSClient.from_job(cluster.job) as client:
        call = Call(cluster)
        try:
            starved, fed = call.subscribe("a", window=1), call.subscribe("b")
            list(call.until(heard_all({starved, fed})))
            client.push("a", np.array([1], np.int64), np.ones((1, 4), np.float32))
            ended: dict[int, ps_pb2.TableStreamEnd] = {}
            list(call.until(lambda r: ended.update((e.stream_id, e) for e in r.ended) or starved in ended))
            assert ended[starved].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "no credit" in ended[starved].message
            # Logged and counted as a Subscribe stream's stall is (before: neither).
            wait_until(lambda: "SubscribeTables: table 'a': the client gave no credit" in cluster.log(0),
                       "the shard logs the ended stream")
            assert table_ends(job, "a") == {"RESOURCE_EXHAUSTED": 1.0}
            client.push("b", np.array([2], np.int64), np.ones((1, 4), np.float32))
            reply = call.first(lambda r: fed in ranges(r))
            assert wire.decode_keys(ranges(reply)[fed].keys).tolist() == [2]
        finally:
            call.close()


def test_a_range_sent_whole_lets_its_memory_go_while_its_stream_waits_for_credit(tmp_path):
    """A shard whose Subscribe memory holds one range: table a's range (20,000 rows of dim 64, many
    messages) is taken whole, then a gives no credit; table b's range then has the memory at once
    and a's stream goes on (a review's repro: a's stream, waiting for credit at its range's last
    message, kept the range's turn; b's range waited 5 s, and a was ended RESOURCE_EXHAUSTED)."""
    job = make_job([TableConfig("a", dim=64), TableConfig("b", dim=4)], num_shards=1, message_limit_bytes=1 << 20)
    cluster = ShardCluster.start(job, tmp_path, args=("--subscribe-memory-bytes", "200000"))
    with cluster, PSClient.from_job(cluster.job) as client:
        client.push("a", np.arange(20_000, dtype=np.int64), np.ones((20_000, 64), np.float32))
        client.push("b", np.array([1, 2], np.int64), np.ones((2, 4), np.float32))
        call = Call(cluster)
        try:
            a = call.subscribe("a", window=1, from_version=0)
            messages = 0
            for reply in call.replies:  # a's range a message at a time: credit for each but the last
                mine = [b for b in reply.batches if b.stream_id == a]
                messages += len(mine)
                if any(b.last for b in mine):
                    break
                call.give_credit(a, len(mine))
            assert messages > 2
            b = call.subscribe("b", from_version=0)
            ended = []
            for reply in call.until(lambda r: b in ranges(r)):
                ended += [(e.table, e.message) for e in reply.ended]
            assert ended == [], f"b's range came only after a's stream was ended: {ended}"
        finally:
            call.close()


def test_undecodable_request_bytes_end_the_call_invalid_argument(cluster):
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        raw = channel.stream_stream(
            "/embps.v1.ParameterServer/SubscribeTables", request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as raised:
            next(raw(iter([b"\x0a"]), timeout=10))  # field 1, its length missing
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in raised.value.details()


def test_a_request_of_too_many_names_ends_the_call_and_many_ends_keep_the_message_limit(tmp_path):
    """A request of more entries than the bound ends the call INVALID_ARGUMENT (20,000 unknown names
    held a shard's loop for 13 s, pushes timing out). Within it, the ends of 40 unknown tables of
    3,000-character names (~7 KB each, 290 KB in all) come over several replies within a 64 KiB
    message limit: in one, the call failed RESOURCE_EXHAUSTED before any end arrived, each retry
    alike."""
    job = make_job([TableConfig("a", dim=4)], num_shards=1, message_limit_bytes=1 << 16)
    with ShardCluster.start(job, tmp_path) as small:
        call = Call(small)
        try:
            names = [f"{i:04d}" + "n" * 2996 for i in range(40)]
            ids = {call.subscribe(name) for name in names}
            ended: dict[int, ps_pb2.TableStreamEnd] = {}
            replies = 0
            for reply in call.until(lambda r: ended.update((e.stream_id, e) for e in r.ended) or set(ended) == ids):
                replies += 1
                assert reply.ByteSize() <= job.message_limit_bytes
            assert replies > 1 and {e.code for e in ended.values()} == {grpc.StatusCode.NOT_FOUND.value[0]}
        finally:
            call.close()
        call = Call(small)
        try:
            too_many = [ps_pb2.SubscribeRequest(table=f"x{i}", stream_id=i + 1) for i in range(1025)]
            call._requests.put(ps_pb2.SubscribeTablesRequest(subscribe=too_many))
            with pytest.raises(grpc.RpcError) as raised:
                next(iter(call.replies))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1024" in raised.value.details()
        finally:
            call.close()


def test_a_draining_shard_ends_a_call_with_no_stream_running(tmp_path):
    """SIGTERM while the call's only stream has ended (an unknown table): the call ends UNAVAILABLE
    saying the shard shuts down, and the shard exits (before, the call stayed open until the 5 s
    grace ran out and the shard cancelled it)."""
    cluster = ShardCluster.start(make_job([TableConfig("a", dim=4)], num_shards=1), tmp_path)
    call = Call(cluster)
    try:
        gone = call.subscribe("nope")
        list(call.until(lambda r: any(e.stream_id == gone for e in r.ended)))
        proc = cluster.procs[0]
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(call.replies))
        # Not "Cancelling all calls": what the shard's stop answers once its grace ran out.
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in raised.value.details()
        assert proc.wait(timeout=30) == 0
    finally:
        call.close()
        cluster.stop()
