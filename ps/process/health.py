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
config cannot be loaded (the message names the field). grpc and ps.security are imported where
they are used, so that `embps health --help` loads neither.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ps.security import SecurityConfig


@dataclass(frozen=True)
class HealthProbe:
    """address: HOST:PORT; service: the health service name ("" = the whole server); server_name:
    the TLS name to check the certificate against (None: the address's host); timeout_s: > 0."""

    address: str
    service: str = ""
    server_name: str | None = None
    timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ValueError(f"address: must be HOST:PORT, got {self.address!r}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout: must be > 0 seconds, got {self.timeout_s}")
        if self.server_name is not None and not self.server_name:
            raise ValueError("server_name: must be a host name or left out, got ''")


def load_security(path: str | Path) -> SecurityConfig:
    """The `[security]` of a job TOML (everything off when it has none). Only that section is read:
    a probe runs every few seconds, and loading the whole job (numpy, pyarrow) would triple its cost."""
    from ps.security import SecurityConfig, parse_security

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read the job config: {exc.strerror}") from None
    if "security" not in data:
        return SecurityConfig()
    return parse_security(data["security"], path.resolve().parent)


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
        print(f"embps health: {exc}")
        return 2
    try:
        security = load_security(args.config) if args.config else SecurityConfig()
    except (ValueError, TypeError) as exc:
        print(f"embps health: {args.config}: {exc}")
        return 2
    try:
        serving, line = check_health(probe, security)
    except ValueError as exc:
        print(f"embps health: {exc}")
        return 2
    print(line)
    return 0 if serving else 1
