// Map from int64 feature keys to uint32 row slots that grows in pieces and reads while it grows.
//
// Layout: 2^b sub-maps (default 1024), chosen by the top b bits of mix64(key). Each sub-map is
// an open-addressing array of packed 12-byte slots {key, row}; row == kEmptyRow marks an empty
// slot, so every int64 key (0, negatives, INT64_MIN/MAX) is a valid key. Linear probing with
// backward-shift deletion (no tombstones). The home slot of a key is the remaining hash bits
// mapped onto [0, capacity) with a multiply-high, so a capacity need not be a power of two.
//
// Growth in pieces: a sub-map grows alone, by 1.5x, when it passes a load of 0.7, so the call
// that grows it rehashes 1/2^b of the keys, never the whole map. The capacities follow the
// schedule 8 * 1.5^(generation + i / 2^b) for sub-map i: the sub-maps' growth points are spread
// evenly over each 1.5x of the map's size instead of all falling on the same few calls (random
// keys fill the sub-maps evenly, so with equal capacities they would all grow at once). A
// sub-map's load stays in [0.47, 0.7]; spread evenly over that cycle, the map's load is ~0.58
// at any size: ~21 bytes per key (a single 1.5x-growing array at 0.8 swings from 15 to 22.6).
//
// Rows: a new key takes a row from the one free list of the map (rows released by erase, last
// released first) or the next never-used row, so rows are dense in [0, num_rows()).
//
// Threads: writers (find_or_insert, erase, clear, reserve, export) take the map's mutex, one at
// a time. Readers (find) take no lock and never wait for a rehash: a grower builds the new array
// aside and publishes it with one pointer store; a reader that still holds the old array reads a
// complete, unchanging copy, and the old array is freed only once every reader that may hold it
// has left (two reader counters swapped by an epoch, as in userspace RCU). Writes in place (an
// insert, a backward shift) are framed by the sub-map's sequence counter (a seqlock): a reader
// that saw it change retries that key, so it waits at most for one slot write.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "slot_arena.h"

namespace embps {

inline uint64_t mix64(uint64_t x) {
  // splitmix64 finalizer: a bijection on 64 bits with good avalanche.
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

#pragma pack(push, 4)
struct Slot {
  int64_t key;
  uint32_t row;
};
#pragma pack(pop)
static_assert(sizeof(Slot) == 12, "Slot must pack to 12 bytes");

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class HashMap {
 public:
  static constexpr uint32_t kEmptyRow = 0xFFFFFFFFu;
  static constexpr uint64_t kMaxRows = kEmptyRow;  // rows are 0 .. 2^32 - 2
  static constexpr double kMaxLoad = 0.7;  // lower than 0.8: probes stay short, find keeps its rate
  static constexpr double kGrowth = 1.5;
  static constexpr double kMinCapacity = 8.0;
  static constexpr uint64_t kDefaultSubMaps = 1024;

  // initial_capacity: slots to start with (0: none until the first insert); sub_maps: a power
  // of two in [1, 65536].
  explicit HashMap(uint64_t initial_capacity = 0, uint64_t sub_maps = kDefaultSubMaps) {
    if (sub_maps == 0 || sub_maps > 65536 || (sub_maps & (sub_maps - 1)) != 0) {
      throw std::invalid_argument("sub_maps: must be a power of two in [1, 65536], got " + std::to_string(sub_maps));
    }
    num_subs_ = sub_maps;
    sub_bits_ = 0;
    while ((uint64_t{1} << sub_bits_) < sub_maps) ++sub_bits_;
    subs_.reset(new SubMap[num_subs_]);
    tallies_.reset(new Tally[num_subs_]);
    for (uint64_t i = 0; i < num_subs_; ++i) subs_[i].array.store(empty_array(), std::memory_order_relaxed);
    if (initial_capacity > 0) reserve(static_cast<uint64_t>(kMaxLoad * static_cast<double>(initial_capacity)));
  }

  ~HashMap() {
    for (uint64_t i = 0; i < num_subs_; ++i) release(subs_[i].array.load(std::memory_order_relaxed));
  }

  HashMap(const HashMap&) = delete;
  HashMap& operator=(const HashMap&) = delete;

  uint64_t size() const { return size_.load(std::memory_order_relaxed); }
  uint64_t capacity() const { return capacity_.load(std::memory_order_relaxed); }
  uint64_t num_rows() const { return next_row_.load(std::memory_order_relaxed); }
  uint64_t sub_maps() const { return num_subs_; }
  // Entries moved by growth since the map was made: growth in pieces keeps each call's share small.
  uint64_t rehashed() const { return rehashed_.load(std::memory_order_relaxed); }
  uint64_t memory_bytes() const {
    return capacity() * sizeof(Slot) + arrays_.load(std::memory_order_relaxed) * sizeof(SlotArray) +
           free_bytes_.load(std::memory_order_relaxed) + arena_overhead_.load(std::memory_order_relaxed) +
           num_subs_ * (sizeof(SubMap) + sizeof(Tally)) + sizeof(*this);
  }

  // rows[i] = row of keys[i], or -1 when absent. Lock-free: safe while another thread writes.
  // Keys go in groups of kGroup; a group that overlapped an erase or an array swap (write_seq_
  // changed) is looked up again.
  void find(const int64_t* keys, int64_t n, int64_t* rows) const {
    ReadGuard guard(*this);
    constexpr int64_t kGroup = 1024;
    for (int64_t start = 0; start < n;) {
      const int64_t end = n - start < kGroup ? n : start + kGroup;
      const uint32_t before = write_seq_.load(std::memory_order_acquire);
      if (before & 1) {
        cpu_relax();
        continue;
      }
      find_group(keys, start, end, rows);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (write_seq_.load(std::memory_order_relaxed) == before) start = end;
    }
  }

  // rows[i] = row of keys[i], inserting absent keys; inserted[i] = 1 where this call inserted
  // keys[i] (only at its first occurrence when a key repeats inside the batch).
  void find_or_insert(const int64_t* keys, int64_t n, int64_t* rows, uint8_t* inserted) {
    std::lock_guard<std::mutex> lock(write_mutex_);
    Retired retired(*this);
    constexpr int64_t kAhead = 16;
    for (int64_t i = 0; i < n && i < kAhead; ++i) prefetch(keys[i]);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) prefetch(keys[i + kAhead]);
      const int64_t key = keys[i];
      const uint64_t h = mix64(static_cast<uint64_t>(key));
      const uint64_t index = sub_index(h);
      SubMap& sub = subs_[index];
      SlotArray* a = sub.array.load(std::memory_order_relaxed);
      uint64_t pos = probe(a, h, key);
      if (a->slots()[pos].row != kEmptyRow) {
        rows[i] = a->slots()[pos].row;
        inserted[i] = 0;
        continue;
      }
      if (static_cast<double>(tallies_[index].size + 1) > kMaxLoad * static_cast<double>(a->capacity)) {
        a = grow(index, tallies_[index].size + 1, retired);
        pos = probe(a, h, key);
      }
      const uint32_t row = allocate_row();
      store_slot(a->slots()[pos], key, row);
      ++tallies_[index].size;
      size_.store(size_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
      rows[i] = row;
      inserted[i] = 1;
    }
  }

  // Removes keys; absent keys are ignored. rows[i] = the freed row, or -1 if keys[i] was absent.
  // Backward shifts move live entries, which a reader could step over, so every kEraseChunk keys
  // are erased inside the map's erase seqlock: a reader that overlapped them redoes its group
  // (erase is rare: eviction and admission bookkeeping; inserts need no seqlock).
  void erase(const int64_t* keys, int64_t n, int64_t* rows) {
    std::lock_guard<std::mutex> lock(write_mutex_);
    constexpr int64_t kEraseChunk = 256;
    for (int64_t start = 0; start < n; start += kEraseChunk) {
      const int64_t end = n - start < kEraseChunk ? n : start + kEraseChunk;
      begin_write();
      for (int64_t i = start; i < end; ++i) rows[i] = erase_one(keys[i]);
      end_write();
    }
    free_bytes_.store(free_rows_.capacity() * sizeof(uint32_t), std::memory_order_relaxed);
  }

  // Writes all live (key, row) pairs in sub-map and slot order; keys and rows hold n entries,
  // which must be size().
  void export_all(int64_t* keys, int64_t* rows, uint64_t n) const {
    std::lock_guard<std::mutex> lock(write_mutex_);
    if (n != size()) {
      throw std::invalid_argument("keys: expected length " + std::to_string(size()) + ", got " + std::to_string(n));
    }
    uint64_t j = 0;
    for (uint64_t s = 0; s < num_subs_; ++s) {
      const SlotArray* a = subs_[s].array.load(std::memory_order_relaxed);
      const Slot* slots = a->slots();
      for (uint64_t pos = 0; pos < a->capacity; ++pos) {
        if (slots[pos].row == kEmptyRow) continue;
        keys[j] = slots[pos].key;
        rows[j] = slots[pos].row;
        ++j;
      }
    }
  }

  // Rows released by erase and not taken again, in the order a new key takes them: the last
  // one first. out holds n entries, which must be num_free_rows().
  uint64_t num_free_rows() const {
    std::lock_guard<std::mutex> lock(write_mutex_);
    return free_rows_.size();
  }

  void export_free_rows(uint32_t* out, uint64_t n) const {
    std::lock_guard<std::mutex> lock(write_mutex_);
    if (n != free_rows_.size()) {
      throw std::invalid_argument("free_rows: expected length " + std::to_string(free_rows_.size()) + ", got " +
                                  std::to_string(n));
    }
    std::memcpy(out, free_rows_.data(), n * sizeof(uint32_t));
  }

  // Makes an empty map hold keys[i] at rows[i], with rows [0, num_rows) handed out and `free`
  // the free list (taken from its end): another map's layout (its export_all and
  // export_free_rows), so that both hand the same rows to the same keys from here on. Every
  // row below num_rows must be either live (once) or free (once); std::invalid_argument names
  // what is not, and leaves the map empty.
  void restore(const int64_t* keys, const int64_t* rows, uint64_t n, uint64_t num_rows, const uint32_t* free,
               uint64_t num_free) {
    if (size() != 0 || next_row_.load(std::memory_order_relaxed) != 0) {
      throw std::invalid_argument("restore: the map must be empty");
    }
    if (num_rows > kMaxRows || n + num_free != num_rows) {
      throw std::invalid_argument("restore: " + std::to_string(n) + " live rows and " + std::to_string(num_free) +
                                  " free rows do not make num_rows = " + std::to_string(num_rows));
    }
    std::vector<uint8_t> seen(num_rows, 0);
    auto claim = [&](int64_t row, const char* what) {
      if (row < 0 || static_cast<uint64_t>(row) >= num_rows || seen[row]) {
        throw std::invalid_argument(std::string("restore: ") + what + " row " + std::to_string(row) +
                                    " is outside [0, num_rows) or taken twice");
      }
      seen[row] = 1;
    };
    for (uint64_t i = 0; i < num_free; ++i) claim(free[i], "free");
    reserve(n);
    {
      std::lock_guard<std::mutex> lock(write_mutex_);
      Retired retired(*this);
      for (uint64_t i = 0; i < n; ++i) {
        if (rows[i] < 0 || static_cast<uint64_t>(rows[i]) >= num_rows || seen[rows[i]]) break;
        seen[rows[i]] = 1;
        const int64_t key = keys[i];
        const uint64_t h = mix64(static_cast<uint64_t>(key));
        const uint64_t index = sub_index(h);
        SlotArray* a = subs_[index].array.load(std::memory_order_relaxed);
        uint64_t pos = probe(a, h, key);
        if (a->slots()[pos].row != kEmptyRow) break;  // a key twice
        if (static_cast<double>(tallies_[index].size + 1) > kMaxLoad * static_cast<double>(a->capacity)) {
          a = grow(index, tallies_[index].size + 1, retired);
          pos = probe(a, h, key);
        }
        store_slot(a->slots()[pos], key, static_cast<uint32_t>(rows[i]));
        ++tallies_[index].size;
        size_.store(size_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
      }
      if (size() == n) {
        free_rows_.assign(free, free + num_free);
        free_bytes_.store(free_rows_.capacity() * sizeof(uint32_t), std::memory_order_relaxed);
        next_row_.store(num_rows, std::memory_order_relaxed);
        return;
      }
    }
    clear();
    throw std::invalid_argument("restore: a key twice, or a live row outside [0, num_rows) or taken twice");
  }

  void clear() {
    std::lock_guard<std::mutex> lock(write_mutex_);
    Retired retired(*this);
    // First every capacity drops to 1 (probes stay in slot 0 of the old arrays), and only once no
    // reader can hold an old capacity do the arrays go: no pair reaches past its array.
    begin_write();
    for (uint64_t s = 0; s < num_subs_; ++s) subs_[s].capacity.store(1, std::memory_order_release);
    end_write();
    synchronize();
    begin_write();
    for (uint64_t s = 0; s < num_subs_; ++s) {
      retired.add(subs_[s].array.load(std::memory_order_relaxed));
      subs_[s].array.store(empty_array(), std::memory_order_release);
      tallies_[s] = Tally{};
    }
    end_write();
    free_rows_.clear();
    free_rows_.shrink_to_fit();
    free_bytes_.store(0, std::memory_order_relaxed);
    next_row_.store(0, std::memory_order_relaxed);
    size_.store(0, std::memory_order_relaxed);
  }

  // Sizes every sub-map so that `num_keys` keys spread by the hash fit without any growth: each
  // holds num_keys / sub_maps on average, plus 4 standard deviations of a random spread.
  void reserve(uint64_t num_keys) {
    if (num_keys == 0) return;
    if (num_keys > kMaxRows) {  // past 2^64 the capacity schedule's cast overflowed: grow() looped for good
      throw std::length_error("reserve: a hash map holds at most 2^32 - 1 keys, got " + std::to_string(num_keys));
    }
    std::lock_guard<std::mutex> lock(write_mutex_);
    const double mean = static_cast<double>(num_keys) / static_cast<double>(num_subs_);
    const uint64_t target = static_cast<uint64_t>(std::ceil(mean + 4.0 * std::sqrt(mean) + 2.0));
    for (uint64_t s = 0; s < num_subs_; ++s) {
      Retired retired(*this);  // freed sub-map by sub-map: reserve never holds two copies of the map
      if (static_cast<double>(target) > kMaxLoad * static_cast<double>(subs_[s].array.load()->capacity)) {
        grow(s, target, retired);
      }
    }
  }

 private:
  struct SlotArray {
    uint64_t capacity;
    SlotArena::Chunk* chunk;  // nullptr: from operator new
    Slot* slots() { return reinterpret_cast<Slot*>(this + 1); }
    const Slot* slots() const { return reinterpret_cast<const Slot*>(this + 1); }
  };
  static_assert(sizeof(SlotArray) % alignof(Slot) == 0, "slots follow the header");

  // What a reader needs of a sub-map, 16 bytes (1024 of them fill 16 KiB, which stays in L1),
  // written only when the sub-map's array is replaced; the writer's tallies live apart, so
  // inserts do not dirty the lines that readers share. capacity <= array->capacity always holds
  // for any pair a reader can load (see view and publish), so a probe stays inside its array.
  struct alignas(16) SubMap {
    std::atomic<uint64_t> capacity{1};
    std::atomic<SlotArray*> array{nullptr};
  };

  struct Tally {  // writer only
    uint32_t size = 0;        // a sub-map holds at most the map's 2^32 - 1 rows
    int32_t generation = -1;  // -1: the shared empty array
  };

  struct View {
    const Slot* slots;
    uint64_t capacity;
  };

  // A sub-map's (slots, capacity): the capacity first, then the array (acquire both). A grow
  // publishes the array first, then the capacity, so a reader gets the old pair, the new pair, or
  // the old capacity with the new (larger) array; clear lowers the capacity a grace period before
  // it swaps the array. Each stays valid until the caller's ReadGuard ends; a mixed pair gives
  // wrong homes, never a fault, and the group it was used in is redone (write_seq_ changed).
  static View view(const SubMap& sub) {
    const uint64_t capacity = sub.capacity.load(std::memory_order_acquire);
    const SlotArray* a = sub.array.load(std::memory_order_acquire);
    return View{a->slots(), capacity};
  }

  void begin_write() {
    write_seq_.store(write_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
  }

  void end_write() {
    write_seq_.store(write_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  // Writer side: replaces sub-map `sub`'s array with a larger one.
  void publish(SubMap& sub, SlotArray* a) {
    begin_write();
    sub.array.store(a, std::memory_order_release);
    sub.capacity.store(a->capacity, std::memory_order_release);
    end_write();
  }

  // Frees the arrays a writer replaced, once no reader can hold them (see synchronize).
  class Retired {
   public:
    explicit Retired(HashMap& map) : map_(map) {}
    ~Retired() {
      if (arrays_.empty()) return;
      map_.synchronize();
      for (SlotArray* a : arrays_) map_.release(a);
    }
    void add(SlotArray* a) {
      if (a != empty_array()) arrays_.push_back(a);
    }

   private:
    HashMap& map_;
    std::vector<SlotArray*> arrays_;
  };

  // Registers a reader in the current epoch's counter for the duration of a find call.
  class ReadGuard {
   public:
    explicit ReadGuard(const HashMap& map) : map_(map) {
      while (true) {
        epoch_ = map_.epoch_.load(std::memory_order_seq_cst);
        map_.readers_[epoch_ & 1].fetch_add(1, std::memory_order_seq_cst);
        if (map_.epoch_.load(std::memory_order_seq_cst) == epoch_) break;
        map_.readers_[epoch_ & 1].fetch_sub(1, std::memory_order_seq_cst);
      }
    }
    ~ReadGuard() { map_.readers_[epoch_ & 1].fetch_sub(1, std::memory_order_release); }

   private:
    const HashMap& map_;
    uint32_t epoch_ = 0;
  };

  // The one array of every empty sub-map: capacity 1, its slot empty, never written (an insert
  // grows first, as 1 > kMaxLoad * 1) and never freed.
  static SlotArray* empty_array() {
    static SlotArray* const empty = init_array(::operator new(sizeof(SlotArray) + sizeof(Slot)), 1, nullptr);
    return empty;
  }

  // Arrays of SlotArena::kMinBytes and more come from the arena (packed, on huge pages).
  SlotArray* allocate_array(uint64_t capacity) {
    const size_t bytes = sizeof(SlotArray) + capacity * sizeof(Slot);
    SlotArray* a;
    if (bytes < SlotArena::kMinBytes) {
      a = init_array(::operator new(bytes), capacity, nullptr);
    } else {
      SlotArena::Chunk* chunk = nullptr;
      void* mem = arena_.allocate(bytes, &chunk);
      a = init_array(mem, capacity, chunk);
      arena_overhead_.store(arena_.overhead_bytes(), std::memory_order_relaxed);
    }
    return a;
  }

  static SlotArray* init_array(void* mem, uint64_t capacity, SlotArena::Chunk* chunk) {
    SlotArray* a = new (mem) SlotArray{capacity, chunk};
    Slot* slots = a->slots();
    for (uint64_t i = 0; i < capacity; ++i) {
      slots[i].key = 0;
      slots[i].row = kEmptyRow;
    }
    return a;
  }

  void release(SlotArray* a) {
    if (a == nullptr || a == empty_array()) return;
    capacity_.fetch_sub(a->capacity, std::memory_order_relaxed);
    arrays_.fetch_sub(1, std::memory_order_relaxed);
    if (a->chunk == nullptr) {
      ::operator delete(a);
      return;
    }
    arena_.free(a, sizeof(SlotArray) + a->capacity * sizeof(Slot), a->chunk);
    arena_overhead_.store(arena_.overhead_bytes(), std::memory_order_relaxed);
  }

  // Waits until every reader that could hold an array replaced before this call has left.
  void synchronize() {
    const uint32_t old = epoch_.load(std::memory_order_relaxed);
    epoch_.store(old + 1, std::memory_order_seq_cst);
    while (readers_[old & 1].load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  }

  uint64_t sub_index(uint64_t h) const { return (h >> 1) >> (63 - sub_bits_); }  // 0 when sub_bits_ == 0

  uint64_t home(uint64_t capacity, uint64_t h) const {
    const uint64_t local = h << sub_bits_;  // the bits that did not choose the sub-map
    return static_cast<uint64_t>((static_cast<unsigned __int128>(local) * capacity) >> 64);
  }

  // Writer side: the slot of key, or the empty slot where it would go.
  uint64_t probe(const SlotArray* a, uint64_t h, int64_t key) const {
    uint64_t pos = home(a->capacity, h);
    const Slot* slots = a->slots();
    while (slots[pos].row != kEmptyRow && slots[pos].key != key) {
      if (++pos == a->capacity) pos = 0;
    }
    return pos;
  }

  // Reader side: keys[start, end). Key i + kAhead is staged (hashed, its sub-map's view taken,
  // its home slot prefetched) while key i is probed, so misses overlap and nothing is hashed twice.
  void find_group(const int64_t* keys, int64_t start, int64_t end, int64_t* rows) const {
    constexpr int64_t kAhead = 16;  // a power of two: the ring below is indexed by i % kAhead
    struct Staged {
      const Slot* slots;
      uint64_t capacity;
      uint64_t pos;
    } ring[kAhead];
    auto stage = [&](int64_t i) {
      const uint64_t h = mix64(static_cast<uint64_t>(keys[i]));
      const View v = view(subs_[sub_index(h)]);
      Staged& s = ring[i & (kAhead - 1)];
      s.slots = v.slots;
      s.capacity = v.capacity;
      s.pos = home(v.capacity, h);
      __builtin_prefetch(&v.slots[s.pos]);
    };
    for (int64_t i = start; i < end && i < start + kAhead; ++i) stage(i);
    for (int64_t i = start; i < end; ++i) {
      const Staged s = ring[i & (kAhead - 1)];
      if (i + kAhead < end) stage(i + kAhead);
      const int64_t key = keys[i];
      uint64_t p = s.pos;
      int64_t found = -1;
      // At most `capacity` slots: a view of another array's capacity (a swap or clear under
      // way) need not reach an empty slot.
      for (uint64_t step = 0; step < s.capacity; ++step) {
        // The row is stored after the key (release), so a row seen here comes with its key.
        const uint32_t row = __atomic_load_n(&s.slots[p].row, __ATOMIC_ACQUIRE);
        if (row == kEmptyRow) break;
        if (__atomic_load_n(&s.slots[p].key, __ATOMIC_RELAXED) == key) {
          found = row;
          break;
        }
        if (++p == s.capacity) p = 0;
      }
      rows[i] = found;
    }
  }

  // A hint only: a torn (array, capacity) pair here costs a useless prefetch, never a fault.
  void prefetch(int64_t key) const {
    const uint64_t h = mix64(static_cast<uint64_t>(key));
    const SubMap& sub = subs_[sub_index(h)];
    const SlotArray* a = sub.array.load(std::memory_order_relaxed);
    __builtin_prefetch(&a->slots()[home(sub.capacity.load(std::memory_order_relaxed), h)]);
  }

  // The key first, then the row with release: a reader that sees the row sees its key.
  static void store_slot(Slot& slot, int64_t key, uint32_t row) {
    __atomic_store_n(&slot.key, key, __ATOMIC_RELAXED);
    __atomic_store_n(&slot.row, row, __ATOMIC_RELEASE);
  }

  int64_t erase_one(int64_t key) {
    const uint64_t h = mix64(static_cast<uint64_t>(key));
    const uint64_t index = sub_index(h);
    SlotArray* a = subs_[index].array.load(std::memory_order_relaxed);
    const uint64_t pos = probe(a, h, key);
    const uint32_t row = a->slots()[pos].row;
    if (row == kEmptyRow) return -1;
    free_rows_.push_back(row);
    remove_at(a, pos);
    --tallies_[index].size;
    size_.store(size_.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
    return row;
  }

  uint32_t allocate_row() {
    if (!free_rows_.empty()) {
      const uint32_t row = free_rows_.back();
      free_rows_.pop_back();
      return row;
    }
    const uint64_t next = next_row_.load(std::memory_order_relaxed);
    if (next >= kMaxRows) throw std::length_error("hash map is out of rows: at most 2^32 - 1 rows per map");
    next_row_.store(next + 1, std::memory_order_relaxed);
    return static_cast<uint32_t>(next);
  }

  // Backward-shift deletion keeps every probe sequence unbroken without tombstones.
  void remove_at(SlotArray* a, uint64_t hole) {
    Slot* slots = a->slots();
    const uint64_t capacity = a->capacity;
    uint64_t pos = hole;
    while (true) {
      if (++pos == capacity) pos = 0;
      if (slots[pos].row == kEmptyRow) break;
      const uint64_t h = home(capacity, mix64(static_cast<uint64_t>(slots[pos].key)));
      const uint64_t dist_pos = (pos + capacity - h) % capacity;
      const uint64_t dist_hole = (pos + capacity - hole) % capacity;
      if (dist_pos >= dist_hole) {
        store_slot(slots[hole], slots[pos].key, slots[pos].row);
        hole = pos;
      }
    }
    __atomic_store_n(&slots[hole].row, kEmptyRow, __ATOMIC_RELAXED);
  }

  // Capacity of sub-map `index` at `generation`: the schedule staggers the sub-maps' growth.
  uint64_t scheduled_capacity(uint64_t index, int32_t generation) const {
    const double phase = static_cast<double>(index) / static_cast<double>(num_subs_);
    return static_cast<uint64_t>(kMinCapacity * std::pow(kGrowth, static_cast<double>(generation) + phase));
  }

  // Rehashes sub-map `index` into the first scheduled capacity that holds min_keys at kMaxLoad,
  // built aside and published with one store; returns the new array.
  SlotArray* grow(uint64_t index, uint64_t min_keys, Retired& retired) {
    SubMap& sub = subs_[index];
    int32_t generation = tallies_[index].generation + 1;
    while (kMaxLoad * static_cast<double>(scheduled_capacity(index, generation)) < static_cast<double>(min_keys)) {
      ++generation;
    }
    const uint64_t capacity = scheduled_capacity(index, generation);
    SlotArray* old = sub.array.load(std::memory_order_relaxed);
    SlotArray* fresh = allocate_array(capacity);
    Slot* slots = fresh->slots();
    const Slot* old_slots = old->slots();
    for (uint64_t i = 0; i < old->capacity; ++i) {
      if (old_slots[i].row == kEmptyRow) continue;
      uint64_t pos = home(capacity, mix64(static_cast<uint64_t>(old_slots[i].key)));
      while (slots[pos].row != kEmptyRow) {
        if (++pos == capacity) pos = 0;
      }
      slots[pos] = old_slots[i];
    }
    capacity_.fetch_add(capacity, std::memory_order_relaxed);
    arrays_.fetch_add(1, std::memory_order_relaxed);
    rehashed_.fetch_add(tallies_[index].size, std::memory_order_relaxed);
    publish(sub, fresh);
    tallies_[index].generation = generation;
    retired.add(old);
    return fresh;
  }

  SlotArena arena_;  // writer only
  std::atomic<uint64_t> arena_overhead_{0};
  std::unique_ptr<SubMap[]> subs_;
  std::unique_ptr<Tally[]> tallies_;
  uint64_t num_subs_ = 0;
  int sub_bits_ = 0;
  mutable std::mutex write_mutex_;
  std::vector<uint32_t> free_rows_;  // writer only
  std::atomic<uint64_t> size_{0};
  std::atomic<uint64_t> next_row_{0};
  std::atomic<uint64_t> capacity_{0};  // slots over all allocated arrays
  std::atomic<uint64_t> arrays_{0};
  std::atomic<uint64_t> free_bytes_{0};
  std::atomic<uint64_t> rehashed_{0};
  std::atomic<uint32_t> write_seq_{0};  // odd while erase moves entries or an array is swapped
  std::atomic<uint32_t> epoch_{0};
  mutable std::atomic<uint64_t> readers_[2] = {0, 0};
};

}  // namespace embps
