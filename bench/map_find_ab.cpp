// find of two builds of csrc/hash_map.h in one process: both maps filled with the same keys, then
// their find rates in interleaved rounds (which goes first alternates), so both see the same
// moments of a shared machine; prints the median of the rounds' ratios (B over A). Across
// processes the rates moved 0.6-1.1x between runs of one build on the 2-core VM.
//
//   g++ -O3 -std=c++17 -pthread -DMAP_A='"/before/csrc/hash_map.h"' -DMAP_B='"/after/csrc/hash_map.h"'
//       bench/map_find_ab.cpp -o /tmp/map_find_ab
//   /tmp/map_find_ab 30000000 21 [b-first]   # keys, rounds; b-first: fill map B first
//
// The two headers must differ in content (GCC's #pragma once takes identical files for one):
// append a comment to a copy if the hash map itself did not change.
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>
// Every standard header the maps use comes first: A is read with its namespace renamed.
#define embps embps_base
#include MAP_A
#undef embps
#include MAP_B
#include "clocks.h"
namespace {

double cpu_s() { return bench_clocks::clock_s(CLOCK_THREAD_CPUTIME_ID); }

template <class Map>
void fill(Map& map, const std::vector<int64_t>& keys) {
  constexpr size_t kBatch = 65536;
  std::vector<int64_t> rows(kBatch);
  std::vector<uint8_t> inserted(kBatch);
  for (size_t i = 0; i < keys.size(); i += kBatch) {
    const size_t n = std::min(kBatch, keys.size() - i);
    map.find_or_insert(keys.data() + i, static_cast<int64_t>(n), rows.data(), inserted.data());
  }
}

// Keys per second of the thread's CPU time.
template <class Map>
double find_rate(const Map& map, const std::vector<std::vector<int64_t>>& batches) {
  std::vector<int64_t> out(4096);
  int64_t checksum = 0;
  const double start = cpu_s();
  for (const auto& b : batches) {
    map.find(b.data(), 4096, out.data());
    checksum += out[0];
  }
  const double seconds = cpu_s() - start;
  if (checksum == 42) std::puts("");  // keeps the loop
  return static_cast<double>(batches.size() * 4096) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t num_keys = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 30000000;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 21;
  std::mt19937_64 rng(7);
  std::vector<int64_t> keys(num_keys);
  for (auto& k : keys) k = static_cast<int64_t>(rng());
  embps_base::HashMap a;
  embps::HashMap b;
  if (argc > 3) {
    fill(b, keys);
    fill(a, keys);
  } else {
    fill(a, keys);
    fill(b, keys);
  }
  std::vector<std::vector<int64_t>> batches(200, std::vector<int64_t>(4096));
  for (auto& batch : batches) {
    for (auto& k : batch) k = keys[rng() % num_keys];
  }
  std::vector<double> ratios;
  for (int r = 0; r < rounds; ++r) {
    double rate_a, rate_b;
    if (r % 2) {
      rate_a = find_rate(a, batches);
      rate_b = find_rate(b, batches);
    } else {
      rate_b = find_rate(b, batches);
      rate_a = find_rate(a, batches);
    }
    ratios.push_back(rate_b / rate_a);
  }
  std::sort(ratios.begin(), ratios.end());
  std::printf("%zu keys: find B/A, %d interleaved rounds: median %.3f (min %.3f, max %.3f); bytes per key A %.2f B %.2f\n",
              num_keys, rounds, ratios[ratios.size() / 2], ratios.front(), ratios.back(),
              static_cast<double>(a.memory_bytes()) / static_cast<double>(num_keys),
              static_cast<double>(b.memory_bytes()) / static_cast<double>(num_keys));
  return 0;
}
