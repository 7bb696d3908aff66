// The clock of the C++ loops in bench/ (map_fill_loop.cpp, map_find_ab.cpp, store_gather_ab.cpp).
#pragma once

#include <time.h>

namespace bench_clocks {

// Seconds on clock `id`: CLOCK_THREAD_CPUTIME_ID (this thread's CPU time) or CLOCK_MONOTONIC (wall).
inline double clock_s(clockid_t id) {
  timespec t;
  clock_gettime(id, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

}  // namespace bench_clocks
