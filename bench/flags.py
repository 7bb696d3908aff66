"""argparse types of the bench flags: a value out of range is refused by argparse itself, naming
the flag (`embps bench ps: error: argument --batch: must be an integer >= 1, got '0'`, exit 2),
before any table is filled or any process started."""

from __future__ import annotations

import argparse
import math


def count(text: str) -> int:
    """An integer >= 1 (rows, keys, batches, processes, rounds)."""
    return _integer(text, 1)


def count_or_zero(text: str) -> int:
    """An integer >= 0 (0: that part is skipped or empty)."""
    return _integer(text, 0)


def counts(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1, at least one: "1,4" -> (1, 4)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"must be integers >= 1 separated by commas, got {text!r}")
    return tuple(int(part) for part in parts)


def counts_or_zero(text: str) -> tuple[int, ...]:
    """`counts`, or "0": none (that part is skipped)."""
    return () if text.strip() == "0" else counts(text)


def positive(text: str) -> float:
    """A finite number > 0 (seconds, rates, factors)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0 (a Zipf exponent, 0 being uniform; seconds that may be none)."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
