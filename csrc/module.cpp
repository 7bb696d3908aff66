// Python binding of the native core: `_embps_native`. ps/native.py is its only importer.
// Arrays cross as numpy arrays; outputs are allocated by the caller; the GIL is released while
// the loops run. C++ exceptions become Python exceptions through nanobind's translators
// (std::invalid_argument -> ValueError, std::length_error / out_of_range -> ValueError/IndexError).
// Initializer and OptimizerKind cross as Python enums (nb::enum_); a plain int is a TypeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "flat_hash_map.h"
#include "hash_map.h"
#include "row_codec.h"
#include "row_ops.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T, typename... Extra>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;
using Keys = Array<const int64_t, nb::ndim<1>>;
using Rows = Array<int64_t, nb::ndim<1>>;

void check_same_length(const char* what, size_t got, size_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string(what) + ": expected length " + std::to_string(want) +
                                ", got " + std::to_string(got));
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
        "storage"_a.noconvert(), "words"_a, "out"_a);

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
        "storage"_a.noconvert(), "seed"_a, "keys"_a, "stream"_a, "values"_a, "words"_a);

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
        "blocks"_a, "shift"_a, "width"_a, "storage"_a.noconvert(), "rows"_a, "out"_a);

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

  m.def("apply_update_encoded",
        [](embps::Optimizer optimizer, Array<const double, nb::ndim<1>> hyper, Array<const uint64_t, nb::ndim<1>> blocks,
           int shift, int64_t width, embps::Storage storage, int64_t dim, int64_t state_width, uint64_t seed, Keys keys,
           Keys rows, Array<const float, nb::ndim<2>> grads, Keys counts, uint32_t step) {
          if (hyper.shape(0) < 4) throw std::invalid_argument("hyper-parameters: expected 4 values");
          if (dim <= 0) throw std::invalid_argument("dim must be > 0");
          if (embps::value_words(storage, dim) + state_width + 2 != width) {
            throw std::invalid_argument("width != value words + state_width + 2");
          }
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
           "keys"_a, "rows"_a)
      .def("find_or_insert",
           [](embps::HashMap& self, Keys keys, Rows rows, Array<uint8_t, nb::ndim<1>> inserted) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             check_same_length("inserted", inserted.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.find_or_insert(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data(),
                                 inserted.data());
           },
           "keys"_a, "rows"_a, "inserted"_a)
      .def("erase",
           [](embps::HashMap& self, Keys keys, Rows rows) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.erase(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data());
           },
           "keys"_a, "rows"_a)
      .def("export",
           [](const embps::HashMap& self, Rows keys, Rows rows) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.export_all(keys.data(), rows.data(), keys.shape(0));
           },
           "keys"_a, "rows"_a);

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
           "keys"_a, "rows"_a)
      .def("find_or_insert",
           [](embps::FlatHashMap& self, Keys keys, Rows rows, Array<uint8_t, nb::ndim<1>> inserted) {
             check_same_length("rows", rows.shape(0), keys.shape(0));
             check_same_length("inserted", inserted.shape(0), keys.shape(0));
             nb::gil_scoped_release release;
             self.find_or_insert(keys.data(), static_cast<int64_t>(keys.shape(0)), rows.data(),
                                 inserted.data());
           },
           "keys"_a, "rows"_a, "inserted"_a);

  m.def("mix64",
        [](Keys keys, Array<uint64_t, nb::ndim<1>> out) {
          check_same_length("out", out.shape(0), keys.shape(0));
          nb::gil_scoped_release release;
          for (size_t i = 0; i < keys.shape(0); ++i) out.data()[i] = embps::mix64(static_cast<uint64_t>(keys.data()[i]));
        },
        "keys"_a, "out"_a);

  m.def("init_values",
        [](uint64_t seed, embps::Init kind, double scale, Keys keys, Array<float, nb::ndim<2>> out) {
          check_same_length("out", out.shape(0), keys.shape(0));
          nb::gil_scoped_release release;
          embps::init_values(seed, kind, scale, keys.data(),
                             static_cast<int64_t>(keys.shape(0)), static_cast<int64_t>(out.shape(1)),
                             out.data(), static_cast<int64_t>(out.shape(1)));
        },
        "seed"_a, "kind"_a.noconvert(), "scale"_a, "keys"_a, "out"_a);

  m.def("gather",
        [](Array<const uint64_t, nb::ndim<1>> blocks, int shift, int64_t width, Keys rows,
           int64_t col, Array<float, nb::ndim<2>> out) {
          check_same_length("out", out.shape(0), rows.shape(0));
          const int64_t num_cols = static_cast<int64_t>(out.shape(1));
          if (col < 0 || col + num_cols > width) throw std::invalid_argument("columns outside the row");
          const embps::BlockStore store = make_store(blocks, shift, width);
          nb::gil_scoped_release release;
          embps::gather(store, rows.data(), static_cast<int64_t>(rows.shape(0)), col, num_cols, out.data());
        },
        "blocks"_a, "shift"_a, "width"_a, "rows"_a, "col"_a, "out"_a);

  m.def("scatter",
        [](Array<const uint64_t, nb::ndim<1>> blocks, int shift, int64_t width, Keys rows,
           int64_t col, Array<const float, nb::ndim<2>> src) {
          check_same_length("src", src.shape(0), rows.shape(0));
          const int64_t num_cols = static_cast<int64_t>(src.shape(1));
          if (col < 0 || col + num_cols > width) throw std::invalid_argument("columns outside the row");
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
        "keys"_a, "grads"_a.none(), "weights"_a.none(), "unique_keys"_a, "sums"_a, "counts"_a);

  m.def("apply_update",
        [](embps::Optimizer optimizer, Array<const double, nb::ndim<1>> hyper, Array<const uint64_t, nb::ndim<1>> blocks,
           int shift, int64_t width, int64_t dim, int64_t state_width, Keys rows,
           Array<const float, nb::ndim<2>> grads, Keys counts, uint32_t step) {
          if (hyper.shape(0) < 4) throw std::invalid_argument("hyper-parameters: expected 4 values");
          if (dim + state_width + 2 != width) throw std::invalid_argument("width != dim + state_width + 2");
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
}
