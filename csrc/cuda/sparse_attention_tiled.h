// The tensor-core forward (sparse_attention_fwd_tiled.cu): query tiles with mma.sync. The forward
// entry point (sparse_attention_fwd.cu) takes it when fwd_tiled_eligible says so and the row
// kernels otherwise.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "common/checks.h"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {

// float16 / bfloat16, power block 1, selection width <= 16, G <= 8, sm_80+, and
// BLOSSOMREC_TILED is not "0" (read on every call: tests and benchmarks switch paths with it).
bool fwd_tiled_eligible(const Dims& d, at::ScalarType dtype, int64_t power_block, int64_t width,
                        int64_t window);

// Writes every output row (padding rows as zeros).
void launch_fwd_tiled(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                      const at::Tensor& seq_start, const at::Tensor& seq_len, cudaStream_t stream);

}  // namespace cuda
}  // namespace blossomrec
