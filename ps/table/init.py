"""A new row's initial value: a pure function of (table seed, key), never of which shard creates
it or when (DESIGN section 2). The PS table and the serving replica both call `init_values`; the
formula is in csrc/row_ops.h."""

from __future__ import annotations

import numpy as np

from ps import native
from ps.table.config import TableConfig


def init_values(config: TableConfig, keys: np.ndarray) -> np.ndarray:
    """keys (n,) int64 -> (n, config.dim) float32: the rows these keys start with in this table,
    from config.seed, config.initializer and config.init_scale."""
    return native.init_values(config.seed, config.initializer, config.init_scale, keys, config.dim)
