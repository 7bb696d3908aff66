"""Independent numpy reference of low-precision rows (the format in csrc/row_codec.h): encode,
decode, the stochastic rounding bits, and an sgd / row-wise Adagrad table that trains through
them. Written from the format's description, not from the C++; the tests compare bit for bit."""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
ROUNDING_SALT = np.uint64(0x53524F554E44)
INIT_STREAM = 2**32


def mix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def rounding_bits(seed: int, keys: np.ndarray, stream: int, dim: int) -> np.ndarray:
    """(n, dim) uint64: the 16 random bits of element j of key i's row for `stream`: 16-bit
    slice j % 4 (lowest first) of the hash of element group j // 4."""
    seed_mix = mix64(np.array([seed], dtype=np.uint64) ^ ROUNDING_SALT)[0]
    with np.errstate(over="ignore"):
        base = mix64(mix64(keys.astype(np.int64).view(np.uint64) ^ seed_mix) + np.uint64(stream) * GOLDEN)
        j = np.arange(dim, dtype=np.uint64)
        hashes = mix64(base[:, None] + (j[None, :] // np.uint64(4) + np.uint64(1)) * GOLDEN)
        return (hashes >> (np.uint64(16) * (j % np.uint64(4)))[None, :]) & np.uint64(0xFFFF)


def value_words(storage: str, dim: int) -> int:
    return {"float32": dim, "float16": (dim + 1) // 2, "int8": 2 + (dim + 3) // 4}[storage]


def half_toward_zero(b: np.ndarray) -> np.ndarray:
    """float32 bit patterns (uint32) -> binary16 bit patterns (uint16), rounding toward zero."""
    b = b.astype(np.uint32)
    sign = (b >> 16) & 0x8000
    e = ((b >> 23) & 0xFF).astype(np.int64)
    m = b & 0x7FFFFF
    out = np.zeros(b.shape, dtype=np.uint32)
    normal = (e >= 113) & (e <= 142)
    out[normal] = ((e[normal] - 112).astype(np.uint32) << 10) | (m[normal] >> 13)
    sub = (e >= 102) & (e < 113)
    out[sub] = (m[sub] | 0x800000) >> (126 - e[sub]).astype(np.uint32)
    out[(e > 142) & (e < 255)] = 0x7BFF
    special = e == 255
    out[special] = 0x7C00 | np.where(m[special] != 0, 0x200 | (m[special] >> 13), 0)  # nan stays quiet
    return (out | sign).astype(np.uint16)


def encode(storage: str, seed: int, keys: np.ndarray, stream: int, values: np.ndarray) -> np.ndarray:
    """values (n, dim) float32 -> stored bytes (n, 4 * value_words) uint8."""
    n, dim = values.shape
    out = np.zeros((n, 4 * value_words(storage, dim)), dtype=np.uint8)
    if storage == "float32":
        out[:] = values.astype(np.float32).view(np.uint8)
        return out
    bits = rounding_bits(seed, keys, stream, dim)
    if storage == "float16":
        b = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        below_max = (b & np.uint64(0x7FFFFFFF)) < np.uint64(0x477FE000)  # 65504 and over (inf, nan): saturated
        b = np.where(below_max, b + (bits >> np.uint64(3)), b)
        halves = half_toward_zero(b.astype(np.uint32))
        out[:, : 2 * dim] = halves.view(np.uint8)
        return out
    v = values.astype(np.float32)
    lo, hi = v.min(axis=1), v.max(axis=1)
    max_scale = np.float32(np.finfo(np.float32).max) / np.float32(256.0)
    with np.errstate(over="ignore"):  # a span past float32's largest value: the scale saturates
        scale = np.minimum((hi - lo) / np.float32(255.0), max_scale)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
    inv = np.where(np.isfinite(inv), inv, np.float32(0.0))  # a subnormal scale: encoded as equal values
    u = bits.astype(np.float32) * np.float32(1.0 / 65536.0)
    with np.errstate(over="ignore", invalid="ignore"):
        t = (v - lo[:, None]) * inv[:, None]
    codes = np.minimum(np.floor(t + u), 255).astype(np.uint8)  # t + u >= 0
    header = np.stack([scale, lo], axis=1).astype(np.float32)
    out[:, :8] = header.view(np.uint8)
    out[:, 8 : 8 + dim] = codes
    return out


def decode(storage: str, stored: np.ndarray, dim: int) -> np.ndarray:
    """stored bytes (n, 4 * value_words) uint8 -> values (n, dim) float32."""
    stored = np.ascontiguousarray(stored)
    if storage == "float32":
        return stored.view(np.float32)[:, :dim].copy()
    if storage == "float16":
        values = stored[:, : 2 * dim].copy().view(np.float16).astype(np.float32)
        bits = values.view(np.uint32)
        bits[np.isnan(values)] |= 0x400000  # nan made quiet
        return values
    header = stored[:, :8].copy().view(np.float32)
    scale, bias = header[:, 0:1], header[:, 1:2]
    return stored[:, 8 : 8 + dim].astype(np.float32) * scale + bias


class LowPrecisionReference:
    """A table of per-key rows kept as stored bytes, trained by sgd or row-wise Adagrad in float32
    numpy in the kernels' order of operations, encoded after each update with stream = step."""

    def __init__(self, storage: str, kind: str, lr: float, eps: float, seed: int, init) -> None:
        self.storage, self.kind, self.seed, self.init = storage, kind, seed, init
        self.lr, self.eps = np.float32(lr), np.float32(eps)
        self.rows: dict[int, np.ndarray] = {}
        self.acc: dict[int, np.float32] = {}

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        dim = self.init(keys[:1]).shape[1]
        out = self.init(keys).copy()
        for i, k in enumerate(keys.tolist()):
            if k in self.rows:
                out[i] = decode(self.storage, self.rows[k][None, :], dim)[0]
        return out

    def step(self, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
        summed: dict[int, np.ndarray] = {}
        for k, g in zip(keys.tolist(), grads, strict=True):
            summed[k] = summed[k] + g if k in summed else g.astype(np.float32).copy()
        for k, g in summed.items():
            key = np.array([k], dtype=np.int64)
            dim = g.shape[0]
            if k not in self.rows:
                self.rows[k] = encode(self.storage, self.seed, key, INIT_STREAM + step, self.init(key))[0]
                self.acc[k] = np.float32(0.0)
            w = decode(self.storage, self.rows[k][None, :], dim)[0]
            if self.kind == "sgd":
                w = w - self.lr * g
            else:
                sq = np.cumsum(g * g, dtype=np.float32)[-1]
                self.acc[k] = np.float32(self.acc[k] + sq / np.float32(dim))
                mult = np.float32(self.lr / (np.sqrt(self.acc[k]) + self.eps))
                w = w - mult * g
            self.rows[k] = encode(self.storage, self.seed, key, step, w.astype(np.float32)[None, :])[0]
