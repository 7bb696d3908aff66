// Categorical strings -> int64 keys, straight from Arrow string buffers (offsets + data), with
// the hash of worker/features.py (the data contract; that module's numpy code is the reference
// and the tests check these keys against it bit for bit):
//
//   value(s)   = int(s, 16)                        if s is 1..16 hex digits
//              = first 8 bytes of blake2b(s) (LE)  otherwise (any other non-empty string)
//              = 0xFFFFFFFFFFFFFFFF                for the empty string and null
//   salt(f)    = mix64((f + 1) * 0x9E3779B97F4A7C15 mod 2^64)
//   key(f, s)  = int64(mix64(value(s) XOR salt(f)))
//
// A column is either plain (n strings) or dictionary-encoded (n indices into m strings: the m
// strings are hashed once, then gathered). Keys are written with a row stride, so one call fills
// a (rows, features) array column by column.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "hash_map.h"

namespace embps {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMissingValue = 0xFFFFFFFFFFFFFFFFULL;

inline uint64_t feature_salt(int64_t feature) { return mix64(static_cast<uint64_t>(feature + 1) * kGoldenGamma); }

// BLAKE2b (RFC 7693), unkeyed, 8-byte digest, read as a little-endian uint64.
inline uint64_t blake2b_64(const uint8_t* data, size_t len) {
  static constexpr uint64_t kIv[8] = {0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL,
                                      0xA54FF53A5F1D36F1ULL, 0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL,
                                      0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};
  static constexpr uint8_t kSigma[12][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
      {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
      {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
      {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
      {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};
  auto rotr = [](uint64_t x, int n) { return (x >> n) | (x << (64 - n)); };
  uint64_t h[8];
  std::memcpy(h, kIv, sizeof(h));
  h[0] ^= 0x01010000ULL ^ 8ULL;  // digest length 8, no key, fanout 1, depth 1
  uint64_t counter = 0;
  auto compress = [&](const uint8_t* block, bool last) {
    uint64_t m[16];
    for (int i = 0; i < 16; ++i) {
      uint64_t word = 0;
      for (int b = 7; b >= 0; --b) word = (word << 8) | block[8 * i + b];
      m[i] = word;
    }
    uint64_t v[16];
    for (int i = 0; i < 8; ++i) {
      v[i] = h[i];
      v[i + 8] = kIv[i];
    }
    v[12] ^= counter;  // the high 64 bits of the byte counter stay 0: inputs are < 2^64 bytes
    if (last) v[14] = ~v[14];
    auto g = [&](int a, int b, int c, int d, uint64_t x, uint64_t y) {
      v[a] = v[a] + v[b] + x;
      v[d] = rotr(v[d] ^ v[a], 32);
      v[c] = v[c] + v[d];
      v[b] = rotr(v[b] ^ v[c], 24);
      v[a] = v[a] + v[b] + y;
      v[d] = rotr(v[d] ^ v[a], 16);
      v[c] = v[c] + v[d];
      v[b] = rotr(v[b] ^ v[c], 63);
    };
    for (int r = 0; r < 12; ++r) {
      const uint8_t* s = kSigma[r];
      g(0, 4, 8, 12, m[s[0]], m[s[1]]);
      g(1, 5, 9, 13, m[s[2]], m[s[3]]);
      g(2, 6, 10, 14, m[s[4]], m[s[5]]);
      g(3, 7, 11, 15, m[s[6]], m[s[7]]);
      g(0, 5, 10, 15, m[s[8]], m[s[9]]);
      g(1, 6, 11, 12, m[s[10]], m[s[11]]);
      g(2, 7, 8, 13, m[s[12]], m[s[13]]);
      g(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
  };
  // Every full block but the last is compressed as it comes; the last (possibly partial, or
  // empty for empty input) is zero-padded and flagged final.
  while (len > 128) {
    counter += 128;
    compress(data, false);
    data += 128;
    len -= 128;
  }
  uint8_t last[128] = {0};
  if (len) std::memcpy(last, data, len);
  counter += len;
  compress(last, true);
  return h[0];  // the first 8 digest bytes, little-endian
}

// Nibble of each byte: 0..15 for a hex digit (0-9, a-f, A-F), 0x10 for any other byte.
struct NibbleTable {
  uint8_t value[256];
  constexpr NibbleTable() : value() {
    for (int c = 0; c < 256; ++c) {
      value[c] = (c >= '0' && c <= '9')   ? static_cast<uint8_t>(c - '0')
                 : (c >= 'a' && c <= 'f') ? static_cast<uint8_t>(c - 'a' + 10)
                 : (c >= 'A' && c <= 'F') ? static_cast<uint8_t>(c - 'A' + 10)
                                          : uint8_t{0x10};
    }
  }
};
inline constexpr NibbleTable kNibbles{};

// value(s) of the module comment; len 0 -> kMissingValue.
inline uint64_t string_value(const uint8_t* s, int64_t len) {
  if (len == 0) return kMissingValue;
  if (len <= 16) {
    uint64_t value = 0;
    uint8_t not_hex = 0;
    if (len == 8) {  // Criteo's values: a fixed-length loop the compiler unrolls
      for (int i = 0; i < 8; ++i) {
        const uint8_t nibble = kNibbles.value[s[i]];
        not_hex |= nibble;
        value = (value << 4) | (nibble & 15);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const uint8_t nibble = kNibbles.value[s[i]];
        not_hex |= nibble;
        value = (value << 4) | (nibble & 15);
      }
    }
    if (!(not_hex & 0x10)) return value;
  }
  return blake2b_64(s, static_cast<size_t>(len));
}

// A validity bitmap (Arrow: LSB first, 1 = valid) from bit `offset` on; null bitmap = all valid.
struct Validity {
  const uint8_t* bits = nullptr;
  int64_t offset = 0;
  bool valid(int64_t i) const {
    if (bits == nullptr) return true;
    const int64_t bit = offset + i;
    return (bits[bit >> 3] >> (bit & 7)) & 1;
  }
};

// Strings [0, n) of an Arrow string array: offsets (n + 1,) already at the array's offset.
template <typename Offset>
struct StringView {
  const Offset* offsets = nullptr;
  const uint8_t* data = nullptr;
  int64_t data_size = 0;
  int64_t n = 0;
  Validity validity;
};

// Checks that the offsets of `strings` stay within its data and do not decrease.
template <typename Offset>
void check_offsets(const StringView<Offset>& strings, const std::string& what) {
  const Offset* o = strings.offsets;
  if (strings.n < 0 || o[0] < 0 || static_cast<int64_t>(o[strings.n]) > strings.data_size) {
    throw std::invalid_argument(what + ": string offsets outside the data buffer");
  }
  for (int64_t i = 0; i < strings.n; ++i) {
    if (o[i + 1] < o[i]) throw std::invalid_argument(what + ": string offsets decrease");
  }
}

// keys of strings[i], i in [begin, end), for feature `feature`, written to out[(i - begin) * stride].
template <typename Offset>
void hash_strings(const StringView<Offset>& strings, int64_t feature, int64_t begin, int64_t end, int64_t* out,
                  int64_t stride) {
  const uint64_t salt = feature_salt(feature);
  const Offset* o = strings.offsets;
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t value = strings.validity.valid(i)
                               ? string_value(strings.data + o[i], static_cast<int64_t>(o[i + 1] - o[i]))
                               : kMissingValue;
    out[(i - begin) * stride] = static_cast<int64_t>(mix64(value ^ salt));
  }
}

// keys of dictionary[indices[i]] (`missing` where the index is null), i in [begin, end), from the
// dictionary's keys `dictionary_keys` (m,), written to out[(i - begin) * stride].
template <typename Index>
void gather_dictionary(const int64_t* dictionary_keys, int64_t m, int64_t missing, const Index* indices,
                       Validity index_validity, int64_t begin, int64_t end, int64_t* out, int64_t stride) {
  for (int64_t i = begin; i < end; ++i) {
    int64_t key = missing;
    if (index_validity.valid(i)) {
      const int64_t index = static_cast<int64_t>(indices[i]);
      if (index < 0 || index >= m) {
        throw std::out_of_range("dictionary index " + std::to_string(index) + " outside a dictionary of " +
                                std::to_string(m) + " strings");
      }
      key = dictionary_keys[index];
    }
    out[(i - begin) * stride] = key;
  }
}

}  // namespace embps
