"""`embps serve --config serve.toml`: one serving replica until SIGTERM (serving/server.py)."""

from __future__ import annotations

import argparse
import math

# The most seconds --grace takes, as for `embps ps`: a day; more is a typo, not a plan.
MAX_GRACE_SECONDS = 86400.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="serve.toml: the job to follow, listen address, export")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get after SIGTERM")
    parser.add_argument(
        "--no-malloc-tuning", action="store_true", help="keep glibc's malloc thresholds (see `embps ps`)"
    )


def run(args: argparse.Namespace) -> int:
    """Re-executes itself with tuned malloc thresholds (unless --no-malloc-tuning), then serves;
    the process ends with the replica's exit status (ps/process/exit.py)."""
    from ps.process.children import die_with_launcher
    from ps.process.exit import exit_process
    from ps.process.malloc import exec_with_malloc_tuning

    if not (math.isfinite(args.grace) and 0 <= args.grace <= MAX_GRACE_SECONDS):
        raise ValueError(f"--grace: must be a number of seconds in [0, {MAX_GRACE_SECONDS:g}], got {args.grace}")
    die_with_launcher()  # first: the prctl holds across the re-exec
    if not args.no_malloc_tuning:
        exec_with_malloc_tuning(args.argv)
    from serving.server import serve_replica  # after the re-exec, which would import it twice
    exit_process(serve_replica(args.config, grace=args.grace))
