// CUDA kernels of the 4-bit selector K-cache: pack, append (pack into a slot of a cache) and
// unpack. One thread owns one scale group and runs the same encoder / decoder as the CPU kernel
// (spot/kcache_format.h), so the two agree bit for bit. The encoders compute the quotients in
// double, as reference.py does; the work per group is tiny, so the op is bound by launch and
// memory traffic, not by fp64 throughput.
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/kcache_format.h"
#include "spot/numeric.h"

namespace spot {
namespace {

constexpr int kThreadsPerBlock = 128;

bool is_aligned(const void* pointer, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

__device__ __forceinline__ float element_to_float(uint32_t bits, float*) { return bits_to_float(bits); }
__device__ __forceinline__ float element_to_float(uint32_t bits, half_t*) {
  return __half2float(__ushort_as_half(uint16_t(bits)));
}
__device__ __forceinline__ float element_to_float(uint32_t bits, bfloat16_t*) {
  return bfloat16_bits_to_float(uint16_t(bits));
}

// values[0..kCount) = src[0..kCount) as float. vector_loads: src is 16-byte aligned.
template <typename scalar_t, int kCount>
__device__ __forceinline__ void load_as_float(const scalar_t* src, float* values, bool vector_loads) {
  if (vector_loads) {
    constexpr int kPerVector = 16 / int(sizeof(scalar_t));
    constexpr int kBits = 8 * int(sizeof(scalar_t));
    static_assert(kCount % kPerVector == 0, "a group is whole 16-byte vectors");
#pragma unroll
    for (int v = 0; v < kCount / kPerVector; ++v) {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[v];
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) {
        const int bit = j * kBits;
        const uint32_t bits = kBits == 32 ? words[bit / 32] : (words[bit / 32] >> (bit % 32)) & 0xFFFFu;
        values[v * kPerVector + j] = element_to_float(bits, static_cast<scalar_t*>(nullptr));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kCount; ++i) values[i] = to_float(src[i]);
  }
}

// One thread per scale group of one key row. Append (params.slots set): row = batch * heads +
// head, stored at block slot slots[batch] of that (batch, head) cache row; slots outside
// [0, num_key_blocks) skip the row.
template <KCacheFormat Format, typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
encode_groups_kernel(const KCachePackParams params, bool vector_loads, bool vector_stores) {
  using Traits = kcache::FormatTraits<Format>;
  constexpr int kGroupSize = Traits::kGroupSize;
  const int groups_per_row = params.dim / kGroupSize;
  const int64_t group = int64_t(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (group >= params.num_rows * groups_per_row) return;
  const int64_t row = group / groups_per_row;
  const int group_in_row = int(group % groups_per_row);
  int64_t destination_row = row;
  if (params.slots != nullptr) {
    const int32_t slot = params.slots[row / params.heads];
    if (slot < 0 || slot >= params.num_key_blocks) return;
    destination_row = row * params.num_key_blocks + slot;
  }

  float values[kGroupSize];
  load_as_float<scalar_t, kGroupSize>(static_cast<const scalar_t*>(params.keys) + group * kGroupSize, values,
                                      vector_loads);
  uint32_t words[kGroupSize / 8];
  const auto scale_bits = kcache::encode_group<Format>(values, params.global_scale, words);

  const int64_t destination_group = destination_row * groups_per_row + group_in_row;
  static_cast<typename Traits::ScaleBits*>(params.scales)[destination_group] = scale_bits;
  uint8_t* codes = params.codes + destination_group * (kGroupSize / 2);
  if (vector_stores) {
    if constexpr (kGroupSize == 32) {
      *reinterpret_cast<uint4*>(codes) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
      *reinterpret_cast<uint2*>(codes) = make_uint2(words[0], words[1]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kGroupSize / 2; ++i) codes[i] = uint8_t(words[i / 4] >> (8 * (i % 4)));
  }
}

// One thread per scale group: kGroupSize / 2 code bytes and one scale -> kGroupSize floats.
template <KCacheFormat Format>
__global__ void __launch_bounds__(kThreadsPerBlock)
decode_groups_kernel(const KCachePackParams params, bool vector_io) {
  using Traits = kcache::FormatTraits<Format>;
  constexpr int kGroupSize = Traits::kGroupSize;
  const int64_t group = int64_t(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (group >= params.num_rows * (params.dim / kGroupSize)) return;
  const uint32_t scale_bits = static_cast<const typename Traits::ScaleBits*>(params.scales)[group];
  const uint8_t* codes = params.codes + group * (kGroupSize / 2);
  uint32_t words[kGroupSize / 8];
  if (vector_io) {
    if constexpr (kGroupSize == 32) {
      const uint4 raw = *reinterpret_cast<const uint4*>(codes);
      words[0] = raw.x, words[1] = raw.y, words[2] = raw.z, words[3] = raw.w;
    } else {
      const uint2 raw = *reinterpret_cast<const uint2*>(codes);
      words[0] = raw.x, words[1] = raw.y;
    }
  } else {
#pragma unroll
    for (int w = 0; w < kGroupSize / 8; ++w) {
      words[w] = uint32_t(codes[4 * w]) | (uint32_t(codes[4 * w + 1]) << 8) | (uint32_t(codes[4 * w + 2]) << 16) |
                 (uint32_t(codes[4 * w + 3]) << 24);
    }
  }
  float values[kGroupSize];
#pragma unroll
  for (int i = 0; i < kGroupSize; ++i) {
    values[i] = kcache::decode_value<Format>((words[i / 8] >> (4 * (i % 8))) & 0xFu, scale_bits, params.global_scale);
  }
  float* out = params.unpacked + group * kGroupSize;
  if (vector_io) {
#pragma unroll
    for (int v = 0; v < kGroupSize / 4; ++v) {
      reinterpret_cast<float4*>(out)[v] = make_float4(values[4 * v], values[4 * v + 1], values[4 * v + 2], values[4 * v + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kGroupSize; ++i) out[i] = values[i];
  }
}

unsigned int num_blocks_for(int64_t num_groups) {
  return unsigned(( num_groups + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

template <KCacheFormat Format, typename scalar_t>
void launch_encode(const KCachePackParams& params) {
  constexpr int kGroupSize = kcache::FormatTraits<Format>::kGroupSize;
  const int64_t num_groups = params.num_rows * (params.dim / kGroupSize);
  if (num_groups == 0) return;
  // Group starts are multiples of kGroupSize elements / kGroupSize / 2 code bytes from the base,
  // so base alignment decides whether whole-group vector accesses are legal.
  const bool vector_loads = is_aligned(params.keys, 16);
  const bool vector_stores = is_aligned(params.codes, kGroupSize / 2);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  encode_groups_kernel<Format, scalar_t>
      <<<num_blocks_for(num_groups), kThreadsPerBlock, 0, stream>>>(params, vector_loads, vector_stores);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <KCacheFormat Format>
void launch_decode(const KCachePackParams& params) {
  constexpr int kGroupSize = kcache::FormatTraits<Format>::kGroupSize;
  const int64_t num_groups = params.num_rows * (params.dim / kGroupSize);
  if (num_groups == 0) return;
  const bool vector_io = is_aligned(params.codes, kGroupSize / 2) && is_aligned(params.unpacked, 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  decode_groups_kernel<Format><<<num_blocks_for(num_groups), kThreadsPerBlock, 0, stream>>>(params, vector_io);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void pack_kcache_cuda(const KCachePackParams& params) {
  KCachePackParams pack = params;
  pack.slots = nullptr;
  SPOT_DISPATCH_KCACHE_FORMAT(pack.format, kFormat,
                              SPOT_DISPATCH_FLOAT(pack.key_dtype, scalar_t, launch_encode<kFormat, scalar_t>(pack)));
}

void append_kcache_cuda(const KCachePackParams& params) {
  SPOT_DISPATCH_KCACHE_FORMAT(params.format, kFormat,
                              SPOT_DISPATCH_FLOAT(params.key_dtype, scalar_t, launch_encode<kFormat, scalar_t>(params)));
}

void unpack_kcache_cuda(const KCachePackParams& params) {
  SPOT_DISPATCH_KCACHE_FORMAT(params.format, kFormat, launch_decode<kFormat>(params));
}

}  // namespace spot
