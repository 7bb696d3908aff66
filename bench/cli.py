"""`embps bench {table, ps, snapshot, standby-join, freshness, data, train, serve, soak, cut, precision,
report}`: the benchmarks.

Each sub-verb is an (add_arguments, run) pair in BENCHES; a benchmark module (numpy, torch, grpc) is
imported by the run that needs it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import NamedTuple

from bench import flags


def _add_table(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=flags.count, default=10_000_000, help="rows in the table (default 10M)")
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--batch", type=flags.count, default=4096, help="keys per batch")
    parser.add_argument("--batches", type=flags.count, default=200, help="batches per measurement")
    parser.add_argument("--zipf", type=flags.non_negative, default=1.05, help="Zipf exponent of the skewed key stream")
    parser.add_argument(
        "--growth-rows", type=flags.count_or_zero, default=30_000_000,
        help="keys the growth part fills (call times, readers beside a grower; 0: skip it)",
    )
    parser.add_argument(
        "--growth-dim", type=flags.count, default=8, help="row width of the growth part's table and store"
    )
    parser.add_argument(
        "--precision-rows",
        type=flags.count_or_zero,
        default=2_000_000,
        help="rows of each float32/float16/int8 table of the precision part (0: skip it)",
    )
    parser.add_argument(
        "--eviction-capacities",
        type=flags.counts_or_zero,
        default=(40_000, 1_000_000),
        help="comma-separated capacities of the eviction part's full LRU tables (0: skip it)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_table(args: argparse.Namespace) -> int:
    from ps.process.malloc import exec_with_malloc_tuning

    # The same glibc thresholds as a shard: no mmap + page faults for every 1 MB output, for
    # our lookups and the raw gather alike.
    exec_with_malloc_tuning(args.argv)
    from bench.table_bench import TableBenchConfig, run_table_bench

    config = TableBenchConfig(
        rows=args.rows, dim=args.dim, batch=args.batch, batches=args.batches, zipf=args.zipf,
        growth_rows=args.growth_rows, growth_dim=args.growth_dim, precision_rows=args.precision_rows,
        eviction_capacities=args.eviction_capacities, out=args.out,
    )
    return run_table_bench(config)


def _add_ps(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=flags.count, default=2)
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--batch", type=flags.count, default=4096, help="keys per client call")
    parser.add_argument("--batches", type=flags.count, default=300, help="calls per client process per phase")
    parser.add_argument("--rows", type=flags.count, default=1_000_000, help="distinct keys in the Zipf stream")
    parser.add_argument("--zipf", type=flags.non_negative, default=1.05)
    parser.add_argument("--clients", type=flags.counts, default=(1, 4), help="comma-separated client process counts")
    parser.add_argument(
        "--tables", type=flags.count, default=1,
        help="tables per call: each call is one LookupMulti / PushMulti round (batch / tables keys each)",
    )
    parser.add_argument(
        "--malloc", default="tuned", choices=["tuned", "default", "both"], help="glibc malloc thresholds of the shards"
    )
    parser.add_argument(
        "--standbys",
        default="off",
        choices=["off", "on", "both"],
        help="a standby per shard (etcd as the arbiter, started here); both: the same phases without and with, "
        "and the ratio",
    )
    parser.add_argument(
        "--repeat", type=flags.count, default=1,
        help="rounds, each mode once per round; ratios per round and their median"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_ps(args: argparse.Namespace) -> int:
    from bench.ps_bench import PSBenchConfig, run_ps_bench

    config = PSBenchConfig(
        shards=args.shards,
        dim=args.dim,
        batch=args.batch,
        batches=args.batches,
        rows=args.rows,
        zipf=args.zipf,
        clients=args.clients,
        tables=args.tables,
        malloc=args.malloc,
        standbys=args.standbys,
        repeat=args.repeat,
        out=args.out,
    )
    return run_ps_bench(config)


def _add_snapshot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=flags.count, default=10_000_000, help="rows in all tables (default 10M)")
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--tables", type=flags.count, default=1, help="tables the rows are spread over (default 1)")
    parser.add_argument("--touched", type=float, default=0.01, help="fraction of rows an incremental holds")
    parser.add_argument(
        "--staging-bytes", type=flags.count_or_zero, default=1 << 62,
        help="the staged full write's budget for table copies (default: every table; 0: none)",
    )
    parser.add_argument("--targets", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_snapshot(args: argparse.Namespace) -> int:
    from bench.snapshot_bench import SnapshotBenchConfig, run_snapshot_bench

    config = SnapshotBenchConfig(
        rows=args.rows,
        dim=args.dim,
        tables=args.tables,
        touched=args.touched,
        staging_bytes=args.staging_bytes,
        targets=tuple(t for t in args.targets.split(",") if t),
        out=args.out,
    )
    return run_snapshot_bench(config)


def _add_standby_join(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=flags.count, default=2_000_000, help="rows in the table (default 2M)")
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--batch", type=flags.count, default=1024, help="keys per push during the join")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_standby_join(args: argparse.Namespace) -> int:
    from bench.standby_join_bench import StandbyJoinBenchConfig, run_standby_join_bench

    return run_standby_join_bench(StandbyJoinBenchConfig(rows=args.rows, dim=args.dim, batch=args.batch, out=args.out))


def _add_arbiter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=flags.count, default=400, help="etcd calls per measured case")
    parser.add_argument("--seconds", type=flags.positive, default=10.0, help="how long the idle pair is measured")
    parser.add_argument("--lease", type=flags.count, default=2, help="the pair's lease_seconds")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_arbiter(args: argparse.Namespace) -> int:
    from bench.arbiter_bench import ArbiterBenchConfig, run_arbiter_bench

    return run_arbiter_bench(
        ArbiterBenchConfig(calls=args.calls, seconds=args.seconds, lease_seconds=args.lease, out=args.out)
    )


def _add_catchup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscribers", type=flags.count, default=6, help="processes re-reading ranges")
    parser.add_argument("--behind", type=flags.count, default=400, help="pushes of 2,048 keys a subscriber is behind")
    parser.add_argument("--seconds", type=flags.positive, default=12.0, help="length of the phase with subscribers")
    parser.add_argument("--alone-seconds", type=flags.positive, default=4.0, help="length of the phase without")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_catchup(args: argparse.Namespace) -> int:
    from bench.catchup_bench import CatchupBenchConfig, run_catchup_bench

    return run_catchup_bench(
        CatchupBenchConfig(
            subscribers=args.subscribers,
            behind=args.behind,
            seconds=args.seconds,
            alone_seconds=args.alone_seconds,
            out=args.out,
        )
    )


def _add_freshness(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=flags.count, default=100_000, help="rows pushed per second (default 100k)")
    parser.add_argument("--batch", type=flags.count, default=5_000, help="rows per push")
    parser.add_argument("--seconds", type=flags.positive, default=20.0, help="length of the measurement")
    parser.add_argument("--dim", type=flags.count, default=16)
    parser.add_argument("--shards", type=flags.count, default=2, help="PS shards the pushes spread over")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_freshness(args: argparse.Namespace) -> int:
    from bench.freshness_bench import FreshnessBenchConfig, run_freshness_bench

    return run_freshness_bench(
        FreshnessBenchConfig(rate=args.rate, batch=args.batch, seconds=args.seconds, dim=args.dim, shards=args.shards,
                             out=args.out)
    )


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=flags.count, default=60)
    parser.add_argument("--batch", type=flags.count, default=2048, help="global batch size")
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--tables", type=flags.count, default=26, help="sparse features, one table each")
    parser.add_argument("--shared-table", action="store_true", help="all features in one table")
    parser.add_argument("--keys", type=flags.count, default=100_000, help="distinct keys per feature (Zipf 1.05)")
    parser.add_argument(
        "--capacity", type=flags.count, default=None,
        help="rows per shard and table, LRU eviction: every table full and evicting once the keys pass it "
        "(the in-process run's tables: capacity x shards)",
    )
    parser.add_argument(
        "--shapes",
        choices=["one", "all"],
        default="one",
        help="all: also the features in one shared table, and 200 tables of dim 16, in the same run",
    )
    parser.add_argument(
        "--repeat", type=flags.count, default=1,
        help="rounds, each mode once per round: the table shows each mode's fastest run, then each round's ratios "
        "and their median",
    )
    parser.add_argument(
        "--standbys",
        action="store_true",
        help="also ps sync with a standby per shard (etcd started here as the arbiter), in the same rounds",
    )
    parser.add_argument(
        "--serving",
        action="store_true",
        help="also ps sync with a serving replica following every table (as [[launch.serving]] starts it), "
        "in the same rounds",
    )
    parser.add_argument(
        "--peer",
        choices=["torchrec"],
        default=None,
        help="also train the same model with TorchRec's DistributedModelParallel in each round (`make torchrec`)",
    )
    parser.add_argument(
        "--torchrec-path", default=None, help="the folder torchrec is installed in (default: .venv/torchrec)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_train(args: argparse.Namespace) -> int:
    from bench.train_bench import TrainBenchConfig, run_train_bench

    if args.torchrec_path and args.peer is None:
        print("embps bench train: --torchrec-path applies with --peer torchrec only", file=sys.stderr)
        return 2

    return run_train_bench(
        TrainBenchConfig(
            steps=args.steps,
            batch=args.batch,
            dim=args.dim,
            num_tables=args.tables,
            shared_table=args.shared_table,
            num_keys=args.keys,
            capacity=args.capacity,
            repeat=args.repeat,
            standbys=args.standbys,
            serving=args.serving,
            peer=args.peer,
            out=args.out,
            **({"torchrec_path": args.torchrec_path} if args.torchrec_path else {}),
        ),
        all_shapes=args.shapes == "all",
    )


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="all", metavar="SYSTEM[,SYSTEM...]",
        help="embps, redis, inprocess, several of them separated by commas (run in that order), or all",
    )
    parser.add_argument("--address", default=None, help="HOST:PORT of an existing Serving.Lookup server")
    parser.add_argument("--table", default="emb", help="with --address: the table to look up")
    parser.add_argument("--rows", type=flags.count, default=1_000_000, help="rows every system holds (keys drawn from)")
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--batch", type=flags.count, default=64, help="keys per request (per table with --tables)")
    parser.add_argument(
        "--tables", type=flags.count, default=1,
        help="tables per request: each request reads --batch keys in each (embps: one LookupMany; Redis: one MGET)",
    )
    parser.add_argument(
        "--lookup-threads", default="", metavar="N[,N...]",
        help="run the embps replica once per lookup thread count (default: once, one thread per core)",
    )
    parser.add_argument("--zipf", type=flags.non_negative, default=1.05, help="Zipf exponent of the keys (0: uniform)")
    rate_or_sweep = parser.add_mutually_exclusive_group()
    rate_or_sweep.add_argument("--rate", type=flags.positive, default=None, help="one run at this many requests/s")
    rate_or_sweep.add_argument("--sweep", action="store_true", help="step the rate up until the SLO fails (default)")
    parser.add_argument("--slo-ms", type=flags.positive, default=10.0, help="p99 latency objective of the sweep")
    parser.add_argument("--start-rate", type=flags.positive, default=500.0, help="first rate of the sweep (requests/s)")
    parser.add_argument("--step", type=flags.positive, default=1.5, help="rate factor between sweep steps")
    parser.add_argument("--max-steps", type=flags.count, default=14, help="sweep steps before bisecting")
    parser.add_argument("--duration", type=flags.positive, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=flags.non_negative, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument(
        "--repeat", type=flags.count, default=1,
        help="with --rate: rounds, each system started and measured once per round in turn (medians, ratios per round)",
    )
    parser.add_argument("--clients", type=flags.count, default=2, help="client processes")
    parser.add_argument("--concurrency", type=flags.count, default=32, help="calls in flight per client process")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of p99 vs offered rate here")
    parser.add_argument(
        "--generator", default="auto", choices=["auto", "native", "python"],
        help="load generator: native (C++, one thread per client process; auto: where built) or python threads",
    )
    parser.add_argument(
        "--overload",
        type=flags.positive,
        default=None,
        metavar="FACTOR",
        help="embps only: offer FACTOR x the replica's capacity to a replica with --max-queue and to one without",
    )
    parser.add_argument(
        "--max-queue", type=flags.count, default=16, help="with --overload: max_queue of the bounded one"
    )


def _counts(flag: str, text: str) -> tuple[int, ...]:
    """"1,2" -> (1, 2); "" -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag}: expected integers separated by commas, got {text!r}") from None


# Flags of `bench serve` that an --overload run has no use for: it starts its own two embps
# replicas of one table and offers them an open-loop rate of its own choosing.
_NOT_WITH_OVERLOAD = (
    "--target", "--address", "--table", "--tables", "--rate", "--sweep", "--slo-ms", "--start-rate", "--step",
    "--max-steps", "--repeat", "--plot", "--generator",
)


def _check_overload_flags(args: argparse.Namespace) -> None:
    """ValueError naming the first flag given that does not apply to this kind of serve run."""
    defaults = argparse.ArgumentParser()
    _add_serve(defaults)
    default = defaults.parse_args([])
    if args.overload is None:
        if args.max_queue != default.max_queue:
            raise ValueError("--max-queue: applies with --overload only (a replica's bound is max_queue in serve.toml)")
        return
    for flag in _NOT_WITH_OVERLOAD:
        name = flag[2:].replace("-", "_")
        if getattr(args, name) != getattr(default, name):
            raise ValueError(f"{flag}: does not apply with --overload, which starts two embps replicas of one table "
                             "and offers them FACTOR x their capacity")


def _run_serve(args: argparse.Namespace) -> int:
    _check_overload_flags(args)
    if args.overload is not None:
        from bench.overload_bench import OverloadBenchConfig, run_overload_bench

        threads = _counts("--lookup-threads", args.lookup_threads)
        if len(threads) > 1:
            raise ValueError(f"--lookup-threads: --overload runs one replica setup, give one count, got {threads}")
        return run_overload_bench(
            OverloadBenchConfig(
                factor=args.overload,
                max_queue=args.max_queue,
                rows=args.rows,
                dim=args.dim,
                batch=args.batch,
                zipf=args.zipf,
                duration_s=args.duration,
                warmup_s=args.warmup,
                clients=args.clients,
                concurrency=args.concurrency,
                lookup_threads=threads[0] if threads else None,
                out=args.out,
            )
        )
    from bench.serve_bench import SYSTEMS, ServeBenchConfig, run_serve_bench

    return run_serve_bench(
        ServeBenchConfig(
            targets=SYSTEMS if args.target == "all" else tuple(t for t in args.target.split(",") if t),
            address=args.address,
            table=args.table,
            rows=args.rows,
            dim=args.dim,
            batch=args.batch,
            tables=args.tables,
            lookup_threads=_counts("--lookup-threads", args.lookup_threads),
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
            generator=args.generator,
            repeat=args.repeat,
        )
    )


def _add_client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=flags.count, default=20_000, help="rows in each table of the replica")
    parser.add_argument("--dim", type=flags.count, default=64)
    parser.add_argument("--tables", type=flags.count, default=26, help="tables per lookup_many call (>= 2)")
    parser.add_argument("--batch", type=flags.count, default=300, help="keys per table per call")
    parser.add_argument("--zipf", type=flags.non_negative, default=1.05, help="Zipf exponent of the keys (0: uniform)")
    parser.add_argument("--calls", type=flags.count, default=300, help="calls per measurement")
    parser.add_argument("--repeat", type=flags.count, default=3, help="rounds, each measurement once per round")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_client(args: argparse.Namespace) -> int:
    from bench.client_bench import ClientBenchConfig, run_client_bench

    try:
        config = ClientBenchConfig(
            rows=args.rows, dim=args.dim, tables=args.tables, batch=args.batch, zipf=args.zipf, calls=args.calls,
            repeat=args.repeat, out=args.out,
        )
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    run_client_bench(config)
    return 0


def _add_cut(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tables", type=flags.counts, default=(26, 200), help="comma-separated table counts, measured in turn"
    )
    parser.add_argument("--shards", type=flags.count, default=2)
    parser.add_argument("--steps", type=flags.count, default=20, help="training steps offered per measurement")
    parser.add_argument("--changed", type=float, default=0.25,
                        help="share of (table, shard) ranges that carry rows each step (the others are empty)")
    parser.add_argument("--rows", type=flags.count, default=16, help="rows in a range that carries rows")
    parser.add_argument(
        "--repeat", type=flags.count, default=3, help="runs per table count, interleaved; the fastest counts"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_cut(args: argparse.Namespace) -> int:
    from bench.cut_bench import CutBenchConfig, run_cut_bench

    if not 0.0 <= args.changed <= 1.0:
        raise ValueError(f"--changed must be in [0, 1], got {args.changed!r}")
    config = CutBenchConfig(tables=args.tables, shards=args.shards, steps=args.steps, changed=args.changed,
                            rows=args.rows, repeat=args.repeat, out=args.out)
    return run_cut_bench(config)


def _add_follow(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tables", type=flags.counts, default=(26, 300), help="comma-separated table counts")
    parser.add_argument("--keys", type=flags.count, default=2400, help="keys a step, spread over the tables")
    parser.add_argument("--dim", type=flags.count, default=8, help="embedding dimension")
    parser.add_argument("--seconds", type=flags.positive, default=5.0, help="measured seconds per table count and mode")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_follow(args: argparse.Namespace) -> int:
    from bench.follow_bench import FollowBenchConfig, run_follow_bench

    config = FollowBenchConfig(tables=args.tables, keys=args.keys, dim=args.dim, seconds=args.seconds, out=args.out)
    return run_follow_bench(config)


def _add_soak(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes", type=flags.positive, default=None, help="measured minutes in all (split over the phases)"
    )
    parser.add_argument("--pushes", type=flags.count, default=1000, help="without --minutes: measured pushes per phase")
    parser.add_argument(
        "--phases", default="off,on,follow",
        help="comma-separated phases to run: off (no snapshots), on (snapshots), follow (a replica's two "
        "Subscribe streams and a Commit after each push)",
    )
    parser.add_argument("--follow-keys", type=flags.count, default=16, help="keys per push in phase follow")
    parser.add_argument("--capacity", type=flags.count, default=5000, help="rows the table holds")
    parser.add_argument(
        "--hot", type=flags.count_or_zero, default=600, help="keys a push takes from a hot range of 1.6 x capacity"
    )
    parser.add_argument("--fresh", type=flags.count_or_zero, default=600, help="never-seen keys a push carries")
    parser.add_argument("--max-pending", type=flags.count, default=20_000, help="admission.max_pending of the table")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default="soak.png", help="write a PNG of push latency and RSS over time here")


def _run_soak(args: argparse.Namespace) -> int:
    from bench.soak_bench import PHASE_TITLES, SoakConfig, run_soak_bench

    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASE_TITLES]
    if not phases or unknown:
        raise ValueError(f"--phases must name some of {', '.join(PHASE_TITLES)}, got {args.phases!r}")
    if args.pushes < 10:
        raise ValueError(f"--pushes must be >= 10, got {args.pushes}")
    seconds = args.minutes * 60 / len(phases) if args.minutes is not None else None
    config = SoakConfig(
        capacity=args.capacity,
        hot=args.hot,
        fresh=args.fresh,
        max_pending=args.max_pending,
        follow_keys=args.follow_keys,
        pushes=args.pushes,
        seconds=seconds,
        phases=phases,
        out=args.out,
        plot=args.plot,
    )
    return run_soak_bench(config)


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="JSON files written by embps bench ... --out")
    parser.add_argument("--out", default=None, help="write the markdown here (default: print it)")


def _run_report(args: argparse.Namespace) -> int:
    from bench.report import run_report

    return run_report(args.results, args.out)


def _add_data(parser: argparse.ArgumentParser) -> None:
    from bench.data_bench import add_arguments

    add_arguments(parser)


def _run_data(args: argparse.Namespace) -> int:
    from bench.data_bench import run

    return run(args)


def _add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=flags.count, default=400, help="training steps per run")
    parser.add_argument("--batch", type=flags.count, default=2048, help="samples per step")
    parser.add_argument("--dim", type=flags.count, default=16)
    parser.add_argument("--num-keys", type=flags.count, default=100_000, help="synthetic: distinct keys per feature")
    parser.add_argument("--lr", type=flags.positive, default=0.05, help="row-wise Adagrad learning rate of the table")
    parser.add_argument("--eval-batches", type=flags.count, default=16, help="held-out batches")
    parser.add_argument("--data", default="both", choices=["synthetic", "criteo", "both"])
    parser.add_argument("--criteo-train", nargs="*", default=[], help="Criteo TSV training files (default: written)")
    parser.add_argument("--criteo-eval", nargs="*", default=[], help="Criteo TSV held-out files")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _run_precision(args: argparse.Namespace) -> int:
    from bench.precision_bench import PrecisionBenchConfig, run_precision_bench

    if bool(args.criteo_train) != bool(args.criteo_eval):
        raise ValueError("--criteo-train and --criteo-eval go together")
    config = PrecisionBenchConfig(
        steps=args.steps,
        batch=args.batch,
        dim=args.dim,
        num_keys=args.num_keys,
        lr=args.lr,
        eval_batches=args.eval_batches,
        data=args.data,
        criteo_train=tuple(args.criteo_train),
        criteo_eval=tuple(args.criteo_eval),
        out=args.out,
    )
    return run_precision_bench(config)


class Bench(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHES: dict[str, Bench] = {
    "table": Bench("hash map, lookup and optimizer rates of one table", _add_table, _run_table),
    "ps": Bench("lookup and push rates through 2 local shards over gRPC", _add_ps, _run_ps),
    "snapshot": Bench("snapshot write/read rates to local disk and to local S3", _add_snapshot, _run_snapshot),
    "standby-join": Bench(
        "a new standby's state copy: the primary's longest push and its memory", _add_standby_join, _run_standby_join
    ),
    "arbiter": Bench("CPU per etcd call, and an idle shard pair's CPU per second", _add_arbiter, _run_arbiter),
    "freshness": Bench("push-ack to serving-visible delay under a steady push rate", _add_freshness, _run_freshness),
    "catchup": Bench("push latency while Subscribe streams re-read large ranges", _add_catchup, _run_catchup),
    "data": Bench("input rows/s of the TSV and Parquet readers at W = 1, 2, 4 ranks", _add_data, _run_data),
    "train": Bench("training samples/s through the PS vs in process", _add_train, _run_train),
    "serve": Bench("open-loop latency under load: embps serving vs Redis vs in-process lookup", _add_serve, _run_serve),
    "client": Bench("CPU per call of ServingClient lookups vs the bare gRPC call", _add_client, _run_client),
    "soak": Bench("push cost and shard memory over a long push stream, plotted", _add_soak, _run_soak),
    "cut": Bench("a serving replica's consistent cut: CPU per step as tables grow", _add_cut, _run_cut),
    "follow": Bench("what a replica following the job costs the shards and itself, as tables grow", _add_follow,
                    _run_follow),
    "precision": Bench(
        "eval AUC/logloss of one job trained with float32, float16 and int8 rows", _add_precision, _run_precision
    ),
    "report": Bench("markdown table of `embps bench ... --out` JSON results", _add_report, _run_report),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True)
    for name, bench in BENCHES.items():
        bench.add_arguments(benches.add_parser(name, help=bench.help))


def run(args: argparse.Namespace) -> int:
    """Runs one benchmark. SIGTERM ends it as Ctrl-C does, through its cleanup: the servers it
    started (shards, replicas, etcd, Redis, S3) stop with it instead of living on and taking the
    cores from the next measurement."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    return BENCHES[args.bench].run(args)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
