// CUDA launcher of spot.decode_select: one CTA (512 threads) per (sequence, KV head). The CTA
// scores its query against the cached selector keys of the sequence's complete blocks (one
// thread per key block, the fp32 fma chain of selector_score, packed keys decoded in registers
// straight from the 4-bit cache), keeps the logits and their float64 probabilities in shared
// memory, then picks the blocks by the dual top-p rule. No host syncs, no allocation: the launch
// can be captured in a CUDA graph.
//
// Selection. Decode rows are few (batch x KV heads) and wide (one logit per cached block), so a
// search that walks the row once per bit of the threshold (spot/select_row.cuh) is mostly
// barriers: it cost ~100 us at 128K tokens. Here the CTA sorts the candidates once instead
// (a stable block radix sort of their order keys, descending, index as the value: exactly the
// reference's (-probability, index) order) and finds the top-p cut with one exclusive scan of
// the masses in that order. Masses are summed as 2^-62 fixed point, so every prefix is exact and
// monotone and the cut is the first prefix reaching top_p, like the reference's running sum.
// Rows wider than the sort handles (kThreads * kMaxItems blocks) take the threshold search.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/select_row.cuh"
#include "spot/selector_keys.h"

namespace spot {

namespace {

constexpr int kWarps = 16;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxItems = 16;  // sorted selection for rows of up to 8192 key blocks
constexpr double kMassScale = 0x1p62;  // fixed-point unit of the masses: sums of <= 1 fit in 64 bits

// Key blocks scored for this sequence: the complete ones that have a cached key.
struct DecodeRow {
  int scored;
  int visible;
};

__device__ DecodeRow decode_row(const DecodeSelectParams& params, int b) {
  const int length = max(params.seq_lens[b], 0);
  const int complete = length / params.block_size;
  return {min(complete, params.num_key_blocks), complete + (length % params.block_size != 0 ? 1 : 0)};
}

// ------------------------------------------------------------------------------------------
// Scoring
// ------------------------------------------------------------------------------------------

// query . key * softmax_scale for a dense key row, one fma per element in dim order.
template <typename key_t>
__device__ float score_dense(const float* query, const key_t* key, int dim, float softmax_scale) {
  float acc = 0.f;
  for (int k = 0; k < dim; ++k) acc = __fmaf_rn(query[k], to_float(key[k]), acc);
  return acc * softmax_scale;
}

// Eight values of one code word (inside one group) into the fma chain.
template <KCacheFormat Format>
__device__ __forceinline__ float fma_word(float acc, const float* query, uint32_t word, float block_scale,
                                         float global_scale) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    acc = __fmaf_rn(query[i], packed_key_value<Format>((word >> (4 * i)) & 0xFu, block_scale, global_scale), acc);
  }
  return acc;
}

// The same for a packed row: 16-byte loads of codes (dim / 2 bytes, a multiple of 16), one scale
// per group, values as spot/selector_keys.h defines them.
template <KCacheFormat Format>
__device__ float score_packed(const float* query, const uint8_t* codes, const void* scales, int dim,
                              float global_scale, float softmax_scale) {
  constexpr int kGroup = kcache::FormatTraits<Format>::kGroupSize;
  float acc = 0.f;
  for (int first = 0; first < dim; first += 32) {  // 32 values = 16 bytes
    const uint4 words = __ldg(reinterpret_cast<const uint4*>(codes + first / 2));
    const float scale_low = kcache::decode_block_scale<Format>(packed_scale_bits<Format>(scales, first / kGroup));
    const float scale_high =
        kcache::decode_block_scale<Format>(packed_scale_bits<Format>(scales, (first + 16) / kGroup));
    acc = fma_word<Format>(acc, query + first, words.x, scale_low, global_scale);
    acc = fma_word<Format>(acc, query + first + 8, words.y, scale_low, global_scale);
    acc = fma_word<Format>(acc, query + first + 16, words.z, scale_high, global_scale);
    acc = fma_word<Format>(acc, query + first + 24, words.w, scale_high, global_scale);
  }
  return acc * softmax_scale;
}

// ------------------------------------------------------------------------------------------
// Sorted selection
// ------------------------------------------------------------------------------------------

template <int kItems>
struct SortedSelect {
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, int32_t>;
  using MassScan = cub::BlockScan<unsigned long long, kThreads>;
  using CountScan = cub::BlockScan<int, kThreads>;
  union TempStorage {
    typename Sort::TempStorage sort;
    typename MassScan::TempStorage mass_scan;
    typename CountScan::TempStorage count_scan;
  };
};

// Shared memory of the selection, carved from the kernel's dynamic shared memory.
struct SelectShared {
  const float* scores;  // [width] logits of the scored blocks
  double* prob;         // [width]
  uint8_t* chosen;      // [width]
  void* temp;           // SortedSelect<kItems>::TempStorage
  double* reduce_scratch;  // kWarps doubles
};

// Selects one row; thread t owns the blocks [t * kItems, (t + 1) * kItems) wherever a thread needs
// a contiguous share (the sort's input and the ascending compaction). Returns the count.
template <int kItems>
__device__ __noinline__ int select_row_sorted(const SelectShared shared, const DecodeRow row, const SelectKnobs knobs,
                                              int32_t* out) {
  using Select = SortedSelect<kItems>;
  auto& temp = *static_cast<typename Select::TempStorage*>(shared.temp);
  const int n = max(row.visible, 0);
  const int num_scored = min(max(row.scored, 0), n);
  // Padding past n: is_candidate() is false there and probability() reads nothing.

  // Probabilities, the forced blocks' mass, and the candidates' order keys.
  const select_device::BlockGroup<kWarps> group{shared.reduce_scratch};
  const select_device::RowSelector<select_device::BlockGroup<kWarps>> selector{
      group, select_device::RowView{shared.scores, shared.prob, num_scored, n}, knobs, n};
  selector.softmax();
  __syncthreads();  // the sort reads probabilities other threads wrote

  const int first = threadIdx.x * kItems;
  const int num_forced = forced_block_count(n, knobs.sink_blocks, knobs.local_blocks);
  const int num_candidates = n - num_forced;
  uint32_t keys[kItems];
  int32_t blocks[kItems];
  unsigned long long forced_here = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = first + i;
    const bool candidate = selector.is_candidate(j);
    if (j < n) {
      shared.chosen[j] = candidate ? 0 : 1;
      if (!candidate) forced_here += __double2ull_rn(selector.probability(j) * kMassScale);
    }
    // Non-candidates sort last with key 0; candidate keys are at least ordered(-inf) > 0 (the
    // max only guards NaN logits).
    keys[i] = candidate ? max(selector.key(j), 1u) : 0u;
    blocks[i] = j;
  }
  unsigned long long forced_mass, unused_prefix;
  typename Select::MassScan(temp.mass_scan).ExclusiveSum(forced_here, unused_prefix, forced_mass);
  __syncthreads();
  typename Select::Sort(temp.sort).SortDescending(keys, blocks);
  __syncthreads();

  // The candidate of sorted rank r is taken for top_p while forced + mass(ranks < r) < top_p:
  // the fewest whose mass reaches top_p, all of them when it is never reached.
  unsigned long long prefix[kItems];  // the masses, then in place their exclusive prefix sums
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    prefix[i] = first + i < num_candidates ? __double2ull_rn(selector.probability(blocks[i]) * kMassScale) : 0ull;
  }
  typename Select::MassScan(temp.mass_scan).ExclusiveSum(prefix, prefix);
  const unsigned long long target = static_cast<unsigned long long>(ceil(knobs.top_p * kMassScale));
  int taken_here = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) taken_here += (first + i < num_candidates && forced_mass + prefix[i] < target) ? 1 : 0;
  const int k_p = group.sum(taken_here);  // its barriers also retire the scan's storage

  const int total = min(max(num_forced + k_p, knobs.k_min), knobs.k_max);
  const int extra = min(max(total - num_forced, 0), num_candidates);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (first + i < extra) shared.chosen[blocks[i]] = 1;
  }
  __syncthreads();

  // Ascending compaction of the chosen blocks.
  int chosen_here = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) chosen_here += (first + i < n && shared.chosen[first + i]) ? 1 : 0;
  int position = 0, count = 0;
  typename Select::CountScan(temp.count_scan).ExclusiveSum(chosen_here, position, count);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = first + i;
    if (j < n && shared.chosen[j]) {
      if (position < knobs.k_max) out[position] = j;
      ++position;
    }
  }
  for (int i = count + int(threadIdx.x); i < knobs.k_max; i += kThreads) out[i] = -1;
  return count;
}

// ------------------------------------------------------------------------------------------
// Kernel
// ------------------------------------------------------------------------------------------

// Dynamic shared memory: prob [width] doubles, scores [width] floats, query [dim] floats, chosen
// [width] bytes, then the sort's storage (16-byte aligned).
struct SharedLayout {
  size_t scores, query, chosen, temp, bytes;
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline SharedLayout shared_layout(int width, int dim, size_t temp_bytes) {
  SharedLayout layout;
  layout.scores = align16(size_t(width) * sizeof(double));
  layout.query = layout.scores + align16(size_t(width) * sizeof(float));
  layout.chosen = layout.query + align16(size_t(dim) * sizeof(float));
  layout.temp = layout.chosen + align16(size_t(width));
  layout.bytes = layout.temp + temp_bytes;
  return layout;
}

// Items per thread of the sorted selection for a row width; 0: the threshold search.
inline int sorted_items(int width) {
  for (int items = 1; items <= kMaxItems; items *= 2) {
    if (width <= kThreads * items) return items;
  }
  return 0;
}

template <int kItems>
constexpr size_t sorted_temp_bytes() {
  return sizeof(typename SortedSelect<kItems>::TempStorage);
}

inline size_t temp_bytes(int items) {
  switch (items) {
    case 1: return sorted_temp_bytes<1>();
    case 2: return sorted_temp_bytes<2>();
    case 4: return sorted_temp_bytes<4>();
    case 8: return sorted_temp_bytes<8>();
    case 16: return sorted_temp_bytes<16>();
    default: return 0;
  }
}

template <typename query_t, typename key_t, KCacheFormat Format>
__global__ void __launch_bounds__(kThreads) decode_select_kernel(const DecodeSelectParams params, int items) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ double reduce_scratch[kWarps];
  const int width = params.num_key_blocks, dim = params.dim;
  const SharedLayout layout = shared_layout(width, dim, 0);
  double* prob = reinterpret_cast<double*>(shared_bytes);
  float* scores = reinterpret_cast<float*>(shared_bytes + layout.scores);
  float* query = reinterpret_cast<float*>(shared_bytes + layout.query);
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t pair = int64_t(b) * params.heads + h;
  const DecodeRow row = decode_row(params, b);

  const query_t* query_row = static_cast<const query_t*>(params.query) + pair * dim;
  for (int k = threadIdx.x; k < dim; k += kThreads) query[k] = to_float(query_row[k]);
  __syncthreads();
#pragma unroll 4
  for (int j = threadIdx.x; j < row.scored; j += kThreads) {
    const int64_t key_row = pair * width + j;
    if constexpr (Format == KCacheFormat::kDense) {
      scores[j] = score_dense(query, static_cast<const key_t*>(params.keys) + key_row * dim, dim,
                              params.softmax_scale);
    } else {
      constexpr int kGroup = kcache::FormatTraits<Format>::kGroupSize;
      const uint8_t* codes = static_cast<const uint8_t*>(params.keys) + key_row * (dim / 2);
      const uint8_t* scales = static_cast<const uint8_t*>(params.key_scales) +
                              key_row * (dim / kGroup) * packed_scale_bytes(Format);
      scores[j] = score_packed<Format>(query, codes, scales, dim, params.global_scale, params.softmax_scale);
    }
  }
  __syncthreads();

  const SelectKnobs knobs{params.top_p, params.k_min, params.k_max, params.sink_blocks, params.local_blocks};
  int32_t* out = params.indices + pair * params.k_max;
  const SelectShared shared{scores, prob, shared_bytes + layout.chosen, shared_bytes + layout.temp, reduce_scratch};
  int count;
  switch (items) {
    case 1: count = select_row_sorted<1>(shared, row, knobs, out); break;
    case 2: count = select_row_sorted<2>(shared, row, knobs, out); break;
    case 4: count = select_row_sorted<4>(shared, row, knobs, out); break;
    case 8: count = select_row_sorted<8>(shared, row, knobs, out); break;
    case 16: count = select_row_sorted<16>(shared, row, knobs, out); break;
    default: {
      const select_device::RowView view{scores, prob, row.scored, row.visible};
      const select_device::BlockGroup<kWarps> group{reduce_scratch};
      count = select_device::select_row(group, view, knobs, out);
    }
  }
  if (threadIdx.x == 0) params.counts[pair] = count;
}

template <typename query_t, typename key_t, KCacheFormat Format>
void launch(const DecodeSelectParams& params) {
  const int items = sorted_items(params.num_key_blocks);
  const size_t shared_bytes = shared_layout(params.num_key_blocks, params.dim, temp_bytes(items)).bytes;
  auto kernel = decode_select_kernel<query_t, key_t, Format>;
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  kernel<<<dim3(unsigned(params.heads), unsigned(params.batch)), dim3(kThreads), shared_bytes, stream>>>(params,
                                                                                                          items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void decode_select_cuda(const DecodeSelectParams& params) {
  if (params.batch == 0 || params.heads == 0) return;
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
