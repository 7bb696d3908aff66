// The bench's open-loop load generator in C++ (`embps bench serve`, bench/loadgen.py): one thread
// per client process sends a schedule of calls to a gRPC server (a unary method, any server) or
// to Redis (a command per call over a pool of connections), with the same scheduler for both.
//
// Why: the Python generator (a thread per call in flight, grpcio or redis-py) spent more CPU per
// call than either server, and on a 2-core machine it shares the cores with the server under test,
// so it capped what the bench could see of the server. Here a call costs the client a few
// microseconds, and the same scheduler drives both protocols: the comparison measures the servers.
//
//   arrivals t_0 < t_1 < ... (seconds after t0, CLOCK_MONOTONIC, as Python's time.monotonic())
//   arrival i is sent at t0 + t_i or, when `concurrency` calls are in flight, as soon as one ends
//   (its latency still counts from t0 + t_i: no coordinated omission); no send at or after
//   hard_end; each call's deadline is min(timeout, hard_end - sent).
//   -> sent[i], done[i] (monotonic seconds; NaN: never), code[i] (see LoadCode)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace embps {

// A call's outcome: 0..16 are gRPC status codes (0 OK); the rest are the generator's own.
enum LoadCode : int16_t {
  kLoadUnsent = -1,       // never sent before hard_end
  kLoadMissingRows = 100,  // answered, but a key had no row
  kLoadBadReply = 101,     // answered with a reply of the wrong shape
  kLoadServerError = 102,  // Redis answered an error reply
};

struct LoadSchedule {
  std::vector<double> times;  // arrival offsets after t0, seconds, sorted
  double t0 = 0.0;            // CLOCK_MONOTONIC seconds
  double hard_end = 0.0;      // CLOCK_MONOTONIC seconds: nothing is sent at or after it
  double timeout_s = 5.0;
  int concurrency = 32;       // calls in flight at most
};

struct LoadResult {
  std::vector<double> sent;
  std::vector<double> done;
  std::vector<int16_t> code;
};

// gRPC: `method` (e.g. /embps.v1.Serving/Lookup) on an insecure channel to `address` (host:port);
// request i % requests.size() for arrival i. A reply is checked as a ServingLookupResponse (or,
// with `many`, a ServingLookupManyResponse): per part, values of expected[r][p] rows of its dim
// and every found flag set.
LoadResult run_grpc_load(const std::string& address, const std::string& method, const std::vector<std::string>& requests,
                         const std::vector<std::vector<int64_t>>& expected, bool many, const LoadSchedule& schedule,
                         int64_t max_message_bytes);

// Redis: `concurrency` connections to host:port, each with at most one command in flight;
// commands[r] is a RESP-encoded MGET of expected[r] keys, each reply must be that many bulk
// strings of row_bytes bytes (a nil is MISSING_ROWS).
LoadResult run_redis_load(const std::string& host, int port, const std::vector<std::string>& commands,
                          const std::vector<int64_t>& expected, int64_t row_bytes, const LoadSchedule& schedule);

}  // namespace embps
