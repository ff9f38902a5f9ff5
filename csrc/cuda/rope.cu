// blossomrec::rope on CUDA: the rotary embedding of x [B, N, heads, D] at positions relative to each
// sequence's first valid row (pos = max(n - seq_start[b], 0)), one kernel for the forward and one
// (the same, turning the other way) for the backward. Replaces the ~30 elementwise kernels of the
// PyTorch statement (reference.apply_rope, forward and autograd) for q and k at once: the modules
// rotate the q and k heads of their fused projection in one call (docs/PERF_NOTES.md, "Module level").
//
// A thread per (row, pair m): it evaluates the pair's cosine and sine once (csrc/common/rope.h) and
// turns that pair in every head of the row, two adjacent elements per load.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/rope.h"
#include "cuda/common.cuh"
#include "cuda/dispatch.h"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kRopeThreads = 256;

struct RopeParams {
  const void* x;
  void* out;  // contiguous [B, N, heads, D]
  const int32_t* seq_start;
  int64_t sb, sn, sh;  // x's strides in elements (last dim contiguous)
  int64_t B, N, heads, D;
  double theta;
  bool inverse;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(RopeParams p) {
  using pair_t = typename Pair2<scalar_t>::type;
  using acc_t = acc_type<scalar_t>;
  const int64_t half = p.D / 2;
  const int64_t idx = int64_t(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (idx >= p.B * p.N * half) return;
  const int m = static_cast<int>(idx % half);
  const int64_t row = idx / half;
  const int64_t n = row % p.N, b = row / p.N;
  const int64_t pos = max(n - int64_t(p.seq_start[b]), int64_t(0));
  acc_t c, s;
  rope::angle_cos_sin<acc_t>(pos, m, static_cast<int>(p.D), p.theta, p.inverse, &c, &s);
  const auto* x = static_cast<const scalar_t*>(p.x) + b * p.sb + n * p.sn + 2 * m;
  auto* out = static_cast<scalar_t*>(p.out) + row * p.heads * p.D + 2 * m;
  for (int64_t h = 0; h < p.heads; ++h) {
    const pair_t v = *reinterpret_cast<const pair_t*>(x + h * p.sh);
    acc_t e, o;
    rope::rotate<acc_t>(to_acc(v.x), to_acc(v.y), c, s, &e, &o);
    pair_t r;
    r.x = from_acc<scalar_t>(e);
    r.y = from_acc<scalar_t>(o);
    *reinterpret_cast<pair_t*>(out + h * p.D) = r;
  }
}

at::Tensor rope_cuda(const at::Tensor& x_in, const at::Tensor& seq_start, double theta,
                     bool inverse) {
  check_rope_inputs(x_in, seq_start);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Pairs are read two elements at a time: every stride and the start must be even (any
  // projection's view is); anything else is copied first.
  const bool aligned = x_in.stride(0) % 2 == 0 && x_in.stride(1) % 2 == 0 &&
                       x_in.stride(2) % 2 == 0 &&
                       reinterpret_cast<uintptr_t>(x_in.data_ptr()) % (2 * x_in.element_size()) == 0;
  const at::Tensor x = aligned ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = alloc_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = x.size(0) * x.size(1) * (x.size(3) / 2);
  if (total == 0 || x.size(2) == 0) return out;
  const at::Tensor st = seq_start.contiguous();
  RopeParams p{x.data_ptr(), out.data_ptr(), st.data_ptr<int32_t>(), x.stride(0), x.stride(1),
               x.stride(2), x.size(0), x.size(1), x.size(2), x.size(3), theta, inverse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((total + kRopeThreads - 1) / kRopeThreads);
  const auto dtype = x.scalar_type();
  if (dtype == at::kDouble) {
    rope_kernel<double><<<blocks, kRopeThreads, 0, stream>>>(p);
  } else {
    BR_DTYPE_SWITCH(dtype, [&] { rope_kernel<scalar_t><<<blocks, kRopeThreads, 0, stream>>>(p); });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) { m.impl("rope", &blossomrec::cuda::rope_cuda); }
