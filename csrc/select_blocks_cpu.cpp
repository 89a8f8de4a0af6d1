// CPU kernel of spot.select_blocks: dual top-p per row of selector logits (spot/select_row.h),
// rows split across threads.
#include <ATen/Parallel.h>

#include "launchers.h"
#include "spot/select_row.h"

namespace spot {

void select_blocks_cpu(const SelectBlocksParams& params) {
  const SelectKnobs knobs{params.top_p, params.k_min, params.k_max, params.sink_blocks, params.local_blocks};
  const int64_t heads = params.heads, rows_per_head = params.num_query_rows;
  const int64_t num_rows = int64_t(params.batch) * heads * rows_per_head;
  const int64_t width = params.num_key_blocks;
  // About 16K logits per task keeps the per-task overhead small for short rows.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    SelectRowScratch scratch;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * rows_per_head);
      const int64_t q = row % rows_per_head;
      const int num_visible = params.num_visible[b * rows_per_head + q];
      params.counts[row] = select_row_host(params.scores + row * width, num_visible, num_visible, knobs, scratch,
                                           params.indices + row * params.k_max);
    }
  });
}

}  // namespace spot
