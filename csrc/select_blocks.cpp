// Entry of spot.select_blocks: validates the logits and the policy knobs, fills
// SelectBlocksParams, allocates (indices, counts) and runs the CPU kernel or the CUDA launcher.
#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>

#include "launchers.h"
#include "ops.h"
#include "select_validation.h"
#include "torch_utils.h"

namespace spot {

namespace {
constexpr const char* kOp = "select_blocks";
}  // namespace

std::tuple<at::Tensor, at::Tensor> select_blocks(const at::Tensor& scores, const at::Tensor& num_visible,
                                                 double top_p, int64_t k_min, int64_t k_max,
                                                 int64_t sink_blocks, int64_t local_blocks) {
  const bool on_cuda = scores.is_cuda();
  SPOT_CHECK_ARG(on_cuda || scores.is_cpu(), kOp, "scores", "must be on CPU or CUDA, got ", scores.device());
  check_dim(scores, 4, kOp, "scores", "[batch, heads, num_query_rows, num_key_blocks]");
  check_dtype(scores, at::kFloat, kOp, "scores");
  check_contiguous(scores, kOp, "scores");
  check_device(num_visible, scores, kOp, "num_visible");
  check_dim(num_visible, 2, kOp, "num_visible", "[batch, num_query_rows]");
  check_dtype(num_visible, at::kInt, kOp, "num_visible");
  check_contiguous(num_visible, kOp, "num_visible");
  const int64_t batch = scores.size(0), heads = scores.size(1), rows = scores.size(2), width = scores.size(3);
  check_size(num_visible, 0, batch, kOp, "num_visible", "batch, as scores");
  check_size(num_visible, 1, rows, kOp, "num_visible", "num_query_rows, as scores");
  SPOT_CHECK_ARG(scores.numel() <= INT32_MAX && batch * heads * rows <= INT32_MAX, kOp, "scores",
                 "must have fewer than 2^31 elements, got shape ", scores.sizes());
  check_select_knobs(kOp, top_p, k_min, k_max, sink_blocks, local_blocks);
  if (on_cuda) {
#ifdef SPOT_WITH_CUDA
    SPOT_CHECK_ARG(width <= select_blocks_cuda_max_key_blocks(), kOp, "scores",
                   "dim 3 (num_key_blocks) must be at most ", select_blocks_cuda_max_key_blocks(),
                   " on CUDA, got shape ", scores.sizes());
#endif
  } else {
    // Data-dependent check, CPU only: on CUDA it would need a host sync, so the kernel clamps
    // each row's count into [0, num_key_blocks] instead.
    const int32_t* visible = num_visible.data_ptr<int32_t>();
    for (int64_t i = 0; i < num_visible.numel(); ++i) {
      SPOT_CHECK_ARG(visible[i] >= 0 && visible[i] <= width, kOp, "num_visible", "entry [", i / rows, ", ",
                     i % rows, "] = ", visible[i], " must be in [0, ", width, "] (num_key_blocks)");
    }
  }

  at::Tensor indices = at::empty({batch, heads, rows, k_max}, scores.options().dtype(at::kInt));
  at::Tensor counts = at::empty({batch, heads, rows}, scores.options().dtype(at::kInt));
  if (counts.numel() == 0) return {indices, counts};

  SelectBlocksParams params;
  params.scores = scores.data_ptr<float>();
  params.num_visible = num_visible.data_ptr<int32_t>();
  params.indices = indices.data_ptr<int32_t>();
  params.counts = counts.data_ptr<int32_t>();
  params.batch = int(batch);
  params.heads = int(heads);
  params.num_query_rows = int(rows);
  params.num_key_blocks = int(width);
  params.top_p = top_p;
  params.k_min = int(k_min);
  params.k_max = int(k_max);
  params.sink_blocks = int(sink_blocks);
  params.local_blocks = int(local_blocks);

  run_on_device(params, scores, kOp, "scores", select_blocks_cpu, SPOT_CUDA_LAUNCHER(select_blocks_cuda));
  return {indices, counts};
}

}  // namespace spot
