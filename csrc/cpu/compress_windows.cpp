// blossomrec::compress_windows on CPU: the compressor's input windows of BlossomAttention
// (compress_keys), the same numbers as its PyTorch statement (shift_to_start, a cat with l - s zero
// rows, unfold, + compress_pos) and as the CUDA kernel.
//
// windows[b, c, g, t * D + d] = (r < 0 ? 0 : k[b, clamp(seq_start[b] + r, 0, N - 1), g, d])
//                               + pos[g, t, d],   r = c*s - (l - s) + t,
// the sum evaluated in float (float64 for float64 inputs) and rounded to k's dtype, as torch's add
// of two k-dtype tensors does.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/alloc.h"
#include "common/checks.h"

namespace blossomrec {
namespace cpu {
namespace {

at::Tensor compress_windows_cpu(const at::Tensor& k, const at::Tensor& seq_start,
                                const at::Tensor& pos_in, int64_t l, int64_t s) {
  check_compress_windows_inputs(k, seq_start, pos_in, l, s);
  const int64_t B = k.size(0), N = k.size(1), KVH = k.size(2), D = k.size(3), C = N / s;
  at::Tensor out =
      alloc_output({B, C, KVH, l * D}, k.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor pos = pos_in.contiguous();
  const at::Tensor st = seq_start.contiguous();
  const int32_t* start = st.const_data_ptr<int32_t>();
  const int64_t sb = k.stride(0), sn = k.stride(1), sg = k.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "compress_windows_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* pp = pos.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // one task per (b, c, t): a row of k added to pos[:, t] for every head
    at::parallel_for(0, B * C * l, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i % l, bc = i / l, c = bc % C, b = bc / C;
        const int64_t r = c * s - (l - s) + t;
        const int64_t n = std::clamp<int64_t>(int64_t(start[b]) + r, 0, N - 1);
        for (int64_t g = 0; g < KVH; ++g) {
          const scalar_t* pi = pp + (g * l + t) * D;
          scalar_t* oi = op + ((bc * KVH + g) * l + t) * D;
          if (r < 0) {
            for (int64_t d = 0; d < D; ++d) {
              oi[d] = static_cast<scalar_t>(acc_t(0) + static_cast<acc_t>(pi[d]));
            }
          } else {
            const scalar_t* ki = kp + b * sb + n * sn + g * sg;
            for (int64_t d = 0; d < D; ++d) {
              oi[d] = static_cast<scalar_t>(static_cast<acc_t>(ki[d]) + static_cast<acc_t>(pi[d]));
            }
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

TORCH_LIBRARY_IMPL(blossomrec, CPU, m) {
  m.impl("compress_windows", &blossomrec::cpu::compress_windows_cpu);
}
