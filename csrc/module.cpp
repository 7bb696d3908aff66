// Python binding of the native core: `_embps_native`. ps/native.py is its only importer.
// Arrays cross as numpy arrays; outputs are allocated by the caller; the GIL is released while
// the loops run. C++ exceptions become Python exceptions through nanobind's translators
// (std::invalid_argument -> ValueError, std::length_error / out_of_range -> ValueError/IndexError).
// Initializer and OptimizerKind cross as Python enums (nb::enum_); a plain int is a TypeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "flat_hash_map.h"
#include "hash_map.h"
#include "row_codec.h"
#include "multi_table.h"
#include "row_ops.h"
#include "string_hash_binding.h"
#include "value_checks.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T, typename... Extra>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;
using Keys = Array<const int64_t, nb::ndim<1>>;
using Rows = Array<int64_t, nb::ndim<1>>;
// Any strides (in elements: ndarray::stride); read in place.
template <typename T, typename... Extra>
using Strided = nb::ndarray<T, nb::device::cpu, Extra...>;

void check_same_length(const char* what, size_t got, size_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string(what) + ": expected length " + std::to_string(want) +
                                ", got " + std::to_string(got));
  }
}

// The kernels write exactly the optimizer's state words: any other width reads or writes past the row.
void check_state_width(embps::Optimizer optimizer, int64_t dim, int64_t state_width) {
  if (state_width != embps::state_words(optimizer, dim)) {
    throw std::invalid_argument("state_width: " + std::to_string(state_width) + " words, the optimizer keeps " +
                                std::to_string(embps::state_words(optimizer, dim)));
  }
}

embps::BlockStore make_store(const Array<const uint64_t, nb::ndim<1>>& blocks, int shift,
                             int64_t width) {
  if (shift < 0 || shift > 30) throw std::invalid_argument("block shift must be in [0, 30]");
  if (width <= 0) throw std::invalid_argument("row width must be > 0");
  return embps::BlockStore{reinterpret_cast<float* const*>(blocks.data()),
                           static_cast<int64_t>(blocks.shape(0)), shift, width};
}

// Low-precision rows (row_codec.h): the Storage enum and the kernels that decode, encode and
// train float16 and int8 values. `words` arrays are (n, value_words) float32 holding raw words.
size_t varint_size(uint64_t value) {
  size_t size = 1;
  for (; value > 0x7F; value >>= 7) ++size;
  return size;
}

// Appends `value` as a protobuf varint of at least `min_bytes` (at most 10) bytes: a longer than
// minimal varint is valid protobuf, each extra byte a zero group with the continuation bit set.
void append_varint(std::string& out, uint64_t value, size_t min_bytes = 1) {
  for (size_t written = 1; value > 0x7F || written < min_bytes; ++written) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

void bind_codec(nb::module_& m) {
  nb::enum_<embps::Storage>(m, "Storage")
      .value("FLOAT32", embps::Storage::kFloat32)
      .value("FLOAT16", embps::Storage::kFloat16)
      .value("INT8", embps::Storage::kInt8);

  m.def("value_words", &embps::value_words, "storage"_a.noconvert(), "dim"_a);

  m.def("decode_words",
        [](embps::Storage storage, Array<const float, nb::ndim<2>> words, Array<float, nb::ndim<2>> out) {
          check_same_length("out", out.shape(0), words.shape(0));
          const int64_t dim = static_cast<int64_t>(out.shape(1));
          const int64_t width = static_cast<int64_t>(words.shape(1));
          if (width != embps::value_words(storage, dim)) throw std::invalid_argument("words: wrong width for dim");
          nb::gil_scoped_release release;
          for (size_t i = 0; i < words.shape(0); ++i) {
            embps::decode_value(storage, words.data() + i * width, dim, out.data() + i * dim);
          }
        },
        "storage"_a.noconvert(), "words"_a, "out"_a.noconvert());

  m.def("encode_words",
        [](embps::Storage storage, uint64_t seed, Keys keys, uint64_t stream, Array<const float, nb::ndim<2>> values,
           Array<float, nb::ndim<2>> words) {
          check_same_length("values", values.shape(0), keys.shape(0));
          check_same_length("words", words.shape(0), keys.shape(0));
          const int64_t dim = static_cast<int64_t>(values.shape(1));
          const int64_t width = static_cast<int64_t>(words.shape(1));
          if (dim <= 0) throw std::invalid_argument("values: dim must be > 0");
          if (width != embps::value_words(storage, dim)) throw std::invalid_argument("words: wrong width for dim");
          nb::gil_scoped_release release;
          const uint64_t seed_mix = embps::rounding_seed(seed);
          std::vector<uint16_t> r(static_cast<size_t>(dim + 3));
          for (size_t i = 0; i < keys.shape(0); ++i) {
            embps::encode_value(storage, values.data() + i * dim, dim,
                                embps::rounding_base(seed_mix, keys.data()[i], stream), r.data(),
                                words.data() + i * width);
          }
        },
        "storage"_a.noconvert(), "seed"_a, "keys"_a, "stream"_a, "values"_a, "words"_a.noconvert());

  m.def("gather_decode",
        [](Array<const uint64_t, nb::ndim<1>> blocks, int shift, int64_t width, embps::Storage storage, Keys rows,
           Array<float, nb::ndim<2>> out) {
          check_same_length("out", out.shape(0), rows.shape(0));
          const int64_t dim = static_cast<int64_t>(out.shape(1));
          if (embps::value_words(storage, dim) > width) throw std::invalid_argument("value wider than the row");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::gather_decode(store, storage, dim, rows.data(), static_cast<int64_t>(rows.shape(0)), out.data());
        },
        "blocks"_a, "shift"_a, "width"_a, "storage"_a.noconvert(), "rows"_a, "out"_a.noconvert());

  m.def("encode_scatter",
        [](Array<const uint64_t, nb::ndim<1>> blocks, int shift, int64_t width, embps::Storage storage, uint64_t seed,
           Keys keys, Keys rows, Array<const float, nb::ndim<2>> values, uint64_t stream) {
          check_same_length("rows", rows.shape(0), keys.shape(0));
          check_same_length("values", values.shape(0), keys.shape(0));
          const int64_t dim = static_cast<int64_t>(values.shape(1));
          if (dim <= 0) throw std::invalid_argument("values: dim must be > 0");
          if (embps::value_words(storage, dim) > width) throw std::invalid_argument("value wider than the row");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::encode_scatter(store, storage, dim, seed, keys.data(), rows.data(),
                                static_cast<int64_t>(rows.shape(0)), values.data(), stream);
        },
        "blocks"_a, "shift"_a, "width"_a, "storage"_a.noconvert(), "seed"_a, "keys"_a, "rows"_a, "values"_a,
        "stream"_a);

  m.def(
      "set_isa_limit",
      [](int limit) {
        if (limit < 0 || limit > 2) throw std::invalid_argument("isa limit: 0 (baseline), 1 (AVX2) or 2 (AVX-512)");
        return embps::isa_limit().exchange(limit);
      },
      "limit"_a, "Caps the instruction set of the row kernels (tests); returns the previous cap.");
  m.def("cpu_isa", &embps::cpu_isa, "The widest instruction set of the row kernels this CPU has (0, 1, 2).");

  m.def("apply_update_encoded",
        [](embps::Optimizer optimizer, Array<const double, nb::ndim<1>> hyper, Array<const uint64_t, nb::ndim<1>> blocks,
           int shift, int64_t width, embps::Storage storage, int64_t dim, int64_t state_width, uint64_t seed, Keys keys,
           Keys rows, Array<const float, nb::ndim<2>> grads, Keys counts, uint32_t step) {
          if (hyper.shape(0) < 4) throw std::invalid_argument("hyper-parameters: expected 4 values");
          if (dim <= 0) throw std::invalid_argument("dim must be > 0");
          if (embps::value_words(storage, dim) + state_width + 2 != width) {
            throw std::invalid_argument("width != value words + state_width + 2");
          }
          check_state_width(optimizer, dim, state_width);
          check_same_length("keys", keys.shape(0), rows.shape(0));
          check_same_length("grads", grads.shape(0), rows.shape(0));
          check_same_length("counts", counts.shape(0), rows.shape(0));
          if (static_cast<int64_t>(grads.shape(1)) != dim) throw std::invalid_argument("grads: wrong dim");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::apply_update_encoded(optimizer, hyper.data(), store, storage, dim, state_width, seed, keys.data(),
                                      rows.data(), grads.data(), counts.data(), static_cast<int64_t>(rows.shape(0)),
                                      step);
        },
        "optimizer"_a.noconvert(), "hyper"_a, "blocks"_a, "shift"_a, "width"_a, "storage"_a.noconvert(), "dim"_a,
        "state_width"_a, "seed"_a, "keys"_a, "rows"_a, "grads"_a, "counts"_a, "step"_a);
}

// The tables of a multi-table call, from per-table lists and (T,) arrays (ps/native.py checks them).
std::vector<embps::TableRef> make_tables(nb::list maps, nb::list blocks, Array<const int64_t, nb::ndim<2>> params,
                                         Array<const double, nb::ndim<2>> reals) {
  // params (T, 9): shift, width, dim, state_width, init, optimizer, prev_step, ttl (0: none), now
  // reals (T, 6): scale, state_init, hyper[4]; the seeds come as their own (T,) uint64 array
  const size_t t = nb::len(maps);
  if (nb::len(blocks) != t || params.shape(0) != t || reals.shape(0) != t) {
    throw std::invalid_argument("tables: maps, blocks, params and reals differ in length");
  }
  if (params.shape(1) != 9 || reals.shape(1) != 6) throw std::invalid_argument("tables: params (T, 9), reals (T, 6)");
  std::vector<embps::TableRef> out;
  out.reserve(t);
  for (size_t i = 0; i < t; ++i) {
    const int64_t* p = params.data() + i * 9;
    const double* r = reals.data() + i * 6;
    // Not converted: a converted copy would be freed at the end of this pass, its rows read later.
    Array<const uint64_t, nb::ndim<1>> block_array;
    if (!nb::try_cast(blocks[i], block_array, false)) {
      throw std::invalid_argument("tables: each blocks entry must be a contiguous uint64 array");
    }
    embps::TableRef ref{};
    ref.map = nb::cast<embps::HashMap*>(maps[i]);
    if (ref.map == nullptr) throw std::invalid_argument("tables: a map is None");
    ref.store = make_store(block_array, static_cast<int>(p[0]), p[1]);
    ref.dim = p[2];
    ref.state_width = p[3];
    if (ref.dim <= 0 || ref.state_width < 0 || ref.dim + ref.state_width + 2 != ref.store.width) {
      throw std::invalid_argument("tables: width != dim + state_width + 2");
    }
    if (p[4] < 0 || p[4] > 2 || p[5] < 0 || p[5] > 4) throw std::invalid_argument("tables: unknown init or optimizer");
    ref.init = static_cast<embps::Init>(p[4]);
    ref.opt = static_cast<embps::Optimizer>(p[5]);
    check_state_width(ref.opt, ref.dim, ref.state_width);
    ref.prev_step = static_cast<uint32_t>(p[6]);
    if (p[7] < 0 || p[7] > 0xFFFFFFFFLL) throw std::invalid_argument("tables: ttl outside [0, 2^32)");
    ref.ttl = static_cast<uint32_t>(p[7]);
    ref.now = p[8];
    ref.scale = r[0];
    ref.state_init = static_cast<float>(r[1]);
    ref.hyper = r + 2;
    out.push_back(ref);
  }
  return out;
}

int64_t total_values(const std::vector<embps::TableRef>& tables, const int64_t* offsets, size_t num_offsets,
                     size_t num_keys) {
  if (num_offsets != tables.size() + 1 || offsets[0] != 0 || offsets[tables.size()] != static_cast<int64_t>(num_keys)) {
    throw std::invalid_argument("offsets: expected (T + 1,) from 0 to the number of keys");
  }
  int64_t total = 0;
  for (size_t t = 0; t < tables.size(); ++t) {
    if (offsets[t + 1] < offsets[t]) throw std::invalid_argument("offsets: must not decrease");
    total += (offsets[t + 1] - offsets[t]) * tables[t].dim;
  }
  return total;
}

}  // namespace

NB_MODULE(_embps_native, m) {
  m.doc() = "embps native core: key->row hash map and bulk row operations";

  // The config's StrEnums (ps/table/config.py) map onto these by member name in ps/native.py, and
  // the functions take them without conversion: integer codes exist only in row_ops.h.
  nb::enum_<embps::Init>(m, "Initializer")
      .value("ZEROS", embps::Init::kZeros)
      .value("UNIFORM", embps::Init::kUniform)
      .value("NORMAL", embps::Init::kNormal);

  nb::enum_<embps::Optimizer>(m, "OptimizerKind")
      .value("SGD", embps::Optimizer::kSgd)
      .value("ADAGRAD", embps::Optimizer::kAdagrad)
      .value("ROWWISE_ADAGRAD", embps::Optimizer::kRowWiseAdagrad)
      .value("ADAM", embps::Optimizer::kAdam)
      .value("FTRL", embps::Optimizer::kFtrl);

  m.def("prefault_threads", &embps::SlotArena::prefault_threads,
        "This process's hash-map arena threads started and not yet joined.");

  nb::class_<embps::HashMap>(m, "HashMap")
      .def(nb::init<uint64_t, uint64_t>(), "initial_capacity"_a = 0,
           "sub_maps"_a = embps::HashMap::kDefaultSubMaps)
      .def_prop_ro("size", &embps::HashMap::size)
      .def_prop_ro("capacity", &embps::HashMap::capacity)
      .def_prop_ro("sub_maps", &embps::HashMap::sub_maps)
      .def_prop_ro("rehashed", &embps::HashMap::rehashed)
      .def_prop_ro("num_rows", &embps::HashMap::num_rows)
      .def_prop_ro("memory_bytes", &embps::HashMap::memory_bytes)
      .def("reserve", &embps::HashMap::reserve, "num_keys"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("clear", &embps::HashMap::clear, nb::call_guard<nb::gil_scoped_release>())
      .def("find",
           [](const embps::HashMap& self, Keys keys, Rows rows) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.find(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data());
           },
           "keys"_a, "rows"_a.noconvert())
      .def("find_or_insert",
           [](embps::HashMap& self, Keys keys, Rows rows, Array<uint8_t, nb::ndim<1>> inserted) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             check_same_length("inserted", inserted.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.find_or_insert(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data(),
                                 inserted.data());
           },
           "keys"_a, "rows"_a.noconvert(), "inserted"_a.noconvert())
      .def("erase",
           [](embps::HashMap& self, Keys keys, Rows rows) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.erase(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data());
           },
           "keys"_a, "rows"_a.noconvert())
      .def("export",
           [](const embps::HashMap& self, Rows keys, Rows rows) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.export_all(keys.data(), rows.data(), keys.shape(0));
           },
           "keys"_a.noconvert(), "rows"_a.noconvert())
      .def_prop_ro("num_free_rows", &embps::HashMap::num_free_rows)
      .def("export_free_rows",
           [](const embps::HashMap& self, Array<uint32_t, nb::ndim<1>> out) {
             nb::gil_scoped_release release;
             self.export_free_rows(out.data(), out.shape(0));
           },
           "out"_a.noconvert())
      .def("restore",
           [](embps::HashMap& self, Keys keys, Keys rows, uint64_t num_rows, Array<const uint32_t, nb::ndim<1>> free) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.restore(keys.data(), rows.data(), keys.shape(0), num_rows, free.data(), free.shape(0));
           },
           "keys"_a, "rows"_a, "num_rows"_a, "free"_a);

  // The bench's yardstick only (see flat_hash_map.h).
  nb::class_<embps::FlatHashMap>(m, "FlatHashMap")
      .def(nb::init<uint64_t>(), "initial_capacity"_a = 16)
      .def_prop_ro("size", &embps::FlatHashMap::size)
      .def_prop_ro("capacity", &embps::FlatHashMap::capacity)
      .def_prop_ro("memory_bytes", &embps::FlatHashMap::memory_bytes)
      .def("find",
           [](const embps::FlatHashMap& self, Keys keys, Rows rows) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.find(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data());
           },
           "keys"_a, "rows"_a.noconvert())
      .def("find_or_insert",
           [](embps::FlatHashMap& self, Keys keys, Rows rows, Array<uint8_t, nb::ndim<1>> inserted) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             check_same_length("inserted", inserted.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.find_or_insert(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data(),
                                 inserted.data());
           },
           "keys"_a, "rows"_a.noconvert(), "inserted"_a.noconvert());

  m.def("mix64",
        [](Keys keys, Array<uint64_t, nb::ndim<1>> out) {
          check_same_length("out", out.shape(0), keys.shape(0));
          nb::gil_scoped_release release;
          for (size_t i = 0; i < keys.shape(0); ++i) out.data()[i] = embps::mix64(static_cast<uint64_t>(keys.data()[i]));
        },
        "keys"_a, "out"_a.noconvert());

  m.def("first_out_of_range",
        [](Array<const float> values, float limit) -> int64_t {
          if (!(limit >= 0.0f) || std::isinf(limit)) {
            throw std::invalid_argument("limit: expected a finite number >= 0, got " + std::to_string(limit));
          }
          nb::gil_scoped_release release;
          return embps::first_out_of_range(values.data(), static_cast<int64_t>(values.size()), limit);
        },
        "values"_a, "limit"_a,
        "Flat index of the first NaN, infinity or |value| > limit of values (any shape, C order), or -1.");

  m.def("first_foreign_key",
        [](Keys keys, Array<const int32_t, nb::ndim<1>> buckets, int32_t shard) -> int64_t {
          const uint64_t num_buckets = buckets.shape(0);
          if (num_buckets == 0 || (num_buckets & (num_buckets - 1)) != 0) {
            throw std::invalid_argument("buckets: expected a power-of-two length, got " + std::to_string(num_buckets));
          }
          nb::gil_scoped_release release;
          return embps::first_foreign_key(keys.data(), static_cast<int64_t>(keys.shape(0)), buckets.data(),
                                          num_buckets, shard);
        },
        "keys"_a, "buckets"_a, "shard"_a,
        "Index of the first key whose bucket (mix64(key) & (len(buckets) - 1)) is not `shard`'s, or -1.");

  m.def("init_values",
        [](uint64_t seed, embps::Init kind, double scale, Keys keys, Array<float, nb::ndim<2>> out) {
          check_same_length("out", out.shape(0), keys.shape(0));
          nb::gil_scoped_release release;
          embps::init_values(seed, kind, scale, keys.data(),
                             static_cast<int64_t>(keys.shape(0)), static_cast<int64_t>(out.shape(1)),
                             out.data(), static_cast<int64_t>(out.shape(1)));
        },
        "seed"_a, "kind"_a.noconvert(), "scale"_a, "keys"_a, "out"_a.noconvert());

  m.def("gather",
        [](Array<const uint64_t, nb::ndim<1>> blocks, int shift, int64_t width, Keys rows,
           int64_t col, Array<float, nb::ndim<2>> out) {
          check_same_length("out", out.shape(0), rows.shape(0));
          const int64_t num_cols = static_cast<int64_t>(out.shape(1));
          if (col < 0 || num_cols > width || col > width - num_cols) throw std::invalid_argument("columns outside the row");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::gather(store, rows.data(), static_cast<int64_t>(rows.shape(0)), col, num_cols, out.data());
        },
        "blocks"_a, "shift"_a, "width"_a, "rows"_a, "col"_a, "out"_a.noconvert());

  m.def("scatter",
        [](Array<const uint64_t, nb::ndim<1>> blocks, int shift, int64_t width, Keys rows,
           int64_t col, Array<const float, nb::ndim<2>> src) {
          check_same_length("src", src.shape(0), rows.shape(0));
          const int64_t num_cols = static_cast<int64_t>(src.shape(1));
          if (col < 0 || num_cols > width || col > width - num_cols) throw std::invalid_argument("columns outside the row");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::scatter(store, rows.data(), static_cast<int64_t>(rows.shape(0)), col, num_cols, src.data());
        },
        "blocks"_a, "shift"_a, "width"_a, "rows"_a, "col"_a, "src"_a);

  m.def("dedupe_sum",
        [](Keys keys, nb::object grads_obj, nb::object weights_obj, Rows unique_keys,
           Array<float, nb::ndim<2>> sums, Rows counts) -> int64_t {
          const size_t n = keys.shape(0);
          const int64_t dim = static_cast<int64_t>(sums.shape(1));
          const float* grads = nullptr;
          const int64_t* weights = nullptr;
          Array<const float, nb::ndim<2>> grads_arr;
          Array<const int64_t, nb::ndim<1>> weights_arr;
          if (!grads_obj.is_none()) {
            grads_arr = nb::cast<Array<const float, nb::ndim<2>>>(grads_obj);
            check_same_length("grads", grads_arr.shape(0), n);
            if (static_cast<int64_t>(grads_arr.shape(1)) != dim) throw std::invalid_argument("grads and sums differ in dim");
            grads = grads_arr.data();
          }
          if (!weights_obj.is_none()) {
            weights_arr = nb::cast<Array<const int64_t, nb::ndim<1>>>(weights_obj);
            check_same_length("weights", weights_arr.shape(0), n);
            weights = weights_arr.data();
          }
          check_same_length("unique_keys", unique_keys.shape(0), n);
          check_same_length("sums", sums.shape(0), n);
          check_same_length("counts", counts.shape(0), n);
          nb::gil_scoped_release release;
          return embps::dedupe_sum(keys.data(), grads, weights, static_cast<int64_t>(n), dim,
                                   unique_keys.data(), sums.data(), counts.data());
        },
        "keys"_a, "grads"_a.none(), "weights"_a.none(), "unique_keys"_a.noconvert(), "sums"_a.noconvert(), "counts"_a.noconvert());

  m.def("apply_update",
        [](embps::Optimizer optimizer, Array<const double, nb::ndim<1>> hyper, Array<const uint64_t, nb::ndim<1>> blocks,
           int shift, int64_t width, int64_t dim, int64_t state_width, Keys rows,
           Array<const float, nb::ndim<2>> grads, Keys counts, uint32_t step) {
          if (hyper.shape(0) < 4) throw std::invalid_argument("hyper-parameters: expected 4 values");
          if (dim + state_width + 2 != width) throw std::invalid_argument("width != dim + state_width + 2");
          check_state_width(optimizer, dim, state_width);
          check_same_length("grads", grads.shape(0), rows.shape(0));
          check_same_length("counts", counts.shape(0), rows.shape(0));
          if (static_cast<int64_t>(grads.shape(1)) != dim) throw std::invalid_argument("grads: wrong dim");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::apply_update(optimizer, hyper.data(), store, dim,
                              state_width, rows.data(), grads.data(), counts.data(),
                              static_cast<int64_t>(rows.shape(0)), step);
        },
        "optimizer"_a.noconvert(), "hyper"_a, "blocks"_a, "shift"_a, "width"_a, "dim"_a, "state_width"_a,
        "rows"_a, "grads"_a, "counts"_a, "step"_a);

  bind_codec(m);
  embps::bind_string_hash(m);  // categorical strings -> keys (csrc/string_hash.h)

  // Multi-table verbs (csrc/multi_table.h): one call, the GIL released once, for every table.
  m.def("lookup_multi",
        [](nb::list maps, nb::list blocks, Array<const int64_t, nb::ndim<2>> params,
           Array<const double, nb::ndim<2>> reals, Array<const uint64_t, nb::ndim<1>> seeds, Keys keys, Keys offsets,
           Array<float, nb::ndim<1>> out) {
          auto tables = make_tables(maps, blocks, params, reals);
          check_same_length("seeds", seeds.shape(0), tables.size());
          for (size_t i = 0; i < tables.size(); ++i) tables[i].seed = seeds.data()[i];
          const int64_t total = total_values(tables, offsets.data(), offsets.shape(0), keys.shape(0));
          check_same_length("out", out.shape(0), static_cast<size_t>(total));
          nb::gil_scoped_release release;
          embps::lookup_multi(tables, keys.data(), offsets.data(), out.data());
        },
        "maps"_a, "blocks"_a, "params"_a, "reals"_a, "seeds"_a, "keys"_a, "offsets"_a, "out"_a.noconvert());

  // The same into a new bytes object, with no copy after the gather: a whole serialised reply,
  // `header` (its other fields, serialised) and then the values as its length-delimited field
  // `field` (protobuf reads a concatenation of fields as one message).
  m.def("lookup_multi_reply",
        [](nb::list maps, nb::list blocks, Array<const int64_t, nb::ndim<2>> params,
           Array<const double, nb::ndim<2>> reals, Array<const uint64_t, nb::ndim<1>> seeds, Keys keys,
           Keys offsets, nb::bytes header, uint32_t field) -> nb::object {
          if (field == 0 || field >= (1u << 29)) throw nb::value_error("field: must be in [1, 2**29)");
          auto tables = make_tables(maps, blocks, params, reals);
          check_same_length("seeds", seeds.shape(0), tables.size());
          for (size_t i = 0; i < tables.size(); ++i) tables[i].seed = seeds.data()[i];
          const int64_t total = total_values(tables, offsets.data(), offsets.shape(0), keys.shape(0));
          const uint64_t value_bytes = static_cast<uint64_t>(total) * sizeof(float);
          std::string prefix(header.c_str(), header.size());
          append_varint(prefix, uint64_t{field} << 3 | 2u);  // tag: length-delimited
          // The length takes 0-3 bytes more than it needs, so that the values start 4-aligned.
          const size_t needed = varint_size(value_bytes);
          append_varint(prefix, value_bytes, needed + (4 - (prefix.size() + needed) % 4) % 4);
          PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(prefix.size() + value_bytes));
          if (raw == nullptr) throw nb::python_error();
          nb::object out = nb::steal(raw);
          char* start = PyBytes_AS_STRING(raw);
          std::memcpy(start, prefix.data(), prefix.size());
          float* dst = reinterpret_cast<float*>(start + prefix.size());  // a bytes object's data is 16-aligned
          {
            nb::gil_scoped_release release;
            embps::lookup_multi(tables, keys.data(), offsets.data(), dst);
          }
          return out;
        },
        "maps"_a, "blocks"_a, "params"_a, "reals"_a, "seeds"_a, "keys"_a, "offsets"_a, "header"_a, "field"_a);

  m.def("push_multi",
        [](nb::list maps, nb::list blocks, Array<const int64_t, nb::ndim<2>> params,
           Array<const double, nb::ndim<2>> reals, Array<const uint64_t, nb::ndim<1>> seeds, Keys keys, Keys offsets,
           Array<const float, nb::ndim<1>> grads, nb::object counts_obj, Array<const uint32_t, nb::ndim<1>> steps,
           Rows updated_keys, Rows num_updated, Rows num_inserted) {
          auto tables = make_tables(maps, blocks, params, reals);
          const size_t t = tables.size();
          check_same_length("seeds", seeds.shape(0), t);
          for (size_t i = 0; i < t; ++i) tables[i].seed = seeds.data()[i];
          const int64_t total = total_values(tables, offsets.data(), offsets.shape(0), keys.shape(0));
          check_same_length("grads", grads.shape(0), static_cast<size_t>(total));
          check_same_length("steps", steps.shape(0), t);
          check_same_length("updated_keys", updated_keys.shape(0), keys.shape(0));
          check_same_length("num_updated", num_updated.shape(0), t);
          check_same_length("num_inserted", num_inserted.shape(0), t);
          const int64_t* counts = nullptr;
          Array<const int64_t, nb::ndim<1>> counts_arr;
          if (!counts_obj.is_none()) {
            counts_arr = nb::cast<Array<const int64_t, nb::ndim<1>>>(counts_obj);
            check_same_length("counts", counts_arr.shape(0), keys.shape(0));
            counts = counts_arr.data();
          }
          nb::gil_scoped_release release;
          embps::push_multi(tables, keys.data(), offsets.data(), grads.data(), counts, steps.data(),
                            updated_keys.data(), num_updated.data(), num_inserted.data());
        },
        "maps"_a, "blocks"_a, "params"_a, "reals"_a, "seeds"_a, "keys"_a, "offsets"_a, "grads"_a, "counts"_a.none(),
        "steps"_a, "updated_keys"_a.noconvert(), "num_updated"_a.noconvert(), "num_inserted"_a.noconvert());

  m.def("unique_by_table",
        [](Array<const int64_t, nb::ndim<2>> keys, Keys group, int64_t num_groups, Rows unique, Rows offsets,
           Array<int64_t, nb::ndim<2>> inverse, Rows counts) -> int64_t {
          const size_t b = keys.shape(0), f = keys.shape(1);
          check_same_length("group", group.shape(0), f);
          check_same_length("unique", unique.shape(0), b * f);
          check_same_length("counts", counts.shape(0), b * f);
          check_same_length("offsets", offsets.shape(0), static_cast<size_t>(num_groups) + 1);
          if (inverse.shape(0) != b || inverse.shape(1) != f) throw std::invalid_argument("inverse: expected (b, f)");
          nb::gil_scoped_release release;
          return embps::unique_by_table(keys.data(), static_cast<int64_t>(b), static_cast<int64_t>(f), group.data(),
                                        num_groups, unique.data(), offsets.data(), inverse.data(), counts.data());
        },
        "keys"_a, "group"_a, "num_groups"_a, "unique"_a.noconvert(), "offsets"_a.noconvert(), "inverse"_a.noconvert(), "counts"_a.noconvert());

  // A client's many-table request (csrc/multi_table.h): one dedupe for every table.
  m.def("unique_by_segment",
        [](Keys keys, Keys offsets, Rows unique, Rows unique_offsets, Rows inverse) -> int64_t {
          if (offsets.shape(0) == 0) throw std::invalid_argument("offsets: expected (g + 1,), got an empty array");
          const int64_t g = static_cast<int64_t>(offsets.shape(0)) - 1;
          if (offsets.data()[0] != 0 || offsets.data()[g] != static_cast<int64_t>(keys.shape(0))) {
            throw std::invalid_argument("offsets: must run from 0 to the number of keys");
          }
          for (int64_t t = 0; t < g; ++t) {  // before any key is read: every segment inside the keys
            if (offsets.data()[t + 1] < offsets.data()[t]) throw std::invalid_argument("offsets: must not decrease");
          }
          check_same_length("unique", unique.shape(0), keys.shape(0));
          check_same_length("inverse", inverse.shape(0), keys.shape(0));
          check_same_length("unique_offsets", unique_offsets.shape(0), offsets.shape(0));
          nb::gil_scoped_release release;
          return embps::unique_by_segment(keys.data(), offsets.data(), g, unique.data(), unique_offsets.data(),
                                          inverse.data());
        },
        "keys"_a, "offsets"_a, "unique"_a.noconvert(), "unique_offsets"_a.noconvert(), "inverse"_a.noconvert());

  m.def("sum_by_table_key",
        [](Keys keys, Keys tags, Strided<const float, nb::ndim<2>> rows, nb::object counts_obj, int64_t num_groups,
           Rows unique, Array<float, nb::ndim<2>> sums, nb::object count_sums_obj, Rows offsets) -> int64_t {
          const size_t m = keys.shape(0), w = rows.shape(1);
          check_same_length("tags", tags.shape(0), m);
          check_same_length("rows", rows.shape(0), m);
          if (m > 0 && w > 1 && rows.stride(1) != 1) {
            throw std::invalid_argument("rows: each row's values must be contiguous");
          }
          check_same_length("unique", unique.shape(0), m);
          check_same_length("sums", sums.shape(0), m);
          if (sums.shape(1) != w) throw std::invalid_argument("sums: expected the width of rows");
          check_same_length("offsets", offsets.shape(0), static_cast<size_t>(num_groups) + 1);
          if (counts_obj.is_none() != count_sums_obj.is_none()) {
            throw std::invalid_argument("counts and count_sums: both or neither");
          }
          const float* counts = nullptr;
          int64_t count_stride = 0;
          float* count_sums = nullptr;
          Strided<const float, nb::ndim<1>> counts_arr;
          Array<float, nb::ndim<1>> count_sums_arr;
          if (!counts_obj.is_none()) {
            counts_arr = nb::cast<Strided<const float, nb::ndim<1>>>(counts_obj);
            count_sums_arr = nb::cast<Array<float, nb::ndim<1>>>(count_sums_obj);
            check_same_length("counts", counts_arr.shape(0), m);
            check_same_length("count_sums", count_sums_arr.shape(0), m);
            counts = counts_arr.data();
            count_stride = counts_arr.stride(0);
            count_sums = count_sums_arr.data();
          }
          nb::gil_scoped_release release;
          return embps::sum_by_table_key(keys.data(), tags.data(), rows.data(), rows.stride(0), counts, count_stride,
                                         static_cast<int64_t>(m), static_cast<int64_t>(w), num_groups, unique.data(),
                                         sums.data(), count_sums, offsets.data());
        },
        "keys"_a, "tags"_a, "rows"_a, "counts"_a.none(), "num_groups"_a, "unique"_a.noconvert(), "sums"_a.noconvert(), "count_sums"_a.none(),
        "offsets"_a.noconvert());
}
