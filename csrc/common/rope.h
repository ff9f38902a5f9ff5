// The rotation of blossomrec::rope for one (position, pair), shared by the CPU and CUDA kernels so
// that both compute the same numbers: the statement the reference makes in
// blossomrec_cuda/reference.py (apply_rope), evaluated in the same precision.
//
// Pair m of a head (dims 2m, 2m+1) turns by pos * inv_freq(m), inv_freq(m) = theta^(-2m/D). The
// compute type is float32 for float32/16/bfloat16 inputs and float64 for float64 ones, as in the
// reference; inv_freq(m) is evaluated in float64 and rounded once to the compute type (the
// reference's float32 pow may be an ulp off it: then the angles differ by pos times that ulp, as
// accurate either way), the angle is rounded to the compute type like the reference's
// `positions * inv_freq`, and its sine and cosine are evaluated in float64 (correctly rounded to
// float32 afterwards, and unaffected by --use_fast_math, whose single-precision sin/cos lose
// accuracy at the large angles of long sequences). The products are rounded one by one, as the
// reference's eager ops round them (setup.py builds the CPU code with -ffp-contract=off).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define BR_HOST_DEVICE __host__ __device__
#else
#define BR_HOST_DEVICE
#endif

namespace blossomrec {
namespace rope {

// a * b rounded once (no contraction into an FMA on the device; the host code is built with
// -ffp-contract=off).
template <typename acc_t>
BR_HOST_DEVICE inline acc_t mul(acc_t a, acc_t b) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<acc_t, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// cos and sin of pair m at position pos, in the compute type acc_t (float or double); `inverse`
// turns the other way (the backward of a rotation is its transpose).
template <typename acc_t>
BR_HOST_DEVICE inline void angle_cos_sin(int64_t pos, int m, int D, double theta, bool inverse,
                                         acc_t* c, acc_t* s) {
  const acc_t inv_freq = static_cast<acc_t>(pow(theta, -static_cast<double>(2 * m) / D));
  const acc_t angle = mul<acc_t>(static_cast<acc_t>(pos), inv_freq);
  double sd, cd;
#ifdef __CUDA_ARCH__
  sincos(static_cast<double>(angle), &sd, &cd);
#else
  sd = std::sin(static_cast<double>(angle));
  cd = std::cos(static_cast<double>(angle));
#endif
  *c = static_cast<acc_t>(cd);
  *s = inverse ? -static_cast<acc_t>(sd) : static_cast<acc_t>(sd);
}

// (even, odd) -> (even * c - odd * s, even * s + odd * c)
template <typename acc_t>
BR_HOST_DEVICE inline void rotate(acc_t even, acc_t odd, acc_t c, acc_t s, acc_t* out_even,
                                  acc_t* out_odd) {
  *out_even = mul<acc_t>(even, c) - mul<acc_t>(odd, s);
  *out_odd = mul<acc_t>(even, s) + mul<acc_t>(odd, c);
}

}  // namespace rope
}  // namespace blossomrec
