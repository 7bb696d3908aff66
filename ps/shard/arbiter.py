"""Who is primary for one shard: the membership record in etcd and the primary's lease.

    /embps/<job>/shard/<s>          {"primary": addr, "standby": addr or "", "epoch": n, "sync": bool,
                                     "lineage": id}
    /embps/<job>/shard/<s>/leader   the primary's address, attached to its lease (gone when it expires)
    /embps/<job>/shard/<s>/standby  {"standby": addr, "epoch": n, "in_sync": bool} under the standby's
                                    own lease, while it follows a primary

Every change of the record is a compare-and-swap on its mod revision, so of two processes acting on
the same view only one wins. A process becomes primary only by a transaction that also finds no
leader key (no live lease): the primary at start (epoch + 1 over whatever an earlier run left), or
its standby once the primary's lease expired and the record says the standby was synchronous.
`sync` is true only while every acknowledged push is on the standby: the primary clears it (CAS)
before it acknowledges anything alone, so a standby that missed pushes never promotes. And while a
record says `sync` with a standby whose key lives, only that standby may take the shard: a primary
restarted in its place (a new process, without the pushes the standby holds) took the record first
in a race with the standby's promotion, and the standby then copied its older state over every
acknowledged push. So, too, when there is no record while a standby's key lives (etcd lost its
data under a running pair): the standby last seen in sync takes the shard an epoch further.

A record written where none was (a new job, etcd without its data, an operator's `etcdctl del`)
starts a lineage: a random id every later record of it carries, with its epochs from 1 again unless
a standby in sync carries its own lineage on. Clients fence by epoch only within one lineage: one
that saw epoch 3 of a lineage gone with etcd's data must still reach a pair started over at epoch 1.
Calls block (http.client); the shard runs them on threads (ps/shard/replication.py).
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import suppress
from dataclasses import asdict, dataclass

from ps.etcd import EtcdClient, EtcdUnavailableError, KeyValue, Lease
from ps.job_config import ArbiterConfig


@dataclass(frozen=True)
class Membership:
    primary: str
    standby: str
    epoch: int
    sync: bool
    lineage: str = ""  # the records' line its epochs count in ("" in records written before lineages)

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> Membership:
        data = json.loads(text)
        return cls(
            str(data["primary"]), str(data.get("standby", "")), int(data["epoch"]), bool(data.get("sync")),
            str(data.get("lineage", "")),
        )


def new_lineage() -> str:
    """A lineage id for a record written where none was: random, so two never compare as one."""
    return secrets.token_hex(8)


def membership_key(job: str, shard: int) -> str:
    return f"/embps/{job}/shard/{shard}"


@dataclass(frozen=True)
class UnansweredTake:
    """A take_primary whose transaction got no answer: etcd may have committed it."""

    lease: Lease  # the lease its leader key went under, if it committed
    membership: Membership  # the record it wrote, if it committed


class Arbiter:
    """One shard process's view of the arbiter; `me` is its own address."""

    def __init__(self, config: ArbiterConfig, job: str, shard: int, me: str) -> None:
        self.etcd = EtcdClient(config.endpoints, tls=config.tls_context())
        self.ttl = config.lease_seconds
        self.me = me
        self.key = membership_key(job, shard)
        self.leader_key = self.key + "/leader"
        self.standby_key = self.key + "/standby"
        self.standby_lease: Lease | None = None  # as a standby that follows a primary: the lease of standby_key
        self.lease: Lease | None = None
        self.valid_until = 0.0  # time.monotonic() until which the lease surely holds
        self.lost = False  # etcd said the lease is gone: this process is primary no more
        self.unanswered: UnansweredTake | None = None  # the last take_primary, when its answer was lost

    def read(self) -> tuple[Membership | None, int]:
        """The record and its mod revision (None, 0 when there is none). A record that does not
        parse (written by something else) is EtcdUnavailableError: neither process acts on it, both
        retry, as with etcd out of reach (it escaped every retry loop, ending its task)."""
        kv = self.etcd.get(self.key)
        return self._membership(kv), kv.mod_revision if kv else 0

    def _membership(self, kv: KeyValue | None) -> Membership | None:
        if kv is None:
            return None
        try:
            return Membership.load(kv.value)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EtcdUnavailableError(
                f"etcd {self.key}: not a membership record ({exc!r}): {kv.value[:200]!r}"
            ) from None

    def look(self) -> tuple[Membership | None, int, bool]:
        """read() and leader_alive() in one etcd call, at one revision: a standby looks every
        eighth of a lease, and two calls a look were two thirds of an idle pair's calls to etcd.
        The range [key, key + "0") holds the record and the keys under key + "/" ("/" is the byte
        before "0"), and no other shard's ("/embps/j/shard/10" sorts after the range's end for
        shard 1)."""
        kvs = {kv.key: kv for kv in self.etcd.range(self.key, self.key + "0")}
        record = kvs.get(self.key)
        return self._membership(record), record.mod_revision if record else 0, self.leader_key in kvs

    def leader_alive(self) -> bool:
        """Whether some process holds the shard's lease (its leader key exists)."""
        return self.etcd.get(self.leader_key) is not None

    def take_primary(self, seen_revision: int, membership: Membership, no_standby: bool = False) -> bool:
        """Writes `membership` (this process primary) and the leader key under a new lease, if the
        record is still at seen_revision and no lease is held (with `no_standby`, no standby's key
        either). True if this process won. EtcdUnavailableError when etcd did not answer; if that
        was the transaction's answer, the take may have committed all the same, and is kept in
        `unanswered` for claim_unanswered."""
        self._forget_unanswered()
        started = time.monotonic()
        lease = self.etcd.grant(self.ttl)
        conditions = [self.etcd.mod_revision_is(self.key, seen_revision), self.etcd.mod_revision_is(self.leader_key, 0)]
        if no_standby:
            conditions.append(self.etcd.mod_revision_is(self.standby_key, 0))
        try:
            won = self.etcd.txn(
                conditions,
                [self.etcd.put_op(self.key, membership.dump()), self.etcd.put_op(self.leader_key, self.me, lease)],
            )
        except EtcdUnavailableError:
            self.unanswered = UnansweredTake(lease, membership)
            raise
        if not won:
            self.etcd.revoke(lease)
            return False
        self.lease, self.valid_until, self.lost = lease, started + lease.ttl, False
        return True

    def claim_unanswered(self, recorded: Membership | None) -> bool:
        """After a take_primary whose answer was lost, with `recorded` the record read since: True
        if the take committed (the record is the one it wrote) and its lease still lives, which this
        process then holds as if it had won. False otherwise (no such take, the record is another,
        or the lease expired with nobody renewing it, and its leader key with it); the take is then
        forgotten. EtcdUnavailableError when etcd does not answer (the take is kept)."""
        take = self.unanswered
        if take is None:
            return False
        if recorded != take.membership:
            self._forget_unanswered()
            return False
        started = time.monotonic()
        ttl = self.etcd.keepalive(take.lease)
        self.unanswered = None
        if ttl <= 0:
            return False
        self.lease, self.valid_until, self.lost = take.lease, started + ttl, False
        return True

    def _forget_unanswered(self) -> None:
        """Revokes the lease of an unanswered take (best effort: unrenewed, it expires anyway)."""
        take, self.unanswered = self.unanswered, None
        if take is not None:
            with suppress(EtcdUnavailableError):
                self.etcd.revoke(take.lease)

    def update(self, seen_revision: int, membership: Membership) -> bool:
        """CAS of the record; True if it was still at seen_revision and now says `membership`."""
        return self.etcd.txn(
            [self.etcd.mod_revision_is(self.key, seen_revision)], [self.etcd.put_op(self.key, membership.dump())]
        )

    def standby_alive(self) -> str | None:
        """The standby key's value (JSON, see hold_standby) while a standby holds it, else None."""
        kv = self.etcd.get(self.standby_key)
        return None if kv is None else kv.value

    def standby_held(self) -> dict | None:
        """standby_alive() parsed: {"standby", "epoch", "in_sync"}; None when absent or not an object."""
        value = self.standby_alive()
        if value is None:
            return None
        try:
            held = json.loads(value)
        except ValueError:
            return None
        return held if isinstance(held, dict) else None

    def hold_standby(self, epoch: int, in_sync: bool) -> None:
        """Puts the standby key (this process, following at `epoch`, sure of being in sync or not)
        under a lease of its own: the one it holds (a new value without a moment of no key, when a
        primary starting might take the shard), or a new one."""
        if self.standby_lease is None:
            self.standby_lease = self.etcd.grant(self.ttl)
        value = json.dumps({"standby": self.me, "epoch": epoch, "in_sync": in_sync})
        try:
            self.etcd.put(self.standby_key, value, self.standby_lease)
        except EtcdUnavailableError:
            self.standby_lease = None  # it may have expired unseen (etcd refuses a put under it): a new one next
            raise

    def keep_standby(self) -> bool:
        """Renews the standby key's lease; False when etcd no longer has it (hold it again, under a
        new one)."""
        if self.standby_lease is not None and self.etcd.keepalive(self.standby_lease) > 0:
            return True
        self.standby_lease = None
        return False

    def release_standby(self) -> None:
        """Revokes the standby key's lease (best effort: unrenewed, it expires within a lease)."""
        lease, self.standby_lease = self.standby_lease, None
        if lease is not None:
            with suppress(EtcdUnavailableError):
                self.etcd.revoke(lease)

    def keepalive(self) -> None:
        """Renews the lease (EtcdUnavailableError when etcd does not answer: the lease then holds
        until valid_until at most); sets `lost` when etcd no longer has it."""
        if self.lease is None:
            return
        started = time.monotonic()
        ttl = self.etcd.keepalive(self.lease)
        if ttl <= 0:
            self.lost = True
        else:
            self.valid_until = started + ttl

    def release_lease(self) -> None:
        """Revokes this process's lease, and with it the leader key (best effort: unrenewed, it
        expires within a lease). A primary that stops calls it once it acknowledges nothing more,
        so that its standby in sync takes the shard at its next look (an eighth of a lease), not a
        whole lease later, and a process restarted in its place need not wait for it either."""
        self._forget_unanswered()
        lease, self.lease, self.lost = self.lease, None, True
        if lease is not None:
            with suppress(EtcdUnavailableError):
                self.etcd.revoke(lease)

    def lease_valid(self) -> bool:
        return self.lease is not None and not self.lost and time.monotonic() < self.valid_until
