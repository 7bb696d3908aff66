"""Subscribe heartbeat groups (ps/shard/heartbeats.py), against a real gRPC server: of a group's
streams on one connection only the oldest open one keeps sending heartbeats while idle (each sends
one at once when it first has nothing to send), the next takes over when it ends, and another
group, another connection or a stream of no group sends its own."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.shard import server
from ps.shard.commits import SEAL_IDLE_SECONDS, sealing_tables
from ps.table.config import TableConfig
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import make_job
from tests.helpers.waiting import eventually, wait_until


class _Counted:
    """A Subscribe stream read on a thread of its own, counting its heartbeats."""

    def __init__(
        self, channel: grpc.Channel, table: str, group: str, committed: bool = False, from_version: int = 0
    ) -> None:
        request = ps_pb2.SubscribeRequest(
            table=table, heartbeat_group=group, committed=committed, from_version=from_version
        )
        self.call = ps_pb2_grpc.ParameterServerStub(channel).Subscribe(request, timeout=60)
        self.heartbeats = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                if batch.from_version == batch.to_version and not batch.keys and not batch.deleted_keys:
                    self.heartbeats += 1
        except grpc.RpcError:
            pass  # ended by the test

    def end(self) -> None:
        self.call.cancel()
        self.thread.join(10)


@pytest.fixture()
def shard():
    job = make_job([TableConfig(name, dim=4) for name in "abcd"], num_shards=1)
    with InProcessShards.start(job) as shards:
        yield shards


def _heartbeats_sent(shards: InProcessShards) -> float:
    """embps_subscribe_heartbeats_total over the shard's tables (from its registry: in-process
    shards serve no /metrics port)."""
    families = text_string_to_metric_families(generate_latest(shards.servicers[0].metrics.registry).decode())
    return sum(s.value for f in families for s in f.samples if s.name == "embps_subscribe_heartbeats_total")


def test_one_stream_of_a_group_sends_the_heartbeats_and_the_next_takes_over(shard):
    address = shard.job.shards[0].address
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # not the process's shared connection
    with grpc.insecure_channel(address) as channel, grpc.insecure_channel(address, options=own_connection) as other:
        streams = {}
        for table in "abc":  # in turn, so that "a" is the group's oldest
            streams[table] = _Counted(channel, table, "replica-1")
            wait_until(lambda t=table: streams[t].heartbeats == 1, f"the first heartbeat of {table}")
        streams["no group"] = _Counted(channel, "d", "")
        streams["another group"] = _Counted(channel, "b", "replica-2")
        streams["another connection"] = _Counted(other, "c", "replica-1")

        def counts() -> dict[str, int]:
            return {name: s.heartbeats for name, s in streams.items()}

        if not eventually(lambda: min(counts()[n] for n in ("no group", "another group", "another connection")) >= 4):
            raise AssertionError(f"heartbeats so far: {counts()}")
        seen = counts()
        assert seen["b"] == seen["c"] == 1, seen  # each its first (at once), then silence
        assert seen["a"] >= 3, seen  # one each HEARTBEAT_SECONDS, as the 3 others, and it started first

        streams["a"].end()
        wait_until(lambda: streams["b"].heartbeats >= 4, "the next stream to take the heartbeats over")
        assert streams["c"].heartbeats == 1, counts()
        for s in streams.values():
            s.end()
    wait_until(lambda: shard.servicers[0].heartbeats.groups == 0, "every stream's seat given back")
    assert _heartbeats_sent(shard) >= 3 + 4 + 1 + 3 * 4


def test_an_open_committed_stream_keeps_its_tables_commits_sealing_rows_without_waking(shard):
    """A committed stream that sends no heartbeats waits for its table's next commit without waking,
    so "a stream looked within SEAL_IDLE_SECONDS" no longer says that one is open: an open one
    counts as such, however long it has been idle, and one that ended counts for
    SEAL_IDLE_SECONDS after (ps/shard/commits.py sealing_tables)."""
    state = shard.servicers[0].shard
    with grpc.insecure_channel(shard.job.shards[0].address) as channel:
        streams = [_Counted(channel, table, "replica-1", committed=True) for table in "ab"]
        wait_until(lambda: all(s.heartbeats == 1 for s in streams), "each stream's first heartbeat")
        for log in state.commits.values():
            log.subscribed_at = -SEAL_IDLE_SECONDS  # as if no stream had looked for a long time
        assert set(sealing_tables(state)) == {"a", "b"}
        for s in streams:
            s.end()
    wait_until(lambda: state.commits["a"].followers == state.commits["b"].followers == 0, "the streams' end")
    assert set(sealing_tables(state)) == {"a", "b"}  # for SEAL_IDLE_SECONDS after: a replica may come back


@pytest.mark.parametrize("committed", [False, True], ids=["live", "committed"])
def test_a_stream_with_nothing_to_send_says_at_once_that_it_is_up(shard, monkeypatch, committed):
    """Its first heartbeat goes as soon as it is idle, not a heartbeat interval later: a replica
    counts a shard whose streams have not spoken as stale (serving/follower.py). With the interval
    at two minutes, the first one still comes within the wait's 30 s. The committed streams start
    past the last commit (a push not committed yet), where they too have nothing to send."""
    monkeypatch.setattr(server, "HEARTBEAT_SECONDS", 120.0)
    address = shard.job.shards[0].address
    start = 0
    if committed:
        with PSClient([address], dims={"a": 4, "b": 4}) as client:
            for table in "ab":
                client.push(table, np.arange(3, dtype=np.int64), np.ones((3, 4), np.float32))
        start = 1
    with grpc.insecure_channel(address) as channel:
        streams = [
            _Counted(channel, "a", "replica-1", committed, from_version=start),
            _Counted(channel, "b", "", committed, from_version=start),
        ]
        wait_until(lambda: all(s.heartbeats >= 1 for s in streams), "each idle stream's first message")
        assert [s.heartbeats for s in streams] == [1, 1]  # that one at once; the next would be 2 minutes later
        for s in streams:
            s.end()


def test_a_held_stream_hands_the_heartbeats_on_and_every_change_is_cheap():
    """The roster's own rules (ps/shard/heartbeats.py): the oldest stream sends; a held one (its
    subscriber gave no credit) hands them to the next in line, which is woken; with every stream
    held none sends, and the first given credit takes them; one that leaves hands them on too. A
    replica holds hundreds of streams a shard, each held and given credit about once a step: a
    first version looked for the oldest stream not held from the front at each change, its work
    growing with the streams held before it."""
    from ps.shard.heartbeats import HeartbeatRoster

    woken: list[str] = []
    roster = HeartbeatRoster(woken.append)
    a, b, c = (roster.join("peer", "g", name) for name in "abc")
    assert [roster.beats(s) for s in (a, b, c)] == [True, False, False]
    roster.hold(a, True)
    assert roster.beats(b) and woken == ["b"]
    roster.hold(b, True)
    roster.hold(c, True)
    assert not any(roster.beats(s) for s in (a, b, c)) and woken == ["b", "c"]
    roster.hold(a, False)
    assert roster.beats(a) and woken[-1] == "a"
    roster.hold(b, False)
    roster.hold(c, False)
    roster.leave(a)
    assert roster.beats(b) and woken[-1] == "b"
    roster.leave(b)
    roster.leave(c)
    assert roster.groups == 0
    many = [roster.join("peer", "h", f"t{i}") for i in range(2000)]
    for _ in range(3):  # every stream held and given credit in turn, as at each step
        for seat in many:
            roster.hold(seat, True)
        for seat in many:
            roster.hold(seat, False)
    assert sum(roster.beats(s) for s in many) == 1
    assert len(roster._groups[("peer", "h")].line) < len(many)  # each seat queued once at most
    # Streams that come and go beside a long-lived one (a replica resubscribing its tables) are
    # dropped from the line: it kept every one that left while the first sent the heartbeats.
    for i in range(20_000):
        roster.leave(roster.join("peer", "h", f"short{i}"))
    assert len(roster._groups[("peer", "h")].line) <= 2 * len(many) + 1


def test_a_beater_given_credit_back_soon_keeps_the_heartbeats():
    """A replica that keeps up gives a stream's credit back within milliseconds of its window
    running out: the beater keeps the heartbeats then (handing them on at each exhausted window
    woke a stream a table every step for nothing); held past handoff_seconds, it hands them on."""
    import asyncio

    from ps.shard.heartbeats import HeartbeatRoster

    async def run() -> list[str]:
        woken: list[str] = []
        roster = HeartbeatRoster(woken.append, handoff_seconds=0.05)
        a, b = roster.join("peer", "g", "a"), roster.join("peer", "g", "b")
        roster.hold(a, True)
        roster.hold(a, False)  # credit back at once: its hand-off is called off
        assert roster.beats(a) and woken == [] and roster._groups[("peer", "g")].handoff is None
        roster.hold(a, True)  # held past handoff_seconds
        await asyncio.to_thread(wait_until, lambda: roster.beats(b), "the heartbeats handed on")
        assert woken == ["b"]
        return woken

    asyncio.run(run())
