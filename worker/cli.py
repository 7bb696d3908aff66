"""`embps launch job.toml`: a whole training job on this node (worker/launcher.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job TOML (PS part plus [train], [model], [data])")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes of the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank; node 0 starts the PS shards")
    parser.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (multi-node)")
    parser.add_argument(
        "--no-ps", action="store_true", help="start no PS shards on this node (they run elsewhere; default: node 0)"
    )
    parser.add_argument(
        "--local-addr", default=None, help="address other nodes reach this node at (default: its host name)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the job's LATEST snapshot")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        help="restarts from the LATEST snapshot after a worker or PS shard dies (default: [launch] max_restarts, 0)",
    )


def run(args: argparse.Namespace) -> int:
    from worker.launcher import LaunchOptions, launch

    return launch(
        LaunchOptions(
            config_path=args.config,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
            start_ps=False if args.no_ps else None,
            local_addr=args.local_addr,
            resume=args.resume,
            max_restarts=args.max_restarts,
        )
    )
