// Low-precision row values: float16 and row-wise int8 storage, decoded to float32 to be read and
// trained, encoded back with deterministic stochastic rounding.
//
// A row's value part (the first value_words(storage, dim) words of the row, see row_ops.h) is
//   float32  dim float32 words
//   float16  dim IEEE binary16 values, two per word (little-endian), padded to a whole word
//   int8     [ scale float32 | bias float32 | dim uint8 codes, padded to a whole word ]
//            value_k = float(code_k) * scale + bias   (float32 multiply, then float32 add)
//            encode: bias = min(w), scale = (max(w) - min(w)) / 255, at most float32's largest
//            value / 256 (int8_scale) (fbgemm's row-wise layout;
//            fbgemm keeps scale and bias after the codes, we keep them first)
// so at dim 64 a value takes 32 words (float16) or 18 words (int8) instead of 64.
//
// Stochastic rounding draws 16 random bits per element from a pure function of
// (seed, key, stream, element):
//   seed_mix = mix64(seed ^ kRoundingSalt)
//   base     = mix64(mix64(key ^ seed_mix) + stream * golden)
//   r_j      = (mix64(base + (j / 4 + 1) * golden) >> (16 * (j % 4))) & 0xFFFF
// stream = the push's step for an update, 2^32 + step for a new row's initial value, so a run
// rounds the same on any number of shards and workers, and on resume.
//   float16  b = the float32 bits of x; b += r_j >> 3 (13 bits) unless x is inf/nan; then b is
//            converted to binary16 rounding toward zero (fbgemm's scheme: unbiased for normal
//            halves; below 2^-14, where halves are subnormal, it rounds toward zero mostly).
//   int8     t = (x - bias) * inv, inv = 1 / scale (0 when scale is 0); u = r_j / 2^16;
//            code = min(255, trunc(t + u)) (t + u >= 0), all float32.
// tests/ps/reference_codec.py writes all of this again in numpy; the tests compare bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

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
// Written as selects, without branches, so that the encode loop vectorizes. Below 2^-14 the half
// is subnormal: its count of 2^-24 units is trunc(|x| * 2^24), an exact float32 scaling.
inline uint32_t select_bits(bool condition, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (a & mask) | (b & ~mask);
}

inline uint16_t half_toward_zero(uint32_t b) {
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t e = (b >> 23) & 0xFFu;
  const uint32_t m = b & 0x7FFFFFu;
  const uint32_t special = 0x7C00u | select_bits(m != 0, 0x200u | (m >> 13), 0u);  // nan stays quiet
  const uint32_t normal = ((e - 112u) << 10) | (m >> 13);
  const uint32_t abs_bits = b & 0x7FFFFFFFu;
  const uint32_t small = select_bits(abs_bits < 0x38800000u, abs_bits, 0x38800000u);  // <= 2^-14
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(bits_float(small) * 0x1p24f));
  uint32_t magnitude = select_bits(e >= 113u, normal, sub);
  magnitude = select_bits(e > 142u, 0x7BFFu, magnitude);
  magnitude = select_bits(e == 0xFFu, special, magnitude);
  return static_cast<uint16_t>(sign | magnitude);
}

// binary16 bits -> float32, exact (subnormals through a power-of-two multiply), branch free.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t finite = float_bits(bits_float(em << 13) * 0x1p112f);
  const uint32_t mant = em & 0x3FFu;
  const uint32_t special = 0x7F800000u | (mant << 13) | select_bits(mant != 0, 0x400000u, 0u);  // quiet nan
  return bits_float(sign | select_bits(em >= 0x7C00u, special, finite));
}

// min and max of w[0, dim); both NaN when any value is NaN (the row then decodes as NaN: SSE min/max
// dropped a NaN, and the finite extreme beside it in its lane, and the row came back finite and
// wrong). On x86 with SSE min/max, whose result is exactly `a < b ? a : b` per lane, four lanes at a
// time in four independent accumulators, so the comparisons of one row wait on each other 4 times
// instead of 16 at dim 64 (min and max of finite values do not depend on the order); the scalar
// form compiles to branches that mispredict on every new extreme.
inline void row_min_max(const float* w, int64_t dim, float* lo_out, float* hi_out) {
  float lo = w[0], hi = w[0];
  bool nan = false;
  int64_t k = 0;
#if defined(__SSE2__)
  if (dim >= 4) {
    __m128 vlo = _mm_loadu_ps(w), vhi = vlo;
    __m128 vnan = _mm_cmpunord_ps(vlo, vlo);
    if (dim >= 16) {
      __m128 lo1 = _mm_loadu_ps(w + 4), lo2 = _mm_loadu_ps(w + 8), lo3 = _mm_loadu_ps(w + 12);
      __m128 hi1 = lo1, hi2 = lo2, hi3 = lo3;
      __m128 nan1 = _mm_cmpunord_ps(lo1, lo2);
      vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(lo3, lo3));
      for (k = 16; k + 16 <= dim; k += 16) {
        const __m128 v0 = _mm_loadu_ps(w + k), v1 = _mm_loadu_ps(w + k + 4);
        const __m128 v2 = _mm_loadu_ps(w + k + 8), v3 = _mm_loadu_ps(w + k + 12);
        vlo = _mm_min_ps(v0, vlo);
        vhi = _mm_max_ps(v0, vhi);
        lo1 = _mm_min_ps(v1, lo1);
        hi1 = _mm_max_ps(v1, hi1);
        lo2 = _mm_min_ps(v2, lo2);
        hi2 = _mm_max_ps(v2, hi2);
        lo3 = _mm_min_ps(v3, lo3);
        hi3 = _mm_max_ps(v3, hi3);
        vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(v0, v1));
        nan1 = _mm_or_ps(nan1, _mm_cmpunord_ps(v2, v3));
      }
      vnan = _mm_or_ps(vnan, nan1);
      vlo = _mm_min_ps(_mm_min_ps(lo1, vlo), _mm_min_ps(lo3, lo2));
      vhi = _mm_max_ps(_mm_max_ps(hi1, vhi), _mm_max_ps(hi3, hi2));
    } else {
      k = 4;
    }
    for (; k + 4 <= dim; k += 4) {
      const __m128 v = _mm_loadu_ps(w + k);
      vlo = _mm_min_ps(v, vlo);
      vhi = _mm_max_ps(v, vhi);
      vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(v, v));
    }
    float l[4], h[4];
    _mm_storeu_ps(l, vlo);
    _mm_storeu_ps(h, vhi);
    lo = l[0];
    hi = h[0];
    for (int j = 1; j < 4; ++j) {
      lo = l[j] < lo ? l[j] : lo;
      hi = h[j] > hi ? h[j] : hi;
    }
    nan = _mm_movemask_ps(vnan) != 0;
  }
#endif
  for (; k < dim; ++k) {
    lo = w[k] < lo ? w[k] : lo;
    hi = w[k] > hi ? w[k] : hi;
    nan |= w[k] != w[k];
  }
  nan |= lo != lo || hi != hi;  // w[0] NaN on the scalar path
  if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
  *lo_out = lo;
  *hi_out = hi;
}

// The 16-bit rounding draws r_j of elements [0, dim) (rounded up to 4) for `base`: draw j is
// bits [16 (j % 4), +16) of hash j / 4, which is that hash's little-endian memory layout.
// Scalar: SSE2 has no 64-bit multiply, and its emulation is slower than the scalar loop (the
// AVX2 and AVX-512 tiers of the update below have vector forms).
__attribute__((optimize("no-tree-vectorize"))) inline void rounding_draws(uint64_t base, int64_t dim,
                                                                          uint16_t* r) {
  for (int64_t g = 0; g < (dim + 3) / 4; ++g) {
    uint64_t bits = mix64(base + static_cast<uint64_t>(g + 1) * kGolden);
    for (int k = 0; k < 4; ++k, bits >>= 16) r[4 * g + k] = static_cast<uint16_t>(bits);
  }
}

// The float16 loops of the build's baseline; on x86 with F16C (below) the hardware converts.
__attribute__((always_inline)) inline void decode_half_loop(const uint16_t* h, int64_t dim, float* out) {
  for (int64_t k = 0; k < dim; ++k) out[k] = half_to_float(h[k]);
}

// The rounding draw is added below the largest half (65504) only: at or above it every value
// saturates to it anyway, and an add to a float within 2^-10 of FLT_MAX carried into the
// exponent of inf and nan, so a finite value was stored as nan (inf and nan take no add either).
constexpr uint32_t kHalfMaxBits = 0x477FE000u;

__attribute__((always_inline)) inline void encode_half_loop(const float* w, const uint16_t* r, int64_t dim,
                                                            uint16_t* h) {
  for (int64_t k = 0; k < dim; ++k) {
    const uint32_t b = float_bits(w[k]);
    const uint32_t add = select_bits((b & 0x7FFFFFFFu) < kHalfMaxBits, static_cast<uint32_t>(r[k] >> 3), 0u);
    h[k] = half_toward_zero(b + add);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// F16C converts 8 values an instruction, with the rounding of the formats above: exact half ->
// float (nan made quiet), float -> half toward zero (beyond the largest half: the largest half).
__attribute__((target("avx2,f16c"))) inline void decode_half_f16c(const uint16_t* h, int64_t dim, float* out) {
  int64_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + k))));
  }
  decode_half_loop(h + k, dim - k, out + k);
}

__attribute__((target("avx2,f16c"))) inline void encode_half_f16c(const float* w, const uint16_t* r, int64_t dim,
                                                                  uint16_t* h) {
  int64_t k = 0;
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i half_max = _mm256_set1_epi32(static_cast<int32_t>(kHalfMaxBits));
  for (; k + 8 <= dim; k += 8) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    __m256i add = _mm256_srli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k))), 3);
    const __m256i below = _mm256_cmpgt_epi32(half_max, _mm256_and_si256(b, abs_mask));  // both < 2^31: signed
    b = _mm256_add_epi32(b, _mm256_and_si256(below, add));
    const __m128i halves = _mm256_cvtps_ph(_mm256_castsi256_ps(b), _MM_FROUND_TO_ZERO);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + k), halves);
  }
  encode_half_loop(w + k, r + k, dim - k, h + k);
}

inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

// The int8 loops, compiled for the baseline and, on x86, also for AVX2 (the same float32 and
// integer operations, so the same bits; AVX2 only packs and converts wider).
__attribute__((always_inline)) inline void decode_codes_loop(const uint8_t* q, float scale, float bias, int64_t dim,
                                                             float* out) {
  for (int64_t k = 0; k < dim; ++k) out[k] = static_cast<float>(q[k]) * scale + bias;
}

__attribute__((always_inline)) inline void encode_codes_loop(const float* w, const uint16_t* r, float lo, float inv,
                                                             int64_t dim, uint8_t* q) {
  constexpr float kInv16 = 1.0f / 65536.0f;
  for (int64_t k = 0; k < dim; ++k) {
    const float v = (w[k] - lo) * inv + static_cast<float>(r[k]) * kInv16;
    const uint32_t code = static_cast<uint32_t>(static_cast<int32_t>(v));
    q[k] = static_cast<uint8_t>(select_bits(code > 255u, 255u, code));
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) inline void decode_codes_avx2(const uint8_t* q, float scale, float bias, int64_t dim,
                                                              float* out) {
  decode_codes_loop(q, scale, bias, dim, out);
}

// encode_codes_loop, 8 at a time: the same float32 operations in the same order, truncation
// (cvtt) and the unsigned min with 255.
__attribute__((target("avx2"))) inline void encode_codes_avx2(const float* w, const uint16_t* r, float lo, float inv,
                                                              int64_t dim, uint8_t* q) {
  const __m256 vlo = _mm256_set1_ps(lo), vinv = _mm256_set1_ps(inv), vunit = _mm256_set1_ps(1.0f / 65536.0f);
  const __m256i top = _mm256_set1_epi32(255);
  int64_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(w + k), vlo), vinv);
    const __m256i draws = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k)));
    const __m256 v = _mm256_add_ps(t, _mm256_mul_ps(_mm256_cvtepi32_ps(draws), vunit));
    const __m256i code = _mm256_min_epu32(_mm256_cvttps_epi32(v), top);
    const __m128i words16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packus_epi16(words16, words16));
  }
  encode_codes_loop(w + k, r + k, lo, inv, dim - k, q + k);
}
#endif

inline void decode_codes(const uint8_t* q, float scale, float bias, int64_t dim, float* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_f16c()) return decode_codes_avx2(q, scale, bias, dim, out);
#endif
  decode_codes_loop(q, scale, bias, dim, out);
}

inline void encode_codes(const float* w, const uint16_t* r, float lo, float inv, int64_t dim, uint8_t* q) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_f16c()) return encode_codes_avx2(w, r, lo, inv, dim, q);
#endif
  encode_codes_loop(w, r, lo, inv, dim, q);
}

inline void decode_half(const uint16_t* h, int64_t dim, float* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_f16c()) return decode_half_f16c(h, dim, out);
#endif
  decode_half_loop(h, dim, out);
}

inline void encode_half(const float* w, const uint16_t* r, int64_t dim, uint16_t* h) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_f16c()) return encode_half_f16c(w, r, dim, h);
#endif
  encode_half_loop(w, r, dim, h);
}

// Decodes the value words at `src` into dim float32 at `out`.
inline void decode_value(Storage storage, const float* src, int64_t dim, float* out) {
  if (storage == Storage::kFloat16) {
    decode_half(reinterpret_cast<const uint16_t*>(src), dim, out);
  } else if (storage == Storage::kInt8) {
    decode_codes(reinterpret_cast<const uint8_t*>(src + 2), src[0], src[1], dim, out);
  } else {
    std::memcpy(out, src, sizeof(float) * dim);
  }
}

// The largest scale an int8 row keeps: 255 x it stays a finite float32 (a power of two below
// float32's largest value / 255, so the product is exact), and so does every decoded value.
constexpr float kInt8MaxScale = std::numeric_limits<float>::max() / 256.0f;

// The scale of an int8 row of min `lo` and max `hi`: (hi - lo) / 255, at most kInt8MaxScale. A row
// whose span passes float32's largest value (training gone far off) had hi - lo = inf, an infinite
// scale, and every value NaN once decoded (code x inf + lo); it keeps its minimum and saturates at
// lo + 255 x kInt8MaxScale instead. NaN (a row holding one) passes through as before.
inline float int8_scale(float lo, float hi) {
  const float scale = (hi - lo) / 255.0f;
  return scale > kInt8MaxScale ? kInt8MaxScale : scale;
}

// 1 / scale of an int8 row, 0 where it is not a finite number: a row whose span is below ~7.5e-37
// has a subnormal scale whose inverse is inf, and its minimum encoded (0 x inf = NaN) as code 255;
// such a row encodes as one of equal values (every code 0: each value decodes to the minimum).
inline float int8_inverse_scale(float scale) {
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  return std::isfinite(inv) ? inv : 0.0f;
}

// Encodes dim float32 at `w` into the value words at `dst`, rounding with the draws of `base`;
// `r` is scratch for (dim + 3) / 4 * 4 draws.
inline void encode_value(Storage storage, const float* w, int64_t dim, uint64_t base, uint16_t* r, float* dst) {
  if (storage == Storage::kFloat16) {
    rounding_draws(base, dim, r);
    uint16_t* h = reinterpret_cast<uint16_t*>(dst);
    encode_half(w, r, dim, h);
    if (dim & 1) h[dim] = 0;
  } else if (storage == Storage::kInt8) {
    rounding_draws(base, dim, r);
    float lo, hi;
    row_min_max(w, dim, &lo, &hi);
    const float scale = int8_scale(lo, hi);
    const float inv = int8_inverse_scale(scale);
    dst[0] = scale;
    dst[1] = lo;
    uint8_t* q = reinterpret_cast<uint8_t*>(dst + 2);
    encode_codes(w, r, lo, inv, dim, q);
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
  std::vector<uint16_t> r(static_cast<size_t>(dim + 3));
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0) continue;
    encode_value(storage, src + i * dim, dim, rounding_base(seed_mix, keys[i], stream), r.data(),
                 store.row(rows[i]));
  }
}

// The instruction sets of the encoded update, as tags whose static functions the one row loop
// below (update_encoded_rows) calls; each tier computes the same bits (the same float32
// operations, the same hash), only wider. The loop is compiled once per tier, with everything
// it calls inlined (flatten) under the tier's target.
struct BaselineIsa {
  static void draws(uint64_t base, int64_t dim, uint16_t* r) { rounding_draws(base, dim, r); }
  static void decode_half(const uint16_t* h, int64_t dim, float* out) { decode_half_loop(h, dim, out); }
  static void encode_half(const float* w, const uint16_t* r, int64_t dim, uint16_t* h) {
    encode_half_loop(w, r, dim, h);
  }
  static void decode_codes(const uint8_t* q, float scale, float bias, int64_t dim, float* out) {
    decode_codes_loop(q, scale, bias, dim, out);
  }
  static void encode_codes(const float* w, const uint16_t* r, float lo, float inv, int64_t dim, uint8_t* q) {
    encode_codes_loop(w, r, lo, inv, dim, q);
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define EMBPS_AVX2 __attribute__((target("avx2,f16c")))
#define EMBPS_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512dq,avx512bw,avx512vl")))

// x * c mod 2^64 in 4 lanes from AVX2's 32 x 32 -> 64-bit multiplies: lo*lo + (hi*lo + lo*hi) << 32.
EMBPS_AVX2 inline __m256i mul64_avx2(__m256i x, uint64_t c) {
  const __m256i c_lo = _mm256_set1_epi64x(static_cast<int64_t>(c & 0xFFFFFFFFu));
  const __m256i c_hi = _mm256_set1_epi64x(static_cast<int64_t>(c >> 32));
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x, 32), c_lo), _mm256_mul_epu32(x, c_hi));
  return _mm256_add_epi64(_mm256_mul_epu32(x, c_lo), _mm256_slli_epi64(cross, 32));
}

EMBPS_AVX2 inline __m256i mix64_avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 30));
  x = mul64_avx2(x, 0xbf58476d1ce4e5b9ULL);
  x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 27));
  x = mul64_avx2(x, 0x94d049bb133111ebULL);
  return _mm256_xor_si256(x, _mm256_srli_epi64(x, 31));
}

// rounding_draws, 4 hashes (16 draws) at a time, stored as they come (see rounding_draws_avx512).
EMBPS_AVX2 inline void rounding_draws_avx2(uint64_t base, int64_t dim, uint16_t* r) {
  const int64_t groups = (dim + 3) / 4;
  const __m256i step = _mm256_set1_epi64x(static_cast<int64_t>(4 * kGolden));
  __m256i x = _mm256_set_epi64x(static_cast<int64_t>(base + 4 * kGolden), static_cast<int64_t>(base + 3 * kGolden),
                                static_cast<int64_t>(base + 2 * kGolden), static_cast<int64_t>(base + kGolden));
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4, x = _mm256_add_epi64(x, step)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 4 * g), mix64_avx2(x));
  }
  for (; g < groups; ++g) {
    uint64_t bits = mix64(base + static_cast<uint64_t>(g + 1) * kGolden);
    for (int k = 0; k < 4; ++k, bits >>= 16) r[4 * g + k] = static_cast<uint16_t>(bits);
  }
}

struct Avx2Isa {
  EMBPS_AVX2 static void draws(uint64_t base, int64_t dim, uint16_t* r) { rounding_draws_avx2(base, dim, r); }
  EMBPS_AVX2 static void decode_half(const uint16_t* h, int64_t dim, float* out) { decode_half_f16c(h, dim, out); }
  EMBPS_AVX2 static void encode_half(const float* w, const uint16_t* r, int64_t dim, uint16_t* h) {
    encode_half_f16c(w, r, dim, h);
  }
  EMBPS_AVX2 static void decode_codes(const uint8_t* q, float scale, float bias, int64_t dim, float* out) {
    decode_codes_avx2(q, scale, bias, dim, out);
  }
  EMBPS_AVX2 static void encode_codes(const float* w, const uint16_t* r, float lo, float inv, int64_t dim,
                                      uint8_t* q) {
    encode_codes_avx2(w, r, lo, inv, dim, q);
  }
};

// GCC 12 warns that AVX-512 intrinsics' own undefined pass-through operands "may be used
// uninitialized" wherever they are inlined; they are not (every lane is written).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// mix64 of 8 lanes (AVX-512DQ multiplies 64-bit lanes; AVX2 would need 3 multiplies each).
EMBPS_AVX512 inline __m512i mix64_avx512(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 30));
  x = _mm512_mullo_epi64(x, _mm512_set1_epi64(static_cast<int64_t>(0xbf58476d1ce4e5b9ULL)));
  x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 27));
  x = _mm512_mullo_epi64(x, _mm512_set1_epi64(static_cast<int64_t>(0x94d049bb133111ebULL)));
  return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

// rounding_draws, 8 hashes (32 draws) an instruction: hash g's little-endian bytes are draws
// 4g .. 4g + 3, so the hashes are stored as they come.
EMBPS_AVX512 inline void rounding_draws_avx512(uint64_t base, int64_t dim, uint16_t* r) {
  const int64_t groups = (dim + 3) / 4;
  const __m512i step = _mm512_set1_epi64(static_cast<int64_t>(8 * kGolden));
  __m512i x = _mm512_add_epi64(
      _mm512_set1_epi64(static_cast<int64_t>(base)),
      _mm512_mullo_epi64(_mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1), _mm512_set1_epi64(static_cast<int64_t>(kGolden))));
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8, x = _mm512_add_epi64(x, step)) {
    _mm512_storeu_si512(r + 4 * g, mix64_avx512(x));
  }
  for (; g < groups; ++g) {
    uint64_t bits = mix64(base + static_cast<uint64_t>(g + 1) * kGolden);
    for (int k = 0; k < 4; ++k, bits >>= 16) r[4 * g + k] = static_cast<uint16_t>(bits);
  }
}

// encode_codes_avx2 16 lanes at a time: the same float32 operations and truncation; the
// unsigned saturation to a byte (vpmovusdb) is the same min with 255.
EMBPS_AVX512 inline void encode_codes_avx512(const float* w, const uint16_t* r, float lo, float inv, int64_t dim,
                                             uint8_t* q) {
  const __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv), vunit = _mm512_set1_ps(1.0f / 65536.0f);
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16) {
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(w + k), vlo), vinv);
    const __m512i draws = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k)));
    const __m512 v = _mm512_add_ps(t, _mm512_mul_ps(_mm512_cvtepi32_ps(draws), vunit));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(v)));
  }
  encode_codes_avx2(w + k, r + k, lo, inv, dim - k, q + k);
}

EMBPS_AVX512 inline void decode_codes_avx512(const uint8_t* q, float scale, float bias, int64_t dim, float* out) {
  const __m512 vscale = _mm512_set1_ps(scale), vbias = _mm512_set1_ps(bias);
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
    _mm512_storeu_ps(out + k, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), vscale), vbias));
  }
  decode_codes_loop(q + k, scale, bias, dim - k, out + k);
}

// decode_half_f16c and encode_half_f16c 16 lanes at a time (the same conversions).
EMBPS_AVX512 inline void decode_half_avx512(const uint16_t* h, int64_t dim, float* out) {
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16) {
    _mm512_storeu_ps(out + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + k))));
  }
  decode_half_f16c(h + k, dim - k, out + k);
}

EMBPS_AVX512 inline void encode_half_avx512(const float* w, const uint16_t* r, int64_t dim, uint16_t* h) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i half_max = _mm512_set1_epi32(static_cast<int32_t>(kHalfMaxBits));
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16) {
    const __m512i b = _mm512_loadu_si512(w + k);
    const __m512i add =
        _mm512_srli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k))), 3);
    const __mmask16 below = _mm512_cmplt_epi32_mask(_mm512_and_si512(b, abs_mask), half_max);
    const __m512i rounded = _mm512_mask_add_epi32(b, below, b, add);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + k),
                        _mm512_cvtps_ph(_mm512_castsi512_ps(rounded), _MM_FROUND_TO_ZERO));
  }
  encode_half_f16c(w + k, r + k, dim - k, h + k);
}

struct Avx512Isa {
  EMBPS_AVX512 static void draws(uint64_t base, int64_t dim, uint16_t* r) { rounding_draws_avx512(base, dim, r); }
  EMBPS_AVX512 static void decode_half(const uint16_t* h, int64_t dim, float* out) { decode_half_avx512(h, dim, out); }
  EMBPS_AVX512 static void encode_half(const float* w, const uint16_t* r, int64_t dim, uint16_t* h) {
    encode_half_avx512(w, r, dim, h);
  }
  EMBPS_AVX512 static void decode_codes(const uint8_t* q, float scale, float bias, int64_t dim, float* out) {
    decode_codes_avx512(q, scale, bias, dim, out);
  }
  EMBPS_AVX512 static void encode_codes(const float* w, const uint16_t* r, float lo, float inv, int64_t dim,
                                        uint8_t* q) {
    encode_codes_avx512(w, r, lo, inv, dim, q);
  }
};

#pragma GCC diagnostic pop
#endif

// apply_update for a float16 or int8 value, each row in one pass while it is in L1: decode into
// w, the same float32 optimizer step (its state float32 words follow the value words; row-wise
// Adagrad's sums of squares come from `sq`, summed beforehand 8 rows side by side), draw the
// rounding bits of stream `step`, encode back into the row. Rows go kGroup at a time, phase by
// phase, so that the long waits of one row (square root and divisions of the step, min/max
// and the two divisions of the int8 scale) overlap with the work of the others.
// w: kGroup * dim floats, r: room for the draws of a row (+ 32, whole AVX-512 stores).
constexpr int64_t kEncodeGroup = 4;

template <class Isa>
inline void update_encoded_rows(Optimizer opt, const double* hp, const BlockStore& store, Storage storage, int64_t dim,
                                int64_t state_width, uint64_t seed_mix, const int64_t* keys, const int64_t* rows,
                                const float* grads, const int64_t* counts, int64_t u, uint32_t step, const float* sq,
                                float* w, uint16_t* r) {
  const int64_t words = value_words(storage, dim);
  const int64_t meta = words + state_width;
  const int64_t padded = (dim + 3) / 4 * 4;
  const bool half = storage == Storage::kFloat16;
  constexpr int64_t kAhead = 8;
  for (int64_t i = 0; i < u && i < kAhead; ++i) prefetch_words(store.row(rows[i]), meta + 2, 1);
  float* row[kEncodeGroup];
  for (int64_t first = 0; first < u; first += kEncodeGroup) {
    const int64_t n = u - first < kEncodeGroup ? u - first : kEncodeGroup;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = first + j;
      if (i + kAhead < u) prefetch_words(store.row(rows[i + kAhead]), meta + 2, 1);
      row[j] = store.row(rows[i]);
      float* wj = w + j * dim;
      if (half) {
        Isa::decode_half(reinterpret_cast<const uint16_t*>(row[j]), dim, wj);
      } else {
        Isa::decode_codes(reinterpret_cast<const uint8_t*>(row[j] + 2), row[j][0], row[j][1], dim, wj);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = first + j;
      if (sq) {
        rowwise_adagrad_step(hp, w + j * dim, row[j] + words, grads + i * dim, dim, sq[i]);
      } else {
        optimizer_step(opt, hp, w + j * dim, row[j] + words, grads + i * dim, dim);
      }
    }
    if (half) {
      for (int64_t j = 0; j < n; ++j) {
        Isa::draws(rounding_base(seed_mix, keys[first + j], step), dim, r);
        uint16_t* h = reinterpret_cast<uint16_t*>(row[j]);
        Isa::encode_half(w + j * dim, r, dim, h);
        if (dim & 1) h[dim] = 0;
      }
    } else {
      float lo[kEncodeGroup], inv[kEncodeGroup];
      for (int64_t j = 0; j < n; ++j) {
        float hi;
        row_min_max(w + j * dim, dim, &lo[j], &hi);
        const float scale = int8_scale(lo[j], hi);
        inv[j] = int8_inverse_scale(scale);
        row[j][0] = scale;
        row[j][1] = lo[j];
      }
      for (int64_t j = 0; j < n; ++j) {
        Isa::draws(rounding_base(seed_mix, keys[first + j], step), dim, r);
        uint8_t* q = reinterpret_cast<uint8_t*>(row[j] + 2);
        Isa::encode_codes(w + j * dim, r, lo[j], inv[j], dim, q);
        for (int64_t k = dim; k < padded; ++k) q[k] = 0;
      }
    }
    for (int64_t j = 0; j < n; ++j) update_meta(reinterpret_cast<uint32_t*>(row[j] + meta), counts[first + j], step);
  }
}

#define EMBPS_UPDATE_ENCODED_ARGS                                                                              \
  Optimizer opt, const double *hp, const BlockStore &store, Storage storage, int64_t dim, int64_t state_width, \
      uint64_t seed_mix, const int64_t *keys, const int64_t *rows, const float *grads, const int64_t *counts,   \
      int64_t u, uint32_t step, const float *sq, float *w, uint16_t *r
#define EMBPS_UPDATE_ENCODED_CALL \
  opt, hp, store, storage, dim, state_width, seed_mix, keys, rows, grads, counts, u, step, sq, w, r

__attribute__((flatten)) inline void update_encoded_rows_baseline(EMBPS_UPDATE_ENCODED_ARGS) {
  update_encoded_rows<BaselineIsa>(EMBPS_UPDATE_ENCODED_CALL);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"), flatten)) inline void update_encoded_rows_avx2(EMBPS_UPDATE_ENCODED_ARGS) {
  update_encoded_rows<Avx2Isa>(EMBPS_UPDATE_ENCODED_CALL);
}

__attribute__((target("avx2,f16c,avx512f,avx512dq,avx512bw,avx512vl"), flatten)) inline void update_encoded_rows_avx512(
    EMBPS_UPDATE_ENCODED_ARGS) {
  update_encoded_rows<Avx512Isa>(EMBPS_UPDATE_ENCODED_CALL);
}
#undef EMBPS_AVX2
#undef EMBPS_AVX512
#endif
#undef EMBPS_UPDATE_ENCODED_ARGS
#undef EMBPS_UPDATE_ENCODED_CALL

// apply_update for a float16 or int8 value (update_encoded_rows on the widest instruction set
// the CPU has).
inline void apply_update_encoded(Optimizer opt, const double* hp, const BlockStore& store,
                                 Storage storage, int64_t dim, int64_t state_width, uint64_t seed,
                                 const int64_t* keys, const int64_t* rows, const float* grads,
                                 const int64_t* counts, int64_t u, uint32_t step) {
  if (storage != Storage::kFloat16 && storage != Storage::kInt8) {
    throw std::invalid_argument("apply_update_encoded: storage must be float16 or int8");
  }
  const uint64_t seed_mix = rounding_seed(seed);
  std::vector<float> w(static_cast<size_t>(kEncodeGroup * dim));
  std::vector<uint16_t> r(static_cast<size_t>(dim + 3) / 4 * 4 + 32);
  std::vector<float> sums;
  const float* sq = nullptr;
  if (opt == Optimizer::kRowWiseAdagrad) {
    sums.resize(static_cast<size_t>(u));
    square_sums(grads, u, dim, sums.data());
    sq = sums.data();
  }
#if defined(__x86_64__) && defined(__GNUC__)
  const int isa = isa_level();
  if (isa >= 2) {
    return update_encoded_rows_avx512(opt, hp, store, storage, dim, state_width, seed_mix, keys, rows, grads, counts,
                                      u, step, sq, w.data(), r.data());
  }
  if (isa >= 1) {
    return update_encoded_rows_avx2(opt, hp, store, storage, dim, state_width, seed_mix, keys, rows, grads, counts, u,
                                    step, sq, w.data(), r.data());
  }
#endif
  update_encoded_rows_baseline(opt, hp, store, storage, dim, state_width, seed_mix, keys, rows, grads, counts, u, step,
                               sq, w.data(), r.data());
}

}  // namespace embps
