// CPU kernel of spot.decode_select: per (sequence, KV head), score the query against the cached
// selector keys of the complete blocks (same fp32 fma order as selector_score) and run the dual
// top-p rule over the visible blocks (spot/select_row.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>

#include "launchers.h"
#include "selector_keys_cpu.h"
#include "spot/dispatch.h"
#include "spot/select_row.h"

namespace spot {

namespace {

template <typename query_t>
void run(const DecodeSelectParams& params) {
  const SelectKnobs knobs{params.top_p, params.k_min, params.k_max, params.sink_blocks, params.local_blocks};
  const int dim = params.dim, width = params.num_key_blocks;
  const int64_t num_pairs = int64_t(params.batch) * params.heads;
  at::parallel_for(0, num_pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys, query(static_cast<size_t>(dim)), scores;
    SelectRowScratch scratch;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / params.heads;
      const int64_t length = std::max(params.seq_lens[b], 0);
      const int scored = int(std::min<int64_t>(length / params.block_size, width));
      const int visible = int((length + params.block_size - 1) / params.block_size);
      keys.resize(size_t(scored) * dim);
      selector_keys_to_float(params.keys, params.key_scales, params.format, params.key_dtype, dim,
                             params.global_scale, pair * width, pair * width + scored, keys.data());
      const query_t* query_row = static_cast<const query_t*>(params.query) + pair * dim;
      for (int k = 0; k < dim; ++k) query[k] = to_float(query_row[k]);
      scores.resize(size_t(scored));
      for (int j = 0; j < scored; ++j) {
        float acc = 0.f;
        for (int k = 0; k < dim; ++k) acc = std::fma(query[k], keys[size_t(j) * dim + k], acc);
        scores[j] = acc * params.softmax_scale;
      }
      params.counts[pair] = select_row_host(scores.data(), scored, visible, knobs, scratch,
                                            params.indices + pair * params.k_max);
    }
  });
}

}  // namespace

void decode_select_cpu(const DecodeSelectParams& params) {
  SPOT_DISPATCH_FLOAT(params.query_dtype, query_t, run<query_t>(params));
}

}  // namespace spot
