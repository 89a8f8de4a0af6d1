// CUDA launcher of spot.select_blocks: one warp per row of logits (spot/select_row.cuh), the
// row's float64 probabilities in shared memory, a few rows per CTA.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#include "spot/select_row.cuh"

namespace spot {

namespace {

constexpr int kMaxKeyBlocks = 16384;              // 128 KiB of probabilities for one warp
constexpr int kSharedBudgetPerCta = 64 * 1024;   // rows per CTA shrink as rows grow
constexpr int kMaxWarpsPerCta = 4;

__global__ void select_blocks_kernel(const SelectBlocksParams params, int64_t num_rows) {
  extern __shared__ double shared_prob[];
  const int warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (row >= num_rows) return;  // whole warps leave together: no CTA-wide barrier below
  const int width = params.num_key_blocks;
  const int64_t rows_per_batch = int64_t(params.heads) * params.num_query_rows;
  const int64_t b = row / rows_per_batch;
  const int64_t q = row % params.num_query_rows;
  int visible = params.num_visible[b * params.num_query_rows + q];
  visible = visible < 0 ? 0 : (visible > width ? width : visible);
  const SelectKnobs knobs{params.top_p, params.k_min, params.k_max, params.sink_blocks, params.local_blocks};
  const select_device::RowView view{params.scores + row * width, shared_prob + int64_t(warp) * width, visible,
                                    visible};
  const select_device::WarpGroup group;
  const int count = select_device::select_row(group, view, knobs, params.indices + row * params.k_max);
  if (group.rank() == 0) params.counts[row] = count;
}

}  // namespace

int select_blocks_cuda_max_key_blocks() { return kMaxKeyBlocks; }

void select_blocks_cuda(const SelectBlocksParams& params) {
  const int64_t num_rows = int64_t(params.batch) * params.heads * params.num_query_rows;
  if (num_rows == 0) return;
  const int64_t bytes_per_warp = int64_t(params.num_key_blocks) * int64_t(sizeof(double));
  int warps = bytes_per_warp > 0 ? int(kSharedBudgetPerCta / bytes_per_warp) : kMaxWarpsPerCta;
  warps = warps < 1 ? 1 : (warps > kMaxWarpsPerCta ? kMaxWarpsPerCta : warps);
  const size_t shared_bytes = size_t(warps) * size_t(bytes_per_warp);
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(select_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(shared_bytes)));
  }
  const int64_t blocks = (num_rows + warps - 1) / warps;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  select_blocks_kernel<<<dim3(unsigned(blocks)), dim3(32 * warps), shared_bytes, stream>>>(params, num_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace spot
