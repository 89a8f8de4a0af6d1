// PLACEHOLDER: replaced by the op's real entry (validation, params, CPU/CUDA dispatch).
#include "ops.h"

#include <c10/util/Exception.h>

namespace spot {

at::Tensor selector_score(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, std::string_view, double, double) {
  TORCH_CHECK(false, "spot.selector_score: not implemented yet");
}

}  // namespace spot
