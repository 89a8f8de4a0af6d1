// Host-side dequantisation of selector keys shared by the CPU kernels of selector_score and
// decode_select: rows [row_begin, row_end) of a [rows, dim] key tensor (dense or packed) as floats.
#pragma once

#include <cstdint>

#include "spot/dispatch.h"
#include "spot/selector_keys.h"

namespace spot {

template <KCacheFormat Format>
void packed_keys_to_float(const uint8_t* codes, const uint8_t* scales, int dim, float global_scale, int64_t row_begin,
                          int64_t row_end, float* out) {
  const int64_t scale_row_bytes = int64_t(dim / kcache::FormatTraits<Format>::kGroupSize) * packed_scale_bytes(Format);
  for (int64_t row = row_begin; row < row_end; ++row) {
    decode_packed_key_row<Format>(codes + row * (dim / 2), scales + row * scale_row_bytes, dim, global_scale,
                                  out + (row - row_begin) * dim);
  }
}

inline void selector_keys_to_float(const void* keys, const void* key_scales, KCacheFormat format, DType key_dtype,
                                   int dim, float global_scale, int64_t row_begin, int64_t row_end, float* out) {
  SPOT_DISPATCH_KCACHE_FORMAT_OR_DENSE(format, kFormat, {
    if constexpr (kFormat == KCacheFormat::kDense) {
      SPOT_DISPATCH_FLOAT(key_dtype, scalar_t, {
        const scalar_t* source = static_cast<const scalar_t*>(keys) + row_begin * dim;
        for (int64_t i = 0; i < (row_end - row_begin) * dim; ++i) out[i] = to_float(source[i]);
      });
    } else {
      packed_keys_to_float<kFormat>(static_cast<const uint8_t*>(keys), static_cast<const uint8_t*>(key_scales), dim,
                                    global_scale, row_begin, row_end, out);
    }
  });
}

}  // namespace spot
