"""Which shard owns a key: splitmix64 -> 2^16 virtual buckets -> a bucket->shard table.

    key (int64) --mix64--> h (uint64) --h & 0xFFFF--> bucket --ShardMap.buckets--> shard

Buckets take the low 16 bits of the mix because the hash map (csrc/hash_map.h) places a key by
the high bits of the same mix: keys of one shard must still spread over the whole map.
Resharding moves whole buckets, so the bucket table (not a modulo) is the source of truth.
The owner rank of a key for the sparse exchange is `shard_of(key) % world_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ps import native

NUM_BUCKETS = 1 << 16
BUCKET_MASK = np.uint64(NUM_BUCKETS - 1)


def bucket_of(keys: np.ndarray) -> np.ndarray:
    """keys (n,) int64 -> buckets (n,) int64 in [0, 2^16)."""
    return (native.mix64(keys) & BUCKET_MASK).astype(np.int64)


@dataclass(frozen=True, eq=False)
class ShardMap:
    """The bucket -> shard table of a job: buckets (2^16,) int32, every shard in [0, num_shards)."""

    num_shards: int
    buckets: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_shards, bool) or not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards: must be an integer >= 1, got {self.num_shards!r}")
        b = np.asarray(self.buckets)
        if b.shape != (NUM_BUCKETS,):
            raise ValueError(f"buckets: expected shape ({NUM_BUCKETS},), got {b.shape}")
        if b.size and (b.min() < 0 or b.max() >= self.num_shards):
            raise ValueError(f"buckets: every shard must be in [0, {self.num_shards}), got [{b.min()}, {b.max()}]")
        b = np.ascontiguousarray(b, dtype=np.int32)
        b.setflags(write=False)
        object.__setattr__(self, "buckets", b)

    @classmethod
    def uniform(cls, num_shards: int) -> ShardMap:
        """Contiguous, equal bucket ranges: bucket b -> b * num_shards // 2^16."""
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards: must be an integer >= 1, got {num_shards!r}")
        buckets = np.arange(NUM_BUCKETS, dtype=np.int64) * num_shards // NUM_BUCKETS
        return cls(num_shards, buckets.astype(np.int32))

    @classmethod
    def from_ranges(cls, num_shards: int, ranges: Sequence[Sequence[int]], where: str = "bucket_ranges") -> ShardMap:
        """ranges: [start, stop, shard] triples that cover [0, 2^16) exactly once, in order."""
        buckets = np.full(NUM_BUCKETS, -1, dtype=np.int32)
        expected_start = 0
        for i, triple in enumerate(ranges):
            if (
                not isinstance(triple, (list, tuple))
                or len(triple) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in triple)
            ):
                raise ValueError(f"{where}[{i}]: must be [start, stop, shard] integers, got {triple!r}")
            start, stop, shard = triple
            if start != expected_start or not start < stop <= NUM_BUCKETS:
                raise ValueError(
                    f"{where}[{i}]: ranges must cover [0, {NUM_BUCKETS}) in order without gaps or overlap; "
                    f"expected start {expected_start} and start < stop <= {NUM_BUCKETS}, got [{start}, {stop})"
                )
            if not 0 <= shard < num_shards:
                raise ValueError(f"{where}[{i}]: shard must be in [0, {num_shards}), got {shard}")
            buckets[start:stop] = shard
            expected_start = stop
        if expected_start != NUM_BUCKETS:
            raise ValueError(f"{where}: ranges end at {expected_start}, they must cover [0, {NUM_BUCKETS})")
        return cls(num_shards, buckets)

    def shard_of(self, keys: np.ndarray) -> np.ndarray:
        """keys (n,) int64 -> owning shard (n,) int32."""
        return self.buckets[bucket_of(keys)]

    def owner_rank(self, keys: np.ndarray, world_size: int) -> np.ndarray:
        """keys (n,) int64 -> the worker rank that pushes them, shard_of(key) % world_size, (n,) int32."""
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        return self.shard_of(keys) % np.int32(world_size)

    def split(self, keys: np.ndarray) -> list[np.ndarray]:
        """keys (n,) int64 -> for each shard s, the positions (m_s,) int64 of its keys, in order."""
        shards = self.shard_of(keys)
        if self.num_shards == 1:
            return [np.arange(keys.shape[0], dtype=np.int64)]
        if self.num_shards <= 8:  # a few linear passes beat a sort
            return [np.flatnonzero(shards == s) for s in range(self.num_shards)]
        order = np.argsort(shards, kind="stable")
        ends = np.searchsorted(shards[order], np.arange(1, self.num_shards + 1), side="left")
        return np.split(order, ends[:-1])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ShardMap)
            and self.num_shards == other.num_shards
            and bool(np.array_equal(self.buckets, other.buckets))
        )

    def __hash__(self) -> int:
        return hash((self.num_shards, self.buckets.tobytes()))


def shard_of(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """keys (n,) int64 -> shard (n,) int32 under the uniform bucket table of `num_shards` shards."""
    return _uniform(num_shards).shard_of(keys)


@lru_cache(maxsize=16)
def _uniform(num_shards: int) -> ShardMap:
    return ShardMap.uniform(num_shards)
