// spot.block_mass entry: the distillation teacher. Validates the packed varlen inputs once, fills
// BlockMassParams and runs the CPU reference kernel or the CUDA kernel by device.
#include <cmath>
#include <vector>

#include <ATen/ATen.h>

#include "launchers.h"
#include "ops.h"
#include "torch_utils.h"

namespace spot {

namespace {

constexpr const char* kOp = "block_mass";

bool is_power_of_two(int64_t value) { return value > 0 && (value & (value - 1)) == 0; }

// Checks the sequence boundaries on the host (a small device-to-host copy on CUDA) so a bad
// cu_seqlens is a ValueError instead of an out-of-bounds read in the kernel.
void check_cu_seqlens(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t max_seqlen) {
  const at::Tensor bounds_tensor = cu_seqlens.to(at::kCPU);
  const int32_t* bounds = bounds_tensor.data_ptr<int32_t>();
  const int64_t count = bounds_tensor.numel();
  SPOT_CHECK_ARG(bounds[0] >= 0, kOp, "cu_seqlens", "must start at a non-negative row, got ", bounds[0]);
  for (int64_t b = 0; b + 1 < count; ++b) {
    const int64_t length = int64_t(bounds[b + 1]) - bounds[b];
    SPOT_CHECK_ARG(length >= 0, kOp, "cu_seqlens", "must be non-decreasing, got ", bounds[b], " then ",
                   bounds[b + 1], " at index ", b);
    SPOT_CHECK_ARG(length <= max_seqlen, kOp, "max_seqlen", "must be at least the longest sequence (",
                   length, " tokens at index ", b, "), got ", max_seqlen);
  }
  SPOT_CHECK_ARG(bounds[count - 1] <= total_tokens, kOp, "cu_seqlens", "must end at most at ", total_tokens,
                 " (query rows), got ", bounds[count - 1]);
}

}  // namespace

at::Tensor block_mass(const at::Tensor& query, const at::Tensor& key, const at::Tensor& cu_seqlens,
                      int64_t max_seqlen, int64_t block_size_q, int64_t block_size_k, double softmax_scale) {
  check_dim(query, 3, kOp, "query", "[total_tokens, heads_q, head_dim]");
  check_dim(key, 3, kOp, "key", "[total_tokens, heads_kv, head_dim]");
  check_dim(cu_seqlens, 1, kOp, "cu_seqlens", "[batch + 1]");
  check_device(key, query, kOp, "key");
  check_device(cu_seqlens, query, kOp, "cu_seqlens");
  const bool on_cuda = query.is_cuda();
  SPOT_CHECK_ARG(on_cuda || query.is_cpu(), kOp, "query", "must be on CPU or CUDA, got ", query.device());
  const DType dtype = to_spot_dtype(query, /*allow_float32=*/!on_cuda, kOp, "query");
  check_dtype(key, query.scalar_type(), kOp, "key");
  check_dtype(cu_seqlens, at::kInt, kOp, "cu_seqlens");
  check_contiguous(query, kOp, "query");
  check_contiguous(key, kOp, "key");

  const int64_t total_tokens = query.size(0);
  const int64_t heads_q = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t heads_kv = key.size(1);
  check_size(key, 0, total_tokens, kOp, "key", "total_tokens, as query");
  check_size(key, 2, head_dim, kOp, "key", "head_dim, as query");
  SPOT_CHECK_ARG(heads_kv > 0 && heads_q > 0 && heads_q % heads_kv == 0, kOp, "key",
                 "dim 1 (heads_kv) must divide query's heads_q = ", heads_q, ", got shape ", key.sizes());
  SPOT_CHECK_ARG(head_dim > 0, kOp, "query", "dim 2 (head_dim) must be positive, got shape ", query.sizes());
  SPOT_CHECK_ARG(cu_seqlens.numel() >= 1, kOp, "cu_seqlens", "must hold batch + 1 >= 1 entries, got none");
  SPOT_CHECK_ARG(total_tokens <= INT32_MAX, kOp, "query", "dim 0 (total_tokens) must fit int32, got ",
                 total_tokens);
  SPOT_CHECK_ARG(max_seqlen >= 0 && max_seqlen <= INT32_MAX, kOp, "max_seqlen",
                 "must be in [0, 2^31), got ", max_seqlen);
  SPOT_CHECK_ARG(block_size_q >= 1 && block_size_q <= 256, kOp, "block_size_q", "must be in [1, 256], got ",
                 block_size_q);
  SPOT_CHECK_ARG(block_size_k >= 16 && block_size_k <= 256, kOp, "block_size_k",
                 "must be in [16, 256], got ", block_size_k);
  SPOT_CHECK_ARG(std::isfinite(softmax_scale) && softmax_scale > 0, kOp, "softmax_scale",
                 "must be positive and finite, got ", softmax_scale);
  if (on_cuda) {
    SPOT_CHECK_ARG(head_dim == 64 || head_dim == 128 || head_dim == 256, kOp, "query",
                   "dim 2 (head_dim) must be 64, 128 or 256 on CUDA, got shape ", query.sizes());
    SPOT_CHECK_ARG(is_power_of_two(block_size_k), kOp, "block_size_k",
                   "must be a power of two (16, 32, 64, 128 or 256) on CUDA, got ", block_size_k);
    SPOT_CHECK_ARG(reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 == 0, kOp, "query",
                   "must be 16-byte aligned on CUDA");
    SPOT_CHECK_ARG(reinterpret_cast<uintptr_t>(key.data_ptr()) % 16 == 0, kOp, "key",
                   "must be 16-byte aligned on CUDA");
  }
  check_cu_seqlens(cu_seqlens, total_tokens, max_seqlen);

  const int64_t batch = cu_seqlens.numel() - 1;
  const int64_t num_query_blocks = (max_seqlen + block_size_q - 1) / block_size_q;
  const int64_t num_key_blocks = (max_seqlen + block_size_k - 1) / block_size_k;
  // Zeros: entries outside a sequence or its causal range are never written, and the CUDA
  // kernel accumulates into the output with atomics.
  at::Tensor mass = at::zeros({batch, heads_kv, num_query_blocks, num_key_blocks},
                              query.options().dtype(at::kFloat));
  if (mass.numel() == 0 || total_tokens == 0) return mass;

  BlockMassParams params;
  params.query = query.data_ptr();
  params.key = key.data_ptr();
  params.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  params.mass = mass.data_ptr<float>();
  params.batch = int(batch);
  params.total_tokens = int(total_tokens);
  params.heads_q = int(heads_q);
  params.heads_kv = int(heads_kv);
  params.head_dim = int(head_dim);
  params.max_seqlen = int(max_seqlen);
  params.block_size_q = int(block_size_q);
  params.block_size_k = int(block_size_k);
  params.num_query_blocks = int(num_query_blocks);
  params.num_key_blocks = int(num_key_blocks);
  params.dtype = dtype;
  params.softmax_scale = float(softmax_scale);

  run_on_device(params, query, kOp, "query", block_mass_cpu, SPOT_CUDA_LAUNCHER(block_mass_cuda));
  return mass;
}

}  // namespace spot
