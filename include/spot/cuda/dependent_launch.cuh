// Programmatic dependent launch (Hopper). A kernel launched with the programmatic stream
// serialization attribute (spot::launch_dependent) may begin while the previous kernel of its
// stream is still running, so the launch latency between the kernels of a decode step overlaps
// the previous kernel's work. Such a kernel calls wait_for_previous_grid() before it reads any
// global memory (the previous kernel's outputs become visible there); a kernel calls
// allow_dependent_launch() once the next kernel may start launching. Both are no-ops before
// sm_90 and in kernels launched the ordinary way.
#pragma once

namespace spot {

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace spot
