"""The embps command line: `embps <verb> ...` parses arguments and hands off to the verb's module.

Each verb lives in the package it belongs to, as a module with `add_arguments(parser)` and
`run(args) -> int`; only the chosen verb's module is imported, and those keep their heavy imports
inside `run`, so `embps health` or `embps --help` load no torch. `run` finds the words after
`embps` in `args.argv` (a server re-executes itself with them). `python -m embps ...` works the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable
from typing import NamedTuple


class Verb(NamedTuple):
    module: str  # defines add_arguments(parser) and run(args) -> int
    help: str


_WITH_SUBCOMMANDS = ("bench", "snapshot", "deploy")  # named with their sub-command in a refusal
VERBS: dict[str, Verb] = {
    "ps": Verb("ps.shard.cli", "run one parameter-server shard until SIGTERM"),
    "snapshot": Verb("ps.snapshot.cli", "list, inspect, export or gc stored snapshots"),
    "serve": Verb("serving.cli", "run a serving replica: latest export + live PS deltas, read-only Lookup"),
    "bench": Verb("bench.cli", "benchmarks"),
    "launch": Verb(
        "worker.cli", "run a whole training job: PS shards + workers (+ serving replicas), restarting on failure"
    ),
    "health": Verb(
        "ps.process.health",
        "one gRPC health check of a shard or replica port (exit 0 when SERVING): exec probes, TLS",
    ),
    "deploy": Verb("deploy.cli", "cluster manifests from the job's TOML"),
}


def _parser(verbs: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; the arguments of the verbs in `verbs` only (default: of every verb),
    so that parsing one command imports one verb's module."""
    filled = set(VERBS if verbs is None else verbs)
    parser = argparse.ArgumentParser(prog="embps", description="embps parameter server")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        sub = subparsers.add_parser(name, help=verb.help)
        if name in filled:
            importlib.import_module(verb.module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses `argv` (default: the process's arguments) and runs the verb; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level has no options of its own: the first word that is not one names the verb.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = _parser([chosen] if chosen in VERBS else []).parse_args(argv)
    args.argv = argv
    return importlib.import_module(VERBS[args.verb].module).run(args)


def cli() -> int:
    """The `embps` command: main(), except that a ValueError (what every check of a TOML file, its
    [security] files and the command line raises, naming the field) or a file that cannot be read
    ends the command with one line on stderr and exit status 2 instead of a traceback."""
    try:
        return main()
    except KeyboardInterrupt:  # Ctrl-C before a command set its own handler (its imports): no traceback
        verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        print(f"embps {verb}: interrupted" if verb else "embps: interrupted", file=sys.stderr, flush=True)
        return 130
    except ValueError as exc:
        return _refuse(str(exc))
    except OSError as exc:
        if exc.filename is None:  # not a file the command was given or that its config names
            raise
        return _refuse(f"{exc.filename}: {exc.strerror or exc}")


def _refuse(message: str) -> int:
    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    # The command as typed: "embps bench client: ...", not "embps bench: ..." (verbs with sub-commands).
    command = " ".join(words[:2] if words and words[0] in _WITH_SUBCOMMANDS else words[:1])
    print(f"embps {command}: {message}" if command else f"embps: {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(cli())
