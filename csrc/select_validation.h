// Checks shared by the selection entries (select_blocks, decode_select, selector_score): the
// dual top-p knobs and the selector-key layouts (dense or packed 4-bit).
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "torch_utils.h"

namespace spot {

inline void check_select_knobs(const char* op, double top_p, int64_t k_min, int64_t k_max, int64_t sink_blocks,
                               int64_t local_blocks) {
  SPOT_CHECK_ARG(std::isfinite(top_p) && top_p >= 0 && top_p <= 1, op, "top_p", "must be in [0, 1], got ", top_p);
  SPOT_CHECK_ARG(sink_blocks >= 0 && sink_blocks <= INT32_MAX, op, "sink_blocks", "must be in [0, 2^31), got ",
                 sink_blocks);
  SPOT_CHECK_ARG(local_blocks >= 0 && local_blocks <= INT32_MAX, op, "local_blocks", "must be in [0, 2^31), got ",
                 local_blocks);
  SPOT_CHECK_ARG(k_max >= 0 && k_max <= INT32_MAX, op, "k_max", "must be in [0, 2^31), got ", k_max);
  SPOT_CHECK_ARG(k_max >= sink_blocks + local_blocks, op, "k_max", "must be at least sink_blocks + local_blocks = ",
                 sink_blocks + local_blocks, " (forced blocks always fit), got ", k_max);
  SPOT_CHECK_ARG(k_min >= 0 && k_min <= k_max, op, "k_min", "must be in [0, k_max = ", k_max, "], got ", k_min);
}

// Selector keys of a [batch, heads, rows, dim] query: dense [batch, heads, num_key_blocks, dim] in
// a float dtype, or packed uint8 codes [..., dim / 2] with key_scales [..., dim / group]
// (float16 for int4, uint8 for mxfp4 / nvfp4). `leading` is the expected (batch, heads).
inline void check_selector_keys(const char* op, const at::Tensor& keys, const std::optional<at::Tensor>& key_scales,
                                KCacheFormat format, const at::Tensor& query, int64_t batch, int64_t heads,
                                int64_t dim, double global_scale) {
  check_device(keys, query, op, "keys");
  check_dim(keys, 4, op, "keys",
            format == KCacheFormat::kDense ? "[batch, heads, num_key_blocks, dim]"
                                           : "[batch, heads, num_key_blocks, dim / 2] (packed codes)");
  check_contiguous(keys, op, "keys");
  check_size(keys, 0, batch, op, "keys", "batch, as query");
  check_size(keys, 1, heads, op, "keys", "heads, as query");
  if (format == KCacheFormat::kDense) {
    SPOT_CHECK_ARG(!key_scales.has_value(), op, "key_scales", "must be None for format 'dense'");
    to_spot_dtype(keys, /*allow_float32=*/true, op, "keys");
    check_size(keys, 3, dim, op, "keys", "dim, as query");
    return;
  }
  SPOT_CHECK_ARG(dim % 32 == 0, op, "query", "last dim (selector dim) must be a multiple of 32 for packed keys, got ",
                 dim);
  check_dtype(keys, at::kByte, op, "keys");
  check_size(keys, 3, dim / 2, op, "keys", "dim / 2 packed bytes");
  SPOT_CHECK_ARG(key_scales.has_value(), op, "key_scales", "is required for packed keys");
  const at::Tensor& scales = *key_scales;
  check_device(scales, query, op, "key_scales");
  check_dtype(scales, format == KCacheFormat::kInt4 ? at::kHalf : at::kByte, op, "key_scales");
  check_dim(scales, 4, op, "key_scales", "[batch, heads, num_key_blocks, dim / group]");
  check_contiguous(scales, op, "key_scales");
  check_size(scales, 0, batch, op, "key_scales", "batch, as keys");
  check_size(scales, 1, heads, op, "key_scales", "heads, as keys");
  check_size(scales, 2, keys.size(2), op, "key_scales", "num_key_blocks, as keys");
  check_size(scales, 3, dim / kcache_group_size(format), op, "key_scales", "dim / group");
  if (format == KCacheFormat::kNvfp4) {
    SPOT_CHECK_ARG(std::isfinite(global_scale) && global_scale > 0, op, "global_scale",
                   "must be positive and finite for nvfp4, got ", global_scale);
  }
  if (keys.is_cuda()) {
    // Packed rows are read with 16-byte vector loads.
    SPOT_CHECK_ARG(reinterpret_cast<uintptr_t>(keys.data_ptr()) % 16 == 0, op, "keys",
                   "must be 16-byte aligned on CUDA");
  }
}

}  // namespace spot
