// CUDA kernels of spot.sparse_decode: one decode query per (sequence, query head) over the chosen
// key blocks of its KV head, with split-KV across CTAs and a log-sum-exp merge.
//
// Shape of the work. One CTA (4 warps) serves one (sequence, KV head, head chunk, split): the
// whole query group of the KV head (up to 16 query heads, the rows of one m16n8k16 tile; larger
// groups take several head chunks) attends to the split's share of the chosen blocks, so each
// key and value row is read from memory once for all of the group's heads. Decode is bound by
// memory bandwidth, so the kernel is built around the loads:
//   - the chosen blocks of a split are walked as one flat list of token slots, cut into tiles of
//     64 tokens regardless of block_size (small blocks share a tile, a tile never waits on a
//     block boundary);
//   - each tile's K and V rows arrive by 16-byte cp.async into a kStages-deep ring in shared
//     memory (zero-filled when a row is masked: past seq_len, a bad block index, a bad page), so
//     kStages - 1 tiles are always in flight while the current one is computed (Hopper bulk
//     copies instead, one per 256-byte row completing on an mbarrier, measured slower: per layer
//     at 128K tokens, 4096-token budget, B = 1 / 8 / 32: 17.2 / 46.0 / 141.5 us against
//     15.1 / 42.4 / 129.4, H200; and so did a deep ring for grids of at most one CTA per SM,
//     ~192 KB with 5 tiles of head dim 128 in flight and the chosen list loaded together with
//     the count: B = 1, 15.1 us per layer against 14.7);
//   - rows are XOR-swizzled in 16-byte chunks so ldmatrix reads are free of bank conflicts;
//   - Q K^T and P V run on mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate); each warp owns 16
//     tokens of a tile and keeps its own online-softmax state, and the 4 warps merge once at
//     the end, so the main loop has no cross-warp reductions.
// The row addresses of a tile (the block-index, page-table and length logic) are resolved once
// per row into a small shared ring one tile ahead of its loads, not once per 16-byte chunk.
//
// The splits' merge. On Hopper, when a row has at most kMaxClusterSplits splits and the grid's
// clusters all run at once, a row's splits run as one thread-block cluster: every warp of every
// CTA leaves its normalised partial rows and their LSEs in its shared memory, and after a cluster
// barrier every CTA merges a share of the output elements from all warps' partials, reading the
// other CTAs' through distributed shared memory. Otherwise the CTA merges its 4 warps, and the
// partials go to a global workspace that a second kernel merges.
// Measured per layer (H200, 128K tokens, 4096-token budget, Qwen3-8B shapes): B = 1, 16 splits in
// clusters 15.2 us against 15.8 for 32 splits and the merge kernel; B = 8, 4-CTA clusters 68 us
// against 43 (not every cluster fit the first wave, hence the occupancy check). Merging all
// warps' partials in one cluster pass took B = 1 from 15.1 to 14.3 us (phase traces: the CTA's
// own merge of its warps fell from 3.3k-4.3k cycles to 1.2k, the cluster merge rose from 5k to 6.5k).
// Loading the partials together with their LSEs (one round trip through distributed shared
// memory, not two) changed nothing measurable: B = 1, 14.7 us per layer either way. Nor did
// replacing the merge kernel by a merge in the row's last split to finish (a per-row counter
// taken with atomicInc after a __threadfence): B = 8, 42.6 / 42.7 us per layer against 42.5 / 42.6.
// Prefetching the row's chosen list into L1 before the count arrives did not shorten the
// prologue either: B = 1 / 8 / 32, 14.5 / 42.3 / 131.3 us against 14.5 / 42.5 / 131.3 (H200; these
// two with the L2 emptied by writing, which the timed call paid for in dirty-line write-backs).
// Where the time outside the stream went before the two changes below (per-CTA %globaltimer traces,
// B = 8, 4-layer graph): from the wait's return, 3.5 us to the first loads' issue and 1.2 us more
// to the first tile, 29.5 us of streaming (median CTA; 1.4 us more for the slowest), 1.4 us of warp
// merge and partial writes, then 2.4 us of merge kernel until the next layer's wait returns. What
// helped: the merge kernel loading the first splits' partial rows together with their LSEs, and
// tile 0's loads issued before the next tiles' rows are resolved: B = 8, 38.8 us per layer against
// 39.7; SmolLM2 shapes (d = 64) B = 8 / 32, 13.7 / 31.6 against 14.4 / 32.8; B = 1 (merged in a
// cluster) 13.6 against 13.2, within the spread between runs (H200, L2 emptied by reading).
// At B = 1 the kernel is not bound by HBM: with its 16.8 MB already in L2 it took 12.69 us per
// layer against 12.93 (8-layer graph), so prefetching likely blocks into L2 cannot pay. Its 16
// splits per row (fewer measured slower: 8 / 12 splits, 17.8 / 17.0 us against 13.5) run as 128
// CTAs that the hardware packs two per SM onto 66 of the 132 SMs. Phase trace, Qwen3-8B shapes,
// from the wait's return: prologue 3.5 us, tile 0 arrives 1.1 later, 4 tiles 4.5, partials written
// 0.7, cluster merge 3.4, next layer's wait 0.4. Cutting the prologue's dependent round trips from
// three to one (each split takes list positions split, split + S, ..., so its blocks load with
// the count) and the merge's remote requests sevenfold (each LSE read once per CTA, partial rows
// as float4) changed nothing measurable: B = 1 / 8 / 32, 13.7 / 39.8 / 128.6 us against
// 13.5 / 38.7 / 126.4. Its finer trace: resolving tile 0's rows and issuing its copies took
// 1.15 us, and 1.1-1.2 again when the same code ran twice (a warm instruction cache): not
// instruction fetch; it points to the SM's outstanding requests, ~64 KB per SM per us with two
// CTAs per SM (bench/results/decode_b1_latency_h200.md). Asking for one CTA's worth of an SM's
// shared memory where the grid has at most one CTA per SM, only where the 16-CTA clusters would
// still all fit, changed nothing: the trace showed the same packing both ways (the occupancy
// check most likely refused it), B = 1 13.4 us either way.
#include <cooperative_groups.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_device.h"
#include "launchers.h"
#include "spot/cuda/dependent_launch.cuh"
#include "spot/cuda/mma_sm80.cuh"
#include "spot/dispatch.h"
#include "spot/numeric.h"

namespace spot {
namespace {

using namespace ::spot::ptx;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileTokens = 16 * kWarps;  // each warp owns 16 tokens: one k16 step of P V
constexpr int kHeadRows = 16;             // query heads per CTA: the M of m16n8k16
constexpr int kMaxSplits = 64;
constexpr int kMaxClusterSplits = 16;  // the non-portable cluster size limit of Hopper
// Below this many tokens (two tiles) per split the merge costs more than the parallelism saves.
constexpr int64_t kMinTokensPerSplit = 128;
// Above this many tokens (four tiles) per split a cluster's cap on the split count costs more
// than its merge saves (see plan_sparse_decode).
constexpr int64_t kMaxClusterTokensPerSplit = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Pipeline depth per head dim: enough bytes in flight per SM (Little's law wants ~20-30 KB per
// SM on H100) while leaving room for 2-3 CTAs per SM.
template <int kHeadDim>
struct DecodeConfig {
  static constexpr int kStages = kHeadDim == 64 ? 4 : (kHeadDim == 128 ? 3 : 2);
  static constexpr int kChunksPerRow = kHeadDim / 8;                    // 16-byte chunks
  static constexpr int kTileElems = kTileTokens * kHeadDim;             // one K (or V) tile
  static constexpr int kChunksPerTile = kTileTokens * kChunksPerRow;
  static_assert(kChunksPerTile % kThreads == 0, "a tile must split evenly over the threads");
  static constexpr int kChunksPerThread = kChunksPerTile / kThreads;
  static constexpr int kInfoSlots = kStages + 1;  // row-address ring, one tile ahead of the loads
  // Byte layout of the dynamic shared memory.
  static constexpr size_t kKeyBytes = size_t(kStages) * kTileElems * 2;
  static constexpr size_t kValueOffset = kKeyBytes;
  static constexpr size_t kInfoOffset = 2 * kKeyBytes;
  static constexpr size_t kInfoBytes = size_t(kInfoSlots) * kTileTokens * 2 * sizeof(int64_t);
  // Head dim 256 keeps the query fragments in shared memory (re-read per tile by ldmatrix):
  // in registers they would push the accumulators into local memory.
  static constexpr bool kQueryInRegisters = kHeadDim <= 128;
  static constexpr size_t kQueryOffset = kInfoOffset + kInfoBytes;
  static constexpr size_t kQueryBytes = kQueryInRegisters ? 0 : size_t(kHeadRows) * kHeadDim * 2;
  static constexpr size_t kStatsOffset = kQueryOffset + kQueryBytes;
  static constexpr size_t kStatsBytes = 2 * kWarps * kHeadRows * sizeof(float);
  static constexpr size_t kSmemBytes = kStatsOffset + kStatsBytes;
  // The end-of-loop merge reuses the K/V ring for every warp's fp32 [16, head_dim] accumulator
  // (rows padded by 8 floats: the float2 stores of a half-warp's 4 rows then hit 32 distinct
  // banks, where unpadded rows all start on bank 0), then (cluster merge) their 16 LSEs per warp.
  static constexpr int kOutPitch = kHeadDim + 8;
  static constexpr size_t kWarpOutFloats = size_t(kWarps) * kHeadRows * kOutPitch;
  static_assert((kWarpOutFloats + kWarps * kHeadRows) * sizeof(float) <= 2 * kKeyBytes,
                "merge buffers must fit in the pipeline's shared memory");
};

// ------------------------------------------------------------------------------------------
// Split-KV attention kernel
// ------------------------------------------------------------------------------------------

// The cluster merge (the x dimension of the grid, the splits, is the cluster). Every warp of every
// split left its normalised partial rows ([16][kOutPitch] floats) and their LSEs (log2 units,
// [16]) in its CTA's shared memory; after a cluster barrier each output element is merged by 4
// adjacent lanes, lane w reading warp w's partial of every split, and the 4 combine by shuffles:
// out = sum exp2(lse_i - lse) out_i over all (split, warp) partials i, lse = log2-sum-exp2 of lse_i.
// One pass over warps x splits instead of a per-CTA merge of the 4 warps, a barrier, and a
// merge of the splits.
template <typename T, int kHeadDim>
__device__ void merge_in_cluster(const SparseDecodeParams& params, const float* warp_partial, const float* warp_lse,
                                 int num_rows, int64_t first_head) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kOutPitch = DecodeConfig<kHeadDim>::kOutPitch;
  static_assert(kWarps == 4, "4 lanes merge one element, one per warp");
  const cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every warp's partial written
  const int splits = int(cluster.num_blocks());
  const int warp = int(threadIdx.x) % kWarps;  // whose partials this lane reads
  const int elements = num_rows * kHeadDim;
  const int per_pass = splits * (kThreads / kWarps);
  const int first = (int(cluster.block_rank()) * kThreads + int(threadIdx.x)) / kWarps;
  // The same number of passes in every lane: the shuffles need all 32.
  for (int pass_start = 0; pass_start < elements; pass_start += per_pass) {
    const int index = pass_start + first;
    const bool valid = index < elements;
    const int head_row = valid ? index / kHeadDim : 0;
    const int column = index % kHeadDim;
    // Unrolled over the largest cluster so the remote loads are all in flight at once.
    float split_lse[kMaxClusterSplits];
    float max_lse = -INFINITY;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      split_lse[s] = valid && s < splits ? *cluster.map_shared_rank(warp_lse + warp * kHeadRows + head_row, s)
                                         : -INFINITY;
      max_lse = fmaxf(max_lse, split_lse[s]);
    }
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, 1));
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, 2));
    float total = 0.f, value = 0.f;
    if (max_lse != -INFINITY) {
      const float* partial = warp_partial + (warp * kHeadRows + head_row) * kOutPitch + column;
#pragma unroll
      for (int s = 0; s < kMaxClusterSplits; ++s) {
        if (split_lse[s] == -INFINITY) continue;  // an empty warp or split (or past the cluster)
        const float weight = fast_exp2(split_lse[s] - max_lse);
        total += weight;
        value += weight * *cluster.map_shared_rank(partial, s);
      }
    }
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    value += __shfl_xor_sync(0xffffffffu, value, 1);
    value += __shfl_xor_sync(0xffffffffu, value, 2);
    if (valid && warp == 0) {
      // total >= 1 whenever max_lse is finite: the largest partial has weight 1.
      const bool empty = max_lse == -INFINITY;
      const int64_t head = first_head + head_row;
      static_cast<T*>(params.out)[head * kHeadDim + column] = from_float<T>(empty ? 0.f : value / total);
      if (column == 0) params.lse[head] = empty ? -INFINITY : (max_lse + log2f(total)) * kLn2;
    }
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
#endif
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) sparse_decode_kernel(const SparseDecodeParams params) {
  using Config = DecodeConfig<kHeadDim>;
  constexpr int kStages = Config::kStages;
  constexpr int kKSteps = kHeadDim / 16;   // k16 steps of Q K^T
  constexpr int kDimTiles = kHeadDim / 8;  // n8 tiles of the output

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* key_tiles = reinterpret_cast<T*>(shared_bytes);
  T* value_tiles = reinterpret_cast<T*>(shared_bytes + Config::kValueOffset);
  int64_t* row_key_offset = reinterpret_cast<int64_t*>(shared_bytes + Config::kInfoOffset);  // [slots][tile]
  int64_t* row_value_offset = row_key_offset + Config::kInfoSlots * kTileTokens;
  float* warp_row_max = reinterpret_cast<float*>(shared_bytes + Config::kStatsOffset);  // [warps][16]
  float* warp_row_sum = warp_row_max + kWarps * kHeadRows;

  // The chosen blocks (and this step's KV append) come from the previous kernels of the step.
  wait_for_previous_grid();
  allow_dependent_launch();  // the split merge may launch: it waits for this grid to finish

  const int split = blockIdx.x;
  const int head_chunks = gridDim.y / params.heads_kv;
  const int kv_head = blockIdx.y / head_chunks;
  const int head_chunk = blockIdx.y % head_chunks;
  const int batch_index = blockIdx.z;
  const int group = params.heads_q / params.heads_kv;
  const int first_head = kv_head * group + head_chunk * kHeadRows;  // first query head of this CTA
  const int num_rows = min(kHeadRows, group - head_chunk * kHeadRows);

  const int thread = threadIdx.x;
  const int warp = thread / 32;
  const int lane = thread % 32;
  const int lane_row = lane / 4;   // the "groupID" of the mma fragment layouts
  const int lane_pair = lane % 4;  // the "threadID_in_group"

  // Lengths are clamped to what the cache holds, so a bad seq_len cannot read past it.
  const int64_t cache_tokens =
      params.page_size > 0 ? int64_t(params.pages_per_seq) * params.page_size : int64_t(params.max_seq_len);
  const int64_t length = ::max(int64_t(0), ::min(int64_t(params.seq_lens[batch_index]), cache_tokens));
  const int64_t row = int64_t(batch_index) * params.heads_kv + kv_head;
  const int count = max(0, min(params.block_counts[row], params.max_selected));
  const int32_t* chosen = params.block_indices + row * params.max_selected;

  // This split's share of the chosen blocks, as a range of flat token slots.
  const int blocks_per_split = (count + params.num_splits - 1) / params.num_splits;
  const int first_block = min(count, split * blocks_per_split);
  const int end_block = min(count, first_block + blocks_per_split);
  const int64_t block_size = params.block_size;
  const int64_t slot_begin = int64_t(first_block) * block_size;
  const int64_t slot_end = int64_t(end_block) * block_size;
  const int num_tiles = int((slot_end - slot_begin + kTileTokens - 1) / kTileTokens);
  const bool narrow_slots = slot_end <= INT32_MAX && length <= INT32_MAX;

  const T* key_cache = static_cast<const T*>(params.key_cache);
  const T* value_cache = static_cast<const T*>(params.value_cache);

  // Row addresses of tile `tile` into ring slot `tile % kInfoSlots`; -1 marks a masked row.
  auto resolve_rows = [&](int tile) {
    if (tile >= num_tiles || thread >= kTileTokens) return;
    const int slot = (tile % Config::kInfoSlots) * kTileTokens + thread;
    int64_t key_offset = -1, value_offset = 0;
    const int64_t flat = slot_begin + int64_t(tile) * kTileTokens + thread;
    if (flat < slot_end) {
      // 32-bit division where the values allow it (always, in practice): the 64-bit one is a
      // long software routine on the critical path of every tile.
      const int64_t position = narrow_slots ? int64_t(uint32_t(flat) / uint32_t(block_size)) : flat / block_size;
      const int64_t block = __ldg(chosen + position);
      const int64_t token = block * block_size + (flat - position * block_size);
      if (block >= 0 && token < length) {
        if (params.page_size > 0) {
          const int64_t page_slot =
              narrow_slots ? int64_t(uint32_t(token) / uint32_t(params.page_size)) : token / params.page_size;
          const int64_t page =
              __ldg(params.block_table + int64_t(batch_index) * params.pages_per_seq + page_slot);
          if (page >= 0 && page < params.num_pages) {
            const int64_t in_page = token - page_slot * params.page_size;
            key_offset = page * params.cache_batch_stride + in_page * params.cache_token_stride +
                         kv_head * params.cache_head_stride;
            value_offset = page * params.value_batch_stride + in_page * params.value_token_stride +
                           kv_head * params.value_head_stride;
          }
        } else {
          key_offset = batch_index * params.cache_batch_stride + token * params.cache_token_stride +
                       kv_head * params.cache_head_stride;
          value_offset = batch_index * params.value_batch_stride + token * params.value_token_stride +
                         kv_head * params.value_head_stride;
        }
      }
    }
    row_key_offset[slot] = key_offset;
    row_value_offset[slot] = value_offset;
  };

  // cp.async of tile `tile` into stage `tile % kStages` (rows resolved beforehand).
  auto load_tile = [&](int tile) {
    if (tile >= num_tiles) return;
    const int info = (tile % Config::kInfoSlots) * kTileTokens;
    T* key_stage = key_tiles + (tile % kStages) * Config::kTileElems;
    T* value_stage = value_tiles + (tile % kStages) * Config::kTileElems;
#pragma unroll 2
    for (int i = 0; i < Config::kChunksPerThread; ++i) {
      const int chunk_id = thread + i * kThreads;
      const int tile_row = chunk_id / Config::kChunksPerRow;
      const int chunk = chunk_id % Config::kChunksPerRow;
      const int64_t key_offset = row_key_offset[info + tile_row];
      const bool valid = key_offset >= 0;
      const T* key_src = valid ? key_cache + key_offset + chunk * 8 : key_cache;
      const T* value_src = valid ? value_cache + row_value_offset[info + tile_row] + chunk * 8 : value_cache;
      const int offset = swizzled_offset<kHeadDim>(tile_row, chunk);
      cp_async_16(shared_address(key_stage + offset), key_src, valid);
      cp_async_16(shared_address(value_stage + offset), value_src, valid);
    }
  };

  // Query fragments (A operand of Q K^T), rows past the CTA's heads are zero.
  const T* query = static_cast<const T*>(params.query) + (int64_t(batch_index) * params.heads_q + first_head) * kHeadDim;
  constexpr int kQueryFragSteps = Config::kQueryInRegisters ? kKSteps : 1;
  uint32_t query_frag[kQueryFragSteps][4];
  T* query_tile = reinterpret_cast<T*>(shared_bytes + Config::kQueryOffset);  // [16, head_dim], swizzled
  if constexpr (Config::kQueryInRegisters) {
    const uint32_t* row_low = reinterpret_cast<const uint32_t*>(query + lane_row * kHeadDim);
    const uint32_t* row_high = reinterpret_cast<const uint32_t*>(query + (lane_row + 8) * kHeadDim);
    const bool has_low = lane_row < num_rows, has_high = lane_row + 8 < num_rows;
#pragma unroll
    for (int k = 0; k < kKSteps; ++k) {
      const int pair = k * 8 + lane_pair;  // elements k * 16 + 2 * lane_pair + {0, 1}
      query_frag[k][0] = has_low ? row_low[pair] : 0u;
      query_frag[k][1] = has_high ? row_high[pair] : 0u;
      query_frag[k][2] = has_low ? row_low[pair + 4] : 0u;
      query_frag[k][3] = has_high ? row_high[pair + 4] : 0u;
    }
  } else {
    for (int chunk_id = thread; chunk_id < kHeadRows * Config::kChunksPerRow; chunk_id += kThreads) {
      const int head_row = chunk_id / Config::kChunksPerRow;
      const int chunk = chunk_id % Config::kChunksPerRow;
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (head_row < num_rows) value = *reinterpret_cast<const uint4*>(query + head_row * kHeadDim + chunk * 8);
      *reinterpret_cast<uint4*>(query_tile + swizzled_offset<kHeadDim>(head_row, chunk)) = value;
    }
  }

  // Per-warp online softmax state for rows lane_row (index 0) and lane_row + 8 (index 1), in
  // log2 units with the softmax scale folded in.
  const float scale_log2 = params.softmax_scale * kLog2e;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this lane's share; the 4 lanes of a row add up at the end
  float out_acc[kDimTiles][4];
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) out_acc[n][0] = out_acc[n][1] = out_acc[n][2] = out_acc[n][3] = 0.f;

  // Pipeline prologue: resolve kStages tiles and start loading the first kStages - 1; tile 0's
  // loads go out before the other tiles' rows are resolved, as the stream's first bytes.
  resolve_rows(0);
  __syncthreads();
  load_tile(0);
  cp_async_commit();
  for (int tile = 1; tile < kStages; ++tile) resolve_rows(tile);
  __syncthreads();
  for (int tile = 1; tile < kStages - 1; ++tile) {
    load_tile(tile);
    cp_async_commit();
  }

  const int warp_row0 = warp * 16;  // this warp's 16 tokens within a tile
  for (int tile = 0; tile < num_tiles; ++tile) {
    // Every warp is done with tile - 1: its stage and row slot can be refilled.
    __syncthreads();
    load_tile(tile + kStages - 1);
    cp_async_commit();
    resolve_rows(tile + kStages);
    cp_async_wait<kStages - 1>();
    __syncthreads();

    const T* key_stage = key_tiles + (tile % kStages) * Config::kTileElems;
    const T* value_stage = value_tiles + (tile % kStages) * Config::kTileElems;
    const int64_t* tile_key_offset = row_key_offset + (tile % Config::kInfoSlots) * kTileTokens;

    // S = Q K^T for the warp's 16 tokens: two n8 tiles, fragments c0/c1 on row lane_row,
    // c2/c3 on row lane_row + 8, columns 2 * lane_pair + {0, 1}.
    float scores[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int matrix = lane / 8;
      const int key_row = warp_row0 + (matrix / 2) * 8 + lane % 8;
#pragma unroll
      for (int k = 0; k < kKSteps; ++k) {
        uint32_t key_frag[4];
        ldmatrix_x4(shared_address(key_stage + swizzled_offset<kHeadDim>(key_row, k * 2 + matrix % 2)), key_frag);
        if constexpr (Config::kQueryInRegisters) {
          mma_16816<T>(scores[0], query_frag[k], key_frag[0], key_frag[1]);
          mma_16816<T>(scores[1], query_frag[k], key_frag[2], key_frag[3]);
        } else {
          // A operand: matrices (rows 0-7 | 8-15) x (dims k16 + 0-7 | 8-15).
          const int query_row = (matrix % 2) * 8 + lane % 8;
          ldmatrix_x4(shared_address(query_tile + swizzled_offset<kHeadDim>(query_row, k * 2 + matrix / 2)),
                      query_frag[0]);
          mma_16816<T>(scores[0], query_frag[0], key_frag[0], key_frag[1]);
          mma_16816<T>(scores[1], query_frag[0], key_frag[2], key_frag[3]);
        }
      }
    }

    // Online softmax over the tile; masked tokens get -inf.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool valid = tile_key_offset[warp_row0 + n * 8 + lane_pair * 2 + e] >= 0;
        scores[n][e] = valid ? scores[n][e] * scale_log2 : -INFINITY;
        scores[n][e + 2] = valid ? scores[n][e + 2] * scale_log2 : -INFINITY;
        tile_max[0] = fmaxf(tile_max[0], scores[n][e]);
        tile_max[1] = fmaxf(tile_max[1], scores[n][e + 2]);
      }
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = quad_max(tile_max[r]);
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // A row with no valid token yet keeps max -inf; subtracting 0 then keeps every weight 0.
      const float reference = new_max == -INFINITY ? 0.f : new_max;
      rescale[r] = fast_exp2(row_max[r] - reference);
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float weight = fast_exp2(scores[n][r * 2 + e] - reference);
          scores[n][r * 2 + e] = weight;
          sum += weight;
        }
      }
      row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      out_acc[n][0] *= rescale[0];
      out_acc[n][1] *= rescale[0];
      out_acc[n][2] *= rescale[1];
      out_acc[n][3] *= rescale[1];
    }

    // O += P V: the score accumulators are already laid out as the A operand of a k16 step.
    uint32_t weight_frag[4];
    weight_frag[0] = pack_pair<T>(scores[0][0], scores[0][1]);
    weight_frag[1] = pack_pair<T>(scores[0][2], scores[0][3]);
    weight_frag[2] = pack_pair<T>(scores[1][0], scores[1][1]);
    weight_frag[3] = pack_pair<T>(scores[1][2], scores[1][3]);
    {
      const int matrix = lane / 8;
      const int value_row = warp_row0 + (matrix % 2) * 8 + lane % 8;
#pragma unroll
      for (int n = 0; n < kDimTiles; n += 2) {
        uint32_t value_frag[4];
        ldmatrix_x4_transposed(shared_address(value_stage + swizzled_offset<kHeadDim>(value_row, n + matrix / 2)),
                               value_frag);
        mma_16816<T>(out_acc[n], weight_frag, value_frag[0], value_frag[1]);
        mma_16816<T>(out_acc[n + 1], weight_frag, value_frag[2], value_frag[3]);
      }
    }
  }

  // The warps' partial softmax states go through shared memory (the K/V ring is free once every
  // copy has landed and every warp has left the loop).
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] = quad_sum(row_sum[r]);
  }
  constexpr int kOutPitch = Config::kOutPitch;
  float* warp_out = reinterpret_cast<float*>(shared_bytes);  // [warps][16][kOutPitch]
  const bool in_cluster = params.num_splits > 1 && params.merge_in_cluster;
  // In a cluster each warp leaves its rows normalised, with their LSEs, for the cluster merge;
  // otherwise raw, with their max and sum, for the CTA's own merge of the 4 warps.
  float scale[2] = {1.f, 1.f};
  if (in_cluster) {
    float* warp_lse = warp_out + Config::kWarpOutFloats;  // [warps][16], log2 units
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool empty = row_max[r] == -INFINITY;  // else row_sum >= 1: the max's own token
      scale[r] = empty ? 0.f : __frcp_rn(row_sum[r]);
      if (lane_pair == 0) {
        warp_lse[warp * kHeadRows + lane_row + 8 * r] = empty ? -INFINITY : row_max[r] + log2f(row_sum[r]);
      }
    }
  } else if (lane_pair == 0) {
    warp_row_max[warp * kHeadRows + lane_row] = row_max[0];
    warp_row_max[warp * kHeadRows + lane_row + 8] = row_max[1];
    warp_row_sum[warp * kHeadRows + lane_row] = row_sum[0];
    warp_row_sum[warp * kHeadRows + lane_row + 8] = row_sum[1];
  }
  {
    float* base = warp_out + warp * kHeadRows * kOutPitch;
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      const int column = n * 8 + lane_pair * 2;
      *reinterpret_cast<float2*>(base + lane_row * kOutPitch + column) =
          make_float2(out_acc[n][0] * scale[0], out_acc[n][1] * scale[0]);
      *reinterpret_cast<float2*>(base + (lane_row + 8) * kOutPitch + column) =
          make_float2(out_acc[n][2] * scale[1], out_acc[n][3] * scale[1]);
    }
  }
  if (in_cluster) {
    merge_in_cluster<T, kHeadDim>(params, warp_out, warp_out + Config::kWarpOutFloats, num_rows,
                                  int64_t(batch_index) * params.heads_q + first_head);
    return;
  }
  __syncthreads();

  const bool direct = params.num_splits == 1;
  for (int index = thread; index < num_rows * kHeadDim; index += kThreads) {
    const int head_row = index / kHeadDim;
    const int column = index % kHeadDim;
    float max_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) max_all = fmaxf(max_all, warp_row_max[w * kHeadRows + head_row]);
    float total = 0.f, value = 0.f;
    if (max_all != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = fast_exp2(warp_row_max[w * kHeadRows + head_row] - max_all);
        total += warp_row_sum[w * kHeadRows + head_row] * weight;
        value += warp_out[(w * kHeadRows + head_row) * kOutPitch + column] * weight;
      }
    }
    // total > 0 whenever max_all is finite: the max's own token has weight 1.
    const bool empty = max_all == -INFINITY;
    const float normalised = empty ? 0.f : value / total;
    const float lse = empty ? -INFINITY : (max_all + log2f(total)) * kLn2;
    const int64_t head = int64_t(batch_index) * params.heads_q + first_head + head_row;
    if (direct) {
      static_cast<T*>(params.out)[head * kHeadDim + column] = from_float<T>(normalised);
      if (column == 0) params.lse[head] = lse;
    } else {
      params.partial_out[(head * params.num_splits + split) * kHeadDim + column] = normalised;
      if (column == 0) params.partial_lse[head * params.num_splits + split] = lse;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Split merge: out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s
// ------------------------------------------------------------------------------------------

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kHeadDim / 4) sparse_decode_merge_kernel(const SparseDecodeParams params) {
  __shared__ float split_lse[kMaxSplits];
  wait_for_previous_grid();  // the splits' partial results
  allow_dependent_launch();
  const int64_t head = blockIdx.x;  // flat (sequence, query head)
  const int splits = params.num_splits;
  const int column = threadIdx.x * 4;
  const float* split_out = params.partial_out + head * splits * kHeadDim + column;
  // The first splits' partial rows are loaded together with the LSEs, not once the LSEs are in:
  // one round trip to L2 on the critical path between the splits and the next layer, not two.
  // Every split wrote its rows (zeros when empty), so the loads need not wait for the LSEs.
  constexpr int kEarlySplits = 8;
  float4 early[kEarlySplits];
#pragma unroll
  for (int s = 0; s < kEarlySplits; ++s) {
    if (s < splits) early[s] = *reinterpret_cast<const float4*>(split_out + int64_t(s) * kHeadDim);
  }
  // The LSEs come in with one load per thread, the later partial rows with several loads in
  // flight, not as a chain of dependent loads over the splits (3.9 us at 32 splits, B = 1, H200).
  for (int s = threadIdx.x; s < splits; s += blockDim.x) split_lse[s] = params.partial_lse[head * splits + s];
  __syncthreads();
  float max_lse = -INFINITY;
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, split_lse[s]);
  float4 value = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
  auto accumulate = [&](int s, const float4& part) {
    const float lse = split_lse[s];
    if (lse == -INFINITY) return;  // an empty split (its rows are zeros)
    const float weight = expf(lse - max_lse);
    total += weight;
    value.x += weight * part.x;
    value.y += weight * part.y;
    value.z += weight * part.z;
    value.w += weight * part.w;
  };
  if (max_lse != -INFINITY) {
#pragma unroll
    for (int s = 0; s < kEarlySplits; ++s) {
      if (s < splits) accumulate(s, early[s]);
    }
#pragma unroll 8
    for (int s = kEarlySplits; s < splits; ++s) {
      if (split_lse[s] != -INFINITY) accumulate(s, *reinterpret_cast<const float4*>(split_out + int64_t(s) * kHeadDim));
    }
  }
  const bool empty = max_lse == -INFINITY;
  const float inverse = empty ? 0.f : 1.f / total;
  T* out = static_cast<T*>(params.out) + head * kHeadDim + column;
  out[0] = from_float<T>(value.x * inverse);
  out[1] = from_float<T>(value.y * inverse);
  out[2] = from_float<T>(value.z * inverse);
  out[3] = from_float<T>(value.w * inverse);
  if (threadIdx.x == 0) params.lse[head] = empty ? -INFINITY : max_lse + logf(total);
}

// ------------------------------------------------------------------------------------------
// Launch planning
// ------------------------------------------------------------------------------------------

int head_chunks(const SparseDecodeParams& params) {
  const int group = params.heads_q / params.heads_kv;
  return (group + kHeadRows - 1) / kHeadRows;
}

template <typename T, int kHeadDim>
bool has_clusters() {
  return compute_capability_major() >= 9 && binary_is_sm90_or_later<sparse_decode_kernel<T, kHeadDim>>();
}

template <typename T, int kHeadDim>
void prepare_kernel() {
  // Above 48 KB of dynamic shared memory a kernel must opt in (and above 8 CTAs a cluster);
  // cheap, and capture-safe (no stream work), so it runs on every launch rather than being
  // cached per device.
  C10_CUDA_CHECK(cudaFuncSetAttribute(sparse_decode_kernel<T, kHeadDim>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(DecodeConfig<kHeadDim>::kSmemBytes)));
  if (has_clusters<T, kHeadDim>()) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(sparse_decode_kernel<T, kHeadDim>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
}

// The most splits one cluster can hold (0 without clusters): kMaxClusterSplits or what the
// device can co-schedule in one GPC with this kernel's shared memory.
template <typename T, int kHeadDim>
int max_cluster_splits() {
  static const int splits = [] {
    if (!has_clusters<T, kHeadDim>()) return 0;
    prepare_kernel<T, kHeadDim>();
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(kMaxClusterSplits);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = DecodeConfig<kHeadDim>::kSmemBytes;
    int size = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxPotentialClusterSize(&size, sparse_decode_kernel<T, kHeadDim>, &config));
    return std::min(size, kMaxClusterSplits);
  }();
  return splits;
}

// How many clusters of `splits` CTAs the device runs at once (splits <= max_cluster_splits).
template <typename T, int kHeadDim>
int max_active_clusters(int splits) {
  static std::atomic<int> cached[kMaxClusterSplits + 1] = {};  // 0: not asked yet
  if (const int known = cached[splits].load(std::memory_order_relaxed); known > 0) return known;
  prepare_kernel<T, kHeadDim>();
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(splits));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = DecodeConfig<kHeadDim>::kSmemBytes;
  cudaLaunchAttribute cluster = cluster_dimension(unsigned(splits));
  config.attrs = &cluster;
  config.numAttrs = 1;
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, sparse_decode_kernel<T, kHeadDim>, &config));
  clusters = std::max(clusters, 1);
  cached[splits].store(clusters, std::memory_order_relaxed);
  return clusters;
}

// Occupancy depends on the kernel and the architecture only: computed once per instantiation.
template <typename T, int kHeadDim>
int resident_ctas_per_sm() {
  static const int ctas = [] {
    prepare_kernel<T, kHeadDim>();
    int resident = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &resident, sparse_decode_kernel<T, kHeadDim>, kThreads, DecodeConfig<kHeadDim>::kSmemBytes));
    return std::max(resident, 1);
  }();
  return ctas;
}

// Splits so that the whole grid is one wave of resident CTAs: every CTA starts at once and
// streams its share, where a second wave pays the pipeline's fill and drain again. Measured on an
// H200 at 128K tokens, 4096-token budget, Qwen3-8B shapes, B = 8: 4 splits (one wave) 52 us, 8
// splits 57 us, 16 splits 65 us; the earlier two-wave plan (9 splits) took 61 us. Again on
// 2026-12-03 (bench/decode_tune.py --batches 8, one graph replay): 1 / 2 / 3 / 4 / 6 / 8 splits
// 106 / 59 / 56 / 50 / 62 / 54 us, and 2 splits 57 us with SPOT_DECODE_CLUSTER=0 (the merge
// kernel, not a cluster; bench/results/decode_tune_b8_h200.json). Never fewer than
// kMinTokensPerSplit tokens per split nor more splits than chosen blocks.
int plan_splits(const SparseDecodeParams& params, int ctas_per_sm) {
  if (params.max_selected <= 1) return 1;
  const int64_t work_rows = int64_t(params.batch) * params.heads_kv * head_chunks(params);
  const int64_t resident_ctas = int64_t(multiprocessor_count()) * ctas_per_sm;
  int64_t splits = resident_ctas / work_rows;
  const int64_t max_tokens = int64_t(params.max_selected) * params.block_size;
  splits = std::min<int64_t>(splits, (max_tokens + kMinTokensPerSplit - 1) / kMinTokensPerSplit);
  splits = std::min<int64_t>(splits, params.max_selected);
  splits = std::min<int64_t>(splits, kMaxSplits);
  return int(std::max<int64_t>(splits, 1));
}

template <typename T, int kHeadDim>
void launch(const SparseDecodeParams& params) {
  const bool in_cluster = params.num_splits > 1 && params.merge_in_cluster;
  if (in_cluster && params.num_splits > max_cluster_splits<T, kHeadDim>()) {
    throw std::invalid_argument("spot.sparse_decode: num_splits exceeds what one cluster holds");
  }
  if (params.num_splits > 1 && !in_cluster && (params.partial_out == nullptr || params.partial_lse == nullptr)) {
    throw std::invalid_argument("spot.sparse_decode: num_splits > 1 needs the split-KV workspace");
  }
  prepare_kernel<T, kHeadDim>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const dim3 grid(params.num_splits, params.heads_kv * head_chunks(params), params.batch);
  launch_dependent_in_clusters<sparse_decode_kernel<T, kHeadDim>>(grid, dim3(kThreads),
                                                                  DecodeConfig<kHeadDim>::kSmemBytes, stream,
                                                                  in_cluster ? unsigned(params.num_splits) : 1u, params);
  if (params.num_splits > 1 && !in_cluster) {
    const unsigned heads = unsigned(int64_t(params.batch) * params.heads_q);
    launch_dependent<sparse_decode_merge_kernel<T, kHeadDim>>(dim3(heads), dim3(kHeadDim / 4), 0, stream, params);
  }
}

}  // namespace

// Tuning knobs, read on every call: SPOT_DECODE_SPLITS=N (N >= 1) fixes the split count (clamped
// to the chosen blocks and kMaxSplits like the planned count); SPOT_DECODE_CLUSTER=0 merges
// through the workspace even where a cluster could.
void plan_sparse_decode(SparseDecodeParams& params) {
  const char* forced_splits = std::getenv("SPOT_DECODE_SPLITS");
  const bool forced = forced_splits != nullptr && *forced_splits != '\0';
  if (forced) {
    const long requested = std::strtol(forced_splits, nullptr, 10);
    if (requested < 1) throw std::invalid_argument("spot.sparse_decode: SPOT_DECODE_SPLITS must be a positive integer");
    params.num_splits = int(std::max<int64_t>(1, std::min<int64_t>({requested, params.max_selected, kMaxSplits})));
  }
  const char* cluster_knob = std::getenv("SPOT_DECODE_CLUSTER");
  const bool clusters_allowed = cluster_knob == nullptr || std::string(cluster_knob) != "0";
  const int64_t rows = int64_t(params.batch) * params.heads_kv * head_chunks(params);
  SPOT_DISPATCH_HALF(params.dtype, scalar_t, SPOT_DISPATCH_HEAD_DIM(params.head_dim, kHeadDim, {
    if (!forced) params.num_splits = plan_splits(params, resident_ctas_per_sm<scalar_t, kHeadDim>());
    const int cluster_splits = clusters_allowed ? max_cluster_splits<scalar_t, kHeadDim>() : 0;
    // Few rows (B = 1: 33 splits planned) and few blocks: 16 splits merged in a cluster measured
    // 15.2 us per layer against 15.8 for 32 merged by the second kernel (H200, 128K tokens, 4096
    // budget). With more blocks each split's share grows with the cap and the cluster loses
    // (graph replays, Qwen3-8B shapes, B = 1, 16 splits against 32: 6592 tokens 21.5 / 19.5 us,
    // 13120 tokens 31.8 / 25.9, 26240 tokens 54.6 / 38.1; SmolLM2 shapes 16 against 64 splits:
    // 13120 tokens 22.0 / 17.1; bench/results/decode_splits_h200.json).
    if (!forced && cluster_splits > 1 && params.num_splits > cluster_splits &&
        int64_t(params.max_selected) * params.block_size <= cluster_splits * kMaxClusterTokensPerSplit) {
      params.num_splits = cluster_splits;
    }
    // Only where every cluster runs at once: co-scheduling clusters of 4 at B = 8 left part of
    // the grid for a second wave (68 us per layer against 43 for the merge kernel).
    params.merge_in_cluster = params.num_splits > 1 && params.num_splits <= cluster_splits &&
                              rows <= max_active_clusters<scalar_t, kHeadDim>(params.num_splits);
  }));
}

void sparse_decode_cuda(const SparseDecodeParams& params) {
  if (params.batch == 0 || params.heads_q == 0) return;
  if (params.heads_kv <= 0 || params.heads_q % params.heads_kv != 0) {
    throw std::invalid_argument("spot.sparse_decode: heads_q must be a multiple of heads_kv");
  }
  if (params.num_splits < 1 || params.num_splits > 65535) {
    throw std::invalid_argument("spot.sparse_decode: num_splits out of range");
  }
  SPOT_DISPATCH_HALF(params.dtype, scalar_t,
                     SPOT_DISPATCH_HEAD_DIM(params.head_dim, kHeadDim, launch<scalar_t, kHeadDim>(params)));
}

}  // namespace spot
