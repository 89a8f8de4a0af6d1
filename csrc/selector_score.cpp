// Entry of spot.selector_score: validates query rows, the (dense or packed) selector keys and the
// visibility counts, fills SelectorScoreParams and runs the CPU kernel or the CUDA launcher.
#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>

#include "launchers.h"
#include "ops.h"
#include "select_validation.h"
#include "torch_utils.h"

namespace spot {

namespace {
constexpr const char* kOp = "selector_score";
}  // namespace

at::Tensor selector_score(const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& key_scales,
                          const at::Tensor& num_visible, std::string_view format, double global_scale,
                          double softmax_scale) {
  const bool on_cuda = query.is_cuda();
  SPOT_CHECK_ARG(on_cuda || query.is_cpu(), kOp, "query", "must be on CPU or CUDA, got ", query.device());
  check_dim(query, 4, kOp, "query", "[batch, heads, num_query_rows, dim]");
  const DType query_dtype = to_spot_dtype(query, /*allow_float32=*/true, kOp, "query");
  check_contiguous(query, kOp, "query");
  const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2), dim = query.size(3);
  SPOT_CHECK_ARG(dim > 0, kOp, "query", "last dim (selector dim) must be positive, got shape ", query.sizes());
  const KCacheFormat kcache_format = parse_kcache_format(format, /*allow_dense=*/true, kOp);
  check_selector_keys(kOp, keys, key_scales, kcache_format, query, batch, heads, dim, global_scale);
  const int64_t width = keys.size(2);
  check_device(num_visible, query, kOp, "num_visible");
  check_dim(num_visible, 2, kOp, "num_visible", "[batch, num_query_rows]");
  check_dtype(num_visible, at::kInt, kOp, "num_visible");
  check_contiguous(num_visible, kOp, "num_visible");
  check_size(num_visible, 0, batch, kOp, "num_visible", "batch, as query");
  check_size(num_visible, 1, rows, kOp, "num_visible", "num_query_rows, as query");
  SPOT_CHECK_ARG(std::isfinite(softmax_scale) && softmax_scale > 0, kOp, "softmax_scale",
                 "must be positive and finite, got ", softmax_scale);
  SPOT_CHECK_ARG(batch * heads * rows * width <= INT32_MAX && batch * heads * width * dim <= INT32_MAX &&
                     query.numel() <= INT32_MAX,
                 kOp, "query", "and keys must give fewer than 2^31 scores and key values, got shapes ",
                 query.sizes(), " and ", keys.sizes());
  if (!on_cuda) {
    // Data-dependent check, CPU only: on CUDA it would need a host sync, so the kernel clamps
    // each row's count into [0, num_key_blocks] instead.
    const int32_t* visible = num_visible.data_ptr<int32_t>();
    for (int64_t i = 0; i < num_visible.numel(); ++i) {
      SPOT_CHECK_ARG(visible[i] >= 0 && visible[i] <= width, kOp, "num_visible", "entry [", i / rows, ", ",
                     i % rows, "] = ", visible[i], " must be in [0, ", width, "] (num_key_blocks)");
    }
  }

  at::Tensor scores = at::empty({batch, heads, rows, width}, query.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;

  SelectorScoreParams params;
  params.query = query.data_ptr();
  params.keys = keys.data_ptr();
  params.key_scales = key_scales.has_value() ? key_scales->data_ptr() : nullptr;
  params.num_visible = num_visible.data_ptr<int32_t>();
  params.scores = scores.data_ptr<float>();
  params.batch = int(batch);
  params.heads = int(heads);
  params.num_query_rows = int(rows);
  params.num_key_blocks = int(width);
  params.dim = int(dim);
  params.query_dtype = query_dtype;
  params.key_dtype = kcache_format == KCacheFormat::kDense ? to_spot_dtype(keys, true, kOp, "keys") : DType::kFloat32;
  params.format = kcache_format;
  params.global_scale = float(global_scale);
  params.softmax_scale = float(softmax_scale);

  run_on_device(params, query, kOp, "query", selector_score_cpu, SPOT_CUDA_LAUNCHER(selector_score_cuda));
  return scores;
}

}  // namespace spot
