// Whole-buffer checks a shard makes before it applies a push: are the gradients finite and in
// range, are the keys its own. Each is one pass over the buffer that allocates nothing (numpy's isfinite(x).all()
// writes a bool per value and reads them back; docs/performance.md has both timed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hash_map.h"

namespace embps {

// Index of the first value of values (n,) that is NaN, infinite or larger than `limit` (finite,
// >= 0) in magnitude, or -1. On the bits, |v| > limit exactly when (bits & 0x7fffffff) exceeds the
// bits of limit: positive floats order as their bits do, and NaN and infinity (exponent all ones)
// exceed every finite bit pattern. Chunks are scanned without a branch per value (the loop
// vectorizes), then the bad chunk again.
inline int64_t first_out_of_range(const float* values, int64_t n, float limit) {
  constexpr int64_t kChunk = 2048;
  constexpr uint32_t kMagnitude = 0x7fffffffu;
  uint32_t limit_bits;
  std::memcpy(&limit_bits, &limit, sizeof limit_bits);
  limit_bits &= kMagnitude;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    uint32_t bad = 0;
    for (int64_t i = start; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, values + i, sizeof bits);
      bad |= static_cast<uint32_t>((bits & kMagnitude) > limit_bits);
    }
    if (bad) {
      for (int64_t i = start; i < end; ++i) {
        uint32_t bits;
        std::memcpy(&bits, values + i, sizeof bits);
        if ((bits & kMagnitude) > limit_bits) return i;
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
