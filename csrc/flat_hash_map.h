// The former single-array map, kept only as the yardstick of `embps bench table`: the same
// slots, hash and probing as HashMap (hash_map.h) without the sub-maps, so the bench measures
// what growing in pieces costs in find and insert rates, and what it saves in stalls, in one run.
// Grows by rehashing everything in one call; not thread-safe. Not used by any table.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "hash_map.h"

namespace embps {

class FlatHashMap {
 public:
  static constexpr uint32_t kEmptyRow = 0xFFFFFFFFu;
  static constexpr uint64_t kMaxRows = kEmptyRow;  // rows are 0 .. 2^32 - 2
  static constexpr double kMaxLoad = 0.8;
  static constexpr double kGrowth = 1.5;

  explicit FlatHashMap(uint64_t initial_capacity = 16) { rehash(initial_capacity < 8 ? 8 : initial_capacity); }

  uint64_t size() const { return size_; }
  uint64_t capacity() const { return capacity_; }
  uint64_t num_rows() const { return next_row_; }
  uint64_t memory_bytes() const {
    return capacity_ * sizeof(Slot) + free_rows_.capacity() * sizeof(uint32_t) + sizeof(*this);
  }

  // rows[i] = row of keys[i], or -1 when absent.
  void find(const int64_t* keys, int64_t n, int64_t* rows) const {
    constexpr int64_t kAhead = 16;
    for (int64_t i = 0; i < n && i < kAhead; ++i) prefetch(keys[i]);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) prefetch(keys[i + kAhead]);
      uint64_t pos = home(keys[i]);
      int64_t found = -1;
      while (true) {
        const Slot& s = slots_[pos];
        if (s.row == kEmptyRow) break;
        if (s.key == keys[i]) {
          found = s.row;
          break;
        }
        if (++pos == capacity_) pos = 0;
      }
      rows[i] = found;
    }
  }

  // rows[i] = row of keys[i], inserting absent keys; inserted[i] = 1 where this call inserted
  // keys[i] (only at its first occurrence when a key repeats inside the batch).
  void find_or_insert(const int64_t* keys, int64_t n, int64_t* rows, uint8_t* inserted) {
    constexpr int64_t kAhead = 16;
    for (int64_t i = 0; i < n && i < kAhead; ++i) prefetch(keys[i]);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) prefetch(keys[i + kAhead]);
      const int64_t key = keys[i];
      uint64_t pos = home(key);
      while (true) {
        Slot& s = slots_[pos];
        if (s.row == kEmptyRow) break;
        if (s.key == key) break;
        if (++pos == capacity_) pos = 0;
      }
      if (slots_[pos].row != kEmptyRow) {
        rows[i] = slots_[pos].row;
        inserted[i] = 0;
        continue;
      }
      if (static_cast<double>(size_ + 1) > kMaxLoad * static_cast<double>(capacity_)) {
        grow(size_ + 1);
        pos = home(key);
        while (slots_[pos].row != kEmptyRow) {
          if (++pos == capacity_) pos = 0;
        }
      }
      const uint32_t row = allocate_row();
      slots_[pos].key = key;
      slots_[pos].row = row;
      ++size_;
      rows[i] = row;
      inserted[i] = 1;
    }
  }

  // Removes keys; absent keys are ignored. rows[i] = the freed row, or -1 if keys[i] was absent.
  void erase(const int64_t* keys, int64_t n, int64_t* rows) {
    for (int64_t i = 0; i < n; ++i) {
      uint64_t pos = home(keys[i]);
      int64_t freed = -1;
      while (slots_[pos].row != kEmptyRow) {
        if (slots_[pos].key == keys[i]) {
          freed = slots_[pos].row;
          free_rows_.push_back(slots_[pos].row);
          remove_at(pos);
          --size_;
          break;
        }
        if (++pos == capacity_) pos = 0;
      }
      rows[i] = freed;
    }
  }

  // Writes all live (key, row) pairs in slot order; keys and rows must hold size() entries.
  void export_all(int64_t* keys, int64_t* rows) const {
    uint64_t j = 0;
    for (uint64_t pos = 0; pos < capacity_; ++pos) {
      if (slots_[pos].row == kEmptyRow) continue;
      keys[j] = slots_[pos].key;
      rows[j] = slots_[pos].row;
      ++j;
    }
  }

  void clear() {
    free_rows_.clear();
    free_rows_.shrink_to_fit();
    next_row_ = 0;
    size_ = 0;
    slots_.reset();  // drop the entries first: rehash would carry them over
    capacity_ = 0;
    rehash(16);
  }

  // Grows so that `num_keys` keys fit without further growth.
  void reserve(uint64_t num_keys) {
    if (static_cast<double>(num_keys) > kMaxLoad * static_cast<double>(capacity_)) grow(num_keys);
  }

 private:
  uint64_t home(int64_t key) const {
    const uint64_t h = mix64(static_cast<uint64_t>(key));
    return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * capacity_) >> 64);
  }

  void prefetch(int64_t key) const { __builtin_prefetch(&slots_[home(key)]); }

  uint32_t allocate_row() {
    if (!free_rows_.empty()) {
      const uint32_t row = free_rows_.back();
      free_rows_.pop_back();
      return row;
    }
    if (next_row_ >= kMaxRows) throw std::length_error("hash map is out of rows: at most 2^32 - 1 rows per map");
    return static_cast<uint32_t>(next_row_++);
  }

  // Backward-shift deletion keeps every probe sequence unbroken without tombstones.
  void remove_at(uint64_t hole) {
    uint64_t pos = hole;
    while (true) {
      if (++pos == capacity_) pos = 0;
      if (slots_[pos].row == kEmptyRow) break;
      const uint64_t h = home(slots_[pos].key);
      const uint64_t dist_pos = (pos + capacity_ - h) % capacity_;
      const uint64_t dist_hole = (pos + capacity_ - hole) % capacity_;
      if (dist_pos >= dist_hole) {
        slots_[hole] = slots_[pos];
        hole = pos;
      }
    }
    slots_[hole].row = kEmptyRow;
  }

  void grow(uint64_t min_keys) {
    uint64_t target = static_cast<uint64_t>(static_cast<double>(capacity_) * kGrowth);
    const uint64_t needed = static_cast<uint64_t>(static_cast<double>(min_keys) / kMaxLoad) + 1;
    if (target < needed) target = needed;
    rehash(target);
  }

  void rehash(uint64_t new_capacity) {
    std::unique_ptr<Slot[]> old = std::move(slots_);
    const uint64_t old_capacity = capacity_;
    slots_.reset(new Slot[new_capacity]);
    capacity_ = new_capacity;
    for (uint64_t i = 0; i < capacity_; ++i) slots_[i].row = kEmptyRow;
    for (uint64_t i = 0; i < old_capacity; ++i) {
      if (old[i].row == kEmptyRow) continue;
      uint64_t pos = home(old[i].key);
      while (slots_[pos].row != kEmptyRow) {
        if (++pos == capacity_) pos = 0;
      }
      slots_[pos] = old[i];
    }
  }

  std::unique_ptr<Slot[]> slots_;
  uint64_t capacity_ = 0;
  uint64_t size_ = 0;
  uint64_t next_row_ = 0;
  std::vector<uint32_t> free_rows_;
};

}  // namespace embps
