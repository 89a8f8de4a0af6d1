// Host-side dequantisation of selector keys shared by the CPU kernels of selector_score and
// decode_select: rows [row_begin, row_end) of a [rows, dim] key tensor (dense or packed) as floats.
#pragma once

#include <cstdint>

#include "spot/dispatch.h"
#include "spot/selector_keys.h"

namespace spot {

inline void selector_keys_to_float(const void* keys, const void* key_scales, KCacheFormat format, DType key_dtype,
                                   int dim, float global_scale, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t rows = row_end - row_begin;
  switch (format) {
    case KCacheFormat::kDense: {
      SPOT_DISPATCH_FLOAT(key_dtype, scalar_t, {
        const scalar_t* source = static_cast<const scalar_t*>(keys) + row_begin * dim;
        for (int64_t i = 0; i < rows * dim; ++i) out[i] = to_float(source[i]);
      });
      return;
    }
#define SPOT_DECODE_ROWS(FORMAT)                                                                         \
  {                                                                                                      \
    constexpr int kGroup = kcache::FormatTraits<FORMAT>::kGroupSize;                                     \
    const auto* codes = static_cast<const uint8_t*>(keys);                                               \
    const auto* scales = static_cast<const uint8_t*>(key_scales);                                        \
    const int64_t scale_row_bytes = int64_t(dim / kGroup) * packed_scale_bytes(FORMAT);                  \
    for (int64_t row = row_begin; row < row_end; ++row) {                                                \
      decode_packed_key_row<FORMAT>(codes + row * (dim / 2), scales + row * scale_row_bytes, dim,        \
                                    global_scale, out + (row - row_begin) * dim);                        \
    }                                                                                                    \
    return;                                                                                              \
  }
    case KCacheFormat::kInt4: SPOT_DECODE_ROWS(KCacheFormat::kInt4)
    case KCacheFormat::kMxfp4: SPOT_DECODE_ROWS(KCacheFormat::kMxfp4)
    case KCacheFormat::kNvfp4: SPOT_DECODE_ROWS(KCacheFormat::kNvfp4)
#undef SPOT_DECODE_ROWS
  }
}

}  // namespace spot
