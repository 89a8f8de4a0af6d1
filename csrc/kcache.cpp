// PLACEHOLDER: replaced by the op's real entry (validation, params, CPU/CUDA dispatch).
#include "ops.h"

#include <c10/util/Exception.h>

namespace spot {

std::tuple<at::Tensor, at::Tensor> pack_kcache(const at::Tensor&, std::string_view, double) {
  TORCH_CHECK(false, "spot.pack_kcache: not implemented yet");
}

at::Tensor unpack_kcache(const at::Tensor&, const at::Tensor&, std::string_view, double) {
  TORCH_CHECK(false, "spot.unpack_kcache: not implemented yet");
}

void append_kcache(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::string_view, double) {
  TORCH_CHECK(false, "spot.append_kcache: not implemented yet");
}

}  // namespace spot
