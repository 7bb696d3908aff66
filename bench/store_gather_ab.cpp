// Gather of two builds of csrc/serving_store.h (the replica's row store) in one process: both
// stores hold the same rows, then Lookup-sized gathers (64 keys, Zipf over the rows, as `embps
// bench serve`) run in interleaved rounds (which goes first alternates), so both see the same
// moments of a shared machine; prints the median of the rounds' ratios of keys per CPU-second
// (B over A), each build's ns per key, and the wall time each store took to be filled.
//
//   g++ -O2 -std=c++17 -pthread -DSTORE_A='"/before/csrc/serving_store.h"'
//       -DSTORE_B='"/after/csrc/serving_store.h"' bench/store_gather_ab.cpp -o /tmp/store_gather_ab
//   /tmp/store_gather_ab 1000000 64 21 [b-first]   # rows, dim, rounds; b-first: fill store B first
//
// Every header the two builds include must differ in content (GCC's #pragma once takes identical
// files for one): append a comment to each header of the copy that did not change.
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
// Every standard header the stores use comes first: A is read with its namespace renamed.
#define embps embps_base
#include STORE_A
#undef embps
#include STORE_B
#include "clocks.h"
namespace {

double wall_s() { return bench_clocks::clock_s(CLOCK_MONOTONIC); }
double cpu_s() { return bench_clocks::clock_s(CLOCK_THREAD_CPUTIME_ID); }

constexpr int64_t kBatch = 64;

// Wall seconds to write every row (page faults included).
template <class Store>
double fill(Store& store, const std::vector<int64_t>& keys, int64_t dim) {
  const double start = wall_s();
  constexpr size_t kChunk = 65536;
  std::vector<float> words(kChunk * static_cast<size_t>(dim));
  for (size_t i = 0; i < keys.size(); i += kChunk) {
    const size_t n = std::min(kChunk, keys.size() - i);
    for (size_t j = 0; j < n * static_cast<size_t>(dim); ++j) words[j] = static_cast<float>(i + j);
    store.upsert(keys.data() + i, static_cast<int64_t>(n), words.data());
  }
  return wall_s() - start;
}

// Keys per second of the thread's CPU time.
template <class Store>
double gather_rate(const Store& store, const std::vector<int64_t>& lookups, int64_t dim) {
  std::vector<float> out(static_cast<size_t>(kBatch * dim));
  std::vector<uint8_t> found(kBatch);
  int64_t missing = 0;
  const double start = cpu_s();
  for (size_t i = 0; i + kBatch <= lookups.size(); i += kBatch) {
    store.gather(lookups.data() + i, kBatch, out.data(), found.data());
    missing += kBatch - std::count(found.begin(), found.end(), uint8_t{1});
  }
  const double seconds = cpu_s() - start;
  if (missing != 0) {
    std::fprintf(stderr, "%lld keys not found\n", static_cast<long long>(missing));
    std::exit(1);
  }
  return static_cast<double>(lookups.size()) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t rows = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1000000;
  const int64_t dim = argc > 2 ? std::atoll(argv[2]) : 64;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 21;
  std::mt19937_64 rng(7);
  std::vector<int64_t> keys(rows);
  for (auto& k : keys) k = static_cast<int64_t>(rng() >> 1);
  embps_base::ShardStore a(dim);
  embps::ShardStore b(dim);
  double fill_a, fill_b;
  if (argc > 4) {
    fill_b = fill(b, keys, dim);
    fill_a = fill(a, keys, dim);
  } else {
    fill_a = fill(a, keys, dim);
    fill_b = fill(b, keys, dim);
  }
  // Zipf(1.05) over the rows, by rank, as bench/keys.py draws the serving bench's keys.
  std::vector<double> cdf(rows);
  double total = 0.0;
  for (size_t r = 0; r < rows; ++r) cdf[r] = (total += std::pow(static_cast<double>(r + 1), -1.05));
  std::uniform_real_distribution<double> uniform(0.0, total);
  std::vector<int64_t> lookups(static_cast<size_t>(kBatch) * 20000);
  for (auto& k : lookups) {
    const size_t rank = std::lower_bound(cdf.begin(), cdf.end(), uniform(rng)) - cdf.begin();
    k = keys[std::min(rank, rows - 1)];
  }
  std::vector<double> ratios, ns_a, ns_b;
  for (int r = 0; r < rounds; ++r) {
    double rate_a, rate_b;
    if (r % 2) {
      rate_a = gather_rate(a, lookups, dim);
      rate_b = gather_rate(b, lookups, dim);
    } else {
      rate_b = gather_rate(b, lookups, dim);
      rate_a = gather_rate(a, lookups, dim);
    }
    ratios.push_back(rate_b / rate_a);
    ns_a.push_back(1e9 / rate_a);
    ns_b.push_back(1e9 / rate_b);
  }
  std::sort(ratios.begin(), ratios.end());
  std::sort(ns_a.begin(), ns_a.end());
  std::sort(ns_b.begin(), ns_b.end());
  std::printf("%zu rows x %lld: gather of %lld keys, B/A keys per CPU-second, %d interleaved rounds: median %.3f "
              "(min %.3f, max %.3f); median ns per key A %.1f B %.1f; fill A %.2f s B %.2f s\n",
              rows, static_cast<long long>(dim), static_cast<long long>(kBatch), rounds, ratios[ratios.size() / 2],
              ratios.front(), ratios.back(), ns_a[ns_a.size() / 2], ns_b[ns_b.size() / 2], fill_a, fill_b);
  return 0;
}
