// The serving replica's front door: a native gRPC server (grpc++) on the replica's public port.
//
// Why: a Python gRPC server (grpc.aio) spends ~0.2 ms of interpreter time on every call it
// touches, answered or refused, so offered a few times its capacity it cannot even refuse what it
// cannot answer: the calls pile up in gRPC's core, whose default transport refuses its backlog
// with CANCELLED. The gate admits at most max_queue Lookups at a time (their request's arrival to
// reply) and answers one more RESOURCE_EXHAUSTED at once, in C++ (unread when max_queue are
// admitted as it comes). A call whose request has not come holds no place: one that sends its
// headers and no more is cancelled after client_stall_seconds, and a connection holds at most
// max(1,024, 2 x max_queue) calls. "Lookups" are the calls of the bounded methods
// (`lookup_methods`: Serving/Lookup and Serving/LookupMany); they share one bound.
//
// The gate runs `workers` + 1 threads over one completion queue; at any time at most one of them
// polls it (the poller) and at most `workers` answer Lookups. Why one poller: in grpc's epoll1
// poller (grpc 1.51) every thread waiting on a queue is a worker of one global leader/follower
// scheme, and the leader hands its role to a waiting worker each time it returns, waking it:
// with two threads waiting (a queue each, as before) every event woke the other one, ~5 context
// switches per Lookup at 300 req/s and 1.04-1.5x the CPU per Lookup of now (README, notes on
// `bench serve`). So the threads that are not polling
// wait on a condition of the gate's own, which grpc does not see. The poller takes every event
// that is ready (waiting for the first only when no Lookup is left to answer) and handles it; the
// Lookups it read go on one shared queue in arrival order. Then it stops polling and answers the
// oldest Lookup itself (a hand-off to another thread cost more CPU in wake-ups than the lookup);
// once that is sent it polls again, unless another thread polls now. Another thread is woken only
// when a Lookup is taken while several more wait behind it (kHelpFrom, serving_gate.cpp), or when
// the Lookup taken is a large one (kLargeRequestBytes), whose answer takes milliseconds: under
// load the threads answer in parallel, each polling in turn between two Lookups, and beside a
// large Lookup another thread polls, so a call beyond the bound (count or bytes) is refused at
// once, never behind the lookups queued before it. That needs a thread left to poll while
// `workers` large Lookups are answered, hence the one thread more: with only `workers` threads,
// calls that arrived while each of them answered one waited unread, and were refused only when
// one of those answers ended (a `bench serve`-sized replica, 2 threads, 3 Lookups of 150k keys,
// a busy core beside it: refusals came back after up to 0.5 s). A call's events are
// handled by one poller at a time (the role passes under the gate's mutex); its answer may run
// on another thread meanwhile, which touches only what the events of an admitted Lookup leave
// alone. In the replica `lookup` is
// NativeLookups (serving_lookup.h), which parses, checks the token, reads the native row store
// and encodes the reply in C++, without the GIL. Every other
// call (Status, health, reflection; streaming or not) is forwarded byte for byte, with its
// metadata and deadline, to the replica's grpc.aio server on a private Unix socket, and the
// replies, status and trailing metadata come back unchanged.
//
// TLS (and mutual TLS) end here, from files re-read every second.
#pragma once

#include <grpcpp/completion_queue.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/server.h>
#include <grpcpp/support/slice.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace embps {

struct GateTls {
  std::string cert_file;       // server certificate chain (PEM)
  std::string key_file;        // its private key (PEM)
  std::string client_ca_file;  // empty: server TLS only; else clients must present a certificate it signs
};

struct LookupRequest {
  std::string method;         // the full method name, one of lookup_methods
  std::string authorization;  // the call's `authorization` metadata ("" when absent)
  std::string payload;        // the request message, unparsed
};

struct LookupReply {
  int code = 0;         // a grpc::StatusCode; 0 (OK): `payload` is the reply message
  std::string message;  // the status message when code != 0
  grpc::Slice payload;  // filled once from the handler's bytes, then sent without a copy
};

// Runs on one of the gate's threads, several at once; must not throw.
using LookupHandler = std::function<LookupReply(const LookupRequest&)>;

struct GateConfig {
  std::string listen;             // host:port of the public port (port 0: pick one)
  std::string upstream;           // gRPC target of the Python server, e.g. unix:/run/x/upstream.sock
  std::vector<std::string> lookup_methods;  // the bounded methods, answered by `lookup`
  LookupHandler lookup;
  int workers = 0;                // lookups answered at once, at most (0: one per core); the gate runs one thread more
  int64_t max_queue = 0;          // lookups admitted (their request read) and not finished; 0: no bound
  int64_t max_queue_bytes = 0;    // request + reply bytes the admitted lookups hold; 0: no bound
  int64_t max_message_bytes = 0;  // largest message either way
  // A Lookup whose client has not sent its whole request this long after it was taken, or a call
  // whose client has not taken its reply (a message of it) this long after it was sent, is
  // cancelled, so a client that stops sending or reading cannot hold its call (a Lookup's place and
  // bytes in the bounds once its request came, a forwarded call's upstream call) for good; 0: never.
  double client_stall_seconds = 0;
  bool tls = false;
  GateTls tls_files;
};

struct GateStats {
  int64_t in_flight;     // lookups admitted (their request read) and not finished
  int64_t queued_bytes;  // request and reply bytes those lookups hold
  int64_t admitted;      // lookups admitted, ever
  int64_t shed;        // lookups answered RESOURCE_EXHAUSTED, ever
  int64_t forwarded;   // calls of other methods forwarded, ever
  int64_t stalled;     // calls cancelled because their client stalled (client_stall_seconds)
};

// A count of the calls the gate ended itself, not NativeLookups nor the replica's server: refused
// by a bound, at the drain, without a request message, cancelled or past their deadline before
// their lookup ran. `method` is the method's short name ("Lookup").
struct GateEnded {
  std::string method;
  int code;
  int64_t count;
};

class ServingGate {
 public:
  // Binds and starts; throws std::runtime_error when the port cannot be bound.
  explicit ServingGate(const GateConfig& config);
  ~ServingGate();
  ServingGate(const ServingGate&) = delete;
  ServingGate& operator=(const ServingGate&) = delete;

  int port() const { return port_; }
  GateStats stats() const;
  std::vector<GateEnded> ended() const;
  // Stops taking calls; calls in flight get until `grace_seconds`, then are cancelled. Idempotent.
  void shutdown(double grace_seconds);

  // What the calls (serving_gate.cpp) share; every field is set before the first call is taken.
  struct Shared {
    std::vector<std::string> lookup_methods;
    LookupHandler lookup;
    int64_t max_queue = 0;
    int64_t max_queue_bytes = 0;
    std::chrono::microseconds client_stall{0};  // GateConfig::client_stall_seconds; 0: none
    // The calls waiting on their client, in a circular list under `watched_mu`: an admitted Lookup
    // while the rest of its request is read and while its reply is written, a forwarded call while
    // a message to its caller is written (a call links itself as each starts and unlinks itself
    // as it ends), and the gate's watch thread cancels those still there client_stall after they
    // were linked.
    struct Watched {
      Watched* prev = this;
      Watched* next = this;
      std::chrono::steady_clock::time_point since;
      grpc::ServerContextBase* context = nullptr;
    };
    std::mutex watched_mu;
    Watched watched;  // the list's head, no call's
    std::string shed_message;
    std::string shed_bytes_message;
    grpc::AsyncGenericService service;
    std::unique_ptr<grpc::GenericStub> stub;
    std::unique_ptr<grpc::ServerCompletionQueue> cq;  // every call's operations complete here
    // The threads' hand-off (see the top of this file), under `mu`: whether one polls, the
    // Lookups read and not yet answered (oldest first), the threads waiting on `wake`.
    std::mutex mu;
    std::condition_variable wake;
    bool polling = false;
    int workers = 0;    // Lookups answered at once, at most (GateConfig::workers, resolved)
    int answering = 0;  // Lookups being answered now
    // A Lookup read and not yet answered; `large`: its request is at least kLargeRequestBytes
    // (serving_gate.cpp), so its answer takes long enough to poll beside it.
    struct Pending {
      std::function<void()> answer;
      bool large = false;
    };
    std::deque<Pending> ready;
    int waiting = 0;
    bool closed = false;  // the queue is shut down: every thread returns
    // The Lookups read by the poller since it began polling: only the poller touches it, and
    // moves it to `ready` when it stops.
    std::vector<Pending> polled;
    std::atomic<int64_t> in_flight{0};
    std::atomic<int64_t> queued_bytes{0};
    std::atomic<int64_t> admitted{0};
    std::atomic<int64_t> shed{0};
    std::atomic<int64_t> forwarded{0};
    std::atomic<int64_t> stalled{0};
    std::atomic<int64_t> live_calls{0};  // calls (serving_gate.cpp), requests not yet taken included
    std::atomic<bool> draining{false};   // shutting down: new calls are refused UNAVAILABLE
    std::atomic<int64_t> serving{0};     // calls taken before the drain and not finished
    // The calls the gate ended itself (GateEnded): (short method name, status code) -> count.
    mutable std::mutex ended_mu;
    std::map<std::pair<std::string, int>, int64_t> ended;
    void count_ended(const std::string& method, grpc::StatusCode code) {
      const std::string name = method.substr(method.rfind('/') + 1);
      std::lock_guard<std::mutex> lock(ended_mu);
      ++ended[{name, static_cast<int>(code)}];
    }
  };

 private:
  Shared* shared_;  // owned; left allocated if calls outlive shutdown (see shutdown)
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::thread> threads_;  // `workers` + 1 of them, over shared_->cq
  // Cancels the calls whose client stalls (client_stall_seconds; none when 0).
  std::thread watch_;
  std::mutex watch_mu_;
  std::condition_variable watch_wake_;
  bool watch_stop_ = false;
  void watch_clients();
  void stop_watch();
  int port_ = 0;
  bool stopped_ = false;
  bool leaked_ = false;  // shutdown gave up waiting for calls: nothing is freed
};

}  // namespace embps
