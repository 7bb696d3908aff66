// Python binding of the serving gate: `_embps_gate`. serving/gate.py is its only importer.
// Built only where grpc++ is found (see CMakeLists.txt). The GIL is released while the gate
// starts and stops; the gate's worker threads take it to call the Lookup handler.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
#include <vector>

#include "serving_gate.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// handler(method: str, authorization: bytes, request: bytes) -> (code: int, message: str, reply: bytes).
// A Python exception, or a result of another shape, becomes INTERNAL (and is printed).
embps::LookupHandler python_handler(nb::callable handler) {
  // Called with the GIL held; the last copy of the handler may go on any thread.
  std::shared_ptr<nb::callable> callable(new nb::callable(std::move(handler)), [](nb::callable* h) {
    nb::gil_scoped_acquire gil;
    delete h;
  });
  return [callable](const embps::LookupRequest& request) {
    nb::gil_scoped_acquire gil;
    embps::LookupReply reply;
    try {
      nb::object out = (*callable)(nb::str(request.method.data(), request.method.size()),
                                   nb::bytes(request.authorization.data(), request.authorization.size()),
                                   nb::bytes(request.payload.data(), request.payload.size()));
      auto [code, message, payload] = nb::cast<std::tuple<int, std::string, nb::bytes>>(out);
      reply.code = code;
      reply.message = std::move(message);
      reply.payload = grpc::Slice(payload.c_str(), payload.size());  // the one copy of the reply
    } catch (nb::python_error& error) {
      error.discard_as_unraisable("embps serving gate: the Lookup handler");
      reply.code = grpc::StatusCode::INTERNAL;
      reply.message = "the lookup failed";
    } catch (const std::exception& error) {
      reply.code = grpc::StatusCode::INTERNAL;
      reply.message = std::string("the lookup's result: ") + error.what();
    }
    return reply;
  };
}

}  // namespace

NB_MODULE(_embps_gate, m) {
  m.doc() = "embps serving gate: the replica's public gRPC port, bounding and answering Lookups in C++ threads";

  nb::class_<embps::ServingGate>(m, "ServingGate")
      .def(
          "__init__",
          [](embps::ServingGate* self, const std::string& listen, const std::string& upstream,
             const std::vector<std::string>& lookup_methods, nb::callable lookup, int64_t max_queue,
             int64_t max_message_bytes, const std::string& tls_cert, const std::string& tls_key,
             const std::string& client_ca, int64_t max_queue_bytes, int workers) {
            embps::GateConfig config;
            config.listen = listen;
            config.upstream = upstream;
            config.lookup_methods = lookup_methods;
            config.workers = workers;
            config.lookup = python_handler(std::move(lookup));
            config.max_queue = max_queue;
            config.max_message_bytes = max_message_bytes;
            config.max_queue_bytes = max_queue_bytes;
            config.tls = !tls_cert.empty();
            config.tls_files = embps::GateTls{tls_cert, tls_key, client_ca};
            nb::gil_scoped_release release;
            new (self) embps::ServingGate(config);
          },
          "listen"_a, "upstream"_a, "lookup_methods"_a, "lookup"_a, "max_queue"_a, "max_message_bytes"_a,
          "tls_cert"_a = "", "tls_key"_a = "", "client_ca"_a = "", "max_queue_bytes"_a = 0, "workers"_a = 0)
      .def_prop_ro("port", &embps::ServingGate::port)
      .def("stats",
           [](const embps::ServingGate& self) {
             embps::GateStats s = self.stats();
             nb::dict d;
             d["in_flight"] = s.in_flight;
             d["queued_bytes"] = s.queued_bytes;
             d["admitted"] = s.admitted;
             d["shed"] = s.shed;
             d["forwarded"] = s.forwarded;
             return d;
           })
      .def(
          "shutdown",
          [](embps::ServingGate& self, double grace_seconds) {
            nb::gil_scoped_release release;
            self.shutdown(grace_seconds);
          },
          "grace_seconds"_a);
}
