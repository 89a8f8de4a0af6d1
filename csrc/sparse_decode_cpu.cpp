// CPU reference kernel of spot.sparse_decode: exact two-pass softmax in fp32 over the chosen
// tokens, one task per (sequence, KV head) so a group's keys and values are read once for all of
// its query heads. The entry has already checked every index, length and page.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/numeric.h"

namespace spot {
namespace {

template <typename T>
struct CacheRows {
  const T* keys;
  const T* values;
  const SparseDecodeParams& params;

  // Row offsets (elements) of token `token` of sequence `batch_index`, KV head `head`.
  int64_t key_offset(int batch_index, int token, int head) const {
    return row_offset(batch_index, token, params.cache_batch_stride, params.cache_token_stride) +
           int64_t(head) * params.cache_head_stride;
  }
  int64_t value_offset(int batch_index, int token, int head) const {
    return row_offset(batch_index, token, params.value_batch_stride, params.value_token_stride) +
           int64_t(head) * params.value_head_stride;
  }

 private:
  int64_t row_offset(int batch_index, int token, int64_t row_stride, int64_t token_stride) const {
    if (params.page_size == 0) return int64_t(batch_index) * row_stride + int64_t(token) * token_stride;
    const int32_t page = params.block_table[int64_t(batch_index) * params.pages_per_seq + token / params.page_size];
    return int64_t(page) * row_stride + int64_t(token % params.page_size) * token_stride;
  }
};

template <typename T>
void sparse_decode_cpu_typed(const SparseDecodeParams& params) {
  const int group = params.heads_q / params.heads_kv;
  const int dim = params.head_dim;
  const T* query = static_cast<const T*>(params.query);
  T* out = static_cast<T*>(params.out);
  const CacheRows<T> cache{static_cast<const T*>(params.key_cache), static_cast<const T*>(params.value_cache),
                           params};

  at::parallel_for(0, int64_t(params.batch) * params.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query_rows, logits, row_float(dim), accum;
    std::vector<int> tokens;
    for (int64_t task = begin; task < end; ++task) {
      const int b = int(task / params.heads_kv);
      const int kv_head = int(task % params.heads_kv);
      const int length = params.seq_lens[b];
      const int count = params.block_counts[task];
      const int32_t* chosen = params.block_indices + task * params.max_selected;

      tokens.clear();
      for (int i = 0; i < count; ++i) {
        const int first = chosen[i] * params.block_size;
        const int last = std::min(first + params.block_size, length);
        for (int t = first; t < last; ++t) tokens.push_back(t);
      }
      const int num_tokens = int(tokens.size());

      query_rows.resize(size_t(group) * dim);
      for (int h = 0; h < group; ++h) {
        const T* q = query + (int64_t(b) * params.heads_q + int64_t(kv_head) * group + h) * dim;
        for (int c = 0; c < dim; ++c) query_rows[size_t(h) * dim + c] = to_float(q[c]);
      }

      // Pass 1: logits [group, num_tokens], each key row converted once for the whole group.
      logits.assign(size_t(group) * num_tokens, 0.f);
      for (int n = 0; n < num_tokens; ++n) {
        const T* key = cache.keys + cache.key_offset(b, tokens[n], kv_head);
        for (int c = 0; c < dim; ++c) row_float[c] = to_float(key[c]);
        for (int h = 0; h < group; ++h) {
          const float* q = &query_rows[size_t(h) * dim];
          float dot = 0.f;
          for (int c = 0; c < dim; ++c) dot += q[c] * row_float[c];
          logits[size_t(h) * num_tokens + n] = dot * params.softmax_scale;
        }
      }

      // Pass 2: softmax weights against each head's max, values accumulated in fp32.
      std::vector<float> row_max(group, -std::numeric_limits<float>::infinity()), row_sum(group, 0.f);
      for (int h = 0; h < group; ++h) {
        for (int n = 0; n < num_tokens; ++n) row_max[h] = std::max(row_max[h], logits[size_t(h) * num_tokens + n]);
      }
      accum.assign(size_t(group) * dim, 0.f);
      for (int n = 0; n < num_tokens; ++n) {
        const T* value = cache.values + cache.value_offset(b, tokens[n], kv_head);
        for (int c = 0; c < dim; ++c) row_float[c] = to_float(value[c]);
        for (int h = 0; h < group; ++h) {
          const float weight = std::exp(logits[size_t(h) * num_tokens + n] - row_max[h]);
          row_sum[h] += weight;
          float* acc = &accum[size_t(h) * dim];
          for (int c = 0; c < dim; ++c) acc[c] += weight * row_float[c];
        }
      }

      for (int h = 0; h < group; ++h) {
        const int64_t head = int64_t(b) * params.heads_q + int64_t(kv_head) * group + h;
        T* o = out + head * dim;
        if (num_tokens == 0) {
          for (int c = 0; c < dim; ++c) o[c] = from_float<T>(0.f);
          params.lse[head] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float inverse = 1.f / row_sum[h];
        for (int c = 0; c < dim; ++c) o[c] = from_float<T>(accum[size_t(h) * dim + c] * inverse);
        params.lse[head] = row_max[h] + std::log(row_sum[h]);
      }
    }
  });
}

}  // namespace

void sparse_decode_cpu(const SparseDecodeParams& params) {
  SPOT_DISPATCH_FLOAT(params.dtype, scalar_t, sparse_decode_cpu_typed<scalar_t>(params));
}

}  // namespace spot
