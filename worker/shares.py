"""Which rows each rank reads: units of work, their order per epoch, and each rank's share.

A unit is the smallest piece one rank parses alone: a Parquet row group, a byte range of a
plain TSV file (a gzip file is one unit: it cannot be entered in the middle). Per epoch e:

    file order  = files in `data.paths` order, or a permutation from rng(seed, e) when shuffled
    unit list   = the units of each file in that order (row groups / byte ranges in file order)
    rank r      = units r, r + W, r + 2W, ... of the list (round robin)

so the W shares are disjoint, cover every unit once, and are a pure function of (files, seed,
W, e). Every rank reads the same footers and file sizes to build the list; none reads rows of
another rank's units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Unit:
    """A piece of one file: Parquet row group `part` (start 0, end = its rows), or TSV bytes
    [start, end) (end -1: the whole stream, for gzip)."""

    file_index: int
    part: int
    start: int
    end: int


def epoch_units(units_by_file: Sequence[Sequence[Unit]], epoch: int, seed: int, shuffle_files: bool) -> list[Unit]:
    """The unit list of epoch `epoch` (see the module doc)."""
    order = np.arange(len(units_by_file))
    if shuffle_files:
        order = np.random.default_rng([seed, 0x5EED, epoch]).permutation(len(units_by_file))
    return [unit for f in order for unit in units_by_file[int(f)]]


def rank_share(units: Sequence[Unit], rank: int, world_size: int) -> list[Unit]:
    """Rank `rank`'s units of an epoch's list: every W-th from position `rank`."""
    return list(units[rank::world_size])


def byte_ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about `range_bytes` covering a file of `size` bytes (one if empty)."""
    count = max(1, -(-size // range_bytes))
    bounds = [size * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
