"""Which rows a full table evicts, chosen without sorting every candidate.

A full table (capacity, `lru` or `lfu`) evicts the first rows of its candidates in eviction
order: LRU by (last step, pushes, key), LFU by (pushes, last step, key), ascending. The key breaks
every tie, so a primary, its standby and a resumed job evict the same rows in the same order.

Why not one `np.lexsort` over the candidates: a push of a full table picks tens or hundreds of
victims among thousands of rows (a sample) or tens of thousands (a small table's every row). The
lexsort of three columns, numpy's hash-based `np.unique` of the sample (ps/arrays.py), `np.isin`
against the push's own rows and a walk of the whole map for a small table's candidates made a push
of 512 keys to a full table cost 8-16x the same push to an unbounded one (`embps bench table`'s
eviction part, dim 64: 0.72 ms with every row a candidate and 1.6 ms sampled, against 0.07-0.10
ms; then 0.18 and 0.52-0.58 ms, and 0.20 ms sampled once a sampled eviction freed a sixteenth of
its sample). Here: one linear partition on a 64-bit rank, the ties at the
cut-off ordered by key, and a sort of the victims alone; in the table, a sort instead of
`np.unique`, and its row index's live flags instead of `np.isin` and of the map's export. The
result is the lexsort's prefix, element for element.
"""

from __future__ import annotations

import numpy as np

from ps.table.config import EvictionPolicy


def first_in_order(
    keys: np.ndarray, pushes: np.ndarray, last_step: np.ndarray, count: int, policy: EvictionPolicy
) -> np.ndarray:
    """The first min(count, n) of `keys` in `policy`'s eviction order, in that order.

    keys (n,) int64, distinct; pushes and last_step (n,) uint32: each key's row's push count and
    last pushed step. Equal to `keys[np.lexsort((keys, pushes, last_step))[:count]]` for LRU, and
    to `keys[np.lexsort((keys, last_step, pushes))[:count]]` for LFU.
    """
    n = keys.shape[0]
    count = min(max(count, 0), n)
    if count == 0:
        return np.empty(0, dtype=np.int64)
    first, then = (pushes, last_step) if policy == EvictionPolicy.LFU else (last_step, pushes)
    rank = (first.astype(np.uint64) << np.uint64(32)) | then.astype(np.uint64)
    if count < n:
        cutoff = np.partition(rank, count - 1)[count - 1]
        below = np.flatnonzero(rank < cutoff)
        tied = np.flatnonzero(rank == cutoff)
        tied = tied[np.argsort(keys[tied], kind="stable")[: count - below.shape[0]]]
        chosen = np.concatenate((below, tied))
    else:
        chosen = np.arange(n)
    return keys[chosen[np.lexsort((keys[chosen], rank[chosen]))]]
