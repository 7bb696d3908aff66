// Bulk row operations over a block row store.
//
// A table's rows live in fixed-size blocks of float32 words: row r is word range
// [(r & mask) * width, +width) of block r >> shift. A row's words are
//   [ value (dim) | optimizer state (state_width) | freq (uint32) | last_step (uint32) ]
// so one update touches one contiguous run of memory. Every function here takes the table of
// block base addresses and works on many rows per call; none of them allocates.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "hash_map.h"

namespace embps {

struct BlockStore {
  float* const* blocks;  // num_blocks base addresses
  int64_t num_blocks;
  int shift;             // rows per block = 1 << shift
  int64_t width;         // words per row

  float* row(int64_t r) const {
    const int64_t b = r >> shift;
    if (r < 0 || b >= num_blocks) throw std::out_of_range("row outside the allocated blocks");
    return blocks[b] + (r & ((int64_t{1} << shift) - 1)) * width;
  }
};

enum class Init : int { kZeros = 0, kUniform = 1, kNormal = 2 };

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// Deterministic init: element j of the row for `key` is a pure function of (seed, key, j).
//   base   = mix64(key ^ mix64(seed + golden))
//   bits_j = mix64(base + (j + 1) * golden)
//   uniform: scale * (2 u - 1),  u = (bits_j >> 40) / 2^24
//   normal:  scale * sqrt(-2 ln u1) cos(2 pi u2),  u1 = ((bits_j >> 40) + 0.5) / 2^24,
//            u2 = ((bits_j >> 16) & 0xFFFFFF) / 2^24
// computed in double and rounded once to float32.
inline void init_values(uint64_t seed, Init kind, double scale, const int64_t* keys, int64_t n,
                        int64_t dim, float* out, int64_t out_stride) {
  const uint64_t seed_mix = mix64(seed + kGolden);
  constexpr double kInv24 = 1.0 / 16777216.0;
  for (int64_t i = 0; i < n; ++i) {
    float* dst = out + i * out_stride;
    if (kind == Init::kZeros) {
      std::memset(dst, 0, sizeof(float) * dim);
      continue;
    }
    const uint64_t base = mix64(static_cast<uint64_t>(keys[i]) ^ seed_mix);
    for (int64_t j = 0; j < dim; ++j) {
      const uint64_t bits = mix64(base + static_cast<uint64_t>(j + 1) * kGolden);
      double v;
      if (kind == Init::kUniform) {
        const double u = static_cast<double>(bits >> 40) * kInv24;
        v = scale * (2.0 * u - 1.0);
      } else {
        const double u1 = (static_cast<double>(bits >> 40) + 0.5) * kInv24;
        const double u2 = static_cast<double>((bits >> 16) & 0xFFFFFFULL) * kInv24;
        v = scale * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
      }
      dst[j] = static_cast<float>(v);
    }
  }
}

// Asks for every cache line of words [first, first + count) ahead of use: rows are scattered
// over gigabytes, so overlapping the misses of the next rows is most of the speed.
inline void prefetch_words(const float* first, int64_t count, int write) {
  const char* p = reinterpret_cast<const char*>(first);
  const char* end = reinterpret_cast<const char*>(first + count);
  for (; p < end; p += 64) {
    if (write) {
      __builtin_prefetch(p, 1);
    } else {
      __builtin_prefetch(p, 0);
    }
  }
}

// out[i, :] = words [col, col + num_cols) of rows[i]; rows[i] < 0 leaves out[i] untouched.
inline void gather(const BlockStore& store, const int64_t* rows, int64_t n, int64_t col,
                   int64_t num_cols, float* out) {
  constexpr int64_t kAhead = 8;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n && rows[i + kAhead] >= 0) prefetch_words(store.row(rows[i + kAhead]) + col, num_cols, 0);
    if (rows[i] < 0) continue;
    std::memcpy(out + i * num_cols, store.row(rows[i]) + col, sizeof(float) * num_cols);
  }
}

// words [col, col + num_cols) of rows[i] = src[i, :]; rows[i] < 0 is skipped.
inline void scatter(const BlockStore& store, const int64_t* rows, int64_t n, int64_t col,
                    int64_t num_cols, const float* src) {
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0) continue;
    std::memcpy(store.row(rows[i]) + col, src + i * num_cols, sizeof(float) * num_cols);
  }
}

// Sums rows of grads that share a key, keeping first-occurrence order.
// keys (n,), grads (n, dim) or null, weights (n,) or null (1 each) -> unique_keys (u,),
// sums (u, dim), counts (u,) = summed weights. Returns u.
inline int64_t dedupe_sum(const int64_t* keys, const float* grads, const int64_t* weights,
                          int64_t n, int64_t dim, int64_t* unique_keys, float* sums,
                          int64_t* counts) {
  uint64_t cap = 16;
  while (cap < static_cast<uint64_t>(2 * n)) cap <<= 1;
  std::vector<int64_t> slot_pos(cap, -1);
  const uint64_t mask = cap - 1;
  int64_t u = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t pos = mix64(static_cast<uint64_t>(keys[i])) & mask;
    while (slot_pos[pos] >= 0 && unique_keys[slot_pos[pos]] != keys[i]) pos = (pos + 1) & mask;
    const int64_t w = weights ? weights[i] : 1;
    if (slot_pos[pos] < 0) {
      slot_pos[pos] = u;
      unique_keys[u] = keys[i];
      counts[u] = w;
      if (grads) std::memcpy(sums + u * dim, grads + i * dim, sizeof(float) * dim);
      ++u;
    } else {
      const int64_t j = slot_pos[pos];
      counts[j] += w;
      if (grads) {
        float* dst = sums + j * dim;
        const float* src = grads + i * dim;
        for (int64_t k = 0; k < dim; ++k) dst[k] += src[k];
      }
    }
  }
  return u;
}

enum class Optimizer : int { kSgd = 0, kAdagrad = 1, kRowWiseAdagrad = 2, kAdam = 3, kFtrl = 4 };

// Float32 state words a row of `opt` holds (ps/table/optimizers.py state_width): optimizer_step
// reads and writes exactly these.
inline int64_t state_words(Optimizer opt, int64_t dim) {
  switch (opt) {
    case Optimizer::kSgd: return 0;
    case Optimizer::kAdagrad: return dim;
    case Optimizer::kRowWiseAdagrad: return 1;
    case Optimizer::kAdam: return 2 * dim + 1;
    case Optimizer::kFtrl: return 2 * dim;
  }
  return -1;
}

// Row-wise Adagrad's step given sq, the sum of g[k]^2 added in element order.
inline void rowwise_adagrad_step(const double* hp, float* w, float* s, const float* g, int64_t dim, float sq) {
  const float lr = static_cast<float>(hp[0]), eps = static_cast<float>(hp[1]);
  s[0] += sq / static_cast<float>(dim);
  const float mult = lr / (std::sqrt(s[0]) + eps);
  for (int64_t k = 0; k < dim; ++k) w[k] -= mult * g[k];
}

// out[i] = sum of g[i, k]^2 over k, each row added in element order (the reference's float32
// additions). One row's additions wait on each other (4 cycles each, 256 at dim 64, more than a
// whole float32 update otherwise takes), so rows are summed side by side: 8 independent chains.
__attribute__((always_inline)) inline void square_sums_loop(const float* g, int64_t u, int64_t dim, float* out) {
  int64_t i = 0;
  for (; i + 8 <= u; i += 8) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t k = 0; k < dim; ++k) {
      for (int r = 0; r < 8; ++r) {
        const float x = g[(i + r) * dim + k];
        acc[r] += x * x;
      }
    }
    for (int r = 0; r < 8; ++r) out[i + r] = acc[r];
  }
  for (const float* row = g + i * dim; i < u; ++i, row += dim) {
    float sq = 0.0f;
    for (int64_t k = 0; k < dim; ++k) sq += row[k] * row[k];
    out[i] = sq;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// square_sums_loop with AVX: 8 rows x 8 elements squared, transposed so that lane r holds row
// r, then added one element column after the other (the same additions in the same order).
__attribute__((target("avx2"))) inline void square_sums_avx2(const float* g, int64_t u, int64_t dim, float* out) {
  int64_t i = 0;
  const int64_t whole = dim / 8 * 8;
  for (; i + 8 <= u && whole > 0; i += 8) {
    const float* base = g + i * dim;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < whole; k += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) {
        const __m256 x = _mm256_loadu_ps(base + r * dim + k);
        v[r] = _mm256_mul_ps(x, x);
      }
      const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      // column c (element k + c of rows 0..7): c = 0..3 from the low halves, 4..7 from the high.
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s0, s4, 0x20));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s1, s5, 0x20));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s2, s6, 0x20));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s3, s7, 0x20));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s0, s4, 0x31));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s1, s5, 0x31));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s2, s6, 0x31));
      acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
    float sums[8];
    _mm256_storeu_ps(sums, acc);
    for (int r = 0; r < 8; ++r) {
      for (int64_t k = whole; k < dim; ++k) sums[r] += base[r * dim + k] * base[r * dim + k];
      out[i + r] = sums[r];
    }
  }
  square_sums_loop(g + i * dim, u - i, dim, out + i);
}
#endif

// The widest instruction set the row kernels use: what the CPU has, capped by isa_limit() (tests
// run every tier on one machine and compare bits). 0: the build's baseline, 1: AVX2 (+ F16C),
// 2: AVX-512 (F, DQ, BW, VL).
inline std::atomic<int>& isa_limit() {
  static std::atomic<int> limit{2};
  return limit;
}

inline int cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int level = !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) ? 0
                           : (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
                               ? 2
                               : 1;
  return level;
#else
  return 0;
#endif
}

inline int isa_level() {
  const int limit = isa_limit().load(std::memory_order_relaxed);
  return cpu_isa() < limit ? cpu_isa() : limit;
}

inline void square_sums(const float* g, int64_t u, int64_t dim, float* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa_level() >= 1) return square_sums_avx2(g, u, dim, out);
#endif
  square_sums_loop(g, u, dim, out);
}

// One optimizer step on one row: value w (dim), state s, summed gradient g. Hyper-parameters by
// optimizer: sgd: lr | adagrad: lr, eps | rowwise_adagrad: lr, eps | adam: lr, beta1, beta2, eps |
// ftrl: alpha, beta, l1, l2. All arithmetic is float32, in the order of the reference in
// tests/ps/reference_optim.py.
inline void optimizer_step(Optimizer opt, const double* hp, float* w, float* s, const float* g,
                           int64_t dim) {
  switch (opt) {
    case Optimizer::kSgd: {
      const float lr = static_cast<float>(hp[0]);
      for (int64_t k = 0; k < dim; ++k) w[k] -= lr * g[k];
      break;
    }
    case Optimizer::kAdagrad: {
      const float lr = static_cast<float>(hp[0]), eps = static_cast<float>(hp[1]);
      for (int64_t k = 0; k < dim; ++k) {
        s[k] += g[k] * g[k];
        w[k] -= lr * g[k] / (std::sqrt(s[k]) + eps);
      }
      break;
    }
    case Optimizer::kRowWiseAdagrad: {
      float sq = 0.0f;
      for (int64_t k = 0; k < dim; ++k) sq += g[k] * g[k];
      rowwise_adagrad_step(hp, w, s, g, dim, sq);
      break;
    }
    case Optimizer::kAdam: {
      const float lr = static_cast<float>(hp[0]), b1 = static_cast<float>(hp[1]);
      const float b2 = static_cast<float>(hp[2]), eps = static_cast<float>(hp[3]);
      float* m = s;
      float* v = s + dim;
      float& t = s[2 * dim];
      t += 1.0f;
      const float bc1 = 1.0f - std::pow(b1, t);
      const float bc2 = 1.0f - std::pow(b2, t);
      for (int64_t k = 0; k < dim; ++k) {
        m[k] = b1 * m[k] + (1.0f - b1) * g[k];
        v[k] = b2 * v[k] + (1.0f - b2) * g[k] * g[k];
        w[k] -= lr * (m[k] / bc1) / (std::sqrt(v[k] / bc2) + eps);
      }
      break;
    }
    case Optimizer::kFtrl: {
      const float alpha = static_cast<float>(hp[0]), beta = static_cast<float>(hp[1]);
      const float l1 = static_cast<float>(hp[2]), l2 = static_cast<float>(hp[3]);
      float* z = s;
      float* nacc = s + dim;
      for (int64_t k = 0; k < dim; ++k) {
        const float n_new = nacc[k] + g[k] * g[k];
        const float sigma = (std::sqrt(n_new) - std::sqrt(nacc[k])) / alpha;
        z[k] += g[k] - sigma * w[k];
        nacc[k] = n_new;
        if (std::fabs(z[k]) <= l1) {
          w[k] = 0.0f;
        } else {
          const float sign = z[k] > 0.0f ? 1.0f : -1.0f;
          w[k] = -(z[k] - sign * l1) / ((beta + std::sqrt(n_new)) / alpha + l2);
        }
      }
      break;
    }
  }
}

// freq += count (saturating), last_step = max(last_step, step): a stale push (an older step, from
// async training) does not make a row look older to TTL and LRU eviction.
inline void update_meta(uint32_t* meta_words, int64_t count, uint32_t step) {
  const uint64_t freq = static_cast<uint64_t>(meta_words[0]) + static_cast<uint64_t>(count);
  meta_words[0] = freq > 0xFFFFFFFFULL ? 0xFFFFFFFFu : static_cast<uint32_t>(freq);
  meta_words[1] = std::max(meta_words[1], step);
}

// Applies one optimizer step to each of the u unique rows with its summed gradient, then
// freq += counts[i] (saturating) and last_step = max(last_step, step).
inline void apply_update(Optimizer opt, const double* hp, const BlockStore& store, int64_t dim,
                         int64_t state_width, const int64_t* rows, const float* grads,
                         const int64_t* counts, int64_t u, uint32_t step) {
  const int64_t meta = dim + state_width;
  constexpr int64_t kAhead = 6;
  std::vector<float> sq;
  if (opt == Optimizer::kRowWiseAdagrad) {
    sq.resize(static_cast<size_t>(u));
    square_sums(grads, u, dim, sq.data());
  }
  for (int64_t i = 0; i < u && i < kAhead; ++i) prefetch_words(store.row(rows[i]), meta + 2, 1);
  for (int64_t i = 0; i < u; ++i) {
    if (i + kAhead < u) prefetch_words(store.row(rows[i + kAhead]), meta + 2, 1);
    float* w = store.row(rows[i]);
    if (opt == Optimizer::kRowWiseAdagrad) {
      rowwise_adagrad_step(hp, w, w + dim, grads + i * dim, dim, sq[i]);
    } else {
      optimizer_step(opt, hp, w, w + dim, grads + i * dim, dim);
    }
    update_meta(reinterpret_cast<uint32_t*>(w + meta), counts[i], step);
  }
}

}  // namespace embps
