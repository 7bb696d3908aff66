// Native Lookups (see serving_lookup.h): the request parser, the lookup, the reply encoder.
#include "serving_lookup.h"

#include <grpcpp/support/status.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "row_ops.h"

namespace embps {

// ---- float16 ----

uint16_t reply_float_to_half(float f) {
  // A finite value beyond the range saturates at +-65504, as a float16 table stores it (ps/wire.py
  // to_float16); inf and NaN stay. Then IEEE round to nearest even, as numpy's astype.
  if (std::isfinite(f)) f = std::fmin(std::fmax(f, -65504.0f), 65504.0f);
  _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

float reply_half_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

// ---- histogram ----

void NativeHistogram::observe(const std::vector<double>& bounds, double seconds) {
  size_t i = static_cast<size_t>(std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<uint64_t>(seconds * 1e9), std::memory_order_relaxed);
}

void NativeHistogram::read(std::vector<uint64_t>& cumulative, double& sum, uint64_t& count) const {
  cumulative.resize(counts_.size());
  uint64_t total = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    total += counts_[i].load(std::memory_order_relaxed);
    cumulative[i] = total;
  }
  count = total;
  sum = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) * 1e-9;
}

// ---- tables ----

ServingTable::ServingTable(const TableConfigNative& config, std::vector<int32_t> buckets, int64_t num_shards)
    : config_(config),
      width_(config.storage == Storage::kFloat16 ? (config.dim + 1) / 2 : value_words(config.storage, config.dim)),
      buckets_(std::move(buckets)),
      shards_(static_cast<size_t>(num_shards)),
      connected_(new std::atomic<bool>[static_cast<size_t>(num_shards)]),
      last_message_(new std::atomic<double>[static_cast<size_t>(num_shards)]),
      pending_(static_cast<size_t>(num_shards)) {
  if (config.dim < 1) throw std::invalid_argument("dim: must be >= 1");
  if (num_shards < 1) throw std::invalid_argument("num_shards: must be >= 1");
  if (buckets_.size() != 65536) throw std::invalid_argument("buckets: expected 65536 entries");
  for (int32_t b : buckets_) {
    if (b < 0 || b >= num_shards) throw std::invalid_argument("buckets: a shard outside [0, num_shards)");
  }
  for (int64_t s = 0; s < num_shards; ++s) {
    shards_[static_cast<size_t>(s)] = std::make_shared<ShardStore>(width_);
    connected_[static_cast<size_t>(s)].store(true);  // not stale until a follower says otherwise
    last_message_[static_cast<size_t>(s)].store(1e300);
  }
}

std::shared_ptr<ShardStore> ServingTable::shard(int64_t s) const {
  if (s < 0 || s >= num_shards()) throw std::out_of_range("shard outside the table");
  return std::atomic_load(&shards_[static_cast<size_t>(s)]);
}

void ServingTable::set_shard(int64_t s, std::shared_ptr<ShardStore> store) {
  if (s < 0 || s >= num_shards()) throw std::out_of_range("shard outside the table");
  if (store == nullptr || store->width() != width_) throw std::invalid_argument("store: of another width");
  std::atomic_store(&shards_[static_cast<size_t>(s)], std::move(store));
}

void ServingTable::set_link(int64_t s, bool connected, double last_message) {
  if (s < 0 || s >= num_shards()) throw std::out_of_range("shard outside the table");
  connected_[static_cast<size_t>(s)].store(connected, std::memory_order_relaxed);
  last_message_[static_cast<size_t>(s)].store(last_message, std::memory_order_relaxed);
}

void ServingTable::set_pending(int64_t s, uint64_t step, bool replace, std::shared_ptr<ShardStore> rows) {
  if (s < 0 || s >= num_shards()) throw std::out_of_range("shard outside the table");
  if (rows == nullptr || rows->width() != width_) throw std::invalid_argument("rows: of another width");
  auto pending = std::make_shared<PendingShard>(PendingShard{step, replace, std::move(rows)});
  auto previous = std::atomic_exchange(&pending_[static_cast<size_t>(s)], std::move(pending));
  if (previous == nullptr) num_pending_.fetch_add(1, std::memory_order_seq_cst);
}

void ServingTable::clear_pending(int64_t s) {
  if (s < 0 || s >= num_shards()) throw std::out_of_range("shard outside the table");
  auto previous = std::atomic_exchange(&pending_[static_cast<size_t>(s)], std::shared_ptr<PendingShard>());
  if (previous != nullptr) num_pending_.fetch_sub(1, std::memory_order_seq_cst);
}

std::vector<std::shared_ptr<ShardStore>> ServingTable::gather_at(const int64_t* keys, int64_t n, float* words,
                                                                 uint8_t* found, uint64_t version) const {
  const int64_t shards = num_shards();
  // Pending before main: the writer swaps a replacement in before it drops the pending store.
  std::vector<std::shared_ptr<PendingShard>> pending(static_cast<size_t>(shards));
  std::vector<std::shared_ptr<ShardStore>> stores(static_cast<size_t>(shards));
  const bool any_pending = num_pending_.load(std::memory_order_seq_cst) != 0;
  for (int64_t s = 0; s < shards; ++s) {
    if (any_pending) {
      auto p = std::atomic_load(&pending_[static_cast<size_t>(s)]);
      if (p != nullptr && p->step <= version) pending[static_cast<size_t>(s)] = std::move(p);
    }
    stores[static_cast<size_t>(s)] = shard(s);
  }
  // One shard's part: its pending overlay first, the main store for keys the overlay lacks.
  auto gather_shard = [&](int64_t s, const int64_t* part_keys, int64_t m, float* part_words, uint8_t* part_found) {
    const PendingShard* p = pending[static_cast<size_t>(s)].get();
    if (p == nullptr) {
      stores[static_cast<size_t>(s)]->gather(part_keys, m, part_words, part_found);
      return;
    }
    if (p->replace) {
      p->rows->gather(part_keys, m, part_words, part_found);
      return;
    }
    p->rows->gather_state(part_keys, m, part_words, part_found);
    std::vector<int64_t> rest_keys;
    std::vector<int64_t> rest_at;
    for (int64_t i = 0; i < m; ++i) {
      if (part_found[i] == 0) {
        rest_keys.push_back(part_keys[i]);
        rest_at.push_back(i);
      } else {
        part_found[i] = part_found[i] == ShardStore::kLive ? 1 : 0;
      }
    }
    if (rest_keys.empty()) return;
    const int64_t r = static_cast<int64_t>(rest_keys.size());
    std::vector<float> rest_words(static_cast<size_t>(r * width_), 0.0f);
    std::vector<uint8_t> rest_found(static_cast<size_t>(r), 0);
    stores[static_cast<size_t>(s)]->gather(rest_keys.data(), r, rest_words.data(), rest_found.data());
    for (int64_t j = 0; j < r; ++j) {
      const int64_t i = rest_at[static_cast<size_t>(j)];
      part_found[i] = rest_found[static_cast<size_t>(j)];
      if (part_found[i]) std::memcpy(part_words + i * width_, &rest_words[static_cast<size_t>(j * width_)], 4 * width_);
    }
  };
  if (shards == 1) {
    gather_shard(0, keys, n, words, found);
  } else {
    std::vector<int32_t> owner(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) owner[static_cast<size_t>(i)] = shard_of(keys[i]);
    std::vector<int64_t> part_keys;
    std::vector<int64_t> positions;
    std::vector<float> part_words;
    std::vector<uint8_t> part_found;
    for (int64_t s = 0; s < shards; ++s) {
      part_keys.clear();
      positions.clear();
      for (int64_t i = 0; i < n; ++i) {
        if (owner[static_cast<size_t>(i)] == s) {
          part_keys.push_back(keys[i]);
          positions.push_back(i);
        }
      }
      if (part_keys.empty()) continue;
      const int64_t m = static_cast<int64_t>(part_keys.size());
      part_words.assign(static_cast<size_t>(m * width_), 0.0f);
      part_found.assign(static_cast<size_t>(m), 0);
      gather_shard(s, part_keys.data(), m, part_words.data(), part_found.data());
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = positions[static_cast<size_t>(j)];
        found[i] = part_found[static_cast<size_t>(j)];
        std::memcpy(words + i * width_, &part_words[static_cast<size_t>(j * width_)], 4 * width_);
      }
    }
  }
  // The stores whose version the reply reports: a pending one's is its cut's (the main store's is
  // the cut before until the merge).
  for (int64_t s = 0; s < shards; ++s) {
    const PendingShard* p = pending[static_cast<size_t>(s)].get();
    if (p != nullptr) stores[static_cast<size_t>(s)] = p->rows;
  }
  return stores;
}

bool ServingTable::stale(int64_t s, double now, double threshold) const {
  const size_t i = static_cast<size_t>(s);
  return !connected_[i].load(std::memory_order_relaxed) ||
         now - last_message_[i].load(std::memory_order_relaxed) > threshold;
}

// ---- the wire format (protobuf) ----

namespace {

constexpr int kLookup = 0;
constexpr int kLookupMany = 1;
constexpr int kDtypeFloat32 = 1;
constexpr int kDtypeFloat16 = 2;
// Lookups in one LookupMany (ps/wire.py MAX_BATCH_PARTS; serving/server.py the same): each parsed
// lookup holds ~48 bytes against its 2 on the wire, so 32M empty ones (61 MiB, under the message
// limit) grew a replica by 2.7 GB past max_queue_bytes, which counts the request's wire bytes.
constexpr size_t kMaxLookupsPerCall = 1024;

double monotonic_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // time.monotonic()'s clock
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// A bounds-checked reader of protobuf's wire format.
struct Reader {
  const uint8_t* p;
  const uint8_t* end;
  const char* error = nullptr;

  bool done() const { return p >= end; }
  bool varint(uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (p >= end) return fail("truncated varint");
      const uint8_t b = *p++;
      if (shift == 63 && b > 1) return fail("varint too long");
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return fail("varint too long");
  }
  // Skips the value of an unknown field `field` of wire type `wire`. A group (wire type 3,
  // deprecated but valid protobuf, which the Python path skips) runs to the end tag of its own
  // number; they were refused here, so the two front ends answered one request differently.
  bool skip(uint32_t field, uint32_t wire, int depth = 0) {
    uint64_t v;
    switch (wire) {
      case 0: return varint(v);
      case 1: return advance(8);
      case 2: return varint(v) && (v <= static_cast<uint64_t>(end - p) ? (p += v, true) : fail("truncated field"));
      case 3:
        if (depth >= kMaxGroupDepth) return fail("groups nested too deep");
        for (;;) {
          // The tags within a group as protobuf reads them: a field number 0 is taken there.
          if (done()) return fail("truncated group");
          uint64_t t;
          if (!varint(t)) return false;
          if (t > 0xFFFFFFFFu) return fail("tag too large");
          const uint32_t inner = static_cast<uint32_t>(t >> 3), inner_wire = static_cast<uint32_t>(t & 7);
          if (inner_wire == 4) return inner == field || fail("end of another group");
          if (!skip(inner, inner_wire, depth + 1)) return false;
        }
      case 4: return fail("end of a group that did not start");
      case 5: return advance(4);
      default: return fail("unsupported wire type");
    }
  }
  static constexpr int kMaxGroupDepth = 100;  // protobuf's own bound on nesting
  bool advance(size_t n) {
    if (static_cast<size_t>(end - p) < n) return fail("truncated field");
    p += n;
    return true;
  }
  bool bytes(const uint8_t*& data, size_t& size) {
    uint64_t v;
    if (!varint(v)) return false;
    if (v > static_cast<uint64_t>(end - p)) return fail("truncated field");
    data = p;
    size = static_cast<size_t>(v);
    p += v;
    return true;
  }
  bool tag(uint32_t& field, uint32_t& wire) {
    uint64_t t;
    if (!varint(t)) return false;
    if (t > 0xFFFFFFFFu) return fail("tag too large");
    field = static_cast<uint32_t>(t >> 3);
    wire = static_cast<uint32_t>(t & 7);
    if (field == 0) return fail("field number 0");
    return true;
  }
  bool fail(const char* what) {
    error = what;
    return false;
  }
  const char* why() const { return error != nullptr ? error : "malformed"; }
};

bool valid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, uint32_t field, uint32_t wire) { put_varint(out, (field << 3) | wire); }

// Python's repr() of a str, for messages (printable ASCII as is, the rest escaped).
std::string py_repr(const std::string& s) {
  const char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(quote)) { out += '\\'; out += static_cast<char>(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else out += static_cast<char>(c);  // UTF-8 bytes of printable characters pass through
  }
  out += quote;
  return out;
}

// A name a caller sent, for a message: its repr, cut after kShownNameChars characters (code points)
// with its size in bytes after it. Whole, a long name escaped in the status passed gRPC's 16 KiB
// bound on a client's trailers, which then saw RESOURCE_EXHAUSTED instead of NOT_FOUND.
constexpr size_t kShownNameChars = 64;
std::string shown_name(const std::string& s) {
  size_t chars = 0, end = 0;
  for (; end < s.size(); ++end) {
    const bool starts_char = (static_cast<unsigned char>(s[end]) & 0xC0) != 0x80;
    if (starts_char && chars++ == kShownNameChars) break;
  }
  if (end == s.size()) return py_repr(s);
  return py_repr(s.substr(0, end)) + "... (" + std::to_string(s.size()) + " bytes)";
}

}  // namespace

struct LookupFields {
  const uint8_t* table = nullptr;
  size_t table_size = 0;
  const uint8_t* keys = nullptr;
  size_t keys_size = 0;
  uint32_t dim = 0;
  int32_t dtype = 0;
};

namespace {

bool parse_lookup(Reader& r, LookupFields& f) {
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.tag(field, wire)) return false;
    uint64_t v;
    if (field == 1 && wire == 2) {
      if (!r.bytes(f.table, f.table_size)) return false;
      if (!valid_utf8(f.table, f.table_size)) return r.fail("table: invalid UTF-8");
    } else if (field == 2 && wire == 2) {
      if (!r.bytes(f.keys, f.keys_size)) return false;
    } else if (field == 3 && wire == 0) {
      if (!r.varint(v)) return false;
      f.dim = static_cast<uint32_t>(v);
    } else if (field == 4 && wire == 0) {
      if (!r.varint(v)) return false;
      f.dtype = static_cast<int32_t>(static_cast<uint32_t>(v));
    } else if (!r.skip(field, wire)) {
      return false;
    }
  }
  return true;
}

}  // namespace

// ---- the lookups ----

NativeLookups::NativeLookups(std::vector<std::shared_ptr<ServingTable>> tables, std::vector<double> latency_buckets,
                             double stale_after_seconds, bool auth, uint64_t max_reply_bytes)
    : tables_(std::move(tables)),
      buckets_(std::move(latency_buckets)),
      stale_after_(stale_after_seconds),
      auth_(auth),
      max_reply_bytes_(max_reply_bytes),
      tokens_(std::make_shared<const std::vector<std::string>>()),
      denied_(new std::atomic<uint64_t>[kMethods * kCodes]) {
  if (!std::is_sorted(buckets_.begin(), buckets_.end())) throw std::invalid_argument("latency_buckets: not sorted");
  const size_t labels = tables_.size() + 2;
  for (size_t i = 0; i < labels * kMethods * kCodes; ++i) calls_.emplace_back(new CallCell(buckets_.size()));
  for (size_t i = 0; i < tables_.size(); ++i) table_cells_.emplace_back(new TableCell(buckets_.size()));
  for (int i = 0; i < kMethods * kCodes; ++i) denied_[i].store(0);
}

int NativeLookups::check_reply_size(uint64_t bytes, std::string& message) const {
  if (max_reply_bytes_ == 0 || bytes <= max_reply_bytes_) return 0;
  // As the PS's message (ps/shard/state.py): the caller splits its keys over several calls.
  message = "keys: the reply would be about " + std::to_string(bytes) + " bytes, over message_limit_bytes " +
            std::to_string(max_reply_bytes_) + "; split the request";
  return grpc::StatusCode::RESOURCE_EXHAUSTED;
}

void NativeLookups::set_tokens(std::vector<std::string> tokens) {
  auto next = std::make_shared<const std::vector<std::string>>(std::move(tokens));
  std::lock_guard<std::mutex> lock(tokens_mu_);
  tokens_ = std::move(next);
}

namespace {

bool constant_time_equal(const std::string& a, const std::string& b) {
  // As hmac.compare_digest: the time depends on the lengths, never on where the bytes differ.
  volatile uint8_t diff = a.size() == b.size() ? 0 : 1;
  const std::string& against = a.size() == b.size() ? b : a;
  for (size_t i = 0; i < a.size(); ++i) diff = diff | static_cast<uint8_t>(a[i] ^ against[i]);
  return diff == 0;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

// As TokenAuth.role_of: `Bearer <token>`, the scheme in any case, the token stripped.
bool NativeLookups::authorized(const std::string& header) {
  std::shared_ptr<const std::vector<std::string>> tokens;
  {
    std::lock_guard<std::mutex> lock(tokens_mu_);
    tokens = tokens_;
  }
  const size_t space = header.find(' ');
  if (space == std::string::npos) return false;
  std::string scheme = header.substr(0, space);
  std::transform(scheme.begin(), scheme.end(), scheme.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string presented = header.substr(space + 1);
  if (scheme != "bearer" || presented.empty()) return false;
  size_t b = 0, e = presented.size();
  while (b < e && is_space(presented[b])) ++b;
  while (e > b && is_space(presented[e - 1])) --e;
  presented = presented.substr(b, e - b);
  bool found = false;
  for (const std::string& token : *tokens) found = constant_time_equal(presented, token) || found;
  return found;
}

LookupReply NativeLookups::operator()(const LookupRequest& request) {
  NativeAnswer a;
  try {
    a = answer(request.method, request.authorization, request.payload.data(), request.payload.size());
  } catch (const std::exception& error) {  // memory: the gate's handler must not throw
    a.code = grpc::StatusCode::INTERNAL;
    a.message = std::string("the lookup failed: ") + error.what();
  }
  LookupReply reply;
  reply.code = a.code;
  reply.message = std::move(a.message);
  if (a.code == 0) {
    // The slice takes the reply's bytes where they are (no copy); it frees them when gRPC is done.
    auto* bytes = new std::string(std::move(a.payload));
    reply.payload = grpc::Slice(bytes->data(), bytes->size(), [](void* p) { delete static_cast<std::string*>(p); },
                                bytes);
  }
  return reply;
}

// answer(version) at the clock's current version, again while the cut moved under it (ModelClock).
template <typename Answer>
int NativeLookups::at_one_version(Answer&& answer, std::string& message) {
  const std::shared_ptr<ModelClock> clock = tables_.empty() ? nullptr : tables_[0]->clock();
  if (clock == nullptr) return answer(0);
  for (int attempt = 0; attempt < kMaxVersionTries; ++attempt) {
    const uint64_t version = clock->begin_read();
    const int code = answer(version);
    if (clock->still_valid(version)) return code;
    version_retries_.fetch_add(1, std::memory_order_relaxed);
  }
  message = "the model version moved under this lookup " + std::to_string(kMaxVersionTries) +
            " times; retry (the replica applies cuts faster than it answers)";
  return grpc::StatusCode::UNAVAILABLE;
}

NativeAnswer NativeLookups::answer(const std::string& method, const std::string& authorization, const char* data,
                                   size_t size) {
  const auto start = std::chrono::steady_clock::now();
  NativeAnswer out;
  int m;
  if (method == "/embps.v1.Serving/Lookup") m = kLookup;
  else if (method == "/embps.v1.Serving/LookupMany") m = kLookupMany;
  else {
    out.code = grpc::StatusCode::UNIMPLEMENTED;
    out.message = method + ": not answered by the gate's handler";
    return out;
  }
  if (auth_ && !authorized(authorization)) {
    out.code = grpc::StatusCode::UNAUTHENTICATED;
    out.message = "missing or unknown bearer token (authorization metadata)";
    denied_[m * kCodes + out.code].fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  size_t label = tables_.size() + 1;  // ""
  Reader r{reinterpret_cast<const uint8_t*>(data), reinterpret_cast<const uint8_t*>(data) + size};
  if (m == kLookup) {
    LookupFields fields;
    if (!parse_lookup(r, fields)) {
      out.code = grpc::StatusCode::INVALID_ARGUMENT;
      out.message = "request: not a valid message for " + method + ": " + r.why();
    } else if (draining_.load(std::memory_order_relaxed)) {
      out.code = grpc::StatusCode::UNAVAILABLE;
      out.message = "the serving replica is shutting down";
    } else {
      out.code = at_one_version([&](uint64_t version) {
        out.payload.clear();
        return lookup(fields, version, out.payload, out.message, label);
      }, out.message);
    }
  } else {
    // Parse the whole request first: a malformed one is INVALID_ARGUMENT before any lookup.
    std::vector<LookupFields> lookups;
    bool ok = true;
    bool too_many = false;
    while (ok && !r.done()) {
      uint32_t field, wire;
      if (!r.tag(field, wire)) {
        ok = false;
      } else if (field == 1 && wire == 2) {
        const uint8_t* sub;
        size_t sub_size;
        if (!r.bytes(sub, sub_size)) {
          ok = false;
        } else {
          Reader inner{sub, sub + sub_size};
          if (lookups.size() == kMaxLookupsPerCall) {
            too_many = true;
            ok = false;
            break;
          }
          lookups.emplace_back();
          if (!parse_lookup(inner, lookups.back())) {
            r.error = inner.error;
            ok = false;
          }
        }
      } else if (!r.skip(field, wire)) {
        ok = false;
      }
    }
    if (too_many) {
      out.code = grpc::StatusCode::INVALID_ARGUMENT;
      out.message = "lookups: at most " + std::to_string(kMaxLookupsPerCall) +
                    " lookups in one LookupMany, got more; split the call";
    } else if (!ok) {
      out.code = grpc::StatusCode::INVALID_ARGUMENT;
      out.message = "request: not a valid message for " + method + ": " + r.why();
    } else if (draining_.load(std::memory_order_relaxed)) {
      out.code = grpc::StatusCode::UNAVAILABLE;
      out.message = "the serving replica is shutting down";
    } else {
      out.code = at_one_version([&](uint64_t version) {
        std::string one;
        size_t ignored;
        out.payload.clear();
        for (size_t i = 0; i < lookups.size(); ++i) {
          one.clear();
          int code = lookup(lookups[i], version, one, out.message, ignored, out.payload.size());
          if (code != 0) {
            out.message = "lookups[" + std::to_string(i) + "]: " + out.message;
            out.payload.clear();
            return code;
          }
          put_tag(out.payload, 1, 2);
          put_varint(out.payload, one.size());
          out.payload += one;
        }
        if (version) {
          put_tag(out.payload, 2, 0);
          put_varint(out.payload, version);
        }
        return 0;
      }, out.message);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CallCell& c = cell(label, m, out.code);
  c.count.fetch_add(1, std::memory_order_relaxed);
  c.duration.observe(buckets_, seconds);
  return out;
}

int NativeLookups::lookup(const LookupFields& f, uint64_t version, std::string& out, std::string& message,
                          size_t& label, uint64_t before) {
  const auto start = std::chrono::steady_clock::now();
  const std::string name(reinterpret_cast<const char*>(f.table), f.table_size);
  size_t t = 0;
  while (t < tables_.size() && tables_[t]->config().name != name) ++t;
  if (t == tables_.size()) {
    label = name.empty() ? tables_.size() + 1 : tables_.size();
    std::vector<std::string> names;
    for (const auto& table : tables_) names.push_back(table->config().name);
    std::sort(names.begin(), names.end());
    message = "table " + shown_name(name) + " is not served here; tables: ";
    for (size_t i = 0; i < names.size(); ++i) message += (i ? ", " : "") + names[i];
    return grpc::StatusCode::NOT_FOUND;
  }
  label = t;
  const ServingTable& table = *tables_[t];
  const TableConfigNative& config = table.config();
  const int64_t dim = config.dim;
  if (f.dim != 0 && static_cast<int64_t>(f.dim) != dim) {
    message = "dim: table " + py_repr(name) + " has dim " + std::to_string(dim) + ", the request says " +
              std::to_string(f.dim);
    return grpc::StatusCode::INVALID_ARGUMENT;
  }
  if (f.dtype != 0 && f.dtype != kDtypeFloat32 && f.dtype != kDtypeFloat16) {
    message = "dtype: unsupported dtype " + std::to_string(f.dtype) + "; supported: FLOAT32, FLOAT16";
    return grpc::StatusCode::INVALID_ARGUMENT;
  }
  if (f.keys_size % 8 != 0) {
    message = "keys: byte length " + std::to_string(f.keys_size) +
              " is not a multiple of 8; keys travel as little-endian int64";
    return grpc::StatusCode::INVALID_ARGUMENT;
  }
  const bool half_reply = f.dtype == kDtypeFloat16;
  const int64_t n = static_cast<int64_t>(f.keys_size / 8);
  const int64_t shards = table.num_shards();
  const size_t value_bytes = static_cast<size_t>(n * dim) * (half_reply ? 2 : 4);
  // Refused before a row is read: values, found flags, dim and dtype, a version entry per shard,
  // and LookupMany's framing of each reply.
  const uint64_t reply_bytes = before + value_bytes + n + 80 + static_cast<uint64_t>(shards) * 48;
  if (const int code = check_reply_size(reply_bytes, message)) return code;
  std::vector<int64_t> keys(static_cast<size_t>(n));
  if (n) std::memcpy(keys.data(), f.keys, f.keys_size);  // little-endian hosts only (x86-64, aarch64)

  // Gather per shard at `version`, each from one store (a resync may publish another meanwhile).
  const int64_t width = table.width();
  std::vector<float> words(static_cast<size_t>(n * width), 0.0f);
  std::vector<uint8_t> found(static_cast<size_t>(n), 0);
  const std::vector<std::shared_ptr<ShardStore>> stores = table.gather_at(keys.data(), n, words.data(), found.data(),
                                                                          version);

  // Values in float32 (the decoded rows; missing: zeros or the init), then the reply's dtype.
  int64_t missing = 0;
  std::vector<float> row(static_cast<size_t>(dim));
  std::vector<float> init(static_cast<size_t>(dim));
  // Reply: values (1), dim (2), dtype (3), found (4), shards (5); proto3 leaves defaults out.
  out.reserve(value_bytes + static_cast<size_t>(n) + 32 + static_cast<size_t>(shards) * 32);
  if (value_bytes) {
    put_tag(out, 1, 2);
    put_varint(out, value_bytes);
  }
  const size_t values_at = out.size();
  out.resize(values_at + value_bytes);
  char* dst = &out[values_at];
  for (int64_t i = 0; i < n; ++i) {
    const float* src;
    bool from_init = false;
    if (!found[static_cast<size_t>(i)]) {
      ++missing;
      if (config.default_init) {
        init_values(config.seed, static_cast<Init>(config.initializer), config.init_scale, &keys[static_cast<size_t>(i)],
                    1, dim, init.data(), dim);
        src = init.data();
        from_init = true;
      } else {
        std::fill(row.begin(), row.end(), 0.0f);
        src = row.data();
      }
    } else if (config.storage == Storage::kInt8) {
      decode_value(Storage::kInt8, &words[static_cast<size_t>(i * width)], dim, row.data());
      src = row.data();
    } else {
      src = &words[static_cast<size_t>(i * width)];
    }
    char* out_row = dst + static_cast<size_t>(i * dim) * (half_reply ? 2 : 4);
    if (config.storage == Storage::kFloat16 && !from_init && found[static_cast<size_t>(i)]) {
      const uint16_t* halves = reinterpret_cast<const uint16_t*>(src);
      if (half_reply) {
        std::memcpy(out_row, halves, static_cast<size_t>(dim) * 2);
      } else {
        for (int64_t j = 0; j < dim; ++j) {
          const float v = reply_half_to_float(halves[j]);
          std::memcpy(out_row + j * 4, &v, 4);
        }
      }
    } else if (half_reply) {
      for (int64_t j = 0; j < dim; ++j) {
        const uint16_t h = reply_float_to_half(src[j]);
        std::memcpy(out_row + j * 2, &h, 2);
      }
    } else {
      std::memcpy(out_row, src, static_cast<size_t>(dim) * 4);
    }
  }
  put_tag(out, 2, 0);
  put_varint(out, static_cast<uint64_t>(dim));
  put_tag(out, 3, 0);
  put_varint(out, half_reply ? kDtypeFloat16 : kDtypeFloat32);
  if (n) {
    put_tag(out, 4, 2);
    put_varint(out, static_cast<uint64_t>(n));
    out.append(reinterpret_cast<const char*>(found.data()), static_cast<size_t>(n));
  }
  const double now = monotonic_seconds();
  for (int64_t s = 0; s < shards; ++s) {
    const ShardStore& store = *stores[static_cast<size_t>(s)];
    const uint64_t version = store.version.load(std::memory_order_relaxed);
    const uint64_t incarnation = store.incarnation.load(std::memory_order_relaxed);
    const bool stale = table.stale(s, now, stale_after_);
    std::string served;
    if (s) { put_tag(served, 1, 0); put_varint(served, static_cast<uint64_t>(s)); }
    if (version) { put_tag(served, 2, 0); put_varint(served, version); }
    if (incarnation) { put_tag(served, 3, 0); put_varint(served, incarnation); }
    if (stale) { put_tag(served, 4, 0); put_varint(served, 1); }
    put_tag(out, 5, 2);
    put_varint(out, served.size());
    out += served;
  }
  if (version) {
    put_tag(out, 6, 0);
    put_varint(out, version);
  }
  TableCell& tc = *table_cells_[t];
  tc.keys.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
  tc.missing.fetch_add(static_cast<uint64_t>(missing), std::memory_order_relaxed);
  tc.duration.observe(buckets_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return 0;
}

}  // namespace embps
