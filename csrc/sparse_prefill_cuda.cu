// CUDA launcher for spot.sparse_prefill. The kernels land in the next commit; until then the op
// raises on CUDA tensors instead of returning anything.
#include <stdexcept>

#include "launchers.h"

namespace spot {

void sparse_prefill_cuda(const SparsePrefillParams&) {
  throw std::runtime_error("spot.sparse_prefill: the CUDA kernel is not built yet");
}

}  // namespace spot
