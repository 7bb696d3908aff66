"""Which Subscribe streams send heartbeats: with a SubscribeRequest.heartbeat_group, one stream per
(connection, group), the oldest open one not held; without it, every idle stream (ps.proto).

    ("ipv4:10.0.0.7:51234", group "3f9c..."): [stream t0, stream t1, ..., stream t199]
                                                ^ sends heartbeats; when it ends or is held
                                                  (waits for credit), the next in line takes over

Why: a serving replica follows every (table, shard) as a stream of its own, over one connection per
shard, and each idle stream sent a heartbeat every HEARTBEAT_SECONDS: a replica of a 200-table job
on 2 idle shards took 800 heartbeats a second, ~11% of a core, and each shard ~7% to send its 400,
growing with the number of tables. The replica reads any message on a connection as news that the
shard is alive (serving/follower.py ConnectionLink), so one stream a connection is enough. Every
stream still sends one heartbeat when it first goes idle, which tells its subscriber that it is
connected. The group is the subscriber's (several replicas in one process share a connection to
a shard, and each needs heartbeats of its own); the connection is part of the key, so that
streams of a new connection do not count on a head stream of a dead one.

Runs on the shard's event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter


@dataclass(eq=False)
class HeartbeatSeat:
    """One open stream of a heartbeat group: (its connection (the peer's address), the group), its
    table, whether it is held (out of its subscriber's credit, ps/shard/table_streams.py),
    whether it left, and whether it is in its group's line."""

    group: tuple[str, str]
    table: str
    held: bool = False
    left: bool = False
    queued: bool = False


class _Group:
    """One (connection, group)'s open streams: how many, the one that sends the heartbeats (None
    while every stream is held), and the line of those that may take over, oldest first (a seat
    held or gone since it was queued is passed over when its turn comes)."""

    def __init__(self) -> None:
        self.size = 0
        self.beater: HeartbeatSeat | None = None
        self.line: deque[HeartbeatSeat] = deque()
        self.gone = 0  # seats in line that left: dropped once they outnumber the open streams
        self.handoff: asyncio.TimerHandle | None = None  # the held beater's, due after handoff_seconds

    def queue(self, seat: HeartbeatSeat) -> None:
        if not seat.queued:
            seat.queued = True
            self.line.append(seat)


class HeartbeatRoster:
    """The streams of each (connection, heartbeat group); one of them, not held, sends the group's
    heartbeats: the oldest, until it leaves or is held, then the next in line. A held stream (its
    subscriber busy: a table ahead of a replica's consistent cut) sends nothing until given credit,
    its heartbeats included: the oldest stream sending them while held left an idle shard silent to
    the replica, which then counted every table of the shard stale. Each change is O(1) amortised
    (a replica holds hundreds of streams a shard, each held and given credit as often as a step).
    `wake(table)` wakes the streams of a table (ParameterServerServicer.notify): a stream that takes
    over the heartbeats may be waiting for its table's next change without a timer. A held beater
    hands them on only once held for `handoff_seconds` (0: at once): a replica that keeps up gives
    credit back within milliseconds, and handing them on at each exhausted window woke a stream a
    table every step for nothing (`bench follow`, 300 tables: the shards' CPU a step with a replica
    10-16% above the build without a hand-off; with the hand-off deferred, as that build's)."""

    def __init__(self, wake: Callable[[str], None], handoff_seconds: float = 0.0) -> None:
        self._wake = wake
        self._handoff_seconds = handoff_seconds
        self._groups: dict[tuple[str, str], _Group] = {}

    def join(self, peer: str, group: str, table: str) -> HeartbeatSeat:
        seat = HeartbeatSeat((peer, group), table)
        joined = self._groups.setdefault(seat.group, _Group())
        joined.size += 1
        if joined.beater is None:  # (then no one is in line) it sends them from its start: no wake
            joined.beater = seat
        else:
            joined.queue(seat)
        return seat

    def leave(self, seat: HeartbeatSeat) -> None:
        group = self._groups[seat.group]
        seat.left = True
        group.size -= 1
        if group.size == 0:
            self._cancel_handoff(group)
            del self._groups[seat.group]
            return
        if seat.queued:  # streams that come and go beside a long-lived one stay in line until dropped
            group.gone += 1
            if group.gone > group.size:
                group.line = deque(s for s in group.line if not s.left)
                group.gone = 0
        if group.beater is seat:
            self._choose(group)

    def hold(self, seat: HeartbeatSeat, held: bool) -> None:
        """`seat`'s stream waits for credit (held) or got it: a held stream hands the heartbeats to
        the next in line, which is woken to send them; one given credit queues up again."""
        if seat.held == held:
            return
        seat.held = held
        group = self._groups.get(seat.group)
        if group is None or seat.left:
            return
        if held:
            if group.beater is not seat:
                return
            if self._handoff_seconds <= 0:
                self._choose(group)
            else:
                loop = asyncio.get_running_loop()
                group.handoff = loop.call_later(self._handoff_seconds, self._hand_off, group, seat)
            return
        if group.beater is seat:  # given credit in time: it keeps them
            self._cancel_handoff(group)
            return
        group.queue(seat)
        if group.beater is None:
            self._choose(group)

    def _hand_off(self, group: _Group, seat: HeartbeatSeat) -> None:
        group.handoff = None
        if group.beater is seat and seat.held and not seat.left:
            self._choose(group)

    @staticmethod
    def _cancel_handoff(group: _Group) -> None:
        if group.handoff is not None:
            group.handoff.cancel()
            group.handoff = None

    def _choose(self, group: _Group) -> None:
        """The next in line that is neither held nor gone sends the heartbeats (woken to); none: no
        stream of the group can send until one is given credit."""
        self._cancel_handoff(group)
        while group.line:
            seat = group.line.popleft()
            seat.queued = False
            group.gone -= seat.left
            if not seat.held and not seat.left:
                if seat is not group.beater:
                    group.beater = seat
                    self._wake(seat.table)
                return
        group.beater = None

    @property
    def groups(self) -> int:
        """(connection, group) pairs with an open stream."""
        return len(self._groups)

    def beats(self, seat: HeartbeatSeat) -> bool:
        """True when `seat` is the stream that sends its group's heartbeats."""
        return self._groups[seat.group].beater is seat


class StreamHeartbeats:
    """One stream's part: whether its next idle wait ends in a heartbeat. seat None: a stream
    without a heartbeat group, which always sends them. `sent` counts them (a Prometheus counter)."""

    def __init__(self, roster: HeartbeatRoster, seat: HeartbeatSeat | None, sent: Counter) -> None:
        self._roster = roster
        self._seat = seat
        self._counter = sent
        self._sent_one = False

    def due(self) -> bool:
        return self._seat is None or not self._sent_one or self._roster.beats(self._seat)

    def sent(self) -> None:
        self._sent_one = True
        self._counter.inc()
