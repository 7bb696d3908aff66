// Memory for the hash map's larger sub-map arrays: back to back in chunks aligned to 2 MiB and
// advised for transparent huge pages (madvise(MADV_HUGEPAGE)), faulted in ahead of need by a
// thread of the arena's own.
//
// Why huge pages: a lookup touches one random slot of a map of hundreds of MB, so nearly every
// lookup misses the TLB. On 4 KiB pages, 1,024 sub-map arrays (~0.6 MB each at 30M keys, from
// malloc or packed alike) made find 20-30% slower than one big array (measured in a C++ loop on
// this project's VM); on huge pages the map is covered by a few hundred TLB entries, and find
// matches it.
//
// Why ahead of need: each new huge page is a page fault, and where the host takes back free 2 MiB
// blocks (this project's Firecracker VM) a fault on a fresh one costs ~2-9 ms, against ~0.1-0.3 ms
// for one the process freed a moment ago: fill calls that drew several took 3-18x the median call.
// So the arena's thread (Prefaulter) maps the next chunk and writes to each of its pages before
// the writer needs it, and unmaps the chunks the writer empties: the map's calls then take no
// fault and hold mmap_lock only for MADV_DONTNEED (the thread's own faults take the per-VMA lock
// where the kernel has one, 6.4 on, so they hold up no mmap elsewhere in the process). The
// writer takes filled pages only, so no page is written by both; it never waits for the thread:
// when too little is filled, it maps just the array it needs, on 4 KiB pages (~0.8 ms per 2 MiB
// here).
//
// Chunk size: 1/32 of the live arrays, within [2, 32] MiB (and at least 4 of the largest array):
// the chunk in use and the one filled ahead hold at most 1/16 of the map beyond its arrays
// (1.1-1.5 bytes per key at 30M keys here, counted by overhead_bytes), and at 30M keys one
// chunk lasts ~5 fill calls of 65,536 new keys (each allocates ~4 MB of arrays), time enough to
// fill the next.
//
// Allocation bumps a pointer in the current chunk. A freed array's whole pages are returned to
// the kernel at once (madvise(MADV_DONTNEED)); a chunk is unmapped when its last array is freed.
// Growth frees the arrays roughly in the order it made them (sub-maps grow on a staggered
// schedule), so chunks empty out one after the other. Not thread-safe: the map's writer calls it.
// Where madvise is refused (no THP support), 4 KiB pages serve.
#pragma once

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace embps {

class SlotArena {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kMaxChunk = size_t{32} << 20;
  static constexpr size_t kPage = 4096;
  static constexpr size_t kAlign = 64;  // each array starts on a cache line
  // Smaller arrays come from operator new: a map small enough to have them all fits few pages,
  // and huge pages would cost more memory than the map.
  static constexpr size_t kMinBytes = size_t{64} << 10;

  struct Chunk {
    char* base;
    size_t size;
    bool filled = false;  // every page faulted in before the writer took it
    size_t used = 0;      // bump offset
    size_t live = 0;      // arrays not yet freed
    size_t live_bytes = 0;
    size_t released = 0;  // bytes handed back with MADV_DONTNEED
  };

  // Prefault threads of this process's arenas started and not yet joined (see Prefaulter::live).
  static int prefault_threads();

  SlotArena() = default;
  SlotArena(const SlotArena&) = delete;
  SlotArena& operator=(const SlotArena&) = delete;
  ~SlotArena() {
    prefaulter_.stop();
    for (Chunk* c : chunks_) unmap(c);
  }

  // `bytes` of memory at a 64-byte boundary, and the chunk to pass back to free(); throws
  // std::bad_alloc when the kernel refuses a chunk.
  void* allocate(size_t bytes, Chunk** owner) {
    bytes = round_up(bytes, kAlign);
    largest_ = std::max(largest_, bytes);
    if (current_ == nullptr || current_->used + bytes > current_->size) {
      current_ = next_chunk(bytes);
    }
    Chunk* c = current_;
    void* p = c->base + c->used;
    c->used += bytes;
    ++c->live;
    c->live_bytes += bytes;
    live_bytes_ += bytes;
    *owner = c;
    return p;
  }

  void free(void* p, size_t bytes, Chunk* c) {
    bytes = round_up(bytes, kAlign);
    --c->live;
    c->live_bytes -= bytes;
    live_bytes_ -= bytes;
    if (c->live == 0) {
      if (c == current_) current_ = nullptr;
      for (size_t i = 0; i < chunks_.size(); ++i) {
        if (chunks_[i] != c) continue;
        chunks_[i] = chunks_.back();
        chunks_.pop_back();
        break;
      }
      // An empty arena (a cleared map) keeps no chunk filled ahead either.
      if (chunks_.empty()) ahead_bytes_ = 0;
      if (!prefaulter_.retire(c, chunks_.empty())) unmap(c);
      return;
    }
    // The whole pages inside the array go back now; the pages it shares with neighbours stay.
    const uintptr_t start = round_up(reinterpret_cast<uintptr_t>(p), kPage);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~uintptr_t{kPage - 1};
    if (end > start && madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED) == 0) {
      c->released += end - start;
    }
  }

  // Memory the chunks hold beyond the live arrays: the rest of the huge page at each chunk's
  // bump offset (of the whole current chunk where it was filled ahead), the pages of freed arrays
  // not yet handed back (shared with live neighbours), and the chunk being filled ahead.
  size_t overhead_bytes() const {
    size_t total = ahead_bytes_;
    for (const Chunk* c : chunks_) {
      const size_t touched = c == current_ && c->filled ? c->size : std::min(round_up(c->used, kHugePage), c->size);
      const size_t held = touched - c->released;
      total += held > c->live_bytes ? held - c->live_bytes : 0;
    }
    return total;
  }

 private:
  // The arena's thread: maps the next chunk and fills it a huge page at a time, trims the chunks
  // the writer leaves and unmaps the ones it empties. Started by the first chunk, stopped
  // (joined) with the arena. The writer takes filled memory only: [spare_->base, fill_end_), a
  // prefix the thread never writes to again; the page it is filling lies past fill_end_. In a
  // child made by fork (where the thread does not exist) it is left alone and the writer maps,
  // faults and unmaps everything itself.
  class Prefaulter {
   public:
    static constexpr const char* kThreadName = "embps-prefault";  // what `top -H` sees

    // This process's prefault threads started and not yet joined (in a forked child: its
    // parent's at the fork, until their arenas are destroyed there). A joined thread has returned,
    // but its /proc/self/task entry may outlive the join by a moment (the kernel wakes the joiner
    // before it reaps the task), so the count, not /proc, tells a caller that stop() is done.
    static int live() { return live_.load(std::memory_order_acquire); }

    ~Prefaulter() { stop(); }

    bool running() const { return thread_.joinable() && owner_ == getpid(); }

    void start() {
      if (thread_.joinable()) return;
      owner_ = getpid();
      try {
        thread_ = std::thread([this] {
          pthread_setname_np(pthread_self(), kThreadName);
          run();
        });
        live_.fetch_add(1, std::memory_order_release);
      } catch (const std::system_error&) {
        // No thread to spare: pages fault in on first use.
      }
    }

    // Joins the thread (it finishes the huge page it is filling), then unmaps the chunks it held.
    void stop() {
      if (!thread_.joinable()) return;
      if (owner_ != getpid()) {
        thread_.detach();  // a forked child's copy: the thread and its chunks are the parent's
        live_.fetch_sub(1, std::memory_order_release);
        return;
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true, std::memory_order_relaxed);
      }
      wake_.notify_one();
      thread_.join();
      live_.fetch_sub(1, std::memory_order_release);
      if (spare_ != nullptr) retired_.push_back(spare_);
      spare_ = nullptr;
      for (Chunk* c : retired_) unmap(c);
      retired_.clear();
    }

    // Filled memory for `bytes` more past current's bump offset (nullptr: no current chunk):
    // current itself, grown over the filled pages that follow it, or the filled prefix of the
    // spare chunk as a chunk of its own when that holds `bytes`; nullptr when neither does.
    // Either way a chunk of `next_size` bytes is to be filled next.
    Chunk* take(Chunk* current, size_t bytes, size_t next_size) {
      if (!running()) return nullptr;
      Chunk* c = nullptr;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        wanted_ = next_size;
        const size_t filled = spare_ == nullptr ? 0 : static_cast<size_t>(fill_end_ - spare_->base);
        const bool whole = spare_ != nullptr && filled == spare_->size;
        if (current != nullptr && current->filled && filled > 0 && current->base + current->size == spare_->base &&
            current->used + bytes <= current->size + filled) {
          current->size += filled;  // contiguous: the spare's filled prefix joins the current chunk
          c = current;
          if (whole) delete spare_;
        } else if (filled >= bytes) {
          c = whole ? spare_ : new Chunk{spare_->base, filled};
          c->filled = true;
        }
        if (c != nullptr) {
          if (whole) {
            spare_ = nullptr;
          } else {
            spare_->base += filled;  // == fill_end_: the page being filled stays this thread's
            spare_->size -= filled;
          }
        }
      }
      wake_.notify_one();
      return c;
    }

    // The writer left chunk c for another: its filled pages past the last huge page in use go back.
    void leave(Chunk* c) {
      if (!running() || !c->filled) return;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        trimmed_.push_back(c);
      }
      wake_.notify_one();
    }

    // Hands an emptied chunk over to be unmapped; false when there is no thread (the caller
    // unmaps it). When the arena holds no chunk any more, nothing is filled ahead either.
    bool retire(Chunk* c, bool arena_empty) {
      if (!running()) return false;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        retired_.push_back(c);
        if (arena_empty) {
          wanted_ = 0;
          if (spare_ != nullptr) retired_.push_back(spare_);
          spare_ = nullptr;
        }
      }
      wake_.notify_one();
      return true;
    }

   private:
    void run() {
      std::unique_lock<std::mutex> lock(mutex_);
      while (!stop_.load(std::memory_order_relaxed)) {
        if (!trimmed_.empty() || !retired_.empty()) {
          std::vector<Chunk*> trimmed, retired;
          trimmed.swap(trimmed_);
          retired.swap(retired_);
          lock.unlock();
          for (Chunk* c : trimmed) trim(c);  // before unmapping: a trimmed chunk may be retired too
          for (Chunk* c : retired) unmap(c);
          lock.lock();
        } else if (spare_ == nullptr && wanted_ > 0) {
          const size_t size = wanted_;
          lock.unlock();
          Chunk* c = try_map_chunk(size);
          lock.lock();
          if (c == nullptr) {
            wanted_ = 0;  // the kernel refused: the writer maps its own (and throws if refused too)
          } else if (wanted_ == 0) {
            retired_.push_back(c);  // the arena emptied meanwhile
          } else {
            spare_ = c;
            fill_end_ = c->base;
          }
        } else if (spare_ != nullptr && fill_end_ < spare_->base + spare_->size) {
          char* page = fill_end_;  // past what the writer may take: this thread's alone
          lock.unlock();
          for (size_t off = 0; off < kHugePage; off += kPage) {
            *static_cast<volatile char*>(static_cast<void*>(page + off)) = 0;  // one fault where THP serves
          }
          lock.lock();
          if (spare_ != nullptr && spare_->base <= page && page < spare_->base + spare_->size) {
            fill_end_ = page + kHugePage;
          }
        } else {
          wake_.wait(lock);
        }
      }
    }

    // On a chunk the writer has left: its filled pages past the last huge page in use go back
    // (those up to it are counted by overhead_bytes until their arrays are freed).
    static void trim(Chunk* c) {
      const size_t from = round_up(c->used, kHugePage);
      if (from < c->size) madvise(c->base + from, c->size - from, MADV_DONTNEED);
    }

    static inline std::atomic<int> live_{0};
    std::thread thread_;
    pid_t owner_ = 0;  // the process that started the thread
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<bool> stop_{false};  // set under mutex_; read without it between huge pages
    // Under mutex_:
    size_t wanted_ = 0;         // size of the chunk to map next once spare_ is taken; 0: none
    Chunk* spare_ = nullptr;    // the chunk being filled, from its base to fill_end_
    char* fill_end_ = nullptr;
    std::vector<Chunk*> trimmed_;  // chunks the writer left, their tails to hand back
    std::vector<Chunk*> retired_;  // emptied chunks to unmap
  };

  static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

  // 1/32 of the live arrays within [2, 32] MiB, and room for 4 of the largest array.
  size_t chunk_size() const {
    const size_t size = std::clamp(round_up(live_bytes_ / 32, kHugePage), kHugePage, kMaxChunk);
    return std::max(size, round_up(4 * largest_, kHugePage));
  }

  // Room for `bytes`: the current chunk grown over filled pages, or the next chunk: filled ahead
  // when the prefaulter has enough, else mapped here. While the prefaulter runs, a chunk mapped
  // here holds just this array, so that the next one comes from filled memory again.
  Chunk* next_chunk(size_t bytes) {
    const size_t size = chunk_size();
    Chunk* c = prefaulter_.take(current_, bytes, size);
    if (c != nullptr && c == current_) return c;
    if (current_ != nullptr) prefaulter_.leave(current_);
    if (c == nullptr) {
      // With the prefaulter behind, this array's pages fault in here: 4 KiB ones, ~0.8 ms per
      // 2 MiB on this VM where a fresh huge page can take ~9 ms; the few arrays on them read
      // a little slower until their sub-maps grow again.
      const bool behind = prefaulter_.running();
      c = try_map_chunk(behind ? round_up(bytes, kHugePage) : std::max(size, round_up(bytes, kHugePage)), !behind);
      if (c == nullptr) throw std::bad_alloc();
    }
    chunks_.push_back(c);
    prefaulter_.start();
    if (prefaulter_.running()) ahead_bytes_ = size;  // the chunk it fills (counted in full)
    return c;
  }

  // nullptr when the kernel refuses the mapping; `huge`: advised for transparent huge pages.
  static Chunk* try_map_chunk(size_t size, bool huge = true) {
    // Map 2 MiB more than needed and trim, so the chunk starts on a huge page boundary.
    void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = round_up(begin, kHugePage);
    if (aligned > begin) munmap(raw, aligned - begin);
    const uintptr_t tail = aligned + size;
    if (begin + size + kHugePage > tail) munmap(reinterpret_cast<void*>(tail), begin + size + kHugePage - tail);
    char* base = reinterpret_cast<char*>(aligned);
#ifdef MADV_HUGEPAGE
    if (huge) madvise(base, size, MADV_HUGEPAGE);  // a hint: refused without THP, and then 4 KiB pages serve
#endif
    return new Chunk{base, size};
  }

  static void unmap(Chunk* c) {
    munmap(c->base, c->size);
    delete c;
  }

  std::vector<Chunk*> chunks_;
  Chunk* current_ = nullptr;
  size_t live_bytes_ = 0;
  size_t largest_ = 0;      // the largest array allocated so far
  size_t ahead_bytes_ = 0;  // the chunk the prefaulter is asked to fill next (counted in full)
  Prefaulter prefaulter_;   // stopped first thing in ~SlotArena
};

inline int SlotArena::prefault_threads() { return Prefaulter::live(); }

}  // namespace embps
