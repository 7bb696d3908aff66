"""A real etcd on 127.0.0.1 for tests and benchmarks (Debian `etcd-server`, `make system-tools`).

    with EtcdServer.start(workdir) as etcd:      # free ports, its own data dir
        endpoint = etcd.endpoint                   # "http://127.0.0.1:PORT", the [arbiter] endpoints
    # stopped by pid: SIGTERM, then SIGKILL after a timeout; restart() brings it back on the same ports

Heartbeat 25 ms and election timeout 250 ms (a single member): etcd's shortest lease is then 1 s
instead of 2 s, so failover tests wait less.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.ports import free_ports
from ps.etcd import EtcdClient, EtcdUnavailableError
from ps.process import children


def etcd_missing() -> str | None:
    """Why etcd cannot run here, or None."""
    if shutil.which("etcd") is None:
        return "etcd not found: install the Debian package `etcd-server` (make system-tools)"
    return None


@dataclass(frozen=True)
class EtcdTls:
    """etcd's client port over TLS: its certificate and key, and the CA its clients' certificates
    must chain to (`--client-cert-auth`); `client` is the context this side checks it with."""

    cert: Path
    key: Path
    client_ca: Path
    client: ssl.SSLContext


@dataclass
class EtcdServer:
    proc: subprocess.Popen | None
    endpoint: str
    log_path: Path
    args: tuple[str, ...]
    tls: EtcdTls | None = None

    @classmethod
    def start(
        cls, workdir: Path, timeout: float = 30.0, host: str = "127.0.0.1", tls: EtcdTls | None = None
    ) -> EtcdServer:
        """host: the address it listens on (clients); its peer port stays on 127.0.0.1. tls: https
        with client certificates required (None: plain http)."""
        workdir.mkdir(parents=True, exist_ok=True)
        client, peer = free_ports(2)
        endpoint = f"{'https' if tls else 'http'}://{host}:{client}"
        args = (
            "etcd",
            "--name", "embps",
            "--data-dir", str(workdir / "data"),
            "--listen-client-urls", endpoint,
            "--advertise-client-urls", endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"embps=http://127.0.0.1:{peer}",
            "--heartbeat-interval", "25",
            "--election-timeout", "250",
        )
        if tls is not None:
            args += (
                "--cert-file", str(tls.cert), "--key-file", str(tls.key),
                "--client-cert-auth", "--trusted-ca-file", str(tls.client_ca),
            )
        server = cls(None, endpoint, workdir / "etcd.log", args, tls)
        server.restart(timeout)
        return server

    def restart(self, timeout: float = 30.0) -> None:
        """Starts etcd (again, after a stop: same ports, same data) and waits until it answers."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = EtcdClient(self.endpoint, tls=self.tls.client if self.tls else None)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                client.get("/embps/ready")
                client.close()
                return
            except EtcdUnavailableError:
                if time.monotonic() > end:
                    self.stop()
                    raise TimeoutError(
                        f"etcd at {self.endpoint} not ready after {timeout} s; log: {self.log_path}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        return children.stop(self.proc, timeout) if self.proc is not None else None

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
