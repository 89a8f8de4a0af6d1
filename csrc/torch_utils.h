// Input checks shared by the op entries. Every message names the argument and what was expected.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include "spot/params.h"

// Messages are assembled here rather than by streaming into an ostream (c10::str): numbers
// streamed from this library crashed in processes that had loaded a second libstdc++ (its locale
// facets did not match), so numbers go through std::to_string / snprintf, which use no facets.
#define SPOT_CHECK_ARG(COND, OP, ARG, ...) \
  TORCH_CHECK_VALUE(COND, ::spot::message("spot.", OP, ": argument '", ARG, "' ", __VA_ARGS__))

// A CUDA launcher for run_on_device; nullptr in a build without CUDA, where launchers.h declares none.
#ifdef SPOT_WITH_CUDA
#define SPOT_CUDA_LAUNCHER(LAUNCHER) (LAUNCHER)
#else
#define SPOT_CUDA_LAUNCHER(LAUNCHER) nullptr
#endif

namespace spot {
namespace message_detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, std::string_view text) { out.append(text); }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, char letter) { out += letter; }
inline void append(std::string& out, bool flag) { out += flag ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& out, T number) {
  out += std::to_string(number);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void append(std::string& out, T number) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.9g", double(number));
  out += text;
}
template <typename T, std::enable_if_t<std::is_enum_v<T> && !std::is_same_v<T, c10::ScalarType>, int> = 0>
void append(std::string& out, T value) {
  out += std::to_string(static_cast<std::underlying_type_t<T>>(value));
}
inline void append(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }
inline void append(std::string& out, c10::IntArrayRef values) {
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}

}  // namespace message_detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (message_detail::append(out, args), ...);
  return out;
}

inline void check_device(const at::Tensor& tensor, const at::Tensor& reference, const char* op,
                         const char* arg) {
  SPOT_CHECK_ARG(tensor.device() == reference.device(), op, arg, "must be on ", reference.device(),
                 " like the other inputs, got ", tensor.device());
}

inline void check_dim(const at::Tensor& tensor, int64_t dim, const char* op, const char* arg,
                      const char* shape) {
  SPOT_CHECK_ARG(tensor.dim() == dim, op, arg, "must be ", dim, "-D ", shape, ", got shape ",
                 tensor.sizes());
}

inline void check_contiguous(const at::Tensor& tensor, const char* op, const char* arg) {
  SPOT_CHECK_ARG(tensor.is_contiguous(), op, arg, "must be contiguous (call .contiguous())");
}

inline void check_dtype(const at::Tensor& tensor, at::ScalarType dtype, const char* op, const char* arg) {
  SPOT_CHECK_ARG(tensor.scalar_type() == dtype, op, arg, "must be ", dtype, ", got ",
                 tensor.scalar_type());
}

inline void check_size(const at::Tensor& tensor, int64_t dim, int64_t expected, const char* op,
                       const char* arg, const char* what) {
  SPOT_CHECK_ARG(tensor.size(dim) == expected, op, arg, "dim ", dim, " (", what, ") must be ", expected,
                 ", got shape ", tensor.sizes());
}

// Activation dtypes: bf16 and fp16 everywhere, fp32 where the op allows it.
inline DType to_spot_dtype(const at::Tensor& tensor, bool allow_float32, const char* op, const char* arg) {
  switch (tensor.scalar_type()) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kFloat:
      if (allow_float32) return DType::kFloat32;
      [[fallthrough]];
    default:
      SPOT_CHECK_ARG(false, op, arg, "must be bfloat16 or float16", allow_float32 ? " or float32" : "",
                     ", got ", tensor.scalar_type());
  }
  return DType::kFloat32;
}

inline KCacheFormat parse_kcache_format(std::string_view format, bool allow_dense, const char* op) {
  if (format == "int4") return KCacheFormat::kInt4;
  if (format == "mxfp4") return KCacheFormat::kMxfp4;
  if (format == "nvfp4") return KCacheFormat::kNvfp4;
  if (allow_dense && format == "dense") return KCacheFormat::kDense;
  SPOT_CHECK_ARG(false, op, "format", "must be one of ", allow_dense ? "'dense', " : "",
                 "'int4', 'mxfp4', 'nvfp4', got '", std::string(format), "'");
  return KCacheFormat::kDense;
}

// Scalar arguments tied to the launch: block sizes and counts must be positive and small.
inline void check_positive(int64_t value, const char* op, const char* arg) {
  SPOT_CHECK_ARG(value > 0, op, arg, "must be positive, got ", value);
}

// The dispatch tail of an op entry, once params are filled: the CPU kernel when `tensor` is not on
// CUDA, else the CUDA launcher under a guard for the tensor's device (launchers use the current
// device's stream). `arg` names `tensor` in the error a build without CUDA gives.
// The launcher's type is spelled through a nested alias so that only cpu_kernel deduces Params
// (the launcher may be nullptr); std::type_identity_t would need C++20, and torch 2.11 builds
// extensions as C++17.
template <typename Params>
struct ParamsKernel {
  using type = void (*)(const Params&);
};

template <typename Params>
void run_on_device(const Params& params, const at::Tensor& tensor, const char* op, const char* arg,
                   void (*cpu_kernel)(const Params&), typename ParamsKernel<Params>::type cuda_launcher) {
  if (!tensor.is_cuda()) {
    cpu_kernel(params);
    return;
  }
  SPOT_CHECK_ARG(cuda_launcher != nullptr, op, arg, "is on CUDA but spot_ops was built without CUDA");
  const c10::DeviceGuard device_guard(tensor.device());
  cuda_launcher(params);
}

}  // namespace spot
