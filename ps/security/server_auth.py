"""The server side: which role may call which method, the token check, and TLS ports.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping, Sequence

import grpc

from ps.rpc import ps_pb2, replication_pb2, serving_pb2, snapshot_pb2
from ps.security.config import Role, SecurityConfig
from ps.security.tokens import LiveToken

log = logging.getLogger("embps.security")

HEALTH_PREFIX = "/grpc.health.v1.Health/"


REFLECTION_PREFIX = "/grpc.reflection."


Policy = Mapping[str, frozenset[Role]]  # full method name ("/pkg.Service/Method") -> roles allowed


_REPLICA_METHODS = frozenset({"Lookup", "LookupBatch", "Stats", "Subscribe", "SubscribeTables"})


def _methods(descriptor, service: str) -> list[tuple[str, str]]:
    s = descriptor.services_by_name[service]
    return [(f"/{s.full_name}/{m.name}", m.name) for m in s.methods]


def ps_port_policy() -> dict[str, frozenset[Role]]:
    """The PS port: trainer every ParameterServer and SnapshotControl method, replica the read-only
    methods its followers need, and the shard role alone Replication: a primary streams its pushes
    and state to its standby with the shards' own token, which no worker holds, so a trainer
    cannot take the standby's stream from its primary."""
    policy = {
        path: frozenset({Role.TRAINER, Role.REPLICA} if name in _REPLICA_METHODS else {Role.TRAINER})
        for path, name in _methods(ps_pb2.DESCRIPTOR, "ParameterServer")
    }
    policy.update({path: frozenset({Role.TRAINER}) for path, _ in _methods(snapshot_pb2.DESCRIPTOR, "SnapshotControl")})
    policy.update({path: frozenset({Role.SHARD}) for path, _ in _methods(replication_pb2.DESCRIPTOR, "Replication")})
    return policy


def serving_port_policy() -> dict[str, frozenset[Role]]:
    """The serving port: reader may call every method of the service (Lookup, LookupMany, Status)."""
    return {path: frozenset({Role.READER}) for path, _ in _methods(serving_pb2.DESCRIPTOR, "Serving")}


def add_port(server: grpc.aio.Server, address: str, security: SecurityConfig) -> int:
    """Binds `address` with TLS when it is configured, plaintext otherwise; returns the port (0: failed)."""
    if security.tls:
        return server.add_secure_port(address, security.server_credentials())
    return server.add_insecure_port(address)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` against the tokens of the roles `policy` names.

    Health is open; reflection takes any accepted role; every other method takes the roles the
    policy lists, and a method the policy does not list takes none. A refused call never reaches
    the servicer, and its request bytes are not even parsed. `on_denied(method, code)` counts
    refusals (method: the short name, e.g. "Push").
    """

    def __init__(
        self,
        tokens: Mapping[Role, str | LiveToken],
        policy: Policy,
        on_denied: Callable[[str, grpc.StatusCode], None] | None = None,
        others: Mapping[Role, LiveToken] | None = None,
    ) -> None:
        """others: the tokens this host holds of roles the port does not accept (checked apart from
        the port's own at start, server_interceptors); a call with one of them is refused too."""
        self._others = list((others or {}).items())
        self._tokens = [
            (role, token if isinstance(token, LiveToken) else LiveToken.fixed(token)) for role, token in tokens.items()
        ]
        for i, (role, token) in enumerate(self._tokens):
            for other, other_token in self._tokens[:i]:
                if hmac.compare_digest(token.current_bytes(), other_token.current_bytes()):
                    # A caller with it would be taken for one of them and refused what only the other may call.
                    raise ValueError(
                        f"security.tokens.{other.value} and security.tokens.{role.value}: the same token for two "
                        "roles; give each role its own"
                    )
        self._policy = dict(policy)
        self._shared_warned: set[frozenset[Role]] = set()
        self._any_role = frozenset(role for roles in self._policy.values() for role in roles)
        self._on_denied = on_denied

    def role_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Role | None:
        """The role whose token the call carries, or None (no, malformed or unknown token)."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str):
            return None
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        presented_bytes = presented.strip().encode()
        # Every token is compared, in constant time each.
        found = [role for role, token in self._tokens if hmac.compare_digest(presented_bytes, token.current_bytes())]
        also = [role for role, token in self._others if hmac.compare_digest(presented_bytes, token.current_bytes())]
        if found and len(found + also) > 1:
            found += also
            # Two roles' files rotated to one token (refused at start: __init__, server_interceptors):
            # the caller is neither. Taken for the last one, a trainer's token rotated to the
            # shard's could call Replicate; a trainer's on the PS host rotated to the reader's let
            # every inference client push.
            self._warn_shared(found)
            return None
        return found[0] if found else None

    def _warn_shared(self, roles: list[Role]) -> None:
        key = frozenset(roles)
        if key not in self._shared_warned:
            self._shared_warned.add(key)
            names = " and ".join(f"security.tokens.{role.value}" for role in roles)
            log.error("%s: the same token for two roles since a token file changed; calls with it are refused "
                      "until each role has its own", names)

    def tokens_for(self, methods: Sequence[str]) -> list[bytes]:
        """The current tokens of the roles that may call every one of `methods` (for a native
        check of those calls, which must be given them again when a token file changes)."""
        allowed = frozenset.intersection(*(self._policy.get(m, frozenset()) for m in methods))
        every = [token.current_bytes() for _, token in (*self._tokens, *self._others)]
        return [  # not a token two roles share (role_of refuses it)
            value for (role, _), value in zip(self._tokens, every, strict=False)
            if role in allowed and sum(hmac.compare_digest(value, other) for other in every) == 1
        ]

    def refusal(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when a call of `method` with `metadata` may go on, else its (code, message)."""
        if method.startswith(HEALTH_PREFIX):
            return None
        allowed = self._any_role if method.startswith(REFLECTION_PREFIX) else self._policy.get(method, frozenset())
        role = self.role_of(metadata)
        if role is not None and role in allowed:
            return None
        if role is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (authorization metadata)"
        return grpc.StatusCode.PERMISSION_DENIED, f"role {role.value!r} may not call {method}"

    def deny(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """`refusal`, counting a refusal through `on_denied`."""
        refused = self.refusal(method, metadata)
        if refused is not None and self._on_denied is not None:
            self._on_denied(method.rsplit("/", 1)[-1], refused[0])
        return refused

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        refused = self.refusal(method, handler_call_details.invocation_metadata)
        if refused is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        code, message = refused
        if self._on_denied is not None:
            self._on_denied(method.rsplit("/", 1)[-1], code)

        async def deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary"
        )
        return handler._replace(request_deserializer=_ignore, **{kind: deny})


def _ignore(data: bytes) -> None:
    return None


def server_interceptors(
    security: SecurityConfig,
    policy: Policy,
    on_denied: Callable[[str, grpc.StatusCode], None] | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """[TokenAuth] for a port with `policy` when auth is on, else []. Reads the tokens of the
    policy's roles now (and only those: a serving host never needs the trainer's token)."""
    if not security.auth:
        return []
    roles = {role for roles in policy.values() for role in roles}
    tokens = {role: token for role in Role if role in roles and (token := LiveToken.of(security, role)) is not None}
    others = _check_apart_from_other_roles(security, tokens)
    if not tokens:
        log.warning("auth is on but no role this port accepts (%s) has a token: every call but health is refused",
                    ", ".join(sorted(roles)))
    return [TokenAuth(tokens, policy, on_denied, others)]


def _check_apart_from_other_roles(security: SecurityConfig, tokens: Mapping[Role, LiveToken]) -> dict[Role, LiveToken]:
    """ValueError when a token this port accepts is also the token of a role it does not accept
    (TokenAuth compares only the port's own roles): a reader token equal to the trainer's would
    start the PS port and let every inference client push. Another role's token that this host
    cannot read (a file it does not hold, a variable it does not set) is skipped: on a cluster a
    host holds only its own roles' tokens. Returns those other roles' tokens (TokenAuth's
    `others`, for files that change later)."""
    others = {}
    for other in Role:
        if other in tokens or getattr(security.tokens, other.value) is None:
            continue
        try:
            other_token = LiveToken.of(security, other)
        except ValueError:
            continue
        if other_token is None:
            continue
        for role, token in tokens.items():
            if hmac.compare_digest(token.current_bytes(), other_token.current_bytes()):
                raise ValueError(
                    f"security.tokens.{role.value} and security.tokens.{other.value}: the same token for two "
                    "roles; give each role its own"
                )
        others[other] = other_token
    return others
