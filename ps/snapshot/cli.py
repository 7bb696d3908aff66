"""`embps snapshot list|inspect|export|gc URI --job NAME`: look at and manage stored snapshots.

S3 settings come from the AWS_* variables (see ps/snapshot/storage.py). Errors print one line to stderr
and return exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from ps.errors import EmbpsError
from ps.snapshot.files import Manifest, latest, list_snapshots, open_snapshot
from ps.snapshot.ops import collect_garbage, export_for_serving


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _list(args: argparse.Namespace) -> int:
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


def _describe(m: Manifest) -> list[str]:
    parent = f", parent step {m.parent}" if m.parent is not None else ""
    lines = [
        f"job {m.job} step {m.step}: {m.kind}{parent}, {m.num_shards} shard(s), created {m.created}",
        f"  {m.total_rows:,} rows, {_size(m.total_bytes)} in {len(m.files) + len(m.extra)} files",
    ]
    for name, t in sorted(m.tables.items()):
        optimizer = t.config["optimizer"]["kind"] if t.config else "unknown optimizer"
        lines.append(f"  table {name}: dim {t.dim} {t.dtype}, {optimizer} (state width {t.state_width})")
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
    print("\n".join(_describe(open_snapshot(args.uri, args.job, args.step).manifest)))
    return 0


def _export(args: argparse.Namespace) -> int:
    m = export_for_serving(args.uri, args.job, args.step, args.dst, dtype=args.dtype)
    print(f"exported step {m.step} of job {m.job} to {args.dst}: {m.total_rows:,} rows, {_size(m.total_bytes)}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    result = collect_garbage(args.uri, args.job, args.keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"

    def steps(s: tuple[int, ...]) -> str:
        return ", ".join(map(str, s)) or "none"

    print(f"kept {steps(result.kept)}; {verb} {steps(result.deleted)}; incomplete {steps(result.deleted_incomplete)}")
    return 0


_ACTIONS = {"list": _list, "inspect": _inspect, "export": _export, "gc": _gc}


def run_snapshot_cli(args: argparse.Namespace) -> int:
    """Runs the `embps snapshot` action args.action with the parsed arguments of embps.py."""
    try:
        return _ACTIONS[args.action](args)
    except (EmbpsError, ValueError, KeyError, OSError) as e:
        print(f"embps snapshot {args.action}: {e}", file=sys.stderr)
        return 1
