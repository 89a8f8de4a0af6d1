// PLACEHOLDER: replaced by the op's real entry (validation, params, CPU/CUDA dispatch).
#include "ops.h"

#include <c10/util/Exception.h>

namespace spot {

at::Tensor block_mass(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double) {
  TORCH_CHECK(false, "spot.block_mass: not implemented yet");
}

}  // namespace spot
