"""Which Subscribe streams send heartbeats: with a SubscribeRequest.heartbeat_group, one stream per
(connection, group), the oldest open one; without it, every idle stream (ps.proto).

    ("ipv4:10.0.0.7:51234", group "3f9c..."): [stream t0, stream t1, ..., stream t199]
                                                ^ sends heartbeats; when it ends or is held
                                                  (waits for credit), t1 takes over

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

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter


@dataclass(eq=False)
class HeartbeatSeat:
    """One open stream of a heartbeat group: (its connection (the peer's address), the group), its
    table, and whether it is held (waiting for its subscriber's credit, ps/shard/table_streams.py)."""

    group: tuple[str, str]
    table: str
    held: bool = False


class HeartbeatRoster:
    """The streams of each (connection, heartbeat group), oldest first; the oldest that is not held
    sends the group's heartbeats. A held stream (its subscriber busy: a table ahead of a replica's
    consistent cut) sends nothing until given credit, its heartbeats included: the oldest stream
    sending them while held left an idle shard silent to the replica, which then counted every
    table of the shard stale. `wake(table)` wakes the streams of a table
    (ParameterServerServicer.notify): a stream that takes over the heartbeats may be waiting for
    its table's next change without a timer."""

    def __init__(self, wake: Callable[[str], None]) -> None:
        self._wake = wake
        self._streams: dict[tuple[str, str], list[HeartbeatSeat]] = {}

    def join(self, peer: str, group: str, table: str) -> HeartbeatSeat:
        seat = HeartbeatSeat((peer, group), table)
        self._streams.setdefault(seat.group, []).append(seat)
        return seat

    def leave(self, seat: HeartbeatSeat) -> None:
        streams = self._streams[seat.group]
        was_beating = self._beating(streams) is seat
        streams.remove(seat)
        if not streams:
            del self._streams[seat.group]
        elif was_beating:
            self._wake(self._beating(streams).table)

    def hold(self, seat: HeartbeatSeat, held: bool) -> None:
        """`seat`'s stream waits for credit (held) or got it; the group's heartbeats move to the
        oldest stream not held, which is woken to send them."""
        streams = self._streams.get(seat.group)
        if seat.held == held or streams is None or seat not in streams:
            seat.held = held
            return
        before = self._beating(streams)
        seat.held = held
        after = self._beating(streams)
        if after is not before:
            self._wake(after.table)

    @staticmethod
    def _beating(streams: list[HeartbeatSeat]) -> HeartbeatSeat:
        """The stream of a group that sends its heartbeats: the oldest not held (all held: the oldest)."""
        return next((seat for seat in streams if not seat.held), streams[0])

    @property
    def groups(self) -> int:
        """(connection, group) pairs with an open stream."""
        return len(self._streams)

    def beats(self, seat: HeartbeatSeat) -> bool:
        """True when `seat` is the stream that sends its group's heartbeats."""
        return self._beating(self._streams[seat.group]) is seat


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
