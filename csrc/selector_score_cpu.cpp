// CPU kernel of spot.selector_score. Each task takes up to 32 query rows of one (batch, head),
// dequantises that head's keys to floats (transposed, [dim][num_key_blocks], so the inner loop
// runs over keys and vectorises) and scores every visible block. Every score is the fp32 chain
// acc = fma(query[k], key[k], acc) for k = 0 .. dim-1, then acc * softmax_scale: the CUDA
// kernels use the same order, so both devices give the same bits.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_clones.h"
#include "launchers.h"
#include "selector_keys_cpu.h"
#include "spot/dispatch.h"

namespace spot {

namespace {

constexpr int kRowsPerTask = 32;

// acc[j] = fma(query[k], keys_t[k][j], acc[j]) over k: one fma chain per key, in k order.
SPOT_CPU_CLONES void score_row(const float* query, const float* keys_t, int dim, int num_keys, int64_t key_stride,
                               float scale, float* out) {
  std::fill(out, out + num_keys, 0.f);
  for (int k = 0; k < dim; ++k) {
    const float q = query[k];
    const float* key_row = keys_t + k * key_stride;
    for (int j = 0; j < num_keys; ++j) out[j] = std::fma(q, key_row[j], out[j]);
  }
  for (int j = 0; j < num_keys; ++j) out[j] *= scale;
}

template <typename query_t>
void run(const SelectorScoreParams& params) {
  const int dim = params.dim, width = params.num_key_blocks, rows = params.num_query_rows;
  const int64_t heads = params.heads;
  const int64_t chunks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t num_tasks = int64_t(params.batch) * heads * chunks;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys(size_t(width) * dim), keys_t(size_t(width) * dim), query(static_cast<size_t>(dim));
    int64_t loaded_pair = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / chunks;  // b * heads + h
      const int64_t b = pair / heads;
      if (pair != loaded_pair) {
        selector_keys_to_float(params.keys, params.key_scales, params.format, params.key_dtype, dim,
                               params.global_scale, pair * width, (pair + 1) * width, keys.data());
        for (int j = 0; j < width; ++j) {
          for (int k = 0; k < dim; ++k) keys_t[size_t(k) * width + j] = keys[size_t(j) * dim + k];
        }
        loaded_pair = pair;
      }
      const int first = int(task % chunks) * kRowsPerTask;
      const int last = std::min(first + kRowsPerTask, rows);
      for (int q = first; q < last; ++q) {
        const query_t* query_row = static_cast<const query_t*>(params.query) + (pair * rows + q) * dim;
        for (int k = 0; k < dim; ++k) query[k] = to_float(query_row[k]);
        const int visible = std::clamp(params.num_visible[b * rows + q], 0, width);
        float* out = params.scores + (pair * rows + q) * width;
        score_row(query.data(), keys_t.data(), dim, visible, width, params.softmax_scale, out);
        std::fill(out + visible, out + width, -std::numeric_limits<float>::infinity());
      }
    }
  });
}

}  // namespace

void selector_score_cpu(const SelectorScoreParams& params) {
  SPOT_DISPATCH_FLOAT(params.query_dtype, query_t, run<query_t>(params));
}

}  // namespace spot
