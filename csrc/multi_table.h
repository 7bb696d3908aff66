// Many tables in one call: the shard's multi-table Lookup/Push and the worker's one dedupe over
// every table of a step (fbgemm's table-batched idea: one call, per-table offsets).
//
// Keys of T tables travel in one buffer, table after table; offsets (T + 1,) say where each
// table's keys start (offsets[0] = 0, offsets[T] = n). Values and gradients follow the same
// order, table t's rows being dim_t wide, so table t's values start at sum_{s<t} n_s * dim_s.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "hash_map.h"
#include "row_ops.h"

namespace embps {

// One table of a multi-table call: its map, rows, init and optimizer.
struct TableRef {
  HashMap* map;
  BlockStore store;
  int64_t dim;
  int64_t state_width;
  Init init;
  uint64_t seed;
  double scale;
  Optimizer opt;
  const double* hyper;  // 4 values (row_ops.h, apply_update)
  float state_init;     // every optimizer-state word of a new row (adagrad's initial accumulator)
  uint32_t prev_step;   // the table's step before this push: last_step of the rows it creates
  uint32_t ttl;         // eviction.ttl_steps, 0 for none
  int64_t now;          // the step a lookup reads for: a row last pushed more than ttl before reads as init
};

// out (table after table, n_t x dim_t) = each key's row, or its init value when it has none or,
// with a TTL, when its last push (meta word 1) was more than ttl steps before `now`: a push of
// that step finds it expired too (ps/table/embedding_table.py), whether a sweep dropped it yet or not.
inline void lookup_multi(const std::vector<TableRef>& tables, const int64_t* keys, const int64_t* offsets,
                         float* out) {
  std::vector<int64_t> rows;
  int64_t pos = 0;
  for (size_t t = 0; t < tables.size(); ++t) {
    const TableRef& tab = tables[t];
    const int64_t first = offsets[t], n = offsets[t + 1] - offsets[t];
    rows.resize(static_cast<size_t>(n));
    tab.map->find(keys + first, n, rows.data());
    if (tab.ttl != 0) {
      const int64_t meta = tab.dim + tab.state_width;
      for (int64_t i = 0; i < n; ++i) {
        if (rows[i] < 0) continue;
        const uint32_t last = reinterpret_cast<const uint32_t*>(tab.store.row(rows[i]) + meta)[1];
        if (tab.now - static_cast<int64_t>(last) > static_cast<int64_t>(tab.ttl)) rows[i] = -1;
      }
    }
    float* dst = out + pos;
    gather(tab.store, rows.data(), n, 0, tab.dim, dst);
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] < 0) init_values(tab.seed, tab.init, tab.scale, keys + first + i, 1, tab.dim, dst + i * tab.dim, tab.dim);
    }
    pos += n * tab.dim;
  }
}

// Checks that every row a push may create already has its block: the caller reserved
// map.num_rows() + n_t rows per table before the call (the block store grows in Python).
inline void check_reserved(const std::vector<TableRef>& tables, const int64_t* offsets) {
  for (size_t t = 0; t < tables.size(); ++t) {
    const uint64_t need = tables[t].map->num_rows() + static_cast<uint64_t>(offsets[t + 1] - offsets[t]);
    const uint64_t have = static_cast<uint64_t>(tables[t].store.num_blocks) << tables[t].store.shift;
    if (need > have) throw std::invalid_argument("push_multi: rows not reserved before the call");
  }
}

// Applies each table's gradients as EmbeddingTable.apply_gradients' fast path does (no admission,
// room for every key): sum per unique key, insert new keys as init rows (state = state_init,
// freq 0, last_step prev_step), one optimizer step, freq += sightings, last_step = max(last_step, steps[t]).
// counts may be null (1 each). Outputs per table t: updated_keys[offsets[t] : offsets[t] +
// num_updated[t]] = its unique keys, sorted; num_inserted[t] = rows it created.
inline void push_multi(const std::vector<TableRef>& tables, const int64_t* keys, const int64_t* offsets,
                       const float* grads, const int64_t* counts, const uint32_t* steps, int64_t* updated_keys,
                       int64_t* num_updated, int64_t* num_inserted) {
  check_reserved(tables, offsets);
  std::vector<float> sums, words;
  std::vector<int64_t> sightings, rows;
  std::vector<uint8_t> inserted;
  int64_t grad_pos = 0;
  for (size_t t = 0; t < tables.size(); ++t) {
    const TableRef& tab = tables[t];
    const int64_t first = offsets[t], n = offsets[t + 1] - offsets[t];
    const int64_t dim = tab.dim, width = tab.store.width, meta = dim + tab.state_width;
    sums.resize(static_cast<size_t>(n * dim));
    sightings.resize(static_cast<size_t>(n));
    rows.resize(static_cast<size_t>(n));
    inserted.resize(static_cast<size_t>(n));
    int64_t* unique = updated_keys + first;
    const int64_t u = dedupe_sum(keys + first, grads + grad_pos, counts ? counts + first : nullptr, n, dim, unique,
                                 sums.data(), sightings.data());
    grad_pos += n * dim;
    tab.map->find_or_insert(unique, u, rows.data(), inserted.data());
    int64_t created = 0;
    words.resize(static_cast<size_t>(width));
    for (int64_t i = 0; i < u; ++i) {
      if (!inserted[i]) continue;
      ++created;
      init_values(tab.seed, tab.init, tab.scale, unique + i, 1, dim, words.data(), dim);
      std::fill(words.begin() + dim, words.begin() + meta, tab.state_init);
      uint32_t* meta_words = reinterpret_cast<uint32_t*>(words.data() + meta);
      meta_words[0] = 0;
      meta_words[1] = tab.prev_step;
      std::memcpy(tab.store.row(rows[i]), words.data(), sizeof(float) * width);
    }
    apply_update(tab.opt, tab.hyper, tab.store, dim, tab.state_width, rows.data(), sums.data(), sightings.data(), u,
                 steps[t]);
    std::sort(unique, unique + u);
    num_updated[t] = u;
    num_inserted[t] = created;
  }
}

// Positions of one group's distinct keys in an output array `unique`, first seen first: open
// addressing over at least twice the group's keys, rebuilt for each group. The dedupes below
// (a worker's step, its received gradients, a serving client's request) share it.
class FirstSeen {
 public:
  // Starts a group of at most n keys.
  void reset(int64_t n) {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(2 * n)) cap <<= 1;
    slot_.assign(cap, -1);
    mask_ = cap - 1;
  }

  // The position of `key` in unique; a key this group has not seen goes to unique[u] (u grows,
  // `added` says so).
  int64_t find_or_add(int64_t key, int64_t* unique, int64_t& u, bool& added) {
    uint64_t pos = mix64(static_cast<uint64_t>(key)) & mask_;
    while (slot_[pos] >= 0 && unique[slot_[pos]] != key) pos = (pos + 1) & mask_;
    added = slot_[pos] < 0;
    if (added) {
      slot_[pos] = u;
      unique[u++] = key;
    }
    return slot_[pos];
  }

 private:
  std::vector<int64_t> slot_;
  uint64_t mask_ = 0;
};

// The worker's one dedupe over every table of a step. keys (b, f) row-major; group[c] the table
// (0 .. g-1) of column c. Per table, in table order, its distinct keys in first-occurrence order
// (rows outer, the table's columns inner) go to unique[offsets[t] : offsets[t + 1]]; inverse[i,
// c] is the position of keys[i, c] in unique; counts[j] how often unique[j] occurs. Returns the
// total number of distinct (table, key) pairs.
inline int64_t unique_by_table(const int64_t* keys, int64_t b, int64_t f, const int64_t* group, int64_t g,
                               int64_t* unique, int64_t* offsets, int64_t* inverse, int64_t* counts) {
  std::vector<std::vector<int64_t>> columns(static_cast<size_t>(g));
  for (int64_t c = 0; c < f; ++c) {
    if (group[c] < 0 || group[c] >= g) throw std::invalid_argument("group: column's table outside [0, g)");
    columns[group[c]].push_back(c);
  }
  int64_t u = 0;
  offsets[0] = 0;
  FirstSeen seen;
  bool added = false;
  for (int64_t t = 0; t < g; ++t) {
    const auto& cols = columns[t];
    seen.reset(b * static_cast<int64_t>(cols.size()));
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t c : cols) {
        const int64_t j = seen.find_or_add(keys[i * f + c], unique, u, added);
        if (added) counts[j] = 0;
        inverse[i * f + c] = j;
        ++counts[j];
      }
    }
    offsets[t + 1] = u;
  }
  return u;
}

// A serving client's request of many tables: ragged segments of one key buffer (table t's keys at
// [offsets[t], offsets[t + 1]), offsets (g + 1,) rising from 0). Each segment's distinct keys in
// first-occurrence order go to unique[unique_offsets[t] : unique_offsets[t + 1]]; inverse[i] is
// the position of keys[i] among its own segment's distinct keys. Returns the distinct keys.
inline int64_t unique_by_segment(const int64_t* keys, const int64_t* offsets, int64_t g, int64_t* unique,
                                 int64_t* unique_offsets, int64_t* inverse) {
  int64_t u = 0;
  unique_offsets[0] = 0;
  FirstSeen seen;
  bool added = false;
  for (int64_t t = 0; t < g; ++t) {
    const int64_t begin = offsets[t], end = offsets[t + 1];
    if (begin > end) throw std::invalid_argument("offsets: must not fall");
    seen.reset(end - begin);
    const int64_t first = u;
    for (int64_t i = begin; i < end; ++i) inverse[i] = seen.find_or_add(keys[i], unique, u, added) - first;
    unique_offsets[t + 1] = u;
  }
  return u;
}

// Sums rows that share (tag, key), grouped by tag: keys (m,), tags (m,) in [0, g), rows (m, w)
// whose row i starts at rows + i * row_stride (row_stride >= w: the rows may be columns of a wider
// buffer, read in place), counts (m,) at counts[i * count_stride] or nullptr -> per tag t, in tag
// order, its distinct keys in first-occurrence order at unique[offsets[t] : offsets[t + 1]], their
// summed rows in sums (u, w), contiguous, and their summed counts in count_sums (u,) when counts.
// Returns the number of distinct pairs u.
inline int64_t sum_by_table_key(const int64_t* keys, const int64_t* tags, const float* rows, int64_t row_stride,
                                const float* counts, int64_t count_stride, int64_t m, int64_t w, int64_t g,
                                int64_t* unique, float* sums, float* count_sums, int64_t* offsets) {
  std::vector<int64_t> start(static_cast<size_t>(g + 1), 0);
  for (int64_t i = 0; i < m; ++i) {
    if (tags[i] < 0 || tags[i] >= g) throw std::invalid_argument("tags: outside [0, g)");
    ++start[tags[i] + 1];
  }
  for (int64_t t = 0; t < g; ++t) start[t + 1] += start[t];
  std::vector<int64_t> order(static_cast<size_t>(m));
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < m; ++i) order[next[tags[i]]++] = i;
  }
  int64_t u = 0;
  offsets[0] = 0;
  FirstSeen seen;
  bool added = false;
  for (int64_t t = 0; t < g; ++t) {
    seen.reset(start[t + 1] - start[t]);
    for (int64_t j = start[t]; j < start[t + 1]; ++j) {
      const int64_t i = order[j];
      const int64_t at = seen.find_or_add(keys[i], unique, u, added);
      const float* src = rows + i * row_stride;
      if (added) {
        std::memcpy(sums + at * w, src, sizeof(float) * w);
        if (counts != nullptr) count_sums[at] = counts[i * count_stride];
      } else {
        float* dst = sums + at * w;
        for (int64_t k = 0; k < w; ++k) dst[k] += src[k];
        if (counts != nullptr) count_sums[at] += counts[i * count_stride];
      }
    }
    offsets[t + 1] = u;
  }
  return u;
}

}  // namespace embps
