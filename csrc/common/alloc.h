// Output allocation shared by the CPU and CUDA entry points.
//
// Outputs come from at::empty. With BLOSSOMREC_POISON_OUTPUTS=1 in the environment (the tests'
// fixture sets it) they are filled with NaN (floating) or a sentinel (integer) first, so that an
// element a kernel forgets to write fails a test instead of passing by luck.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace blossomrec {

constexpr int32_t kPoisonInt = -777777;

inline bool poison_outputs() {
  const char* v = std::getenv("BLOSSOMREC_POISON_OUTPUTS");
  return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
}

inline at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs()) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(kPoisonInt);
    }
  }
  return t;
}

}  // namespace blossomrec
