// 4-bit selector K-cache formats: bit layouts, encoders and decoders shared by the CPU kernels, the
// CUDA kernels and the selector-scoring kernel. Header-only, no torch; every function compiles as
// plain C++ and as __host__ __device__ under nvcc (SPOT_HOST_DEVICE from spot/numeric.h).
//
// The bits match python/spot_attention/reference.py ("4-bit selector K-cache formats") exactly.
//
// Packing (all formats)
// ---------------------
// A row of r values (r a multiple of 32) becomes r/2 code bytes: element 2i in the low nibble of
// byte i, element 2i+1 in the high nibble. Read as a little-endian uint32 word, word w holds
// elements 8w..8w+7, element j at bits [4(j%8), 4(j%8)+4). Values are grouped in runs of
// kGroupSize consecutive elements (32 for int4 and mxfp4, 16 for nvfp4); each group has one scale.
//
// int4   nibble: two's-complement integer code in [-8, 7] (0x8 = -8, 0xF = -1).
//        scale : IEEE binary16 bits (a float16 tensor), one per 32 values.
//        encode: amax = max|x|; scale = fp16(float(amax / 7)) (round to nearest even; amax/7 is
//                taken in double, rounded to float, then to fp16, like torch's double->half);
//                code = rne(x / scale) saturated to [-8, 7] (x / scale in double), so only
//                saturation reaches -8. scale == 0 gives all codes 0. amax >= 7 * 65520 gives an
//                Inf scale and zero codes (unpacks to NaN): int4 is for |x| < 458640.
//        decode: code * scale.
// mxfp4  nibble: E2M1 code: bit 3 = sign, bits 0-2 = magnitude index into
//                {0, 0.5, 1, 1.5, 2, 3, 4, 6} (bits 1-2 exponent, bias 1; bit 0 mantissa).
//                Encoding never emits 0x8 (negative zero): a value that rounds to 0 gets code 0.
//        scale : E8M0 byte, one per 32 values: byte = exponent + 127, scale = 2^exponent;
//                0xFF = NaN. exponent = floor(log2(amax)) - 2 clamped to [-127, 127] (the OCP MX
//                rule: amax / 2^exponent lies in [4, 8), so the largest value saturates at 6 at
//                most); amax == 0 gives byte 0 (exponent -127).
//        encode: code = E2M1 rne(x / 2^exponent) (x / 2^exponent in double), saturating at +-6.
//        decode: E2M1 * 2^exponent.
// nvfp4  nibble: E2M1 code as for mxfp4.
//        scale : E4M3 (fn) byte, one per 16 values: bit 7 sign, bits 3-6 exponent (bias 7),
//                bits 0-2 mantissa; exponent 0 is subnormal (m * 2^-9); 0x7F / 0xFF = NaN; no
//                Inf; largest finite 0x7E = 448. Plus one double `global_scale` per tensor
//                (positive, finite; amax(tensor) / (6 * 448) uses the E4M3 range well).
//        encode: block = e4m3(float(amax / 6 / global_scale)) (divisions in double, then float,
//                then E4M3 round to nearest even, saturating at 448); real = e4m3 * global_scale
//                (double); code = E2M1 rne(x / real) (double) when real > 0, else 0.
//        decode: E2M1 * (e4m3 * global_scale).
//
// Non-finite groups: a group holding any NaN or Inf packs to zero codes and a NaN scale (fp16
// 0x7E00, E8M0 0xFF, E4M3 0x7F), so the whole group unpacks to NaN instead of a silent finite.
//
// Decoding for scoring
// --------------------
// decode_nibble<F>(nibble) * decode_group_scale<F>(scale_bits, global_scale) is the stored value.
// For int4 and mxfp4 that float product is exact and equals unpack_kcache bit for bit. For nvfp4,
// decode_group_scale folds global_scale in with one float rounding; decode_value<F>() (or
// (decode_nibble * decode_block_scale) * global_scale, in that order) reproduces unpack_kcache
// bit for bit whenever global_scale is a float. A dot product can sum q * nibble per group, scale
// by decode_block_scale, and multiply by global_scale once at the end.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "spot/numeric.h"
#include "spot/params.h"

// SPOT_DISPATCH_KCACHE_FORMAT(format, CONST_NAME, ...): a packed spot::KCacheFormat as a
// constexpr CONST_NAME for the statement block (kDense is not a packed format).
// SPOT_DISPATCH_KCACHE_FORMAT_OR_DENSE(format, CONST_NAME, ...): the same over every selector key
// format, kDense included; the block tells dense keys apart with `if constexpr`.
#define SPOT_KCACHE_FORMAT_CASE(VALUE, CONST_NAME, ...) \
  case ::spot::KCacheFormat::VALUE: { constexpr auto CONST_NAME = ::spot::KCacheFormat::VALUE; __VA_ARGS__; break; }
#define SPOT_KCACHE_PACKED_FORMAT_CASES(CONST_NAME, ...)     \
  SPOT_KCACHE_FORMAT_CASE(kInt4, CONST_NAME, __VA_ARGS__)    \
  SPOT_KCACHE_FORMAT_CASE(kMxfp4, CONST_NAME, __VA_ARGS__)   \
  SPOT_KCACHE_FORMAT_CASE(kNvfp4, CONST_NAME, __VA_ARGS__)

#define SPOT_DISPATCH_KCACHE_FORMAT(FORMAT, CONST_NAME, ...)                                         \
  switch (FORMAT) {                                                                                 \
    SPOT_KCACHE_PACKED_FORMAT_CASES(CONST_NAME, __VA_ARGS__)                                        \
    default: throw std::invalid_argument("spot: expected a packed K-cache format (int4, mxfp4, nvfp4)"); \
  }

#define SPOT_DISPATCH_KCACHE_FORMAT_OR_DENSE(FORMAT, CONST_NAME, ...)                                \
  switch (FORMAT) {                                                                                 \
    SPOT_KCACHE_FORMAT_CASE(kDense, CONST_NAME, __VA_ARGS__)                                        \
    SPOT_KCACHE_PACKED_FORMAT_CASES(CONST_NAME, __VA_ARGS__)                                        \
    default: throw std::invalid_argument("spot: unknown K-cache format");                           \
  }

namespace spot {
namespace kcache {

// ---------------------------------------------------------------------------------------------
// Per-format constants
// ---------------------------------------------------------------------------------------------

template <KCacheFormat Format>
struct FormatTraits;

template <>
struct FormatTraits<KCacheFormat::kInt4> {
  static constexpr int kGroupSize = 32;
  using ScaleBits = uint16_t;  // IEEE binary16
  static constexpr ScaleBits kNanScale = 0x7E00;
};

template <>
struct FormatTraits<KCacheFormat::kMxfp4> {
  static constexpr int kGroupSize = 32;
  using ScaleBits = uint8_t;  // E8M0
  static constexpr ScaleBits kNanScale = 0xFF;
};

template <>
struct FormatTraits<KCacheFormat::kNvfp4> {
  static constexpr int kGroupSize = 16;
  using ScaleBits = uint8_t;  // E4M3 (fn)
  static constexpr ScaleBits kNanScale = 0x7F;
};

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

SPOT_HOST_DEVICE bool is_finite(float value) { return (float_to_bits(value) & 0x7F800000u) != 0x7F800000u; }

SPOT_HOST_DEVICE float quiet_nan() { return bits_to_float(0x7FC00000u); }

// Round to the nearest integer, ties to even (the default rounding mode on host and device).
SPOT_HOST_DEVICE double round_half_even(double value) {
#if defined(__CUDA_ARCH__)
  return rint(value);
#else
  return std::rint(value);
#endif
}

SPOT_HOST_DEVICE float round_half_even(float value) {
#if defined(__CUDA_ARCH__)
  return rintf(value);
#else
  return std::rint(value);
#endif
}

// 2^exponent as a double, exact for |exponent| <= 1022.
SPOT_HOST_DEVICE double exp2_int(int exponent) {
  const uint64_t bits = uint64_t(exponent + 1023) << 52;
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// floor(log2(value)) for a finite value > 0, exact for normal and subnormal floats.
SPOT_HOST_DEVICE int floor_log2(float value) {
  const uint32_t bits = float_to_bits(value) & 0x7FFFFFFFu;
  const int biased = int(bits >> 23);
  if (biased != 0) return biased - 127;
  int top = 22;  // subnormal: mantissa * 2^-149, the highest set bit decides
  while (top > 0 && !((bits >> top) & 1u)) --top;
  return top - 149;
}

// ---------------------------------------------------------------------------------------------
// E2M1 (FP4): the nibble of mxfp4 and nvfp4
// ---------------------------------------------------------------------------------------------

// Magnitude index 0..7 -> {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Twice the magnitudes {0,1,2,3,4,6,8,12}
// sit in the nibbles of one constant, so the decode needs no table in memory.
SPOT_HOST_DEVICE float e2m1_to_float(uint32_t code) {
  const uint32_t twice_magnitude = (0xC8643210u >> (4u * (code & 7u))) & 0xFu;
  const float magnitude = float(twice_magnitude) * 0.5f;
  return (code & 8u) ? -magnitude : magnitude;
}

// Nearest E2M1 code of value (finite), ties to the even magnitude index, saturating at +-6.
// A value that rounds to zero gets code 0 (never 0x8).
SPOT_HOST_DEVICE uint32_t float_to_e2m1(double value) {
  const double magnitude = value < 0 ? -value : value;
  // Midpoints between neighbours; at a midpoint the even index wins (<= or < accordingly).
  uint32_t index;
  if (magnitude <= 0.25) index = 0;
  else if (magnitude < 0.75) index = 1;
  else if (magnitude <= 1.25) index = 2;
  else if (magnitude < 1.75) index = 3;
  else if (magnitude <= 2.5) index = 4;
  else if (magnitude < 3.5) index = 5;
  else if (magnitude <= 5.0) index = 6;
  else index = 7;
  return (value < 0 && index != 0) ? (index | 8u) : index;
}

// ---------------------------------------------------------------------------------------------
// E4M3 (fn): the nvfp4 block scale
// ---------------------------------------------------------------------------------------------

// Exact for every byte; 0x7F and 0xFF are NaN.
SPOT_HOST_DEVICE float e4m3_to_float(uint32_t byte) {
  byte &= 0xFFu;
  const uint32_t sign = (byte & 0x80u) << 24;
  const uint32_t exponent = (byte >> 3) & 0xFu;
  const uint32_t mantissa = byte & 7u;
  if (exponent == 0xFu && mantissa == 7u) return bits_to_float(sign | 0x7FC00000u);
  if (exponent == 0) {
    const float magnitude = float(mantissa) * 0.001953125f;  // m * 2^-9
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// float -> E4M3 (fn) byte, round to nearest even, saturating at +-448; NaN -> 0x7F.
SPOT_HOST_DEVICE uint8_t float_to_e4m3(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t sign = (bits >> 24) & 0x80u;
  uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return 0x7F;
  if (abs_bits >= 0x43E00000u) return uint8_t(sign | 0x7Eu);  // >= 448 (and Inf) saturate
  if (abs_bits < 0x3C800000u) {  // below 2^-6: subnormal, m * 2^-9; scaling by 2^9 is exact
    const float scaled = bits_to_float(abs_bits) * 512.f;
    return uint8_t(sign | uint32_t(round_half_even(scaled)));  // 8 is the smallest normal, 0x08
  }
  uint32_t result = (((abs_bits >> 23) - 120u) << 3) | ((abs_bits >> 20) & 7u);
  const uint32_t remainder = abs_bits & 0xFFFFFu;
  if (remainder > 0x80000u || (remainder == 0x80000u && (result & 1u))) result += 1u;  // may carry
  return uint8_t(sign | result);  // below 448 rounds to at most 0x7E
}

// ---------------------------------------------------------------------------------------------
// E8M0: the mxfp4 shared exponent
// ---------------------------------------------------------------------------------------------

// Scale exponent of a group with largest magnitude amax (finite, >= 0).
SPOT_HOST_DEVICE int e8m0_exponent(float amax) {
  if (!(amax > 0.f)) return -127;
  const int exponent = floor_log2(amax) - 2;
  return exponent < -127 ? -127 : (exponent > 127 ? 127 : exponent);
}

// 2^(byte - 127) as a float (2^-127 is a float subnormal, exact); 0xFF is NaN.
SPOT_HOST_DEVICE float e8m0_to_float(uint32_t byte) {
  byte &= 0xFFu;
  if (byte == 0xFFu) return quiet_nan();
  if (byte == 0) return bits_to_float(0x00400000u);  // 2^-127
  return bits_to_float(byte << 23);
}

// ---------------------------------------------------------------------------------------------
// int4 with a float16 scale
// ---------------------------------------------------------------------------------------------

SPOT_HOST_DEVICE float int4_to_float(uint32_t nibble) {
  nibble &= 0xFu;
  return float(int(nibble) - ((nibble & 8u) ? 16 : 0));
}

// fp16 bits of amax / 7 (amax finite, >= 0).
SPOT_HOST_DEVICE uint16_t int4_scale_bits(float amax) {
  return float_to_half_bits(float(double(amax) / 7.0));
}

// Nibble of rne(value / scale) saturated to [-8, 7]; scale > 0 (Inf gives 0).
SPOT_HOST_DEVICE uint32_t float_to_int4(double value, double scale) {
  double code = round_half_even(value / scale);
  code = code < -8.0 ? -8.0 : (code > 7.0 ? 7.0 : code);
  return uint32_t(int(code)) & 0xFu;
}

// ---------------------------------------------------------------------------------------------
// Decoding: what the unpack and scoring kernels call
// ---------------------------------------------------------------------------------------------

// Value of one 4-bit code before its scale: int4 integer or E2M1 value.
template <KCacheFormat Format>
SPOT_HOST_DEVICE float decode_nibble(uint32_t nibble) {
  if constexpr (Format == KCacheFormat::kInt4) return int4_to_float(nibble);
  else return e2m1_to_float(nibble);
}

// A group's own scale from its stored bits, without global_scale: fp16 (int4), 2^e (mxfp4),
// E4M3 value (nvfp4). NaN for the NaN encodings.
template <KCacheFormat Format>
SPOT_HOST_DEVICE float decode_block_scale(uint32_t scale_bits) {
  if constexpr (Format == KCacheFormat::kInt4) return half_bits_to_float(uint16_t(scale_bits));
  else if constexpr (Format == KCacheFormat::kMxfp4) return e8m0_to_float(scale_bits);
  else return e4m3_to_float(scale_bits);
}

// The factor a group's nibble values multiply by: decode_block_scale, times global_scale for
// nvfp4 (one float rounding there; see the header comment for the bit-exact order).
template <KCacheFormat Format>
SPOT_HOST_DEVICE float decode_group_scale(uint32_t scale_bits, float global_scale) {
  const float block_scale = decode_block_scale<Format>(scale_bits);
  if constexpr (Format == KCacheFormat::kNvfp4) return block_scale * global_scale;
  else return block_scale;
}

// One stored value, bit-exact with reference.unpack_kcache for every global_scale (the nvfp4
// product runs in double in the reference's order, then rounds to float once more).
template <KCacheFormat Format>
SPOT_HOST_DEVICE float decode_value(uint32_t nibble, uint32_t scale_bits, double global_scale) {
  if constexpr (Format == KCacheFormat::kNvfp4) {
    const double real_scale = double(e4m3_to_float(scale_bits)) * global_scale;
    return float(double(e2m1_to_float(nibble)) * real_scale);
  } else {
    // Exact in float: int4 code (4 bits) * fp16 (11 bits); E2M1 * 2^e (overflow to Inf either way).
    return decode_nibble<Format>(nibble) * decode_block_scale<Format>(scale_bits);
  }
}

struct DecodedPair {
  float low;   // element 2i
  float high;  // element 2i + 1
};

// The two values of one code byte sharing a scale (a group never splits a byte).
template <KCacheFormat Format>
SPOT_HOST_DEVICE DecodedPair decode_byte(uint32_t byte, uint32_t scale_bits, double global_scale) {
  return {decode_value<Format>(byte & 0xFu, scale_bits, global_scale),
          decode_value<Format>((byte >> 4) & 0xFu, scale_bits, global_scale)};
}

// A whole group: codes holds kGroupSize / 2 bytes, out receives kGroupSize floats.
template <KCacheFormat Format>
SPOT_HOST_DEVICE void decode_group(const uint8_t* codes, uint32_t scale_bits, double global_scale, float* out) {
  constexpr int kGroupSize = FormatTraits<Format>::kGroupSize;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kGroupSize / 2; ++i) {
    const DecodedPair pair = decode_byte<Format>(codes[i], scale_bits, global_scale);
    out[2 * i] = pair.low;
    out[2 * i + 1] = pair.high;
  }
}

// ---------------------------------------------------------------------------------------------
// Encoding: one group of kGroupSize values
// ---------------------------------------------------------------------------------------------

// Quantises values[0..kGroupSize) into packed code words (kGroupSize / 8 little-endian uint32
// words, element j at bits 4 * (j % 8) of word j / 8) and returns the scale bits. global_scale
// is used by nvfp4 only and must be positive and finite.
template <KCacheFormat Format>
SPOT_HOST_DEVICE typename FormatTraits<Format>::ScaleBits encode_group(const float* values, double global_scale,
                                                                        uint32_t* code_words) {
  using Traits = FormatTraits<Format>;
  constexpr int kGroupSize = Traits::kGroupSize;
  bool finite = true;
  float amax = 0.f;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kGroupSize; ++i) {
    finite = finite && is_finite(values[i]);
    const float magnitude = values[i] < 0.f ? -values[i] : values[i];
    amax = magnitude > amax ? magnitude : amax;
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int w = 0; w < kGroupSize / 8; ++w) code_words[w] = 0u;
  if (!finite) return Traits::kNanScale;

  typename Traits::ScaleBits scale_bits;
  double divisor;      // codes quantise values[i] / divisor
  bool zero_codes;     // scale 0: every code 0
  if constexpr (Format == KCacheFormat::kInt4) {
    scale_bits = int4_scale_bits(amax);
    divisor = double(half_bits_to_float(scale_bits));
    zero_codes = !(divisor > 0.0);
  } else if constexpr (Format == KCacheFormat::kMxfp4) {
    const int exponent = e8m0_exponent(amax);
    scale_bits = uint8_t(exponent + 127);
    divisor = exp2_int(exponent);
    zero_codes = false;  // amax == 0 quantises to zeros on its own
  } else {
    double block = double(amax) / 6.0 / global_scale;
    block = block > 448.0 ? 448.0 : block;  // same as clamping after the float rounding
    scale_bits = float_to_e4m3(float(block));
    divisor = double(e4m3_to_float(scale_bits)) * global_scale;
    zero_codes = !(divisor > 0.0);
  }
  if (zero_codes) return scale_bits;

#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kGroupSize; ++i) {
    uint32_t code;
    if constexpr (Format == KCacheFormat::kInt4) code = float_to_int4(double(values[i]), divisor);
    else code = float_to_e2m1(double(values[i]) / divisor);
    code_words[i / 8] |= code << (4 * (i % 8));
  }
  return scale_bits;
}

}  // namespace kcache
}  // namespace spot
