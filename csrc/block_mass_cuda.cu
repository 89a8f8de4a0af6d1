// CUDA launcher of spot.block_mass (kernel in progress).
#include <stdexcept>

#include "launchers.h"

namespace spot {

void block_mass_cuda(const BlockMassParams&) { throw std::runtime_error("spot.block_mass: CUDA kernel not implemented yet"); }

}  // namespace spot
