// spot.sparse_prefill entry: validates the packed varlen inputs once, fills SparsePrefillParams
// and runs the CPU reference kernel or the CUDA launcher by device.
#include <cmath>
#include <tuple>

#include <ATen/ATen.h>

#include "launchers.h"
#include "ops.h"
#include "torch_utils.h"

namespace spot {

namespace {

constexpr const char* kOp = "sparse_prefill";

// Sequence bounds are checked against the tensors on the CPU, where reading them is free. On
// CUDA that would cost a device sync per call (and break graph capture), so the kernel trusts
// them as FlashAttention's varlen API does, only clamping each sequence into [0, total_tokens).
void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t max_seqlen) {
  const int32_t* bounds = cu_seqlens.data_ptr<int32_t>();
  const int64_t batch = cu_seqlens.size(0) - 1;
  SPOT_CHECK_ARG(bounds[0] == 0, kOp, "cu_seqlens", "must start at 0, got ", bounds[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = int64_t(bounds[b + 1]) - bounds[b];
    SPOT_CHECK_ARG(length >= 0, kOp, "cu_seqlens", "must be non-decreasing, got ", bounds[b], " then ",
                   bounds[b + 1], " at index ", b);
    SPOT_CHECK_ARG(length <= max_seqlen, kOp, "max_seqlen", "must be at least every sequence's length (",
                   length, " for sequence ", b, "), got ", max_seqlen);
  }
  SPOT_CHECK_ARG(bounds[batch] == total_tokens, kOp, "cu_seqlens",
                 "must end at query.size(0) = ", total_tokens, ", got ", bounds[batch]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_prefill(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const at::Tensor& cu_seqlens,
                                                  int64_t max_seqlen, const at::Tensor& block_indices,
                                                  const at::Tensor& block_counts, int64_t block_size,
                                                  double softmax_scale) {
  const bool on_cuda = query.is_cuda();
  check_dim(query, 3, kOp, "query", "[total_tokens, heads_q, head_dim]");
  check_dim(key, 3, kOp, "key", "[total_tokens, heads_kv, head_dim]");
  check_dim(value, 3, kOp, "value", "[total_tokens, heads_kv, head_dim]");
  check_dim(cu_seqlens, 1, kOp, "cu_seqlens", "[batch + 1]");
  check_dim(block_indices, 4, kOp, "block_indices", "[batch, heads_kv, num_query_blocks, max_selected]");
  check_dim(block_counts, 3, kOp, "block_counts", "[batch, heads_kv, num_query_blocks]");
  for (const auto& [tensor, name] : {std::pair{&key, "key"}, std::pair{&value, "value"},
                                     std::pair{&cu_seqlens, "cu_seqlens"},
                                     std::pair{&block_indices, "block_indices"},
                                     std::pair{&block_counts, "block_counts"}}) {
    check_device(*tensor, query, kOp, name);
  }
  // fp32 is for exact CPU references; the CUDA kernels run 16-bit tensor-core MMAs.
  const DType dtype = to_spot_dtype(query, /*allow_float32=*/!on_cuda, kOp, "query");
  check_dtype(key, query.scalar_type(), kOp, "key");
  check_dtype(value, query.scalar_type(), kOp, "value");
  check_dtype(cu_seqlens, at::kInt, kOp, "cu_seqlens");
  check_dtype(block_indices, at::kInt, kOp, "block_indices");
  check_dtype(block_counts, at::kInt, kOp, "block_counts");
  check_contiguous(query, kOp, "query");
  check_contiguous(key, kOp, "key");
  check_contiguous(value, kOp, "value");
  check_contiguous(cu_seqlens, kOp, "cu_seqlens");
  check_contiguous(block_indices, kOp, "block_indices");
  check_contiguous(block_counts, kOp, "block_counts");

  const int64_t total_tokens = query.size(0);
  const int64_t heads_q = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t heads_kv = key.size(1);
  SPOT_CHECK_ARG(heads_q > 0 && head_dim > 0, kOp, "query", "must have heads and a head dim, got shape ",
                 query.sizes());
  check_size(key, 0, total_tokens, kOp, "key", "total_tokens");
  SPOT_CHECK_ARG(heads_kv > 0 && heads_q % heads_kv == 0, kOp, "key",
                 "dim 1 (heads_kv) must divide query's heads_q = ", heads_q, ", got shape ", key.sizes());
  check_size(key, 2, head_dim, kOp, "key", "head_dim");
  SPOT_CHECK_ARG(value.sizes() == key.sizes(), kOp, "value", "must have key's shape ", key.sizes(),
                 ", got ", value.sizes());
  if (on_cuda) {
    SPOT_CHECK_ARG(head_dim == 64 || head_dim == 128, kOp, "query",
                   "dim 2 (head_dim) must be 64 or 128 on CUDA, got ", head_dim);
    // Both CUDA kernels move rows with 16-byte copies (cp.async / TMA).
    for (const auto& [tensor, arg] : {std::pair<const at::Tensor&, const char*>{query, "query"},
                                      std::pair<const at::Tensor&, const char*>{key, "key"},
                                      std::pair<const at::Tensor&, const char*>{value, "value"}}) {
      SPOT_CHECK_ARG(reinterpret_cast<uintptr_t>(tensor.data_ptr()) % 16 == 0, kOp, arg,
                     "must have a 16-byte aligned data pointer on CUDA (e.g. not a view at an odd offset)");
    }
  }

  SPOT_CHECK_ARG(cu_seqlens.size(0) >= 2, kOp, "cu_seqlens", "must hold at least 2 bounds (batch >= 1), got ",
                 cu_seqlens.size(0));
  const int64_t batch = cu_seqlens.size(0) - 1;
  SPOT_CHECK_ARG(max_seqlen >= 0 && max_seqlen <= (int64_t(1) << 30), kOp, "max_seqlen",
                 "must be in [0, 2^30], got ", max_seqlen);
  check_positive(block_size, kOp, "block_size");
  if (on_cuda) {
    SPOT_CHECK_ARG(block_size == 64 || block_size == 128, kOp, "block_size",
                   "must be 64 or 128 on CUDA (multiples of the kernels' 64-key tile), got ", block_size);
  }
  SPOT_CHECK_ARG(std::isfinite(softmax_scale), kOp, "softmax_scale", "must be finite, got ", softmax_scale);

  const int64_t needed_query_blocks = (max_seqlen + block_size - 1) / block_size;
  check_size(block_indices, 0, batch, kOp, "block_indices", "batch");
  check_size(block_indices, 1, heads_kv, kOp, "block_indices", "heads_kv");
  SPOT_CHECK_ARG(block_indices.size(2) >= needed_query_blocks, kOp, "block_indices",
                 "dim 2 (num_query_blocks) must be at least ceil(max_seqlen / block_size) = ",
                 needed_query_blocks, ", got shape ", block_indices.sizes());
  const int64_t num_query_blocks = block_indices.size(2);
  const int64_t max_selected = block_indices.size(3);
  SPOT_CHECK_ARG(block_counts.size(0) == batch && block_counts.size(1) == heads_kv &&
                     block_counts.size(2) == num_query_blocks,
                 kOp, "block_counts", "must have shape [", batch, ", ", heads_kv, ", ", num_query_blocks,
                 "] (block_indices' first three dims), got ", block_counts.sizes());
  SPOT_CHECK_ARG(total_tokens < (int64_t(1) << 31) && num_query_blocks * max_selected < (int64_t(1) << 31),
                 kOp, "query", "is too large for 32-bit token and block indices");
  if (!on_cuda) check_cu_seqlens_values(cu_seqlens, total_tokens, max_seqlen);

  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({total_tokens, heads_q}, query.options().dtype(at::kFloat));

  SparsePrefillParams params;
  params.query = query.data_ptr();
  params.key = key.data_ptr();
  params.value = value.data_ptr();
  params.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  params.block_indices = block_indices.data_ptr<int32_t>();
  params.block_counts = block_counts.data_ptr<int32_t>();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.batch = int(batch);
  params.total_tokens = int(total_tokens);
  params.heads_q = int(heads_q);
  params.heads_kv = int(heads_kv);
  params.head_dim = int(head_dim);
  params.max_seqlen = int(max_seqlen);
  params.num_query_blocks = int(num_query_blocks);
  params.max_selected = int(max_selected);
  params.block_size = int(block_size);
  params.dtype = dtype;
  params.softmax_scale = float(softmax_scale);

  if (total_tokens == 0) return {out, lse};
  run_on_device(params, query, kOp, "query", sparse_prefill_cpu, SPOT_CUDA_LAUNCHER(sparse_prefill_cuda));
  return {out, lse};
}

}  // namespace spot
