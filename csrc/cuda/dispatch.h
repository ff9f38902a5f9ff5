// Runtime head dim and dtype -> template parameters, one statement for every CUDA entry point
// (the pattern of FlashAttention's static_switch.h): the body is a lambda that sees the constant
// `kHeadDim` or the type `scalar_t` (the CUDA type: float, __half or __nv_bfloat16).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/message.h"

// The head dims the kernels are instantiated for (checks.h refuses the others first).
#define BR_HEADDIM_SWITCH(HEADDIM, ...)                                          \
  [&] {                                                                          \
    switch (HEADDIM) {                                                           \
      case 16: { constexpr int kHeadDim = 16; return __VA_ARGS__(); }            \
      case 32: { constexpr int kHeadDim = 32; return __VA_ARGS__(); }            \
      case 64: { constexpr int kHeadDim = 64; return __VA_ARGS__(); }            \
      case 128: { constexpr int kHeadDim = 128; return __VA_ARGS__(); }          \
      default: BR_CHECK(false, "unsupported head dim ", HEADDIM);             \
    }                                                                            \
  }()

// float32, float16, bfloat16 (the CUDA ops' dtypes; float64 is CPU only).
#define BR_DTYPE_SWITCH(DTYPE, ...)                                              \
  [&] {                                                                          \
    switch (DTYPE) {                                                             \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }         \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }         \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: BR_CHECK(false, "unsupported dtype ", DTYPE);                  \
    }                                                                            \
  }()

// float16 and bfloat16 only (the tensor-core kernels).
#define BR_HALF_DTYPE_SWITCH(DTYPE, ...)                                         \
  [&] {                                                                          \
    switch (DTYPE) {                                                             \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }         \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: BR_CHECK(false, "the tensor-core kernels take float16 or bfloat16, got ", DTYPE); \
    }                                                                            \
  }()
