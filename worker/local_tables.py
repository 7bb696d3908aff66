"""In-process embedding tables behind the PSClient verbs the trainer uses: training without a PS.

The single-process ceiling of `embps bench train`, and a way to run the same trainer on one
machine without servers. Same tables, same optimizer math, no RPC.
"""

from __future__ import annotations

import numpy as np

from ps.sharding import ShardMap
from ps.table.config import TableConfig
from ps.table.embedding_table import EmbeddingTable


class LocalTables:
    """lookup/push of PSClient on EmbeddingTables in this process (one shard)."""

    def __init__(self, tables: list[TableConfig]) -> None:
        self.tables = {t.name: EmbeddingTable(t) for t in tables}
        self.shard_map = ShardMap.uniform(1)

    def lookup(self, table: str, keys: np.ndarray) -> np.ndarray:
        """keys (n,) int64 -> values (n, dim) float32."""
        return self.tables[table].lookup(keys).numpy()

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int | None = None, counts=None) -> None:
        """keys (n,) int64, grads (n, dim) float32: one optimizer step per unique key."""
        self.tables[table].apply_gradients(keys, grads, step=step, counts=counts)

    def lookup_many(self, requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {table: self.lookup(table, keys) for table, keys in requests.items()}

    def push_many(self, items, step: int | None = None) -> None:
        """items: (table, keys (n,), grads (n, dim), counts (n,) or None)."""
        self.send_push(self.prepare_push(items, step))

    def prepare_push(self, items, step: int | None = None) -> tuple[list, int | None]:
        """PSClient.prepare_push's counterpart. Nothing here fails midway, so the trainer never
        sends one twice (PSClient's prepared pushes carry push ids for that)."""
        return list(items), step

    def send_push(self, prepared: tuple[list, int | None]) -> None:
        items, step = prepared
        for table, keys, grads, counts in items:
            self.push(table, keys, grads, step=step, counts=counts)

    def close(self) -> None:
        self.tables.clear()
