// Selector keys as floats, dense or packed 4-bit (spot/kcache_format.h), for the scoring kernels
// on host and device. A packed value is (nibble * block scale) [* global_scale for nvfp4] in
// float, in that order: bit-exact with unpack_kcache when global_scale is a float, and the same
// on CPU and CUDA, so both devices score (and therefore select) identically.
#pragma once

#include <cstdint>

#include "spot/kcache_format.h"
#include "spot/numeric.h"
#include "spot/params.h"

namespace spot {

template <KCacheFormat Format>
SPOT_HOST_DEVICE float packed_key_value(uint32_t nibble, float block_scale, float global_scale) {
  const float value = kcache::decode_nibble<Format>(nibble) * block_scale;
  if constexpr (Format == KCacheFormat::kNvfp4) {
    return value * global_scale;
  } else {
    return value;
  }
}

// Stored scale bits of group `group` of a packed row's scales (fp16 bits for int4, a byte else).
template <KCacheFormat Format>
SPOT_HOST_DEVICE uint32_t packed_scale_bits(const void* scales_row, int group) {
  if constexpr (Format == KCacheFormat::kInt4) {
    return static_cast<const uint16_t*>(scales_row)[group];
  } else {
    return static_cast<const uint8_t*>(scales_row)[group];
  }
}

// One packed key row (dim values: dim / 2 code bytes, dim / group scales) into out[0, dim).
template <KCacheFormat Format>
SPOT_HOST_DEVICE void decode_packed_key_row(const uint8_t* codes_row, const void* scales_row, int dim,
                                            float global_scale, float* out) {
  constexpr int kGroup = kcache::FormatTraits<Format>::kGroupSize;
  for (int group = 0; group < dim / kGroup; ++group) {
    const float block_scale = kcache::decode_block_scale<Format>(packed_scale_bits<Format>(scales_row, group));
    for (int i = 0; i < kGroup / 2; ++i) {
      const uint32_t byte = codes_row[group * (kGroup / 2) + i];
      out[group * kGroup + 2 * i] = packed_key_value<Format>(byte & 0xFu, block_scale, global_scale);
      out[group * kGroup + 2 * i + 1] = packed_key_value<Format>(byte >> 4, block_scale, global_scale);
    }
  }
}

// Bytes of one scale of a packed format.
inline constexpr int packed_scale_bytes(KCacheFormat format) { return format == KCacheFormat::kInt4 ? 2 : 1; }

}  // namespace spot
