"""Transport security and bearer tokens for every gRPC port of a job (`[security]` of the job TOML).

    [security]
    tls_cert = "certs/server.pem"          # server certificate chain (PEM): TLS on every gRPC port
    tls_key = "certs/server.key"           # its private key (PEM); required with tls_cert
    tls_ca = "certs/ca.pem"                # CA bundle clients check server certificates against
                                           # (default: gRPC's built-in public roots)
    client_ca = "certs/client-ca.pem"      # mutual TLS: servers require a client certificate signed by it
    client_cert = "certs/client.pem"       # mutual TLS: what this process presents as a client
    client_key = "certs/client.key"
    tokens.trainer = { file = "secrets/trainer.token" }   # or { env = "EMBPS_TRAINER_TOKEN" }
    tokens.replica = { file = "secrets/replica.token" }
    tokens.reader = { env = "EMBPS_READER_TOKEN" }

Relative paths are relative to the job TOML. Tokens are read from files or environment variables,
never written in the TOML, so a config dump or a log line cannot carry one; a string where a
token source belongs is refused without being echoed.

One TOML serves every process of a job, and each process holds only its own secrets: paths are
checked when the process that needs them loads them (a shard its key and the tokens it accepts, a
worker its trainer token), with errors naming the field, e.g.
`security.tls_key: file not found: /etc/embps/server.key`. On Kubernetes (`embps deploy render`)
the files come from one Secret mounted at /etc/embps-secret in every pod.

Roles (who may call what; health checks are open to all, for probes):

    trainer   PS port: every method (Lookup, Push, LookupBatch, PushBatch, Stats, Subscribe,
              SnapshotControl)
    replica   PS port: the read-only methods a serving replica's followers need (Subscribe, Lookup,
              LookupBatch, Stats)
    reader    serving port: Lookup, Status

A missing or unknown token answers UNAUTHENTICATED; a valid token of a role that may not call the
method answers PERMISSION_DENIED. Reflection needs a token of any role the port accepts: the proto
files are public, but an anonymous caller has no business on the port beyond its health.
When no token is configured, auth is off; when any is, every port requires one (a port whose roles
have no token configured refuses every call but health). Tokens are compared with
hmac.compare_digest. Prometheus /metrics ports stay plain HTTP.

Rotation without a restart (what cert-manager and a Kubernetes Secret update do: new files at the
same paths): a server reads its certificate, key and client CA again for the next connection after
they change (connections already open keep theirs); a client's CA, certificate and key are
checked when it makes a call, at most once a second, and after a change its calls go through a new
channel (ps/rotating_channel.py); token files are read again at most once a second after they
change, by the servers checking them and by the clients sending them. A new file that does not
load (a key that does not match the certificate, a token too short) is logged, without its
content, and the previous one stays in use. Not rotated: tokens from environment variables.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import grpc

from ps.rotating_channel import RotatingAioChannel, RotatingChannel
from ps.rpc import ps_pb2, serving_pb2, snapshot_pb2

log = logging.getLogger("embps.security")

RELOAD_CHECK_S = 1.0  # a changed token file or client certificate is seen within this long
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
_MIN_TOKEN_CHARS = 16


class Role(StrEnum):
    TRAINER = "trainer"
    REPLICA = "replica"
    READER = "reader"


@dataclass(frozen=True)
class TokenSource:
    """Where one role's token comes from: exactly one of a file (its text, whitespace stripped) or an
    environment variable."""

    file: str | None = None
    env: str | None = None


@dataclass(frozen=True)
class Tokens:
    """The token source of each role; None: the role has no token (and cannot authenticate)."""

    trainer: TokenSource | None = None
    replica: TokenSource | None = None
    reader: TokenSource | None = None


@dataclass(frozen=True)
class SecurityConfig:
    """`[security]`: TLS files (absolute or relative to the working directory once parsed) and token
    sources. The default is everything off: plaintext ports, no tokens."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    client_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tokens: Tokens = field(default_factory=Tokens)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.client_ca is not None

    @property
    def auth(self) -> bool:
        return any(getattr(self.tokens, role.value) is not None for role in Role)

    def describe(self) -> str:
        """One line for the startup log: what is on, never a secret."""
        transport = ("mutual TLS" if self.mutual_tls else "TLS") if self.tls else "plaintext"
        roles = [role.value for role in Role if getattr(self.tokens, role.value) is not None]
        return f"{transport}, " + (f"tokens for {', '.join(roles)}" if roles else "no tokens (auth off)")

    def token(self, role: Role) -> str | None:
        """The role's token, read now from its file or variable; None when the role has none."""
        source = getattr(self.tokens, role.value)
        if source is None:
            return None
        where = f"security.tokens.{role.value}"
        if source.file is not None:
            text = _read(f"{where}.file", source.file).decode("ascii", errors="replace")
            token = text.strip()
        else:
            token = os.environ.get(source.env, "").strip()
            if not token:
                raise ValueError(f"{where}.env: environment variable {source.env} is not set or empty")
        if len(token) < _MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
            # The token itself is never part of the message.
            raise ValueError(
                f"{where}: a token must be at least {_MIN_TOKEN_CHARS} printable ASCII characters without "
                f"spaces (gRPC metadata), got {len(token)} characters"
            )
        return token

    def server_credentials(self) -> grpc.ServerCredentials:
        """The server side of TLS (requires `tls`); client certificates required when client_ca is set.
        The files are read again for the next connection after they change (see ServerCertificates)."""
        certificates = ServerCertificates(self)
        return grpc.dynamic_ssl_server_credentials(
            certificates.configuration, certificates.fetch, require_client_authentication=self.mutual_tls
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The client side of TLS (requires `tls`), with this process's client certificate if any."""
        if not self.tls:
            raise ValueError("security.tls_cert: TLS is off; there are no channel credentials")
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem("security.tls_ca", self.tls_ca) if self.tls_ca else None,
            private_key=_read_pem("security.client_key", self.client_key) if self.client_key else None,
            certificate_chain=_read_pem("security.client_cert", self.client_cert) if self.client_cert else None,
        )


class FileStamps:
    """(inode, size, mtime) of some files, to tell when any of them is replaced or rewritten (a
    Kubernetes Secret update swaps a symlink: the inode changes)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self.last = self.now()

    def now(self) -> tuple | None:
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, self.paths))
        except OSError:
            return None  # mid-swap or removed: not a new version yet

    def changed(self) -> tuple | None:
        """The new stamps when the files differ from the last version taken, else None."""
        stamps = self.now()
        return stamps if stamps is not None and stamps != self.last else None


def _check_tls_files(security: SecurityConfig, protocol: int, pair: tuple[str, str], ca: str) -> None:
    """Raises ValueError naming the fields when the certificate and key named by `pair` (fields of
    security; skipped when unset) do not load as a pair, or the CA named by `ca` does not load."""
    context = ssl.SSLContext(protocol)
    cert, key = (getattr(security, name) for name in pair)
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"security.{pair[0]}, security.{pair[1]}: do not load as a pair: {exc}") from None
    if getattr(security, ca):
        try:
            context.load_verify_locations(cafile=getattr(security, ca))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"security.{ca}: does not load: {exc}") from None


@dataclass(frozen=True)
class ServerPem:
    """A TLS server's files, read and checked together (see load_server_pem)."""

    key: bytes
    cert: bytes
    client_ca: bytes | None


def load_server_pem(security: SecurityConfig) -> ServerPem:
    """Reads the server's key, certificate and client CA after checking that they make a working
    server (the key matches the certificate, the CA parses); ValueError naming the fields if not."""
    _check_tls_files(security, ssl.PROTOCOL_TLS_SERVER, ("tls_cert", "tls_key"), "client_ca")
    return ServerPem(
        key=_read_pem("security.tls_key", security.tls_key),
        cert=_read_pem("security.tls_cert", security.tls_cert),
        client_ca=_read_pem("security.client_ca", security.client_ca) if security.client_ca else None,
    )


class ServerCertificates:
    """A TLS server's certificate, key and client CA, read again after they change.

    gRPC calls `fetch` before each new connection's handshake; it stats the files (cheap) and,
    when they changed, loads and checks them: the key must match the certificate, the client CA
    must parse. A new set that fails is logged and the current one kept, so a half-written
    rotation never takes a server's port down."""

    def __init__(self, security: SecurityConfig) -> None:
        if security.tls_cert is None or security.tls_key is None:
            raise ValueError("security.tls_cert: TLS is off; server credentials need tls_cert and tls_key")
        self.security = security
        paths = [security.tls_cert, security.tls_key, *([security.client_ca] if security.client_ca else [])]
        self._stamps = FileStamps(paths)
        self.configuration = self._load()
        self._lock = threading.Lock()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        s = self.security
        pair = (_read_pem("security.tls_key", s.tls_key), _read_pem("security.tls_cert", s.tls_cert))
        client_ca = _read_pem("security.client_ca", s.client_ca) if s.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

    def _check(self) -> None:
        """Raises ValueError naming the field when the files on disk do not make a working server."""
        _check_tls_files(self.security, ssl.PROTOCOL_TLS_SERVER, ("tls_cert", "tls_key"), "client_ca")

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and load, else None (keep the current one)."""
        with self._lock:
            stamps = self._stamps.changed()
            if stamps is None:
                return None
            try:
                self._check()
                configuration = self._load()
            except ValueError as exc:
                log.warning("TLS files changed but do not load (%s); keeping the current certificate", exc)
                self._stamps.last = stamps  # tried: wait for the next change
                return None
            if self._stamps.now() != stamps:
                return None  # changed again while being read: take the next version
            self._stamps.last = stamps
            self.configuration = configuration
            log.info("TLS certificate reloaded from %s", self.security.tls_cert)
            return configuration


class ClientCertificates:
    """The CA, client certificate and key a client dials with, read again after they change
    (checked at most every RELOAD_CHECK_S, when a call is made; ps.rotating_channel then opens a
    channel with the new ones). The certificate must match its key and the CA must parse; a new set
    that does not load is logged and the current one kept."""

    def __init__(self, security: SecurityConfig) -> None:
        self.security = security
        paths = [p for p in (security.tls_ca, security.client_cert, security.client_key) if p]
        self._stamps = FileStamps(paths)  # taken before the files are read: a change in between is seen
        self._state = (0, security.channel_credentials())
        self._next_check = time.monotonic() + RELOAD_CHECK_S
        self._lock = threading.Lock()

    def _check(self) -> None:
        """Raises ValueError naming the field when the files on disk do not make a working client."""
        _check_tls_files(self.security, ssl.PROTOCOL_TLS_CLIENT, ("client_cert", "client_key"), "tls_ca")

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """(generation, credentials); the generation grows by one at each change that loads."""
        if time.monotonic() < self._next_check:
            return self._state
        with self._lock:
            self._next_check = time.monotonic() + RELOAD_CHECK_S
            stamps = self._stamps.changed()
            if stamps is None:
                return self._state
            try:
                self._check()
                credentials = self.security.channel_credentials()
            except ValueError as exc:
                log.warning("TLS client files changed but do not load (%s); keeping the current ones", exc)
                self._stamps.last = stamps  # tried: wait for the next change
                return self._state
            if self._stamps.now() != stamps:
                return self._state  # changed again while being read: take the next version
            self._stamps.last = stamps
            self._state = (self._state[0] + 1, credentials)
            log.info("TLS client certificate and CA reloaded from %s", ", ".join(self._stamps.paths))
            return self._state


class LiveToken:
    """One role's token; one from a file is read again when the file changes (checked at most every
    RELOAD_CHECK_S). A new token that is not valid is logged (never its value) and the current
    one kept."""

    def __init__(
        self, value: str, security: SecurityConfig | None = None, role: Role | None = None,
        stamps: FileStamps | None = None,
    ) -> None:
        self.value = value
        self._security = security
        self._role = role
        self._stamps = stamps  # of the token file, taken before `value` was read; None: never re-read
        self._next_check = time.monotonic() + RELOAD_CHECK_S
        self._lock = threading.Lock()
        self._encoded = (value, value.encode())

    @classmethod
    def of(cls, security: SecurityConfig, role: Role) -> LiveToken | None:
        """The role's token now (None: the role has none); ValueError naming the field if invalid."""
        source = getattr(security.tokens, role.value)
        stamps = FileStamps([source.file]) if source is not None and source.file is not None else None
        value = security.token(role)
        return None if value is None else cls(value, security, role, stamps)

    @classmethod
    def fixed(cls, value: str) -> LiveToken:
        return cls(value)

    def current_bytes(self) -> bytes:
        """current(), encoded (what a server compares a presented token with)."""
        value = self.current()
        if self._encoded[0] is not value:
            self._encoded = (value, value.encode())
        return self._encoded[1]

    def current(self) -> str:
        if self._stamps is None or time.monotonic() < self._next_check:
            return self.value
        with self._lock:
            self._next_check = time.monotonic() + RELOAD_CHECK_S
            stamps = self._stamps.changed()
            if stamps is not None:
                self._stamps.last = stamps
                try:
                    self.value = self._security.token(self._role)
                    log.info("security.tokens.%s: token file changed; using the new token", self._role.value)
                except ValueError as exc:
                    log.warning("%s; keeping the current token", exc)
        return self.value


def parse_security(raw: object, base_dir: Path | None = None) -> SecurityConfig:
    """The `[security]` table (dict) -> SecurityConfig; relative paths are joined to base_dir.
    Checks shape and combinations only; files and variables are read by the process using them."""
    if not isinstance(raw, dict):
        raise TypeError(f"security: must be a table ([security]), got {type(raw).__name__}")
    paths = [f.name for f in fields(SecurityConfig) if f.name != "tokens"]
    unknown = sorted(set(raw) - {*paths, "tokens"})
    if unknown:
        raise ValueError(f"security.{unknown[0]}: unknown field; known fields: {', '.join([*paths, 'tokens'])}")
    values: dict[str, str] = {}
    for name in paths:
        if name in raw:
            values[name] = _path(f"security.{name}", raw[name], base_dir)
    for a, b in (("tls_cert", "tls_key"), ("client_cert", "client_key")):
        if (a in values) != (b in values):
            missing, given = (b, a) if a in values else (a, b)
            raise ValueError(f"security.{missing}: required with security.{given}")
    if "tls_cert" not in values:
        for name in ("tls_ca", "client_ca", "client_cert"):
            if name in values:
                raise ValueError(f"security.{name}: needs TLS; set security.tls_cert and security.tls_key")
    if "client_ca" in values and "client_cert" not in values:
        raise ValueError(
            "security.client_cert: required with security.client_ca (servers then require a client "
            "certificate, and every embps process is a client of some port)"
        )
    return SecurityConfig(**values, tokens=_parse_tokens(raw.get("tokens", {}), base_dir))


def _parse_tokens(raw: object, base_dir: Path | None) -> Tokens:
    if not isinstance(raw, dict):
        # Not echoed: a misplaced token must not reach an error message.
        raise TypeError(f"security.tokens: must be a table of roles ({', '.join(Role)}), got {type(raw).__name__}")
    sources = {}
    for role, entry in raw.items():
        where = f"security.tokens.{role}"
        if role not in {r.value for r in Role}:
            raise ValueError(f"{where}: unknown role; roles: {', '.join(Role)}")
        if not isinstance(entry, dict) or len(entry) != 1 or not set(entry) <= {"file", "env"}:
            raise TypeError(
                f"{where}: must be {{ file = \"path\" }} or {{ env = \"VARIABLE\" }} (tokens are never written "
                f"in the TOML), got a {type(entry).__name__}"
            )
        if "file" in entry:
            sources[role] = TokenSource(file=_path(f"{where}.file", entry["file"], base_dir))
        else:
            env = entry["env"]
            if not isinstance(env, str) or not env or "=" in env:
                raise TypeError(f"{where}.env: must be the name of an environment variable, got {env!r}")
            sources[role] = TokenSource(env=env)
    return Tokens(**sources)


def _path(where: str, value: object, base_dir: Path | None) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{where}: must be a non-empty path, got {type(value).__name__}")
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path)


def dump_security(security: SecurityConfig) -> list[str]:
    """TOML lines of a [security] section that parse_security reads back as `security` (paths as
    stored; tokens as their sources). Empty when everything is off."""
    if security == SecurityConfig():
        return []
    lines = ["[security]"]
    for f in fields(SecurityConfig):
        value = getattr(security, f.name)
        if f.name != "tokens" and value is not None:
            lines.append(f"{f.name} = {_quote(value)}")
    for role in Role:
        source = getattr(security.tokens, role.value)
        if source is not None:
            kind, value = ("file", source.file) if source.file is not None else ("env", source.env)
            lines.append(f"tokens.{role.value} = {{ {kind} = {_quote(value)} }}")
    return lines


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read(where: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read {path}: {exc.strerror}") from None


def _read_pem(where: str, path: str) -> bytes:
    data = _read(where, path)
    if b"-----BEGIN " not in data:
        raise ValueError(f"{where}: not a PEM file: {path}")
    return data


# ---- who may call what -------------------------------------------------------------------------

Policy = Mapping[str, frozenset[Role]]  # full method name ("/pkg.Service/Method") -> roles allowed

_REPLICA_METHODS = frozenset({"Lookup", "LookupBatch", "Stats", "Subscribe"})


def _methods(descriptor, service: str) -> list[tuple[str, str]]:
    s = descriptor.services_by_name[service]
    return [(f"/{s.full_name}/{m.name}", m.name) for m in s.methods]


def ps_port_policy() -> dict[str, frozenset[Role]]:
    """The PS port: trainer everything, replica the read-only methods its followers need."""
    policy = {
        path: frozenset({Role.TRAINER, Role.REPLICA} if name in _REPLICA_METHODS else {Role.TRAINER})
        for path, name in _methods(ps_pb2.DESCRIPTOR, "ParameterServer")
    }
    policy.update({path: frozenset({Role.TRAINER}) for path, _ in _methods(snapshot_pb2.DESCRIPTOR, "SnapshotControl")})
    return policy


def serving_port_policy() -> dict[str, frozenset[Role]]:
    """The serving port: reader may call Lookup and Status (the service has no other method)."""
    return {path: frozenset({Role.READER}) for path, _ in _methods(serving_pb2.DESCRIPTOR, "Serving")}


# ---- server side -------------------------------------------------------------------------------


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
    ) -> None:
        self._tokens = [
            (role, token if isinstance(token, LiveToken) else LiveToken.fixed(token)) for role, token in tokens.items()
        ]
        self._policy = dict(policy)
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
        found = None
        for role, token in self._tokens:  # every token is compared, in constant time each
            if hmac.compare_digest(presented_bytes, token.current_bytes()):
                found = role
        return found

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
    if not tokens:
        log.warning("auth is on but no role this port accepts (%s) has a token: every call but health is refused",
                    ", ".join(sorted(roles)))
    return [TokenAuth(tokens, policy, on_denied)]


# ---- client side -------------------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a blocking channel."""

    def __init__(self, token: LiveToken) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        d = details
        metadata = (*(d.metadata or ()), ("authorization", f"Bearer {self._token.current()}"))
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _AioBearerToken:
    """Adds `authorization: Bearer <token>` to the calls of a grpc.aio channel. grpc.aio files an
    interceptor under the first call kind it is an instance of, so each kind gets its own class."""

    def __init__(self, token: LiveToken) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        header = ("authorization", f"Bearer {self._token.current()}")
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), header))


class _AioUnaryUnary(_AioBearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioBearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioBearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioBearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def _client_token(security: SecurityConfig, role: Role | None) -> LiveToken | None:
    if role is None or not security.auth:
        return None
    token = LiveToken.of(security, role)
    if token is None:
        raise ValueError(
            f"security.tokens.{role.value}: auth is on (tokens are configured) but this role, which this "
            f"process calls as, has no token"
        )
    return token


def open_channel(
    address: str,
    security: SecurityConfig,
    role: Role | None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A blocking channel to an embps port: TLS when the job has it, and `role`'s token (if auth is
    on and role is not None) on every call. role None: health checks only."""
    options = list(options)
    token = _client_token(security, role)

    def with_token(channel: grpc.Channel) -> grpc.Channel:
        return grpc.intercept_channel(channel, _BearerToken(token)) if token is not None else channel

    if security.tls:  # a new channel when the client certificate or CA changes
        return RotatingChannel(
            ClientCertificates(security),
            lambda credentials: with_token(grpc.secure_channel(address, credentials, options=options)),
        )
    return with_token(grpc.insecure_channel(address, options=options))


def open_aio_channel(
    address: str,
    security: SecurityConfig,
    role: Role | None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """As open_channel, for grpc.aio."""
    options = list(options)
    token = _client_token(security, role)
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    interceptors = [kind(token) for kind in kinds] if token is not None else None
    if security.tls:  # a new channel when the client certificate or CA changes
        return RotatingAioChannel(
            ClientCertificates(security),
            lambda credentials: grpc.aio.secure_channel(
                address, credentials, options=options, interceptors=interceptors
            ),
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
