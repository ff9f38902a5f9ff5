// blossomrec::compress_windows on CUDA: the compressor's input windows of BlossomAttention
// (compress_keys) in one kernel, in place of the ~6 of its PyTorch statement (shift_to_start's
// arange + add + clamp + gather, a cat with l - s zero rows, unfold + transpose + the add of
// compress_pos, the reshape's copy), each of which cost ~20 us of host time in eager mode.
//
// windows[b, c, g, t * D + d] = (r < 0 ? 0 : k[b, clamp(seq_start[b] + r, 0, N - 1), g, d])
//                               + pos[g, t, d],   r = c*s - (l - s) + t,
// the sum evaluated in float (float64 for float64) and rounded to k's dtype, as torch's add does:
// bitwise the statement's numbers. The float add is written in PTX without .ftz, so that
// --use_fast_math (-ftz=true) does not flush subnormal float32 / bfloat16 values that torch's add
// keeps.
//
// A thread per 16-byte chunk of an output row (b, c, g, t): consecutive threads write consecutive
// chunks of the contiguous output and read consecutive chunks of a row of k and of pos. Where k's
// strides, D or a pointer do not allow 16-byte accesses the same thread loads element by element.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "common/alloc.h"
#include "common/checks.h"
#include "cuda/common.cuh"
#include "cuda/dispatch.h"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kWindowThreads = 256;

// a + b rounded once to nearest, subnormals kept (no .ftz, whatever -ftz says; no contraction).
__device__ inline float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

struct WindowParams {
  const void* k;
  const void* pos;  // contiguous [KVH, l, D]
  void* out;        // contiguous [B, C, KVH, l, D]
  const int32_t* seq_start;
  int64_t sb, sn, sg;  // k's strides in elements (last dim contiguous)
  int64_t N, C, KVH, l, s, D;
  int64_t chunks;  // 16-byte chunks per output row: ceil(D / kVec)
  int64_t total;   // B * C * KVH * l * chunks
  bool vec;        // 16-byte loads and stores (D, k's strides and both inputs' pointers allow them)
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWindowThreads) compress_windows_kernel(WindowParams p) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t idx = int64_t(blockIdx.x) * kWindowThreads + threadIdx.x;
  if (idx >= p.total) return;
  const int64_t j = idx % p.chunks, row = idx / p.chunks;  // row = ((b * C + c) * KVH + g) * l + t
  const int64_t t = row % p.l, bcg = row / p.l;
  const int64_t g = bcg % p.KVH, bc = bcg / p.KVH;
  const int64_t c = bc % p.C, b = bc / p.C;
  const int64_t r = c * p.s - (p.l - p.s) + t;
  const int64_t n = min(max(int64_t(p.seq_start[b]) + r, int64_t(0)), p.N - 1);
  const int64_t d0 = j * kVec;
  const auto* kp = static_cast<const scalar_t*>(p.k) + b * p.sb + n * p.sn + g * p.sg + d0;
  const auto* pp = static_cast<const scalar_t*>(p.pos) + (g * p.l + t) * p.D + d0;
  auto* op = static_cast<scalar_t*>(p.out) + row * p.D + d0;
  alignas(16) scalar_t kv[kVec];
  alignas(16) scalar_t pv[kVec];
  alignas(16) scalar_t ov[kVec];
  const int e_end = p.vec ? kVec : static_cast<int>(min(int64_t(kVec), p.D - d0));
  if (p.vec) {
    *reinterpret_cast<uint4*>(pv) = __ldg(reinterpret_cast<const uint4*>(pp));
    if (r >= 0) *reinterpret_cast<uint4*>(kv) = __ldg(reinterpret_cast<const uint4*>(kp));
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < e_end) {
        pv[e] = pp[e];
        if (r >= 0) kv[e] = kp[e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const acc_t a = r < 0 ? acc_t(0) : to_acc(kv[e]);
    ov[e] = from_acc<scalar_t>(add_rn(a, to_acc(pv[e])));
  }
  if (p.vec) {
    *reinterpret_cast<uint4*>(op) = *reinterpret_cast<const uint4*>(ov);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < e_end) op[e] = ov[e];
    }
  }
}

at::Tensor compress_windows_cuda(const at::Tensor& k, const at::Tensor& seq_start,
                                 const at::Tensor& pos_in, int64_t l, int64_t s) {
  check_compress_windows_inputs(k, seq_start, pos_in, l, s);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), N = k.size(1), KVH = k.size(2), D = k.size(3), C = N / s;
  at::Tensor out =
      alloc_output({B, C, KVH, l * D}, k.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor pos = pos_in.contiguous();
  const at::Tensor st = seq_start.contiguous();
  const int64_t vec_elems = 16 / k.element_size();
  const bool vec = D % vec_elems == 0 && k.stride(0) % vec_elems == 0 &&
                   k.stride(1) % vec_elems == 0 && k.stride(2) % vec_elems == 0 &&
                   reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(pos.data_ptr()) % 16 == 0;
  const int64_t chunks = (D + vec_elems - 1) / vec_elems;
  WindowParams p{k.data_ptr(), pos.data_ptr(), out.data_ptr(), st.data_ptr<int32_t>(),
                 k.stride(0), k.stride(1), k.stride(2), N, C, KVH, l, s, D, chunks,
                 B * C * KVH * l * chunks, vec};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (p.total + kWindowThreads - 1) / kWindowThreads;
  BR_CHECK_VALUE(blocks <= int64_t(0x7fffffff), "compress_windows: output too large (",
                    out.numel(), " elements)");
  const auto dtype = k.scalar_type();
  if (dtype == at::kDouble) {
    compress_windows_kernel<double><<<static_cast<unsigned>(blocks), kWindowThreads, 0, stream>>>(p);
  } else {
    BR_DTYPE_SWITCH(dtype, [&] {
      compress_windows_kernel<scalar_t>
          <<<static_cast<unsigned>(blocks), kWindowThreads, 0, stream>>>(p);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) {
  m.impl("compress_windows", &blossomrec::cuda::compress_windows_cuda);
}
