// Entry of spot.decode_select: the fused decode path (selector_score + select_blocks for one query
// per sequence and KV head, reading the dense or packed selector K-cache). Validates, fills
// DecodeSelectParams, allocates (indices, counts) and runs the CPU kernel or the CUDA launcher.
// The CUDA path allocates nothing but its outputs and never syncs, so it can be graph-captured.
#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>

#include "launchers.h"
#include "ops.h"
#include "select_validation.h"
#include "torch_utils.h"

namespace spot {

namespace {
constexpr const char* kOp = "decode_select";
}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_select(const at::Tensor& query, const at::Tensor& keys,
                                                 const std::optional<at::Tensor>& key_scales,
                                                 const at::Tensor& seq_lens, int64_t block_size,
                                                 std::string_view format, double global_scale,
                                                 double softmax_scale, double top_p, int64_t k_min,
                                                 int64_t k_max, int64_t sink_blocks, int64_t local_blocks) {
  const bool on_cuda = query.is_cuda();
  SPOT_CHECK_ARG(on_cuda || query.is_cpu(), kOp, "query", "must be on CPU or CUDA, got ", query.device());
  check_dim(query, 3, kOp, "query", "[batch, heads, dim]");
  const DType query_dtype = to_spot_dtype(query, /*allow_float32=*/true, kOp, "query");
  check_contiguous(query, kOp, "query");
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  SPOT_CHECK_ARG(dim > 0, kOp, "query", "last dim (selector dim) must be positive, got shape ", query.sizes());
  const KCacheFormat kcache_format = parse_kcache_format(format, /*allow_dense=*/true, kOp);
  check_selector_keys(kOp, keys, key_scales, kcache_format, query, batch, heads, dim, global_scale);
  const int64_t width = keys.size(2);
  check_device(seq_lens, query, kOp, "seq_lens");
  check_dim(seq_lens, 1, kOp, "seq_lens", "[batch]");
  check_dtype(seq_lens, at::kInt, kOp, "seq_lens");
  check_contiguous(seq_lens, kOp, "seq_lens");
  check_size(seq_lens, 0, batch, kOp, "seq_lens", "batch, as query");
  check_positive(block_size, kOp, "block_size");
  SPOT_CHECK_ARG(block_size <= INT32_MAX, kOp, "block_size", "must be below 2^31, got ", block_size);
  SPOT_CHECK_ARG(std::isfinite(softmax_scale) && softmax_scale > 0, kOp, "softmax_scale",
                 "must be positive and finite, got ", softmax_scale);
  check_select_knobs(kOp, top_p, k_min, k_max, sink_blocks, local_blocks);
  SPOT_CHECK_ARG(batch * heads * width * dim <= INT32_MAX && batch * heads * k_max <= INT32_MAX, kOp, "keys",
                 "must hold fewer than 2^31 values (and batch * heads * k_max < 2^31), got shape ", keys.sizes());
  if (on_cuda) {
#ifdef SPOT_WITH_CUDA
    SPOT_CHECK_ARG(width <= select_blocks_cuda_max_key_blocks(), kOp, "keys",
                   "dim 2 (num_key_blocks) must be at most ", select_blocks_cuda_max_key_blocks(),
                   " on CUDA, got shape ", keys.sizes());
    SPOT_CHECK_ARG(dim <= 1024, kOp, "query", "last dim (selector dim) must be at most 1024 on CUDA, got shape ",
                   query.sizes());
    SPOT_CHECK_ARG(batch <= 65535 && heads <= INT32_MAX, kOp, "query", "dim 0 (batch) must be at most 65535 on CUDA, got shape ",
                   query.sizes());
#endif
  } else {
    // Data-dependent check, CPU only: on CUDA it would need a host sync (and break graph
    // capture), so the kernel reads a negative length as 0 instead.
    const int32_t* lengths = seq_lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      SPOT_CHECK_ARG(lengths[b] >= 0, kOp, "seq_lens", "entry ", b, " = ", lengths[b], " must be non-negative");
    }
  }

  at::Tensor indices = at::empty({batch, heads, k_max}, query.options().dtype(at::kInt));
  at::Tensor counts = at::empty({batch, heads}, query.options().dtype(at::kInt));
  if (counts.numel() == 0) return {indices, counts};

  DecodeSelectParams params;
  params.query = query.data_ptr();
  params.keys = keys.data_ptr();
  params.key_scales = key_scales.has_value() ? key_scales->data_ptr() : nullptr;
  params.seq_lens = seq_lens.data_ptr<int32_t>();
  params.indices = indices.data_ptr<int32_t>();
  params.counts = counts.data_ptr<int32_t>();
  params.batch = int(batch);
  params.heads = int(heads);
  params.num_key_blocks = int(width);
  params.dim = int(dim);
  params.block_size = int(block_size);
  params.query_dtype = query_dtype;
  params.key_dtype = kcache_format == KCacheFormat::kDense ? to_spot_dtype(keys, true, kOp, "keys") : DType::kFloat32;
  params.format = kcache_format;
  params.global_scale = float(global_scale);
  params.softmax_scale = float(softmax_scale);
  params.top_p = top_p;
  params.k_min = int(k_min);
  params.k_max = int(k_max);
  params.sink_blocks = int(sink_blocks);
  params.local_blocks = int(local_blocks);

  run_on_device(params, query, kOp, "query", decode_select_cpu, SPOT_CUDA_LAUNCHER(decode_select_cuda));
  return {indices, counts};
}

}  // namespace spot
