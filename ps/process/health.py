"""`embps health ADDRESS`: one gRPC health check of an embps port, for exec probes and operators.

    embps health 127.0.0.1:50100 --config /etc/embps/job.toml --service embps.v1.ParameterServer \
        --server-name ctr-ps-0.ctr-ps

Why it exists: the kubelet's built-in `grpc:` probe speaks plaintext only, so the ports of a job
with `[security]` TLS need an exec probe that checks the server against the job's CA and, under
mutual TLS, presents the job's client certificate. A probe dials 127.0.0.1 while the server's
certificate names what clients dial: `server_name` is the name the certificate is checked
against instead of the address. Health needs no token (it is open to every caller).

Exit status: 0 when the service is SERVING; 1 otherwise (NOT_SERVING, an unknown service, no
answer within the timeout, a TLS handshake refused), with one line saying which; 2 when the
address, a flag or the config is bad, with one line on stderr naming it. grpc and ps.security are
imported where they are used, so that `embps health --help` loads neither.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ps.security import SecurityConfig


# The most --timeout takes: an hour is already no probe, and gRPC fails a deadline of 1e10 s at
# once with DEADLINE_EXCEEDED, as if a serving server had not answered.
MAX_TIMEOUT_S = 3600.0
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?\]")  # a name, IPv4, [IPv6]


def check_address(address: str) -> None:
    """Raises ValueError naming `address` unless it is HOST:PORT with a port in [1, 65535]; an IPv6
    host is bracketed ([::1]:50100). gRPC would take a bad port modulo 65536 or fail as if the
    server were down (exit 1), not as the typo it is."""
    host, _, port = address.rpartition(":")
    if not _HOST.fullmatch(host):
        raise ValueError(f"address: must be HOST:PORT (an IPv6 host in brackets: [::1]:PORT), got {address!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"address: the port must be an integer in [1, 65535], got {address!r}")


@dataclass(frozen=True)
class HealthProbe:
    """address: HOST:PORT; service: the health service name ("" = the whole server); server_name:
    the TLS name to check the certificate against (None: the address's host); timeout_s: in
    (0, MAX_TIMEOUT_S]."""

    address: str
    service: str = ""
    server_name: str | None = None
    timeout_s: float = 3.0

    def __post_init__(self) -> None:
        check_address(self.address)
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"--timeout: must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {self.timeout_s}")
        if self.server_name is not None and not self.server_name:
            raise ValueError("server_name: must be a host name or left out, got ''")


def load_security(path: str | Path) -> SecurityConfig:
    """The `[security]` of a job TOML (everything off when it has none). Only that section is read:
    a probe runs every few seconds, and loading the whole job (numpy, pyarrow) would triple its cost."""
    from ps.security import SecurityConfig, parse_security
    from ps.toml_reader import read_toml

    path = Path(path)
    try:
        data = read_toml(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the job config: {exc.strerror}") from None
    if "security" not in data:
        return SecurityConfig()
    try:
        return parse_security(data["security"], path.resolve().parent)
    except ValueError as exc:  # a ConfigTypeError too
        raise ValueError(f"{path}: {exc}") from None


def check_health(probe: HealthProbe, security: SecurityConfig) -> tuple[bool, str]:
    """One Health.Check: (serving, a line saying what was seen). Never raises for what the server
    or the network does; configuration errors (unreadable certificates) raise ValueError."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ps.security import open_channel

    options = []
    if probe.server_name is not None:
        if not security.tls:
            raise ValueError("server_name: only means something with TLS; the job's [security] has no tls_cert")
        options.append(("grpc.ssl_target_name_override", probe.server_name))
    where = f"{probe.address} service {probe.service!r}"
    with open_channel(probe.address, security, role=None, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe.service), timeout=probe.timeout_s
            )
        except grpc.RpcError as err:
            return False, f"{where}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{where}: {status}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="HOST:PORT of the port to check")
    parser.add_argument("--config", default=None, help="job TOML whose [security] to use (default: plaintext)")
    parser.add_argument("--service", default="", help="health service name (default '': the whole server)")
    parser.add_argument(
        "--server-name", default=None, help="TLS: the name the server certificate must have (default: the host)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    """`embps health`: prints one line; exit 0 SERVING, 1 not, 2 a configuration error."""
    from ps.security import SecurityConfig

    try:
        probe = HealthProbe(args.address, args.service, args.server_name, args.timeout)
    except ValueError as exc:
        return _refuse(str(exc))
    if args.config == "":  # not plaintext against what may be a TLS port, answered as a port down
        return _refuse("--config: must name the job's TOML or be left out, got ''")
    try:
        security = load_security(args.config) if args.config is not None else SecurityConfig()
    except ValueError as exc:  # names the file
        return _refuse(str(exc))
    try:
        serving, line = check_health(probe, security)
    except ValueError as exc:
        return _refuse(str(exc))
    print(line)
    return 0 if serving else 1


def _refuse(message: str) -> int:
    """A configuration error: one line on stderr, exit 2 (as embps.cli ends the other verbs)."""
    print(f"embps health: {message}", file=sys.stderr)
    return 2
