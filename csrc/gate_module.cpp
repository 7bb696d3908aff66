// Python binding of the serving gate: `_embps_gate`. serving/gate.py and serving/store.py import it.
// Built only where grpc++ is found (see CMakeLists.txt). The GIL is released while the gate
// starts and stops. The gate answers Lookups with NativeLookups (serving_lookup.h), which never
// takes the GIL.
// ShardStore and ServingTable hold the replica's rows (serving_store.h); their writes release
// the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
#include <vector>

#include "serving_gate.h"
#include "serving_lookup.h"

namespace nb = nanobind;
using namespace nb::literals;

template <typename T, typename... Extra>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;
using Keys = Array<const int64_t, nb::ndim<1>>;

NB_MODULE(_embps_gate, m) {
  m.doc() = "embps serving gate: the replica's public gRPC port, bounding and answering Lookups in C++ threads";

  nb::class_<embps::ShardStore>(m, "ShardStore")
      .def(nb::init<int64_t, int64_t>(), "width"_a, "expected_rows"_a = 0)
      .def_prop_ro("width", &embps::ShardStore::width)
      .def_prop_ro("size", &embps::ShardStore::size)
      .def_prop_ro("memory_bytes", &embps::ShardStore::memory_bytes)
      .def_prop_ro("row_bytes", &embps::ShardStore::row_bytes)
      .def_prop_ro("block_bytes", &embps::ShardStore::block_bytes)
      .def_prop_rw(
          "version", [](const embps::ShardStore& s) { return s.version.load(); },
          [](embps::ShardStore& s, uint64_t v) { s.version.store(v); })
      .def_prop_rw(
          "incarnation", [](const embps::ShardStore& s) { return s.incarnation.load(); },
          [](embps::ShardStore& s, uint64_t v) { s.incarnation.store(v); })
      .def("upsert",
           [](embps::ShardStore& self, Keys keys, Array<const float, nb::ndim<2>> words) {
             if (words.shape(0) != keys.shape(0) || static_cast<int64_t>(words.shape(1)) != self.width()) {
               throw std::invalid_argument("words: expected shape (len(keys), width)");
             }
             nb::gil_scoped_release release;
             self.upsert(keys.data(), static_cast<int64_t>(keys.shape(0)), words.data());
           }, "keys"_a, "words"_a)
      .def("erase",
           [](embps::ShardStore& self, Keys keys) {
             nb::gil_scoped_release release;
             self.erase(keys.data(), static_cast<int64_t>(keys.shape(0)));
           }, "keys"_a)
      .def("mark_deleted",
           [](embps::ShardStore& self, Keys keys) {
             nb::gil_scoped_release release;
             self.mark_deleted(keys.data(), static_cast<int64_t>(keys.shape(0)));
           }, "keys"_a)
      .def("gather",
           [](const embps::ShardStore& self, Keys keys, Array<float, nb::ndim<2>> out, Array<uint8_t, nb::ndim<1>> found) {
             if (out.shape(0) != keys.shape(0) || static_cast<int64_t>(out.shape(1)) != self.width() ||
                 found.shape(0) != keys.shape(0)) {
               throw std::invalid_argument("out, found: expected shapes (len(keys), width) and (len(keys),)");
             }
             nb::gil_scoped_release release;
             self.gather(keys.data(), static_cast<int64_t>(keys.shape(0)), out.data(), found.data());
           }, "keys"_a, "out"_a.noconvert(), "found"_a.noconvert())
      .def("export", [](const embps::ShardStore& self) {
        std::vector<int64_t> keys;
        std::vector<float> words;
        {
          nb::gil_scoped_release release;
          self.export_rows(keys, words);
        }
        return nb::make_tuple(nb::bytes(reinterpret_cast<const char*>(keys.data()), keys.size() * 8),
                              nb::bytes(reinterpret_cast<const char*>(words.data()), words.size() * 4));
      });

  nb::class_<embps::ModelClock>(m, "ModelClock")
      .def(nb::init<>())
      .def_prop_ro("visible", &embps::ModelClock::visible)
      .def_prop_ro("floor", &embps::ModelClock::floor)
      .def("begin_read", &embps::ModelClock::begin_read)
      .def("still_valid", &embps::ModelClock::still_valid, "version"_a)
      .def("publish", &embps::ModelClock::publish, "version"_a)
      .def("begin_merge", &embps::ModelClock::begin_merge, "version"_a);

  nb::class_<embps::ServingTable>(m, "ServingTable")
      .def("__init__",
           [](embps::ServingTable* self, const std::string& name, int64_t dim, int storage, bool default_init,
              uint64_t seed, int initializer, double init_scale, Array<const int32_t, nb::ndim<1>> buckets,
              int64_t num_shards) {
             if (storage < 0 || storage > 2) throw std::invalid_argument("storage: 0 (float32), 1 (float16) or 2 (int8)");
             embps::TableConfigNative c{name, dim, static_cast<embps::Storage>(storage), default_init, seed, initializer,
                                        init_scale};
             std::vector<int32_t> b(buckets.data(), buckets.data() + buckets.shape(0));
             new (self) embps::ServingTable(c, std::move(b), num_shards);
           },
           "name"_a, "dim"_a, "storage"_a, "default_init"_a, "seed"_a, "initializer"_a, "init_scale"_a,
           "buckets"_a, "num_shards"_a)
      .def("shard", &embps::ServingTable::shard, "s"_a)
      .def("set_shard", &embps::ServingTable::set_shard, "s"_a, "store"_a)
      .def("set_link", &embps::ServingTable::set_link, "s"_a, "connected"_a, "last_message"_a)
      .def("set_clock", &embps::ServingTable::set_clock, "clock"_a)
      .def("set_pending", &embps::ServingTable::set_pending, "s"_a, "step"_a, "replace"_a, "rows"_a)
      .def("clear_pending", &embps::ServingTable::clear_pending, "s"_a)
      .def("gather_at",
           [](const embps::ServingTable& self, Keys keys, Array<float, nb::ndim<2>> out,
              Array<uint8_t, nb::ndim<1>> found, uint64_t version) {
             if (out.shape(0) != keys.shape(0) || static_cast<int64_t>(out.shape(1)) != self.width() ||
                 found.shape(0) != keys.shape(0)) {
               throw std::invalid_argument("out, found: expected shapes (len(keys), width) and (len(keys),)");
             }
             std::vector<std::shared_ptr<embps::ShardStore>> stores;
             {
               nb::gil_scoped_release release;
               stores = self.gather_at(keys.data(), static_cast<int64_t>(keys.shape(0)), out.data(), found.data(),
                                       version);
             }
             std::vector<std::pair<uint64_t, uint64_t>> served;
             for (const auto& store : stores) {
               served.emplace_back(store->version.load(std::memory_order_relaxed),
                                   store->incarnation.load(std::memory_order_relaxed));
             }
             return served;
           }, "keys"_a, "out"_a.noconvert(), "found"_a.noconvert(), "version"_a,
           "Gathers the rows of `keys` at model `version`; returns each shard's (version, incarnation) of the\n"
           "stores read.");

  nb::class_<embps::NativeLookups>(m, "NativeLookups")
      .def(nb::init<std::vector<std::shared_ptr<embps::ServingTable>>, std::vector<double>, double, bool, uint64_t>(),
           "tables"_a, "latency_buckets"_a, "stale_after_seconds"_a, "auth"_a, "max_reply_bytes"_a = 0)
      .def("set_tokens",
           [](embps::NativeLookups& self, const std::vector<nb::bytes>& tokens) {
             std::vector<std::string> t;
             for (const nb::bytes& b : tokens) t.emplace_back(b.c_str(), b.size());
             self.set_tokens(std::move(t));
           }, "tokens"_a)
      .def("set_draining", &embps::NativeLookups::set_draining, "draining"_a)
      .def("__call__",
           [](embps::NativeLookups& self, const std::string& method, nb::bytes authorization, nb::bytes payload) {
             std::string auth(authorization.c_str(), authorization.size());
             std::string data(payload.c_str(), payload.size());
             embps::NativeAnswer a;
             {
               nb::gil_scoped_release release;
               a = self.answer(method, auth, data.data(), data.size());
             }
             return nb::make_tuple(a.code, a.message, nb::bytes(a.payload.data(), a.payload.size()));
           }, "method"_a, "authorization"_a, "payload"_a)
      .def("metrics", [](const embps::NativeLookups& self) {
        // {"calls": [(table_label, method, code, count, cumulative buckets, sum)],
        //  "denied": [(method, code, count)], "tables": [(table, keys, missing, cumulative, count, sum)]}
        const auto& tables = self.tables();
        auto label = [&](size_t i) -> std::string {
          if (i < tables.size()) return tables[i]->config().name;
          return i == tables.size() ? "unknown" : "";
        };
        const char* methods[] = {"Lookup", "LookupMany"};
        nb::list calls, denied, table_rows;
        std::vector<uint64_t> cumulative;
        double sum;
        uint64_t count;
        for (size_t l = 0; l < tables.size() + 2; ++l) {
          for (int m = 0; m < embps::NativeLookups::kMethods; ++m) {
            for (int c = 0; c < embps::NativeLookups::kCodes; ++c) {
              const auto& cell = self.call_cell(l, m, c);
              if (cell.count.load() == 0) continue;
              cell.duration.read(cumulative, sum, count);
              calls.append(nb::make_tuple(label(l), methods[m], c, cell.count.load(), nb::cast(cumulative), sum));
            }
          }
        }
        for (int m = 0; m < embps::NativeLookups::kMethods; ++m) {
          for (int c = 0; c < embps::NativeLookups::kCodes; ++c) {
            if (self.denied(m, c)) denied.append(nb::make_tuple(methods[m], c, self.denied(m, c)));
          }
        }
        for (size_t t = 0; t < tables.size(); ++t) {
          const auto& cell = self.table_cell(t);
          cell.duration.read(cumulative, sum, count);
          table_rows.append(nb::make_tuple(label(t), cell.keys.load(), cell.missing.load(), nb::cast(cumulative),
                                           count, sum));
        }
        nb::dict d;
        d["version_retries"] = self.version_retries();
        d["calls"] = calls;
        d["denied"] = denied;
        d["tables"] = table_rows;
        return d;
      });

  m.def("float_to_half", [](float f) { return embps::reply_float_to_half(f); });

  nb::class_<embps::ServingGate>(m, "ServingGate")
      .def(
          "__init__",
          [](embps::ServingGate* self, const std::string& listen, const std::string& upstream,
             const std::vector<std::string>& lookup_methods, std::shared_ptr<embps::NativeLookups> lookup,
             int64_t max_queue,
             int64_t max_message_bytes, const std::string& tls_cert, const std::string& tls_key,
             const std::string& client_ca, int64_t max_queue_bytes, int workers, double client_stall_seconds) {
            embps::GateConfig config;
            config.listen = listen;
            config.upstream = upstream;
            config.lookup_methods = lookup_methods;
            config.workers = workers;
            if (lookup == nullptr) throw std::invalid_argument("lookup: a NativeLookups is required");
            config.lookup = [lookup](const embps::LookupRequest& request) { return (*lookup)(request); };
            config.max_queue = max_queue;
            config.max_message_bytes = max_message_bytes;
            config.max_queue_bytes = max_queue_bytes;
            config.client_stall_seconds = client_stall_seconds;
            config.tls = !tls_cert.empty();
            config.tls_files = embps::GateTls{tls_cert, tls_key, client_ca};
            nb::gil_scoped_release release;
            new (self) embps::ServingGate(config);
          },
          "listen"_a, "upstream"_a, "lookup_methods"_a, "lookup"_a, "max_queue"_a, "max_message_bytes"_a,
          "tls_cert"_a = "", "tls_key"_a = "", "client_ca"_a = "", "max_queue_bytes"_a = 0, "workers"_a = 0,
          "client_stall_seconds"_a = 0.0)
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
             d["stalled"] = s.stalled;
             return d;
           })
      .def("ended",
           [](const embps::ServingGate& self) {
             nb::list out;
             for (const auto& e : self.ended()) out.append(nb::make_tuple(e.method, e.code, e.count));
             return out;
           },
           "[(method, code, count)] of the calls the gate ended itself (refused, drained, cancelled).")
      .def(
          "shutdown",
          [](embps::ServingGate& self, double grace_seconds) {
            nb::gil_scoped_release release;
            self.shutdown(grace_seconds);
          },
          "grace_seconds"_a);
}
