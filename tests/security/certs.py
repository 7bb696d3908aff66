"""Throwaway PKI for tests: a server CA and a client CA, a server certificate for 127.0.0.1 and
localhost, and client certificates (EC P-256, one day), written as PEM files.

    pki = Pki.create(tmp_path)
    pki.server_cert, pki.server_key, pki.ca         # TLS
    pki.client_ca, pki.client_cert, pki.client_key  # mutual TLS
    pki.rogue_cert, pki.rogue_key                   # a client certificate from a CA nobody trusts
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ps.security import Role, SecurityConfig, Tokens, TokenSource


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _ca(directory: Path, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(f"embps test {stem}", _name(f"embps test {stem}"), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, _ = _write(directory, stem, cert, key)
    return cert, key, cert_path


def _leaf(
    directory: Path, stem: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], usage, sans: list
) -> tuple[Path, Path]:
    """usage: one extended key usage, or a list of them."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(f"embps test {stem}", ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _write(directory, stem, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    next_server_cert: Path  # a second server certificate of the same CA and names (rotation)
    next_server_key: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        server_ca_cert, server_ca_key, ca = _ca(directory, "ca")
        client_ca_cert, client_ca_key, client_ca = _ca(directory, "client-ca")
        rogue_ca_cert, rogue_ca_key, _ = _ca(directory, "rogue-ca")
        # Also the names a Kubernetes job "probe" is dialed by (tests/security/test_health_probe.py).
        sans = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
            x509.DNSName("*.probe-ps"),
            x509.DNSName("probe-serving"),
        ]
        server_cert, server_key = _leaf(
            directory, "server", (server_ca_cert, server_ca_key), ExtendedKeyUsageOID.SERVER_AUTH, sans
        )
        client = (client_ca_cert, client_ca_key)
        client_cert, client_key = _leaf(directory, "client", client, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        rogue = (rogue_ca_cert, rogue_ca_key)
        rogue_cert, rogue_key = _leaf(directory, "rogue", rogue, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        next_cert, next_key = _leaf(
            directory, "next-server", (server_ca_cert, server_ca_key), ExtendedKeyUsageOID.SERVER_AUTH, sans
        )
        return cls(
            ca, server_cert, server_key, client_ca, client_cert, client_key, rogue_cert, rogue_key, next_cert, next_key
        )

    @property
    def rogue_ca(self) -> Path:
        """The CA of rogue_cert: a second client CA, for rotating a client CA and certificate together."""
        return self.ca.with_name("rogue-ca.pem")

    def private_key_bodies(self) -> list[str]:
        """The base64 lines of every private key, as they would appear if a key leaked into text."""
        bodies = []
        for path in (self.server_key, self.client_key, self.rogue_key, self.next_server_key):
            lines = path.read_text().splitlines()
            bodies += [line for line in lines if line and not line.startswith("-----")]
        return bodies


def secured(pki: Pki, token_files: dict[Role, Path] | None = None, mutual: bool = False) -> SecurityConfig:
    """TLS with the test PKI (mutual TLS if `mutual`), and a token file per role if given."""
    tokens = Tokens(**{role.value: TokenSource(file=str(path)) for role, path in (token_files or {}).items()})
    client = {"client_ca": str(pki.client_ca), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    return SecurityConfig(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_ca=str(pki.ca),
        tokens=tokens,
        **(client if mutual else {}),
    )


@dataclass(frozen=True)
class EtcdPki:
    """etcd's own CA, as an etcd with --client-cert-auth is deployed: its server certificate (for
    127.0.0.1, client use too: etcd's JSON gateway dials its own gRPC port with it) and a client
    certificate for the shards, both of that CA; and a client certificate of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    @classmethod
    def create(cls, directory: Path) -> EtcdPki:
        directory.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key, ca = _ca(directory, "etcd-ca")
        rogue_cert, rogue_key, _ = _ca(directory, "etcd-rogue-ca")
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        server_cert, server_key = _leaf(directory, "etcd-server", (ca_cert, ca_key), both, sans)
        client = ExtendedKeyUsageOID.CLIENT_AUTH
        client_cert, client_key = _leaf(directory, "etcd-client", (ca_cert, ca_key), client, [])
        rogue = _leaf(directory, "etcd-rogue", (rogue_cert, rogue_key), client, [])
        return cls(ca, server_cert, server_key, client_cert, client_key, *rogue)
