"""The S3 server the tests start (bench/s3_server.py) leaves nothing in /tmp: SeaweedFS puts its
Unix sockets and log files there unless told otherwise, and left several per run behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from bench.s3_server import S3Server


def _ports(server: S3Server) -> list[str]:
    return [arg.partition("=")[2] for arg in server.args if arg.startswith("-") and ".port" in arg]


def _files_in_tmp(ports: list[str]) -> list[str]:
    return sorted(name for name in os.listdir("/tmp")
                  if name.startswith("seaweedfs-") and any(name.endswith(f"-{port}.sock") for port in ports))


def test_a_killed_server_leaves_no_socket_or_log_in_tmp(tmp_path: Path) -> None:
    server = S3Server.start(tmp_path / "s3")
    ports = _ports(server)
    try:
        assert server.private_dir is not None and (server.private_dir / "s3.sock").exists()
        server.create_bucket("files")
        os.killpg(server.proc.pid, signal.SIGKILL)  # as a crashed test run would leave it
        server.proc.wait()
        assert _files_in_tmp(ports), "weed no longer creates sockets in /tmp: drop the cleanup"
    finally:
        server.stop()  # what the tests call, on a server that is running or not
    assert _files_in_tmp(ports) == []
    assert not server.private_dir.exists()
    assert (tmp_path / "s3" / "weed.INFO").exists()  # its log files in its workdir, not in /tmp
