"""The embps command line: `embps <verb> ...` parses arguments and hands off (imports lazily).

Verbs: ps | serve | launch | health | snapshot {list, inspect, export, gc} | deploy render |
bench {table, ps, train, snapshot, freshness, serve, report}. `python -m embps ...` works the same.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embps", description="embps parameter server")
    verbs = parser.add_subparsers(dest="verb", required=True)

    ps = verbs.add_parser("ps", help="run one parameter-server shard until SIGTERM")
    ps.add_argument("--config", required=True, help="job config (TOML): tables and shards")
    ps.add_argument("--shard", type=int, required=True, help="index of this shard in the config's [[shards]]")
    ps.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get after SIGTERM")
    ps.add_argument(
        "--update-log-keys",
        type=int,
        default=1 << 20,
        help="keys each table's update log keeps for Subscribe (older pushes need a full resync)",
    )
    ps.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's malloc thresholds (by default the shard re-executes itself with larger ones)",
    )
    ps.add_argument(
        "--restore-step", type=int, default=None, help="load the tables of this snapshot step ([snapshot] uri) first"
    )

    snapshot = verbs.add_parser("snapshot", help="list, inspect, export or gc stored snapshots")
    snapshot.add_argument("action", choices=["list", "inspect", "export", "gc"])
    snapshot.add_argument("uri", help="storage root: file:///path, a path, s3://bucket/prefix, hdfs://host:port/path")
    snapshot.add_argument("--job", required=True, help="job name (the folder under the URI)")
    snapshot.add_argument("--step", type=int, default=None, help="inspect/export this step (default: latest)")
    snapshot.add_argument("--dst", default=None, help="export: destination URI")
    snapshot.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="export: value type")
    snapshot.add_argument("--keep", type=int, default=None, help="gc: how many newest snapshots to keep")
    snapshot.add_argument("--dry-run", action="store_true", help="gc: print what would be deleted, delete nothing")

    serve = verbs.add_parser("serve", help="run a serving replica: latest export + live PS deltas, read-only Lookup")
    serve.add_argument("--config", required=True, help="serve.toml: the job to follow, listen address, export")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get after SIGTERM")
    serve.add_argument(
        "--no-malloc-tuning", action="store_true", help="keep glibc's malloc thresholds (see `embps ps`)"
    )

    bench = verbs.add_parser("bench", help="benchmarks")
    bench_verbs = bench.add_subparsers(dest="bench", required=True)
    table = bench_verbs.add_parser("table", help="hash map, lookup and optimizer rates of one table")
    table.add_argument("--rows", type=int, default=10_000_000, help="rows in the table (default 10M)")
    table.add_argument("--dim", type=int, default=64)
    table.add_argument("--batch", type=int, default=4096, help="keys per batch")
    table.add_argument("--batches", type=int, default=200, help="batches per measurement")
    table.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the skewed key stream")
    table.add_argument("--out", default=None, help="write the results as JSON here")

    ps_bench = bench_verbs.add_parser("ps", help="lookup and push rates through 2 local shards over gRPC")
    ps_bench.add_argument("--shards", type=int, default=2)
    ps_bench.add_argument("--dim", type=int, default=64)
    ps_bench.add_argument("--batch", type=int, default=4096, help="keys per client call")
    ps_bench.add_argument("--batches", type=int, default=300, help="calls per client process per phase")
    ps_bench.add_argument("--rows", type=int, default=1_000_000, help="distinct keys in the Zipf stream")
    ps_bench.add_argument("--zipf", type=float, default=1.05)
    ps_bench.add_argument("--clients", default="1,4", help="comma-separated client process counts")
    ps_bench.add_argument(
        "--malloc", default="tuned", choices=["tuned", "default", "both"], help="glibc malloc thresholds of the shards"
    )
    ps_bench.add_argument("--out", default=None, help="write the results as JSON here")

    snap_bench = bench_verbs.add_parser("snapshot", help="snapshot write/read rates to local disk and to local S3")
    snap_bench.add_argument("--rows", type=int, default=10_000_000, help="rows in the table (default 10M)")
    snap_bench.add_argument("--dim", type=int, default=64)
    snap_bench.add_argument("--touched", type=float, default=0.01, help="fraction of rows an incremental holds")
    snap_bench.add_argument("--targets", default="local,s3", help="comma-separated: local, s3")
    snap_bench.add_argument("--out", default=None, help="write the results as JSON here")

    fresh = bench_verbs.add_parser("freshness", help="push-ack to serving-visible delay under a steady push rate")
    fresh.add_argument("--rate", type=int, default=100_000, help="rows pushed per second (default 100k)")
    fresh.add_argument("--batch", type=int, default=5_000, help="rows per push")
    fresh.add_argument("--seconds", type=float, default=20.0, help="length of the measurement")
    fresh.add_argument("--dim", type=int, default=16)
    fresh.add_argument("--out", default=None, help="write the results as JSON here")

    train_bench = bench_verbs.add_parser("train", help="training samples/s through the PS vs in process")
    train_bench.add_argument("--steps", type=int, default=60)
    train_bench.add_argument("--batch", type=int, default=2048, help="global batch size")
    train_bench.add_argument("--dim", type=int, default=64)
    train_bench.add_argument("--tables", type=int, default=26, help="sparse features, one table each")
    train_bench.add_argument("--shared-table", action="store_true", help="all features in one table")
    train_bench.add_argument("--out", default=None, help="write the results as JSON here")

    serve_bench = bench_verbs.add_parser(
        "serve", help="open-loop latency under load: embps serving vs Redis vs in-process lookup"
    )
    serve_bench.add_argument("--target", default="all", choices=["embps", "redis", "inprocess", "all"])
    serve_bench.add_argument("--address", default=None, help="HOST:PORT of an existing Serving.Lookup server")
    serve_bench.add_argument("--table", default="emb", help="with --address: the table to look up")
    serve_bench.add_argument("--rows", type=int, default=1_000_000, help="rows every system holds (keys drawn from)")
    serve_bench.add_argument("--dim", type=int, default=64)
    serve_bench.add_argument("--batch", type=int, default=64, help="keys per request")
    serve_bench.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the keys (0: uniform)")
    rate_or_sweep = serve_bench.add_mutually_exclusive_group()
    rate_or_sweep.add_argument("--rate", type=float, default=None, help="one run at this many requests/s")
    rate_or_sweep.add_argument("--sweep", action="store_true", help="step the rate up until the SLO fails (default)")
    serve_bench.add_argument("--slo-ms", type=float, default=10.0, help="p99 latency objective of the sweep")
    serve_bench.add_argument("--start-rate", type=float, default=500.0, help="first rate of the sweep (requests/s)")
    serve_bench.add_argument("--step", type=float, default=1.5, help="rate factor between sweep steps")
    serve_bench.add_argument("--max-steps", type=int, default=14, help="sweep steps before bisecting")
    serve_bench.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    serve_bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    serve_bench.add_argument("--clients", type=int, default=2, help="client processes")
    serve_bench.add_argument("--concurrency", type=int, default=32, help="calls in flight per client process")
    serve_bench.add_argument("--out", default=None, help="write the results as JSON here")
    serve_bench.add_argument("--plot", default=None, help="write a PNG of p99 vs offered rate here")
    serve_bench.add_argument(
        "--overload", type=float, default=None, metavar="FACTOR",
        help="embps only: offer FACTOR x the replica's capacity to a replica with --max-queue and to one without",
    )
    serve_bench.add_argument("--max-queue", type=int, default=16, help="with --overload: max_queue of the bounded one")

    report = bench_verbs.add_parser("report", help="markdown table of `embps bench ... --out` JSON results")
    report.add_argument("results", nargs="+", help="JSON files written by embps bench ... --out")
    report.add_argument("--out", default=None, help="write the markdown here (default: print it)")

    launch = verbs.add_parser(
        "launch", help="run a whole training job: PS shards + workers (+ serving replicas), restarting on failure"
    )
    launch.add_argument("config", help="job TOML (PS part plus [train], [model], [data])")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes of the job (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank; node 0 starts the PS shards")
    launch.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (multi-node)")
    launch.add_argument(
        "--no-ps", action="store_true", help="start no PS shards on this node (they run elsewhere; default: node 0)"
    )
    launch.add_argument(
        "--local-addr", default=None, help="address other nodes reach this node at (default: its host name)"
    )
    launch.add_argument("--resume", action="store_true", help="continue from the job's LATEST snapshot")
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        help="restarts from the LATEST snapshot after a worker or PS shard dies (default: [launch] max_restarts, 0)",
    )

    health = verbs.add_parser(
        "health", help="one gRPC health check of a shard or replica port (exit 0 when SERVING): exec probes, TLS"
    )
    health.add_argument("address", help="HOST:PORT of the port to check")
    health.add_argument("--config", default=None, help="job TOML whose [security] to use (default: plaintext)")
    health.add_argument("--service", default="", help="health service name (default '': the whole server)")
    health.add_argument(
        "--server-name", default=None, help="TLS: the name the server certificate must have (default: the host)"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")

    deploy = verbs.add_parser("deploy", help="cluster manifests from the job's TOML")
    deploy_verbs = deploy.add_subparsers(dest="deploy", required=True)
    render = deploy_verbs.add_parser("render", help="write Kubernetes manifests ([deploy] section) into --out")
    render.add_argument("config", help="job TOML with a [deploy] section")
    render.add_argument("--out", required=True, help="folder for the manifests (`kubectl apply -f DIR`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "ps":
        from ps.process.malloc import exec_with_malloc_tuning
        from ps.shard.server import serve_shard

        if not args.no_malloc_tuning:
            exec_with_malloc_tuning(sys.argv[1:] if argv is None else argv)
        return serve_shard(
            args.config,
            args.shard,
            grace=args.grace,
            log_max_keys=args.update_log_keys,
            restore_step=args.restore_step,
        )
    if args.verb == "snapshot":
        from ps.snapshot.cli import run_snapshot_cli

        if args.action == "export" and args.dst is None:
            raise SystemExit("embps snapshot export: --dst is required")
        if args.action == "gc" and args.keep is None:
            raise SystemExit("embps snapshot gc: --keep is required")
        return run_snapshot_cli(args)
    if args.verb == "bench" and args.bench == "snapshot":
        from bench.snapshot_bench import SnapshotBenchConfig, run_snapshot_bench

        config = SnapshotBenchConfig(
            rows=args.rows,
            dim=args.dim,
            touched=args.touched,
            targets=tuple(t for t in args.targets.split(",") if t),
            out=args.out,
        )
        return run_snapshot_bench(config)
    if args.verb == "serve":
        from ps.process.malloc import exec_with_malloc_tuning
        from serving.server import serve_replica

        if not args.no_malloc_tuning:
            exec_with_malloc_tuning(sys.argv[1:] if argv is None else argv)
        return serve_replica(args.config, grace=args.grace)
    if args.verb == "bench" and args.bench == "ps":
        from bench.ps_bench import PSBenchConfig, run_ps_bench

        config = PSBenchConfig(
            shards=args.shards,
            dim=args.dim,
            batch=args.batch,
            batches=args.batches,
            rows=args.rows,
            zipf=args.zipf,
            clients=tuple(int(c) for c in args.clients.split(",")),
            malloc=args.malloc,
            out=args.out,
        )
        return run_ps_bench(config)
    if args.verb == "bench" and args.bench == "table":
        from ps.process.malloc import exec_with_malloc_tuning

        # The same glibc thresholds as a shard: no mmap + page faults for every 1 MB output, for
        # our lookups and the raw gather alike.
        exec_with_malloc_tuning(sys.argv[1:] if argv is None else argv)
        from bench.table_bench import TableBenchConfig, run_table_bench

        config = TableBenchConfig(
            rows=args.rows, dim=args.dim, batch=args.batch, batches=args.batches, zipf=args.zipf, out=args.out
        )
        return run_table_bench(config)
    if args.verb == "bench" and args.bench == "freshness":
        from bench.freshness_bench import FreshnessBenchConfig, run_freshness_bench

        return run_freshness_bench(
            FreshnessBenchConfig(rate=args.rate, batch=args.batch, seconds=args.seconds, dim=args.dim, out=args.out)
        )
    if args.verb == "bench" and args.bench == "train":
        from bench.train_bench import TrainBenchConfig, run_train_bench

        return run_train_bench(
            TrainBenchConfig(
                steps=args.steps,
                batch=args.batch,
                dim=args.dim,
                num_tables=args.tables,
                shared_table=args.shared_table,
                out=args.out,
            )
        )
    if args.verb == "bench" and args.bench == "serve" and args.overload is not None:
        from bench.overload_bench import OverloadBenchConfig, run_overload_bench

        return run_overload_bench(
            OverloadBenchConfig(
                factor=args.overload, max_queue=args.max_queue, rows=args.rows, dim=args.dim, batch=args.batch,
                zipf=args.zipf, duration_s=args.duration, warmup_s=args.warmup, clients=args.clients,
                concurrency=args.concurrency, out=args.out,
            )
        )
    if args.verb == "bench" and args.bench == "serve":
        from bench.serve_bench import SYSTEMS, ServeBenchConfig, run_serve_bench

        return run_serve_bench(
            ServeBenchConfig(
                targets=SYSTEMS if args.target == "all" else (args.target,),
                address=args.address,
                table=args.table,
                rows=args.rows,
                dim=args.dim,
                batch=args.batch,
                zipf=args.zipf,
                rate=args.rate,
                slo_ms=args.slo_ms,
                start_rate=args.start_rate,
                step_factor=args.step,
                max_steps=args.max_steps,
                duration_s=args.duration,
                warmup_s=args.warmup,
                clients=args.clients,
                concurrency=args.concurrency,
                out=args.out,
                plot=args.plot,
            )
        )
    if args.verb == "bench" and args.bench == "report":
        from bench.report import run_report

        return run_report(args.results, args.out)
    if args.verb == "launch":
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
    if args.verb == "health":
        from ps.process.health import HealthProbe, health_cli, load_security
        from ps.security import SecurityConfig

        try:
            probe = HealthProbe(args.address, args.service, args.server_name, args.timeout)
        except ValueError as exc:
            print(f"embps health: {exc}")
            return 2
        try:
            security = load_security(args.config) if args.config else SecurityConfig()
        except (ValueError, TypeError) as exc:
            print(f"embps health: {args.config}: {exc}")
            return 2
        return health_cli(probe, security)
    if args.verb == "deploy" and args.deploy == "render":
        from deploy.render import render_cli

        return render_cli(args.config, args.out)
    raise SystemExit(f"embps: unknown verb {args.verb!r}")


def cli() -> int:
    """The `embps` command: main(), except that a ValueError (what every check of a TOML file, its
    [security] files and the command line raises, naming the field) ends the command with one line
    on stderr and exit status 2 instead of a traceback."""
    try:
        return main()
    except ValueError as exc:
        verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        print(f"embps {verb}: {exc}" if verb else f"embps: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
