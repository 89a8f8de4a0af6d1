// CUDA launcher of spot.selector_score: a tiled [64 query rows x 64 key blocks] kernel, 256
// threads each holding 4 x 4 scores. The selector dim is walked 32 values at a time through
// shared memory (packed keys decoded on the way in); every score is the fp32 chain
// acc = fma(query[k], key[k], acc) in dim order, then acc * softmax_scale, as on the CPU. Key tiles
// past every row's visible count are written as -inf without being read. Block level only: the
// largest tensor is the [rows, key blocks] output itself.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/kcache_format.h"
#include "spot/selector_keys.h"

namespace spot {

namespace {

constexpr int kTileRows = 64, kTileKeys = 64, kChunk = 32, kThreads = 256;
constexpr int kPad = kTileRows + 1;  // [chunk][row] tiles: the +1 spreads transposed stores over banks

template <typename query_t, typename key_t, KCacheFormat Format>
__global__ void __launch_bounds__(kThreads) selector_score_kernel(const SelectorScoreParams params, int key_tiles,
                                                                  int row_tiles) {
  __shared__ float query_tile[kChunk][kPad];
  __shared__ float key_tile[kChunk][kPad];
  const int tile = blockIdx.x;
  const int key_tile_index = tile % key_tiles;
  const int row_tile_index = (tile / key_tiles) % row_tiles;
  const int64_t pair = tile / (int64_t(key_tiles) * row_tiles);  // b * heads + h
  const int b = int(pair / params.heads);
  const int rows = params.num_query_rows, width = params.num_key_blocks, dim = params.dim;
  const int row0 = row_tile_index * kTileRows, key0 = key_tile_index * kTileKeys;
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // keys tx + 16c, rows ty + 16r

  int visible[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = row0 + ty + 16 * r;
    const int count = row < rows ? params.num_visible[int64_t(b) * rows + row] : 0;
    visible[r] = count < 0 ? 0 : (count > width ? width : count);
  }
  // Skip the dot products when no row of the tile sees any key of it.
  const bool any_visible = __syncthreads_or(visible[0] > key0 || visible[1] > key0 || visible[2] > key0 ||
                                            visible[3] > key0);

  float acc[4][4] = {};
  if (any_visible) {
    const query_t* query = static_cast<const query_t*>(params.query) + pair * rows * dim;
    for (int first = 0; first < dim; first += kChunk) {
      // Query chunk: 64 rows x 32 values, 8 per thread, consecutive threads along dim.
      for (int e = tid; e < kTileRows * kChunk; e += kThreads) {
        const int row = e / kChunk, k = e % kChunk;
        const bool inside = row0 + row < rows && first + k < dim;
        query_tile[k][row] = inside ? to_float(query[int64_t(row0 + row) * dim + first + k]) : 0.f;
      }
      if constexpr (Format == KCacheFormat::kDense) {
        const key_t* keys = static_cast<const key_t*>(params.keys) + pair * width * dim;
        for (int e = tid; e < kTileKeys * kChunk; e += kThreads) {
          const int key = e / kChunk, k = e % kChunk;
          const bool inside = key0 + key < width && first + k < dim;
          key_tile[k][key] = inside ? to_float(keys[int64_t(key0 + key) * dim + first + k]) : 0.f;
        }
      } else {
        // One code word (8 values of one group) per thread: 64 keys x 4 words.
        constexpr int kGroup = kcache::FormatTraits<Format>::kGroupSize;
        const int key = tid / 4, word_index = tid % 4;
        const int64_t key_row = pair * width + key0 + key;
        float values[8] = {};
        if (key0 + key < width) {  // dim is a multiple of 32 for packed keys
          const uint32_t word = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(params.keys) +
                                                                  key_row * (dim / 2) + first / 2)[word_index];
          const uint8_t* scales = static_cast<const uint8_t*>(params.key_scales) +
                                  key_row * (dim / kGroup) * packed_scale_bytes(Format);
          const int element = first + word_index * 8;
          const float block_scale = kcache::decode_block_scale<Format>(packed_scale_bits<Format>(scales, element / kGroup));
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            values[i] = packed_key_value<Format>((word >> (4 * i)) & 0xFu, block_scale, params.global_scale);
          }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) key_tile[word_index * 8 + i][key] = values[i];
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        float q[4], kv[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) q[r] = query_tile[k][ty + 16 * r];
#pragma unroll
        for (int c = 0; c < 4; ++c) kv[c] = key_tile[k][tx + 16 * c];
        // Past dim the tiles hold zeros: fma(0, 0, acc) == acc keeps the chain exact.
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = __fmaf_rn(q[r], kv[c], acc[r][c]);
        }
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = row0 + ty + 16 * r;
    if (row >= rows) continue;
    float* out = params.scores + (pair * rows + row) * width;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int key = key0 + tx + 16 * c;
      if (key < width) out[key] = key < visible[r] ? acc[r][c] * params.softmax_scale : -INFINITY;
    }
  }
}

template <typename query_t, typename key_t, KCacheFormat Format>
void launch(const SelectorScoreParams& params) {
  const int key_tiles = (params.num_key_blocks + kTileKeys - 1) / kTileKeys;
  const int row_tiles = (params.num_query_rows + kTileRows - 1) / kTileRows;
  const int64_t tiles = int64_t(key_tiles) * row_tiles * params.batch * params.heads;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  selector_score_kernel<query_t, key_t, Format>
      <<<dim3(unsigned(tiles)), dim3(kThreads), 0, stream>>>(params, key_tiles, row_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void selector_score_cuda(const SelectorScoreParams& params) {
  if (params.batch == 0 || params.heads == 0 || params.num_query_rows == 0 || params.num_key_blocks == 0) return;
  SPOT_DISPATCH_FLOAT(params.query_dtype, query_t, {
    SPOT_DISPATCH_KCACHE_FORMAT_OR_DENSE(params.format, kFormat, {
      if constexpr (kFormat == KCacheFormat::kDense) {
        SPOT_DISPATCH_FLOAT(params.key_dtype, key_t, (launch<query_t, key_t, kFormat>(params)));
      } else {
        launch<query_t, uint8_t, kFormat>(params);  // packed keys are code bytes
      }
    });
  });
}

}  // namespace spot
