// blossomrec::rope on CPU: the rotary embedding of x [B, N, heads, D] at positions relative to each
// sequence's first valid row (pos = max(n - seq_start[b], 0)); the rotation of csrc/common/rope.h,
// the same numbers as the CUDA kernel. A row's cosines and sines are evaluated once and applied to
// every head.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/rope.h"

namespace blossomrec {
namespace cpu {
namespace {

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& seq_start, double theta, bool inverse) {
  check_rope_inputs(x, seq_start);
  at::Tensor out = alloc_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t B = x.size(0), N = x.size(1), heads = x.size(2), D = x.size(3), half = D / 2;
  if (out.numel() == 0) return out;
  const at::Tensor st = seq_start.contiguous();
  const int32_t* start = st.data_ptr<int32_t>();
  const int64_t sb = x.stride(0), sn = x.stride(1), sh = x.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> c(half), s(half);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / N, n = row % N;
        const int64_t pos = std::max<int64_t>(n - start[b], 0);
        for (int64_t m = 0; m < half; ++m) {
          rope::angle_cos_sin<acc_t>(pos, static_cast<int>(m), static_cast<int>(D), theta,
                                     inverse, &c[m], &s[m]);
        }
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* xi = xp + b * sb + n * sn + h * sh;
          scalar_t* oi = op + (row * heads + h) * D;
          for (int64_t m = 0; m < half; ++m) {
            acc_t e, o;
            rope::rotate<acc_t>(static_cast<acc_t>(xi[2 * m]), static_cast<acc_t>(xi[2 * m + 1]),
                                c[m], s[m], &e, &o);
            oi[2 * m] = static_cast<scalar_t>(e);
            oi[2 * m + 1] = static_cast<scalar_t>(o);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CPU, m) { m.impl("rope", &blossomrec::cpu::rope_cpu); }
