// Hopper (wgmma + TMA) kernel of spot.sparse_prefill: not built yet. Until it lands it supports
// nothing, so the launcher in sparse_prefill_cuda.cu always runs the mma kernel.
#include <stdexcept>

#include "launchers.h"

namespace spot {

bool sparse_prefill_sm90_supported(const SparsePrefillParams&) { return false; }

void sparse_prefill_sm90_cuda(const SparsePrefillParams&) {
  throw std::runtime_error("spot.sparse_prefill: the Hopper kernel is not built yet");
}

}  // namespace spot
