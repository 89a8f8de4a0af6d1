// Hopper (sm_90a) kernel for spot.sparse_prefill: block-sparse FlashAttention forward with
// wgmma and TMA, warp specialised.
//
// One CTA = 384 threads handles one (sequence, KV head, query block, row tile):
//   warpgroup 0, warp 0: producer. Loads the query tiles once, then walks the query block's
//     attended key blocks (the kept entries of its list, then the diagonal) and streams their
//     K and V tiles through shared memory with TMA, 128 keys per stage (one 128-token block or
//     two 64-token blocks), on two mbarrier pipelines (K and V separately, so a K stage frees
//     as soon as QK^T has read it).
//   warpgroups 1 and 2: consumers. Each owns 64 query rows of one query head: S = Q K^T
//     (wgmma, both operands in shared memory), online softmax in registers, O += P V (wgmma,
//     P from registers), then O / sum and the log-sum-exp written straight to global memory.
//     S of stage n is issued with P V of stage n-1 (softmax overlaps the tensor cores), and
//     the two warpgroups take turns issuing (one's softmax overlaps the other's GEMMs).
// Row tiles: with 128-token blocks a tile is one query head of the group (warpgroup w takes
// tokens [64w, 64w + 64) of the block); with 64-token blocks a tile is two query heads of the
// group (warpgroup w takes head 2 * tile + w, idle when the group has an odd head count).
// All query heads of a KV group read the same key blocks, so a key block is loaded once per
// tile and used by both warpgroups.
//
// Varlen addressing: one TMA descriptor per tensor over the whole packed [total_tokens, heads,
// head_dim] tensor; a tile at token row `seq_start + i` is a coordinate, not a new descriptor.
// Rows past the sequence's end are loaded (they belong to the next sequence, or are zero-filled
// by TMA past total_tokens) but never written out, and inside the diagonal block the causal
// mask hides every key past a valid query row, so they never reach a valid row's softmax.
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "launchers.h"
#include "spot/cuda/mma_sm80.cuh"
#include "spot/dispatch.h"
#include "spot/numeric.h"
#include "spot/params.h"

namespace spot {

namespace sm90_prefill {

using namespace cute;
// Only these of the mma.sync helpers: cute has its own cp_async_* names.
using ::spot::ptx::fast_exp2;
using ::spot::ptx::quad_max;
using ::spot::ptx::quad_sum;

constexpr int kThreads = 384;               // producer warpgroup + two consumer warpgroups
constexpr int kConsumerThreads = 256;
constexpr int kRowsPerWarpgroup = 64;       // one wgmma M tile
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;     // 40 * 128 + 232 * 256 <= 64K registers

template <typename Element_, int kHeadDim_, int kBlockSize_>
struct KernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockSize = kBlockSize_;  // query and key block, tokens
  static_assert(kBlockSize == 64 || kBlockSize == 128, "block size must be 64 or 128");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim must be 64 or 128");
  // Warpgroups that share one query head (1 for 64-token blocks, 2 for 128-token blocks), and
  // query heads per CTA tile.
  static constexpr int kWarpgroupsPerHead = kBlockSize / kRowsPerWarpgroup;
  static constexpr int kHeadsPerTile = 2 / kWarpgroupsPerHead;
  // Keys per pipeline stage and per S = Q K^T wgmma: two 64-token key blocks share a stage, so
  // the wgmma is 64 x 128 for either block size (a 64-wide one is bound by shared-memory reads
  // of its operands, and each stage costs barrier round trips and a softmax pass).
  static constexpr int kKeysPerStage = 128;
  static constexpr int kBlocksPerStage = kKeysPerStage / kBlockSize;
  static_assert(kBlocksPerStage == 1 || kBlocksPerStage == 2, "the producer fills at most two slots");
  // Two stages when a K stage is 32 KB (so Q + K + V fit in 160 KB), four otherwise.
  static constexpr int kStages = kKeysPerStage * kHeadDim * int(sizeof(Element)) >= 32768 ? 2 : 4;

  using TileQ = Shape<Int<kRowsPerWarpgroup>, Int<kHeadDim>>;
  using TileKVBlock = Shape<Int<kBlockSize>, Int<kHeadDim>>;  // one key block, one TMA load

  // 128-byte swizzled, head dim contiguous (K-major for both GEMMs' Q and K operands).
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ =  // (row, dim, warpgroup)
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRowsPerWarpgroup>, Int<kHeadDim>, _2>{}));
  using SmemLayoutKV =  // (key, dim, stage)
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeysPerStage>, Int<kHeadDim>, Int<kStages>>{}));
  // One key block's slice of a stage, as a TMA box sees it: 64 x 64 boxes, each 8 KB contiguous.
  using SmemLayoutKVBlock = decltype(tile_to_shape(SmemAtom{}, TileKVBlock{}));
  // V read as the B operand of O = P V: (dim, key, stage), dim contiguous (MN-major).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kKeysPerStage>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Per-warpgroup MMAs (128 threads each): S[64, 128] = Q K^T and O[64, dim] += P V.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kRowsPerWarpgroup>, Int<kKeysPerStage>, Int<kHeadDim>>>(),
      Layout<Shape<_1, _1, _1>>{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float,
                           Shape<Int<kRowsPerWarpgroup>, Int<kHeadDim>, Int<kKeysPerStage>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  // Global tensors as TMA sees them: (token, dim, head) over the packed varlen rows.
  using GmemShape = Shape<int32_t, Int<kHeadDim>, int32_t>;
  using GmemStride = Stride<int64_t, _1, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{},
                                      take<0, 2>(SmemLayoutQ{}), TileQ{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{},
                                       SmemLayoutKVBlock{}, TileKVBlock{}, _1{}));

  static constexpr uint32_t kQTileBytes = kRowsPerWarpgroup * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVStageBytes = kKeysPerStage * kHeadDim * sizeof(Element);

  struct SharedStorage {
    // 1024-byte alignment: the 128-byte swizzle pattern repeats every 8 rows of 128 bytes,
    // and TMA and wgmma both assume each tile starts on a pattern boundary.
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    alignas(16) cutlass::arch::ClusterTransactionBarrier::ValueType barrier_q;
    alignas(16) typename Pipeline::SharedStorage pipeline_k;
    alignas(16) typename Pipeline::SharedStorage pipeline_v;
  };
  // Dynamic shared memory is only guaranteed 16-byte aligned: room to round up to 1024.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
};

template <typename Traits>
struct KernelParams {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  typename Traits::GmemShape shape_q;
  typename Traits::GmemShape shape_kv;
  typename Traits::Element* out;
  float* lse;
  const int32_t* cu_seqlens;
  const int32_t* block_indices;
  const int32_t* block_counts;
  int batch, total_tokens, heads_q, heads_kv, group, tiles_per_query_block;
  int num_query_blocks, max_selected;
  float scale_log2;  // softmax_scale * log2(e): the softmax runs in base 2
};

// Walks the key blocks query block `query_block` attends before its diagonal, in list order:
// the entries of `list[0, count)` inside [0, query_block), each value once (the list is a set).
// Warp-collective (all 32 lanes, same arguments); visit(block) runs on every lane.
// Ascending lists (what select_blocks writes) cost one load per 32 entries; an entry not above
// every kept entry of earlier chunks (an unsorted list) is checked against those chunks.
template <typename Visit>
__device__ __forceinline__ void for_each_listed_block(const int32_t* list, int count, int query_block,
                                                      Visit&& visit) {
  const int lane = int(threadIdx.x % 32);
  int largest_kept = -1;
  for (int base = 0; base < count; base += 32) {
    const int index = base + lane;
    const int block = index < count ? __ldg(list + index) : -1;
    bool keep = block >= 0 && block < query_block;
    // First of equal values within this chunk.
    const unsigned equal_lanes = __match_any_sync(0xffffffffu, block);
    keep = keep && (__ffs(equal_lanes) - 1 == lane);
    if (keep && block <= largest_kept) {
      for (int earlier = 0; earlier < base; ++earlier) {
        if (__ldg(list + earlier) == block) {
          keep = false;
          break;
        }
      }
    }
    unsigned kept = __ballot_sync(0xffffffffu, keep);
    largest_kept = max(largest_kept, __reduce_max_sync(0xffffffffu, keep ? block : -1));
    while (kept != 0u) {
      const int source = __ffs(kept) - 1;
      kept &= kept - 1u;
      visit(__shfl_sync(0xffffffffu, block, source));
    }
  }
}

// Accumulator (row, column) view of an SM90 wgmma C fragment ((2, 2, N/8), M, N) ->
// ((2, M), (2, N/8, N)): each thread owns two rows (lane / 4 and lane / 4 + 8 of its warp).
template <typename Layout>
__device__ __forceinline__ auto accumulator_rows_cols(Layout layout) {
  return make_layout(make_layout(get<0, 1>(layout), get<1>(layout)),
                     make_layout(get<0, 0>(layout), get<0, 2>(layout), get<2>(layout)));
}

// The S accumulator ((2, 2, block/8), 1, 1) re-read as the A operand of the P V wgmma
// ((2, 2, 2), 1, block/16): the k16 A fragment of a thread is exactly its 16 columns of S.
template <typename Layout>
__device__ __forceinline__ auto accumulator_as_operand_a(Layout layout) {
  auto column_pairs = logical_divide(get<0, 2>(layout), Tile<_2>{});  // ((2, block/16))
  return make_layout(make_layout(get<0, 0>(layout), get<0, 1>(layout), get<0, 0>(column_pairs)),
                     get<1>(layout), coalesce(make_layout(get<2>(layout), get<0, 1>(column_pairs))));
}

// Owning 16-bit copy of an fp32 register fragment, same layout.
template <typename To, typename Engine, typename Layout>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, Layout> const& tensor) {
  using From = typename Engine::value_type;
  constexpr int kSize = decltype(size(tensor))::value;
  Tensor converted = make_tensor<To>(tensor.layout());
  cutlass::NumericArrayConverter<To, From, kSize> convert;
  *reinterpret_cast<cutlass::Array<To, kSize>*>(converted.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, kSize> const*>(tensor.data()));
  return converted;
}

// Issues one warpgroup-wide wgmma batch over the whole K extent of the operands and commits it.
// The caller waits (warpgroup_wait<N>) and then fences the accumulator before reading it;
// until then neither the accumulator nor a register A operand may be touched.
template <bool kZeroInit, typename TiledMma, typename TensorA, typename TensorB, typename TensorC>
__device__ __forceinline__ void warpgroup_gemm_issue(TiledMma& tiled_mma, TensorA const& a, TensorB const& b,
                                                     TensorC& c) {
  constexpr bool kAInRegisters =
      !cute::is_base_of<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kAInRegisters) warpgroup_fence_operand(const_cast<TensorA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(tiled_mma, a(_, _, k), b(_, _, k), c);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// Scales a stage of logits into the base-2 domain, masks it when kMask (the last stage: column c is
// visible to a warpgroup row r when c <= r + diagonal_column), and folds it into the running softmax:
// scores become unnormalised probabilities, row_max / row_sum are updated, and rescale[r] is
// what the output rows must be multiplied by. A row's max is finite from its first stage on:
// every stage holds at least one key it sees (slot 0 is a listed block, all visible, or the
// diagonal, whose key 0 is), so no exp2(-inf - -inf).
template <bool kMask, int kRows, int kCols, typename Scores, typename Coords>
__device__ __forceinline__ void online_softmax(Scores& scores, Coords const& coords, float scale_log2,
                                               int diagonal_column, float (&row_max)[kRows],
                                               float (&row_sum)[kRows], float (&rescale)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    // Scale first, then mask: any finite scale (zero or negative too) keeps masked logits -inf.
    const int limit = diagonal_column + int(get<0>(coords(r, 0)));
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float logit = scores(r, c) * scale_log2;
      scores(r, c) = (kMask && int(get<1>(coords(r, c))) > limit) ? -INFINITY : logit;
    }
    float block_max = scores(r, 0);
    CUTE_UNROLL
    for (int c = 1; c < kCols; ++c) block_max = fmaxf(block_max, scores(r, c));
    // The four threads of a quad hold one row's columns.
    block_max = quad_max(block_max);
    const float new_max = fmaxf(row_max[r], block_max);
    rescale[r] = fast_exp2(row_max[r] - new_max);  // 0 on the first stage (old max -inf)
    row_max[r] = new_max;
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float p = fast_exp2(scores(r, c) - new_max);
      scores(r, c) = p;
      sum += p;
    }
    row_sum[r] = row_sum[r] * rescale[r] + sum;
  }
}

// Turn-taking between the two consumer warpgroups ("ping-pong"): a warpgroup issues a stage's
// wgmmas only after the other has issued its own, so one warpgroup's softmax runs while the
// other's GEMMs occupy the tensor cores. Named barrier kTurnBarrier + w is warpgroup w's turn:
// its 128 threads wait (bar.sync) and the other warpgroup's 128 arrive (bar.arrive). IDs start
// past those CUTLASS reserves.
constexpr int kTurnBarrier = 8;

__device__ __forceinline__ void wait_turn(int consumer) {
  asm volatile("bar.sync %0, %1;" ::"r"(kTurnBarrier + consumer), "n"(kConsumerThreads) : "memory");
}

__device__ __forceinline__ void pass_turn(int consumer) {
  asm volatile("bar.arrive %0, %1;" ::"r"(kTurnBarrier + 1 - consumer), "n"(kConsumerThreads) : "memory");
}

template <typename Traits>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_prefill_sm90_kernel(CUTE_GRID_CONSTANT KernelParams<Traits> const params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockSize = Traits::kBlockSize;

  // Work item. Query blocks run in the slowest grid dimension, last (most key blocks) first,
  // so the long causal rows start early and short ones fill the tail.
  const int query_block = int(gridDim.y) - 1 - int(blockIdx.y);
  const int tile = int(blockIdx.x) % params.tiles_per_query_block;
  const int kv_head = (int(blockIdx.x) / params.tiles_per_query_block) % params.heads_kv;
  const int sequence = int(blockIdx.x) / (params.tiles_per_query_block * params.heads_kv);
  // Bounds are trusted on CUDA (no device sync to check them), only clamped into the tensor.
  const int seq_start = min(max(params.cu_seqlens[sequence], 0), params.total_tokens);
  const int seq_end = min(max(params.cu_seqlens[sequence + 1], seq_start), params.total_tokens);
  const int length = seq_end - seq_start;
  const int block_row = query_block * kBlockSize;  // first token of the query block
  if (block_row >= length) return;  // whole CTA, before any barrier exists

  const int64_t list_index =
      (int64_t(sequence) * params.heads_kv + kv_head) * params.num_query_blocks + query_block;
  const int32_t* list = params.block_indices + list_index * params.max_selected;
  const int count = min(max(params.block_counts[list_index], 0), params.max_selected);

  // Each consumer warpgroup's query head and first token (within the query block).
  auto warpgroup_head_in_group = [&](int consumer) {
    return tile * Traits::kHeadsPerTile + consumer / Traits::kWarpgroupsPerHead;
  };
  auto warpgroup_row = [&](int consumer) {
    return (consumer % Traits::kWarpgroupsPerHead) * kRowsPerWarpgroup;
  };
  auto warpgroup_active = [&](int consumer) {
    return warpgroup_head_in_group(consumer) < params.group &&
           block_row + warpgroup_row(consumer) < length;
  };

  extern __shared__ char smem_raw[];
  SharedStorage& storage = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int warp_group = int(threadIdx.x) / 128;
  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kKVStageBytes;
  pipeline_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer
                                         : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = kConsumerThreads;
  // Constructors initialise the barriers from warp 0.
  Pipeline pipeline_k(storage.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(storage.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&storage.barrier_q, 1);
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});

  if (warp_group == 0) {
    // ------------------------------------------------------------------ producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (warp != 0) return;
    const bool leader = lane == 0;

    Tensor mQ = params.tma_q.get_tma_tensor(params.shape_q);    // (token, dim, head_q)
    Tensor mK = params.tma_k.get_tma_tensor(params.shape_kv);   // (token, dim, head_kv)
    Tensor mV = params.tma_v.get_tma_tensor(params.shape_kv);
    if (leader) {
      cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
      uint32_t q_bytes = 0;
      for (int consumer = 0; consumer < 2; ++consumer) {
        if (warpgroup_active(consumer)) q_bytes += Traits::kQTileBytes;
      }
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&storage.barrier_q, q_bytes);
      for (int consumer = 0; consumer < 2; ++consumer) {
        if (!warpgroup_active(consumer)) continue;
        const int head = kv_head * params.group + warpgroup_head_in_group(consumer);
        Tensor gQ = local_tile(
            domain_offset(make_coord(seq_start + block_row + warpgroup_row(consumer), _0{}), mQ(_, _, head)),
            typename Traits::TileQ{}, make_coord(_0{}, _0{}));  // (64, dim)
        auto [tQgQ, tQsQ] = tma_partition(params.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ(_, _, consumer)),
                                          group_modes<0, 2>(gQ));
        copy(params.tma_q.with(storage.barrier_q, 0), tQgQ, tQsQ);
      }
    }

    // (block, dim, key_block) over this sequence's rows of this KV head.
    Tensor gK = local_tile(domain_offset(make_coord(seq_start, _0{}), mK(_, _, kv_head)),
                           typename Traits::TileKVBlock{}, make_coord(_, _0{}));
    Tensor gV = local_tile(domain_offset(make_coord(seq_start, _0{}), mV(_, _, kv_head)),
                           typename Traits::TileKVBlock{}, make_coord(_, _0{}));
    // (block, dim, slot, 1, stage): the key-block slots of each stage.
    Tensor sK_slots = flat_divide(sK, typename Traits::TileKVBlock{});
    Tensor sV_slots = flat_divide(sV, typename Traits::TileKVBlock{});
    auto [tKgK, tKsK] = tma_partition(params.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK_slots),
                                      group_modes<0, 2>(gK));  // (TMA, key_block), (TMA, slot, 1, stage)
    auto [tVgV, tVsV] = tma_partition(params.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV_slots),
                                      group_modes<0, 2>(gV));
    PipelineState write_state = cutlass::make_producer_start_state<Pipeline>();
    // Stages hold kBlocksPerStage key blocks. A last stage with a free slot repeats its block
    // there (the consumers mask it out), so every stage carries the same transaction bytes.
    auto load_stage = [&](int first_block, int second_block) {
      if (leader) {
        pipeline_k.producer_acquire(write_state);
        CUTE_UNROLL
        for (int slot = 0; slot < Traits::kBlocksPerStage; ++slot) {
          copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write_state), 0),
               tKgK(_, slot == 0 ? first_block : second_block), tKsK(_, slot, 0, write_state.index()));
        }
        pipeline_v.producer_acquire(write_state);
        CUTE_UNROLL
        for (int slot = 0; slot < Traits::kBlocksPerStage; ++slot) {
          copy(params.tma_v.with(*pipeline_v.producer_get_barrier(write_state), 0),
               tVgV(_, slot == 0 ? first_block : second_block), tVsV(_, slot, 0, write_state.index()));
        }
      }
      ++write_state;
    };
    int pending_block = -1;  // first block of a half-filled stage (64-token blocks)
    auto add_key_block = [&](int key_block) {
      if constexpr (Traits::kBlocksPerStage == 1) {
        load_stage(key_block, key_block);
      } else if (pending_block < 0) {
        pending_block = key_block;
      } else {
        load_stage(pending_block, key_block);
        pending_block = -1;
      }
    };
    for_each_listed_block(list, count, query_block, add_key_block);
    add_key_block(query_block);
    if (pending_block >= 0) load_stage(pending_block, pending_block);
    return;
  }

  // -------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
  const int consumer = warp_group - 1;
  const int thread_in_warpgroup = int(threadIdx.x) % 128;

  // Every consumer warp walks the same list to learn the trip count. The diagonal block comes
  // last, in slot diagonal_slot of the last stage; slots after it repeat it and are masked.
  int num_key_blocks = 1;
  for_each_listed_block(list, count, query_block, [&](int) { ++num_key_blocks; });
  const int num_stages = (num_key_blocks + Traits::kBlocksPerStage - 1) / Traits::kBlocksPerStage;
  const int diagonal_slot = (num_key_blocks - 1) % Traits::kBlocksPerStage;

  // Each warpgroup takes num_stages + 1 turns (first S, then S + P V per stage, then the last
  // P V). Warpgroup 0 goes first; warpgroup 1 skips its last pass, so every barrier phase
  // completes with exactly 128 waiting and 128 arriving threads.
  if (consumer == 1) pass_turn(consumer);
  const auto end_turn = [&](bool last_turn) {
    if (!(last_turn && consumer == 1)) pass_turn(consumer);
  };

  PipelineState read_state;
  if (!warpgroup_active(consumer)) {
    // Still take every turn and release every stage: the turn barriers and the pipelines'
    // empty barriers count both warpgroups.
    for (int step = 0; step <= num_stages; ++step) {
      wait_turn(consumer);
      end_turn(step == num_stages);
      if (step < num_stages) {
        pipeline_k.consumer_wait(read_state);
        pipeline_k.consumer_release(read_state);
        pipeline_v.consumer_wait(read_state);
        pipeline_v.consumer_release(read_state);
        ++read_state;
      }
    }
    return;
  }

  typename Traits::TiledMmaS tiled_mma_s;
  typename Traits::TiledMmaO tiled_mma_o;
  auto thread_mma_s = tiled_mma_s.get_thread_slice(thread_in_warpgroup);
  auto thread_mma_o = tiled_mma_o.get_thread_slice(thread_in_warpgroup);

  Tensor tSrQ = thread_mma_s.partition_fragment_A(sQ(_, _, consumer));  // descriptors
  Tensor tSrK = thread_mma_s.partition_fragment_B(sK);                  // (MMA, N, K, stage)
  Tensor tOrV = thread_mma_o.partition_fragment_B(sVt);                 // (MMA, N, K, stage)
  Tensor tSrS = partition_fragment_C(tiled_mma_s, Shape<Int<kRowsPerWarpgroup>, Int<Traits::kKeysPerStage>>{});
  Tensor tOrO = partition_fragment_C(tiled_mma_o, Shape<Int<kRowsPerWarpgroup>, Int<kHeadDim>>{});
  clear(tOrO);

  // (row, column) views; the identity tensors give each element's coordinates in its tile.
  Tensor scores = make_tensor(tSrS.data(), accumulator_rows_cols(tSrS.layout()));
  Tensor tScS =
      thread_mma_s.partition_C(make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<Traits::kKeysPerStage>>{}));
  Tensor score_coords = make_tensor(tScS.data(), accumulator_rows_cols(tScS.layout()));
  Tensor output = make_tensor(tOrO.data(), accumulator_rows_cols(tOrO.layout()));
  Tensor tOcO = thread_mma_o.partition_C(make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<kHeadDim>>{}));
  Tensor output_coords = make_tensor(tOcO.data(), accumulator_rows_cols(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(scores))::value;  // 2
  constexpr int kScoreCols = decltype(size<1>(scores))::value;
  constexpr int kOutputCols = decltype(size<1>(output))::value;

  float row_max[kRows];   // running max of scaled logits (base-2 domain)
  float row_sum[kRows];   // this thread's share of the running sum; quad-reduced at the end
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const float scale_log2 = params.scale_log2;
  const int row_offset = warpgroup_row(consumer);  // of this warpgroup's rows in the query block
  // Last stage: key column c of the stage is visible to query row r (of the query block) when
  // c <= r + diagonal_column, which is causal inside the diagonal's slot, all of the slots
  // before it, and none of the repeats after it.
  const int diagonal_column = row_offset + diagonal_slot * kBlockSize;

  cutlass::arch::ClusterTransactionBarrier::wait(&storage.barrier_q, 0);

  // Software pipeline inside the warpgroup: while the softmax of key block n runs on the CUDA
  // cores, the tensor cores compute P(n-1) V(n-1); S(n) = Q K(n) is issued just before.
  float rescale[kRows];
  pipeline_k.consumer_wait(read_state);
  wait_turn(consumer);
  warpgroup_gemm_issue</*kZeroInit=*/true>(tiled_mma_s, tSrQ, tSrK(_, _, _, read_state.index()), tSrS);
  end_turn(false);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
  pipeline_k.consumer_release(read_state);
  if (num_stages == 1) {
    online_softmax<true, kRows, kScoreCols>(scores, score_coords, scale_log2, diagonal_column, row_max, row_sum,
                                            rescale);
  } else {
    online_softmax<false, kRows, kScoreCols>(scores, score_coords, scale_log2, diagonal_column, row_max, row_sum,
                                             rescale);
  }
  Tensor probabilities = convert_fragment<Element>(tSrS);
  Tensor tOrP = make_tensor(probabilities.data(), accumulator_as_operand_a(tSrS.layout()));
  PipelineState value_state = read_state;  // V stage of the block whose P is in registers
  ++read_state;

  for (int step = 1; step < num_stages; ++step) {
    pipeline_k.consumer_wait(read_state);
    pipeline_v.consumer_wait(value_state);
    wait_turn(consumer);
    warpgroup_gemm_issue</*kZeroInit=*/true>(tiled_mma_s, tSrQ, tSrK(_, _, _, read_state.index()), tSrS);
    warpgroup_gemm_issue</*kZeroInit=*/false>(tiled_mma_o, tOrP, tOrV(_, _, _, value_state.index()), tOrO);
    end_turn(false);
    warpgroup_wait<1>();  // S(n) done; P(n-1) V(n-1) may still run
    warpgroup_fence_operand(tSrS);
    pipeline_k.consumer_release(read_state);
    if (step == num_stages - 1) {
      online_softmax<true, kRows, kScoreCols>(scores, score_coords, scale_log2, diagonal_column, row_max, row_sum,
                                              rescale);
    } else {
      online_softmax<false, kRows, kScoreCols>(scores, score_coords, scale_log2, diagonal_column, row_max, row_sum,
                                               rescale);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    // Pins P's registers until here, so the conversion below cannot be hoisted above the wait
    // while the wgmma still reads them.
    warpgroup_fence_operand(tOrP);
    pipeline_v.consumer_release(value_state);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < kOutputCols; ++c) output(r, c) *= rescale[r];
    }
    // P(n) replaces P(n-1) only now that the P V wgmma reading it has finished.
    probabilities = convert_fragment<Element>(tSrS);
    value_state = read_state;
    ++read_state;
  }
  pipeline_v.consumer_wait(value_state);
  wait_turn(consumer);
  warpgroup_gemm_issue</*kZeroInit=*/false>(tiled_mma_o, tOrP, tOrV(_, _, _, value_state.index()), tOrO);
  end_turn(true);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);
  pipeline_v.consumer_release(value_state);

  // Epilogue: normalise, write rows inside the sequence. Every valid row saw its own token, so
  // its sum is positive and its lse finite.
  const int head = kv_head * params.group + warpgroup_head_in_group(consumer);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const int row_in_warpgroup = int(get<0>(output_coords(r, 0)));
    const int token_in_sequence = block_row + row_offset + row_in_warpgroup;
    if (token_in_sequence >= length) continue;
    const int64_t row_index = int64_t(seq_start + token_in_sequence) * params.heads_q + head;
    const float inverse_sum = 1.f / sum;
    Element* out_row = params.out + row_index * kHeadDim;
    // Columns come in adjacent pairs (c, c + 1), c even: one 4-byte store each.
    CUTE_UNROLL
    for (int c = 0; c < kOutputCols; c += 2) {
      const Element first = Element(output(r, c) * inverse_sum);
      const Element second = Element(output(r, c + 1) * inverse_sum);
      const int column = int(get<1>(output_coords(r, c)));
      *reinterpret_cast<uint32_t*>(out_row + column) = uint32_t(first.raw()) | (uint32_t(second.raw()) << 16);
    }
    if (lane % 4 == 0) {
      params.lse[row_index] = (row_max[r] + __log2f(sum)) * 0.6931471805599453f;
    }
  }
#endif
}

template <typename Element, int kHeadDim, int kBlockSize>
void launch(const SparsePrefillParams& params) {
  using Traits = KernelTraits<Element, kHeadDim, kBlockSize>;
  using GmemTensor = typename Traits::GmemTensor;

  const auto make_gmem = [&](const void* pointer, int heads) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(pointer)),
                       typename Traits::GmemShape{params.total_tokens, Int<kHeadDim>{}, heads},
                       typename Traits::GmemStride{int64_t(heads) * kHeadDim, _1{}, int64_t(kHeadDim)});
  };
  const GmemTensor query = make_gmem(params.query, params.heads_q);
  const GmemTensor key = make_gmem(params.key, params.heads_kv);
  const GmemTensor value = make_gmem(params.value, params.heads_kv);

  const int group = params.heads_q / params.heads_kv;
  const int tiles_per_query_block = (group + Traits::kHeadsPerTile - 1) / Traits::kHeadsPerTile;
  KernelParams<Traits> kernel_params{
      make_tma_copy(SM90_TMA_LOAD{}, query, take<0, 2>(typename Traits::SmemLayoutQ{}),
                    typename Traits::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, key, typename Traits::SmemLayoutKVBlock{}, typename Traits::TileKVBlock{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, value, typename Traits::SmemLayoutKVBlock{}, typename Traits::TileKVBlock{}, _1{}),
      query.shape(),
      key.shape(),
      static_cast<Element*>(params.out),
      params.lse,
      params.cu_seqlens,
      params.block_indices,
      params.block_counts,
      params.batch,
      params.total_tokens,
      params.heads_q,
      params.heads_kv,
      group,
      tiles_per_query_block,
      params.num_query_blocks,
      params.max_selected,
      params.softmax_scale * 1.4426950408889634f,
  };

  auto* kernel = &sparse_prefill_sm90_kernel<Traits>;
  // The shared-memory opt-in is per device; set it once per device and instantiation (a bit per
  // device, so graph capture after the first call makes no attribute calls).
  static std::atomic<uint64_t> configured_devices{0};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t device_bit = device < 64 ? uint64_t(1) << device : 0;
  if (device_bit == 0 || (configured_devices.load(std::memory_order_acquire) & device_bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Traits::kSmemBytes));
    configured_devices.fetch_or(device_bit, std::memory_order_release);
  }
  const dim3 grid(unsigned(params.batch) * unsigned(params.heads_kv) * unsigned(tiles_per_query_block),
                  unsigned(params.num_query_blocks));
  kernel<<<grid, kThreads, Traits::kSmemBytes, c10::cuda::getCurrentCUDAStream().stream()>>>(kernel_params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element>
void dispatch_shape(const SparsePrefillParams& params) {
  SPOT_DISPATCH_HEAD_DIM(params.head_dim, kHeadDim, {
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
      if (params.block_size == 64) {
        launch<Element, kHeadDim, 64>(params);
      } else {
        launch<Element, kHeadDim, 128>(params);
      }
    } else {
      throw std::invalid_argument("spot.sparse_prefill (sm90): head_dim must be 64 or 128");
    }
  });
}

bool is_aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// Whether `device` is an sm_90 one and this binary holds sm_90a code for the kernel (a build for
// other targets runs the portable kernel instead).
bool device_and_binary_are_sm90(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes,
                            &sparse_prefill_sm90_kernel<KernelTraits<cutlass::bfloat16_t, 64, 64>>) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion == 90;
}

}  // namespace sm90_prefill

bool sparse_prefill_sm90_supported(const SparsePrefillParams& params) {
  if (params.dtype != DType::kBFloat16 && params.dtype != DType::kFloat16) return false;
  if (params.head_dim != 64 && params.head_dim != 128) return false;
  if (params.block_size != 64 && params.block_size != 128) return false;
  if (params.heads_kv <= 0 || params.heads_q % params.heads_kv != 0) return false;
  if (params.batch <= 0 || params.total_tokens <= 0) return false;
  // Query blocks ride grid dimension y.
  if (params.num_query_blocks <= 0 || params.num_query_blocks > 65535) return false;
  const int group = params.heads_q / params.heads_kv;
  const int64_t tiles = params.block_size == 128 ? group : (group + 1) / 2;
  if (int64_t(params.batch) * params.heads_kv * tiles > int64_t(INT32_MAX)) return false;
  // TMA needs 16-byte aligned global addresses; the 4-byte output stores need at least that.
  if (!sm90_prefill::is_aligned16(params.query) || !sm90_prefill::is_aligned16(params.key) ||
      !sm90_prefill::is_aligned16(params.value) || !sm90_prefill::is_aligned16(params.out)) {
    return false;
  }
  // Answers cached per device: 0 unknown, 1 no, 2 yes (benign race: every writer agrees).
  static std::atomic<int8_t> device_is_sm90[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (device < 0 || device >= 64) return sm90_prefill::device_and_binary_are_sm90(device);
  int8_t known = device_is_sm90[device].load(std::memory_order_relaxed);
  if (known == 0) {
    known = sm90_prefill::device_and_binary_are_sm90(device) ? 2 : 1;
    device_is_sm90[device].store(known, std::memory_order_relaxed);
  }
  return known == 2;
}

void sparse_prefill_sm90_cuda(const SparsePrefillParams& params) {
  if (!sparse_prefill_sm90_supported(params)) {
    throw std::invalid_argument(
        "spot.sparse_prefill: the sm90 kernel does not support these inputs (needs an sm_90 device, "
        "float16/bfloat16, head_dim 64 or 128, block_size 64 or 128, 16-byte aligned tensors)");
  }
  SPOT_DISPATCH_HALF(params.dtype, scalar_t, {
    if constexpr (std::is_same_v<scalar_t, ::spot::half_t>) {
      sm90_prefill::dispatch_shape<cutlass::half_t>(params);
    } else {
      sm90_prefill::dispatch_shape<cutlass::bfloat16_t>(params);
    }
  });
}

}  // namespace spot
