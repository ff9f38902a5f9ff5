// The tensor-core forward (sparse_attention_fwd_tiled.cu): query tiles with mma.sync. The forward
// entry point (sparse_attention_fwd.cu) takes it when fwd_tiled_eligible says so and the row
// kernels otherwise. Opt-in (BLOSSOMREC_TILED=1): slower than the row kernels on the PERF.md
// shapes (the union of 16 rows' selections is far larger than one row's), docs/PERF_NOTES.md.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "common/checks.h"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {

// BLOSSOMREC_TILED=1 (read on every call: tests and benchmarks switch paths with it), float16 /
// bfloat16, power block 1, selection width <= 16, G <= 8, sm_80+.
bool fwd_tiled_eligible(const Dims& d, at::ScalarType dtype, int64_t power_block, int64_t width,
                        int64_t window);

// Writes every output row (padding rows as zeros).
void launch_fwd_tiled(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                      const at::Tensor& seq_start, const at::Tensor& seq_len, cudaStream_t stream);

}  // namespace cuda
}  // namespace blossomrec
