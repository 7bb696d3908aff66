"""Who is primary for one shard: the membership record in etcd and the primary's lease.

    /embps/<job>/shard/<s>          {"primary": addr, "standby": addr or "", "epoch": n, "sync": bool}
    /embps/<job>/shard/<s>/leader   the primary's address, attached to its lease (gone when it expires)

Every change of the record is a compare-and-swap on its mod revision, so of two processes acting on
the same view only one wins. A process becomes primary only by a transaction that also finds no
leader key (no live lease): the primary at start (epoch + 1 over whatever an earlier run left), or
its standby once the primary's lease expired and the record says the standby was synchronous.
`sync` is true only while every acknowledged push is on the standby: the primary clears it (CAS)
before it acknowledges anything alone, so a standby that missed pushes never promotes.
Calls block (urllib); the shard runs them on threads (ps/shard/replication.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from ps.etcd import EtcdClient, Lease
from ps.job_config import ArbiterConfig


@dataclass(frozen=True)
class Membership:
    primary: str
    standby: str
    epoch: int
    sync: bool

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> Membership:
        data = json.loads(text)
        return cls(str(data["primary"]), str(data.get("standby", "")), int(data["epoch"]), bool(data.get("sync")))


def membership_key(job: str, shard: int) -> str:
    return f"/embps/{job}/shard/{shard}"


class Arbiter:
    """One shard process's view of the arbiter; `me` is its own address."""

    def __init__(self, config: ArbiterConfig, job: str, shard: int, me: str) -> None:
        self.etcd = EtcdClient(config.endpoints)
        self.ttl = config.lease_seconds
        self.me = me
        self.key = membership_key(job, shard)
        self.leader_key = self.key + "/leader"
        self.lease: Lease | None = None
        self.valid_until = 0.0  # time.monotonic() until which the lease surely holds
        self.lost = False  # etcd said the lease is gone: this process is primary no more

    def read(self) -> tuple[Membership | None, int]:
        """The record and its mod revision (None, 0 when there is none)."""
        kv = self.etcd.get(self.key)
        return (None, 0) if kv is None else (Membership.load(kv.value), kv.mod_revision)

    def leader_alive(self) -> bool:
        """Whether some process holds the shard's lease (its leader key exists)."""
        return self.etcd.get(self.leader_key) is not None

    def take_primary(self, seen_revision: int, membership: Membership) -> bool:
        """Writes `membership` (this process primary) and the leader key under a new lease, if the
        record is still at seen_revision and no lease is held. True if this process won."""
        started = time.monotonic()
        lease = self.etcd.grant(self.ttl)
        won = self.etcd.txn(
            [self.etcd.mod_revision_is(self.key, seen_revision), self.etcd.mod_revision_is(self.leader_key, 0)],
            [self.etcd.put_op(self.key, membership.dump()), self.etcd.put_op(self.leader_key, self.me, lease)],
        )
        if not won:
            self.etcd.revoke(lease)
            return False
        self.lease, self.valid_until, self.lost = lease, started + lease.ttl, False
        return True

    def update(self, seen_revision: int, membership: Membership) -> bool:
        """CAS of the record; True if it was still at seen_revision and now says `membership`."""
        return self.etcd.txn(
            [self.etcd.mod_revision_is(self.key, seen_revision)], [self.etcd.put_op(self.key, membership.dump())]
        )

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

    def lease_valid(self) -> bool:
        return self.lease is not None and not self.lost and time.monotonic() < self.valid_until
