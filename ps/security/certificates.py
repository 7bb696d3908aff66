"""TLS files: checked before use, and read again after they change (rotation without a restart).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from ps.security.config import RELOAD_CHECK_S, SecurityConfig, read_pem

log = logging.getLogger("embps.security")


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
        key=read_pem("security.tls_key", security.tls_key),
        cert=read_pem("security.tls_cert", security.tls_cert),
        client_ca=read_pem("security.client_ca", security.client_ca) if security.client_ca else None,
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
        self.configuration = self._load()  # a missing or unreadable file, named
        self._check()  # a key that is not the certificate's, named (gRPC said only "cannot bind")
        self._lock = threading.Lock()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        s = self.security
        pair = (read_pem("security.tls_key", s.tls_key), read_pem("security.tls_cert", s.tls_cert))
        client_ca = read_pem("security.client_ca", s.client_ca) if s.client_ca else None
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
    (checked at most every RELOAD_CHECK_S, when a call is made; ps.security.rotating_channel then opens a
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
