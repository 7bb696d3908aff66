"""A real full disk for one process: a tiny tmpfs mounted in a mount namespace of its own.

    prefix = small_disk_prefix(mount_point, 256 << 10)    # skips the test where it cannot work
    proc = subprocess.Popen([*prefix, sys.executable, ...])  # sees a 256 KiB tmpfs at mount_point
    path = seen_by(proc.pid, mount_point)                  # the same files, from any process

`unshare --user --map-root-user --mount` gives the command a user and mount namespace of its own,
where it may mount a tmpfs without privileges on the host; the mount is gone when it exits. Writes
past the size fail with ENOSPC, as on a full disk. Other processes reach that tmpfs through
/proc/<pid>/root, a path that names the same files in the command itself (same pid), so both
sides of a snapshot (shard and coordinator) can use it as the one URI.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_MOUNT = 'mount -t tmpfs -o size="$1" tmpfs "$0" && shift && exec "$@"'


def small_disk_prefix(mount_point: Path, size_bytes: int) -> tuple[str, ...]:
    """The command prefix that runs the rest with a size_bytes tmpfs at mount_point (an existing
    folder); pytest.skip, saying why, where this machine allows no such namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not found: no private tmpfs for a full-disk test")
    prefix = (unshare, "--user", "--map-root-user", "--mount", "sh", "-c", _MOUNT, str(mount_point), str(size_bytes))
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs (user namespaces off?): {probe.stderr.strip()}")
    return prefix


def seen_by(pid: int, path: Path) -> Path:
    """`path` as process `pid` sees it (inside its mount namespace)."""
    return Path(f"/proc/{pid}/root") / path.relative_to("/")
