"""A committed stream beside the Commits that feed it (ps/shard/commit_stream.py): the commit log
and the dense towers are read where table calls are serialised, a step's tower is in place before
any of its tables is sealed, and a Commit of a step no push can carry is refused."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.shard import commits as commits_module
from ps.table.config import TableConfig
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import make_job

TABLE = TableConfig("user", dim=4)


def _committed_steps(stream, count: int) -> list[tuple[int, int]]:
    """(step, dense_step) of the first `count` range ends that carry a step past the copy's."""
    seen = []
    for batch in stream:
        if batch.last and batch.HasField("step") and batch.step >= 1 and batch.keys:
            seen.append((batch.step, batch.dense_step))
            if len(seen) == count:
                return seen
    return seen


def test_the_stream_reads_the_commit_log_and_the_towers_under_the_tables_lock(monkeypatch):
    """A Commit runs on the tables thread once its work passes 1 MiB; the stream read the log on
    the event loop meanwhile: 'deque mutated during iteration', or a range (position, to] without
    the keys of commits dropped under it."""
    unlocked: list[str] = []
    shards = InProcessShards.start(make_job([TABLE], num_shards=1))
    servicer = shards.servicers[0]
    for name in ("after", "bytes_after"):
        method = getattr(commits_module.CommitLog, name)

        def checked(self, *args, _method=method, _name=name):
            if not servicer._tables_lock.locked():
                unlocked.append(_name)
            return _method(self, *args)

        monkeypatch.setattr(commits_module.CommitLog, name, checked)
    try:
        with PSClient.from_job(shards.job) as client, grpc.insecure_channel(shards.job.shards[0].address) as channel:
            stream = ps_pb2_grpc.ParameterServerStub(channel).Subscribe(
                ps_pb2.SubscribeRequest(table="user", committed=True, full_sync=True), timeout=60
            )
            messages = iter(stream)
            while not next(messages).last:  # the (empty) copy
                pass
            for step in (1, 2):
                client.push("user", np.arange(8, dtype=np.int64) + step, np.ones((8, 4), np.float32), step=step)
                client.commit(step)
            assert [s for s, _ in _committed_steps(messages, 2)] == [1, 2]
            stream.cancel()
    finally:
        shards.stop()
    assert not unlocked, f"read without the tables lock: {unlocked}"


def test_a_step_s_tower_is_in_place_before_its_tables_are_sealed(monkeypatch):
    """The tower was stored after every table was sealed: a stream that saw the step sealed on its
    table in between sent the range without it, and asked only for later towers after."""
    shards = InProcessShards.start(make_job([TABLE], num_shards=1))
    shard = shards.servicers[0].shard
    towers_when_sealed: list[int | None] = []
    seal = commits_module.CommitLog.seal

    def sealing(self, commit):
        tower = shard.dense.newest_in(-1, commit.step)
        towers_when_sealed.append(None if tower is None else tower[0])
        return seal(self, commit)

    monkeypatch.setattr(commits_module.CommitLog, "seal", sealing)
    try:
        with PSClient.from_job(shards.job) as client:
            client.push("user", np.arange(8, dtype=np.int64), np.ones((8, 4), np.float32), step=1)
            client.commit(1, b"tower-1", "bytes")
    finally:
        shards.stop()
    assert towers_when_sealed == [1]


def test_a_commit_of_a_step_no_push_can_carry_is_refused():
    """Commit(2^64 - 1) moved the shard's step there; every real step after it was then 'earlier',
    and each reset the commit logs and made every committed stream resync."""
    shards = InProcessShards.start(make_job([TABLE], num_shards=1))
    try:
        with grpc.insecure_channel(shards.job.shards[0].address) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Commit(ps_pb2.CommitRequest(step=2**64 - 1), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "step: must be in [0, 2^32 - 1]" in refused.value.details()
            assert stub.Commit(ps_pb2.CommitRequest(step=3), timeout=10).step == 3
    finally:
        shards.stop()


def test_a_new_history_of_steps_forgets_the_old_one_s_towers():
    """A Commit of an earlier step starts a new history; the old history's towers of the steps it
    reaches again were kept, and served as the new history's where it published none."""
    shards = InProcessShards.start(make_job([TABLE], num_shards=1))
    dense = shards.servicers[0].shard.dense
    try:
        with PSClient.from_job(shards.job) as client:
            for step in (1, 2, 3):
                client.push("user", np.arange(4, dtype=np.int64), np.ones((4, 4), np.float32), step=step)
                client.commit(step, f"old-{step}".encode(), "bytes")
            client.commit(2)  # the trainer resumed from step 1's snapshot: steps 2, 3 again, no tower
            assert dense.newest_in(-1, 3) == (1, "bytes", b"old-1")
            client.commit(3, b"new-3", "bytes")
            assert dense.newest_in(-1, 3) == (3, "bytes", b"new-3")
    finally:
        shards.stop()


def test_a_committed_full_copy_is_the_table_at_its_commit_when_the_next_step_pushes_during_its_end():
    """A committed full copy ends with the keys changed while it ran (the copy's end, read from a
    change feed) and is stamped with the step committed at its last version. Once those rows were
    read a message at a time (a change of this session, since undone for the copy's end), a push
    of the next step landing between two of its messages put next-step rows into the copy a
    replica serves as the committed step (a review's repro: 1,416 of 150,000 rows)."""
    dim, rows = 16, 60_000
    job = make_job([TableConfig("user", dim=dim)], num_shards=1, message_limit_bytes=256 << 10)
    every = np.arange(rows, dtype=np.int64)
    changed = np.arange(0, rows, 2, dtype=np.int64)
    rng = np.random.default_rng(0)
    with InProcessShards.start(job) as shards, PSClient.from_job(shards.job) as client:
        client.push("user", every, np.ones((rows, dim), np.float32), step=1)
        client.commit(1)
        # No BDP probes: the client's window stays 64 KiB, so the copy waits for this reader (with
        # them, gRPC may take the whole copy into its buffers before step 2 is pushed).
        options = [("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(shards.job.shards[0].address, options=options) as channel:
            request = ps_pb2.SubscribeRequest(table="user", full_sync=True, committed=True)
            messages = iter(ps_pb2_grpc.ParameterServerStub(channel).Subscribe(request, timeout=60))
            taken = [next(messages)]  # the copy has begun: what step 2 changes goes to its end
            client.push("user", changed, rng.standard_normal((changed.shape[0], dim)).astype(np.float32), step=2)
            client.commit(2)
            at_step_2 = client.lookup("user", changed)
            version_2 = client.stats()[0].tables[0].version
            pushed_3 = False
            for message in messages:
                taken.append(message)
                if message.to_version == version_2 and not pushed_3:  # the copy's end has begun
                    client.push("user", changed, np.full((changed.shape[0], dim), 100.0, np.float32), step=3)
                    pushed_3 = True
                if message.last:
                    break
    assert pushed_3 and taken[-1].step == 2 and taken[-1].to_version == version_2
    copy: dict[int, np.ndarray] = {}
    for message in taken:
        keys = np.frombuffer(message.keys, dtype="<i8")
        copy.update(zip(keys.tolist(), np.frombuffer(message.values, "<f4").reshape(-1, dim), strict=True))
    np.testing.assert_array_equal(np.stack([copy[k] for k in changed.tolist()]), at_step_2)
