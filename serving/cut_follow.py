"""A follower's stream under consistency = "step": Subscribe(committed = true), each committed
range handed to the cut (serving/cut.py) instead of written into the served rows.

    Subscribe(committed, from = the stream's tail, incarnation) --> ranges ending at commits
        overlay range (from, to] with `step` --> Delta(keys, rows of that step, deleted keys)
        full copy (reset ... last) --> a private ShardRows; complete at the first message with
        `step` (the copy itself if it ended at a commit, else the next committed range written
        into it) --> Delta(replace = that ShardRows)
    heartbeats (no change, same step): nothing to hand over

Errors propagate to ShardFollower.run, which backs off and resubscribes (in full after a gap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ps import wire
from ps.rpc import ps_pb2
from serving.cut import Delta, ModelCut
from serving.store import ShardRows

if TYPE_CHECKING:
    from serving.follower import Subscribe


async def follow_committed(follower, cut: ModelCut, with_dense: bool, subscribe: Subscribe) -> None:
    """Follows follower's (table, shard) stream, subscribe(request)'s messages (serving/follower.py's
    Subscribe), into `cut` until it ends or fails."""
    from serving.follower import StreamGapError

    name, shard = follower.replica.name, follower.shard
    tail = cut.tails[(name, shard)]
    full = follower._need_full_sync or (tail.incarnation == 0 and tail.version > 0)
    request = ps_pb2.SubscribeRequest(
        table=name, from_version=tail.version, incarnation=tail.incarnation, full_sync=full, committed=True,
        with_dense=with_dense, stored_rows=True, heartbeat_group=follower.link.group,
    )
    building: ShardRows | None = None
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    deleted: list[np.ndarray] = []
    position, incarnation = tail.version, tail.incarnation
    range_start = True
    storage = "float32"
    async for batch in subscribe(request):
        follower.mark_message()
        if batch.reset:  # a full copy: from the process that sends it, whichever the tail came from
            building = ShardRows(follower.replica.dim, follower.replica.dtype)
            incarnation = batch.incarnation
        elif range_start and batch.from_version != position:
            raise StreamGapError(f"range ({batch.from_version}, {batch.to_version}] does not follow version {position}")
        range_start = batch.last
        if incarnation and batch.incarnation != incarnation and not batch.reset:
            raise StreamGapError(f"incarnation {batch.incarnation} differs from the followed {incarnation}")
        if building is not None:
            await follower._apply(building, batch)
        else:
            k = wire.decode_keys(batch.keys)
            keys.append(k)
            storage, rows = wire.decode_stored_rows(batch.values, k.shape[0], follower.replica.dim, batch.dtype)
            values.append(rows)
            deleted.append(wire.decode_keys(batch.deleted_keys, "deleted_keys"))
        if not batch.last:
            continue
        position, incarnation = batch.to_version, batch.incarnation
        heartbeat = (building is None and batch.from_version == batch.to_version and batch.step <= tail.step
                     and not any(k.shape[0] for k in keys + deleted))
        if not batch.HasField("step") or heartbeat:
            keys, values, deleted = [], [], []  # a heartbeat, or a copy that ends between commits
            continue
        dense = (batch.dense_step, batch.dense_format, bytes(batch.dense_state)) if batch.dense_state else None
        empty = np.empty(0, dtype=np.int64)
        if building is not None:
            delta = Delta(batch.step, position, incarnation, empty, np.empty((0, follower.replica.dim), np.float32),
                          empty, replace=building, dense=dense, commit_time=batch.commit_time)
            follower.count_resync(building)
            building = None
        else:
            delta = Delta(batch.step, position, incarnation, np.concatenate(keys), np.concatenate(values),
                          np.concatenate(deleted), dense=dense, commit_time=batch.commit_time, storage=storage)
            follower.metrics.applied_rows.labels(name, str(shard)).inc(delta.keys.shape[0])
        keys, values, deleted = [], [], []
        await cut.offer(name, shard, delta)
        tail = cut.tails[(name, shard)]
