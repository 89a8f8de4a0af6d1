// Attributes of the current CUDA device, read once per device: launch planners consult them on
// every op call, and cudaDeviceGetAttribute is a driver round trip.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

namespace spot {

template <cudaDeviceAttr Attribute>
int current_device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> values[kMaxDevices] = {};  // 0: not read yet (every attribute used is >= 1)
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices) {
    const int cached = values[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, Attribute, device));
  value = std::max(value, 1);
  if (device < kMaxDevices) values[device].store(value, std::memory_order_relaxed);
  return value;
}

inline int multiprocessor_count() { return current_device_attribute<cudaDevAttrMultiProcessorCount>(); }

inline int compute_capability_major() { return current_device_attribute<cudaDevAttrComputeCapabilityMajor>(); }

// Whether Kernel's binary was built for sm_90 or later (so has its cluster / dependent-launch
// code), which running on a Hopper device does not imply.
template <auto Kernel>
bool binary_is_sm90_or_later() {
  static const bool answer = [] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, Kernel));
    return attributes.binaryVersion >= 90;
  }();
  return answer;
}

// SPOT_DEPENDENT_LAUNCH=0 turns programmatic dependent launches off (read once), for A/B runs.
inline bool dependent_launch_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("SPOT_DEPENDENT_LAUNCH");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

// The launch attribute for thread-block clusters of `x` CTAs along the grid's x.
inline cudaLaunchAttribute cluster_dimension(unsigned x) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = x;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

// Launches Kernel as a programmatic dependent of the stream's previous kernel where the device
// and Kernel's binary allow it (see spot/cuda/dependent_launch.cuh; Kernel must call
// wait_for_previous_grid before its first global read), else as an ordinary launch. With
// cluster_x > 1 the grid runs in thread-block clusters of cluster_x CTAs along x (the caller
// checks that the device and binary have clusters).
template <auto Kernel, typename... Args>
void launch_dependent_in_clusters(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, unsigned cluster_x,
                                  const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (dependent_launch_enabled() && compute_capability_major() >= 9 && binary_is_sm90_or_later<Kernel>()) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  if (cluster_x > 1) attributes[count++] = cluster_dimension(cluster_x);
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, Kernel, args...));
}

template <auto Kernel, typename... Args>
void launch_dependent(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, const Args&... args) {
  launch_dependent_in_clusters<Kernel>(grid, block, shared_bytes, stream, 1u, args...);
}

}  // namespace spot
