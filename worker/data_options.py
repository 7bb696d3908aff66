"""The `[data]` section's options that a job file names: how readers treat bad rows and which
allocator Arrow uses, and the synthetic data set's shape. Apart from the readers and the data
set themselves (pyarrow, torch) so that what only reads a job (the launcher, `embps deploy`)
imports neither."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class BadRowPolicy(StrEnum):
    """What a reader does with a malformed row (wrong column count, non-numeric number field)."""

    SKIP = "skip"  # count it, log (rate-limited), go on
    FAIL = "fail"  # raise ValueError naming file and line


class ArrowMemoryPool(StrEnum):
    """The allocator Arrow uses in a reading process (decoded columns, parse temporaries)."""

    AUTO = "auto"  # the reader's: jemalloc for Parquet, mimalloc for TSV (see configure_arrow)
    SYSTEM = "system"  # malloc
    JEMALLOC = "jemalloc"
    MIMALLOC = "mimalloc"  # pyarrow's usual default: 1 GiB arenas marked for transparent huge pages
    DEFAULT = "default"  # leave the process's pool as it is (ARROW_DEFAULT_MEMORY_POOL or pyarrow's)


MAX_SYNTHETIC_KEYS = 2**28  # the planted model holds a float64 cumulative weight per key: 2 GiB at this bound


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic data set. Defaults have Criteo's shape with a 100k-key vocabulary per feature.

    Errors name the field without its section (`num_keys: ...`); the job loader
    (worker/train_config.py) puts `data.synthetic.` in front."""

    num_dense: int = 13
    num_sparse: int = 26
    num_keys: int = 100_000  # distinct keys per feature
    zipf_alpha: float = 1.05  # P(rank k) ~ (k + 1)^-alpha; 0 is uniform
    global_batch_size: int = 2048
    num_batches: int = 1000  # global batches in the training split
    num_eval_batches: int = 16  # global batches in the eval split
    signal_std: float = 3.0  # std of the sparse part of the planted logit
    dense_scale: float = 1.0  # std of the dense part, roughly
    bias: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_sparse", "num_keys", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_keys > MAX_SYNTHETIC_KEYS:  # the reader would allocate 8 bytes a key, then 8 more, at start
            raise ValueError(
                f"num_keys: must be at most {MAX_SYNTHETIC_KEYS:,} (2^28; the data set keeps 8 bytes a key), "
                f"got {self.num_keys:,}"
            )
        for name in ("num_dense", "num_batches", "num_eval_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("zipf_alpha", "signal_std", "dense_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
        if not math.isfinite(self.bias):
            raise ValueError(f"bias: must be finite, got {self.bias}")
        if not 0 <= self.seed < 2**64:  # numpy's default_rng takes no negative seed
            raise ValueError(f"seed: must be in [0, {2**64 - 1}], got {self.seed}")
