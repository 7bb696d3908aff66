"""`embps snapshot list|inspect|export|gc URI --job NAME`: look at and manage stored snapshots.

S3 settings come from the AWS_* variables (see ps/snapshot/storage.py). Errors print one line to stderr:
exit code 2 for a bad argument (naming it), 1 when the storage or a snapshot fails. The snapshot
modules (torch, pyarrow) are imported by the action that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ps.errors import EmbpsError

if TYPE_CHECKING:
    from ps.snapshot.files import Manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "inspect", "export", "gc"])
    parser.add_argument("uri", help="storage root: file:///path, a path, s3://bucket/prefix, hdfs://host:port/path")
    parser.add_argument("--job", required=True, help="job name (the folder under the URI)")
    parser.add_argument("--step", type=int, default=None, help="inspect/export this step (default: latest)")
    parser.add_argument("--dst", default=None, help="export: destination URI")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "stored"],
        help="export: value type (stored: each table's rows as it keeps them, int8 ones bit for bit)",
    )
    parser.add_argument("--keep", type=int, default=None, help="gc: how many newest snapshots to keep")
    parser.add_argument("--dry-run", action="store_true", help="gc: print what would be deleted, delete nothing")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _list(args: argparse.Namespace) -> int:
    from ps.snapshot.files import latest, list_snapshots

    manifests = list_snapshots(args.uri, args.job)
    if not manifests:
        print(f"no committed snapshot of job {args.job} under {args.uri}")
        return 0
    newest = latest(args.uri, args.job)
    print(f"{'step':>10}  {'kind':<11}  {'parent':>8}  {'rows':>12}  {'size':>10}  created")
    for m in manifests:
        parent = "-" if m.parent is None else str(m.parent)
        mark = "  <- LATEST" if m.step == newest else ""
        size = _size(m.total_bytes)
        print(f"{m.step:>10}  {m.kind:<11}  {parent:>8}  {m.total_rows:>12,}  {size:>10}  {m.created}{mark}")
    return 0


def _optimizer_kind(config: dict | None) -> str:
    """The optimizer a manifest's table config names, as it is written there."""
    optimizer = config.get("optimizer") if config else None
    kind = optimizer.get("kind") if isinstance(optimizer, dict) else None
    return kind if isinstance(kind, str) else "unknown optimizer"


def _rows_kind(t) -> str:
    """How a table's rows are kept: a training snapshot of a float16 or int8 table records dtype
    float32 (what its rows read as) and keeps them as the table stores them (its config's
    `storage`): inspect said "float32" for those."""
    storage = t.config.get("storage") if isinstance(t.config, dict) else None
    return f"{t.dtype}, stored {storage}" if isinstance(storage, str) and storage != t.dtype else t.dtype


def _describe(m: Manifest) -> list[str]:
    parent = f", parent step {m.parent}" if m.parent is not None else ""
    lines = [
        f"job {m.job} step {m.step}: {m.kind}{parent}, {m.num_shards} shard(s), created {m.created}",
        f"  {m.total_rows:,} rows, {_size(m.total_bytes)} in {len(m.files) + len(m.extra)} files",
    ]
    for name, t in sorted(m.tables.items()):
        optimizer = _optimizer_kind(t.config)
        lines.append(f"  table {name}: dim {t.dim} {_rows_kind(t)}, {optimizer} (state width {t.state_width})")
        for shard, e in sorted(t.shards.items()):
            size = sum(m.files[p].size for p in e.files)
            lines.append(
                f"    shard {shard}: {e.rows:,} rows, {e.pending:,} pending, {e.deleted:,} deleted, "
                f"version {e.version}, step {e.step}, {_size(size)}"
            )
    for name, f in sorted(m.extra.items()):
        lines.append(f"  extra {name}: {_size(f.size)} sha256 {f.sha256[:16]}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from ps.snapshot.files import open_snapshot

    print("\n".join(_describe(open_snapshot(args.uri, args.job, args.step).manifest)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ps.snapshot.ops import check_export_place, export_for_serving
    from ps.snapshot.storage import open_uri

    # check_arguments checked local URIs; remote ones are checked here, their filesystems set up.
    check_export_place("--dst", args.job, open_uri(args.uri), open_uri(args.dst))
    m = export_for_serving(args.uri, args.job, args.step, args.dst, dtype=args.dtype)
    print(f"exported step {m.step} of job {m.job} to {args.dst}: {m.total_rows:,} rows, {_size(m.total_bytes)}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from ps.snapshot.ops import collect_garbage

    result = collect_garbage(args.uri, args.job, args.keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"

    def steps(s: tuple[int, ...]) -> str:
        return ", ".join(map(str, s)) or "none"

    print(f"kept {steps(result.kept)}; {verb} {steps(result.deleted)}; incomplete {steps(result.deleted_incomplete)}")
    return 0


_ACTIONS = {"list": _list, "inspect": _inspect, "export": _export, "gc": _gc}


def check_arguments(args: argparse.Namespace) -> None:
    """Raises ValueError naming the argument or flag that action args.action cannot use. A local
    URI must be an existing folder: a typo would otherwise list "no committed snapshot" (or gc
    nothing) and succeed; an empty folder or bucket prefix is a true answer of "none"."""
    from ps.snapshot.manifest import check_name
    from ps.snapshot.storage import check_uri, open_uri, same_place

    check_uri(args.uri, "uri")
    check_name("--job", args.job)
    if _local(args.uri):
        _, root = open_uri(args.uri)
        if not os.path.isdir(root):
            what = "is not a folder" if os.path.exists(root) else "does not exist"
            raise ValueError(f"uri: {args.uri!r} {what}")
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step: must be a snapshot step >= 0, got {args.step}")
    if args.action == "export":
        if args.dst is None:
            raise ValueError("--dst: required by export (the destination URI)")
        check_uri(args.dst, "--dst")
        if same_place(args.uri, args.dst):  # a usage error (exit 2), found before any read
            raise ValueError(
                f"--dst: must differ from the uri {args.uri!r} (an export would write into its step folders)"
            )
        if _local(args.uri) and _local(args.dst):
            from ps.snapshot.ops import check_export_place

            check_export_place("--dst", args.job, open_uri(args.uri), open_uri(args.dst))
    if args.action == "gc":
        if args.keep is None:
            raise ValueError("--keep: required by gc (how many newest snapshots to keep)")
        if args.keep < 1:
            raise ValueError(f"--keep: must be an integer >= 1 (LATEST must stay readable), got {args.keep}")


def _local(uri: str) -> bool:
    return "://" not in uri or urlsplit(uri).scheme.lower() == "file"


def run(args: argparse.Namespace) -> int:
    """Runs the `embps snapshot` action args.action with the parsed arguments of add_arguments."""
    try:
        check_arguments(args)
    except ValueError as e:
        print(f"embps snapshot {args.action}: {e}", file=sys.stderr)
        return 2
    try:
        return _ACTIONS[args.action](args)
    except (EmbpsError, ValueError, KeyError, OSError) as e:
        print(f"embps snapshot {args.action}: {e}", file=sys.stderr)
        return 1
