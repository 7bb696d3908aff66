"""In-process embedding tables behind the PSClient verbs the trainer uses: training without a PS.

The single-process ceiling of `embps bench train`, and a way to run the same trainer on one
machine without servers. Same tables, same optimizer math, no RPC.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ps import native
from ps.sharding import ShardMap
from ps.table import multi
from ps.table.config import TableConfig
from ps.table.embedding_table import EmbeddingTable


@dataclass(frozen=True)
class MultiRound:
    """A multi-table push round: keys table after table with offsets, grads flat."""

    tables: list[str]
    keys: np.ndarray
    offsets: np.ndarray
    grads: np.ndarray
    counts: np.ndarray | None


class LocalTables:
    """lookup/push of PSClient on EmbeddingTables in this process (one shard).

    Thread-safe as PSClient is: table calls are serialised, as a shard serialises them. An async
    trainer looks up the next batch on one thread while it pushes on another, and a lookup beside a
    push that grows a table could find a row the push inserted before its block was in the lookup's
    view of the table.
    """

    def __init__(self, tables: list[TableConfig]) -> None:
        self.tables = {t.name: EmbeddingTable(t) for t in tables}
        self.shard_map = ShardMap.uniform(1)
        self.committed_step = 0
        self._lock = threading.Lock()

    def lookup(self, table: str, keys: np.ndarray, step: int | None = None) -> np.ndarray:
        """keys (n,) int64 -> values (n, dim) float32, read for `step` as PSClient.lookup's are
        (None: the table's last step pushed)."""
        with self._lock:
            embedding = self.tables[table]
            return embedding.read(keys, embedding.step if step is None else step)

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int | None = None, counts=None) -> None:
        """keys (n,) int64, grads (n, dim) float32: one optimizer step per unique key."""
        with self._lock:
            self.tables[table].apply_gradients(keys, grads, step=step, counts=counts)

    def lookup_many(self, requests: dict[str, np.ndarray], step: int | None = None) -> dict[str, np.ndarray]:
        return {table: self.lookup(table, keys, step) for table, keys in requests.items()}

    def push_many(self, items, step: int | None = None) -> None:
        """items: (table, keys (n,), grads (n, dim), counts (n,) or None)."""
        self.send_push(self.prepare_push(items, step))

    def prepare_push(self, items, step: int | None = None) -> tuple[list, int | None]:
        """PSClient.prepare_push's counterpart. Nothing here fails midway, so the trainer never
        sends one twice (PSClient's prepared pushes carry push ids for that)."""
        return list(items), step

    def send_push(self, prepared: tuple[list, int | None]) -> None:
        items, step = prepared
        if items and isinstance(items[0], MultiRound):
            r = items[0]
            tables = [self.tables[t] for t in r.tables]
            counts = None if r.counts is None else np.asarray(r.counts, dtype=np.int64)
            # What a shard checks before push_tables (ps/shard/state.py), so that a bad gradient is
            # refused here as it is there, not applied to a row.
            if counts is not None:
                native.check_counts(counts)
            native.check_gradients(r.grads, None)
            with self._lock:
                multi.push_tables(tables, r.keys, r.offsets, r.grads, counts, step)
            return
        for table, keys, grads, counts in items:
            self.push(table, keys, grads, step=step, counts=counts)

    def lookup_multi(
        self, tables: list[str], keys: np.ndarray, offsets: np.ndarray, step: int | None = None
    ) -> np.ndarray:
        """PSClient.lookup_multi's counterpart: every table in one native call."""
        chosen = [self.tables[t] for t in tables]
        with self._lock:
            steps = [t.step if step is None else step for t in chosen]
            return multi.lookup_tables(chosen, keys, np.asarray(offsets, dtype=np.int64), steps)

    def lookup_multi_grouped(
        self, tables: list[str], keys: np.ndarray, offsets: np.ndarray, step: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """PSClient.lookup_multi_grouped's counterpart: the rows come in key order (positions None)."""
        dims = {self.tables[t].dim for t in tables}
        if len(dims) > 1:
            raise ValueError(f"tables: lookup_multi_grouped needs tables of one dim, got {sorted(dims)}")
        dim = dims.pop() if dims else 0
        return self.lookup_multi(tables, keys, offsets, step).reshape(-1, dim), None

    def prepare_push_multi(
        self, tables, keys, offsets, grads, counts=None, step: int | None = None, distinct: bool = False
    ) -> tuple[tuple, int | None]:
        """PSClient.prepare_push_multi's counterpart: (the round, step); send_push applies it.
        Tables without keys are left out, as the client leaves them out of its requests."""
        offsets = np.asarray(offsets, dtype=np.int64)
        grads = np.asarray(grads, dtype=np.float32).reshape(-1)
        sizes = np.diff(offsets)
        if (sizes == 0).any():
            chosen = [self.tables[t] for t in tables]
            starts = multi.value_offsets(chosen, offsets)
            present = np.flatnonzero(sizes)
            keys = np.concatenate([keys[offsets[i] : offsets[i + 1]] for i in present] or [np.zeros(0, np.int64)])
            grads = np.concatenate([grads[starts[i] : starts[i + 1]] for i in present] or [np.zeros(0, np.float32)])
            if counts is not None:
                parts = [counts[offsets[i] : offsets[i + 1]] for i in present]
                counts = np.concatenate(parts or [np.zeros(0, np.int64)])
            tables = [tables[i] for i in present]
            offsets = np.concatenate([[0], np.cumsum(sizes[present])]).astype(np.int64)
        return (MultiRound(list(tables), keys, offsets, grads, counts),), step

    def commit(self, step: int, dense_state: bytes = b"", dense_format: str = "") -> None:
        """PSClient.commit's counterpart: no replica follows these tables, so it only records the step."""
        self.committed_step = step

    def close(self) -> None:
        self.tables.clear()
