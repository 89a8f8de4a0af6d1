// CUDA kernel of spot.sparse_prefill on the portable tensor-core path (mma.sync m16n8k16,
// cp.async, ldmatrix: FlashAttention-2's shape, runs on sm_80 and later), and the launcher that
// picks between it and the Hopper kernel (sparse_prefill_sm90_cuda.cu).
//
// Work split. Within one (sequence, KV head) the query rows are ordered (query block, head of
// the group, token), so every query block owns G * block_size consecutive rows and all of them
// share one list of key blocks. A CTA of 4 warps takes 128 of these rows; each warp takes 32 rows
// = 32 consecutive tokens of one head in one query block (block_size is a multiple of 32). A
// CTA's rows therefore span at most two adjacent query blocks, A and A + 1: the CTA walks the
// union of their key-block lists, loading each 64-key tile once into shared memory, and a warp
// skips the tiles its own block did not choose.
//
// Lists are read as sets (any order, duplicates, entries outside [0, query block) ignored) by
// turning them into bitmaps in shared memory, a chunk of kChunkBlocks key blocks at a time, so a
// list of any length costs one pass over it per chunk and no sort.
#include <atomic>
#include <cstdint>
#include <cstdlib>
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
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 32;
constexpr int kTileRows = kWarps * kRowsPerWarp;  // query rows per CTA
constexpr int kKeyTile = 64;                      // keys per shared-memory stage
constexpr int kChunkBlocks = 2048;                // key blocks one bitmap fill covers (128K tokens at 64)
constexpr int kChunkWords = kChunkBlocks / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------
// Shared-memory layout
// ------------------------------------------------------------------------------------------

// Row-major [rows][kHeadDim] tiles, swizzled (ptx::swizzled_offset) so ldmatrix reads are free
// of bank conflicts.
template <typename scalar_t, int kHeadDim>
struct SharedStorage {
  scalar_t query[kTileRows * kHeadDim];     // also stages the output tile in the epilogue
  scalar_t key[2][kKeyTile * kHeadDim];     // double-buffered key tiles
  scalar_t value[2][kKeyTile * kHeadDim];   // double-buffered value tiles
  uint32_t chosen[2][kChunkWords];          // bitmaps of key blocks chosen by query blocks A, A + 1
};

// ------------------------------------------------------------------------------------------
// The walk over the union of the two lists
// ------------------------------------------------------------------------------------------

struct KeyTile {
  int block;     // key block index, -1 past the end
  int sub_tile;  // which 64-key tile of the block (block_size 128 has two)
  bool chosen_by[2];  // whether query blocks A and A + 1 attend this key block
};

// The two lists a CTA walks; kept in shared memory (read only when a bitmap is rebuilt) so the
// main loop's registers go to the accumulators.
struct ListSource {
  const int32_t* lists[2];  // block_indices rows of query blocks A and A + 1
  int counts[2];            // their clamped counts
  int query_blocks[2];      // A and A + 1 (the same block twice when the CTA spans one)
  int num_lists;            // 1 or 2
};

struct ListWalker {
  const ListSource* source;
  uint32_t (*chosen)[kChunkWords];
  int last_block;  // the largest block the union can hold: the last diagonal
  int chunk_base;  // first key block of the chunk the bitmaps hold

  // Rebuild both bitmaps for key blocks [base, base + kChunkBlocks). Called by every thread.
  __device__ void fill(int base) {
    chunk_base = base;
    __syncthreads();  // everyone is done reading the previous chunk
    for (int word = threadIdx.x; word < 2 * kChunkWords; word += kThreads) chosen[0][word] = 0u;
    __syncthreads();
#pragma unroll
    for (int list = 0; list < 2; ++list) {
      if (list >= source->num_lists) break;
      const int diagonal = source->query_blocks[list];
      const int32_t* entries = source->lists[list];
      const int count = source->counts[list];
      for (int i = threadIdx.x; i < count; i += kThreads) {
        const int block = __ldg(entries + i);
        const int relative = block - base;
        if (block >= 0 && block < diagonal && relative >= 0 && relative < kChunkBlocks) {
          atomicOr(&chosen[list][relative >> 5], 1u << (relative & 31));
        }
      }
      const int relative = diagonal - base;
      if (threadIdx.x == 0 && relative >= 0 && relative < kChunkBlocks) {
        atomicOr(&chosen[list][relative >> 5], 1u << (relative & 31));
      }
    }
    __syncthreads();
  }

  // The first key block >= `from` that either list holds, or -1. Every thread gets the same
  // answer (uniform control flow: fill() synchronises the CTA).
  __device__ KeyTile find(int from) {
    KeyTile tile{-1, 0, {false, false}};
    while (from <= last_block) {
      if (from >= chunk_base + kChunkBlocks) fill(chunk_base + kChunkBlocks);
      const int relative = from - chunk_base;
      const int word = relative >> 5;
      const uint32_t mask = ~0u << (relative & 31);
      const uint32_t words[2] = {chosen[0][word], chosen[1][word]};
      const uint32_t bits = (words[0] | words[1]) & mask;
      if (bits != 0u) {
        const int bit = __ffs(bits) - 1;
        tile.block = chunk_base + (word << 5) + bit;
        tile.chosen_by[0] = (words[0] >> bit) & 1u;
        tile.chosen_by[1] = (words[1] >> bit) & 1u;
        return tile;
      }
      from = chunk_base + ((word + 1) << 5);
    }
    return tile;
  }

  __device__ KeyTile next(const KeyTile& current, int tiles_per_block) {
    if (current.sub_tile + 1 < tiles_per_block) {
      KeyTile tile = current;
      ++tile.sub_tile;
      return tile;
    }
    return find(current.block + 1);
  }
};

// ------------------------------------------------------------------------------------------
// The kernel
// ------------------------------------------------------------------------------------------

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2) sparse_prefill_mma_kernel(const SparsePrefillParams params) {
  constexpr int kChunksPerRow = kHeadDim / 8;             // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // rows one cp.async sweep covers
  constexpr int kDimTiles = kHeadDim / 8;                 // n8 tiles of the output
  constexpr int kKeyTiles = kKeyTile / 8;                 // n8 tiles of the scores

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  auto& shared = *reinterpret_cast<SharedStorage<scalar_t, kHeadDim>*>(shared_bytes);

  const int block_size = params.block_size;
  const int group = params.heads_q / params.heads_kv;
  const int slabs_per_block = group * (block_size / kRowsPerWarp);  // 32-row slabs per query block
  const int max_query_blocks = (params.max_seqlen + block_size - 1) / block_size;
  const int tiles_per_sequence = (max_query_blocks * slabs_per_block + kWarps - 1) / kWarps;

  // Heaviest CTAs (the last query blocks, which see the most keys) first.
  const int sequence_heads = params.batch * params.heads_kv;
  const int linear = int(blockIdx.x);
  const int row_tile = tiles_per_sequence - 1 - linear / sequence_heads;
  const int batch_index = (linear % sequence_heads) / params.heads_kv;
  const int kv_head = linear % params.heads_kv;

  // The kernel trusts cu_seqlens (checking them would cost a sync) but stays in bounds.
  const int seq_start = min(max(params.cu_seqlens[batch_index], 0), params.total_tokens);
  const int seq_end = min(max(params.cu_seqlens[batch_index + 1], seq_start), params.total_tokens);
  const int length = min(seq_end - seq_start, params.max_seqlen);
  const int num_query_blocks = (length + block_size - 1) / block_size;
  const int num_slabs = num_query_blocks * slabs_per_block;
  const int first_slab = row_tile * kWarps;
  if (first_slab >= num_slabs) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // This warp's rows: 32 tokens starting at warp_token of head warp_head in query block warp_block.
  const int slab = first_slab + warp;
  const int warp_block = slab / slabs_per_block;
  const int slab_in_block = slab % slabs_per_block;
  const int warp_head = kv_head * group + slab_in_block / (block_size / kRowsPerWarp);
  const int warp_token = warp_block * block_size + (slab_in_block % (block_size / kRowsPerWarp)) * kRowsPerWarp;
  const bool warp_has_rows = slab < num_slabs && warp_token < length;
  const int block_a = first_slab / slabs_per_block;
  const int block_b = min((first_slab + kWarps - 1) / slabs_per_block, num_query_blocks - 1);
  const int warp_list = warp_block - block_a;  // 0 or 1 (meaningless when !warp_has_rows)

  // ---- Query tile: the 4 slabs' rows, zero past the sequence --------------------------------
  const auto* query = static_cast<const scalar_t*>(params.query);
  const auto* key = static_cast<const scalar_t*>(params.key);
  const auto* value = static_cast<const scalar_t*>(params.value);
  for (int index = threadIdx.x; index < kTileRows * kChunksPerRow; index += kThreads) {
    const int row = index / kChunksPerRow;
    const int chunk = index % kChunksPerRow;
    const int row_slab = first_slab + row / kRowsPerWarp;
    const int row_block = row_slab / slabs_per_block;
    const int row_in_block = row_slab % slabs_per_block;
    const int head = kv_head * group + row_in_block / (block_size / kRowsPerWarp);
    const int token = row_block * block_size + (row_in_block % (block_size / kRowsPerWarp)) * kRowsPerWarp +
                      row % kRowsPerWarp;
    const bool valid = row_slab < num_slabs && token < length;
    const scalar_t* source =
        valid ? query + ((int64_t(seq_start) + token) * params.heads_q + head) * kHeadDim + chunk * 8 : query;
    cp_async_16(shared_address(&shared.query[swizzled_offset<kHeadDim>(row, chunk)]), source, valid);
  }

  // ---- Key/value tile loader ---------------------------------------------------------------
  const int tiles_per_block = block_size / kKeyTile;
  const int load_row = threadIdx.x / kChunksPerRow;
  const int load_chunk = threadIdx.x % kChunksPerRow;
  const int64_t token_stride = int64_t(params.heads_kv) * kHeadDim;
  const int64_t sequence_offset = (int64_t(seq_start) * params.heads_kv + kv_head) * kHeadDim + load_chunk * 8;
  const scalar_t* key_sequence = key + sequence_offset;
  const scalar_t* value_sequence = value + sequence_offset;
  auto load_key_value = [&](const KeyTile& tile, int stage) {
    const int tile_token = tile.block * block_size + tile.sub_tile * kKeyTile;
#pragma unroll
    for (int pass = 0; pass < kKeyTile / kRowsPerPass; ++pass) {
      const int row = pass * kRowsPerPass + load_row;
      const int token = tile_token + row;
      const bool valid = token < length;  // zeros past the sequence: never NaN * 0 in P V
      const int64_t offset = valid ? token * token_stride : 0;
      const int destination = swizzled_offset<kHeadDim>(row, load_chunk);
      cp_async_16(shared_address(&shared.key[stage][destination]), key_sequence + offset, valid);
      cp_async_16(shared_address(&shared.value[stage][destination]), value_sequence + offset, valid);
    }
  };

  // ---- Lists -> bitmaps --------------------------------------------------------------------
  __shared__ ListSource list_source;
  if (threadIdx.x == 0) {
    list_source.num_lists = block_b != block_a ? 2 : 1;
    list_source.query_blocks[0] = block_a;
    list_source.query_blocks[1] = block_b;
#pragma unroll
    for (int list = 0; list < 2; ++list) {
      const int64_t row = (int64_t(batch_index) * params.heads_kv + kv_head) * params.num_query_blocks +
                          list_source.query_blocks[list];
      list_source.lists[list] = params.block_indices + row * params.max_selected;
      list_source.counts[list] = min(max(params.block_counts[row], 0), params.max_selected);
    }
  }
  ListWalker walker{&list_source, shared.chosen, block_b, 0};
  walker.fill(0);
  KeyTile current = walker.find(0);  // never -1: block A's diagonal is always in the union

  load_key_value(current, 0);
  cp_async_commit();

  // ---- Per-thread state --------------------------------------------------------------------
  // mma fragment coordinates: `group_row` picks rows (and n columns of B), `pair` column pairs.
  const int group_row = lane / 4;
  const int pair = lane % 4;
  const float scale_log2 = params.softmax_scale * kLog2e;

  float output[2][kDimTiles][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) output[m][n][i] = 0.f;
  float row_max[2][2], row_sum[2][2];  // [m tile][row group_row or group_row + 8], log2 units
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[m][h] = -INFINITY;
      row_sum[m][h] = 0.f;
    }

  // ldmatrix: each lane names one row (and which 8-column half) of one of the four 8x8 matrices;
  // every row it names has row % 8 == lane % 8, so the swizzle XOR is lane % 8 throughout.
  const int swizzle_bits = lane & 7;
  const uint32_t query_base = shared_address(shared.query);
  const int query_row = warp * kRowsPerWarp + (lane & 15);  // + 16 * m tile
  const int query_chunk_high = lane >> 4;
  const int key_row = (lane & 7) + ((lane >> 4) << 3);  // + 16 * key pair
  const int key_chunk_high = (lane >> 3) & 1;
  const int value_row = (lane & 7) + (((lane >> 3) & 1) << 3);  // + 16 * key step
  const int value_chunk_high = lane >> 4;

  int stage = 0;
  while (true) {
    cp_async_wait<0>();
    __syncthreads();  // this stage (and the query tile) landed; the other stage is free
    const KeyTile upcoming = walker.next(current, tiles_per_block);
    if (upcoming.block >= 0) {
      load_key_value(upcoming, stage ^ 1);
      cp_async_commit();
    }

    const int tile_token = current.block * block_size + current.sub_tile * kKeyTile;
    const bool chosen_by_warp = warp_list == 0 ? current.chosen_by[0] : current.chosen_by[1];
    const bool attends = warp_has_rows && chosen_by_warp && tile_token <= warp_token;
    if (attends) {
      const uint32_t key_base = shared_address(shared.key[stage]);
      const uint32_t value_base = shared_address(shared.value[stage]);

      // scores = Q K^T for this warp's 32 rows x 64 keys.
      float scores[2][kKeyTiles][4];
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) scores[m][n][i] = 0.f;
#pragma unroll
      for (int k_step = 0; k_step < kHeadDim / 16; ++k_step) {
        uint32_t query_fragment[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int row = query_row + 16 * m;
          const int chunk = (2 * k_step + query_chunk_high) ^ swizzle_bits;
          ldmatrix_x4(query_base + 2 * (row * kHeadDim + (chunk << 3)), query_fragment[m]);
        }
#pragma unroll
        for (int key_pair = 0; key_pair < kKeyTile / 16; ++key_pair) {
          uint32_t key_fragment[4];
          const int row = key_row + 16 * key_pair;
          const int chunk = (2 * k_step + key_chunk_high) ^ swizzle_bits;
          ldmatrix_x4(key_base + 2 * (row * kHeadDim + (chunk << 3)), key_fragment);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma_16816<scalar_t>(scores[m][2 * key_pair], query_fragment[m], key_fragment[0], key_fragment[1]);
            mma_16816<scalar_t>(scores[m][2 * key_pair + 1], query_fragment[m], key_fragment[2], key_fragment[3]);
          }
        }
      }

      // Online softmax in log2 units. The causal mask only applies where the tile reaches the
      // warp's rows (the tile starts at or before warp_token; both are multiples of 32). Scaling
      // before the max keeps a negative softmax_scale right.
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) scores[m][n][i] *= scale_log2;
      const int row_offset = warp_token - tile_token;  // key index (in tile) of the warp's row 0
      if (row_offset < kKeyTile) {
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row_in_tile = row_offset + 16 * m + group_row + 8 * (i / 2);
              if (8 * n + 2 * pair + (i % 2) > row_in_tile) scores[m][n][i] = -INFINITY;
            }
      }
#pragma unroll
      for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n) {
            tile_max = fmaxf(tile_max, fmaxf(scores[m][n][2 * h], scores[m][n][2 * h + 1]));
          }
          tile_max = quad_max(tile_max);
          const float new_max = fmaxf(row_max[m][h], tile_max);
          // A row with nothing visible yet keeps max -inf; subtracting 0 keeps exp2 at 0, not NaN.
          const float shift = new_max == -INFINITY ? 0.f : new_max;
          const float rescale = fast_exp2(row_max[m][h] - shift);
          row_max[m][h] = new_max;
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const float probability = fast_exp2(scores[m][n][2 * h + j] - shift);
              scores[m][n][2 * h + j] = probability;
              sum += probability;
            }
          }
          row_sum[m][h] = row_sum[m][h] * rescale + sum;
#pragma unroll
          for (int n = 0; n < kDimTiles; ++n) {
            output[m][n][2 * h] *= rescale;
            output[m][n][2 * h + 1] *= rescale;
          }
        }
      }

      // output += P V: the score accumulators of two adjacent n8 tiles form one A fragment.
#pragma unroll
      for (int k_step = 0; k_step < kKeyTile / 16; ++k_step) {
        uint32_t probability_fragment[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          probability_fragment[m][0] = pack_pair<scalar_t>(scores[m][2 * k_step][0], scores[m][2 * k_step][1]);
          probability_fragment[m][1] = pack_pair<scalar_t>(scores[m][2 * k_step][2], scores[m][2 * k_step][3]);
          probability_fragment[m][2] =
              pack_pair<scalar_t>(scores[m][2 * k_step + 1][0], scores[m][2 * k_step + 1][1]);
          probability_fragment[m][3] =
              pack_pair<scalar_t>(scores[m][2 * k_step + 1][2], scores[m][2 * k_step + 1][3]);
        }
#pragma unroll
        for (int dim_pair = 0; dim_pair < kHeadDim / 16; ++dim_pair) {
          uint32_t value_fragment[4];
          const int row = value_row + 16 * k_step;
          const int chunk = (2 * dim_pair + value_chunk_high) ^ swizzle_bits;
          ldmatrix_x4_transposed(value_base + 2 * (row * kHeadDim + (chunk << 3)), value_fragment);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma_16816<scalar_t>(output[m][2 * dim_pair], probability_fragment[m], value_fragment[0],
                                value_fragment[1]);
            mma_16816<scalar_t>(output[m][2 * dim_pair + 1], probability_fragment[m], value_fragment[2],
                                value_fragment[3]);
          }
        }
      }
    }

    if (upcoming.block < 0) break;
    current = upcoming;
    stage ^= 1;
  }

  if (!warp_has_rows) return;

  // ---- Epilogue: normalise, stage the warp's rows in its own query rows, store 16 B chunks ----
  auto* out = static_cast<scalar_t*>(params.out);
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(row_sum[m][h]);
      const float inverse = sum > 0.f ? 1.f / sum : 0.f;
      const int row = warp * kRowsPerWarp + 16 * m + group_row + 8 * h;
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        const uint32_t packed = pack_pair<scalar_t>(output[m][n][2 * h] * inverse, output[m][n][2 * h + 1] * inverse);
        *reinterpret_cast<uint32_t*>(&shared.query[swizzled_offset<kHeadDim>(row, n) + 2 * pair]) = packed;
      }
      const int token = warp_token + 16 * m + group_row + 8 * h;
      if (pair == 0 && token < length) {
        params.lse[(int64_t(seq_start) + token) * params.heads_q + warp_head] =
            sum > 0.f ? (row_max[m][h] + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int index = lane; index < kRowsPerWarp * kChunksPerRow; index += 32) {
    const int row = index / kChunksPerRow;
    const int chunk = index % kChunksPerRow;
    const int token = warp_token + row;
    if (token < length) {
      const uint4 data =
          *reinterpret_cast<const uint4*>(&shared.query[swizzled_offset<kHeadDim>(warp * kRowsPerWarp + row, chunk)]);
      *reinterpret_cast<uint4*>(out + ((int64_t(seq_start) + token) * params.heads_q + warp_head) * kHeadDim +
                                chunk * 8) = data;
    }
  }
}

template <typename scalar_t, int kHeadDim>
void launch_sparse_prefill_mma(const SparsePrefillParams& params) {
  if constexpr (kHeadDim != 64 && kHeadDim != 128) {
    throw std::invalid_argument("spot.sparse_prefill: the CUDA kernel supports head_dim 64 and 128, got " +
                                std::to_string(kHeadDim));
  } else {
    const int max_query_blocks = (params.max_seqlen + params.block_size - 1) / params.block_size;
    const int slabs_per_block = (params.heads_q / params.heads_kv) * (params.block_size / kRowsPerWarp);
    const int64_t tiles_per_sequence = (int64_t(max_query_blocks) * slabs_per_block + kWarps - 1) / kWarps;
    const int64_t num_ctas = tiles_per_sequence * params.batch * params.heads_kv;
    if (num_ctas == 0) return;
    if (num_ctas >= (int64_t(1) << 31)) {
      throw std::invalid_argument("spot.sparse_prefill: too many query tiles for one launch");
    }
    const size_t shared_bytes = sizeof(SharedStorage<scalar_t, kHeadDim>);
    auto kernel = sparse_prefill_mma_kernel<scalar_t, kHeadDim>;
    // The attribute is per device; set it once for each device this instantiation meets.
    static std::atomic<uint64_t> configured_devices{0};
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    const uint64_t device_bit = device < 64 ? uint64_t(1) << device : 0;
    if (device_bit == 0 || !(configured_devices.load(std::memory_order_relaxed) & device_bit)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
      configured_devices.fetch_or(device_bit, std::memory_order_relaxed);
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    kernel<<<unsigned(num_ctas), kThreads, shared_bytes, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void sparse_prefill_mma_cuda(const SparsePrefillParams& params) {
  if (params.block_size != 64 && params.block_size != 128) {
    throw std::invalid_argument("spot.sparse_prefill: the mma kernel needs block_size 64 or 128, got " +
                                std::to_string(params.block_size));
  }
  SPOT_DISPATCH_HALF(params.dtype, scalar_t,
                     SPOT_DISPATCH_HEAD_DIM(params.head_dim, kHeadDim,
                                            launch_sparse_prefill_mma<scalar_t, kHeadDim>(params)));
}

// SPOT_PREFILL_IMPL: unset / "auto" runs the Hopper kernel where it supports the call and the
// mma kernel otherwise; "mma" and "wgmma" force one (wgmma raises where it cannot run).
void sparse_prefill_cuda(const SparsePrefillParams& params) {
  const char* requested = std::getenv("SPOT_PREFILL_IMPL");
  const std::string impl = requested != nullptr ? requested : "";
  if (impl == "mma") return sparse_prefill_mma_cuda(params);
  if (impl == "wgmma") {
    if (!sparse_prefill_sm90_supported(params)) {
      throw std::invalid_argument(
          "spot.sparse_prefill: SPOT_PREFILL_IMPL=wgmma, but the Hopper kernel does not support this call "
          "(device, dtype, head_dim or block_size); unset it or use SPOT_PREFILL_IMPL=mma");
    }
    return sparse_prefill_sm90_cuda(params);
  }
  if (!impl.empty() && impl != "auto") {
    throw std::invalid_argument("spot.sparse_prefill: SPOT_PREFILL_IMPL must be unset, 'auto', 'mma' or 'wgmma', got '" +
                                impl + "'");
  }
  if (sparse_prefill_sm90_supported(params)) return sparse_prefill_sm90_cuda(params);
  sparse_prefill_mma_cuda(params);
}

}  // namespace spot
