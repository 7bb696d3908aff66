"""Subscribe(committed = true): a table's changes only up to commits, rows as of each commit.

    [full copy, ending at the current version V; `step` set when V is the newest commit's]
    then, whenever a newer step is committed: one range (position, commit version], its rows as
    sealed at that commit (ps/shard/commits.py), `step` on its last message; heartbeats while idle
    carry the step the subscriber is at.

A subscriber that reads slowly gets merged ranges (several commits at once, the newest step's
rows); a subscriber that falls behind the commit log gets FAILED_PRECONDITION and resyncs. The
dense tower published with a step (shard 0) rides on the range that ends at that step when the
request asks for it (`with_dense` is the replica's follower of its first table on shard 0).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from ps.errors import LogGapError
from ps.process.calls import current_stall_watch
from ps.rpc import ps_pb2
from ps.shard.heartbeats import StreamHeartbeats
from ps.shard.update_log import LogRange


async def committed_stream(
    servicer, request: ps_pb2.SubscribeRequest, beats: StreamHeartbeats
) -> AsyncIterator[ps_pb2.UpdateBatch]:
    """The messages of a committed Subscribe on `servicer` (ParameterServerServicer); `beats`
    says when its idle waits end in a heartbeat."""
    from ps.shard.server import HEARTBEAT_SECONDS, range_bytes

    shard, name = servicer.shard, request.table
    table = shard.table(name)
    commits = shard.commits[name]
    epoch = commits.epoch
    sent_step: int | None = None

    def heartbeat() -> ps_pb2.UpdateBatch:
        """'Still here, at `position`' (with the step the subscriber is at)."""
        message = servicer._batch(name, position, position, last=True)
        if sent_step is not None:
            message.step = sent_step
        return message

    if request.full_sync:
        position = 0
        last = None
        async for reply in servicer._full_copy(name, request.stored_rows):
            if last is not None:
                yield last
            last = reply
        position = last.to_version
        ending = [last]
        if position == commits.last_version:  # the copy is the newest commit's state
            sent_step = commits.last_step
            dense = await servicer.run_call(lambda: shard.dense.newest_in(-1, sent_step), 0)
            if request.with_dense and dense is not None:
                ending = _with_dense(servicer, last, dense)
            ending[-1].step = sent_step
        for reply in ending:
            yield reply
    else:
        position = request.from_version
        shard.log(name).check(position, name)
        commits.check(position, name)
        if commits.last_step == sent_step or commits.last_version < position:
            yield heartbeat()  # nothing to send: the subscriber learns at once that the stream is up
            beats.sent()
    while True:
        servicer.call_site.check_open()
        if commits.epoch != epoch:
            raise LogGapError(f"table {name!r}: the trainer committed an earlier step than this stream's "
                              f"({commits.last_step}): a new history of steps; resync with full_sync")
        changed = servicer._committed[name]  # commits wake it, pushes do not
        if commits.last_step == sent_step or commits.last_version < position:
            if await servicer.heartbeat_due(changed, beats):
                yield heartbeat()
                beats.sent()
            continue
        # The commit log and the towers are read where table calls are serialised: a Commit on the
        # tables thread appends and drops commits meanwhile ("deque mutated during iteration", or
        # a range that said (position, to] without the keys of commits dropped under it).
        held = await servicer.run_call(functools.partial(commits.bytes_after, position), 0)
        turn = servicer.ranges.pending(current_stall_watch(), servicer.range_hold_bytes(held))
        try:
            while (hold := await turn.wait(HEARTBEAT_SECONDS)) is None:
                if beats.due():  # waiting for the memory, still at `position`
                    yield heartbeat()
                    beats.sent()
        except BaseException:
            turn.abandon()
            raise
        try:
            read = functools.partial(_range_after, shard, commits, name, position, sent_step, epoch)
            taken = await servicer.run_call(read, 0)
            if taken is None:  # reset while this stream waited for its turn (the loop's check resyncs)
                continue
            sealed, dense = taken
            changes = LogRange(sealed.from_version, sealed.to_version, sealed.touched_keys, sealed.deleted_keys, ())
            rows = servicer._rows_of_words(name, sealed.values, request.stored_rows)
            servicer.ranges.resize(hold, servicer.range_hold_bytes(range_bytes(changes, rows)))
            for reply in servicer._batches(name, table.dim, changes, rows, False):  # made as they are taken
                if not reply.last:
                    yield reply
                    continue
                ending = _with_dense(servicer, reply, dense) if request.with_dense and dense is not None else [reply]
                ending[-1].step = sealed.step
                ending[-1].commit_time = sealed.commit_time
                for message in ending:
                    yield message
        finally:
            servicer.ranges.release(hold)
        position, sent_step = sealed.to_version, sealed.step




def _range_after(shard, commits, name: str, position: int, sent_step: int | None, epoch: int) -> tuple | None:
    """(the commits after `position` merged, the newest tower after sent_step up to their step);
    None when the log was reset since the stream's `epoch` (a new history of steps)."""
    if commits.epoch != epoch:
        return None
    sealed = commits.after(position, name)
    return sealed, shard.dense.newest_in(sent_step if sent_step is not None else -1, sealed.step)


_DENSE_SLACK = 256  # the dense fields' tags and lengths in a message


def _with_dense(servicer, last: ps_pb2.UpdateBatch, dense: tuple[int, str, bytes]) -> list[ps_pb2.UpdateBatch]:
    """The end of a range with the dense tower (step, format, state) on its last message: `last`
    itself when both fit one message, else `last` and then a message of no rows that carries the
    tower and ends the range (a tower near the message limit beside 4 MB of rows passed the limit,
    the stream failed, and the replica reconnected to the same failure over and over)."""
    ending = [last]
    if last.ByteSize() + len(dense[1]) + len(dense[2]) + _DENSE_SLACK > servicer.shard.job.message_limit_bytes:
        tail = ps_pb2.UpdateBatch()
        tail.CopyFrom(last)
        for field in ("keys", "values", "deleted_keys", "acks"):
            tail.ClearField(field)
        tail.reset = False
        last.last = False
        ending.append(tail)
    ending[-1].dense_step, ending[-1].dense_format, ending[-1].dense_state = dense
    return ending
