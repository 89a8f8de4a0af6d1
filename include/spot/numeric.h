// Scalar types shared by host and device code, and their conversions to float.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SPOT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPOT_HOST_DEVICE inline
#endif

#include <cstdint>
#include <cstring>

namespace spot {

#if defined(__CUDACC__)
using half_t = __half;
using bfloat16_t = __nv_bfloat16;
#else
// Host-only stand-ins with the same bit layout as the CUDA types (the C++ reference kernels
// never do arithmetic in 16 bits: they convert to float first).
struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };
#endif

SPOT_HOST_DEVICE float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

SPOT_HOST_DEVICE uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// IEEE binary16 -> float, exact for every input (subnormals, Inf, NaN).
SPOT_HOST_DEVICE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Subnormal or zero: mantissa * 2^-24, exact in float.
  const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
}

// float -> IEEE binary16, round to nearest even, overflow to Inf, NaN kept.
SPOT_HOST_DEVICE uint16_t float_to_half_bits(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits >= 0x7F800000u) return sign | (abs_bits > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (abs_bits >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504
  if (abs_bits < 0x38800000u) {  // below the smallest normal half: 2^-14
    // Subnormal: value / 2^-24 rounded to nearest even integer.
    const float scaled = bits_to_float(abs_bits) * 16777216.f;
    float rounded = float(int32_t(scaled));
    const float fraction = scaled - rounded;
    if (fraction > 0.5f || (fraction == 0.5f && (int32_t(rounded) & 1))) rounded += 1.f;
    return sign | uint16_t(rounded);
  }
  const uint32_t exponent = ((abs_bits >> 23) - 112u) << 10;
  const uint32_t mantissa = (abs_bits >> 13) & 0x3FFu;
  uint32_t result = exponent | mantissa;
  const uint32_t remainder = abs_bits & 0x1FFFu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) result += 1u;
  return sign | uint16_t(result);
}

SPOT_HOST_DEVICE float bfloat16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

SPOT_HOST_DEVICE uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}

template <typename T>
SPOT_HOST_DEVICE float to_float(T value);

template <>
SPOT_HOST_DEVICE float to_float<float>(float value) { return value; }

#if defined(__CUDACC__)
template <>
SPOT_HOST_DEVICE float to_float<half_t>(half_t value) { return __half2float(value); }
template <>
SPOT_HOST_DEVICE float to_float<bfloat16_t>(bfloat16_t value) { return __bfloat162float(value); }
#else
template <>
SPOT_HOST_DEVICE float to_float<half_t>(half_t value) { return half_bits_to_float(value.bits); }
template <>
SPOT_HOST_DEVICE float to_float<bfloat16_t>(bfloat16_t value) {
  return bfloat16_bits_to_float(value.bits);
}
#endif

template <typename T>
SPOT_HOST_DEVICE T from_float(float value);

template <>
SPOT_HOST_DEVICE float from_float<float>(float value) { return value; }

#if defined(__CUDACC__)
template <>
SPOT_HOST_DEVICE half_t from_float<half_t>(float value) { return __float2half_rn(value); }
template <>
SPOT_HOST_DEVICE bfloat16_t from_float<bfloat16_t>(float value) { return __float2bfloat16_rn(value); }
#else
template <>
SPOT_HOST_DEVICE half_t from_float<half_t>(float value) { return half_t{float_to_half_bits(value)}; }
template <>
SPOT_HOST_DEVICE bfloat16_t from_float<bfloat16_t>(float value) {
  return bfloat16_t{float_to_bfloat16_bits(value)};
}
#endif

}  // namespace spot
