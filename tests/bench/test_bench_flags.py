"""A bench flag out of range is refused by argparse, naming the flag, before anything starts
(bench/flags.py): before, `--clients 0` printed a table header and then `max() arg is an empty
sequence`, `--rows 0` a numpy message, and `--zipf nan` filled a 10M-row table first."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bench import flags
from tests.helpers.processes import REPO_ROOT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ps", "--clients", "0"], "argument --clients: must be integers >= 1 separated by commas, got '0'"),
        (["ps", "--clients", "1,x"], "argument --clients: must be integers >= 1 separated by commas, got '1,x'"),
        (["ps", "--batch", "0"], "argument --batch: must be an integer >= 1, got '0'"),
        (["table", "--rows", "0"], "argument --rows: must be an integer >= 1, got '0'"),
        (["table", "--zipf", "nan"], "argument --zipf: must be a finite number, got 'nan'"),
        (["table", "--eviction-capacities", "40000,0"],
         "argument --eviction-capacities: must be integers >= 1 separated by commas, got '40000,0'"),
        (["serve", "--rate", "-5"], "argument --rate: must be a finite number > 0, got '-5'"),
        (["serve", "--warmup", "-1"], "argument --warmup: must be a finite number >= 0, got '-1'"),
        (["train", "--repeat", "0"], "argument --repeat: must be an integer >= 1, got '0'"),
        (["train", "--capacity", "0"], "argument --capacity: must be an integer >= 1, got '0'"),
        (["cut", "--tables", "26,0"], "argument --tables: must be integers >= 1 separated by commas, got '26,0'"),
        (["follow", "--seconds", "0"], "argument --seconds: must be a finite number > 0, got '0'"),
        (["soak", "--minutes", "inf"], "argument --minutes: must be a finite number, got 'inf'"),
        (["standby-join", "--rows", "0"], "argument --rows: must be an integer >= 1, got '0'"),
    ],
)
def test_a_flag_out_of_range_is_named_before_the_bench_starts(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embps", "bench", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == "", done.stdout  # no header, no progress: nothing ran
    assert done.stderr.strip().splitlines()[-1] == f"embps bench {argv[0]}: error: {message}", done.stderr


def test_the_types_take_what_is_in_range() -> None:
    assert flags.count("3") == 3 and flags.count_or_zero("0") == 0
    assert flags.counts("1,4") == (1, 4) and flags.counts(" 2 ") == (2,)
    assert flags.positive("0.5") == 0.5 and flags.non_negative("0") == 0.0
    for bad in ("", "1,,2", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            flags.counts(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        flags.count_or_zero("-1")
