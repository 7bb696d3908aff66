// Memory for the hash map's larger sub-map arrays: back to back in 32 MiB chunks aligned to 2 MiB
// and advised for transparent huge pages (madvise(MADV_HUGEPAGE)).
//
// Why: a lookup touches one random slot of a map of hundreds of MB, so nearly every lookup misses
// the TLB. On 4 KiB pages, 1,024 sub-map arrays (~0.6 MB each at 30M keys, from malloc or packed
// alike) made find 20-30% slower than one big array (measured in a C++ loop on this project's
// VM); on huge pages the map is covered by a few hundred TLB entries, and find matches it.
//
// The cost: each new huge page is a page fault. Where the host takes back free 2 MiB blocks (this
// project's Firecracker VM), a fault on a fresh huge page costs ~9 ms, against ~0.3 ms for one
// the process freed a moment ago: the fill calls that draw several are the slowest.
//
// Allocation bumps a pointer in the current chunk. A freed array's whole pages are returned to
// the kernel at once (madvise(MADV_DONTNEED)); a chunk is unmapped when its last array is freed.
// Growth frees the arrays roughly in the order it made them (sub-maps grow on a staggered
// schedule), so chunks empty out one after the other. Not thread-safe: the map's writer calls it.
// Where madvise is refused (no THP support), 4 KiB pages serve.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace embps {

class SlotArena {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kChunk = size_t{32} << 20;
  static constexpr size_t kPage = 4096;
  static constexpr size_t kAlign = 64;  // each array starts on a cache line
  // Smaller arrays come from operator new: a map small enough to have them all fits few pages,
  // and huge pages would cost more memory than the map.
  static constexpr size_t kMinBytes = size_t{64} << 10;

  struct Chunk {
    char* base;
    size_t size;
    size_t used = 0;      // bump offset
    size_t live = 0;      // arrays not yet freed
    size_t live_bytes = 0;
    size_t released = 0;  // bytes handed back with MADV_DONTNEED
  };

  SlotArena() = default;
  SlotArena(const SlotArena&) = delete;
  SlotArena& operator=(const SlotArena&) = delete;
  ~SlotArena() {
    for (Chunk* c : chunks_) unmap(c);
  }

  // `bytes` of memory at a 64-byte boundary, and the chunk to pass back to free(); throws
  // std::bad_alloc when the kernel refuses a chunk.
  void* allocate(size_t bytes, Chunk** owner) {
    bytes = round_up(bytes, kAlign);
    if (current_ == nullptr || current_->used + bytes > current_->size) {
      current_ = map_chunk(bytes > kChunk ? round_up(bytes, kHugePage) : kChunk);
    }
    Chunk* c = current_;
    void* p = c->base + c->used;
    c->used += bytes;
    ++c->live;
    c->live_bytes += bytes;
    *owner = c;
    return p;
  }

  void free(void* p, size_t bytes, Chunk* c) {
    bytes = round_up(bytes, kAlign);
    --c->live;
    c->live_bytes -= bytes;
    if (c->live == 0) {
      if (c == current_) current_ = nullptr;
      for (size_t i = 0; i < chunks_.size(); ++i) {
        if (chunks_[i] != c) continue;
        chunks_[i] = chunks_.back();
        chunks_.pop_back();
        break;
      }
      unmap(c);
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
  // bump offset, and the pages of freed arrays not yet handed back (shared with live neighbours).
  size_t overhead_bytes() const {
    size_t total = 0;
    for (const Chunk* c : chunks_) {
      const size_t touched = round_up(c->used, kHugePage) < c->size ? round_up(c->used, kHugePage) : c->size;
      const size_t held = touched - c->released;
      total += held > c->live_bytes ? held - c->live_bytes : 0;
    }
    return total;
  }

 private:
  static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

  Chunk* map_chunk(size_t size) {
    // Map 2 MiB more than needed and trim, so the chunk starts on a huge page boundary.
    void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = round_up(begin, kHugePage);
    if (aligned > begin) munmap(raw, aligned - begin);
    const uintptr_t tail = aligned + size;
    if (begin + size + kHugePage > tail) munmap(reinterpret_cast<void*>(tail), begin + size + kHugePage - tail);
    char* base = reinterpret_cast<char*>(aligned);
#ifdef MADV_HUGEPAGE
    madvise(base, size, MADV_HUGEPAGE);  // a hint: refused without THP, and then 4 KiB pages serve
#endif
    Chunk* c = new Chunk{base, size};
    chunks_.push_back(c);
    return c;
  }

  static void unmap(Chunk* c) {
    munmap(c->base, c->size);
    delete c;
  }

  std::vector<Chunk*> chunks_;
  Chunk* current_ = nullptr;
};

}  // namespace embps
