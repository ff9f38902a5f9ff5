// Device helpers shared by the CUDA kernels: the row -> sequence map of the row-buffer layout,
// 16-element vector loads/stores, lane-segment reductions. The STIS key/query enumerators live in common/mask.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "common/mask.h"

namespace blossomrec {
namespace cuda {

// Each (row, head) is served by kLanes = D / 16 consecutive threads ("a segment"), each holding 16
// of the D dims in float32 registers: 16 dims are two 16-byte loads in 16-bit types, and a head of
// D = 128 then costs 8 threads instead of 128 registers of one.
constexpr int kDimsPerLane = 16;

// ---------------------------------------------------------------------------------------------
// The row-buffer layout (docs/DESIGN.md): sequence b's token i sits at row
// (Bq == 1 ? 0 : b) * N + seq_start[b] + i.
// ---------------------------------------------------------------------------------------------
struct SeqParams {
  const int32_t* seq_start;
  const int32_t* seq_len;
  int64_t B, Bq, N;
};

struct RowInfo {
  int64_t b;      // sequence, -1 for padding
  int64_t i;      // position in the sequence
  int64_t L;      // the sequence's length
  int64_t base;   // buffer row of the sequence's token 0
};

// Clamp a sequence to the buffer so that bad lengths can never index out of bounds.
__device__ __forceinline__ void seq_bounds(const SeqParams& sp, int64_t b, int64_t* start,
                                           int64_t* len) {
  int64_t s = sp.seq_start[b];
  int64_t l = sp.seq_len[b];
  s = s < 0 ? 0 : (s > sp.N ? sp.N : s);
  l = l < 0 ? 0 : (l > sp.N - s ? sp.N - s : l);
  *start = s;
  *len = l;
}

// Which sequence owns buffer row r (0 <= r < Bq * N)? Padded: the row's batch entry. Packed:
// binary search for the first sequence whose end lies past r (ends are non-decreasing because
// packed sequences are in order and do not overlap).
__device__ __forceinline__ RowInfo row_info(const SeqParams& sp, int64_t r) {
  RowInfo info{-1, 0, 0, 0};
  if (sp.B == 0) return info;  // no sequence (a packed buffer of padding only): nothing to read
  const int64_t bq = r / sp.N;
  const int64_t n = r - bq * sp.N;
  int64_t b = bq;
  if (sp.Bq == 1 && sp.B > 1) {
    int64_t lo = 0, hi = sp.B;  // first b with end_b > n
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      int64_t s, l;
      seq_bounds(sp, mid, &s, &l);
      if (s + l > n) hi = mid; else lo = mid + 1;
    }
    b = lo;
    if (b >= sp.B) return info;
  }
  int64_t s, l;
  seq_bounds(sp, b, &s, &l);
  if (n < s || n >= s + l) return info;
  info.b = b;
  info.i = n - s;
  info.L = l;
  info.base = bq * sp.N + s;
  return info;
}

// ---------------------------------------------------------------------------------------------
// 16 contiguous elements <-> 16 floats
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  __device__ __forceinline__ static void load(const float* p, float* x) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const float4 f = reinterpret_cast<const float4*>(p)[v];
      x[4 * v] = f.x; x[4 * v + 1] = f.y; x[4 * v + 2] = f.z; x[4 * v + 3] = f.w;
    }
  }
  __device__ __forceinline__ static void store(float* p, const float* x) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      reinterpret_cast<float4*>(p)[v] = make_float4(x[4 * v], x[4 * v + 1], x[4 * v + 2], x[4 * v + 3]);
    }
  }
};

// 16 16-bit values = two 16-byte loads of 4 packed pairs each.
template <typename T, typename T2>
struct Vec16Packed {
  __device__ __forceinline__ static void load(const T* p, float* x) {
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      const T2* pairs = reinterpret_cast<const T2*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = to_float2(pairs[e]);
        x[8 * v + 2 * e] = f.x;
        x[8 * v + 2 * e + 1] = f.y;
      }
    }
  }
  __device__ __forceinline__ static void store(T* p, const float* x) {
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      uint4 raw;
      T2* pairs = reinterpret_cast<T2*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) pairs[e] = from_float2(x[8 * v + 2 * e], x[8 * v + 2 * e + 1]);
      reinterpret_cast<uint4*>(p)[v] = raw;
    }
  }
  __device__ __forceinline__ static float2 to_float2(__half2 h) { return __half22float2(h); }
  __device__ __forceinline__ static float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
  __device__ __forceinline__ static T2 from_float2(float a, float b);
};

template <>
__device__ __forceinline__ __half2 Vec16Packed<__half, __half2>::from_float2(float a, float b) {
  return __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ __nv_bfloat162 Vec16Packed<__nv_bfloat16, __nv_bfloat162>::from_float2(
    float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

template <>
struct Vec16<__half> : Vec16Packed<__half, __half2> {};
template <>
struct Vec16<__nv_bfloat16> : Vec16Packed<__nv_bfloat16, __nv_bfloat162> {};

// ---------------------------------------------------------------------------------------------
// One element <-> its compute type (float for the 32- and 16-bit types, double for double), and
// the type of two adjacent elements (one 4-, 8- or 16-byte access)
// ---------------------------------------------------------------------------------------------
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounded to nearest (even).
template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <typename T> struct Pair2;
template <> struct Pair2<float> { using type = float2; };
template <> struct Pair2<double> { using type = double2; };
template <> struct Pair2<__half> { using type = __half2; };
template <> struct Pair2<__nv_bfloat16> { using type = __nv_bfloat162; };

// at::Half / at::BFloat16 -> the CUDA types with the same bits
template <typename T>
struct CudaType { using type = T; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

// ---------------------------------------------------------------------------------------------
// Sum over the kLanes threads of a segment (aligned groups of kLanes lanes of one warp).
// ---------------------------------------------------------------------------------------------
template <int kLanes>
__device__ __forceinline__ float segment_sum(float x) {
  if constexpr (kLanes > 1) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned mask = ((kLanes == 32) ? 0xffffffffu : ((1u << kLanes) - 1u)) << (lane & ~(kLanes - 1u));
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) x += __shfl_xor_sync(mask, x, off, kLanes);
  }
  return x;
}

__device__ __forceinline__ float dot16(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// Online softmax state of one (row, head) over one key set, in base 2 (logits pre-scaled by log2 e).
struct OnlineSoftmax {
  float m = -INFINITY;
  float l = 0.f;
  // Returns the rescale factor for the accumulator and writes the weight of the new key to *p.
  __device__ __forceinline__ float update(float s, float* p) {
    const float m_new = fmaxf(m, s);
    const float c = exp2f(m - m_new);
    *p = exp2f(s - m_new);
    l = l * c + *p;
    m = m_new;
    return c;
  }
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The kernels read and write head vectors with 16-byte accesses: the data pointer and every stride
// of a dimension longer than 1 must be multiples of 16 bytes. That holds for contiguous tensors and
// for q/k/v sliced per head out of one projection, not for a view at an odd element offset: such
// an input is copied (a fresh allocation is aligned), so that it costs time but never gives a
// misaligned access. Keep the returned tensor alive until the kernels that read it are launched.
inline at::Tensor vec_aligned(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    if (t.size(dim) > 1 && (t.stride(dim) * int64_t(t.element_size())) % 16 != 0) ok = false;
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Without an opt-in a CTA gets at most 48 KiB of shared memory, static and dynamic together. The
// opt-in is a host call of several microseconds (five per fwd+bwd, under torch.profiler): made once
// per (kernel, device) and size, raised when a launch needs more.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, int64_t dynamic_bytes, int64_t static_bytes = 0) {
  if (dynamic_bytes + static_bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  int64_t& have = allowed[{reinterpret_cast<const void*>(kernel), device}];
  if (dynamic_bytes > have) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(dynamic_bytes)));
    have = dynamic_bytes;
  }
}

}  // namespace cuda
}  // namespace blossomrec
