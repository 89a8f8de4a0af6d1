// The one place where runtime dtypes and head dims become template arguments.
#pragma once

#include <stdexcept>
#include <string>

#include "spot/params.h"

// SPOT_DISPATCH_FLOAT(dtype, scalar_t, ...): scalar_t is float, spot::half_t or spot::bfloat16_t
// (see spot/numeric.h); the body is a lambda-free statement block.
#define SPOT_DISPATCH_FLOAT(DTYPE, SCALAR, ...)                                  \
  switch (DTYPE) {                                                               \
    case ::spot::DType::kFloat32: { using SCALAR = float; __VA_ARGS__; break; }  \
    case ::spot::DType::kFloat16: { using SCALAR = ::spot::half_t; __VA_ARGS__; break; } \
    case ::spot::DType::kBFloat16: { using SCALAR = ::spot::bfloat16_t; __VA_ARGS__; break; } \
    default: throw std::invalid_argument("spot: unsupported dtype");             \
  }

// 16-bit activations only (the CUDA attention kernels).
#define SPOT_DISPATCH_HALF(DTYPE, SCALAR, ...)                                   \
  switch (DTYPE) {                                                               \
    case ::spot::DType::kFloat16: { using SCALAR = ::spot::half_t; __VA_ARGS__; break; } \
    case ::spot::DType::kBFloat16: { using SCALAR = ::spot::bfloat16_t; __VA_ARGS__; break; } \
    default: throw std::invalid_argument("spot: expected float16 or bfloat16");  \
  }

#define SPOT_DISPATCH_HEAD_DIM(HEAD_DIM, CONST_NAME, ...)                       \
  switch (HEAD_DIM) {                                                            \
    case 64: { constexpr int CONST_NAME = 64; __VA_ARGS__; break; }              \
    case 128: { constexpr int CONST_NAME = 128; __VA_ARGS__; break; }            \
    case 256: { constexpr int CONST_NAME = 256; __VA_ARGS__; break; }            \
    default: throw std::invalid_argument("spot: head_dim must be 64, 128 or 256, got " + \
                                         std::to_string(HEAD_DIM));              \
  }
