// Philox4x32-10, bit-identical to triton.language.philox and dmpo_fast/ops/philox.py.
//
// Key = (seed low 32 bits, seed high 32 bits); counters (c0, c1, c2, c3) are uint32. Every random draw in
// dmpo_fast is a pure function of (seed, counters), so this file, the eager torch emulation and the Triton
// kernels produce the same bits for the same seed.
#pragma once

#include <cstdint>

namespace dmpo_fast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

inline Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// uint32 bits -> fp32 in [0, 1) from the top 24 bits (philox.uniform_from_bits): exact in fp32.
inline float uniform_from_bits(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// uint32 bits -> fp32 in (0, 1): (2·(bits >> 9) + 1)·2⁻²⁴ (denoise_step.open_uniform_from_bits): exact in
// fp32, never 0 or 1, so −log(−log u) is finite.
inline float open_uniform_from_bits(uint32_t bits) {
  return static_cast<float>(((bits >> 9) << 1) + 1u) * (1.0f / 16777216.0f);
}

// Open uniforms of the 4·n columns of n consecutive Philox calls with counters (c0 + j, c1, c2, c3),
// j < n <= 256: column 4j + k takes word k of call j. The four words go to separate arrays first, so the
// compiler vectorises the ten rounds across calls (1.4x faster than interleaved stores with AVX2), then
// they are interleaved.
inline void philox_open_uniforms(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, int64_t n,
                                 float* out) {
  alignas(64) uint32_t w[4][256];
  for (int64_t j = 0; j < n; ++j) {
    const Philox4 r = philox4x32_10(seed, c0 + static_cast<uint32_t>(j), c1, c2, c3);
    w[0][j] = r.w0;
    w[1][j] = r.w1;
    w[2][j] = r.w2;
    w[3][j] = r.w3;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int k = 0; k < 4; ++k) out[4 * j + k] = open_uniform_from_bits(w[k][j]);
}

}  // namespace dmpo_fast
