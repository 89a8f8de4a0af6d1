// CUDA kernel of spot.block_mass: exact causal attention mass per (query block, key block).
//
// One CTA owns a tile of query tokens of one (sequence, query head) and walks the causal key
// tiles twice, FlashAttention style, so L x L never exists:
//   sweep 1: logits = Q K^T per key tile (mma.sync m16n8k16, fp32 accumulate), online row max
//            and row sum of exp2 (log2 domain, softmax scale folded into the exponent);
//   sweep 2: the same logits again, p = exp2(logit - max) / sum, summed over the tile's key
//            columns of each key block and over the rows of each query block, added to the
//            output.
// There is no P V product, so the cost is about two QK^T passes: close to one causal forward.
//
// Heads of a KV group, and query tiles of one query block, land on different CTAs: their
// contributions meet in the zero-filled output through fp32 atomics, each already weighted by
// 1 / (heads per group * tokens in the query block). When block_size_q is a multiple of 16
// every 16-row MMA tile lies inside one query block, so a warp reduces its rows with shuffles
// and issues one atomic per (m-tile, key block); otherwise rows are added one by one.
//
// Layout: a warp owns kMTiles * 16 consecutive query rows; their Q fragments stay in registers
// for both sweeps. Key tiles of 64 rows are double-buffered in shared memory with cp.async;
// 16-byte chunks of a row are XOR-swizzled by (row % 8) so ldmatrix reads are conflict-free.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#include "spot/cuda/mma_sm80.cuh"
#include "spot/dispatch.h"
#include "spot/numeric.h"

namespace spot {

namespace {

using namespace ::spot::ptx;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeyTile = 64;        // keys per shared-memory tile
constexpr int kNTiles = kKeyTile / 8;  // n8 MMA tiles per key tile
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct TileShape {
  // Two 16-row m-tiles per warp reuse every K fragment twice; head dim 256 keeps one so that
  // Q fragments (kMTiles * kHeadDim / 4 registers) and logits (kMTiles * 32) fit without spills.
  static constexpr int kMTiles = kHeadDim <= 128 ? 2 : 1;
  static constexpr int kQueryTile = kWarps * kMTiles * 16;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  static constexpr int kKSteps = kHeadDim / 16;
  static constexpr int kQueryBytes = kQueryTile * kHeadDim * 2;
  static constexpr int kKeyBytes = kKeyTile * kHeadDim * 2;
  static constexpr int kSharedBytes = kQueryBytes + 2 * kKeyBytes;
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kHeadDim] tile.
template <int kHeadDim>
__device__ __forceinline__ uint32_t swizzled_byte_offset(int row, int chunk) {
  return uint32_t(row * kHeadDim * 2 + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int lane_mask = 16; lane_mask >= 1; lane_mask >>= 1) value += __shfl_xor_sync(0xffffffffu, value, lane_mask);
  return value;
}

// Weight of one token of query block `query_block`: 1 / (heads per group * tokens in the block).
__device__ __forceinline__ float query_block_weight(int query_block, int block_size_q, int length, int group) {
  const int first = query_block * block_size_q;
  const int tokens = min(first + block_size_q, length) - first;
  return 1.f / float(group * tokens);
}

// kKeyBlocksPerTile: key blocks that start in one 64-key tile (64 / block_size_k, at least 1);
// each n8 MMA tile lies inside one key block because block_size_k is a power of two >= 16.
template <typename scalar_t, int kHeadDim, int kKeyBlocksPerTile>
__global__ void __launch_bounds__(kThreads)
    block_mass_kernel(const BlockMassParams params, int num_query_tiles) {
  using Shape = TileShape<kHeadDim>;
  constexpr int kMTiles = Shape::kMTiles;
  constexpr int kQueryTile = Shape::kQueryTile;
  constexpr int kChunksPerRow = Shape::kChunksPerRow;
  constexpr int kNTilesPerKeyBlock = kNTiles / kKeyBlocksPerTile;

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  const uint32_t query_shared = shared_address(shared_bytes);
  const uint32_t key_shared = query_shared + Shape::kQueryBytes;

  // Heaviest (last) query tiles first, all heads and sequences of one tile index together, so
  // the long causal tiles do not trail at the end of the grid.
  const int heads_q = params.heads_q;
  const int work = int(blockIdx.x);
  const int head = work % heads_q;
  const int batch_index = (work / heads_q) % params.batch;
  const int query_tile = num_query_tiles - 1 - work / (heads_q * params.batch);

  const int sequence_start = params.cu_seqlens[batch_index];
  const int length = params.cu_seqlens[batch_index + 1] - sequence_start;
  const int query_first = query_tile * kQueryTile;
  if (query_first >= length) return;

  const int group = heads_q / params.heads_kv;
  const int kv_head = head / group;
  const int query_end = min(query_first + kQueryTile, length);
  const int num_key_tiles = (query_end + kKeyTile - 1) / kKeyTile;

  const scalar_t* query = static_cast<const scalar_t*>(params.query);
  const scalar_t* key = static_cast<const scalar_t*>(params.key);
  const int64_t query_row_stride = int64_t(heads_q) * kHeadDim;
  const int64_t key_row_stride = int64_t(params.heads_kv) * kHeadDim;

  const int thread = int(threadIdx.x);
  const int warp = thread / 32;
  const int lane = thread % 32;

  // Rows past the sequence are zero-filled: they produce finite logits and never contribute.
  for (int index = thread; index < kQueryTile * kChunksPerRow; index += kThreads) {
    const int row = index / kChunksPerRow;
    const int chunk = index % kChunksPerRow;
    const int token = query_first + row;
    const bool valid = token < length;
    const scalar_t* source =
        valid ? query + int64_t(sequence_start + token) * query_row_stride + head * kHeadDim + chunk * 8 : query;
    cp_async_16(query_shared + swizzled_byte_offset<kHeadDim>(row, chunk), source, valid);
  }
  cp_async_commit();

  auto load_key_tile = [&](int key_tile, int buffer) {
    const uint32_t base = key_shared + buffer * Shape::kKeyBytes;
    for (int index = thread; index < kKeyTile * kChunksPerRow; index += kThreads) {
      const int row = index / kChunksPerRow;
      const int chunk = index % kChunksPerRow;
      const int token = key_tile * kKeyTile + row;
      const bool valid = token < length;
      const scalar_t* source =
          valid ? key + int64_t(sequence_start + token) * key_row_stride + kv_head * kHeadDim + chunk * 8 : key;
      cp_async_16(base + swizzled_byte_offset<kHeadDim>(row, chunk), source, valid);
    }
    cp_async_commit();
  };

  // The two sweeps are one stream of 2 * num_key_tiles tiles, so the prefetch runs across the
  // boundary between them.
  const int num_steps = 2 * num_key_tiles;
  load_key_tile(0, 0);

  cp_async_wait<1>();  // the query tile (the older group) has landed
  __syncthreads();

  // Q fragments: m-tile t of this warp covers rows warp_row0 + 16 t .. + 15.
  const int warp_row0 = warp * kMTiles * 16;
  uint32_t query_fragment[kMTiles][Shape::kKSteps][4];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int k = 0; k < Shape::kKSteps; ++k) {
      const int row = warp_row0 + m * 16 + (lane % 16);
      const int chunk = k * 2 + lane / 16;
      ldmatrix_x4(query_shared + swizzled_byte_offset<kHeadDim>(row, chunk), query_fragment[m][k]);
    }
  }

  // Rows of this thread: lane / 4 (+ 8) within each m-tile; accumulator element e is row half e / 2.
  const int quad_row = lane / 4;
  const int quad_col = (lane % 4) * 2;
  const float scale_log2 = params.softmax_scale * kLog2e;

  // Sweep 1: running max of the raw logits of each row and the thread's part of the row's
  // sum of exp2(scaled logit - scaled max). From the last tile of sweep 1 on: the scaled max
  // (the exp2 shift) and 1 / (row total), 0 for rows past the sequence. Normalising by a
  // multiply after the block sums (instead of subtracting log2(total) from every logit) keeps
  // sweep 2's exponents relative to the same rounded shift as sweep 1's, so rows sum to 1 to
  // fp32 accuracy however large the logits are.
  float row_max[kMTiles][2];
  float row_sum[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[m][h] = -INFINITY;
      row_sum[m][h] = 0.f;
    }
  }

  const int block_size_q = params.block_size_q;
  const int block_size_k = params.block_size_k;
  // Every 16-row m-tile lies inside one query block (tiles start at multiples of 16).
  const bool rows_share_block = block_size_q % 16 == 0;
  float* mass_head = params.mass + (int64_t(batch_index) * params.heads_kv + kv_head) *
                                       int64_t(params.num_query_blocks) * params.num_key_blocks;

  for (int step = 0; step < num_steps; ++step) {
    const bool first_sweep = step < num_key_tiles;
    const int key_tile = first_sweep ? step : step - num_key_tiles;
    if (step + 1 < num_steps) {
      const int next = step + 1;
      load_key_tile(next < num_key_tiles ? next : next - num_key_tiles, next & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // logits[m][n][e]: rows (quad_row + 8 (e / 2)) of m-tile m, key quad_col + (e % 2) of n-tile n.
    float logits[kMTiles][kNTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) logits[m][n][e] = 0.f;
      }
    }
    const uint32_t key_base = key_shared + (step & 1) * Shape::kKeyBytes;
#pragma unroll
    for (int k = 0; k < Shape::kKSteps; ++k) {
#pragma unroll
      for (int n = 0; n < kNTiles; n += 2) {
        // Matrices: (n-tile n, k low), (n, k high), (n + 1, k low), (n + 1, k high).
        const int row = n * 8 + (lane / 16) * 8 + (lane % 8);
        const int chunk = k * 2 + (lane / 8) % 2;
        uint32_t key_fragment[4];
        ldmatrix_x4(key_base + swizzled_byte_offset<kHeadDim>(row, chunk), key_fragment);
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          mma_16816<scalar_t>(logits[m][n], query_fragment[m][k], key_fragment[0], key_fragment[1]);
          mma_16816<scalar_t>(logits[m][n + 1], query_fragment[m][k], key_fragment[2], key_fragment[3]);
        }
      }
    }
    // The buffer this step read is refilled by the next step's prefetch.
    __syncthreads();

    const int key_first = key_tile * kKeyTile;
    // Only tiles reaching past the first row of the query tile hold keys after some row.
    const bool needs_mask = key_first + kKeyTile - 1 > query_first;

    // Masked entries -inf. Logits stay unscaled: softmax_scale * log2(e) > 0 commutes with max
    // and folds into the FMA in front of each exp2.
    if (needs_mask) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = query_first + warp_row0 + m * 16 + quad_row + 8 * (e / 2);
            const int column = key_first + n * 8 + quad_col + (e % 2);
            if (column > row) logits[m][n][e] = -INFINITY;
          }
        }
      }
    }

    if (first_sweep) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(logits[m][n][2 * h], logits[m][n][2 * h + 1]));
          const float new_max = fmaxf(row_max[m][h], quad_max(tile_max));
          // A row whose keys are all masked so far keeps max -inf; shift by 0 then (no NaN).
          const float shift = new_max == -INFINITY ? 0.f : new_max * scale_log2;
          // Rescale by the difference of the rounded shifts the earlier terms were taken against.
          float sum = row_sum[m][h] * fast_exp2(row_max[m][h] * scale_log2 - shift);
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
            sum += fast_exp2(fmaf(logits[m][n][2 * h], scale_log2, -shift)) +
                   fast_exp2(fmaf(logits[m][n][2 * h + 1], scale_log2, -shift));
          }
          row_max[m][h] = new_max;
          row_sum[m][h] = sum;
        }
      }
      if (step == num_key_tiles - 1) {
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = query_first + warp_row0 + m * 16 + quad_row + 8 * h;
            const float total = quad_sum(row_sum[m][h]);
            // Every row sees key 0, so its max is finite (rows past the sequence: logits 0).
            row_max[m][h] *= scale_log2;
            row_sum[m][h] = row < length ? 1.f / total : 0.f;
          }
        }
      }
      continue;
    }

    // Sweep 2: p = exp2(scaled logit - shift) / total, summed per key block.
    float block_sums[kMTiles][kKeyBlocksPerTile][2];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int b = 0; b < kKeyBlocksPerTile; ++b) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float shift = row_max[m][h];
          float sum = 0.f;
#pragma unroll
          for (int n = b * kNTilesPerKeyBlock; n < (b + 1) * kNTilesPerKeyBlock; ++n) {
            sum += fast_exp2(fmaf(logits[m][n][2 * h], scale_log2, -shift)) +
                   fast_exp2(fmaf(logits[m][n][2 * h + 1], scale_log2, -shift));
          }
          block_sums[m][b][h] = sum * row_sum[m][h];
        }
      }
    }

    const int first_key_block = key_first / block_size_k;
    if (rows_share_block) {
      // When the warp's m-tiles share one query block too, one reduction covers them all.
      const bool warp_shares_block = block_size_q % (kMTiles * 16) == 0;
      if (warp_shares_block) {
#pragma unroll
        for (int m = 1; m < kMTiles; ++m) {
#pragma unroll
          for (int b = 0; b < kKeyBlocksPerTile; ++b) {
            block_sums[0][b][0] += block_sums[m][b][0];
            block_sums[0][b][1] += block_sums[m][b][1];
          }
        }
      }
      const int num_reduced_tiles = warp_shares_block ? 1 : kMTiles;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        if (m >= num_reduced_tiles) break;  // warp-uniform
        const int tile_row0 = query_first + warp_row0 + m * 16;
        if (tile_row0 >= length) continue;  // warp-uniform
        const int query_block = tile_row0 / block_size_q;
        const float weight = query_block_weight(query_block, block_size_q, length, group);
#pragma unroll
        for (int b = 0; b < kKeyBlocksPerTile; ++b) {
          const float total = warp_sum(block_sums[m][b][0] + block_sums[m][b][1]);
          const int key_block = first_key_block + b;
          // Key blocks starting past the tile's last visible key hold only zeros.
          if (lane == 0 && key_block * block_size_k < query_end) {
            atomicAdd(mass_head + int64_t(query_block) * params.num_key_blocks + key_block, total * weight);
          }
        }
      }
    } else {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = query_first + warp_row0 + m * 16 + quad_row + 8 * h;
          const int query_block = row / block_size_q;
          const float weight = query_block_weight(query_block, block_size_q, length, group);
#pragma unroll
          for (int b = 0; b < kKeyBlocksPerTile; ++b) {
            const float total = quad_sum(block_sums[m][b][h]);
            const int key_block = first_key_block + b;
            if (lane % 4 == 0 && row < length && key_block * block_size_k <= row) {
              atomicAdd(mass_head + int64_t(query_block) * params.num_key_blocks + key_block, total * weight);
            }
          }
        }
      }
    }
  }
}

template <typename scalar_t, int kHeadDim, int kKeyBlocksPerTile>
void launch_block_mass(const BlockMassParams& params, cudaStream_t stream) {
  using Shape = TileShape<kHeadDim>;
  const int num_query_tiles = (params.max_seqlen + Shape::kQueryTile - 1) / Shape::kQueryTile;
  const int64_t num_ctas = int64_t(num_query_tiles) * params.batch * params.heads_q;
  if (num_ctas == 0) return;
  if (num_ctas > int64_t(INT32_MAX)) {
    throw std::invalid_argument("spot.block_mass: too many (query tile, sequence, head) tiles for one grid: " +
                                std::to_string(num_ctas));
  }
  auto kernel = block_mass_kernel<scalar_t, kHeadDim, kKeyBlocksPerTile>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSharedBytes));
  kernel<<<unsigned(num_ctas), kThreads, Shape::kSharedBytes, stream>>>(params, num_query_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kHeadDim>
void dispatch_key_block(const BlockMassParams& params, cudaStream_t stream) {
  switch (params.block_size_k) {
    case 16: launch_block_mass<scalar_t, kHeadDim, 4>(params, stream); break;
    case 32: launch_block_mass<scalar_t, kHeadDim, 2>(params, stream); break;
    case 64:
    case 128:
    case 256: launch_block_mass<scalar_t, kHeadDim, 1>(params, stream); break;
    default:
      throw std::invalid_argument("spot.block_mass: block_size_k must be 16, 32, 64, 128 or 256 on CUDA, got " +
                                  std::to_string(params.block_size_k));
  }
}

}  // namespace

void block_mass_cuda(const BlockMassParams& params) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  SPOT_DISPATCH_HALF(params.dtype, scalar_t,
                     SPOT_DISPATCH_HEAD_DIM(params.head_dim, kHeadDim, dispatch_key_block<scalar_t, kHeadDim>(params, stream)));
}

}  // namespace spot
