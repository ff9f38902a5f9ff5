// The fused tensor-core path of sparse_attention_fwd / _bwd (float16 / bfloat16, sequences of at
// most fused_max_len() tokens): what sparse_attention_{fwd,bwd}.cu call. Kernels and the reasons for
// their layout: fused_attention.cu.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {

// The longest sequence the fused kernels take for these inputs in the forward or the backward, 0
// when they take none (float32, a GPU older than sm_80). Sequences up to 1024 tokens (a 64-bit
// mask of 16-key tiles per query tile; the forward at D = 16 up to 256, where the row forward is
// faster beyond) with at most 64 selection blocks (a 64-bit mask of blocks per row). The two
// passes may take different kernels: both write and read the same saved tensors.
int64_t fused_max_len(at::ScalarType dtype, int64_t head_dim, int64_t select_block, bool backward);

// Which kernels a call takes. Padded batches (Bq == B) go wholly to the fused kernels when
// N <= max_len, else wholly to the row kernels. Packed batches take the fused kernels for their
// sequences of at most max_len tokens and the row kernels (told to skip those rows) for the rest
// and for the padding rows.
struct FusedPlan {
  int64_t max_len = 0;    // 0: no fused kernels
  bool row_kernels = true;
};

FusedPlan plan_fused(const Dims& d, at::ScalarType dtype, int64_t select_block, bool backward);

void fused_forward(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                   int64_t max_len, const at::Tensor& seq_len, cudaStream_t stream);

// The backward of the fused sequences: at D <= 32 those of at most 64 tokens in one CTA each
// (fused_seq_bwd_kernel: dgates, dq, dk, dv; no aux; BLOSSOMREC_SEQ_BWD), the others by the dq
// kernel (dgates, dq, aux) and the dk/dv kernel. aux: the caller's, every head (the row kernels
// run too), or null: the dq and dk/dv kernels then use their own, a chunk of kv groups per launch
// where that keeps the GPU busy (BLOSSOMREC_BWD_GROUPS), so that their mask words and aux exist
// for one chunk at a time.
void fused_backward(const AttnParams& p, const BwdIn& in, Aux* aux, void* dq, void* dk, void* dv,
                    const Dims& d, at::ScalarType dtype, int64_t max_len, const at::Tensor& seq_len,
                    cudaStream_t stream);

// Whether long_dkdv_kernel can run here: its shared memory (two stages per warp, G x tiles warps)
// within the card's per-CTA limit (sm_86 / sm_89: 99 KiB, less than D = 128 with 8 warps takes)
// and positions within int32.
bool fused_long_dkdv_fits(const Dims& d);

// dk and dv of the sequences longer than min_len on tensor cores (long_dkdv_kernel: a warp per
// 16-key tile and head, the selecting queries gathered into 16-row tiles), after the row kernels'
// dq pass wrote aux; inv_rows / inv_offsets: the inverted selection index of that pass. Padded
// batches: the kernel zeroes its sequences' padding rows; packed ones: dk and dv arrive zeroed.
void fused_long_dkdv(const AttnParams& p, const BwdIn& in, const Aux* aux, const int32_t* inv_rows,
                     const int32_t* inv_offsets, void* dk, void* dv, const Dims& d,
                     at::ScalarType dtype, int64_t min_len, const at::Tensor& seq_len,
                     cudaStream_t stream);

// Whether the tensor-core row kernels of long_attention.cu (a warp per query row and kv group, the
// G heads as the rows of the products, the row's keys gathered 16 at a time) take the forward
// (long_fwd_kernel) or the backward's dq pass (long_dq_kernel) of the rows the fused kernels
// leave: float16 / bfloat16, D = 32 and 64, sm_80 and newer (BLOSSOMREC_LONG_FWD / _DQ = 0: the
// row kernels; = 1: also at D = 16, where the row kernels are faster).
bool long_rows_fit(const Dims& d, at::ScalarType dtype, bool backward);

// The forward of every valid row of a sequence longer than p.skip_len, and zeros in the padding
// rows (what the row forward kernel does).
void long_forward(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                  cudaStream_t stream);

// dq, aux and the gate gradient of the same rows (what the row dq kernel does), zeros in padding
// rows.
void long_dq(const AttnParams& p, const BwdIn& in, Aux* aux, void* dq, const Dims& d,
             at::ScalarType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace blossomrec
