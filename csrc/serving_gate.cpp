// The serving gate (see serving_gate.h): admission and Lookups in C++ threads, the rest forwarded.
#include "serving_gate.h"

#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>

namespace embps {
namespace {

constexpr int kRequestsOutstanding = 64;  // calls the gate is ready to take at once, per thread
// Lookups left waiting behind the one a thread takes from which it wakes another to help. Fewer
// woke a thread for most short bursts (two or three Lookups read at once), each wake-up costing
// more CPU than the Lookup it saved waiting; a burst of this size waits at most ~0.2 ms.
constexpr size_t kHelpFrom = 4;
// A Lookup whose request is at least this big (8,192 keys) is answered in a millisecond or more:
// the thread that takes it wakes another to poll meanwhile (one wake-up, small beside the
// answer), so the calls that arrive during it are read, and refused by the count or byte bound
// while it holds its place, instead of waiting unread until it is sent.
constexpr int64_t kLargeRequestBytes = 64 << 10;
// The fewest streams one connection may hold open (HTTP/2 MAX_CONCURRENT_STREAMS): twice max_queue
// when that is more.
constexpr int64_t kMinStreamsPerConnection = 1024;

// Headers gRPC sets on its own on the upstream call; every other one (tokens included) is forwarded.
bool forwarded_header(const std::string& key) {
  return key.rfind("grpc-", 0) != 0 && key.rfind(':', 0) != 0 && key != "user-agent" && key != "te" &&
         key != "content-type";
}

std::string to_string(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const grpc::Slice& slice : slices) out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return out;
}

// One call, from the request for it to its last operation, driven by the events of the gate's
// completion queue, which one thread at a time (the poller) handles. `pending_` counts operations
// started and not completed; at zero the call is deleted.
//
// A Lookup that comes while max_queue are admitted is finished RESOURCE_EXHAUSTED before its message
// is read. Any other's message is read, and it is admitted only then (a call whose message does not
// come holds no place, and is cancelled after client_stall): past the bounds, it is refused
// RESOURCE_EXHAUSTED; admitted, it is queued for the gate's threads, one of which answers it and
// sends the reply with the status in one batch.
//
// Any other call is pumped to an upstream call and back, one message in flight each way: a
// message read from the caller is written upstream, then the next one is read; a reply read
// upstream is written to the caller, then the next one is read. When the upstream replies end
// (and nothing is being written to it), its status is taken and becomes the caller's.
class Call {
 public:
  explicit Call(ServingGate::Shared* shared) : shared_(shared), cq_(shared->cq.get()), stream_(&server_ctx_) {
    shared_->live_calls.fetch_add(1, std::memory_order_relaxed);
    for (int k = 0; k < kKinds; ++k) tags_[k] = Tag{this, static_cast<Kind>(k)};
    server_ctx_.AsyncNotifyWhenDone(tag(kDone));  // delivered only for a call taken (see OnRequest)
    Start();
    shared_->service.RequestCall(&server_ctx_, &stream_, cq_, cq_, tag(kRequest));
  }

  ~Call() {
    if (counted_) shared_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    if (held_bytes_ != 0) shared_->queued_bytes.fetch_sub(held_bytes_, std::memory_order_relaxed);
    if (serving_) shared_->serving.fetch_sub(1, std::memory_order_relaxed);
    shared_->live_calls.fetch_sub(1, std::memory_order_relaxed);
  }

  // Runs one completed operation (on the poller); deletes the call after its last.
  static void Handle(void* raw_tag, bool ok) {
    Tag* t = static_cast<Tag*>(raw_tag);
    Call* call = t->call;
    call->pending_--;
    call->On(t->kind, ok);
    if (call->pending_ == 0) delete call;
  }

 private:
  enum Kind {
    kRequest, kDone, kFinish, kLookupRead,
    kRead, kWrite, kUpStart, kUpRead, kUpWrite, kUpWritesDone, kUpFinish, kKinds
  };
  struct Tag {
    Call* call;
    Kind kind;
  };

  void* tag(Kind kind) { return &tags_[kind]; }
  void Start() { pending_++; }

  void On(Kind kind, bool ok) {
    switch (kind) {
      case kRequest: return OnRequest(ok);
      case kDone: return OnDone();
      case kFinish: return OnFinish();
      case kLookupRead: return OnLookupRead(ok);
      case kRead: return OnRead(ok);
      case kWrite: return OnWrite(ok);
      case kUpStart: return OnUpStart(ok);
      case kUpRead: return OnUpRead(ok);
      case kUpWrite: return OnUpWrite(ok);
      case kUpWritesDone:
        up_writes_done_pending_ = false;
        return MaybeFinishUpstream();
      case kUpFinish: return OnUpFinish();
      case kKinds: return;
    }
  }

  void OnRequest(bool ok) {
    if (!ok) return;  // the server is shutting down: no call was taken, and none is requested
    new Call(shared_);  // the next request
    // The done tag of a taken call comes from a later event than this one: counting it here is safe.
    Start();
    const auto& bounded = shared_->lookup_methods;
    const bool lookup = std::find(bounded.begin(), bounded.end(), server_ctx_.method()) != bounded.end();
    if (shared_->draining.load(std::memory_order_relaxed)) {
      Start();
      // Named when it is a bounded method; any other under one name: a caller's made-up method
      // names, before any token check, were each a new series of embps_serving_requests_total.
      shared_->count_ended(lookup ? server_ctx_.method() : std::string("/other"), grpc::StatusCode::UNAVAILABLE);
      stream_.Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the serving replica is shutting down"),
                     tag(kFinish));
      return;
    }
    serving_ = true;
    shared_->serving.fetch_add(1, std::memory_order_relaxed);
    if (lookup) {
      // Refused unread while max_queue Lookups whose requests came are admitted: real load, and
      // reading the message would cost the time the refusal saves. Else its place is taken only
      // once its request has come (OnLookupRead): a call that sent its headers and no message
      // took one from here, and max_queue of them had every other Lookup shed until the watch
      // below cancelled them.
      if (shared_->max_queue > 0 && shared_->in_flight.load(std::memory_order_relaxed) >= shared_->max_queue) {
        return Shed(shared_->shed_message);
      }
      Watch();  // a client that sends its request slowly is cancelled after client_stall
      Start();
      stream_.Read(&from_caller_, tag(kLookupRead));
      return;
    }
    shared_->forwarded.fetch_add(1, std::memory_order_relaxed);
    for (const auto& [key, value] : server_ctx_.client_metadata()) {
      std::string name(key.data(), key.size());
      if (forwarded_header(name)) upstream_ctx_.AddMetadata(name, std::string(value.data(), value.size()));
    }
    upstream_ctx_.set_deadline(server_ctx_.raw_deadline());
    upstream_ = shared_->stub->PrepareCall(&upstream_ctx_, server_ctx_.method(), cq_);
    Start();
    upstream_->StartCall(tag(kUpStart));
  }

  void OnDone() {
    if (!server_ctx_.IsCancelled()) return;
    cancelled_.store(true, std::memory_order_relaxed);
    if (upstream_ != nullptr) upstream_ctx_.TryCancel();
  }

  // ---- a Lookup ----

  void OnLookupRead(bool ok) {
    Unwatch();
    Start();  // kFinish, which Answer starts
    if (!ok) {  // no request message: the caller half-closed without one, or left
      shared_->count_ended(server_ctx_.method(), grpc::StatusCode::INVALID_ARGUMENT);
      stream_.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, server_ctx_.method() + ": no request message"),
                     tag(kFinish));
      return;
    }
    // The count bound, now that the request is here: the queue may have filled since the call began.
    const int64_t waiting = shared_->in_flight.fetch_add(1, std::memory_order_relaxed);
    if (shared_->max_queue > 0 && waiting >= shared_->max_queue) {
      shared_->in_flight.fetch_sub(1, std::memory_order_relaxed);  // a refused call holds no place
      return Shed(shared_->shed_message, false);
    }
    counted_ = true;
    // The byte bound: one lookup always fits (else a large one could never run), more only
    // while the bytes held stay under max_queue_bytes.
    const int64_t size = static_cast<int64_t>(from_caller_.Length());
    const int64_t before = shared_->queued_bytes.fetch_add(size, std::memory_order_relaxed);
    if (shared_->max_queue_bytes > 0 && before > 0 && before + size > shared_->max_queue_bytes) {
      shared_->queued_bytes.fetch_sub(size, std::memory_order_relaxed);
      return Shed(shared_->shed_bytes_message, false);
    }
    held_bytes_ = size;
    // Counted here, past both bounds, never taken back: a counter that went down when the byte
    // bound shed a call it had counted on arrival read as a reset to Prometheus.
    shared_->admitted.fetch_add(1, std::memory_order_relaxed);
    request_.method = server_ctx_.method();
    request_.payload = to_string(from_caller_);
    const auto& metadata = server_ctx_.client_metadata();
    auto authorization = metadata.find("authorization");
    if (authorization != metadata.end()) {
      request_.authorization.assign(authorization->second.data(), authorization->second.size());
    }
    deadline_ = server_ctx_.deadline();
    shared_->polled.push_back({[this] { Answer(); }, size >= kLargeRequestBytes});
  }

  // Finishes a Lookup RESOURCE_EXHAUSTED with `message` and counts it shed; `start`: its kFinish is
  // not counted in pending_ yet.
  void Shed(const std::string& message, bool start = true) {
    shared_->shed.fetch_add(1, std::memory_order_relaxed);
    shared_->count_ended(server_ctx_.method(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    if (start) Start();
    stream_.Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, message), tag(kFinish));
  }

  // Run by one of the gate's threads (run_thread) once the events ready before it are handled,
  // while the poller may handle this call's kDone (OnDone: only cancelled_) but no other event of
  // it: the call's last operation is started here, and its count was taken in OnLookupRead.
  void Answer() {
    LookupReply reply;
    bool ended_here = true;  // else NativeLookups answered, and counted, the call
    // The deadline first: gRPC cancels a call whose deadline passed, and its client got
    // DEADLINE_EXCEEDED, so it is counted so (it was counted CANCELLED), as the Python path does.
    if (std::chrono::system_clock::now() >= deadline_) {
      reply.code = grpc::StatusCode::DEADLINE_EXCEEDED;
      reply.message = "deadline exceeded before the lookup ran";
    } else if (cancelled_.load(std::memory_order_relaxed)) {
      reply.code = grpc::StatusCode::CANCELLED;
      reply.message = "cancelled before the lookup ran";
    } else {
      reply = shared_->lookup(request_);
      ended_here = false;
    }
    if (ended_here) shared_->count_ended(server_ctx_.method(), static_cast<grpc::StatusCode>(reply.code));
    if (reply.code != grpc::StatusCode::OK) {
      stream_.Finish(grpc::Status(static_cast<grpc::StatusCode>(reply.code), reply.message), tag(kFinish));
      return;
    }
    // Counted, not checked: the reply of an admitted lookup is sent whatever its size, and the
    // lookups that arrive while it is held see it in the bound.
    const int64_t reply_bytes = static_cast<int64_t>(reply.payload.size());
    shared_->queued_bytes.fetch_add(reply_bytes, std::memory_order_relaxed);
    held_bytes_ += reply_bytes;
    reply_ = grpc::ByteBuffer(&reply.payload, 1);  // a reference to the slice, not a copy
    Watch();  // before the write starts, so kFinish always finds it on the list
    stream_.WriteAndFinish(reply_, grpc::WriteOptions(), grpc::Status::OK, tag(kFinish));
  }

  void OnFinish() { Unwatch(); }

  // Puts the call on the gate's watch list (Shared::watched): its client has client_stall from now
  // to send the rest of its request, or to take its reply (a Lookup's, or a message of a forwarded
  // call), before the watch thread cancels it.
  void Watch() {
    if (shared_->client_stall.count() == 0) return;
    std::lock_guard<std::mutex> lock(shared_->watched_mu);
    if (watch_.next != &watch_) return;  // on the list already (a forwarded call's first read)
    watch_.since = std::chrono::steady_clock::now();
    watch_.context = &server_ctx_;
    watch_.prev = shared_->watched.prev;
    watch_.next = &shared_->watched;
    shared_->watched.prev->next = &watch_;
    shared_->watched.prev = &watch_;
  }

  // Takes the call off the list, if on it (the watch thread takes off those it cancels).
  void Unwatch() {
    if (shared_->client_stall.count() == 0) return;
    std::lock_guard<std::mutex> lock(shared_->watched_mu);
    watch_.prev->next = watch_.next;
    watch_.next->prev = watch_.prev;
    watch_.prev = watch_.next = &watch_;
  }

  // ---- any other call: the pump ----

  void OnUpStart(bool ok) {
    if (!ok) {  // no upstream call: its status says why
      up_reads_done_ = true;
      return MaybeFinishUpstream();
    }
    Start();
    upstream_->Read(&from_upstream_, tag(kUpRead));
    // Its first message (or half-close) within client_stall, as a Lookup's: a call that sent only
    // its headers held itself and its upstream call for as long as its connection lived.
    awaiting_first_ = true;
    Watch();
    Start();
    stream_.Read(&from_caller_, tag(kRead));
  }

  void OnRead(bool ok) {  // a message from the caller, or the end of them
    if (awaiting_first_) {
      awaiting_first_ = false;
      Unwatch();
    }
    if (up_finish_started_) return;  // the upstream call is over: nothing more goes to it
    Start();
    if (ok) {
      up_write_pending_ = true;
      upstream_->Write(from_caller_, tag(kUpWrite));
      return;
    }
    up_writes_done_pending_ = true;  // the caller half-closed (or left: OnDone cancels upstream)
    upstream_->WritesDone(tag(kUpWritesDone));
  }

  void OnUpWrite(bool ok) {
    up_write_pending_ = false;
    if (ok && !up_reads_done_) {
      Start();
      stream_.Read(&from_caller_, tag(kRead));
      return;
    }
    MaybeFinishUpstream();  // !ok: the upstream call is over, and its reads end too
  }

  // The upstream's initial metadata (its headers), on the caller's call before its first message
  // or its status: gRPC has it once the upstream's first message or status came.
  void ForwardInitialMetadata() {
    if (initial_forwarded_) return;
    initial_forwarded_ = true;
    for (const auto& [key, value] : upstream_ctx_.GetServerInitialMetadata()) {
      std::string name(key.data(), key.size());
      if (forwarded_header(name)) server_ctx_.AddInitialMetadata(name, std::string(value.data(), value.size()));
    }
  }

  void OnUpRead(bool ok) {  // a reply from upstream, or the end of them
    if (ok) {
      ForwardInitialMetadata();
      Watch();  // a caller that does not take it holds this call and its upstream one
      Start();
      stream_.Write(from_upstream_, tag(kWrite));
      return;
    }
    up_reads_done_ = true;
    MaybeFinishUpstream();
  }

  void OnWrite(bool ok) {
    Unwatch();
    if (ok) {
      Start();
      upstream_->Read(&from_upstream_, tag(kUpRead));
      return;
    }
    upstream_ctx_.TryCancel();  // the caller is gone
    up_reads_done_ = true;
    MaybeFinishUpstream();
  }

  void MaybeFinishUpstream() {
    if (up_finish_started_ || !up_reads_done_ || up_write_pending_ || up_writes_done_pending_) return;
    up_finish_started_ = true;
    Start();
    upstream_->Finish(&upstream_status_, tag(kUpFinish));
  }

  void OnUpFinish() {
    ForwardInitialMetadata();
    for (const auto& [key, value] : upstream_ctx_.GetServerTrailingMetadata()) {
      std::string name(key.data(), key.size());
      if (forwarded_header(name)) server_ctx_.AddTrailingMetadata(name, std::string(value.data(), value.size()));
    }
    Start();
    stream_.Finish(upstream_status_, tag(kFinish));
  }

  ServingGate::Shared* const shared_;
  grpc::ServerCompletionQueue* const cq_;  // shared_'s: every operation of the call completes here
  Tag tags_[kKinds];
  int pending_ = 0;
  bool counted_ = false;  // holds a place in the bound (shared_->in_flight)
  int64_t held_bytes_ = 0;  // its request and reply bytes in shared_->queued_bytes (written before kFinish)
  bool serving_ = false;  // taken before the drain (shared_->serving)
  grpc::GenericServerContext server_ctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer from_caller_;
  // A Lookup.
  LookupRequest request_;
  grpc::ByteBuffer reply_;
  ServingGate::Shared::Watched watch_;  // in shared_->watched while it waits on its client (Watch)
  std::chrono::system_clock::time_point deadline_;
  std::atomic<bool> cancelled_{false};
  // Any other call.
  grpc::ClientContext upstream_ctx_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> upstream_;
  grpc::ByteBuffer from_upstream_;
  grpc::Status upstream_status_;
  bool initial_forwarded_ = false;  // the upstream's headers are on the caller's call
  bool up_reads_done_ = false;
  bool up_write_pending_ = false;
  bool up_writes_done_pending_ = false;
  bool up_finish_started_ = false;
  bool awaiting_first_ = false;  // its first read from the caller is pending, and watched
};

std::shared_ptr<grpc::ServerCredentials> server_credentials(const GateConfig& config) {
  if (!config.tls) return grpc::InsecureServerCredentials();
  const GateTls& files = config.tls_files;
  constexpr unsigned int kRefreshSeconds = 1;  // rotation: files re-read every second
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider;
  if (files.client_ca_file.empty()) {
    provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        files.key_file, files.cert_file, kRefreshSeconds);
  } else {
    provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        files.key_file, files.cert_file, files.client_ca_file, kRefreshSeconds);
  }
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (files.client_ca_file.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

// The poller's turn: handles every event ready now, after waiting for the first when `wait`.
// False once the queue is shut down (it is, only once no call is left).
bool poll(ServingGate::Shared* shared, bool wait) {
  void* tag;
  bool ok;
  if (wait) {
    if (!shared->cq->Next(&tag, &ok)) return false;
    Call::Handle(tag, ok);
  }
  while (true) {
    switch (shared->cq->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC))) {
      case grpc::CompletionQueue::GOT_EVENT:
        Call::Handle(tag, ok);
        break;
      case grpc::CompletionQueue::TIMEOUT:
        return true;
      case grpc::CompletionQueue::SHUTDOWN:
        return false;
    }
  }
}

// Whether a thread may take the oldest Lookup now (under `mu`): one waits, and fewer than
// `workers` are being answered, so one of the gate's workers + 1 threads is always free to poll.
bool may_answer(const ServingGate::Shared* shared) {
  return !shared->ready.empty() && shared->answering < shared->workers;
}

// One of the gate's threads (serving_gate.h): polls when no other thread does, then answers the
// oldest Lookup waiting, if it may; waits on `wake` when neither is its to do. A thread that takes a
// Lookup while kHelpFrom or more wait behind it, or a large one while none polls, wakes one that
// waits, which polls in turn and takes the next while fewer than `workers` are being answered.
void run_thread(ServingGate::Shared* shared) {
  std::unique_lock<std::mutex> lock(shared->mu);
  while (!shared->closed) {
    if (!shared->polling) {
      shared->polling = true;
      // Only the poller adds to `ready`, so none this thread may answer can come meanwhile; a
      // place freed meanwhile is taken by the thread that freed it.
      const bool wait = !may_answer(shared);
      lock.unlock();
      const bool open = poll(shared, wait);
      lock.lock();
      shared->polling = false;
      for (ServingGate::Shared::Pending& pending : shared->polled) shared->ready.push_back(std::move(pending));
      shared->polled.clear();
      if (!open) {
        shared->closed = true;
        shared->wake.notify_all();
        return;
      }
      if (!may_answer(shared)) continue;  // nothing it may answer: poll again, waiting for an event
    }
    if (may_answer(shared)) {
      ServingGate::Shared::Pending pending = std::move(shared->ready.front());
      shared->ready.pop_front();
      shared->answering++;
      const bool help = shared->ready.size() >= kHelpFrom || (pending.large && !shared->polling);
      if (help && shared->waiting > 0) shared->wake.notify_one();
      lock.unlock();
      pending.answer();
      lock.lock();
      shared->answering--;
      continue;
    }
    shared->waiting++;
    shared->wake.wait(lock);
    shared->waiting--;
  }
}

void drain(grpc::CompletionQueue* cq) {
  void* tag;
  bool ok;
  while (cq->Next(&tag, &ok)) {
  }
}

}  // namespace

ServingGate::ServingGate(const GateConfig& config) : shared_(new Shared) {
  std::unique_ptr<Shared> owner(shared_);  // until the gate runs
  if (config.max_queue < 0) throw std::invalid_argument("max_queue: must be >= 0");
  if (config.max_queue_bytes < 0) throw std::invalid_argument("max_queue_bytes: must be >= 0");
  if (config.max_message_bytes <= 0) throw std::invalid_argument("max_message_bytes: must be > 0");
  if (!config.lookup) throw std::invalid_argument("lookup: a handler is required");
  if (config.lookup_methods.empty()) throw std::invalid_argument("lookup_methods: at least one is required");
  if (config.workers < 0) throw std::invalid_argument("workers: must be >= 0 (0: one per core)");
  const int workers = config.workers > 0 ? config.workers
                                         : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int max_message = static_cast<int>(std::min<int64_t>(config.max_message_bytes, INT32_MAX));
  // Debian builds abseil without NDEBUG, which turns on its mutex deadlock detector: every lock
  // gRPC takes then updates a graph of lock orders (~3% of the gate's CPU in perf). It is a debug
  // aid for abseil's own users; the Python side of the process does not use this abseil.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  shared_->lookup_methods = config.lookup_methods;
  shared_->workers = workers;
  shared_->lookup = config.lookup;
  shared_->max_queue = config.max_queue;
  shared_->max_queue_bytes = config.max_queue_bytes;
  if (!(config.client_stall_seconds >= 0)) throw std::invalid_argument("client_stall_seconds: must be >= 0");
  shared_->client_stall = std::chrono::microseconds(static_cast<int64_t>(std::min(config.client_stall_seconds, 1e9) * 1e6));
  shared_->shed_bytes_message = "serving queue full: the lookups waiting hold more than " +
                                std::to_string(config.max_queue_bytes) +
                                " bytes (max_queue_bytes); retry with backoff or add replicas";
  shared_->shed_message = "serving queue full: " + std::to_string(config.max_queue) +
                          " lookups waiting; retry with backoff or add replicas";
  grpc::ChannelArguments upstream_args;
  upstream_args.SetMaxReceiveMessageSize(max_message);
  upstream_args.SetMaxSendMessageSize(max_message);
  shared_->stub = std::make_unique<grpc::GenericStub>(
      grpc::CreateCustomChannel(config.upstream, grpc::InsecureChannelCredentials(), upstream_args));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config.listen, server_credentials(config), &port_);
  builder.RegisterAsyncGenericService(&shared_->service);
  builder.SetMaxReceiveMessageSize(max_message);
  builder.SetMaxSendMessageSize(max_message);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // Streams one connection may hold open: unbounded, one connection opened 20,000 calls that sent
  // nothing and held ~30 KB each (a review's raw HTTP/2 client: +670 MiB). Above the Lookup bound,
  // so one busy client is still shed by max_queue (RESOURCE_EXHAUSTED), not queued by HTTP/2.
  const int64_t streams = std::clamp<int64_t>(2 * config.max_queue, kMinStreamsPerConnection, INT32_MAX);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, static_cast<int>(streams));
  shared_->cq = builder.AddCompletionQueue();
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    shared_->cq->Shutdown();
    drain(shared_->cq.get());
    throw std::runtime_error("listen: cannot bind " + config.listen);
  }
  owner.release();
  for (int i = 0; i < kRequestsOutstanding * workers; ++i) new Call(shared_);
  for (int i = 0; i < workers + 1; ++i) {  // one more than may answer at once: see serving_gate.h
    threads_.emplace_back([shared = shared_] {
      pthread_setname_np(pthread_self(), "embps-gate");
      run_thread(shared);
    });
  }
  if (shared_->client_stall.count() > 0) {
    watch_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "embps-gate-watch");
      watch_clients();
    });
  }
}

// A client that sends half a Lookup and no more, or keeps its flow-control window closed so that
// its reply never leaves, would hold an admitted place and its bytes in the bounds for good, and a
// few such clients would have every other Lookup shed; a forwarded call whose reply is never taken
// holds it and its upstream call. Every quarter of client_stall (at most 2.5 s apart: one wake-up,
// not one timer per call) this cancels the calls that have waited on their client for client_stall
// or more: grpc resets their streams, their read or write completes, and a Lookup's place and bytes
// go back to the bounds.
void ServingGate::watch_clients() {
  const auto stall = shared_->client_stall;
  const auto period = std::clamp<std::chrono::microseconds>(stall / 4, std::chrono::milliseconds(50),
                                                            std::chrono::milliseconds(2500));
  std::unique_lock<std::mutex> lock(watch_mu_);
  while (!watch_wake_.wait_for(lock, period, [this] { return watch_stop_; })) {
    const auto due = std::chrono::steady_clock::now() - stall;
    std::lock_guard<std::mutex> watched(shared_->watched_mu);
    for (Shared::Watched* w = shared_->watched.next; w != &shared_->watched;) {
      Shared::Watched* next = w->next;
      if (w->since <= due) {
        w->context->TryCancel();
        shared_->stalled.fetch_add(1, std::memory_order_relaxed);
        // Off the list, so it is cancelled once; its Unwatch then finds nothing to take off.
        w->prev->next = w->next;
        w->next->prev = w->prev;
        w->prev = w->next = w;
      }
      w = next;
    }
  }
}

void ServingGate::stop_watch() {
  if (!watch_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    watch_stop_ = true;
  }
  watch_wake_.notify_all();
  watch_.join();
}

ServingGate::~ServingGate() {
  shutdown(0.0);
  if (leaked_) return;  // calls outlived the shutdown: the server and the shared state stay theirs
  server_.reset();      // before the service and the queue it uses
  delete shared_;
}

std::vector<GateEnded> ServingGate::ended() const {
  std::lock_guard<std::mutex> lock(shared_->ended_mu);
  std::vector<GateEnded> out;
  for (const auto& [key, count] : shared_->ended) out.push_back({key.first, key.second, count});
  return out;
}

GateStats ServingGate::stats() const {
  return GateStats{shared_->in_flight.load(std::memory_order_relaxed),
                   shared_->queued_bytes.load(std::memory_order_relaxed),
                   shared_->admitted.load(std::memory_order_relaxed), shared_->shed.load(std::memory_order_relaxed),
                   shared_->forwarded.load(std::memory_order_relaxed), shared_->stalled.load(std::memory_order_relaxed)};
}

void ServingGate::shutdown(double grace_seconds) {
  if (stopped_) return;
  stopped_ = true;
  stop_watch();  // the shutdown below ends every call
  const auto grace = std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, grace_seconds) * 1e6));
  // First the drain: new calls are refused UNAVAILABLE while those taken before finish, for at
  // most the grace. grpc++'s own Shutdown(deadline) would wait out the whole deadline for clients
  // to close connections they keep open, idle or not. Then Shutdown: calls still running are
  // cancelled (their upstream calls with them) and connections closed; every call then ends on
  // its own (the threads keep running them). The queue is shut down only when none is left, since
  // no operation may start on a queue that is shut down.
  shared_->draining.store(true, std::memory_order_relaxed);
  const auto drained_by = std::chrono::steady_clock::now() + grace;
  while (shared_->serving.load(std::memory_order_relaxed) > 0 && std::chrono::steady_clock::now() < drained_by) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  server_->Shutdown(std::chrono::system_clock::now());
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (shared_->live_calls.load(std::memory_order_relaxed) > 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (shared_->live_calls.load(std::memory_order_relaxed) > 0) {
    std::fprintf(stderr, "embps serving gate: %lld calls did not end after shutdown; leaving them to the exit\n",
                 static_cast<long long>(shared_->live_calls.load()));
    for (std::thread& thread : threads_) thread.detach();
    leaked_ = true;
    return;
  }
  shared_->cq->Shutdown();
  for (std::thread& thread : threads_) thread.join();
  // The upstream channel goes now, not with the gate object: its connection would keep the
  // replica's grpc.aio server waiting out its own grace.
  shared_->stub.reset();
}

}  // namespace embps
