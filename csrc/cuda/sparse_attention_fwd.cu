// blossomrec::sparse_attention_fwd on CUDA: selected-block attention (SPEC 1c), STIS attention
// (SPEC 2) and the gated combine (SPEC 3) in one kernel; out, both branch outputs and both lse are
// written once. float16 / bfloat16 sequences up to fused_max_len() take the tensor-core kernel of
// fused_attention.cu; the row kernels here serve the rest (sparse_attention.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "cuda/dispatch.h"
#include "cuda/fused_attention.cuh"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {
namespace {

// Padding rows: zeros everywhere.
template <typename T, int D>
__device__ __forceinline__ void fwd_padding_row(const AttnParams& p, const FwdOut& o,
                                                const RowThread& t) {
  const int64_t out_off = (t.r * p.H + t.h) * D + t.lane * kDimsPerLane;
  float zero[kDimsPerLane] = {};
  Vec16<T>::store(static_cast<T*>(o.out) + out_off, zero);
  Vec16<T>::store(static_cast<T*>(o.o_sel) + out_off, zero);
  Vec16<T>::store(static_cast<T*>(o.o_win) + out_off, zero);
  if (t.lane == 0) *reinterpret_cast<float2*>(o.lse + (t.r * p.H + t.h) * 2) = make_float2(0.f, 0.f);
}

// One (valid row, head) segment: both branches, both lse and the gated combine. Key j of the row's
// sequence is read at kbase + j * ks (v likewise): global memory, or shared memory when staged.
template <typename T, int D, typename KT>
__device__ __forceinline__ void fwd_row(const AttnParams& p, const FwdOut& o, const RowThread& t,
                                        const RowInfo& row, const KT* kbase, int64_t ks,
                                        const KT* vbase, int64_t vs) {
  constexpr int kLanes = D / kDimsPerLane;
  const int64_t out_off = (t.r * p.H + t.h) * D + t.lane * kDimsPerLane;
  float q[kDimsPerLane];
  Vec16<T>::load(static_cast<const T*>(p.q) + t.bq * p.q_sb + t.n * p.q_sn + t.h * p.q_sh +
                     t.lane * kDimsPerLane, q);
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) q[e] *= p.scale_log2;

  float acc[kDimsPerLane];
  float m = -INFINITY, l = 0.f;  // online softmax (base 2) of the current branch
  // Keys come in contiguous ranges; kChunk keys at a time keeps that many independent loads in
  // flight and needs one rescale of the accumulator per chunk.
  constexpr int kChunk = 4;
  auto attend = [&](int64_t lo, int64_t hi) {
    for (int64_t j0 = lo; j0 < hi; j0 += kChunk) {
      float s[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        float kv[kDimsPerLane];
        const int64_t j = j0 + c < hi ? j0 + c : hi - 1;  // a short tail repeats the last key...
        Vec16<KT>::load(kbase + j * ks, kv);
        s[c] = segment_sum<kLanes>(dot16(q, kv));
        if (j0 + c >= hi) s[c] = -INFINITY;  // ...with weight 0
      }
      float m_new = m;
#pragma unroll
      for (int c = 0; c < kChunk; ++c) m_new = fmaxf(m_new, s[c]);
      const float scale_old = exp2f(m - m_new);
      l *= scale_old;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) acc[e] *= scale_old;
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const int64_t j = j0 + c < hi ? j0 + c : hi - 1;
        float vv[kDimsPerLane];
        Vec16<KT>::load(vbase + j * vs, vv);
        const float w = exp2f(s[c] - m_new);
        l += w;
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) acc[e] = fmaf(w, vv[e], acc[e]);
      }
      m = m_new;
    }
  };

  // Selected branch.
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) acc[e] = 0.f;
  for_each_selected_range(p, t.r, t.g, row.i, row.L, attend);
  float sel[kDimsPerLane];
  const float inv_sel = 1.f / l;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) sel[e] = acc[e] * inv_sel;
  const float lse_sel = (m + log2f(l)) * kLn2;

  // STIS branch.
  m = -INFINITY;
  l = 0.f;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) acc[e] = 0.f;
  for_each_stis_range(row.i, row.L, p.stis, attend);
  float win[kDimsPerLane];
  const float inv_win = 1.f / l;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) win[e] = acc[e] * inv_win;
  const float lse_win = (m + log2f(l)) * kLn2;

  // Gated combine.
  const float2 gate = gate_pair<T>(p.gates, p.gates_f32, t.r * p.H + t.h);
  float comb[kDimsPerLane];
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) comb[e] = gate.x * sel[e] + gate.y * win[e];
  Vec16<T>::store(static_cast<T*>(o.out) + out_off, comb);
  Vec16<T>::store(static_cast<T*>(o.o_sel) + out_off, sel);
  Vec16<T>::store(static_cast<T*>(o.o_win) + out_off, win);
  if (t.lane == 0) {
    *reinterpret_cast<float2*>(o.lse + (t.r * p.H + t.h) * 2) = make_float2(lse_sel, lse_win);
  }
}

// Gather path: any layout; one segment per (row, head), keys read from global memory.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    sparse_attention_fwd_kernel(const AttnParams p, const FwdOut o) {
  constexpr int kLanes = D / kDimsPerLane;
  const RowThread t = row_thread<kLanes>(p);
  if (!t.active) return;
  const RowInfo row = row_info(p.seq, t.r);
  if (row.b < 0) return fwd_padding_row<T, D>(p, o, t);
  if (row.L <= p.skip_len) return;  // the fused kernel's row
  // Key j of this sequence sits at buffer row row.base + j.
  const int64_t n0 = row.base - t.bq * p.seq.N;
  const T* kbase = static_cast<const T*>(p.k) + t.bq * p.k_sb + n0 * p.k_sn + t.g * p.k_sh +
                   t.lane * kDimsPerLane;
  const T* vbase = static_cast<const T*>(p.v) + t.bq * p.v_sb + n0 * p.v_sn + t.g * p.v_sh +
                   t.lane * kDimsPerLane;
  fwd_row<T, D>(p, o, t, row, kbase, p.k_sn, vbase, p.v_sn);
}

// Staged path (sparse_attention.cuh): grid (Bq, KVH, splits); the sequence's k and v of the kv
// head are copied to shared memory once, then the CTA walks its rows.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    sparse_attention_fwd_staged_kernel(const AttnParams p, const FwdOut o) {
  constexpr int kLanes = D / kDimsPerLane;
  extern __shared__ __align__(16) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + p.seq.N * D;
  const int64_t bq = blockIdx.x, g = blockIdx.y;
  int64_t s, L;
  seq_bounds(p.seq, bq, &s, &L);
  stage_rows<T, D>(ks, static_cast<const T*>(p.k) + bq * p.k_sb + s * p.k_sn + g * p.k_sh,
                   p.k_sn, 0, L, 1);
  stage_rows<T, D>(vs, static_cast<const T*>(p.v) + bq * p.v_sb + s * p.v_sn + g * p.v_sh,
                   p.v_sn, 0, L, 1);
  __syncthreads();
  const int64_t rows_per_block = kAttnThreads / (p.G * kLanes);
  for (int64_t n = blockIdx.z * rows_per_block; n < p.seq.N; n += gridDim.z * rows_per_block) {
    const RowThread t = staged_row_thread<kLanes>(p, bq, n);
    if (!t.active) continue;
    const RowInfo row = staged_row_info(p, t, s, L);
    if (row.b < 0) {
      fwd_padding_row<T, D>(p, o, t);
      continue;
    }
    const int64_t lane_off = t.lane * kDimsPerLane;
    fwd_row<T, D>(p, o, t, row, ks + lane_off, D, vs + lane_off, D);
  }
}

template <typename T, int D>
void launch_fwd_typed(const AttnParams& p, const FwdOut& o, const Dims& d, cudaStream_t stream) {
  const int64_t smem = staged_kv_bytes(d, sizeof(T));
  if (smem > 0) {
    const int64_t rows_per_block = kAttnThreads / (p.G * (D / kDimsPerLane));
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const dim3 grid(unsigned(d.Bq), unsigned(d.KVH), staged_splits(d, rows_per_block, sms));
    auto kernel = sparse_attention_fwd_staged_kernel<T, D>;
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid, kAttnThreads, size_t(smem), stream>>>(p, o);
  } else {
    sparse_attention_fwd_kernel<T, D><<<attn_grid<D / kDimsPerLane>(p), kAttnThreads, 0, stream>>>(p, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Shared with the backward (sparse_attention_bwd.cu): fills AttnParams from checked inputs.
AttnParams make_attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& gates_k, const at::Tensor& sel_idx,
                            const at::Tensor& sel_cnt, const at::Tensor& seq_start,
                            const at::Tensor& seq_len, const Dims& d, int64_t select_block,
                            int64_t window, int64_t power_block, bool use_power, bool use_sink,
                            bool causal, double scale) {
  BR_CHECK_TYPE(q.scalar_type() != at::kDouble,
                   "float64 runs on CPU only; the CUDA ops take float32, float16 or bfloat16");
  BR_CHECK(sel_idx.stride(-1) == 1, "sel_idx must have a contiguous last dimension");
  BR_CHECK(seq_start.is_contiguous() && seq_len.is_contiguous(),
              "seq_start and seq_len must be contiguous");
  BR_CHECK(gates_k.is_contiguous() && (gates_k.scalar_type() == at::kFloat ||
                                           gates_k.scalar_type() == q.scalar_type()),
              "internal: gates must be contiguous float32 or q's dtype (kernel_gates)");
  AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0); p.q_sn = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = k.stride(0); p.k_sn = k.stride(1); p.k_sh = k.stride(2);
  p.v_sb = v.stride(0); p.v_sn = v.stride(1); p.v_sh = v.stride(2);
  p.gates = gates_k.data_ptr();
  p.gates_f32 = gates_k.scalar_type() == at::kFloat;
  p.sel_idx = sel_idx.data_ptr<int32_t>();
  p.sel_cnt = sel_cnt.data_ptr<int32_t>();
  p.sel_sb = sel_idx.stride(0); p.sel_sn = sel_idx.stride(1); p.sel_sh = sel_idx.stride(2);
  p.cnt_sb = sel_cnt.stride(0); p.cnt_sn = sel_cnt.stride(1); p.cnt_sh = sel_cnt.stride(2);
  p.width = sel_idx.size(3);
  p.seq = SeqParams{seq_start.data_ptr<int32_t>(), seq_len.data_ptr<int32_t>(), d.B, d.Bq, d.N};
  p.stis = StisParams{window, power_block, use_power, use_sink, causal};
  p.H = d.H;
  p.KVH = d.KVH;
  p.G = d.G;
  p.select_block = select_block;
  p.scale = float(scale);
  p.scale_log2 = float(scale) * kLog2e;
  p.skip_len = 0;
  return p;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& gates,
    const at::Tensor& sel_idx, const at::Tensor& sel_cnt, const at::Tensor& seq_start,
    const at::Tensor& seq_len, int64_t select_block, int64_t window, int64_t power_block,
    bool use_power, bool use_sink, bool causal, double scale) {
  const Dims d = check_attention_inputs(q_in, k_in, v_in, gates, sel_idx, sel_cnt, seq_start,
                                        seq_len, select_block, window, power_block, use_sink,
                                        causal);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vec_aligned(q_in), k = vec_aligned(k_in), v = vec_aligned(v_in);
  const at::Tensor gates_k = kernel_gates(gates, q);
  const at::Tensor st = seq_start.contiguous(), ln = seq_len.contiguous();
  const AttnParams p = make_attn_params(q, k, v, gates_k, sel_idx, sel_cnt, st, ln, d,
                                        select_block, window, power_block, use_power, use_sink,
                                        causal, scale);
  at::Tensor out = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor o_sel = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor o_win = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor lse = alloc_output({d.Bq, d.N, d.H, 2}, q.options().dtype(at::kFloat));
  if (d.Bq * d.N == 0) return {out, o_sel, o_win, lse};
  const FwdOut o{out.data_ptr(), o_sel.data_ptr(), o_win.data_ptr(), lse.data_ptr<float>()};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const FusedPlan plan = plan_fused(d, q.scalar_type(), select_block, /*backward=*/false);
  if (plan.max_len > 0) fused_forward(p, o, d, q.scalar_type(), plan.max_len, ln, stream);
  if (plan.row_kernels) {
    AttnParams pr = p;
    pr.skip_len = plan.max_len;
    if (long_rows_fit(d, q.scalar_type(), /*backward=*/false)) {
      long_forward(pr, o, d, q.scalar_type(), stream);
    } else {
      BR_DTYPE_SWITCH(q.scalar_type(), [&] {
        BR_HEADDIM_SWITCH(d.D, [&] { launch_fwd_typed<scalar_t, kHeadDim>(pr, o, d, stream); });
      });
    }
  }
  return {out, o_sel, o_win, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) {
  m.impl("sparse_attention_fwd", &blossomrec::cuda::sparse_attention_fwd_cuda);
}
