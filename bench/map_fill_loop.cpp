// The hash map's fill and find in a C++ loop, with no Python in the timings: the figures of
// issue 16's growth in pieces (slowest fill call against the median, find rate) for one build of
// csrc/hash_map.h. Build it against a checkout's csrc and run the builds in turn:
//
//   g++ -O3 -std=c++17 -pthread -I csrc bench/map_fill_loop.cpp -o /tmp/map_fill_loop
//   /tmp/map_fill_loop 30000000 65536   # keys, keys per call
//
// Prints, up to 10M keys and up to all keys: the median, p99.9 and max of the calls' times on the
// thread's CPU clock (page faults included, time without a core excluded), on the wall clock and
// off the run queue; where the slowest call fell, what it rehashed, how many page faults it took
// and how often the scheduler preempted it; the same among the calls never preempted; then the
// find rate (batches of 4096 random existing keys, median of 9 rounds), the map's bytes per key
// and how much of the process's memory huge pages map.
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "clocks.h"
#include "hash_map.h"

namespace {

using bench_clocks::clock_s;

// The calling thread's time runnable but without a core (ns), from /proc/thread-self/schedstat.
double run_queue_wait_s() {
  FILE* f = std::fopen("/proc/thread-self/schedstat", "r");
  if (f == nullptr) return 0.0;
  unsigned long long on_cpu = 0, waiting = 0;
  if (std::fscanf(f, "%llu %llu", &on_cpu, &waiting) != 2) waiting = 0;
  std::fclose(f);
  return 1e-9 * static_cast<double>(waiting);
}

// "Rss" and "AnonHugePages" of /proc/self/smaps_rollup, in MiB: how much of the map huge pages map.
void print_memory() {
  FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return;
  char line[256];
  double rss = 0, huge = 0;
  while (std::fgets(line, sizeof line, f) != nullptr) {
    unsigned long kb = 0;
    if (std::sscanf(line, "Rss: %lu kB", &kb) == 1) rss = static_cast<double>(kb) / 1024;
    if (std::sscanf(line, "AnonHugePages: %lu kB", &kb) == 1) huge = static_cast<double>(kb) / 1024;
  }
  std::fclose(f);
  std::printf("process RSS %.0f MiB, of which on huge pages %.0f MiB\n", rss, huge);
}

// The calling thread's page faults, and how often the scheduler took its core away (involuntary
// context switches): on a shared machine a preempted call's CPU time is not the map's alone.
std::pair<long, long> faults_and_preemptions() {
  rusage u;
  getrusage(RUSAGE_THREAD, &u);
  return {u.ru_minflt, u.ru_nivcsw};
}

struct Call {
  double cpu, wall, off_queue;  // off_queue: wall less the run-queue wait (blocked time stays)
  uint64_t keys_after, rehashed;
  long faults;  // the calling thread's page faults in the call (a huge page is one)
  long preemptions;
};

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  return v[i];
}

void report(const std::vector<Call>& calls, uint64_t upto) {
  std::vector<double> cpu, wall, off_queue, cpu_kept;  // cpu_kept: calls never preempted
  const Call* slowest = nullptr;
  const Call* slowest_kept = nullptr;
  uint64_t most_rehashed = 0;
  for (const Call& c : calls) {
    if (c.keys_after > upto) break;
    cpu.push_back(c.cpu);
    wall.push_back(c.wall);
    off_queue.push_back(c.off_queue);
    if (slowest == nullptr || c.cpu > slowest->cpu) slowest = &c;
    if (c.preemptions == 0) {
      cpu_kept.push_back(c.cpu);
      if (slowest_kept == nullptr || c.cpu > slowest_kept->cpu) slowest_kept = &c;
    }
    most_rehashed = std::max(most_rehashed, c.rehashed);
  }
  const double cpu_median = quantile(cpu, 0.5), wall_median = quantile(wall, 0.5);
  const double off_median = quantile(off_queue, 0.5);
  std::printf(
      "to %.0fM keys, %zu calls: CPU median %.2f ms, p99.9 %.2f ms, max %.2f ms (%.2fx median, at %.1fM keys, "
      "rehashed %.2fM, %ld page faults, preempted %ld times) | wall median %.2f ms, max %.2f ms (%.2fx) | off the run queue median "
      "%.2f ms, max %.2f ms (%.2fx) | most rehashed by one call %.2fM\n",
      static_cast<double>(upto) / 1e6, cpu.size(), cpu_median * 1e3, quantile(cpu, 0.999) * 1e3,
      slowest->cpu * 1e3, slowest->cpu / cpu_median, static_cast<double>(slowest->keys_after) / 1e6,
      static_cast<double>(slowest->rehashed) / 1e6, slowest->faults, slowest->preemptions, wall_median * 1e3, quantile(wall, 1.0) * 1e3,
      quantile(wall, 1.0) / wall_median, off_median * 1e3, quantile(off_queue, 1.0) * 1e3,
      quantile(off_queue, 1.0) / off_median, static_cast<double>(most_rehashed) / 1e6);
  if (slowest_kept != nullptr) {
    const double kept_median = quantile(cpu_kept, 0.5);
    std::printf("    %zu calls never preempted: CPU median %.2f ms, max %.2f ms (%.2fx, at %.1fM keys, %ld page faults)\n",
                cpu_kept.size(), kept_median * 1e3, slowest_kept->cpu * 1e3, slowest_kept->cpu / kept_median,
                static_cast<double>(slowest_kept->keys_after) / 1e6, slowest_kept->faults);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t num_keys = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 30000000;
  const uint64_t batch = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 65536;
  std::mt19937_64 rng(7);
  std::vector<int64_t> keys(num_keys);
  for (auto& k : keys) k = static_cast<int64_t>(rng());
  std::vector<int64_t> rows(batch);
  std::vector<uint8_t> inserted(batch);
  std::vector<Call> calls;
  {
    embps::HashMap map;
    for (uint64_t i = 0; i < num_keys; i += batch) {
      const uint64_t n = std::min(batch, num_keys - i);
      const uint64_t before = map.rehashed();
      const auto [faults0, preempted0] = faults_and_preemptions();
      const double queue0 = run_queue_wait_s();
      const double cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID), wall0 = clock_s(CLOCK_MONOTONIC);
      map.find_or_insert(keys.data() + i, static_cast<int64_t>(n), rows.data(), inserted.data());
      const double cpu1 = clock_s(CLOCK_THREAD_CPUTIME_ID), wall1 = clock_s(CLOCK_MONOTONIC);
      const double queued = run_queue_wait_s() - queue0;
      const auto [faults1, preempted1] = faults_and_preemptions();
      calls.push_back(Call{cpu1 - cpu0, wall1 - wall0, wall1 - wall0 - queued, i + n, map.rehashed() - before, faults1 - faults0,
                           preempted1 - preempted0});
    }
    if (num_keys > 10000000) report(calls, 10000000);
    report(calls, num_keys);

    print_memory();
    constexpr int64_t kRead = 4096;
    std::vector<std::vector<int64_t>> batches(200, std::vector<int64_t>(kRead));
    for (auto& b : batches) {
      for (auto& k : b) k = keys[rng() % num_keys];
    }
    std::vector<int64_t> out(kRead);
    std::vector<double> rates;
    int64_t checksum = 0;
    for (int round = 0; round < 9; ++round) {
      const double t0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
      for (const auto& b : batches) {
        map.find(b.data(), kRead, out.data());
        checksum += out[0];
      }
      rates.push_back(static_cast<double>(batches.size() * kRead) / (clock_s(CLOCK_THREAD_CPUTIME_ID) - t0));
    }
    std::printf("find: %.2f M keys/CPU-s (median of 9 rounds, %.2f-%.2f), %.1f bytes per key (checksum %" PRId64 ")\n",
                quantile(rates, 0.5) / 1e6, quantile(rates, 0.0) / 1e6, quantile(rates, 1.0) / 1e6,
                static_cast<double>(map.memory_bytes()) / static_cast<double>(num_keys), checksum);
  }
  return 0;
}
