// Lookups answered in C++ on the serving gate's worker threads: no Python, no GIL.
//
//   request bytes ─parse (serving_wire)─> table, keys, dim, dtype
//      ─token (constant time)─ ─keys -> shard (mix64 & 0xFFFF -> bucket table)─ ─ShardStore::gather─
//      ─missing keys: zeros or the deterministic init (csrc/row_ops.h, as the PS)─ ─encode─> reply
//
// The same status codes and messages as the Python path (serving/server.py's fill_lookup, the
// call wrapper of ps/process/calls.py and TokenAuth of ps/security/server_auth.py), and the same
// metrics, counted in atomics that serving/metrics.py exports at each scrape.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "row_codec.h"
#include "serving_gate.h"
#include "serving_store.h"

namespace embps {

// A latency histogram (bucket bounds in seconds, as prometheus_client's) in atomics.
class NativeHistogram {
 public:
  explicit NativeHistogram(size_t buckets = 0) : counts_(buckets + 1) {}
  void observe(const std::vector<double>& bounds, double seconds);
  // cumulative counts per bound (+Inf last), sum of seconds, count
  void read(std::vector<uint64_t>& cumulative, double& sum, uint64_t& count) const;

 private:
  std::vector<std::atomic<uint64_t>> counts_;  // per bucket, not cumulative; +Inf last
  std::atomic<uint64_t> sum_ns_{0};
};

struct TableConfigNative {
  std::string name;
  int64_t dim = 0;
  // Row words: float32 values, float16 values two per word, or row-wise int8 (csrc/row_codec.h).
  Storage storage = Storage::kFloat32;
  bool default_init = false;  // missing keys read as the deterministic init (else zeros)
  uint64_t seed = 0;
  int initializer = 0;  // csrc/row_ops.h Init
  double init_scale = 0.0;
};

class ServingTable {
 public:
  ServingTable(const TableConfigNative& config, std::vector<int32_t> buckets, int64_t num_shards);
  const TableConfigNative& config() const { return config_; }
  int64_t width() const { return width_; }
  int64_t num_shards() const { return static_cast<int64_t>(shards_.size()); }
  std::shared_ptr<ShardStore> shard(int64_t s) const;
  void set_shard(int64_t s, std::shared_ptr<ShardStore> store);
  // The follower's link state, for the reply's `stale` (time.monotonic() seconds).
  void set_link(int64_t s, bool connected, double last_message);
  bool stale(int64_t s, double now, double threshold) const;
  int32_t shard_of(int64_t key) const {
    return buckets_[mix64(static_cast<uint64_t>(key)) & 0xFFFFu];
  }
  // consistency = "step": the replica's clock (shared by its tables) and each shard's pending
  // store of the next cut (see ModelClock in serving_store.h). Without a clock: version 0.
  void set_clock(std::shared_ptr<ModelClock> clock) { std::atomic_store(&clock_, std::move(clock)); }
  std::shared_ptr<ModelClock> clock() const { return std::atomic_load(&clock_); }
  void set_pending(int64_t s, uint64_t step, bool replace, std::shared_ptr<ShardStore> rows);
  void clear_pending(int64_t s);
  // Words and found of keys at model version `version` (pending stores of steps <= version
  // first, then the main stores); the caller checks clock()->still_valid(version) afterwards.
  // Returns the stores whose versions the reply reports: a shard's pending store where one was read.
  std::vector<std::shared_ptr<ShardStore>> gather_at(const int64_t* keys, int64_t n, float* words, uint8_t* found,
                                                     uint64_t version) const;

 private:
  TableConfigNative config_;
  int64_t width_;
  std::vector<int32_t> buckets_;
  std::vector<std::shared_ptr<ShardStore>> shards_;  // read and written with std::atomic_load/store
  std::unique_ptr<std::atomic<bool>[]> connected_;
  std::unique_ptr<std::atomic<double>[]> last_message_;
  std::shared_ptr<ModelClock> clock_;
  std::vector<std::shared_ptr<PendingShard>> pending_;  // read and written with std::atomic_load/store
  // Pending stores set: readers skip the shared_ptr loads (a lock pool in libstdc++) while 0. The
  // writer counts up before it publishes a cut and down after it merged, so a reader at a cut
  // that has pending stores always sees them.
  std::atomic<int64_t> num_pending_{0};
};

// The code, message and bytes of one answered call (OK: payload is the reply message).
struct NativeAnswer {
  int code = 0;
  std::string message;
  std::string payload;
};

class NativeLookups {
 public:
  static constexpr int kCodes = 17;
  static constexpr int kMethods = 2;  // Lookup, LookupMany
  // Answers again at most this many times when the cut moves under a lookup (see ModelClock).
  static constexpr int kMaxVersionTries = 64;

  // max_reply_bytes: the largest reply (the job's message_limit_bytes); a call whose reply would
  // be larger is refused RESOURCE_EXHAUSTED before the rows that would pass it are read (a
  // LookupMany: the lookup that would; 0: no bound).
  NativeLookups(std::vector<std::shared_ptr<ServingTable>> tables, std::vector<double> latency_buckets,
                double stale_after_seconds, bool auth, uint64_t max_reply_bytes = 0);

  // The gate's handler.
  LookupReply operator()(const LookupRequest& request);
  NativeAnswer answer(const std::string& method, const std::string& authorization, const char* data, size_t size);

  void set_tokens(std::vector<std::string> tokens);
  void set_draining(bool draining) { draining_.store(draining, std::memory_order_relaxed); }
  const std::vector<double>& buckets() const { return buckets_; }
  const std::vector<std::shared_ptr<ServingTable>>& tables() const { return tables_; }

  // Metrics. Table labels: index i < tables: tables[i]; tables: "unknown"; tables + 1: "".
  struct CallCell {
    std::atomic<uint64_t> count{0};
    NativeHistogram duration;
    explicit CallCell(size_t buckets) : duration(buckets) {}
  };
  struct TableCell {
    std::atomic<uint64_t> keys{0};
    std::atomic<uint64_t> missing{0};
    NativeHistogram duration;
    explicit TableCell(size_t buckets) : duration(buckets) {}
  };
  const CallCell& call_cell(size_t label, int method, int code) const {
    return *calls_[(label * kMethods + static_cast<size_t>(method)) * kCodes + static_cast<size_t>(code)];
  }
  const TableCell& table_cell(size_t table) const { return *table_cells_[table]; }
  // Refused by the token check: counted without a duration (as TokenAuth's on_denied does).
  uint64_t denied(int method, int code) const { return denied_[method * kCodes + code].load(); }
  // Lookups answered again because the cut moved under them.
  uint64_t version_retries() const { return version_retries_.load(std::memory_order_relaxed); }

 private:
  struct Parsed;
  template <typename Answer>
  int at_one_version(Answer&& answer, std::string& message);
  // `before`: bytes of the call's reply already built (LookupMany), counted against max_reply_bytes_.
  int lookup(const struct LookupFields& fields, uint64_t version, std::string& out, std::string& message,
             size_t& label, uint64_t before = 0);
  bool authorized(const std::string& authorization);
  CallCell& cell(size_t label, int method, int code) {
    return *calls_[(label * kMethods + static_cast<size_t>(method)) * kCodes + static_cast<size_t>(code)];
  }

  std::vector<std::shared_ptr<ServingTable>> tables_;
  std::vector<double> buckets_;
  double stale_after_;
  bool auth_;
  uint64_t max_reply_bytes_;
  // RESOURCE_EXHAUSTED with the message when `bytes` passes max_reply_bytes_, else 0.
  int check_reply_size(uint64_t bytes, std::string& message) const;
  std::mutex tokens_mu_;
  std::shared_ptr<const std::vector<std::string>> tokens_;
  std::atomic<bool> draining_{false};
  std::vector<std::unique_ptr<CallCell>> calls_;
  std::vector<std::unique_ptr<TableCell>> table_cells_;
  std::unique_ptr<std::atomic<uint64_t>[]> denied_;
  std::atomic<uint64_t> version_retries_{0};
};

// float32 -> float16 bits, round to nearest even (as numpy's astype).
uint16_t reply_float_to_half(float f);
float reply_half_to_float(uint16_t h);

}  // namespace embps
