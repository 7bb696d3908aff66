"""`[security]` of the job TOML: the SecurityConfig dataclass, its parsing and its TOML dump.

The whole scheme (TLS, mutual TLS, roles, rotation) is described in ps/security/__init__.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import grpc

from ps import toml_writer
from ps.errors import ConfigTypeError

log = logging.getLogger("embps.security")


RELOAD_CHECK_S = 1.0  # a changed token file or client certificate is seen within this long


_MIN_TOKEN_CHARS = 16
# gRPC refuses metadata past 16 KiB and drops calls at random past 8 KiB (its soft limit), and
# the client read that refusal as a full table: a token's bounds are set well under both.
_MAX_TOKEN_CHARS = 4096


class Role(StrEnum):
    TRAINER = "trainer"
    REPLICA = "replica"
    READER = "reader"
    SHARD = "shard"  # a primary shard's replication stream to its standby


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
    shard: TokenSource | None = None


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
        if not _MIN_TOKEN_CHARS <= len(token) <= _MAX_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
            # The token itself is never part of the message.
            raise ValueError(
                f"{where}: a token must be {_MIN_TOKEN_CHARS} to {_MAX_TOKEN_CHARS} printable ASCII characters "
                f"without spaces (gRPC metadata), got {len(token)} characters"
            )
        return token

    def server_credentials(self) -> grpc.ServerCredentials:
        """The server side of TLS (requires `tls`); client certificates required when client_ca is set.
        The files are read again for the next connection after they change (see ServerCertificates)."""
        from ps.security.certificates import ServerCertificates  # certificates.py imports this module

        certificates = ServerCertificates(self)
        return grpc.dynamic_ssl_server_credentials(
            certificates.configuration, certificates.fetch, require_client_authentication=self.mutual_tls
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The client side of TLS (requires `tls`), with this process's client certificate if any."""
        if not self.tls:
            raise ValueError("security.tls_cert: TLS is off; there are no channel credentials")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem("security.tls_ca", self.tls_ca) if self.tls_ca else None,
            private_key=read_pem("security.client_key", self.client_key) if self.client_key else None,
            certificate_chain=read_pem("security.client_cert", self.client_cert) if self.client_cert else None,
        )


def parse_security(raw: object, base_dir: Path | None = None) -> SecurityConfig:
    """The `[security]` table (dict) -> SecurityConfig; relative paths are joined to base_dir.
    Checks shape and combinations only; files and variables are read by the process using them."""
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"security: must be a table ([security]), got {type(raw).__name__}")
    paths = [f.name for f in fields(SecurityConfig) if f.name != "tokens"]
    unknown = sorted(set(raw) - {*paths, "tokens"})
    if unknown:
        raise ValueError(f"security.{unknown[0]}: unknown field; known fields: {', '.join([*paths, 'tokens'])}")
    values: dict[str, str] = {}
    for name in paths:
        if name in raw:
            values[name] = config_path(f"security.{name}", raw[name], base_dir)
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
        raise ConfigTypeError(
            f"security.tokens: must be a table of roles ({', '.join(Role)}), got {type(raw).__name__}"
        )
    sources = {}
    for role, entry in raw.items():
        where = f"security.tokens.{role}"
        if role not in {r.value for r in Role}:
            raise ValueError(f"{where}: unknown role; roles: {', '.join(Role)}")
        if not isinstance(entry, dict) or len(entry) != 1 or not set(entry) <= {"file", "env"}:
            raise ConfigTypeError(
                f"{where}: must be {{ file = \"path\" }} or {{ env = \"VARIABLE\" }} (tokens are never written "
                f"in the TOML), got a {type(entry).__name__}"
            )
        if "file" in entry:
            sources[role] = TokenSource(file=config_path(f"{where}.file", entry["file"], base_dir))
        else:
            env = entry["env"]
            if not isinstance(env, str) or not env or "=" in env:
                # Not the value: `NAME=token` is a token pasted where its variable's name belongs.
                got = f"{env.partition('=')[0]!r}=..." if isinstance(env, str) and "=" in env else repr(env)
                raise ConfigTypeError(f"{where}.env: must be the name of an environment variable, got {got}")
            sources[role] = TokenSource(env=env)
    return Tokens(**sources)


def config_path(where: str, value: object, base_dir: Path | None) -> str:
    """A path field of a TOML file (`where` names it in errors), joined to base_dir, the file's
    folder, when relative."""
    if not isinstance(value, str) or not value:
        raise ConfigTypeError(f"{where}: must be a non-empty path, got {type(value).__name__}")
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path)


def dump_security(security: SecurityConfig) -> list[str]:
    """TOML lines of a [security] section that parse_security reads back as `security` (paths as
    stored; tokens as their sources). Empty when everything is off."""
    if security == SecurityConfig():
        return []
    section = asdict(security)
    if not security.auth:
        del section["tokens"]
    return toml_writer.table("security", section)


def _read(where: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read {path}: {exc.strerror}") from None


def read_pem(where: str, path: str) -> bytes:
    data = _read(where, path)
    if b"-----BEGIN " not in data:
        raise ValueError(f"{where}: not a PEM file: {path}")
    return data
