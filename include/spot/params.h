// Plain parameter structs: the boundary between the torch-facing op entries (csrc/<op>.cpp) and
// the kernels (csrc/<op>_cpu.cpp, csrc/<op>_cuda.cu, include/spot/cuda/). No torch types below
// this line, so kernels and C++ benchmarks build without libtorch headers.
#pragma once

#include <cstdint>

namespace spot {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Selector K-cache storage. kDense keeps the pooled keys in the query's float dtype.
enum class KCacheFormat : int { kDense = 0, kInt4 = 1, kMxfp4 = 2, kNvfp4 = 3 };

// Values that share one scale.
inline constexpr int kcache_group_size(KCacheFormat format) {
  return format == KCacheFormat::kNvfp4 ? 16 : 32;
}

// Rows of selector queries scored against pooled key blocks.
struct SelectorScoreParams {
  const void* query = nullptr;       // [batch, heads, num_query_rows, dim], query_dtype, contiguous
  const void* keys = nullptr;        // dense: [batch, heads, num_key_blocks, dim] in key_dtype;
                                     // packed: uint8 [batch, heads, num_key_blocks, dim / 2]
  const void* key_scales = nullptr;  // packed only: [batch, heads, num_key_blocks, dim / group]
  const int32_t* num_visible = nullptr;  // [batch, num_query_rows]
  float* scores = nullptr;           // [batch, heads, num_query_rows, num_key_blocks]
  int batch = 0, heads = 0, num_query_rows = 0, num_key_blocks = 0, dim = 0;
  DType query_dtype = DType::kFloat32;
  DType key_dtype = DType::kFloat32;  // dense format only
  KCacheFormat format = KCacheFormat::kDense;
  float global_scale = 1.f;  // nvfp4 only
  float softmax_scale = 1.f;
};

// Dual top-p selection over rows of selector logits.
struct SelectBlocksParams {
  const float* scores = nullptr;          // [batch, heads, num_query_rows, num_key_blocks]
  const int32_t* num_visible = nullptr;   // [batch, num_query_rows]
  int32_t* indices = nullptr;             // [batch, heads, num_query_rows, k_max], -1 padded
  int32_t* counts = nullptr;              // [batch, heads, num_query_rows]
  int batch = 0, heads = 0, num_query_rows = 0, num_key_blocks = 0;
  double top_p = 1.0;  // float64: cumulative masses are compared with it in float64
  int k_min = 0, k_max = 0, sink_blocks = 0, local_blocks = 0;
};

// Fused decode selection: one selector query per (sequence, KV head) scored against the
// sequence's selector K-cache, then dual top-p over the blocks [0, ceil(seq_len / block_size)).
// Blocks [0, min(seq_len / block_size, num_key_blocks)) are scored; the rest of the visible
// range (the partial last block, blocks without a cached key) has probability 0.
struct DecodeSelectParams {
  const void* query = nullptr;       // [batch, heads, dim], query_dtype, contiguous
  const void* keys = nullptr;        // dense: [batch, heads, num_key_blocks, dim] in key_dtype;
                                     // packed: uint8 [batch, heads, num_key_blocks, dim / 2]
  const void* key_scales = nullptr;  // packed only: [batch, heads, num_key_blocks, dim / group]
  const int32_t* seq_lens = nullptr;  // [batch]; negative entries read as 0 on CUDA
  int32_t* indices = nullptr;         // [batch, heads, k_max], ascending, -1 padded
  int32_t* counts = nullptr;          // [batch, heads]
  int batch = 0, heads = 0, num_key_blocks = 0, dim = 0;
  int block_size = 64;  // tokens per key block
  DType query_dtype = DType::kFloat32;
  DType key_dtype = DType::kFloat32;  // dense format only
  KCacheFormat format = KCacheFormat::kDense;
  float global_scale = 1.f;  // nvfp4 only
  float softmax_scale = 1.f;
  double top_p = 1.0;
  int k_min = 0, k_max = 0, sink_blocks = 0, local_blocks = 0;
};

// One decode query per sequence against its group's chosen key blocks.
struct SparseDecodeParams {
  const void* query = nullptr;        // [batch, heads_q, head_dim], contiguous
  const void* key_cache = nullptr;    // see strides; last dim contiguous
  const void* value_cache = nullptr;
  const int32_t* block_table = nullptr;  // [batch, pages_per_seq] or nullptr (contiguous cache)
  const int32_t* seq_lens = nullptr;     // [batch]
  const int32_t* block_indices = nullptr;  // [batch, heads_kv, max_selected]
  const int32_t* block_counts = nullptr;   // [batch, heads_kv]
  void* out = nullptr;                // [batch, heads_q, head_dim], query dtype
  float* lse = nullptr;               // [batch, heads_q]
  int batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int max_selected = 0;   // block_indices' last dim
  int block_size = 64;    // selection block, in tokens
  int page_size = 0;      // tokens per page when paged (divides block_size); 0 when contiguous
  int pages_per_seq = 0;  // block_table's row length
  int64_t num_pages = 0;  // page rows in the caches (paged); block_table entries outside are skipped
  int max_seq_len = 0;    // contiguous caches' dim 1 (L_max); seq_lens are clamped to it on CUDA
  // Element strides of the caches. Contiguous: [batch, token, head]; paged: page stride in
  // cache_batch_stride (one "batch" row per page), token and head strides within the page.
  int64_t cache_batch_stride = 0, cache_token_stride = 0, cache_head_stride = 0;
  int64_t value_batch_stride = 0, value_token_stride = 0, value_head_stride = 0;
  DType dtype = DType::kBFloat16;
  float softmax_scale = 1.f;
  // Split-KV plan (CUDA only), set by plan_sparse_decode. With merge_in_cluster the splits of a
  // (sequence, KV head, head chunk) run as one thread-block cluster and merge through
  // distributed shared memory; otherwise a second kernel merges them from the workspace, which
  // is unused when num_splits is 1 (the kernel then writes out and lse directly).
  float* partial_out = nullptr;  // [batch, heads_q, num_splits, head_dim], normalised per split
  float* partial_lse = nullptr;  // [batch, heads_q, num_splits], natural log, -inf when empty
  int num_splits = 1;
  bool merge_in_cluster = false;
};

// Causal block-sparse attention for packed variable-length sequences.
struct SparsePrefillParams {
  const void* query = nullptr;  // [total_tokens, heads_q, head_dim], contiguous
  const void* key = nullptr;    // [total_tokens, heads_kv, head_dim], contiguous
  const void* value = nullptr;  // [total_tokens, heads_kv, head_dim], contiguous
  const int32_t* cu_seqlens = nullptr;     // [batch + 1]
  const int32_t* block_indices = nullptr;  // [batch, heads_kv, num_query_blocks, max_selected]
  const int32_t* block_counts = nullptr;   // [batch, heads_kv, num_query_blocks]
  void* out = nullptr;   // [total_tokens, heads_q, head_dim]
  float* lse = nullptr;  // [total_tokens, heads_q]
  int batch = 0, total_tokens = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int max_seqlen = 0, num_query_blocks = 0, max_selected = 0, block_size = 64;
  DType dtype = DType::kBFloat16;
  float softmax_scale = 1.f;
};

// Exact per-key-block attention mass (the distillation teacher).
struct BlockMassParams {
  const void* query = nullptr;  // [total_tokens, heads_q, head_dim], contiguous
  const void* key = nullptr;    // [total_tokens, heads_kv, head_dim], contiguous
  const int32_t* cu_seqlens = nullptr;  // [batch + 1]
  float* mass = nullptr;  // [batch, heads_kv, num_query_blocks, num_key_blocks], zero-filled
  int batch = 0, total_tokens = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int max_seqlen = 0, block_size_q = 64, block_size_k = 64;
  int num_query_blocks = 0, num_key_blocks = 0;
  DType dtype = DType::kBFloat16;  // float32 on CPU only
  float softmax_scale = 1.f;        // positive
};

// 4-bit selector K-cache packing. Rows of `dim` values, `num_rows` of them.
struct KCachePackParams {
  const void* keys = nullptr;  // [num_rows, dim] in key_dtype (pack) / float32 out (unpack)
  uint8_t* codes = nullptr;    // [num_rows, dim / 2]
  void* scales = nullptr;      // [num_rows, dim / group]: fp16 (int4) or uint8 (mxfp4, nvfp4)
  float* unpacked = nullptr;   // unpack output [num_rows, dim]
  int64_t num_rows = 0;
  int dim = 0;
  DType key_dtype = DType::kFloat32;
  KCacheFormat format = KCacheFormat::kInt4;
  // nvfp4 only. Double, as the schema passes it: the block scale amax / 6 / global_scale and the
  // decode e4m3 * global_scale are rounded exactly as reference.py does.
  double global_scale = 1.0;
  // append_kcache: rows are (batch, head) pairs written at block slot slots[batch] of a cache
  // [batch, heads, num_key_blocks, ...]; slot < 0 skips the sequence.
  const int32_t* slots = nullptr;
  int batch = 0, heads = 0, num_key_blocks = 0;
};

}  // namespace spot
