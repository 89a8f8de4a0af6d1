// PLACEHOLDER: replaced by the op's real entry (validation, params, CPU/CUDA dispatch).
#include "ops.h"

#include <c10/util/Exception.h>

namespace spot {

std::tuple<at::Tensor, at::Tensor> select_blocks(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "spot.select_blocks: not implemented yet");
}

std::tuple<at::Tensor, at::Tensor> decode_select(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t, std::string_view, double, double, double, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "spot.decode_select: not implemented yet");
}

}  // namespace spot
