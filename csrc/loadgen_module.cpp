// Python binding of the bench's native load generator (csrc/load_gen.h): `_embps_loadgen`, used by
// bench/loadgen.py. Built where grpc++ is found, as the serving gate. The GIL is released for the
// whole run.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
#include <vector>

#include "load_gen.h"

namespace nb = nanobind;
using namespace nb::literals;

using Times = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

namespace {

std::vector<std::string> to_strings(const std::vector<nb::bytes>& items) {
  std::vector<std::string> out;
  out.reserve(items.size());
  for (const nb::bytes& b : items) out.emplace_back(b.c_str(), b.size());
  return out;
}

embps::LoadSchedule schedule_of(Times times, double t0, double hard_end, double timeout_s, int concurrency) {
  embps::LoadSchedule s;
  s.times.assign(times.data(), times.data() + times.shape(0));
  s.t0 = t0;
  s.hard_end = hard_end;
  s.timeout_s = timeout_s;
  s.concurrency = concurrency;
  return s;
}

std::tuple<std::vector<double>, std::vector<double>, std::vector<int16_t>> unpack(embps::LoadResult&& r) {
  return {std::move(r.sent), std::move(r.done), std::move(r.code)};
}

}  // namespace

NB_MODULE(_embps_loadgen, m) {
  m.doc() = "embps bench: an open-loop load generator in C++ for gRPC unary calls and Redis MGETs";
  m.attr("UNSENT") = static_cast<int>(embps::kLoadUnsent);
  m.attr("MISSING_ROWS") = static_cast<int>(embps::kLoadMissingRows);
  m.attr("BAD_REPLY") = static_cast<int>(embps::kLoadBadReply);
  m.attr("SERVER_ERROR") = static_cast<int>(embps::kLoadServerError);

  m.def("run_grpc",
        [](const std::string& address, const std::string& method, const std::vector<nb::bytes>& requests,
           const std::vector<std::vector<int64_t>>& expected, bool many, Times times, double t0, double hard_end,
           double timeout_s, int concurrency, int64_t max_message_bytes) {
          std::vector<std::string> payloads = to_strings(requests);
          embps::LoadSchedule schedule = schedule_of(times, t0, hard_end, timeout_s, concurrency);
          nb::gil_scoped_release release;
          return unpack(embps::run_grpc_load(address, method, payloads, expected, many, schedule, max_message_bytes));
        },
        "address"_a, "method"_a, "requests"_a, "expected"_a, "many"_a, "times"_a, "t0"_a, "hard_end"_a,
        "timeout_s"_a, "concurrency"_a, "max_message_bytes"_a,
        "Sends request i % len(requests) at t0 + times[i]; returns (sent, done, code) per arrival.");

  m.def("run_redis",
        [](const std::string& host, int port, const std::vector<nb::bytes>& commands,
           const std::vector<int64_t>& expected, int64_t row_bytes, Times times, double t0, double hard_end,
           double timeout_s, int concurrency) {
          std::vector<std::string> payloads = to_strings(commands);
          embps::LoadSchedule schedule = schedule_of(times, t0, hard_end, timeout_s, concurrency);
          nb::gil_scoped_release release;
          return unpack(embps::run_redis_load(host, port, payloads, expected, row_bytes, schedule));
        },
        "host"_a, "port"_a, "commands"_a, "expected"_a, "row_bytes"_a, "times"_a, "t0"_a, "hard_end"_a, "timeout_s"_a,
        "concurrency"_a, "Sends command i % len(commands) at t0 + times[i]; returns (sent, done, code) per arrival.");
}
