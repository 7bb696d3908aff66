// Binding of csrc/string_hash.h into `_embps_native`: `hash_string_columns`, the categorical
// columns of one record batch hashed in one call with the GIL released. ps/native.py wraps it
// (worker/features.py takes the buffers from pyarrow arrays without copying them).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "string_hash.h"

namespace embps {

namespace string_hash_detail {

namespace nb = nanobind;

using AnyArray = nb::ndarray<nb::ro, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Bytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// One column of a call, as raw pointers into the caller's arrays (alive for the call).
struct Column {
  int64_t feature = 0;
  bool large_offsets = false;  // int64 offsets, else int32
  const void* offsets = nullptr;
  int64_t num_strings = 0;
  const uint8_t* data = nullptr;
  int64_t data_size = 0;
  Validity string_validity;
  const void* indices = nullptr;  // null: a plain column of n strings
  int index_bytes = 0;            // 1, 2, 4 or 8 (signed)
  Validity index_validity;
  // The arrays the pointers point into, held for the call (nb::cast may have made a copy).
  AnyArray offsets_array, indices_array;
  Bytes data_array, validity_array, index_validity_array;
};

inline Validity validity_of(nb::handle bits, int64_t offset, int64_t n, const std::string& what, Bytes& keep) {
  if (bits.is_none()) return Validity{};
  keep = nb::cast<Bytes>(bits);
  const int64_t bits_held = static_cast<int64_t>(keep.shape(0)) * 8;
  if (offset < 0 || n < 0 || offset > bits_held || n > bits_held - offset) {
    throw std::invalid_argument(what + ": validity bitmap shorter than its rows");
  }
  return Validity{keep.data(), offset};
}

constexpr int64_t kRowBlock = 1024;  // rows of every column per pass: the out block stays in cache

// Checks a column's offsets; for a dictionary column, hashes the dictionary into `keys`.
template <typename Offset>
void prepare_column(const Column& c, const std::string& what, std::vector<int64_t>& keys) {
  const StringView<Offset> strings{static_cast<const Offset*>(c.offsets), c.data, c.data_size, c.num_strings,
                                   c.string_validity};
  check_offsets(strings, what);
  if (c.indices == nullptr) return;
  keys.resize(static_cast<size_t>(c.num_strings));
  hash_strings(strings, c.feature, 0, c.num_strings, keys.data(), 1);
}

// Keys of rows [begin, end) of a column into out (the block's first row, this column).
template <typename Offset>
void run_column(const Column& c, const std::vector<int64_t>& keys, int64_t begin, int64_t end, int64_t* out,
                int64_t stride) {
  if (c.indices == nullptr) {
    const StringView<Offset> strings{static_cast<const Offset*>(c.offsets), c.data, c.data_size, c.num_strings,
                                     c.string_validity};
    return hash_strings(strings, c.feature, begin, end, out, stride);
  }
  const int64_t missing = static_cast<int64_t>(mix64(kMissingValue ^ feature_salt(c.feature)));
  const int64_t m = c.num_strings;
  switch (c.index_bytes) {
    case 1:
      return gather_dictionary(keys.data(), m, missing, static_cast<const int8_t*>(c.indices), c.index_validity,
                               begin, end, out, stride);
    case 2:
      return gather_dictionary(keys.data(), m, missing, static_cast<const int16_t*>(c.indices), c.index_validity,
                               begin, end, out, stride);
    case 4:
      return gather_dictionary(keys.data(), m, missing, static_cast<const int32_t*>(c.indices), c.index_validity,
                               begin, end, out, stride);
    default:
      return gather_dictionary(keys.data(), m, missing, static_cast<const int64_t*>(c.indices), c.index_validity,
                               begin, end, out, stride);
  }
}

}  // namespace string_hash_detail

// columns: a list with one tuple per categorical column:
//   (feature, offsets, data, validity, validity_offset, indices, index_validity, index_validity_offset)
// offsets (k + 1,) int32 or int64 at the array's offset, data (bytes,) uint8, validity the strings'
// bitmap or None; indices None for a plain column (k = n), else (n,) int8/16/32/64 into the k
// dictionary strings, with their own bitmap. out (n, F) int64: column j fills out[:, j].
inline void bind_string_hash(nanobind::module_& m) {
  namespace nb = nanobind;
  using namespace nb::literals;
  using namespace string_hash_detail;
  m.def(
      "hash_string_columns",
      [](nb::list columns, nb::ndarray<int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> out) {
        const int64_t n = static_cast<int64_t>(out.shape(0));
        const int64_t stride = static_cast<int64_t>(out.shape(1));
        if (static_cast<int64_t>(nb::len(columns)) != stride) {
          throw std::invalid_argument("columns: expected one per column of out (" + std::to_string(stride) + "), got " +
                                      std::to_string(nb::len(columns)));
        }
        std::vector<Column> parsed(static_cast<size_t>(stride));
        for (int64_t j = 0; j < stride; ++j) {
          auto item = nb::cast<nb::tuple>(columns[static_cast<size_t>(j)]);
          const std::string what = "column " + std::to_string(j);
          if (nb::len(item) != 8) throw std::invalid_argument(what + ": expected a tuple of 8");
          Column& c = parsed[static_cast<size_t>(j)];
          c.feature = nb::cast<int64_t>(item[0]);
          if (c.feature < 0) throw std::invalid_argument(what + ": feature must be >= 0");
          c.offsets_array = nb::cast<AnyArray>(item[1]);
          const AnyArray& offsets = c.offsets_array;
          if (offsets.dtype() == nb::dtype<int64_t>()) {
            c.large_offsets = true;
          } else if (offsets.dtype() != nb::dtype<int32_t>()) {
            throw std::invalid_argument(what + ": offsets must be int32 or int64");
          }
          if (offsets.shape(0) < 1) throw std::invalid_argument(what + ": offsets must have k + 1 entries");
          c.offsets = offsets.data();
          c.num_strings = static_cast<int64_t>(offsets.shape(0)) - 1;
          c.data_array = nb::cast<Bytes>(item[2]);
          c.data = c.data_array.data();
          c.data_size = static_cast<int64_t>(c.data_array.shape(0));
          c.string_validity = validity_of(item[3], nb::cast<int64_t>(item[4]), c.num_strings, what, c.validity_array);
          if (item[5].is_none()) {
            if (c.num_strings != n) throw std::invalid_argument(what + ": a plain column needs one string per row");
          } else {
            c.indices_array = nb::cast<AnyArray>(item[5]);
            const AnyArray& indices = c.indices_array;
            const auto kind = indices.dtype();
            if (kind.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Int) ||
                (kind.bits != 8 && kind.bits != 16 && kind.bits != 32 && kind.bits != 64)) {
              throw std::invalid_argument(what + ": dictionary indices must be signed integers");
            }
            if (static_cast<int64_t>(indices.shape(0)) != n) {
              throw std::invalid_argument(what + ": dictionary indices need one per row");
            }
            c.indices = indices.data();
            c.index_bytes = kind.bits / 8;
            c.index_validity = validity_of(item[6], nb::cast<int64_t>(item[7]), n, what, c.index_validity_array);
          }
        }
        int64_t* dst = out.data();
        nb::gil_scoped_release release;
        std::vector<std::vector<int64_t>> dictionary_keys(static_cast<size_t>(stride));
        for (int64_t j = 0; j < stride; ++j) {
          const Column& c = parsed[static_cast<size_t>(j)];
          const std::string what = "column " + std::to_string(j);
          if (c.large_offsets) {
            prepare_column<int64_t>(c, what, dictionary_keys[static_cast<size_t>(j)]);
          } else {
            prepare_column<int32_t>(c, what, dictionary_keys[static_cast<size_t>(j)]);
          }
        }
        for (int64_t begin = 0; begin < n; begin += kRowBlock) {
          const int64_t end = std::min(n, begin + kRowBlock);
          for (int64_t j = 0; j < stride; ++j) {
            const Column& c = parsed[static_cast<size_t>(j)];
            int64_t* block = dst + begin * stride + j;
            if (c.large_offsets) {
              run_column<int64_t>(c, dictionary_keys[static_cast<size_t>(j)], begin, end, block, stride);
            } else {
              run_column<int32_t>(c, dictionary_keys[static_cast<size_t>(j)], begin, end, block, stride);
            }
          }
        }
      },
      "columns"_a, "out"_a.noconvert());
}

}  // namespace embps
