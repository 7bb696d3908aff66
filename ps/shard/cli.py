"""`embps ps --config job.toml --shard I`: one parameter-server shard until SIGTERM (ps/shard/server.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job config (TOML): tables and shards")
    parser.add_argument("--shard", type=int, required=True, help="index of this shard in the config's [[shards]]")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get after SIGTERM")
    parser.add_argument(
        "--update-log-keys",
        type=int,
        default=1 << 20,
        help="keys each table's update log keeps for Subscribe, at most (each also keeps at most its share of "
        "1 GiB per shard; older pushes need a full resync)",
    )
    parser.add_argument(
        "--stream-stall-seconds",
        type=float,
        default=60.0,
        help="a Subscribe stream whose client takes no message for this long is ended (RESOURCE_EXHAUSTED)",
    )
    parser.add_argument(
        "--subscribe-memory-bytes",
        type=int,
        default=1 << 30,
        help="bytes of keys and rows the Subscribe streams' ranges hold at once, all streams together; a range "
        "past them waits its turn (one larger than them is sent alone)",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's malloc thresholds (by default the shard re-executes itself with larger ones)",
    )
    parser.add_argument(
        "--restore-step", type=int, default=None, help="load the tables of this snapshot step ([snapshot] uri) first"
    )
    parser.add_argument(
        "--standby",
        nargs="?",
        const="standby",
        choices=["standby", "primary"],
        default=None,
        help="run as the shard's standby: at its [[shards]] standby address, or (--standby primary) at its "
        "primary's, where a new standby goes after a failover",
    )


def run(args: argparse.Namespace) -> int:
    """Re-executes itself with tuned malloc thresholds (unless --no-malloc-tuning), then serves;
    the process ends with the shard's exit status (ps/process/exit.py)."""
    from ps.process.children import die_with_launcher
    from ps.process.exit import exit_process
    from ps.process.malloc import exec_with_malloc_tuning

    die_with_launcher()  # first: the prctl holds across the re-exec
    if not args.no_malloc_tuning:
        exec_with_malloc_tuning(args.argv)
    from ps.shard.server import serve_shard  # after the re-exec, which would import it twice
    exit_process(
        serve_shard(
            args.config,
            args.shard,
            grace=args.grace,
            log_max_keys=args.update_log_keys,
            stream_stall_seconds=args.stream_stall_seconds,
            subscribe_memory_bytes=args.subscribe_memory_bytes,
            restore_step=args.restore_step,
            standby=args.standby,
        )
    )
