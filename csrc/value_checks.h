// Whole-buffer checks a shard makes before it applies a push: are the gradients finite, are the
// keys its own. Each is one pass over the buffer that allocates nothing (numpy's isfinite(x).all()
// writes a bool per value and reads them back; docs/performance.md has both timed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hash_map.h"

namespace embps {

// Index of the first NaN or infinity of values (n,), or -1 when every value is finite.
// Chunks are scanned without a branch per value (the loop vectorizes), then the bad chunk again.
inline int64_t first_non_finite(const float* values, int64_t n) {
  constexpr int64_t kChunk = 2048;
  constexpr uint32_t kExponent = 0x7f800000u;  // all ones: infinity or NaN
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    uint32_t bad = 0;
    for (int64_t i = start; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, values + i, sizeof bits);
      bad |= static_cast<uint32_t>((bits & kExponent) == kExponent);
    }
    if (bad) {
      for (int64_t i = start; i < end; ++i) {
        if (!std::isfinite(values[i])) return i;
      }
    }
  }
  return -1;
}

// Index of the first key of keys (n,) that buckets (num_buckets, a power of two) does not give to
// shard `shard` (bucket = mix64(key) & (num_buckets - 1), as ps/sharding.py), or -1.
inline int64_t first_foreign_key(const int64_t* keys, int64_t n, const int32_t* buckets, uint64_t num_buckets,
                                 int32_t shard) {
  const uint64_t mask = num_buckets - 1;
  for (int64_t i = 0; i < n; ++i) {
    if (buckets[mix64(static_cast<uint64_t>(keys[i])) & mask] != shard) return i;
  }
  return -1;
}

}  // namespace embps
