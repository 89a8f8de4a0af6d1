// Entry of spot.sparse_decode: validates the torch inputs, fills SparseDecodeParams, allocates the
// outputs (and, on CUDA, the split-KV workspace) and runs the CPU kernel or the CUDA launcher.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "launchers.h"
#include "ops.h"
#include "torch_utils.h"

namespace spot {
namespace {

constexpr const char* kOp = "sparse_decode";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_cache(const at::Tensor& cache, const at::Tensor& query, const char* arg) {
  check_device(cache, query, kOp, arg);
  check_dim(cache, 4, kOp, arg, "[batch, max_len, heads_kv, head_dim] or [pages, page_size, heads_kv, head_dim]");
  SPOT_CHECK_ARG(cache.scalar_type() == query.scalar_type(), kOp, arg, "must have the query's dtype ",
                 query.scalar_type(), ", got ", cache.scalar_type());
  check_size(cache, 3, query.size(2), kOp, arg, "head_dim");
  SPOT_CHECK_ARG(cache.stride(3) == 1 || cache.size(3) <= 1, kOp, arg,
                 "must have a contiguous last dim (stride 1), got strides ", cache.strides());
  SPOT_CHECK_ARG(cache.size(2) > 0 && query.size(1) % cache.size(2) == 0, kOp, arg,
                 "dim 2 (heads_kv) must divide the query's ", query.size(1), " heads, got shape ",
                 cache.sizes());
  if (cache.is_cuda()) {
    // 16-byte vector loads need every row start 16-byte aligned.
    const int64_t vector_elems = 16 / int64_t(cache.element_size());
    const bool aligned = reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0 &&
                         cache.stride(0) % vector_elems == 0 && cache.stride(1) % vector_elems == 0 &&
                         cache.stride(2) % vector_elems == 0;
    SPOT_CHECK_ARG(aligned, kOp, arg, "must have a 16-byte aligned data pointer and strides that are multiples of ",
                   vector_elems, " elements on CUDA, got strides ", cache.strides());
  }
}

void check_int32_vector(const at::Tensor& tensor, const at::Tensor& query, const char* arg, int64_t dim,
                        const char* shape) {
  check_device(tensor, query, kOp, arg);
  check_dtype(tensor, at::kInt, kOp, arg);
  check_dim(tensor, dim, kOp, arg, shape);
  check_contiguous(tensor, kOp, arg);
}

// Data-dependent checks, CPU only: on CUDA they would need a host sync, so the kernel skips
// out-of-range entries instead.
void check_contents_cpu(const SparseDecodeParams& params, int64_t num_pages) {
  const int32_t max_tokens =
      params.page_size > 0 ? int32_t(std::min<int64_t>(int64_t(params.pages_per_seq) * params.page_size,
                                                       std::numeric_limits<int32_t>::max()))
                           : params.max_seq_len;
  for (int b = 0; b < params.batch; ++b) {
    const int32_t length = params.seq_lens[b];
    SPOT_CHECK_ARG(length >= 0 && length <= max_tokens, kOp, "seq_lens", "entry ", b, " = ", length,
                   " must lie in [0, ", max_tokens, "] (tokens the cache holds per sequence)");
    const int64_t visible = ceil_div(length, params.block_size);
    for (int g = 0; g < params.heads_kv; ++g) {
      const int32_t count = params.block_counts[int64_t(b) * params.heads_kv + g];
      SPOT_CHECK_ARG(count >= 0 && count <= params.max_selected, kOp, "block_counts", "entry [", b, ", ", g,
                     "] = ", count, " must lie in [0, ", params.max_selected, "]");
      const int32_t* row = params.block_indices + (int64_t(b) * params.heads_kv + g) * params.max_selected;
      for (int i = 0; i < count; ++i) {
        SPOT_CHECK_ARG(row[i] >= 0 && row[i] < visible, kOp, "block_indices", "entry [", b, ", ", g, ", ", i,
                       "] = ", row[i], " must lie in [0, ", visible, ") = [0, ceil(seq_len / block_size)) for seq_len ",
                       length);
      }
    }
    if (params.page_size > 0) {
      const int64_t used_pages = ceil_div(length, params.page_size);
      const int32_t* pages = params.block_table + int64_t(b) * params.pages_per_seq;
      for (int64_t p = 0; p < used_pages; ++p) {
        SPOT_CHECK_ARG(pages[p] >= 0 && pages[p] < num_pages, kOp, "block_table", "entry [", b, ", ", p, "] = ",
                       pages[p], " must lie in [0, ", num_pages, ") (pages in the caches)");
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_decode(const at::Tensor& query, const at::Tensor& key_cache,
                                                 const at::Tensor& value_cache,
                                                 const std::optional<at::Tensor>& block_table,
                                                 const at::Tensor& seq_lens, const at::Tensor& block_indices,
                                                 const at::Tensor& block_counts, int64_t block_size,
                                                 double softmax_scale) {
  check_dim(query, 3, kOp, "query", "[batch, heads_q, head_dim]");
  check_contiguous(query, kOp, "query");
  const bool on_cuda = query.is_cuda();
  SPOT_CHECK_ARG(on_cuda || query.is_cpu(), kOp, "query", "must be a CPU or CUDA tensor, got ", query.device());
  const DType dtype = to_spot_dtype(query, /*allow_float32=*/!on_cuda, kOp, "query");
  const int64_t batch = query.size(0), heads_q = query.size(1), head_dim = query.size(2);
  SPOT_CHECK_ARG(head_dim == 64 || head_dim == 128 || head_dim == 256, kOp, "query",
                 "dim 2 (head_dim) must be 64, 128 or 256, got ", head_dim);
  SPOT_CHECK_ARG(heads_q > 0, kOp, "query", "dim 1 (heads_q) must be positive, got shape ", query.sizes());

  const bool paged = block_table.has_value();
  check_cache(key_cache, query, "key_cache");
  if (!paged) check_size(key_cache, 0, batch, kOp, "key_cache", "batch");
  check_cache(value_cache, query, "value_cache");
  SPOT_CHECK_ARG(value_cache.sizes() == key_cache.sizes(), kOp, "value_cache", "must have key_cache's shape ",
                 key_cache.sizes(), ", got ", value_cache.sizes());
  const int64_t heads_kv = key_cache.size(2);

  check_positive(block_size, kOp, "block_size");
  SPOT_CHECK_ARG(block_size <= (1 << 20), kOp, "block_size", "must be at most 1048576, got ", block_size);
  SPOT_CHECK_ARG(std::isfinite(softmax_scale), kOp, "softmax_scale", "must be finite, got ", softmax_scale);

  check_int32_vector(seq_lens, query, "seq_lens", 1, "[batch]");
  check_size(seq_lens, 0, batch, kOp, "seq_lens", "batch");
  check_int32_vector(block_indices, query, "block_indices", 3, "[batch, heads_kv, max_selected]");
  check_size(block_indices, 0, batch, kOp, "block_indices", "batch");
  check_size(block_indices, 1, heads_kv, kOp, "block_indices", "heads_kv");
  check_int32_vector(block_counts, query, "block_counts", 2, "[batch, heads_kv]");
  check_size(block_counts, 0, batch, kOp, "block_counts", "batch");
  check_size(block_counts, 1, heads_kv, kOp, "block_counts", "heads_kv");

  if (paged) {
    check_int32_vector(*block_table, query, "block_table", 2, "[batch, pages_per_seq]");
    check_size(*block_table, 0, batch, kOp, "block_table", "batch");
    const int64_t page_size = key_cache.size(1);
    SPOT_CHECK_ARG(page_size > 0 && block_size % page_size == 0, kOp, "key_cache",
                   "dim 1 (page_size) must divide block_size ", block_size, ", got shape ", key_cache.sizes());
  }
  SPOT_CHECK_ARG(key_cache.size(1) <= std::numeric_limits<int32_t>::max(), kOp, "key_cache",
                 "dim 1 must fit in int32, got shape ", key_cache.sizes());
  if (on_cuda) {
    SPOT_CHECK_ARG(batch <= 65535, kOp, "query", "dim 0 (batch) must be at most 65535 on CUDA, got ", batch);
  }

  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({batch, heads_q}, query.options().dtype(at::kFloat));
  if (batch == 0) return {out, lse};

  SparseDecodeParams params;
  params.query = query.data_ptr();
  params.key_cache = key_cache.data_ptr();
  params.value_cache = value_cache.data_ptr();
  params.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  params.seq_lens = seq_lens.data_ptr<int32_t>();
  params.block_indices = block_indices.data_ptr<int32_t>();
  params.block_counts = block_counts.data_ptr<int32_t>();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.batch = int(batch);
  params.heads_q = int(heads_q);
  params.heads_kv = int(heads_kv);
  params.head_dim = int(head_dim);
  params.max_selected = int(block_indices.size(2));
  params.block_size = int(block_size);
  params.page_size = paged ? int(key_cache.size(1)) : 0;
  params.pages_per_seq = paged ? int(block_table->size(1)) : 0;
  params.num_pages = paged ? key_cache.size(0) : 0;
  params.max_seq_len = paged ? 0 : int(key_cache.size(1));
  params.cache_batch_stride = key_cache.stride(0);
  params.cache_token_stride = key_cache.stride(1);
  params.cache_head_stride = key_cache.stride(2);
  params.value_batch_stride = value_cache.stride(0);
  params.value_token_stride = value_cache.stride(1);
  params.value_head_stride = value_cache.stride(2);
  params.dtype = dtype;
  params.softmax_scale = float(softmax_scale);

  if (!on_cuda) {
    check_contents_cpu(params, key_cache.size(0));
    sparse_decode_cpu(params);
    return {out, lse};
  }
#ifdef SPOT_WITH_CUDA
  const c10::DeviceGuard device_guard(query.device());
  plan_sparse_decode(params);
  at::Tensor partial_out, partial_lse;
  if (params.num_splits > 1 && !params.merge_in_cluster) {
    // The torch allocator keeps this capture-safe: under CUDA-graph capture it comes from the
    // graph's private pool.
    partial_out = at::empty({batch, heads_q, params.num_splits, head_dim}, query.options().dtype(at::kFloat));
    partial_lse = at::empty({batch, heads_q, params.num_splits}, query.options().dtype(at::kFloat));
    params.partial_out = partial_out.data_ptr<float>();
    params.partial_lse = partial_lse.data_ptr<float>();
  }
  sparse_decode_cuda(params);
#else
  SPOT_CHECK_ARG(false, kOp, "query", "is on CUDA but spot_ops was built without CUDA kernels");
#endif
  return {out, lse};
}

}  // namespace spot
