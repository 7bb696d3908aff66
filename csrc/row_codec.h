// Low-precision row values: float16 and row-wise int8 storage, decoded to float32 to be read and
// trained, encoded back with deterministic stochastic rounding.
//
// A row's value part (the first value_words(storage, dim) words of the row, see row_ops.h) is
//   float32  dim float32 words
//   float16  dim IEEE binary16 values, two per word (little-endian), padded to a whole word
//   int8     [ scale float32 | bias float32 | dim uint8 codes, padded to a whole word ]
//            value_k = float(code_k) * scale + bias   (float32 multiply, then float32 add)
//            encode: bias = min(w), scale = (max(w) - min(w)) / 255 (fbgemm's row-wise layout;
//            fbgemm keeps scale and bias after the codes, we keep them first)
// so at dim 64 a value takes 32 words (float16) or 18 words (int8) instead of 64.
//
// Stochastic rounding draws its random bits from a pure function of (seed, key, stream, element):
//   seed_mix = mix64(seed ^ kRoundingSalt)
//   base     = mix64(mix64(key ^ seed_mix) + stream * golden)
//   bits_j   = mix64(base + (j + 1) * golden)
// stream = the push's step for an update, 2^32 + step for a new row's initial value, so a run
// rounds the same on any number of shards and workers, and on resume.
//   float16  b = the float32 bits of x; b += bits_j & 0x1FFF unless x is inf/nan; then b is
//            converted to binary16 rounding toward zero (fbgemm's scheme; exact for subnormals
//            only in expectation of the normal range, which embedding values live in).
//   int8     t = (x - bias) * inv, inv = 1 / scale (0 when scale is 0); u = (bits_j >> 40) / 2^24;
//            code = clamp(floor(t + u), 0, 255), all float32.
// tests/ps/reference_codec.py writes all of this again in numpy; the tests compare bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "row_ops.h"

namespace embps {

enum class Storage : int { kFloat32 = 0, kFloat16 = 1, kInt8 = 2 };

constexpr uint64_t kRoundingSalt = 0x53524F554E44ULL;  // "SROUND": separates rounding from init

inline int64_t value_words(Storage storage, int64_t dim) {
  switch (storage) {
    case Storage::kFloat16: return (dim + 1) / 2;
    case Storage::kInt8: return 2 + (dim + 3) / 4;
    default: return dim;
  }
}

inline uint64_t rounding_seed(uint64_t seed) { return mix64(seed ^ kRoundingSalt); }

inline uint64_t rounding_base(uint64_t seed_mix, int64_t key, uint64_t stream) {
  return mix64(mix64(static_cast<uint64_t>(key) ^ seed_mix) + stream * kGolden);
}

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// float32 bits -> binary16 bits, rounding toward zero; beyond the largest half: the largest half.
inline uint16_t half_toward_zero(uint32_t b) {
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t e = (b >> 23) & 0xFFu;
  const uint32_t m = b & 0x7FFFFFu;
  if (e == 0xFFu) return static_cast<uint16_t>(sign | 0x7C00u | (m ? 0x200u : 0u));
  if (e > 142) return static_cast<uint16_t>(sign | 0x7BFFu);
  if (e >= 113) return static_cast<uint16_t>(sign | ((e - 112) << 10) | (m >> 13));
  if (e < 102) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | ((0x800000u | m) >> (126 - e)));
}

// binary16 bits -> float32, exact (subnormals through a power-of-two multiply).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  if (em >= 0x7C00u) return bits_float(sign | 0x7F800000u | ((em & 0x3FFu) << 13));
  const float magnitude = bits_float(em << 13) * 0x1p112f;
  return bits_float(sign | float_bits(magnitude));
}

// Decodes the value words at `src` into dim float32 at `out`.
inline void decode_value(Storage storage, const float* src, int64_t dim, float* out) {
  if (storage == Storage::kFloat16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
    for (int64_t k = 0; k < dim; ++k) out[k] = half_to_float(h[k]);
  } else if (storage == Storage::kInt8) {
    const float scale = src[0], bias = src[1];
    const uint8_t* q = reinterpret_cast<const uint8_t*>(src + 2);
    for (int64_t k = 0; k < dim; ++k) out[k] = static_cast<float>(q[k]) * scale + bias;
  } else {
    std::memcpy(out, src, sizeof(float) * dim);
  }
}

// Encodes dim float32 at `w` into the value words at `dst`, rounding with the bits of `base`.
inline void encode_value(Storage storage, const float* w, int64_t dim, uint64_t base, float* dst) {
  if (storage == Storage::kFloat16) {
    uint16_t* h = reinterpret_cast<uint16_t*>(dst);
    for (int64_t k = 0; k < dim; ++k) {
      uint32_t b = float_bits(w[k]);
      if (((b >> 23) & 0xFFu) != 0xFFu) {
        b += static_cast<uint32_t>(mix64(base + static_cast<uint64_t>(k + 1) * kGolden) & 0x1FFFu);
      }
      h[k] = half_toward_zero(b);
    }
    if (dim & 1) h[dim] = 0;
  } else if (storage == Storage::kInt8) {
    float lo = w[0], hi = w[0];
    for (int64_t k = 1; k < dim; ++k) {
      lo = w[k] < lo ? w[k] : lo;
      hi = w[k] > hi ? w[k] : hi;
    }
    const float scale = (hi - lo) / 255.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    dst[0] = scale;
    dst[1] = lo;
    uint8_t* q = reinterpret_cast<uint8_t*>(dst + 2);
    constexpr float kInv24 = 1.0f / 16777216.0f;
    for (int64_t k = 0; k < dim; ++k) {
      const uint64_t bits = mix64(base + static_cast<uint64_t>(k + 1) * kGolden);
      const float u = static_cast<float>(bits >> 40) * kInv24;
      const float t = (w[k] - lo) * inv;
      const float v = std::floor(t + u);
      q[k] = static_cast<uint8_t>(v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v));
    }
    for (int64_t k = dim; k < (dim + 3) / 4 * 4; ++k) q[k] = 0;
  } else {
    std::memcpy(dst, w, sizeof(float) * dim);
  }
}

// out[i, :] = decoded value of rows[i]; rows[i] < 0 leaves out[i] untouched.
inline void gather_decode(const BlockStore& store, Storage storage, int64_t dim, const int64_t* rows,
                          int64_t n, float* out) {
  const int64_t words = value_words(storage, dim);
  constexpr int64_t kAhead = 8;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n && rows[i + kAhead] >= 0) prefetch_words(store.row(rows[i + kAhead]), words, 0);
    if (rows[i] < 0) continue;
    decode_value(storage, store.row(rows[i]), dim, out + i * dim);
  }
}

// Value words of rows[i] = encode(src[i, :]) with stream `stream`; rows[i] < 0 is skipped.
inline void encode_scatter(const BlockStore& store, Storage storage, int64_t dim, uint64_t seed,
                           const int64_t* keys, const int64_t* rows, int64_t n, const float* src,
                           uint64_t stream) {
  const uint64_t seed_mix = rounding_seed(seed);
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0) continue;
    encode_value(storage, src + i * dim, dim, rounding_base(seed_mix, keys[i], stream), store.row(rows[i]));
  }
}

// apply_update for a float16 or int8 value: decode, the same float32 optimizer step (its state
// float32 words follow the value words), encode with stochastic rounding of stream `step`.
inline void apply_update_encoded(Optimizer opt, const double* hp, const BlockStore& store,
                                 Storage storage, int64_t dim, int64_t state_width, uint64_t seed,
                                 const int64_t* keys, const int64_t* rows, const float* grads,
                                 const int64_t* counts, int64_t u, uint32_t step) {
  const int64_t words = value_words(storage, dim);
  const int64_t meta = words + state_width;
  const uint64_t seed_mix = rounding_seed(seed);
  std::vector<float> w(static_cast<size_t>(dim));
  constexpr int64_t kAhead = 6;
  for (int64_t i = 0; i < u && i < kAhead; ++i) prefetch_words(store.row(rows[i]), meta + 2, 1);
  for (int64_t i = 0; i < u; ++i) {
    if (i + kAhead < u) prefetch_words(store.row(rows[i + kAhead]), meta + 2, 1);
    float* row = store.row(rows[i]);
    decode_value(storage, row, dim, w.data());
    optimizer_step(opt, hp, w.data(), row + words, grads + i * dim, dim);
    encode_value(storage, w.data(), dim, rounding_base(seed_mix, keys[i], step), row);
    update_meta(reinterpret_cast<uint32_t*>(row + meta), counts[i], step);
  }
}

}  // namespace embps
