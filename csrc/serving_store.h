// The serving replica's rows in native memory, readable by the gate's lookup threads without the
// GIL or any lock while one follower writes them.
//
//   ServingTable "user": buckets (2^16 -> shard) ── shards[s] ─atomic shared_ptr─> ShardStore
//   ShardStore: HashMap key -> row (csrc/hash_map.h, lock-free find) + row blocks (never move)
//
// A row is a 16-byte header {seq, valid, key} and `width` 4-byte words (float32 values, or
// float16 values packed two per word), padded to 8 bytes so that the next row's 8-byte key is
// aligned (an odd width left it 4 bytes off: undefined behaviour, which UBSan reports).
// Concurrency choice: a per-row seqlock. The one writer
// (the shard's follower, serialised by write_mu_) makes seq odd, writes valid/key/words, makes seq
// even again; a reader copies the row between two reads of seq and retries while it is odd or
// changed, so it never returns half a row. The header's key and valid flag catch the other
// races: a row found for a key that is erased and whose row is reused meanwhile (key differs), and
// a key the map already shows whose row is not written yet (valid = 0): the reader finds the key
// again, and if it still does not see its written row, the key is "not found" (its insert had not
// completed: a correct order of events). Blocks of 2^14 rows never move; the block directory
// grows by copy and is published with one pointer store (old directories stay allocated until
// the store is freed, ~2x the last directory in all).
//
// A store made for a known number of rows (`expected_rows`: a cut's overlay, serving/cut.py) is
// sized to them instead: blocks of the next power of two (at least 2^6 rows) and one hash sub-map
// reserved for them. Why: a replica stages one overlay per (table, shard) at every cut, usually a
// few hundred rows; with the main store's sizes each one calloc'ed a 4.5 MB block (zeroed: the
// replica's malloc keeps blocks below 64 MB in its heap) and 1024 sub-maps of their own, and
// that was ~35% of a replica's CPU beside a 26-table job.
//
// A resync builds a new ShardStore aside and publishes it whole (`set_shard`, an atomic
// shared_ptr store): a reader holds its own reference to the store it started with, and the old
// one is freed when the last reader lets go of it.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "hash_map.h"

namespace embps {

class ShardStore {
 public:
  static constexpr int kBlockShift = 14;  // a main store's
  static constexpr int kMinBlockShift = 6;  // a sized store's smallest

  // expected_rows: 0 for a store that grows without bound (a shard's main store); else the rows
  // it is made for (it still grows past them, in blocks of their size).
  explicit ShardStore(int64_t width, int64_t expected_rows = 0)
      : width_(width),
        stride_(kHeaderBytes + (4 * width + 7) / 8 * 8),  // every row's header 8-byte aligned
        block_shift_(block_shift_for(expected_rows)),
        block_rows_(int64_t{1} << block_shift_),
        map_(expected_rows > 0 ? slots_for(expected_rows) : 0, expected_rows > 0 ? 1 : 1024) {
    if (width < 1) throw std::invalid_argument("width: must be >= 1");
    if (expected_rows < 0) throw std::invalid_argument("expected_rows: must be >= 0");
    dirs_.emplace_back(new Dir{0, {}});
    dir_.store(dirs_.back().get(), std::memory_order_release);
  }
  ~ShardStore() {
    for (char* block : blocks_) std::free(block);
  }
  ShardStore(const ShardStore&) = delete;
  ShardStore& operator=(const ShardStore&) = delete;

  int64_t width() const { return width_; }
  uint64_t size() const { return map_.size(); }
  int64_t row_bytes() const { return stride_; }  // a row's bytes in its block, header included
  uint64_t block_bytes() const {
    return static_cast<uint64_t>(blocks_count_.load(std::memory_order_relaxed)) *
           static_cast<uint64_t>(block_rows_ * stride_);
  }
  uint64_t memory_bytes() const {
    return map_.memory_bytes() + static_cast<uint64_t>(blocks_count_.load(std::memory_order_relaxed)) *
                                     static_cast<uint64_t>(block_rows_ * stride_);
  }

  std::atomic<uint64_t> version{0};
  std::atomic<uint64_t> incarnation{0};

  // Inserts or overwrites rows: keys (n,) unique, words (n, width).
  void upsert(const int64_t* keys, int64_t n, const float* words) {
    std::lock_guard<std::mutex> lock(write_mu_);
    std::vector<int64_t> rows(static_cast<size_t>(n));
    std::vector<uint8_t> inserted(static_cast<size_t>(n));
    ensure_rows(map_.num_rows() + static_cast<uint64_t>(n));  // before any new row is visible
    map_.find_or_insert(keys, n, rows.data(), inserted.data());
    for (int64_t i = 0; i < n; ++i) write_row(rows[i], 1, keys[i], words + i * width_);
  }

  // Drops the rows of keys (absent keys are ignored).
  void erase(const int64_t* keys, int64_t n) {
    std::lock_guard<std::mutex> lock(write_mu_);
    std::vector<int64_t> rows(static_cast<size_t>(n));
    map_.erase(keys, n, rows.data());
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] >= 0) write_row(rows[i], 0, keys[i], nullptr);
    }
  }

  // Marks keys deleted (a pending cut's overlay, see ServingTable): their rows read as state 2.
  void mark_deleted(const int64_t* keys, int64_t n) {
    std::lock_guard<std::mutex> lock(write_mu_);
    std::vector<int64_t> rows(static_cast<size_t>(n));
    std::vector<uint8_t> inserted(static_cast<size_t>(n));
    ensure_rows(map_.num_rows() + static_cast<uint64_t>(n));
    map_.find_or_insert(keys, n, rows.data(), inserted.data());
    std::vector<float> zeros(static_cast<size_t>(width_), 0.0f);
    for (int64_t i = 0; i < n; ++i) write_row(rows[i], kDeleted, keys[i], zeros.data());
  }

  // Copies the words of keys into out (n, width); absent keys' rows are left as they were.
  // found[i] = 1 when keys[i] has a row. Lock-free; any thread.
  void gather(const int64_t* keys, int64_t n, float* out, uint8_t* found) const {
    gather_state(keys, n, out, found);
    for (int64_t i = 0; i < n; ++i) found[i] = found[i] == kLive ? 1 : 0;
  }

  // As gather, with state[i] = 0 (no row), 1 (a row, copied) or 2 (marked deleted).
  void gather_state(const int64_t* keys, int64_t n, float* out, uint8_t* state) const {
    constexpr int64_t kGroup = 64;
    int64_t rows[kGroup];
    std::vector<float> copy(static_cast<size_t>(width_));  // a row is copied here, then checked
    for (int64_t start = 0; start < n; start += kGroup) {
      const int64_t m = n - start < kGroup ? n - start : kGroup;
      map_.find(keys + start, m, rows);
      // Rows are read kAhead after their lines are asked for: the cache misses of a random gather
      // (the first read of a row was ~10% of a replica's CPU) overlap instead of following each other.
      const Dir* d = current_dir();
      for (int64_t i = 0; i < m && i < kAhead; ++i) prefetch_row(d, rows[i]);
      for (int64_t i = 0; i < m; ++i) {
        if (i + kAhead < m) prefetch_row(d, rows[i + kAhead]);
        const uint32_t got = read_key(keys[start + i], rows[i], copy.data());
        if (got == kLive) std::memcpy(out + (start + i) * width_, copy.data(), 4 * width_);
        state[start + i] = static_cast<uint8_t>(got);
      }
    }
  }

  static constexpr uint32_t kLive = 1;
  static constexpr uint32_t kDeleted = 2;

  // Every (key, words) pair, for exports and checks (not concurrent with writes).
  void export_rows(std::vector<int64_t>& keys, std::vector<float>& words) const {
    std::lock_guard<std::mutex> lock(write_mu_);
    const uint64_t n = map_.size();
    std::vector<int64_t> rows(n);
    keys.resize(n);
    map_.export_all(keys.data(), rows.data(), n);
    words.resize(n * static_cast<uint64_t>(width_));
    for (uint64_t i = 0; i < n; ++i) {
      std::memcpy(&words[i * width_], row_words(row_ptr(current_dir(), rows[i])), 4 * width_);
    }
  }

 private:
  static constexpr int64_t kHeaderBytes = 16;
  struct Header {
    std::atomic<uint32_t> seq;
    uint32_t valid;
    int64_t key;
  };
  struct Dir {
    int64_t n;
    std::vector<char*> blocks;
  };

  const Dir* current_dir() const { return dir_.load(std::memory_order_acquire); }
  static constexpr int64_t kAhead = 8;  // rows prefetched ahead of the one read (gather_state)
  void prefetch_row(const Dir* d, int64_t r) const {
    const char* row = row_ptr(d, r);
    if (row == nullptr) return;
    for (int64_t at = 0; at < stride_; at += 64) __builtin_prefetch(row + at);
  }
  char* row_ptr(const Dir* d, int64_t r) const {
    const int64_t b = r >> block_shift_;
    if (r < 0 || b >= d->n) return nullptr;
    return d->blocks[static_cast<size_t>(b)] + (r & (block_rows_ - 1)) * stride_;
  }
  static Header* header(char* row) { return reinterpret_cast<Header*>(row); }
  static float* row_words(char* row) { return reinterpret_cast<float*>(row + kHeaderBytes); }

  void ensure_rows(uint64_t rows) {
    const Dir* d = current_dir();
    const int64_t need = static_cast<int64_t>((rows + static_cast<uint64_t>(block_rows_) - 1) >> block_shift_);
    if (need <= d->n) return;
    auto next = std::make_unique<Dir>(Dir{need, d->blocks});
    for (int64_t b = d->n; b < need; ++b) {
      char* block = static_cast<char*>(std::calloc(static_cast<size_t>(block_rows_), static_cast<size_t>(stride_)));
      if (block == nullptr) throw std::bad_alloc();
      blocks_.push_back(block);
      next->blocks.push_back(block);
    }
    blocks_count_.store(need, std::memory_order_relaxed);
    dirs_.push_back(std::move(next));
    dir_.store(dirs_.back().get(), std::memory_order_release);
  }

  void write_row(int64_t r, uint32_t valid, int64_t key, const float* words) {
    char* row = row_ptr(current_dir(), r);
    if (row == nullptr) throw std::logic_error("serving store: a row outside its blocks");
    Header* h = header(row);
    const uint32_t s = h->seq.load(std::memory_order_relaxed);
    h->seq.store(s + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    h->valid = valid;
    h->key = key;
    if (words != nullptr) std::memcpy(row_words(row), words, 4 * width_);
    h->seq.store(s + 2, std::memory_order_release);
  }

  // Copies key's row (found as `r` by the map) into out; returns its valid state (kLive,
  // kDeleted), 0: no written row for key.
  uint32_t read_key(int64_t key, int64_t r, float* out) const {
    for (int attempt = 0; attempt < 4; ++attempt) {
      if (r < 0) return 0;
      char* row = row_ptr(current_dir(), r);
      if (row == nullptr) return 0;
      Header* h = header(row);
      uint32_t valid;
      int64_t seen;
      while (true) {
        const uint32_t s1 = h->seq.load(std::memory_order_acquire);
        if (s1 & 1u) {
          cpu_relax();
          continue;
        }
        valid = h->valid;
        seen = h->key;
        std::memcpy(out, row_words(row), 4 * width_);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (h->seq.load(std::memory_order_relaxed) == s1) break;
      }
      if (valid && seen == key) return valid;
      map_.find(&key, 1, &r);  // moved or not written yet: look again
    }
    return 0;
  }

  static int block_shift_for(int64_t expected_rows) {
    if (expected_rows <= 0) return kBlockShift;
    int shift = kMinBlockShift;
    while (shift < kBlockShift && (int64_t{1} << shift) < expected_rows) ++shift;
    return shift;
  }
  // Slots whose load at expected_rows stays under HashMap::kMaxLoad (it reserves kMaxLoad x slots).
  static uint64_t slots_for(int64_t expected_rows) {
    return static_cast<uint64_t>(static_cast<double>(expected_rows) / HashMap::kMaxLoad) + 1;
  }

  const int64_t width_;
  const int64_t stride_;
  const int block_shift_;
  const int64_t block_rows_;
  HashMap map_;
  mutable std::mutex write_mu_;
  std::atomic<const Dir*> dir_{nullptr};
  std::vector<std::unique_ptr<Dir>> dirs_;  // every directory published (readers may hold any)
  std::vector<char*> blocks_;
  std::atomic<int64_t> blocks_count_{0};
};

// The replica's model version (DESIGN section 9): the cut every lookup is answered at, shared by
// every table of a replica with consistency = "step".
//
// Why a lookup never sees half a cut. The one writer (serving/cut.py) applies cut C in three moves:
//   1. stage: each changed (table, shard) gets a private ShardStore with C's rows (an overlay of
//      upserts and kDeleted marks, or a whole replacement after a resync), published as the
//      shard's pending store for step C; readers at a version < C ignore it;
//   2. switch: visible = C (one atomic store): from now on readers take C's rows from the pending
//      stores, and every other row from the main stores, which still hold C's rows there;
//   3. merge: floor = C, then the overlays are written into the main stores (or a replacement is
//      swapped in), then the pending stores are dropped (readers holding one keep it alive).
// A reader loads visible V first, reads pending (step <= V) then main stores, and at the end
// checks floor <= V (a seqlock on the model version): a reader that started at V < C and may have
// read rows the merge of C changed sees floor = C > V and answers again at the new version. A
// reader at the current cut never retries; only one that spans two cut switches does.
class ModelClock {
 public:
  uint64_t begin_read() const { return visible_.load(std::memory_order_seq_cst); }
  bool still_valid(uint64_t version) const {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return floor_.load(std::memory_order_seq_cst) <= version;
  }
  uint64_t visible() const { return visible_.load(); }
  uint64_t floor() const { return floor_.load(); }
  void publish(uint64_t version) { visible_.store(version, std::memory_order_seq_cst); }
  void begin_merge(uint64_t version) {
    floor_.store(version, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }

 private:
  std::atomic<uint64_t> visible_{0};
  std::atomic<uint64_t> floor_{0};
};

// A (table, shard)'s rows of a cut not yet merged into its main store (see ModelClock).
struct PendingShard {
  uint64_t step = 0;
  bool replace = false;  // true: `rows` is the shard's whole content at `step`; else an overlay
  std::shared_ptr<ShardStore> rows;
};

}  // namespace embps
