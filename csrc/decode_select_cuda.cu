// CUDA launcher of spot.decode_select: one CTA per (sequence, KV head). The CTA scores its query
// against the cached selector keys of the sequence's complete blocks (one thread per key block,
// the fp32 fma chain of selector_score, packed keys decoded in registers straight from the
// 4-bit cache), keeps the logits and their float64 probabilities in shared memory, then runs the
// dual top-p rule with the whole CTA (spot/select_row.cuh). No host syncs, no allocation: the
// launch can be captured in a CUDA graph.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/select_row.cuh"
#include "spot/selector_keys.h"

namespace spot {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

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
    const uint4 words = *reinterpret_cast<const uint4*>(codes + first / 2);
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

template <typename query_t, typename key_t, KCacheFormat Format>
__global__ void __launch_bounds__(kThreads) decode_select_kernel(const DecodeSelectParams params) {
  extern __shared__ double shared[];
  __shared__ double reduce_scratch[kWarps];
  const int width = params.num_key_blocks, dim = params.dim;
  double* prob = shared;                                   // [width]
  float* scores = reinterpret_cast<float*>(prob + width);  // [width]
  float* query = scores + width;                           // [dim]
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t pair = int64_t(b) * params.heads + h;
  const DecodeRow row = decode_row(params, b);

  const query_t* query_row = static_cast<const query_t*>(params.query) + pair * dim;
  for (int k = threadIdx.x; k < dim; k += kThreads) query[k] = to_float(query_row[k]);
  __syncthreads();
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
  const select_device::RowView view{scores, prob, row.scored, row.visible};
  const select_device::BlockGroup<kWarps> group{reduce_scratch};
  const int count = select_device::select_row(group, view, knobs, params.indices + pair * params.k_max);
  if (threadIdx.x == 0) params.counts[pair] = count;
}

template <typename query_t, typename key_t, KCacheFormat Format>
void launch(const DecodeSelectParams& params) {
  const size_t shared_bytes = size_t(params.num_key_blocks) * (sizeof(double) + sizeof(float)) +
                              size_t(params.dim) * sizeof(float);
  auto kernel = decode_select_kernel<query_t, key_t, Format>;
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  kernel<<<dim3(unsigned(params.heads), unsigned(params.batch)), dim3(kThreads), shared_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void decode_select_cuda(const DecodeSelectParams& params) {
  if (params.batch == 0 || params.heads == 0) return;
  SPOT_DISPATCH_FLOAT(params.query_dtype, query_t, {
    switch (params.format) {
      case KCacheFormat::kDense:
        SPOT_DISPATCH_FLOAT(params.key_dtype, key_t, (launch<query_t, key_t, KCacheFormat::kDense>(params)));
        break;
      case KCacheFormat::kInt4: launch<query_t, uint8_t, KCacheFormat::kInt4>(params); break;
      case KCacheFormat::kMxfp4: launch<query_t, uint8_t, KCacheFormat::kMxfp4>(params); break;
      case KCacheFormat::kNvfp4: launch<query_t, uint8_t, KCacheFormat::kNvfp4>(params); break;
    }
  });
}

}  // namespace spot
