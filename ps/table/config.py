"""Configuration of one embedding table, validated before anything is allocated.

Every error names the field and the rule, e.g. `tables.user.dim: must be in [1, 65536], got 0`; `where`
is the path of the table in its config file (default: the table's name).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from ps.errors import ConfigTypeError
from ps.names import NAME_RULE, RESERVED_TABLE_NAMES, is_name


class Initializer(StrEnum):
    ZEROS = "zeros"
    UNIFORM = "uniform"  # U(-init_scale, init_scale)
    NORMAL = "normal"  # N(0, init_scale^2)


class OptimizerKind(StrEnum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"
    FTRL = "ftrl"


class Storage(StrEnum):
    """How a row's value is stored (csrc/row_codec.h has the exact formats)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"  # IEEE half, two per word
    INT8 = "int8"  # row-wise: uint8 codes + float32 scale and bias per row (fbgemm's layout)


class Kernels(StrEnum):
    """Which kernels run a table's optimizer updates (lookups read the row store either way)."""

    AUTO = "auto"  # native on CPU; fbgemm on CUDA where it fuses the optimizer, else torch
    NATIVE = "native"  # our C++ (csrc/row_ops.h, csrc/multi_table.h); CPU rows only
    TORCH = "torch"  # torch ops on gathered rows, one table at a time
    FBGEMM = "fbgemm"  # fbgemm's table-batched kernels, one call per group of tables (fbgemm_kernels.py)


# The optimizers fbgemm fuses with the same math as ours (ps/table/fbgemm_kernels.py).
FBGEMM_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
# Every initial value stays a finite float32: a normal draw reaches 5.9 x init_scale
# (row_ops.h: sqrt(-2 ln(0.5 / 2^24))), float32's largest value is 3.4e38.
MAX_INIT_SCALE = 5e37
# An int8 row keeps (max - min) / 255 as its scale, at most float32's largest value / 256: a row
# whose span passes float32's largest value saturates at its top (csrc/row_codec.h int8_scale), so
# initial rows stay within it. Draws reach +-5.9 x init_scale.
MAX_INT8_INIT_SCALE = 2.5e37


class AdmissionKind(StrEnum):
    NONE = "none"  # every key gets a row on its first push
    COUNT = "count"  # a key gets a row once pushed `min_count` times
    PROBABILITY = "probability"  # each push of a new key admits it with `probability`


class EvictionPolicy(StrEnum):
    NONE = "none"  # a full table refuses new keys (CapacityError)
    LFU = "lfu"  # a full table drops the least frequently pushed rows
    LRU = "lru"  # a full table drops the least recently pushed rows


@dataclass(frozen=True)
class OptimizerConfig:
    """Sparse optimizer applied once per unique key per push, to the key's summed gradient.

    `lr` is the learning rate (FTRL's alpha). `eps` is used by adagrad, rowwise_adagrad and adam;
    `beta1`, `beta2` by adam; `initial_accumulator` by adagrad and rowwise_adagrad;
    `ftrl_beta`, `l1`, `l2` by ftrl.
    """

    kind: OptimizerKind = OptimizerKind.ROWWISE_ADAGRAD
    lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    initial_accumulator: float = 0.0
    ftrl_beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0

    def __post_init__(self) -> None:
        _coerce_enums(self, {"kind": OptimizerKind})


@dataclass(frozen=True)
class AdmissionConfig:
    """Which keys earn a trainable row. Until admitted, lookup returns the key's init value and
    pushes only count the key.

    max_pending: keys a shard counts while they wait for admission (60 to 100 bytes each); past
    it the keys first seen longest ago are forgotten (embps_admission_dropped_total counts them),
    so an unbounded id space costs bounded memory. A forgotten key starts counting afresh.
    """

    kind: AdmissionKind = AdmissionKind.NONE
    min_count: int = 1
    probability: float = 1.0
    max_pending: int = 1 << 20

    def __post_init__(self) -> None:
        _coerce_enums(self, {"kind": AdmissionKind})


@dataclass(frozen=True)
class EvictionConfig:
    """Which rows leave. `ttl_steps`: rows not pushed for more than this many steps are dropped
    (None: never): a push or a lookup of step s finds a row last pushed before s - ttl_steps
    absent (its init), whenever the sweep frees it. `policy`: what a full table (see
    TableConfig.capacity) drops to make room."""

    ttl_steps: int | None = None
    policy: EvictionPolicy = EvictionPolicy.NONE

    def __post_init__(self) -> None:
        _coerce_enums(self, {"policy": EvictionPolicy})


@dataclass(frozen=True)
class TableConfig:
    """One hash-keyed embedding table.

    name: table name: letters, digits, "_", "." and "-" (not "." or "..").
    dim: embedding width, > 0.
    dtype: the type values travel and compute in; float32 only (others are refused).
    storage: how the table keeps its row values: "float32", "float16" or "int8" (row-wise, with a
      float32 scale and bias per row). Lookups decode to float32; an update decodes, runs the
      optimizer in float32 (its state stays float32) and encodes with stochastic rounding whose
      bits are a pure function of (seed, key, step). float16 and int8 need device "cpu".
    initializer, init_scale, seed: a new row's value is a pure function of (seed, key).
    capacity: maximum rows on one shard (None: bounded only by memory, at most 2^32 - 1).
    expected_rows: rows one shard is expected to reach (None: no hint). The key->row map is sized
        for them up front, so it does not grow at all until they are passed (it still grows past
        them, in pieces); costs ~17-26 bytes per expected row from the start.
    device: "cpu" or "cuda[:i]" for the row storage; the key->row map always lives on the host.
    kernels: which kernels run updates: "auto" (our C++ on CPU, where it is the faster; fbgemm's on
      CUDA for sgd, adagrad and rowwise_adagrad), "native", "torch" or "fbgemm" (float32 rows and
      the three optimizers fbgemm fuses; needs the fbgemm extra).
    """

    name: str
    dim: int
    dtype: str = "float32"
    storage: Storage = Storage.FLOAT32
    initializer: Initializer = Initializer.UNIFORM
    init_scale: float = 0.01
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    capacity: int | None = None
    expected_rows: int | None = None
    device: str = "cpu"
    kernels: Kernels = Kernels.AUTO

    def __post_init__(self) -> None:
        _coerce_enums(self, {"storage": Storage, "initializer": Initializer, "kernels": Kernels})

    def validate(self, where: str | None = None) -> TableConfig:
        """Raises ValueError naming the first bad field; returns self when valid."""
        p = where if where is not None else self.name
        if not is_name(self.name):
            raise ValueError(f"{p}.name: must be {NAME_RULE}, got {self.name!r}")
        if self.name in RESERVED_TABLE_NAMES:
            raise ValueError(
                f"{p}.name: {self.name!r} is a snapshot step folder's own entry; name the table otherwise"
            )
        _check_int(f"{p}.dim", self.dim, low=1, high=65536)
        if self.dtype != "float32":
            raise ValueError(f"{p}.dtype: only 'float32' rows are supported, got {self.dtype!r}")
        _check_enum(f"{p}.storage", self.storage, Storage)
        _check_enum(f"{p}.initializer", self.initializer, Initializer)
        _check_float(f"{p}.init_scale", self.init_scale, low=0.0, high=MAX_INIT_SCALE)
        if self.storage == Storage.INT8 and self.init_scale > MAX_INT8_INIT_SCALE:
            raise ValueError(
                f"{p}.init_scale: at most {MAX_INT8_INIT_SCALE:g} with storage 'int8' (a row's span, max - min, must "
                f"stay a finite float32), got {_number(self.init_scale)}"
            )
        _check_int(f"{p}.seed", self.seed, low=0, high=2**64 - 1)
        if self.capacity is not None:
            _check_int(f"{p}.capacity", self.capacity, low=1, high=2**32 - 2)
        if self.expected_rows is not None:
            _check_int(f"{p}.expected_rows", self.expected_rows, low=1, high=2**32 - 2)
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"{p}.device: must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if self.storage != Storage.FLOAT32 and self.device != "cpu":
            raise ValueError(f"{p}.storage: '{self.storage}' rows need device 'cpu', got {self.device!r}")
        for name, kind in _PARTS:
            value = getattr(self, name)
            if not isinstance(value, kind):
                got = f"{type(value).__name__} {value!r:.60}"
                raise ConfigTypeError(f"{p}.{name}: must be an {kind.__name__}, got {got}")
        o = self.optimizer
        _check_enum(f"{p}.optimizer.kind", o.kind, OptimizerKind)
        _check_enum(f"{p}.kernels", self.kernels, Kernels)
        if self.kernels == Kernels.NATIVE and self.device != "cpu":
            raise ValueError(f"{p}.kernels: 'native' needs device 'cpu', got {self.device!r}")
        if self.kernels in (Kernels.FBGEMM, Kernels.TORCH) and self.storage != Storage.FLOAT32:
            raise ValueError(
                f"{p}.kernels: '{self.kernels}' has no {self.storage} rows (they run in the C++ kernels)"
            )
        if self.kernels == Kernels.FBGEMM and o.kind not in FBGEMM_OPTIMIZERS:
            raise ValueError(
                f"{p}.kernels: fbgemm fuses {', '.join(FBGEMM_OPTIMIZERS)} with our math, not '{o.kind}'; "
                "use kernels 'auto'"
            )
        # The kernels compute in float32: every setting must be a float32 (1e39 became inf, and the
        # first push, even of a zero gradient, made its rows NaN).
        _check_float(f"{p}.optimizer.lr", o.lr, low=0.0, strict=True, high=_FLOAT32_MAX)
        if o.lr < _FLOAT32_TINY:
            raise ValueError(f"{p}.optimizer.lr: must be at least {_FLOAT32_TINY:.6g} (0 in float32 below), got {o.lr}")
        _check_float(f"{p}.optimizer.eps", o.eps, low=0.0, high=_FLOAT32_MAX)
        _check_float(f"{p}.optimizer.beta1", o.beta1, low=0.0, high=1.0)
        _check_float(f"{p}.optimizer.beta2", o.beta2, low=0.0, high=1.0)
        _check_float(f"{p}.optimizer.initial_accumulator", o.initial_accumulator, low=0.0, high=_FLOAT32_MAX)
        _check_float(f"{p}.optimizer.ftrl_beta", o.ftrl_beta, low=0.0, high=_FLOAT32_MAX)
        _check_float(f"{p}.optimizer.l1", o.l1, low=0.0, high=_FLOAT32_MAX)
        _check_float(f"{p}.optimizer.l2", o.l2, low=0.0, high=_FLOAT32_MAX)
        _check_optimizer_denominators(p, o)
        a = self.admission
        _check_enum(f"{p}.admission.kind", a.kind, AdmissionKind)
        _check_int(f"{p}.admission.min_count", a.min_count, low=1, high=2**31)
        _check_float(f"{p}.admission.probability", a.probability, low=0.0, high=1.0)
        _check_int(f"{p}.admission.max_pending", a.max_pending, low=1, high=2**32 - 2)
        if a.kind == AdmissionKind.PROBABILITY and a.probability == 0.0:
            raise ValueError(f"{p}.admission.probability: must be > 0, or no key could ever train")
        e = self.eviction
        _check_enum(f"{p}.eviction.policy", e.policy, EvictionPolicy)
        if e.ttl_steps is not None:
            _check_int(f"{p}.eviction.ttl_steps", e.ttl_steps, low=1, high=2**31)
        if e.policy != EvictionPolicy.NONE and self.capacity is None:
            raise ValueError(
                f"{p}.eviction.policy: '{e.policy}' evicts only when the table is full, so it needs "
                f"{p}.capacity to be set"
            )
        return self


_PARTS = (("optimizer", OptimizerConfig), ("admission", AdmissionConfig), ("eviction", EvictionConfig))
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32 (a smaller lr was 0 or subnormal)


def _check_int(path: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{path}: must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{path}: must be in [{low}, {high}], got {value}")


_LARGEST_FLOAT = int(sys.float_info.max)


def _check_float(path: str, value: object, low: float, high: float = math.inf, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{path}: must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, int) and abs(value) > _LARGEST_FLOAT:  # math.isfinite would raise OverflowError
        raise ValueError(f"{path}: must be finite, got an integer of {len(str(abs(value)))} digits")
    if not math.isfinite(value):
        raise ValueError(f"{path}: must be finite, got {value}")
    if value < low or (strict and value == low) or value > high:
        bound = f"> {_number(low)}" if strict else f">= {_number(low)}"
        if high != math.inf:
            bound += f" and <= {_number(high)}"
        raise ValueError(f"{path}: must be {bound}, got {value}")


def _number(x: float) -> str:
    """A bound as a message says it: 3.40282e+38, not 3.4028234663852886e+38."""
    return f"{x:.6g}" if x and not 1e-4 <= abs(x) < 1e16 else str(x)


def _check_optimizer_denominators(p: str, o: OptimizerConfig) -> None:
    """The settings that would divide by zero in the kernels' float32 math, turning a row NaN for
    good: Adam's bias corrections 1 - beta^t (beta rounded to float32 must stay below 1), and the
    square roots of accumulators that a zero gradient leaves at 0 (eps, or for adagrad an initial
    accumulator, must be a positive float32)."""
    if o.kind == OptimizerKind.ADAM:
        for name, beta in (("beta1", o.beta1), ("beta2", o.beta2)):
            if not np.float32(beta) < 1.0:
                raise ValueError(f"{p}.optimizer.{name}: must be < 1 (Adam divides by 1 - {name}^t), got {beta}")
        if not np.float32(o.eps) > 0.0:
            raise ValueError(f"{p}.optimizer.eps: adam needs eps > 0 (a float32 above 0), got {o.eps}")
    if o.kind in (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD):
        if not (np.float32(o.eps) > 0.0 or np.float32(o.initial_accumulator) > 0.0):
            raise ValueError(
                f"{p}.optimizer.eps: {o.kind} needs eps > 0 or initial_accumulator > 0 (a float32 above 0): "
                f"a zero gradient on a fresh row would divide 0 by 0; got eps {o.eps}, "
                f"initial_accumulator {o.initial_accumulator}"
            )
    if o.kind == OptimizerKind.ROWWISE_ADAGRAD:
        # Its step is g x lr / (sqrt(s) + eps), the factor taken first: on a fresh row with a zero
        # gradient an infinite factor times 0 made the whole row NaN.
        with np.errstate(over="ignore", divide="ignore"):
            factor = np.float32(o.lr) / (np.sqrt(np.float32(o.initial_accumulator)) + np.float32(o.eps))
        if not np.isfinite(factor):
            raise ValueError(
                f"{p}.optimizer.eps: rowwise_adagrad's first step multiplies by lr / (sqrt(initial_accumulator) + "
                f"eps), which overflows float32 at lr {o.lr}, eps {o.eps}, initial_accumulator "
                f"{o.initial_accumulator}; raise eps or initial_accumulator"
            )
    if o.kind == OptimizerKind.FTRL and not (np.float32(o.ftrl_beta) > 0.0 or np.float32(o.l2) > 0.0):
        # A weight is -(z - l1) / ((ftrl_beta + sqrt(n)) / lr + l2): a gradient whose square is 0 in
        # float32 (|g| < 4e-23) left n at 0 and the weight at +-inf for good.
        raise ValueError(
            f"{p}.optimizer.ftrl_beta: ftrl needs ftrl_beta > 0 or l2 > 0 (a float32 above 0), or a weight "
            f"divides by 0 before its first squared gradient; got ftrl_beta {o.ftrl_beta}, l2 {o.l2}"
        )


def _coerce_enums(config: object, fields: dict[str, type[StrEnum]]) -> None:
    """A plain string that names a member becomes the member (`kind="adam"` as TOML gives it):
    the kernels' bindings read the member's name, and a string passed validate, then failed there
    with an AttributeError naming no field. Anything else stays for validate to name."""
    for name, enum in fields.items():
        value = getattr(config, name)
        if isinstance(value, str) and not isinstance(value, enum) and value in enum._value2member_map_:
            object.__setattr__(config, name, enum(value))


def _check_enum(path: str, value: object, enum: type[StrEnum]) -> None:
    if value not in set(enum):
        choices = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"{path}: must be one of {choices}, got {value!r}")
