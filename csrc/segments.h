// A client's request of many tables as ragged segments of one key buffer (table t's keys at
// [offsets[t], offsets[t + 1])), every segment deduplicated in one call.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "hash_map.h"

namespace embps {

// Distinct keys of each segment in first-occurrence order: segment t's at
// unique[unique_offsets[t] : unique_offsets[t + 1]]; inverse[i] is the position of keys[i] among
// its own segment's distinct keys. offsets (g + 1,) must rise from 0. Returns the distinct keys.
inline int64_t unique_by_segment(const int64_t* keys, const int64_t* offsets, int64_t g, int64_t* unique,
                                 int64_t* unique_offsets, int64_t* inverse) {
  int64_t u = 0;
  unique_offsets[0] = 0;
  std::vector<int64_t> slot;
  for (int64_t t = 0; t < g; ++t) {
    const int64_t begin = offsets[t], end = offsets[t + 1];
    if (begin > end) throw std::invalid_argument("offsets: must not fall");
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(2 * (end - begin))) cap <<= 1;
    slot.assign(cap, -1);
    const uint64_t mask = cap - 1;
    const int64_t first = u;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t key = keys[i];
      uint64_t pos = mix64(static_cast<uint64_t>(key)) & mask;
      while (slot[pos] >= 0 && unique[slot[pos]] != key) pos = (pos + 1) & mask;
      if (slot[pos] < 0) {
        slot[pos] = u;
        unique[u++] = key;
      }
      inverse[i] = slot[pos] - first;
    }
    unique_offsets[t + 1] = u;
  }
  return u;
}

}  // namespace embps
