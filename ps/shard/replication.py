"""A shard's standby, and the primary's side of it (DESIGN.md §10).

    client --Push--> primary (serialised with every table call): forward(method, request): seq n, sent
                     on the link (the rest by its sending thread if the socket is full); then applied here
                     primary --link (epoch, n, request)--> standby: its link thread applies in order, acks n
                     with its answer on the link
                     primary: settle(n) waits until the standby acked n with the primary's own answer,
                     then answers the client

The Replicate stream (gRPC) carries the handshake, a state copy and heartbeats; pushes and commits go
on the stream's link (ps/shard/replication_link.py), which the standby opens for the stream it
follows and names in its ack. A link that ends breaks its stream.

Both processes apply a push at the same time; the primary's answer and the standby's are compared
(a few bytes each: versions and counts, or the error both raised) before the client hears of it.
Commits (ps/shard/commits.py) travel the same way, in the same order, with the tables whose rows the
primary sealed, so a promoted standby holds the commit log that serving's consistent cut follows.

Roles and states of one shard process:

    STANDBY  --lease expired, record says sync, CAS epoch+1-->  ALONE (primary, no standby)
    JOINING  --standby at the same versions-->  CATCHING  --acked every push, CAS sync=true-->  SYNC
    ALONE    --a standby answers: copy the state (pushes queue)-->  COPYING  -->  CATCHING  --> SYNC
    SYNC     --stream broke / no ack for a lease time-->  LOST  --CAS standby="", sync=false--> ALONE
    any primary state --etcd says the lease is gone, or a CAS finds another epoch--> DEPOSED

A primary answers client calls only while it is primary for sure: its lease holds, or (etcd out of
reach) its standby acknowledged this epoch within a quarter lease, which it could not do had it promoted
itself. A standby that promoted itself waits a quarter lease before it answers, so the deposed primary's
last answers come before its first. A deposed primary answers nothing (UNAVAILABLE), and its standby
refuses its replication messages by epoch. A standby accepts a handshake only at the epoch etcd
records for another process as primary, and applies messages only from the stream whose handshake
it accepted last, so no stray stream moves its epoch or slips a push in. Clients retry on
UNAVAILABLE at the other address of the pair with the same push ids, so a push the old primary
applied but never acknowledged is applied once.

A primary whose standby died goes on alone only after the arbiter recorded it (sync = false, no
standby): until then its pushes wait, so a push acknowledged by one process alone can never be lost
to a promotion. An alone primary tries its partner's address every lease (`embps launch` starts a
new standby there): it streams its tables' rows while it goes on alone, each piece copied between
two pushes, then the rows written since, and at one point of its apply order the rest of its state
(each table's layout, counters and the rows written since their copy; the push-id memory), then the
pushes applied since that point, and acknowledges synchronously again; the arbiter records the
pair in sync once the standby caught up, and only then may the standby take over. Both processes
of a pair started from the same snapshot step skip the copy.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from ps import bulk_messages, wire
from ps.errors import NotPrimaryError
from ps.etcd import EtcdUnavailableError
from ps.job_config import JobConfig
from ps.process.calls import parse_error, status_of
from ps.rpc import ps_pb2, replication_pb2, replication_pb2_grpc
from ps.security import Role, open_aio_channel
from ps.shard.arbiter import Arbiter, Membership, new_lineage
from ps.shard.replication_link import KEY_BYTES, LinkRefused, PrimaryLink, StandbyLink, split_host_port
from ps.shard.state_copy import CopiedRows, TableImageReader, decode_ledger, encode_ledger, table_image_pieces
from ps.shard.update_log import UpdateLog

log = logging.getLogger("embps.ps")

_REPLICATE_METHOD = "/{}/Replicate".format(replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name)
# A forwarded push is read where it arrived (ps/bulk_messages.py).
BULK_FIELDS = {_REPLICATE_METHOD: ("request",)}
ROLE_VALUES = {"standby": 0, "joining": 1, "sync": 2, "lost": 3, "alone": 4, "deposed": 5, "copying": 6, "catching": 7}
CATCH_UP_PATIENCE_S = 60.0  # a standby loading a copied state acks nothing meanwhile
# ... and a large copy takes longer: the wait for its ack grows with its bytes at this rate, far
# below what a standby loads (2M rows of dim 64 with Adagrad, ~1 GB, in 2-3 s on this VM), so
# that a shard of tens of GB is not refused its standby by a fixed minute.
LOAD_BYTES_PER_S_FLOOR = 16 << 20
CATCH_UP_LAG_PUSHES = 64  # a catching-up standby this close: acks wait for it again (_catch_up)
CATCH_UP_ALONE_S = 30.0  # ... or once it has caught up alone this long
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# A state copy's pieces: each is copied twice on the event loop (into its message, then its
# serialisation), so pushes wait up to that long; at the message limit (64 MiB) that was two fresh
# mmaps a piece and ~0.3 s of pushes waiting each time (bench standby-join), at 4 MiB the copies
# reuse heap memory (ps/process/malloc.py) and take milliseconds.
COPY_PIECE_BYTES = 4 << 20
# A live copy (_copy) resends the rows pushes wrote since their copy, in up to COPY_ROUNDS rounds,
# until they hold at most FINAL_ROWS_BYTES: those are copied at the one point pushes wait for.
COPY_ROUNDS = 4
FINAL_ROWS_BYTES = 64 << 20
# What a standby takes of a copy's push-id memory (JSON): the ledger's bound (32 MiB by its own
# estimate, ps/shard/state.py) with room for the encoding.
MAX_LEDGER_COPY_BYTES = 256 << 20
_FRAME_SLACK = 1 << 20  # a link frame: a forwarded request (message limit + its slack) and its header
_LINK_METHODS = ("Push", "PushMulti", "Commit")


class State(enum.StrEnum):
    STANDBY = "standby"
    JOINING = "joining"  # a primary at start, waiting for its standby (refuses client calls)
    SYNC = "sync"
    LOST = "lost"  # the standby stopped answering; pushes wait until the arbiter records ALONE
    ALONE = "alone"
    DEPOSED = "deposed"
    COPYING = "copying"  # alone, sending its state to a new standby
    CATCHING = "catching"  # the new standby applies the pushes since the copy; acks wait for it


_SYNCHRONOUS = (State.SYNC, State.CATCHING)


class ReplicationMetrics:
    """embps_shard_role (0 standby, 1 joining, 2 sync, 3 lost, 4 alone, 5 deposed), epoch,
    replication lag (pushes applied here and not yet on the standby), failovers, state copied."""

    def __init__(self, registry, shard: int) -> None:
        self.shard = str(shard)
        self.role = Gauge("embps_shard_role", "Replication state: " + str(ROLE_VALUES), ["shard"], registry=registry)
        self.epoch = Gauge("embps_shard_epoch", "Epoch of the membership this process follows", ["shard"],
                           registry=registry)
        self.lag = Gauge("embps_replication_lag_pushes", "Pushes forwarded to the standby and not yet acknowledged",
                         ["shard"], registry=registry)
        self.failovers = Counter("embps_failovers", "Times this process promoted itself to primary", ["shard"],
                                 registry=registry)
        self.alone = Counter("embps_standby_lost", "Times the primary went on alone (recorded in the arbiter)",
                             ["shard"], registry=registry)
        # A large shard's copy runs for minutes: its rate shows it going, its total what rounds cost.
        self.copied = Counter("embps_state_copy_bytes", "Bytes of state this process sent to new standbys (rows, "
                              "rows written since their copy, table images, push-id memory)", ["shard"],
                              registry=registry)


class Replication:
    """The replication side of one shard process (`servicer` is its ParameterServerServicer)."""

    def __init__(self, servicer, arbiter: Arbiter, partner: str, state: State, metrics_registry) -> None:
        """partner: the other address of the shard's pair (where a primary finds its standby)."""
        self.servicer = servicer
        self.shard = servicer.shard
        self.arbiter = arbiter
        self.ttl = float(arbiter.ttl)
        self.partner = partner
        self.metrics = ReplicationMetrics(metrics_registry, self.shard.index)
        self.state = state
        self.epoch = 0
        self.lineage = ""  # of the record this process's epoch is of (ps/shard/arbiter.py)
        self.primary_address = ""  # as a standby: who feeds it
        self.serve_after = 0.0
        self.loop = asyncio.get_running_loop()
        self._sequence = 0  # last forwarded
        self._acked = 0
        self._lag = self.metrics.lag.labels(self.metrics.shard)  # _sequence - _acked; 0 with no standby
        self._last_ack = 0.0
        self._queue: collections.deque = collections.deque()
        # (sequence, answer, error) of forwarded messages: the primary's own (appended where it applied
        # them) and the standby's (from its acks), compared in sequence order on the loop.
        self._mine: collections.deque = collections.deque()
        self._theirs: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopped = False  # stop() ran: no ack will come any more (its link and tasks are gone)
        self._applied = 0  # as a standby: last applied sequence of the stream it follows
        self._followed: object | None = None  # as a standby: the stream whose handshake it accepted last
        self._promoting = False
        # As a standby: the epoch (and its lineage) at which it last read a record naming it in sync.
        self._in_sync_at: tuple[int, str] = (0, "")
        self._heard = 0.0  # as a standby: time.monotonic() of the last message of the stream it follows
        self._sure_in_sync = False  # as a standby: it ran all along since it last read itself in sync
        self._refused_epoch = 0  # as a standby: the last epoch whose older state it refused (logged once)
        self._queueing = False  # forward() queues pushes for the standby
        self._catch_up_to = 0  # CATCHING: the end of the current catch-up round (see _catch_up)
        self._catching_alone_since: float | None = None  # CATCHING: since when pushes are acked alone
        self._diverged = ""  # why the standby's answers stopped matching (breaks the stream until a copy)
        # The current stream's link (ps/shard/replication_link.py): forward() sends on it once it is
        # ready; until then (a state copy in progress) messages wait in _queue, sent first.
        self._link: PrimaryLink | None = None
        self._link_ready = False
        self._link_lock = threading.Lock()
        self._link_error = ""  # why the current link ended: the stream breaks
        self._heartbeats: collections.deque = collections.deque()  # _sequence when each unanswered heartbeat went
        self._standby_link: StandbyLink | None = None  # as a standby: the link of the stream it follows
        self._set_state(state)

    # -- both roles ------------------------------------------------------------------------

    def add_to_server(self, server) -> None:
        replication_pb2_grpc.add_ReplicationServicer_to_server(_ReplicationServicer(self), server)

    async def start(self) -> None:
        """A primary takes its membership in the arbiter (returns once it did); a standby starts
        watching the primary's lease."""
        if self.state is State.STANDBY:
            self.start_standby()
        else:
            await self.start_primary()

    def _set_state(self, state: State) -> None:
        self.state = state
        if state in (State.ALONE, State.DEPOSED):
            self._lag.set(0)  # no standby is owed a push
        self.metrics.role.labels(self.metrics.shard).set(ROLE_VALUES[state.value])
        self.metrics.epoch.labels(self.metrics.shard).set(self.epoch)
        self._changed()

    def _changed(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)

    def _task_ended(self, task: asyncio.Task) -> None:
        """A task of the pair (lease renewal, the standby's stream, the watch of the primary) that
        raised what it does not handle ended silently, and with it, say, the lease's renewals: the
        process then answered nothing, for good. It stops instead (deposed), for a restart."""
        if task.cancelled() or task.exception() is None or self._stopped:
            return
        log.critical("%s: a replication task failed", self.describe(), exc_info=task.exception())
        self._depose(f"a replication task failed: {task.exception()!r}")

    async def stop(self) -> None:
        """Ends the replication's tasks (a shard that is stopping), and with them its link: a push
        still waiting for its ack then gets NotPrimaryError at once (UNAVAILABLE: its client asks
        again with the same push id, of the pair's other process), not a wait to the server's
        grace. Then gives its key in etcd back: a standby's, or a primary's lease."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.arbiter.release_standby)  # a restart then need not wait for it to expire
        if self.state is not State.STANDBY:
            # Its link is closed and its renewals ended: from here this process acknowledges no push
            # its standby lacks (settle needs the standby's ack; alone, no standby may promote). So
            # the lease goes now, and a standby in sync takes over at once (a rolling restart, a
            # pod moved), not a lease later.
            await asyncio.to_thread(self.arbiter.release_lease)
        self.arbiter.etcd.close()
        self._changed()

    def describe(self) -> str:
        return f"shard {self.shard.index} ({self.arbiter.me}, {self.state.value}, epoch {self.epoch})"

    def check_serving(self) -> None:
        """NotPrimaryError (UNAVAILABLE) unless this process may answer client calls now."""
        state = self.state
        if state is State.STANDBY:
            raise NotPrimaryError(
                f"shard {self.shard.index}: {self.arbiter.me} is the standby (epoch {self.epoch}); the primary is "
                f"{self.primary_address or 'unknown'}"
            )
        if state is State.DEPOSED:
            raise NotPrimaryError(f"{self.describe()}: deposed (lease lost or a newer epoch); ask the other address")
        if state is State.JOINING:
            raise NotPrimaryError(f"{self.describe()}: waiting for its standby {self.partner} to join")
        now = time.monotonic()
        if now < self.serve_after:
            raise NotPrimaryError(f"{self.describe()}: promoted, answering in {self.serve_after - now:.2f} s")
        if self.arbiter.lease_valid():
            return
        if state is State.SYNC and now - self._last_ack < self.ttl / 4:
            return  # etcd out of reach, but the standby still follows this epoch: nobody promoted
        raise NotPrimaryError(f"{self.describe()}: its lease is not renewed (arbiter out of reach); not answering")

    def check_client_epoch(self, epoch: int, lineage: str | None) -> None:
        """NotPrimaryError when a client has already seen a newer epoch of this shard than this
        process's: the arbiter promoted the partner, so this process is deposed even if its own
        lease looks valid to it (a paused process, a clock that jumped). Epochs of another lineage
        say nothing of this one (a pair started over where etcd lost its record begins at 1 again:
        a client that saw epoch 3 before was refused by it for good). `lineage` "" is a record's
        without one (wire.NO_LINEAGE), another lineage than this process's if it has one; a client
        that names none (None: older than lineages), or a process of a record without one, compares
        as before lineages."""
        if epoch > self.epoch and (lineage is None or not self.lineage or lineage == self.lineage):
            raise NotPrimaryError(
                f"{self.describe()}: deposed, a client has seen epoch {epoch} of shard {self.shard.index}; "
                "ask the other address"
            )

    # -- primary -----------------------------------------------------------------------------

    async def start_primary(self) -> None:
        """Takes the shard's membership (epoch + 1, once no lease is held), then joins the standby.
        When the partner holds the lease and keeps renewing it (it took over while this process was
        down: a restarted pod), this process becomes its standby instead."""
        partner_alive_since = None
        waiting_for_partner = False
        while True:
            try:
                membership, revision = await asyncio.to_thread(self.arbiter.read)
                if membership is not None and await asyncio.to_thread(self.arbiter.claim_unanswered, membership):
                    epoch, lineage = membership.epoch, membership.lineage  # the take below committed, its answer lost
                    break
                if await asyncio.to_thread(self.arbiter.leader_alive):
                    # An earlier run's lease expires within a lease; a live primary's stays.
                    if membership is not None and membership.primary == self.partner:
                        partner_alive_since = partner_alive_since or time.monotonic()
                        if time.monotonic() - partner_alive_since > 2 * self.ttl:
                            log.warning("shard %d: %s is primary (epoch %d) and alive: starting as its standby",
                                        self.shard.index, self.partner, membership.epoch)
                            self._set_state(State.STANDBY)
                            self.start_standby()
                            return
                    await asyncio.sleep(self.ttl / 4)
                    continue
                partner_alive_since = None
                epoch = (membership.epoch if membership else 0) + 1
                lineage = membership.lineage if membership else new_lineage()
                mine = Membership(self.arbiter.me, self.partner, epoch, False, lineage)
                # The record says the partner holds every acknowledged push: only it may take the
                # shard while its standby key lives (it promotes, and this process becomes its standby).
                # No record while a standby's key lives: etcd lost its data under a running pair, and
                # that standby, not this process, holds what was acknowledged.
                partner_in_sync = membership is not None and membership.sync and membership.standby == self.partner
                standby_waits = False
                if partner_in_sync or membership is None:
                    key = await asyncio.to_thread(self.arbiter.standby_held)
                    # With a record that says so, any key of the standby; with none, one that says in sync.
                    standby_waits = key is not None and (partner_in_sync or key.get("in_sync") is True)
                if not standby_waits and await asyncio.to_thread(
                    self.arbiter.take_primary, revision, mine, partner_in_sync
                ):
                    if partner_in_sync and waiting_for_partner:  # its key was alive, then expired
                        log.error(
                            "shard %d: took the shard over %s, the standby in sync at epoch %d, whose lease "
                            "expired (stopped, or out of reach): the pushes it acknowledged after this "
                            "process's state was saved are not on this process", self.shard.index, self.partner,
                            membership.epoch,
                        )
                    elif partner_in_sync:  # a whole-job restart (both stopped, one snapshot), or worse
                        log.warning("shard %d: took the shard; the record named %s the standby in sync at epoch "
                                    "%d, which holds no key (stopped, or out of reach: one that holds pushes this "
                                    "process lacks refuses to follow it)", self.shard.index, self.partner,
                                    membership.epoch)
                    break
                if standby_waits and not waiting_for_partner:
                    waiting_for_partner = True
                    held = f"in sync (epoch {membership.epoch})" if membership is not None else "(no record in etcd)"
                    log.warning("shard %d: %s is the standby %s and alive: waiting for it to take over, to follow "
                                "it", self.shard.index, self.partner, held)
                await asyncio.sleep(self.ttl / 4)  # a take lost, or a standby's key: look again (no spin on etcd)
            except EtcdUnavailableError as exc:
                log.warning("shard %d: arbiter unreachable at start (%s); retrying", self.shard.index, exc)
                await asyncio.sleep(self.ttl / 4)
        self.epoch, self.lineage = epoch, lineage
        log.info("%s: primary (membership taken in the arbiter)", self.describe())
        self._set_state(State.JOINING)
        self._spawn(self._keep_lease())
        self._spawn(self._follow_standby())

    async def _keep_lease(self) -> None:
        warned = False
        while self.state is not State.DEPOSED:
            await asyncio.sleep(self.ttl / 4)
            try:
                await asyncio.to_thread(self.arbiter.keepalive)
                warned = False
            except EtcdUnavailableError as exc:
                if not warned:
                    log.warning("%s: arbiter out of reach (%s); answering while the standby follows", self.describe(),
                                exc)
                    warned = True
            if self.arbiter.lost:
                self._depose("etcd says its lease expired")

    def _depose(self, why: str) -> None:
        """Answers nothing from now on, and stops the process (SIGTERM: drain, exit 0) a lease
        later: `embps launch` starts a new standby in its place, a restarted pod becomes one."""
        if self.state is not State.DEPOSED:
            self._queueing = False
            log.error("%s: deposed: %s; acknowledging nothing from now on, stopping", self.describe(), why)
            self._set_state(State.DEPOSED)
            self.loop.call_later(self.ttl, os.kill, os.getpid(), signal.SIGTERM)

    async def _follow_standby(self) -> None:
        """Joins the partner (copying the state over when it is elsewhere), streams the pushes and
        reads the acks; when the stream breaks, records the primary alone in the arbiter (if the
        standby counted), and tries the partner again a lease later: `embps launch` restarts it."""
        while self.state is not State.DEPOSED:
            # The job's TLS (a client certificate under mutual TLS) and the shards' own token, which
            # the standby's port takes for Replication and no worker holds.
            channel = open_aio_channel(self.partner, self.shard.job.security, Role.SHARD, _CHANNEL_OPTIONS)
            refused = False
            try:
                await self._stream(channel)
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, the standby is out
                if self.state in (State.SYNC, State.CATCHING, State.COPYING):
                    log.warning("%s: standby %s lost (%s)", self.describe(), self.partner, _short(exc))
                refused = isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                if refused and self.state is State.JOINING:
                    # A standby that holds pushes this process lacks (_hello): no copy either way.
                    # It stays so until an operator chooses (docs/reliability.md); asked a lease apart.
                    log.error("%s: standby %s refuses to follow: %s", self.describe(), self.partner, _short(exc))
            finally:
                await channel.close()
            await self.servicer.run_call(self._stop_tracking, 0)  # a copy broken off marks no more rows
            self._queueing = False
            self._queue.clear()
            if self.state is State.SYNC:
                await self._go_alone()
            elif self.state in (State.CATCHING, State.COPYING):
                self._set_state(State.ALONE)  # the arbiter still says alone
            if self.state is State.JOINING and not refused:
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(self.ttl)

    async def _stream(self, channel) -> None:
        """One stream to the partner: handshake, state copy when needed, then pushes until it breaks.
        Its messages go as bytes: pushes are serialised where they are forwarded, off the loop."""
        call = channel.stream_stream(
            _REPLICATE_METHOD, request_serializer=None, response_deserializer=replication_pb2.ReplicateAck.FromString
        )()
        try:
            versions = [replication_pb2.TableVersion(table=n, version=t.version) for n, t in self.shard.tables.items()]
            hello = replication_pb2.ReplicateRequest(
                epoch=self.epoch, sequence=self._sequence, incarnation=self.shard.incarnation, shard=self.shard.index,
                versions=versions, lineage=self.lineage or "", primary=self.arbiter.me,
            )
            await call.write(hello.SerializeToString())
            async with asyncio.timeout(2 * self.ttl):  # not wait_for: tests/test_cancellation.py
                ack = await call.read()
            if ack is grpc.aio.EOF:
                raise ConnectionError("the standby ended the stream")
            self._last_ack = time.monotonic()
            copied = not (self.state is State.JOINING and not ack.needs_copy)
            if not copied:
                self._acked = self._sequence
                self._lag.set(0)
                self._mine.clear()
                self._theirs.clear()
                self._queueing = True  # nothing was applied since the handshake: JOINING refuses pushes
            else:
                ack = await self._copy(call)
            # Pushes up to here may have been acknowledged alone. After a copy they go on being so
            # while the standby works through the pushes queued meanwhile (_catch_up).
            self._catch_up_to = self._sequence
            self._catching_alone_since = time.monotonic() if copied else None
            self._set_state(State.CATCHING)
            await self._open_link(ack)
            reader = asyncio.ensure_future(self._read_heartbeat_acks(call))
            reader.add_done_callback(lambda _: self._wake.set())
            try:
                await self._send(call, reader)
            finally:
                reader.cancel()
        finally:
            self._close_link()
            call.cancel()

    async def _open_link(self, ack) -> None:
        """Connects the link the standby offered in `ack`, sends the messages queued meanwhile on
        it, and from then on forward() sends there (ps/shard/replication_link.py)."""
        if not ack.link_port or len(ack.link_key) != KEY_BYTES:
            raise ConnectionError("the standby offered no replication link (an older embps?); it cannot follow")
        limit = self.shard.job.message_limit_bytes + _FRAME_SLACK
        link = await asyncio.to_thread(
            PrimaryLink, self.partner, ack.link_port, ack.link_key, self.shard.job.security, limit, self.ttl
        )
        self._link, self._link_error = link, ""
        link.start(self.loop, functools.partial(self._link_ack, link), functools.partial(self._link_ended, link))
        with self._link_lock:
            while self._queue:
                link.send(*self._queue.popleft()[1])
            self._link_ready = True

    def _close_link(self) -> None:
        with self._link_lock:
            link, self._link, self._link_ready = self._link, None, False
        if link is not None:
            link.close()

    def _link_ack(self, link: PrimaryLink, frame: bytearray) -> None:
        """An ack read on the link (on the loop)."""
        if link is not self._link:
            return  # a link closed since
        try:
            ack = replication_pb2.ReplicateAck.FromString(bytes(frame))
        except DecodeError as exc:
            raise LinkRefused(f"an ack that does not parse: {exc}") from exc
        self._last_ack = time.monotonic()
        self._theirs.append((ack.sequence, ack.answer, ack.error))
        self._compare()
        if self.state is State.CATCHING and self._acked >= self._catch_up_to:
            self._wake.set()  # the sender records the pair in sync

    def _link_ended(self, link: PrimaryLink, why: str) -> None:
        """On the loop, or on the link's sending thread."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._on_link_end, link, why)

    def _on_link_end(self, link: PrimaryLink, why: str) -> None:
        if link is self._link and not self._link_error:
            self._link_error = f"replication link: {why}"
            self._wake.set()

    async def _copy(self, call):
        """Sends the state while pushes go on, acknowledged alone (a live copy, as a virtual machine
        migrates): each table's rows in pieces of COPY_PIECE_BYTES, each copied between two pushes,
        while the table marks the rows pushes write; then those rows again, in rounds, until what
        they hold fits FINAL_ROWS_BYTES (or COPY_ROUNDS passed); then, at one point of the apply
        order (_capture), each table's image with the rows written since their copy (beside them
        its keys, free rows, pending keys, cursors and sampler: ~16 bytes a row) and the push-id
        memory. Pushes after that point queue for the standby. So beside its tables the primary
        holds a piece and that image, not a copy of every table (bench standby-join). Returns the
        standby's ack of the copy (which offers the link)."""
        tables = self.shard.tables
        budget = min(self.shard.job.message_limit_bytes, COPY_PIECE_BYTES)
        self._set_state(State.COPYING)
        log.info("%s: copying its state to the standby %s while it goes on alone", self.describe(), self.partner)
        copied = 0
        spans = {}  # table -> the rows handed out when its copy began: later rounds resend only those
        for name, table in tables.items():
            spans[name] = await self.servicer.run_call(table.track_written_rows, 0)
            per = _rows_per_piece(table, budget)
            for first in range(0, spans[name], per):
                rows = np.arange(first, min(first + per, spans[name]), dtype=np.int64)
                copied += await self._send_rows(call, name, table, rows)
        for round_number in range(1, COPY_ROUNDS + 1):
            written = await self.servicer.run_call(
                lambda: sum(t.num_written_rows() * t.width * 4 for t in tables.values()), 0
            )
            if written <= FINAL_ROWS_BYTES:
                break
            log.info("%s: copy round %d: %.1f MiB of rows written since their copy, sent again", self.describe(),
                     round_number, written / 2**20)
            taken = await self.servicer.run_call(
                lambda: {n: t.take_written_rows(below=spans[n]) for n, t in tables.items()}, 0
            )
            for name, rows in taken.items():
                per = _rows_per_piece(tables[name], budget)
                for first in range(0, rows.shape[0], per):
                    copied += await self._send_rows(call, name, tables[name], rows[first : first + per])
            del taken
        base, states, ledger = await self.servicer.run_call(self._capture, 1 << 30)
        log.info("%s: rows sent (%.1f MiB); the rest of the state is taken at push %d", self.describe(),
                 copied / 2**20, base)
        while states:
            # Each table's image is let go once sent: the copy holds the tables not sent yet, and
            # its pieces are views of their arrays (state_copy.py), each copied into its message.
            name, state = next(iter(states.items()))
            del states[name]
            pieces = table_image_pieces(state, budget)
            del state
            for i, piece in enumerate(pieces):
                await call.write(replication_pb2.ReplicateRequest(
                    epoch=self.epoch, method="TableState", table=name, state=bytes(piece), last=i == len(pieces) - 1,
                ).SerializeToString())
                copied += len(piece)
                self.metrics.copied.labels(self.metrics.shard).inc(len(piece))
            del pieces, piece  # the last piece views an array too
        # The push-id memory in pieces too: as one message it outgrew a small message limit (a job's
        # many remembered PushMulti answers) and the standby refused every copy.
        for i in range(0, max(len(ledger), 1), budget):
            await call.write(replication_pb2.ReplicateRequest(
                epoch=self.epoch, method="Ledger", state=ledger[i : i + budget], last=i + budget >= len(ledger),
            ).SerializeToString())
            self.metrics.copied.labels(self.metrics.shard).inc(len(ledger[i : i + budget]))
        await call.write(replication_pb2.ReplicateRequest(
            epoch=self.epoch, method="StateDone", sequence=base, incarnation=self.shard.incarnation,
        ).SerializeToString())
        log.info("%s: state sent (%.1f MiB of tables, %.1f KiB of push ids); waiting for the standby to load it",
                 self.describe(), copied / 2**20, len(ledger) / 2**10)
        # The copy counts once the standby loaded it (its ack of StateDone, the only ack it sends for
        # the copy), not once it was written here: with no push since the capture, the pair would
        # otherwise be recorded in sync while the standby still holds nothing.
        patience = max(self.ttl, CATCH_UP_PATIENCE_S, (copied + len(ledger)) / LOAD_BYTES_PER_S_FLOOR)
        async with asyncio.timeout(patience):  # not wait_for: tests/test_cancellation.py
            ack = await call.read()
        if ack is grpc.aio.EOF:
            raise ConnectionError("the standby ended the stream while loading the copy")
        if ack.sequence != base:
            raise ConnectionError(f"the standby acknowledged the copy at push {ack.sequence}, not {base}")
        self._acked = base
        self._lag.set(self._sequence - base)
        self._last_ack = time.monotonic()
        log.info("%s: the standby loaded the copy; it catches up on the pushes since", self.describe())
        return ack

    async def _send_rows(self, call, name: str, table, rows: np.ndarray) -> int:
        """One "TableRows" message: the words of `rows`, copied between two pushes. Returns its bytes."""
        words = await self.servicer.run_call(functools.partial(table.copy_rows, rows), rows.shape[0] * table.width * 4)
        await call.write(replication_pb2.ReplicateRequest(
            epoch=self.epoch, method="TableRows", table=name, rows=rows.astype("<i8").tobytes(),
            state=words.tobytes(),
        ).SerializeToString())
        self.metrics.copied.labels(self.metrics.shard).inc(words.nbytes)
        return words.nbytes

    def _capture(self):
        """(sequence, {table: TableImage with the rows written since their copy}, ledger) at this
        point of the apply order (serialised with every push); every push from here on is queued
        for the standby, and the tables stop marking rows."""
        self._queue.clear()
        self._mine.clear()
        self._theirs.clear()
        self._diverged = ""
        self._queueing = True
        states = {}
        for name, table in self.shard.tables.items():
            states[name] = table.image(table.take_written_rows())
            table.stop_tracking_written_rows()
        return self._sequence, states, encode_ledger(self.shard.ledger.export())

    def _stop_tracking(self) -> None:
        for table in self.shard.tables.values():
            table.stop_tracking_written_rows()

    async def _send(self, call, reader: asyncio.Future) -> None:
        heartbeat = replication_pb2.ReplicateRequest(epoch=self.epoch, sequence=0, shard=self.shard.index)
        heartbeat = heartbeat.SerializeToString()
        self._heartbeats.clear()
        while self.state in (State.SYNC, State.CATCHING) and not reader.done():
            if self._diverged:
                raise DivergedError(self._diverged)
            if self._link_error:
                raise ConnectionError(self._link_error)
            try:
                async with asyncio.timeout(self.ttl / 8):
                    await self._wake.wait()  # the link ended, the standby caught up, or the reader ended
            except TimeoutError:
                pass
            woken = self._wake.is_set()
            self._wake.clear()
            if not woken and not reader.done():
                # The standby still hears this epoch; its ack renews _last_ack if it holds every
                # message sent before this heartbeat (_read_heartbeat_acks).
                self._heartbeats.append(self._sequence)
                await call.write(heartbeat)
            patience = self.ttl if self.state is State.SYNC else max(self.ttl, CATCH_UP_PATIENCE_S)
            if self._acked < self._sequence and time.monotonic() - self._last_ack > patience:
                raise TimeoutError(f"no ack from the standby for {patience:g} s")
            await self._catch_up()
        if reader.done() and reader.exception() is not None:
            raise reader.exception()

    async def _catch_up(self) -> None:
        """Ends each catch-up round the standby completed. A standby that loaded a copy first applies
        the pushes queued while the copy went (seconds of them for a large shard); pushes are acked
        alone meanwhile, as the arbiter records the primary alone, so they do not wait for that
        backlog. Each round ends at the push forwarded last when it began; once the standby is within
        CATCH_UP_LAG_PUSHES of the primary (or has caught up alone for CATCH_UP_ALONE_S: a standby
        slower than the pushes), acks wait for it again, and once it acked the push forwarded at that
        switch, it holds every acknowledged push: the pair is recorded in sync."""
        while self.state is State.CATCHING and self._acked >= self._catch_up_to:
            if self._catching_alone_since is None:
                await self._record_sync()
                return
            if (self._sequence - self._acked <= CATCH_UP_LAG_PUSHES
                    or time.monotonic() - self._catching_alone_since > CATCH_UP_ALONE_S):
                self._catching_alone_since = None  # settle() waits for the standby from here on
            self._catch_up_to = self._sequence

    async def _record_sync(self) -> None:
        """The standby holds every push: from now on it may take over (CAS sync = true)."""
        while self.state is State.CATCHING:
            try:
                membership, revision = await asyncio.to_thread(self.arbiter.read)
                if not self._records_me(membership):
                    self._depose(f"the arbiter's record changed: {membership}")
                    return
                synced = Membership(self.arbiter.me, self.partner, self.epoch, True, self.lineage)
                if await asyncio.to_thread(self.arbiter.update, revision, synced):
                    self._set_state(State.SYNC)  # before the line: who reads "joined" finds the role gauge at sync
                    log.info("%s: standby %s joined; pushes are acknowledged once on both", self.describe(),
                             self.partner)
                    return
            except EtcdUnavailableError:
                await asyncio.sleep(0.1)

    async def _read_heartbeat_acks(self, call) -> None:
        """The stream's acks once the link carries the messages: one per heartbeat, in order, with
        the last sequence the standby applied. A standby that holds every message sent before the
        heartbeat is alive and up to date at this epoch (_last_ack); one that is behind shows it is
        alive only by the link's acks, so a standby stuck on a message is found out after `patience`."""
        while (ack := await call.read()) is not grpc.aio.EOF:
            sent_up_to = self._heartbeats.popleft() if self._heartbeats else 0
            if ack.sequence >= sent_up_to:
                self._last_ack = time.monotonic()
        raise ConnectionError("the standby ended the stream")

    def _compare(self) -> None:
        """Advances _acked over the messages both processes answered, in sequence order, each with
        the same answer (on the loop). A different answer means the standby no longer holds the
        primary's state: the stream breaks (the primary records itself alone, and a standby that
        joins again gets a copy of the state)."""
        mine, theirs = self._mine, self._theirs
        acked = self._acked
        while mine and theirs and not self._diverged:
            if mine[0][0] < theirs[0][0]:
                mine.popleft()  # forwarded on a stream that broke before the standby got it
                continue
            if theirs[0][0] < mine[0][0]:
                theirs.popleft()  # applied by the standby before the primary's answers were kept (a copy)
                continue
            sequence, answer, error = mine.popleft()
            _, their_answer, their_error = theirs.popleft()
            if (answer, error) != (their_answer, their_error):
                self._diverged = (
                    f"message {sequence}: the standby answered {their_answer!r} {their_error!r}, "
                    f"the primary {answer!r} {error!r}"
                )
                log.error("%s: the standby diverged: %s", self.describe(), self._diverged)
                self._wake.set()  # the sender breaks the stream
                break
            acked = sequence
        if acked > self._acked:
            self._acked = acked
            self._lag.set(self._sequence - acked)
            self._changed()

    def _records_me(self, membership: Membership | None) -> bool:
        """Whether the record still names this process primary, at its epoch of its lineage."""
        return membership is not None and membership.primary == self.arbiter.me and (
            (membership.epoch, membership.lineage) == (self.epoch, self.lineage)
        )

    async def _go_alone(self) -> None:
        """Records in the arbiter that the standby is out (CAS), then acknowledges alone."""
        self._set_state(State.LOST)
        while self.state is State.LOST:
            try:
                membership, revision = await asyncio.to_thread(self.arbiter.read)
                if not self._records_me(membership):
                    self._depose(f"the arbiter's record changed: {membership}")
                    return
                alone = Membership(self.arbiter.me, "", self.epoch, False, self.lineage)
                if await asyncio.to_thread(self.arbiter.update, revision, alone):
                    log.warning(
                        "%s: standby %s lost; going on ALONE (recorded in the arbiter; pushes are on one process "
                        "until a standby joins)", self.describe(), self.partner,
                    )
                    self.metrics.alone.labels(self.metrics.shard).inc()
                    self._set_state(State.ALONE)
                    return
            except EtcdUnavailableError:
                pass
            await asyncio.sleep(0.1)  # the arbiter is out of reach: pushes wait

    @property
    def sequence(self) -> int:
        """The last message forwarded (read where table calls are serialised)."""
        return self._sequence

    def forward(self, method: str, request, sealed_tables: tuple[str, ...] = ()) -> int:
        """Queues a push or commit for the standby BEFORE this process applies it, in apply order
        (called where it is about to be applied, serialised with every table call, on the loop or
        the tables thread); returns its sequence (0: not forwarded). The caller reports its own
        answer with answered() once applied."""
        if not self._queueing:
            return 0
        self._sequence += 1
        sequence = self._sequence
        self._lag.set(sequence - self._acked)  # read beside the loop's acks: a gauge, not a decision
        # The request as it arrived (a push parsed by ps/bulk_messages.py keeps its bytes), copied
        # once, into the message.
        header = replication_pb2.ReplicateRequest(
            epoch=self.epoch, sequence=sequence, method=method, sealed_tables=sealed_tables
        )
        message = bulk_messages.encode_parts(header, request=request.SerializeToString())  # sent as they are
        with self._link_lock:
            if self._link_ready:
                self._link.send(*message)  # what the socket takes now, the rest by the link's thread: never blocks
            else:
                self._queue.append((sequence, message))  # until the link opens (a state copy in progress)
        return sequence

    def answered(self, sequence: int, answer: bytes = b"", error: str = "") -> None:
        """This process's answer to forwarded message `sequence` (where it was applied, in order)."""
        self._mine.append((sequence, answer, error))

    async def settle(self, target: int) -> None:
        """Returns once every message forwarded up to `target` is on the standby with the same answer
        (or the arbiter records this shard alone); NotPrimaryError if this process may no longer
        acknowledge."""
        while True:
            state = self.state
            if state in (State.DEPOSED, State.STANDBY, State.JOINING):
                self.check_serving()
            if state in _SYNCHRONOUS and self._acked < target and self._mine and self._theirs:
                self._compare()
            alone = state in (State.ALONE, State.COPYING) or (
                state is State.CATCHING and self._catching_alone_since is not None
            )
            if alone or (state in _SYNCHRONOUS and self._acked >= target):
                self.check_serving()
                return
            if state is State.LOST and not self.arbiter.lease_valid():
                self.check_serving()  # cut off from the standby and the arbiter: it may have promoted
            if self._stopped:
                raise NotPrimaryError(
                    f"{self.describe()}: shutting down before the standby acknowledged this call; ask again"
                )
            progress = self._progress
            try:
                async with asyncio.timeout(self.ttl / 4):
                    await progress.wait()
            except TimeoutError:
                continue

    # -- standby -----------------------------------------------------------------------------

    def start_standby(self) -> None:
        self._spawn(self._watch_primary())
        self._spawn(self._hold_standby_key())

    def _in_sync_now(self) -> bool:
        """As a standby: the record at its epoch was last read naming it in sync, this process ran
        all along since, and its primary was heard from within half a lease (a standby paused or
        cut off since may have missed the primary going on alone, pushes it acknowledged alone
        included)."""
        return (self._in_sync_at == (self.epoch, self.lineage) and self._sure_in_sync
                and time.monotonic() - self._heard < self.ttl / 2)

    async def _hold_standby_key(self) -> None:
        """While this standby follows a primary, the arbiter's standby key says so under a lease of
        its own (Arbiter.hold_standby): a primary restarted in the partner's place then cannot take
        a record whose `sync` names this process (start_primary), which holds every acknowledged
        push. Released when it stops being a standby (a promotion: the record then names no one)."""
        held: tuple[int, bool] | None = None  # what the key says (epoch, in sync); None: not held
        while self.state is State.STANDBY and not self._stopped:
            try:
                says = (self.epoch, self._in_sync_now())
                if self.epoch and held != says:
                    await asyncio.to_thread(self.arbiter.hold_standby, *says)
                    held = says
                elif held and not await asyncio.to_thread(self.arbiter.keep_standby):
                    held = None  # it expired (etcd out of reach for a lease): put again at once
                    continue
            except EtcdUnavailableError:
                pass  # held as long as etcd keeps the lease; the next look tries again
            await asyncio.sleep(self.ttl / 4)
        await asyncio.to_thread(self.arbiter.release_standby)

    async def replicate(self, requests: AsyncIterator, context: grpc.aio.ServicerContext):
        """The standby's side of the stream: handshake (and state copy), then the link, on which each
        push is applied in order and acked (_link_frame), and heartbeats on the stream. Only the
        stream whose handshake this process accepted last applies anything (`_followed`): a stream
        that skipped it, or one a newer handshake superseded (the primary reconnected while its old
        stream lingered), is refused FAILED_PRECONDITION, on the stream and on its link."""
        stream = _Stream()
        try:
            async for ack in self._replicate(stream, requests, context):
                yield ack
        finally:
            if stream.link is not None:
                stream.link.close()

    async def _replicate(self, stream: _Stream, requests: AsyncIterator, context: grpc.aio.ServicerContext):
        copy_epoch = None  # this stream's handshake asked for a state copy, at this epoch
        copy: dict[str, TableImageReader] = {}
        states: dict = {}
        rows: dict[str, CopiedRows] = {}  # the rows of each table sent before its image
        ledger = bytearray()  # the pieces of the push-id memory so far
        async for message in requests:
            if (error := parse_error(message)) is not None:
                raise error
            # A handshake's epoch compares with this process's in _check_handshake_epoch, once the
            # record tells its lineage: here a primary of a pair started over where etcd lost its
            # record (epoch 1 again) was refused for good by a standby left at a later epoch of the
            # lost record, before the rule of _hello (refuse it only if in sync, else copy) could run.
            handshake = not message.method and bool(message.incarnation)
            if self.state is not State.STANDBY or self._promoting or (
                not handshake and self._past(stream, message.epoch, copy_epoch is not None)
            ):
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.describe()}: refuses epoch {message.epoch} (this process is past it)",
                )
            if self._followed is stream:
                self._heard = time.monotonic()
            if not message.method:
                if message.incarnation:
                    stream.lineage = await self._check_handshake_epoch(message, context)
                    ack = await self._hello(message, context, stream.lineage)
                    # A copy follows when the standby asked for one, or when the primary went on
                    # alone meanwhile (it may hold what the versions do not show: a commit).
                    copy_epoch = message.epoch
                    copy.clear()  # what an earlier copy on this stream left half-sent is not this one's
                    states.clear()
                    rows.clear()
                    ledger.clear()
                    if not ack.needs_copy:
                        self._followed = stream
                        await self._listen_link(stream, ack)
                    yield ack
                else:
                    if stream.link_failure:
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                            f"{self.describe()}: replication link {stream.link_failure}")
                    yield replication_pb2.ReplicateAck(sequence=self._applied, epoch=self.epoch)
                continue
            if message.method in ("TableRows", "TableState", "Ledger", "StateDone"):
                if copy_epoch is None or message.epoch != copy_epoch:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{self.describe()}: {message.method} without an accepted handshake on this stream",
                    )
            if message.method == "TableRows":
                table = self.shard.tables.get(message.table)
                if table is None:
                    raise ValueError(f"state copy: rows of table {message.table!r}, which this shard does not hold")
                if message.table not in rows:
                    rows[message.table] = CopiedRows(table.new_row_store())
                rows[message.table].add(message.rows, message.state)  # a copy of at most the message limit
                continue
            if message.method == "TableState":
                reader = copy.get(message.table)
                if reader is None:  # a table's first piece is its header, which allocates its arrays
                    copy[message.table] = reader = await asyncio.to_thread(TableImageReader, message.state)
                else:
                    reader.add(message.state)  # a copy of at most the message limit into them
                if message.last:
                    states[message.table] = copy.pop(message.table).finish()
                continue
            if message.method == "Ledger":
                if len(ledger) + len(message.state) > MAX_LEDGER_COPY_BYTES:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"state copy: a push-id memory over {MAX_LEDGER_COPY_BYTES:,} bytes")
                ledger += message.state
                continue
            if message.method == "StateDone":
                await self.servicer.run_call(functools.partial(self._load_copy, states, rows, bytes(ledger)), 1 << 30)
                self._follow(message, context, "state copied", stream.lineage)
                self._followed, copy_epoch, states, rows, ledger = stream, None, {}, {}, bytearray()
                ack = replication_pb2.ReplicateAck(sequence=self._applied, epoch=self.epoch)
                await self._listen_link(stream, ack)
                yield ack
                continue
            if self._followed is not stream:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.describe()}: {message.method} on a stream it does not follow (no handshake, or a newer "
                    "stream's took over)",
                )
            if message.sequence != self._applied + 1:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.describe()}: message {message.sequence} after {self._applied}: a gap",
                )
            answer, error = await self.servicer.run_call(lambda m=message: self._apply(m), message.ByteSize())
            self._applied = message.sequence
            yield replication_pb2.ReplicateAck(sequence=self._applied, epoch=self.epoch, answer=answer, error=error)

    def _past(self, stream: _Stream, epoch: int, copying: bool) -> bool:
        """Whether this standby is past a message of `stream` at `epoch`. Epochs compare within one
        lineage: a stream whose handshake was accepted for another lineage than this process's is
        past unless its state copy is under way (once loaded, this process takes its lineage)."""
        if stream.lineage is None or stream.lineage == self.lineage:
            return epoch < self.epoch
        return not copying

    async def _listen_link(self, stream: _Stream, ack) -> None:
        """Opens the link of the stream this standby now follows and names it in `ack` (its port and
        key); the link of a stream it followed before closes."""
        for old in (stream.link, self._standby_link):
            if old is not None:
                old.close()
        host, _ = split_host_port(self.arbiter.me)
        limit = self.shard.job.message_limit_bytes + _FRAME_SLACK
        # The TLS files are read here: off the loop.
        link = await asyncio.to_thread(StandbyLink, host, self.shard.job.security, limit, 2 * self.ttl)
        stream.link, stream.link_failure, self._standby_link = link, "", link
        link.start(functools.partial(self._link_frame, stream), functools.partial(self._link_failed, stream, link))
        ack.link_port, ack.link_key = link.port, link.key

    def _link_failed(self, stream: _Stream, link: StandbyLink, why: str) -> None:
        """A link of `stream` ended (its thread): if it is still the stream's, the stream ends at
        its next heartbeat."""
        if stream.link is link:
            stream.link_failure = why
            log.warning("%s: replication link ended: %s", self.describe(), why)

    def _link_frame(self, stream: _Stream, frame: bytearray) -> bytes:
        """A message read on the link of `stream`, applied on the link's thread (serialised with
        every table call: run_blocking) in order; returns its ack. LinkRefused closes the link."""
        try:
            message = bulk_messages.parse(replication_pb2.ReplicateRequest, frame, ("request",))
        except DecodeError as exc:
            raise LinkRefused(f"a message that does not parse ({exc})") from exc
        if message.method not in _LINK_METHODS:
            raise LinkRefused(f"method {message.method!r}: only {', '.join(_LINK_METHODS)} travel on the link")
        if self.state is not State.STANDBY or self._promoting or message.epoch != self.epoch:
            raise LinkRefused(f"{self.describe()}: refuses epoch {message.epoch}")
        if self._followed is not stream:
            raise LinkRefused(f"{self.describe()}: its stream is no longer the one it follows")
        if message.sequence != self._applied + 1:
            raise LinkRefused(f"{self.describe()}: message {message.sequence} after {self._applied}: a gap")
        answer, error = self.servicer.run_blocking(functools.partial(self._apply, message))
        self._applied = message.sequence
        self._heard = time.monotonic()
        return replication_pb2.ReplicateAck(
            sequence=message.sequence, epoch=self.epoch, answer=answer, error=error
        ).SerializeToString()

    async def _check_handshake_epoch(self, hello, context) -> str:
        """Aborts unless the arbiter records another process as primary at the handshake's epoch: a
        standby follows only the primary etcd chose, so a stray handshake cannot move its epoch.
        Aborts too at an epoch below this process's of the same lineage (of another, the epochs say
        nothing of each other). The record's lineage, which the standby takes with the epoch."""
        try:
            membership, _ = await asyncio.to_thread(self.arbiter.read)
        except EtcdUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.describe()}: arbiter out of reach ({exc})")
        if membership is None or membership.epoch != hello.epoch or membership.primary == self.arbiter.me:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.describe()}: a handshake at epoch {hello.epoch}, the arbiter records {membership}",
            )
        # The epoch's number alone: a primary of a record etcd lost (another lineage) at the same
        # number, or any other process claiming it, passed for the recorded one until its lease ran
        # out, and a stream at the recorded versions took this standby from its real primary.
        # (Empty fields: a primary from before they were sent.)
        if (hello.primary and hello.primary != membership.primary) or (
            hello.lineage and hello.lineage != membership.lineage
        ):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.describe()}: a handshake from {hello.primary or '?'} of lineage {hello.lineage or '?'} at "
                f"epoch {hello.epoch}, the arbiter records {membership}",
            )
        if membership.lineage == self.lineage and hello.epoch < self.epoch:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.describe()}: refuses epoch {hello.epoch} (this process is past it)",
            )
        return membership.lineage

    async def _hello(self, hello, context, lineage: str) -> replication_pb2.ReplicateAck:
        mine = {n: t.version for n, t in self.shard.tables.items()}
        theirs = {v.table: v.version for v in hello.versions}
        behind = sorted(n for n, v in mine.items() if theirs.get(n, 0) < v)
        if self.epoch and self._in_sync_at == (self.epoch, self.lineage) and behind:
            # This process was the standby in sync (it held every acknowledged push), and a primary
            # lacks changes it applied: another history (a primary restarted while this standby was
            # out of the arbiter's reach, or after etcd lost its data and epochs began again). A copy
            # would put the older state over acknowledged pushes; this refuses it. (A standby that
            # was not in sync holds nothing acknowledged that its primary lacks: it takes the copy.)
            if self._refused_epoch != hello.epoch:
                self._refused_epoch = hello.epoch
                log.critical("%s: a primary at epoch %d is behind this process's tables (%s at %s, its %s); "
                             "refusing its state copy", self.describe(), hello.epoch, ", ".join(behind), mine,
                             theirs)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.describe()}: tables {', '.join(behind)} of the primary at epoch {hello.epoch} are behind "
                "this standby's, which holds pushes acknowledged at its epoch: not copying an older state over them",
            )
        if mine != theirs:
            log.info("%s: tables at versions %s, the primary's at %s: asking for a copy", self.describe(), mine,
                     theirs)
            return replication_pb2.ReplicateAck(sequence=0, epoch=hello.epoch, needs_copy=True)
        self._follow(hello, context, "same versions", lineage)
        return replication_pb2.ReplicateAck(sequence=self._applied, epoch=self.epoch)

    def _follow(self, message, context, how: str, lineage: str) -> None:
        # A standby's changes since the primary's last snapshot are unknown to it (nothing takes
        # them here): once promoted, its first incremental snapshot writes every row, as after a
        # state copy. Tracking them instead held every key pushes touched and evictions deleted,
        # up to 4M a table (twice the capacity with one), and the standby grew with the run.
        for table in self.shard.tables.values():
            table.forget_changes()
        self.epoch, self.lineage = message.epoch, lineage
        self.primary_address = context.peer()
        self.shard.incarnation = message.incarnation  # same rows at the same versions: replicas need no resync
        self._applied = message.sequence
        self._set_state(State.STANDBY)
        log.info("%s: following the primary (%s; incarnation %d)", self.describe(), how, message.incarnation)

    def _load_copy(self, states: dict, rows: dict, ledger: bytes) -> None:
        """The primary's state in place of this one's (on the tables' thread): each table's image
        over the rows copied before it."""
        if set(states) != set(self.shard.tables):
            raise ValueError(f"state copy: tables {sorted(states)}, this shard has {sorted(self.shard.tables)}")
        for name, image in states.items():
            copied = rows.pop(name, None)
            if copied is None:
                self.shard.tables[name].load_image(image)
            else:
                self.shard.tables[name].load_image(image, copied.store, copied.held)
            # Its next incremental snapshot (once primary) cannot know what changed since the
            # parent, which the old primary wrote: it writes every row against the parent.
            self.shard.tables[name].forget_changes()
            old = self.shard.logs[name]
            self.shard.logs[name] = UpdateLog(image.counters["version"], old.max_entries, old.max_keys, old.max_bytes)
        self.shard.ledger.load(decode_ledger(ledger))

    def _apply(self, message) -> tuple[bytes, str]:
        """Applies a forwarded message as the primary does (on the tables' thread); returns (its
        serialized answer, "") or (b"", the error it raised): the primary applied the same message
        to the same state, so it got the same, error included (a rejected push changes nothing)."""
        method = message.method
        try:
            if method == "Push":
                request = bulk_messages.parse(ps_pb2.PushRequest, message.request, wire.PUSH_BULK_FIELDS)
                response = self.servicer.apply_push(request)
            elif method == "PushMulti":
                request = bulk_messages.parse(ps_pb2.MultiPushRequest, message.request, wire.PUSH_BULK_FIELDS)
                response = self.servicer.apply_push_multi(request)
            elif method == "Commit":
                response = self.servicer.apply_commit(
                    ps_pb2.CommitRequest.FromString(message.request), tuple(message.sealed_tables)
                )
            else:
                raise ValueError(f"replicate: unknown method {method!r}")
        except Exception as exc:  # noqa: BLE001 - the primary's apply raised the same, compared there
            return b"", error_text(exc)
        return response.SerializeToString(), ""

    async def _watch_primary(self) -> None:
        """Promotes this standby once the primary's lease expired and the record says it was in sync.

        A promotion is one etcd transaction (the record naming this process primary an epoch up,
        and the leader key under its lease). When its answer is lost it may have committed all the
        same: the record then names this process primary while it still follows as a standby, and
        nobody would serve the shard; the primary started again in its place would copy its older
        state over this one, acknowledged pushes included. So a record that names this process
        primary at a later epoch is this process's own take: it claims the take's lease if that
        still lives, else takes the record again, an epoch further."""
        last_look = time.monotonic()
        while self.state is State.STANDBY:
            await asyncio.sleep(self.ttl / 8)
            now = time.monotonic()
            if now - last_look > self.ttl / 2:
                # This process did not run for half a lease (paused, starved): its primary may have
                # gone on alone meanwhile, and what it reads first (messages buffered before) says
                # nothing of that. Sure of being in sync again only by the record (a lost one: not
                # at all); still refusing an older primary (_hello), for what it may hold.
                self._sure_in_sync = False
            last_look = now
            if self.epoch == 0:
                continue  # never joined: nothing to take over
            try:
                membership, revision, leader_alive = await asyncio.to_thread(self.arbiter.look)
                if membership is not None and membership.primary == self.arbiter.me and membership.epoch > self.epoch:
                    self._promoting = True
                    if await asyncio.to_thread(self.arbiter.claim_unanswered, membership):
                        self._promoted(membership.epoch, membership.lineage, "its promotion committed, its answer lost")
                        return
                    epoch, lineage = membership.epoch + 1, membership.lineage
                    leader_alive = await asyncio.to_thread(self.arbiter.leader_alive)  # the take's lease, gone since?
                elif membership is None and self._in_sync_now():
                    # The record is gone (etcd lost its data) and this process was last seen in sync,
                    # its primary heard from just now (a standby paused or cut off since may have
                    # missed the primary going on alone): it holds every acknowledged push, so it
                    # takes the shard an epoch further (the primary, its lease gone with the data,
                    # deposes itself; restarted, it waits), in its lineage: clients' epochs go on.
                    epoch, lineage = self.epoch + 1, self.lineage
                elif (
                    membership is None
                    or membership.standby != self.arbiter.me
                    or not membership.sync
                    or (membership.epoch, membership.lineage) != (self.epoch, self.lineage)
                ):
                    alone = membership is not None and membership.standby != self.arbiter.me
                    if alone and (membership.epoch, membership.lineage) == (self.epoch, self.lineage):
                        # The primary recorded itself alone at this epoch. (Not a record that still
                        # names this process: a primary started again after etcd lost its data takes
                        # epoch 1 again, naming it, and must not make it forget what it holds.)
                        self._in_sync_at = (0, "")
                    continue
                else:
                    self._in_sync_at, self._sure_in_sync = (self.epoch, self.lineage), True
                    epoch, lineage = self.epoch + 1, self.lineage
                if leader_alive:
                    self._promoting = False
                    continue
                self._promoting = True  # from here no message of the old epoch is applied (stream or link)
                promoted = Membership(self.arbiter.me, "", epoch, False, lineage)
                if await asyncio.to_thread(self.arbiter.take_primary, revision, promoted):
                    self._promoted(epoch, lineage, "the primary's lease expired")
                    return
                self._promoting = False
            except EtcdUnavailableError:
                # No answer to a read, the lease's grant or the CAS: as far as this process knows it
                # is still the standby, so it takes the primary's messages again and tries at the
                # next look (before, it refused them for good); a CAS that committed unanswered is
                # found there, in the record.
                self._promoting = False
                continue

    def _promoted(self, epoch: int, lineage: str, why: str) -> None:
        """This standby is the primary at `epoch` of `lineage` (the arbiter records it, under this
        process's lease)."""
        self.epoch, self.lineage = epoch, lineage
        self.serve_after = time.monotonic() + self.ttl / 4
        if self._standby_link is not None:
            self._standby_link.close()
        self.metrics.failovers.labels(self.metrics.shard).inc()
        log.warning("%s: PROMOTED to primary (%s); alone until a standby joins", self.describe(), why)
        self._set_state(State.ALONE)
        self._spawn(self._keep_lease())
        self._spawn(self._follow_standby())


class _Stream:
    """One Replicate stream on a standby: its identity (Replication._followed) and, once followed,
    its link and why that ended ("" while it runs)."""

    def __init__(self) -> None:
        self.link: StandbyLink | None = None
        self.link_failure = ""
        self.lineage: str | None = None  # of the record its last handshake was checked against (None: none yet)


class DivergedError(RuntimeError):
    """The standby answered a forwarded message differently from the primary."""


def error_text(exc: BaseException) -> str:
    """How an apply's error is compared between the primary and its standby."""
    return f"{type(exc).__name__}: {exc}"


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


class _ReplicationServicer(replication_pb2_grpc.ReplicationServicer):
    """The Replication service of a shard port (a primary refuses every stream)."""

    def __init__(self, replication: Replication) -> None:
        self.replication = replication

    async def Replicate(self, request_iterator, context):
        try:
            async for ack in self.replication.replicate(request_iterator, context):
                yield ack
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - a stream's errors become its status, as a unary call's do
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s: a replication stream failed", self.replication.describe(), exc_info=exc)
            await context.abort(code, message)


def attach_replication(
    servicer, job: JobConfig, shard_index: int, address: str, standby: bool, registry
) -> Replication:
    """The Replication of a shard with a standby, for the process at `address` (one of the pair;
    a standby if `standby`), fencing the servicer's calls; started by Replication.start once the
    port answers."""
    if job.arbiter is None:
        raise ValueError(f"shards[{shard_index}].standby: needs [arbiter] (etcd)")
    pair = job.shards[shard_index].addresses()
    partner = pair[1] if address == pair[0] else pair[0]
    arbiter = Arbiter(job.arbiter, job.job, shard_index, address)
    replication = Replication(servicer, arbiter, partner, State.STANDBY if standby else State.JOINING, registry)
    servicer.replication = replication
    servicer.call_site.fence = replication.check_serving
    servicer.call_site.epoch_fence = (replication.check_client_epoch, lambda: (replication.epoch, replication.lineage))
    return replication


def _rows_per_piece(table, budget: int) -> int:
    """Rows of `table` in one "TableRows" message of at most `budget` bytes (their words and numbers)."""
    return max(1, budget // (table.width * 4 + 8))
