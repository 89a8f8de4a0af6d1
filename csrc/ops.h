// Op entries: validate torch inputs, fill a params struct (include/spot/params.h), allocate the
// outputs and call the CPU kernel or the CUDA launcher. Registered in registration.cpp.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace spot {

at::Tensor selector_score(const at::Tensor& query, const at::Tensor& keys,
                          const std::optional<at::Tensor>& key_scales, const at::Tensor& num_visible,
                          std::string_view format, double global_scale, double softmax_scale);

std::tuple<at::Tensor, at::Tensor> select_blocks(const at::Tensor& scores, const at::Tensor& num_visible,
                                                 double top_p, int64_t k_min, int64_t k_max,
                                                 int64_t sink_blocks, int64_t local_blocks);

std::tuple<at::Tensor, at::Tensor> decode_select(const at::Tensor& query, const at::Tensor& keys,
                                                 const std::optional<at::Tensor>& key_scales,
                                                 const at::Tensor& seq_lens, int64_t block_size,
                                                 std::string_view format, double global_scale,
                                                 double softmax_scale, double top_p, int64_t k_min,
                                                 int64_t k_max, int64_t sink_blocks, int64_t local_blocks);

std::tuple<at::Tensor, at::Tensor> sparse_decode(const at::Tensor& query, const at::Tensor& key_cache,
                                                 const at::Tensor& value_cache,
                                                 const std::optional<at::Tensor>& block_table,
                                                 const at::Tensor& seq_lens, const at::Tensor& block_indices,
                                                 const at::Tensor& block_counts, int64_t block_size,
                                                 double softmax_scale);

std::tuple<at::Tensor, at::Tensor> sparse_prefill(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const at::Tensor& cu_seqlens,
                                                  int64_t max_seqlen, const at::Tensor& block_indices,
                                                  const at::Tensor& block_counts, int64_t block_size,
                                                  double softmax_scale);

at::Tensor block_mass(const at::Tensor& query, const at::Tensor& key, const at::Tensor& cu_seqlens,
                      int64_t max_seqlen, int64_t block_size_q, int64_t block_size_k, double softmax_scale);

std::tuple<at::Tensor, at::Tensor> pack_kcache(const at::Tensor& keys, std::string_view format,
                                               double global_scale);

at::Tensor unpack_kcache(const at::Tensor& codes, const at::Tensor& scales, std::string_view format,
                         double global_scale);

void append_kcache(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& keys,
                   const at::Tensor& slots, std::string_view format, double global_scale);

}  // namespace spot
