"""A small etcd v3 client over its JSON gateway (urllib): range, put, leases, compare-and-swap.

    EtcdClient("http://127.0.0.1:2379")
        .grant(ttl) -> Lease        POST /v3/lease/grant
        .keepalive(lease) -> ttl    POST /v3/lease/keepalive   (0: the lease is gone)
        .get(key) -> KeyValue|None  POST /v3/kv/range
        .txn(compare, success)      POST /v3/kv/txn            (compare-and-swap)

Keys and values are str on our side, base64 on the wire (the gateway's encoding of bytes). Every
call has a timeout; an unreachable or failing etcd is EtcdUnavailableError, never a hang. This is
all the arbiter (ps/shard/arbiter.py) needs, so no gRPC etcd client is pulled in.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 1.0


class EtcdUnavailableError(ConnectionError):
    """etcd did not answer (down, cut off, or an error status)."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int  # seconds, as granted (etcd may round up to its minimum)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class EtcdClient:
    """etcd at `endpoint` ("http://host:port"; several, comma-separated: tried in order)."""

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoints = [e.strip().rstrip("/") for e in endpoint.split(",") if e.strip()]
        if not self.endpoints or not all(e.startswith(("http://", "https://")) for e in self.endpoints):
            raise ValueError(f"arbiter.endpoints: expected http://host:port[,...], got {endpoint!r}")
        self.timeout_s = timeout_s

    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        last: Exception | None = None
        for endpoint in self.endpoints:
            request = urllib.request.Request(endpoint + path, data, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return json.loads(reply.read() or b"{}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = exc
        raise EtcdUnavailableError(f"etcd {','.join(self.endpoints)}: {path}: {last}")

    def grant(self, ttl: int) -> Lease:
        reply = self._post("/v3/lease/grant", {"TTL": int(ttl)})
        if "ID" not in reply:
            raise EtcdUnavailableError(f"etcd: lease grant refused: {reply}")
        return Lease(int(reply["ID"]), int(reply.get("TTL", ttl)))

    def keepalive(self, lease: Lease) -> int:
        """Renews the lease; returns its TTL, 0 when etcd no longer has it (expired or revoked)."""
        reply = self._post("/v3/lease/keepalive", {"ID": str(lease.id)})
        return int(reply.get("result", reply).get("TTL", 0))

    def revoke(self, lease: Lease) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease.id)})

    def get(self, key: str) -> KeyValue | None:
        reply = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs") or []
        return _key_value(kvs[0]) if kvs else None

    def put(self, key: str, value: str, lease: Lease | None = None) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = str(lease.id)
        self._post("/v3/kv/put", body)

    def txn(self, compare: list[dict], success: list[dict]) -> bool:
        """Applies `success` atomically when every comparison holds; returns whether it did."""
        reply = self._post("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(reply.get("succeeded", False))

    # -- the pieces of a transaction ---------------------------------------------------------

    @staticmethod
    def mod_revision_is(key: str, revision: int) -> dict:
        """Compares the key's last modification (0: the key does not exist)."""
        if revision == 0:
            return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}

    @staticmethod
    def put_op(key: str, value: str, lease: Lease | None = None) -> dict:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = str(lease.id)
        return {"request_put": body}


def _key_value(kv: dict) -> KeyValue:
    return KeyValue(
        key=_unb64(kv["key"]),
        value=_unb64(kv.get("value", "")),
        mod_revision=int(kv.get("mod_revision", 0)),
        create_revision=int(kv.get("create_revision", 0)),
        lease=int(kv.get("lease", 0)),
    )
