"""Names that become path components of snapshots and labels of metrics (a job, a table)."""

from __future__ import annotations

NAME_RULE = "a name of letters, digits, '_', '.' and '-' (not '.' or '..')"


def is_name(value: object) -> bool:
    """True when `value` is a non-empty string of letters, digits (Unicode ones too: a snapshot's
    path and a metric's label carry them), '_', '.' and '-', other than '.' and '..', which as a
    path component would name the folder itself or its parent."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and all(c.isalnum() or c in "_.-" for c in value)
    )
