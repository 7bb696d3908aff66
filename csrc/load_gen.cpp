// The bench's native load generator (see load_gen.h): one scheduler, two transports.
#include "load_gen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace embps {
namespace {

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// The scheduler (see load_gen.h). Transport: in_flight() (calls whose end poll has not yet
// reported), can_send() (another call may start now: fewer than `concurrency` in flight),
// send(arrival, request, deadline_s), poll(wake_at, on_done) -- waits until at least one call
// ended or wake_at (monotonic seconds), calling on_done(arrival, code, done) for each call that
// ended (done: when it ended, monotonic seconds); its waits must be precise (a late wake-up is a
// late send, and counts in the latency). The transport ends its calls by their deadlines itself.
template <typename Transport>
LoadResult run_schedule(Transport& transport, const LoadSchedule& s, size_t requests) {
  const size_t n = s.times.size();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  LoadResult result{std::vector<double>(n, nan), std::vector<double>(n, nan), std::vector<int16_t>(n, kLoadUnsent)};
  auto on_done = [&](size_t arrival, int code, double done) {
    result.done[arrival] = done;
    result.code[arrival] = static_cast<int16_t>(code);
  };
  size_t next = 0;
  while (true) {
    double now = now_s();
    while (next < n && now < s.hard_end && transport.can_send() && s.t0 + s.times[next] <= now) {
      result.sent[next] = now;
      transport.send(next, next % requests, std::max(1e-3, std::min(s.timeout_s, s.hard_end - now)));
      ++next;
    }
    const bool sending = next < n && now < s.hard_end;
    if (!sending && transport.in_flight() == 0) break;
    double wake = now + 1.0;  // the transport wakes earlier for its calls' deadlines
    if (sending && transport.can_send()) wake = std::min(s.t0 + s.times[next], s.hard_end);
    else if (sending) wake = s.hard_end;
    transport.poll(wake, on_done);
  }
  return result;
}

// ---- protobuf reply checks (ServingLookupResponse, ServingLookupManyResponse) ----

bool read_varint(const uint8_t*& p, const uint8_t* end, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64 && p < end; shift += 7) {
    const uint8_t b = *p++;
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

// Walks one message's fields: f(field, wire, varint value, bytes, size); false: malformed.
template <typename F>
bool walk(const uint8_t* p, const uint8_t* end, F&& f) {
  while (p < end) {
    uint64_t key, v = 0;
    if (!read_varint(p, end, key)) return false;
    const uint32_t field = static_cast<uint32_t>(key >> 3), wire = static_cast<uint32_t>(key & 7);
    const uint8_t* bytes = nullptr;
    uint64_t size = 0;
    if (wire == 0) {
      if (!read_varint(p, end, v)) return false;
    } else if (wire == 2) {
      if (!read_varint(p, end, size) || size > static_cast<uint64_t>(end - p)) return false;
      bytes = p;
      p += size;
    } else if (wire == 1 || wire == 5) {
      const size_t skip = wire == 1 ? 8 : 4;
      if (static_cast<size_t>(end - p) < skip) return false;
      p += skip;
    } else {
      return false;
    }
    f(field, wire, v, bytes, size);
  }
  return true;
}

// One ServingLookupResponse of `rows` keys: values of rows x dim float32 (or float16), every found set.
int check_lookup(const uint8_t* p, const uint8_t* end, int64_t rows) {
  uint64_t values = 0, dim = 0, dtype = 0;
  const uint8_t* found = nullptr;
  uint64_t found_size = 0;
  const bool ok = walk(p, end, [&](uint32_t field, uint32_t wire, uint64_t v, const uint8_t* bytes, uint64_t size) {
    if (field == 1 && wire == 2) values = size;
    if (field == 2 && wire == 0) dim = v;
    if (field == 3 && wire == 0) dtype = v;
    if (field == 4 && wire == 2) { found = bytes; found_size = size; }
  });
  const uint64_t width = dtype == 2 ? 2 : 4;  // FLOAT16 = 2 (ps/rpc proto)
  if (!ok || found_size != static_cast<uint64_t>(rows) || values != static_cast<uint64_t>(rows) * dim * width) {
    return kLoadBadReply;
  }
  for (uint64_t i = 0; i < found_size; ++i) {
    if (found[i] == 0) return kLoadMissingRows;
  }
  return 0;
}

int check_reply(const std::string& reply, const std::vector<int64_t>& parts, bool many) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(reply.data());
  const uint8_t* end = p + reply.size();
  if (!many) return check_lookup(p, end, parts.empty() ? 0 : parts[0]);
  size_t at = 0;
  int code = 0;
  const bool ok = walk(p, end, [&](uint32_t field, uint32_t wire, uint64_t, const uint8_t* bytes, uint64_t size) {
    if (field != 1 || wire != 2) return;
    const int one = at < parts.size() ? check_lookup(bytes, bytes + size, parts[at]) : kLoadBadReply;
    if (code == 0) code = one;
    ++at;
  });
  if (!ok || at != parts.size()) return kLoadBadReply;
  return code;
}

// ---- gRPC ----

class GrpcTransport {
 public:
  GrpcTransport(const std::string& address, const std::string& method, const std::vector<std::string>& requests,
                const std::vector<std::vector<int64_t>>& expected, bool many, int64_t max_message_bytes,
                int concurrency)
      : method_(method), expected_(expected), many_(many), concurrency_(concurrency) {
    grpc::ChannelArguments args;
    const int limit = static_cast<int>(std::min<int64_t>(max_message_bytes, INT_MAX));
    args.SetMaxReceiveMessageSize(limit);
    args.SetMaxSendMessageSize(limit);
    stub_ = std::make_unique<grpc::GenericStub>(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
    for (const std::string& r : requests) {
      grpc::Slice slice(r);
      requests_.emplace_back(&slice, 1);
    }
  }
  ~GrpcTransport() {
    cq_.Shutdown();  // the scheduler returns with no call in flight: the thread ends at once
    completions_thread_.join();
  }

  int in_flight() const {
    std::lock_guard<std::mutex> lock(mu_);
    return in_flight_;
  }
  bool can_send() const {
    std::lock_guard<std::mutex> lock(mu_);
    return in_flight_ < concurrency_;
  }

  void send(size_t arrival, size_t request, double deadline_s) {
    auto* call = new Call;
    call->arrival = arrival;
    call->request = request;
    call->ctx.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::microseconds(static_cast<int64_t>(deadline_s * 1e6)));
    call->rpc = stub_->PrepareUnaryCall(&call->ctx, method_, requests_[request], &cq_);
    call->rpc->StartCall();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_;
    }
    call->rpc->Finish(&call->reply, &call->status, call);
  }

  // Waits on a condition variable (a futex with a nanosecond timeout), not on the queue: gRPC's
  // queue rounds its timeouts up to milliseconds, which made every send up to ~1 ms late.
  template <typename OnDone>
  void poll(double wake_at, OnDone&& on_done) {
    std::vector<Ended> ended;
    {
      std::unique_lock<std::mutex> lock(mu_);
      const auto until = std::chrono::steady_clock::time_point(
          std::chrono::nanoseconds(static_cast<int64_t>(wake_at * 1e9)));  // CLOCK_MONOTONIC
      cv_.wait_until(lock, until, [this] { return !ended_.empty(); });
      ended.swap(ended_);
      in_flight_ -= static_cast<int>(ended.size());
    }
    for (const Ended& e : ended) on_done(e.arrival, e.code, e.done);
  }

 private:
  struct Call {
    size_t arrival = 0;
    size_t request = 0;
    grpc::ClientContext ctx;
    grpc::ByteBuffer reply;
    grpc::Status status;
    std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc;
  };
  std::string method_;
  const std::vector<std::vector<int64_t>>& expected_;
  bool many_;
  int concurrency_;
  std::unique_ptr<grpc::GenericStub> stub_;
  std::vector<grpc::ByteBuffer> requests_;
  grpc::CompletionQueue cq_;
  // The completions, taken by their own thread, which blocks in the queue (no timeout) and wakes
  // as soon as a reply is in; the scheduler's thread sends and waits on cv_.
  struct Ended {
    size_t arrival;
    int code;
    double done;
  };
  void take_completions() {
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) {
      std::unique_ptr<Call> call(static_cast<Call*>(tag));
      const double done = now_s();
      int code = static_cast<int>(call->status.error_code());
      if (code == 0) {
        std::vector<grpc::Slice> slices;
        std::string bytes;
        if (call->reply.Dump(&slices).ok()) {
          for (const grpc::Slice& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
        }
        code = check_reply(bytes, expected_[call->request], many_);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ended_.push_back(Ended{call->arrival, code, done});
      }
      cv_.notify_one();
    }
  }
  mutable std::mutex mu_;
  std::condition_variable cv_;
  // Calls whose end the scheduler has not taken yet (under mu_): a call leaves the count in poll,
  // with its code, never before, or the scheduler could see none in flight and return while an
  // ended call's code still waited in ended_ (an arrival sent, never reported).
  int in_flight_ = 0;
  std::vector<Ended> ended_;  // under mu_
  std::thread completions_thread_{[this] { take_completions(); }};  // last: starts once the rest is built
};

// ---- Redis ----

// Parses one RESP reply to an MGET of `keys` keys from buf; returns -1 while incomplete, else
// the bytes it took, with code set.
int64_t parse_mget(const std::string& buf, int64_t keys, int64_t row_bytes, int& code) {
  const char* p = buf.data();
  const char* end = p + buf.size();
  auto line = [&](const char*& at, int64_t& value) -> bool {  // "<c><integer>\r\n" after the type byte
    const char* cr = static_cast<const char*>(std::memchr(at, '\r', static_cast<size_t>(end - at)));
    if (cr == nullptr || cr + 1 >= end) return false;
    value = std::strtoll(at + 1, nullptr, 10);
    at = cr + 2;
    return true;
  };
  if (p == end) return -1;
  if (*p == '-') {  // an error reply: one line
    const char* cr = static_cast<const char*>(std::memchr(p, '\r', buf.size()));
    if (cr == nullptr || cr + 1 >= end) return -1;
    code = kLoadServerError;
    return cr + 2 - buf.data();
  }
  if (*p != '*') {
    code = kLoadBadReply;
    return static_cast<int64_t>(buf.size());  // not an MGET reply: the connection is dropped
  }
  int64_t count;
  if (!line(p, count)) return -1;
  code = count == keys ? 0 : kLoadBadReply;
  for (int64_t i = 0; i < count; ++i) {
    if (p >= end) return -1;
    if (*p != '$') {
      code = kLoadBadReply;
      return static_cast<int64_t>(buf.size());
    }
    int64_t len;
    if (!line(p, len)) return -1;
    if (len < 0) {
      if (code == 0) code = kLoadMissingRows;
      continue;
    }
    if (end - p < len + 2) return -1;
    p += len + 2;
    if (len != row_bytes && code == 0) code = kLoadBadReply;
  }
  return p - buf.data();
}

class RedisTransport {
 public:
  RedisTransport(const std::string& host, int port, const std::vector<std::string>& commands,
                 const std::vector<int64_t>& expected, int64_t row_bytes, int connections)
      : commands_(commands), expected_(expected), row_bytes_(row_bytes), conns_(static_cast<size_t>(connections)) {
    std::memset(&addr_, 0, sizeof(addr_));
    addr_.sin_family = AF_INET;
    addr_.sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, host.c_str(), &addr_.sin_addr) != 1) throw std::invalid_argument("host: not an IPv4 address");
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) throw std::runtime_error("epoll_create1 failed");
    for (size_t c = 0; c < conns_.size(); ++c) {
      connect_one(c);
      idle_.push_back(c);
    }
  }
  ~RedisTransport() {
    for (Conn& c : conns_) {
      if (c.fd >= 0) close(c.fd);
    }
    close(epoll_);
  }

  int in_flight() const { return in_flight_; }
  // A connection lost and not replaced leaves the pool smaller.
  bool can_send() const { return !idle_.empty(); }

  void send(size_t arrival, size_t request, double deadline_s) {
    const size_t c = idle_.back();
    idle_.pop_back();
    Conn& conn = conns_[c];
    conn.arrival = arrival;
    conn.request = request;
    conn.deadline = now_s() + deadline_s;
    conn.busy = true;
    conn.in.clear();
    ++in_flight_;
    const std::string& command = commands_[request];
    conn.out_at = 0;
    conn.out = &command;
    flush(c);
  }

  template <typename OnDone>
  void poll(double wake_at, OnDone&& on_done) {
    double earliest = wake_at;
    for (const Conn& conn : conns_) {
      if (conn.busy) earliest = std::min(earliest, conn.deadline);
    }
    const double wait = std::max(0.0, earliest - now_s());
    timespec ts{static_cast<time_t>(wait), static_cast<long>((wait - std::floor(wait)) * 1e9)};
    epoll_event events[64];
    const int got = epoll_pwait2(epoll_, events, 64, &ts, nullptr);
    for (int e = 0; e < got; ++e) {
      const size_t c = events[e].data.u64;
      Conn& conn = conns_[c];
      if (!conn.busy) {  // an idle connection closed by the server (or sent what was not asked): a new one
        idle_.erase(std::find(idle_.begin(), idle_.end(), c));
        if (reconnect(c)) idle_.push_back(c);
        continue;
      }
      if (events[e].events & EPOLLOUT) flush(c);
      if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) read_some(c, on_done);
    }
    const double now = now_s();
    for (size_t c = 0; c < conns_.size(); ++c) {
      if (conns_[c].busy && now >= conns_[c].deadline) finish(c, 4, on_done, true);  // DEADLINE_EXCEEDED
    }
  }

 private:
  struct Conn {
    int fd = -1;
    bool busy = false;
    size_t arrival = 0;
    size_t request = 0;
    double deadline = 0.0;
    const std::string* out = nullptr;
    size_t out_at = 0;
    std::string in;
  };

  void connect_one(size_t c) {
    Conn& conn = conns_[c];
    conn.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (conn.fd < 0) throw std::runtime_error("socket failed");
    if (connect(conn.fd, reinterpret_cast<sockaddr*>(&addr_), sizeof(addr_)) != 0) {
      close(conn.fd);
      conn.fd = -1;
      throw std::runtime_error(std::string("redis: connect failed: ") + std::strerror(errno));
    }
    const int one = 1;
    setsockopt(conn.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(conn.fd, F_SETFL, fcntl(conn.fd, F_GETFL) | O_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = c;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, conn.fd, &ev);
  }

  void flush(size_t c) {
    Conn& conn = conns_[c];
    while (conn.out != nullptr && conn.out_at < conn.out->size()) {
      const ssize_t w = ::send(conn.fd, conn.out->data() + conn.out_at, conn.out->size() - conn.out_at, MSG_NOSIGNAL);
      if (w > 0) {
        conn.out_at += static_cast<size_t>(w);
        continue;
      }
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      conn.out = nullptr;  // a broken connection: its read reports it
      return;
    }
    epoll_event ev{};
    ev.events = EPOLLIN | (conn.out != nullptr && conn.out_at < conn.out->size() ? EPOLLOUT : 0);
    ev.data.u64 = c;
    epoll_ctl(epoll_, EPOLL_CTL_MOD, conn.fd, &ev);
  }

  template <typename OnDone>
  void read_some(size_t c, OnDone&& on_done) {
    Conn& conn = conns_[c];
    char chunk[65536];
    while (true) {
      const ssize_t r = recv(conn.fd, chunk, sizeof(chunk), 0);
      if (r > 0) {
        conn.in.append(chunk, static_cast<size_t>(r));
        continue;
      }
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return finish(c, 14, on_done, true);  // UNAVAILABLE: the connection closed or broke
    }
    int code = 0;
    const int64_t used = parse_mget(conn.in, expected_[conn.request], row_bytes_, code);
    if (used < 0) return;
    finish(c, code, on_done, static_cast<size_t>(used) != conn.in.size());
  }

  // Ends conn's call; drop: the connection's state is unknown (a timeout, a broken or extra
  // reply), so it is replaced by a new one, as redis-py does.
  template <typename OnDone>
  void finish(size_t c, int code, OnDone&& on_done, bool drop) {
    Conn& conn = conns_[c];
    conn.busy = false;
    --in_flight_;
    on_done(conn.arrival, code, now_s());
    if (drop && !reconnect(c)) return;  // the connection stays out of the pool: fewer calls in flight from now on
    idle_.push_back(c);
  }

  bool reconnect(size_t c) {
    Conn& conn = conns_[c];
    epoll_ctl(epoll_, EPOLL_CTL_DEL, conn.fd, nullptr);
    close(conn.fd);
    conn.fd = -1;
    conn.in.clear();
    try {
      connect_one(c);
    } catch (const std::runtime_error&) {
      return false;
    }
    return true;
  }

  const std::vector<std::string>& commands_;
  const std::vector<int64_t>& expected_;
  int64_t row_bytes_;
  std::vector<Conn> conns_;
  std::vector<size_t> idle_;
  sockaddr_in addr_;
  int epoll_ = -1;
  int in_flight_ = 0;
};

void check_schedule(const LoadSchedule& s, size_t requests) {
  if (requests == 0) throw std::invalid_argument("requests: at least one is required");
  if (s.concurrency < 1) throw std::invalid_argument("concurrency: must be >= 1");
  if (!(s.timeout_s > 0)) throw std::invalid_argument("timeout_s: must be > 0");
  if (!std::is_sorted(s.times.begin(), s.times.end())) throw std::invalid_argument("times: must be sorted");
}

}  // namespace

LoadResult run_grpc_load(const std::string& address, const std::string& method, const std::vector<std::string>& requests,
                         const std::vector<std::vector<int64_t>>& expected, bool many, const LoadSchedule& schedule,
                         int64_t max_message_bytes) {
  check_schedule(schedule, requests.size());
  if (expected.size() != requests.size()) throw std::invalid_argument("expected: one entry per request");
  GrpcTransport transport(address, method, requests, expected, many, max_message_bytes, schedule.concurrency);
  return run_schedule(transport, schedule, requests.size());
}

LoadResult run_redis_load(const std::string& host, int port, const std::vector<std::string>& commands,
                          const std::vector<int64_t>& expected, int64_t row_bytes, const LoadSchedule& schedule) {
  check_schedule(schedule, commands.size());
  if (expected.size() != commands.size()) throw std::invalid_argument("expected: one entry per command");
  RedisTransport transport(host, port, commands, expected, row_bytes, schedule.concurrency);
  return run_schedule(transport, schedule, commands.size());
}

}  // namespace embps
