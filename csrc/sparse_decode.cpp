// PLACEHOLDER: replaced by the op's real entry (validation, params, CPU/CUDA dispatch).
#include "ops.h"

#include <c10/util/Exception.h>

namespace spot {

std::tuple<at::Tensor, at::Tensor> sparse_decode(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double) {
  TORCH_CHECK(false, "spot.sparse_decode: not implemented yet");
}

}  // namespace spot
