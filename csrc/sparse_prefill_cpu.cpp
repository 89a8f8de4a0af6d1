// Exact CPU reference for spot.sparse_prefill: fp32 accumulation, one work item per
// (sequence, KV head, query block), each walking its chosen key blocks a block at a time with an
// online softmax, so memory stays O(block) and a few thousand tokens run in seconds.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/numeric.h"

namespace spot {

namespace {

struct QueryBlockItem {
  int sequence;
  int query_block;
};

// Eight independent partial sums so the compiler can vectorise without reassociation flags.
inline float dot(const float* a, const float* b, int dim) {
  float partial[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= dim; i += 8) {
    for (int lane = 0; lane < 8; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  }
  float sum = 0.f;
  for (; i < dim; ++i) sum += a[i] * b[i];
  for (int lane = 0; lane < 8; ++lane) sum += partial[lane];
  return sum;
}

// The key blocks query block `query_block` attends, ascending: the valid entries of its list
// (as a set: duplicates, negatives and blocks at or after the diagonal dropped), then the
// diagonal itself.
std::vector<int> attended_blocks(const int32_t* indices, int count, int query_block) {
  std::vector<char> chosen(size_t(query_block), 0);
  for (int i = 0; i < count; ++i) {
    const int block = indices[i];
    if (block >= 0 && block < query_block) chosen[size_t(block)] = 1;
  }
  std::vector<int> blocks;
  for (int block = 0; block < query_block; ++block) {
    if (chosen[size_t(block)]) blocks.push_back(block);
  }
  blocks.push_back(query_block);
  return blocks;
}

template <typename scalar_t>
void run_sparse_prefill(const SparsePrefillParams& params) {
  const auto* query = static_cast<const scalar_t*>(params.query);
  const auto* key = static_cast<const scalar_t*>(params.key);
  const auto* value = static_cast<const scalar_t*>(params.value);
  auto* out = static_cast<scalar_t*>(params.out);
  const int heads_q = params.heads_q, heads_kv = params.heads_kv, dim = params.head_dim;
  const int group = heads_q / heads_kv;
  const int block_size = params.block_size;
  const float scale = params.softmax_scale;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  std::vector<QueryBlockItem> items;
  for (int b = 0; b < params.batch; ++b) {
    const int length = params.cu_seqlens[b + 1] - params.cu_seqlens[b];
    const int blocks = (length + block_size - 1) / block_size;
    for (int qb = 0; qb < blocks; ++qb) items.push_back({b, qb});
  }
  const int64_t num_items = int64_t(items.size()) * heads_kv;

  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, rows ordered (head in group, query row).
    std::vector<float> q_tile, k_tile, v_tile, acc, row_max, row_sum, logits;
    for (int64_t item = begin; item < end; ++item) {
      const QueryBlockItem& work = items[size_t(item / heads_kv)];
      const int kv_head = int(item % heads_kv);
      const int b = work.sequence, qb = work.query_block;
      const int64_t seq_start = params.cu_seqlens[b];
      const int length = params.cu_seqlens[b + 1] - params.cu_seqlens[b];
      const int row_begin = qb * block_size;
      const int rows = std::min(block_size, length - row_begin);
      const int64_t list = ((int64_t(b) * heads_kv + kv_head) * params.num_query_blocks + qb);
      const int count = std::clamp(params.block_counts[list], 0, params.max_selected);
      const std::vector<int> blocks =
          attended_blocks(params.block_indices + list * params.max_selected, count, qb);

      const int tile_rows = group * rows;
      q_tile.assign(size_t(tile_rows) * dim, 0.f);
      acc.assign(size_t(tile_rows) * dim, 0.f);
      row_max.assign(size_t(tile_rows), kNegInf);
      row_sum.assign(size_t(tile_rows), 0.f);
      k_tile.resize(size_t(block_size) * dim);
      v_tile.resize(size_t(block_size) * dim);
      logits.resize(size_t(block_size));
      for (int h = 0; h < group; ++h) {
        for (int r = 0; r < rows; ++r) {
          const scalar_t* src = query + ((seq_start + row_begin + r) * heads_q + kv_head * group + h) * dim;
          float* dst = q_tile.data() + (size_t(h) * rows + r) * dim;
          for (int c = 0; c < dim; ++c) dst[c] = to_float(src[c]);
        }
      }

      for (const int block : blocks) {
        const int col_begin = block * block_size;
        const int cols = std::min(block_size, length - col_begin);
        for (int c = 0; c < cols; ++c) {
          const int64_t offset = ((seq_start + col_begin + c) * heads_kv + kv_head) * dim;
          for (int e = 0; e < dim; ++e) {
            k_tile[size_t(c) * dim + e] = to_float(key[offset + e]);
            v_tile[size_t(c) * dim + e] = to_float(value[offset + e]);
          }
        }
        const bool diagonal = block == qb;
        for (int tile_row = 0; tile_row < tile_rows; ++tile_row) {
          const int r = tile_row % rows;
          // Causal inside the diagonal block: row r sees columns 0..r.
          const int visible = diagonal ? r + 1 : cols;
          const float* q_row = q_tile.data() + size_t(tile_row) * dim;
          float block_max = kNegInf;
          for (int c = 0; c < visible; ++c) {
            logits[size_t(c)] = scale * dot(q_row, k_tile.data() + size_t(c) * dim, dim);
            block_max = std::max(block_max, logits[size_t(c)]);
          }
          const float new_max = std::max(row_max[size_t(tile_row)], block_max);
          // exp(-inf) = 0 covers the first block, where the old max is -inf.
          const float rescale = std::exp(row_max[size_t(tile_row)] - new_max);
          float* acc_row = acc.data() + size_t(tile_row) * dim;
          float sum = row_sum[size_t(tile_row)] * rescale;
          for (int e = 0; e < dim; ++e) acc_row[e] *= rescale;
          for (int c = 0; c < visible; ++c) {
            const float p = std::exp(logits[size_t(c)] - new_max);
            sum += p;
            const float* v_row = v_tile.data() + size_t(c) * dim;
            for (int e = 0; e < dim; ++e) acc_row[e] += p * v_row[e];
          }
          row_max[size_t(tile_row)] = new_max;
          row_sum[size_t(tile_row)] = sum;
        }
      }

      // Every row sees at least its own token, so the sum is positive.
      for (int h = 0; h < group; ++h) {
        for (int r = 0; r < rows; ++r) {
          const size_t tile_row = size_t(h) * rows + r;
          const int64_t token = seq_start + row_begin + r;
          const int head = kv_head * group + h;
          const float inv_sum = 1.f / row_sum[tile_row];
          scalar_t* dst = out + (token * heads_q + head) * dim;
          const float* acc_row = acc.data() + tile_row * dim;
          for (int e = 0; e < dim; ++e) dst[e] = from_float<scalar_t>(acc_row[e] * inv_sum);
          params.lse[token * heads_q + head] = row_max[tile_row] + std::log(row_sum[tile_row]);
        }
      }
    }
  });
}

}  // namespace

void sparse_prefill_cpu(const SparsePrefillParams& params) {
  SPOT_DISPATCH_FLOAT(params.dtype, scalar_t, run_sparse_prefill<scalar_t>(params));
}

}  // namespace spot
