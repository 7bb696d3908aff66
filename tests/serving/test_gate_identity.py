"""The serving gate's copies of the TLS files (serving/gate.py GateIdentity): a copy that cannot be
written (a full disk) is tried again at the next check, and the checks go on. It raised from the
watch thread, which ended silently: the gate's certificate never rotated again."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import serving.gate as gate
from serving.gate import GateIdentity
from tests.security.certs import Pki, secured


def test_a_copy_that_cannot_be_written_is_tried_again_and_the_checks_go_on(tmp_path, monkeypatch, caplog):
    security = secured(Pki.create(tmp_path / "pki"))
    directory = tmp_path / "gate"
    directory.mkdir()
    identity = GateIdentity(security, directory)
    identity.close()  # its watch thread stopped: the checks below are the only ones
    for path in (security.tls_cert, security.tls_key):  # a rotation: the files written again
        Path(path).write_bytes(Path(path).read_bytes())
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)
    replace = gate._replace

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gate, "_replace", full_disk)
    with caplog.at_level(logging.INFO, logger="embps.serving"):
        identity.check()
        identity.check()
        assert caplog.text.count("copy cannot be written") == 1, caplog.text
        monkeypatch.setattr(gate, "_replace", replace)
        identity.check()
    assert "TLS certificate reloaded" in caplog.text
    assert identity.identity.read_bytes().startswith(b"-----BEGIN")
