// CPU kernels of the 4-bit selector K-cache: pack, unpack and append, one scale group at a time
// through the shared encoders in spot/kcache_format.h, so CPU and CUDA agree bit for bit.
#include <cstdint>

#include <ATen/Parallel.h>

#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/kcache_format.h"
#include "spot/numeric.h"

namespace spot {
namespace {

// Groups per parallel task: a group is ~100 ns of work.
constexpr int64_t kGrainGroups = 2048;

// Quantises key row `row` into packed row `destination_row` (codes [rows, dim / 2], scales
// [rows, dim / group]).
template <KCacheFormat Format, typename scalar_t>
void encode_row(const KCachePackParams& params, int64_t row, int64_t destination_row) {
  using Traits = kcache::FormatTraits<Format>;
  constexpr int kGroupSize = Traits::kGroupSize;
  const int groups_per_row = params.dim / kGroupSize;
  const auto* keys = static_cast<const scalar_t*>(params.keys) + row * params.dim;
  uint8_t* codes = params.codes + destination_row * (params.dim / 2);
  auto* scales = static_cast<typename Traits::ScaleBits*>(params.scales) + destination_row * groups_per_row;
  float values[kGroupSize];
  uint32_t words[kGroupSize / 8];
  for (int group = 0; group < groups_per_row; ++group) {
    for (int i = 0; i < kGroupSize; ++i) values[i] = to_float(keys[group * kGroupSize + i]);
    scales[group] = kcache::encode_group<Format>(values, params.global_scale, words);
    uint8_t* group_codes = codes + group * (kGroupSize / 2);
    for (int i = 0; i < kGroupSize / 2; ++i) group_codes[i] = uint8_t(words[i / 4] >> (8 * (i % 4)));
  }
}

template <KCacheFormat Format, typename scalar_t>
void pack_rows(const KCachePackParams& params) {
  const int64_t grain = kGrainGroups / (params.dim / kcache::FormatTraits<Format>::kGroupSize) + 1;
  at::parallel_for(0, params.num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) encode_row<Format, scalar_t>(params, row, row);
  });
}

// Rows are (batch, head) pairs; each lands at block slot slots[batch] of its (batch, head) cache.
template <KCacheFormat Format, typename scalar_t>
void append_rows(const KCachePackParams& params) {
  const int64_t grain = kGrainGroups / (params.dim / kcache::FormatTraits<Format>::kGroupSize) + 1;
  at::parallel_for(0, params.num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int32_t slot = params.slots[row / params.heads];
      if (slot < 0 || slot >= params.num_key_blocks) continue;
      encode_row<Format, scalar_t>(params, row, row * params.num_key_blocks + slot);
    }
  });
}

template <KCacheFormat Format>
void unpack_rows(const KCachePackParams& params) {
  using Traits = kcache::FormatTraits<Format>;
  constexpr int kGroupSize = Traits::kGroupSize;
  const int64_t num_groups = params.num_rows * (params.dim / kGroupSize);
  const auto* scales = static_cast<const typename Traits::ScaleBits*>(params.scales);
  at::parallel_for(0, num_groups, kGrainGroups, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      kcache::decode_group<Format>(params.codes + group * (kGroupSize / 2), scales[group], params.global_scale,
                                   params.unpacked + group * kGroupSize);
    }
  });
}

}  // namespace

void pack_kcache_cpu(const KCachePackParams& params) {
  SPOT_DISPATCH_KCACHE_FORMAT(params.format, kFormat,
                              SPOT_DISPATCH_FLOAT(params.key_dtype, scalar_t, pack_rows<kFormat, scalar_t>(params)));
}

void append_kcache_cpu(const KCachePackParams& params) {
  SPOT_DISPATCH_KCACHE_FORMAT(params.format, kFormat,
                              SPOT_DISPATCH_FLOAT(params.key_dtype, scalar_t, append_rows<kFormat, scalar_t>(params)));
}

void unpack_kcache_cpu(const KCachePackParams& params) {
  SPOT_DISPATCH_KCACHE_FORMAT(params.format, kFormat, unpack_rows<kFormat>(params));
}

}  // namespace spot
