"""Names that become path components of snapshots and labels of metrics (a job, a table)."""

from __future__ import annotations

MAX_NAME_BYTES = 200  # a path component holds 255 bytes, with a suffix after the name; a client id 243
NAME_RULE = f"a name of letters, digits, '_', '.' and '-' (not '.' or '..'), at most {MAX_NAME_BYTES} bytes of UTF-8"


def is_name(value: object) -> bool:
    """True when `value` is a non-empty string of letters, digits (Unicode ones too: a snapshot's
    path and a metric's label carry them), '_', '.' and '-', other than '.' and '..', which as a
    path component would name the folder itself or its parent; at most MAX_NAME_BYTES of UTF-8 (a
    longer one was taken, and the first snapshot's folder or the workers' client ids failed)."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and len(value.encode("utf-8", errors="replace")) <= MAX_NAME_BYTES
        and all(c.isalnum() or c in "_.-" for c in value)
    )

# A snapshot step folder's own entries (ps/snapshot/files.py): a table's files go to <step>/<table>/,
# so a table of one of these names took the manifest's place (every commit refused as "another
# writer committed this step", then every listing of the job failed on a folder where the manifest
# is read) or the extras'.
RESERVED_TABLE_NAMES = frozenset({"manifest.json", "manifest.json.unusable", "extra"})
