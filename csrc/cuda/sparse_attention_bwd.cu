// blossomrec::sparse_attention_bwd on CUDA: dq, dk, dv and dgates of the fused sparse attention,
// deterministic (no floating-point atomics; every sum runs in a fixed order).
//
// Pass 1 (query-centric, one segment per (row, head), the forward's layout): the gate gradients
// <dout, o_sel> and <dout, o_win> (with each branch's gate, lse and softmax correction
// delta = gate * <dout, o>, kept in float32 for pass 3), then dq over the row's two key sets, recomputing the probabilities
// from the saved lse.
// Pass 2: the inverted selection index. For every valid (row, kv head, slot) a key names the
// selected block (kv head, buffer row of the block's first token); a stable sort groups the rows
// that selected each block in increasing row order, and searchsorted gives each block's range.
// Pass 3 (key-centric, one segment per (key row, head), the G heads' partial sums then added in head
// order): dk and dv gather from the queries of the key's own block, the queries that selected its
// block (pass 2) and the STIS queries, whose set inverts analytically (key j is seen by j + d).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {
namespace {

struct BwdIn {
  const void* dout;   // [rows, H, D] contiguous
  const void* o_sel;  // [rows, H, D] contiguous
  const void* o_win;  // [rows, H, D] contiguous
  const float* lse;   // [rows, H, 2] contiguous
};

// ---------------------------------------------------------------------------------------------
// Pass 1: dgates and dq
// ---------------------------------------------------------------------------------------------
// Per (row, head, branch) what pass 3 needs of a query, in one 16-byte load:
// {gate, lse in base 2, delta = gate * <dout, o_branch>, <dout, o_branch>}.
using Aux = float4;

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    bwd_dq_kernel(const AttnParams p, const BwdIn in, Aux* aux, T* dq_out) {
  constexpr int kLanes = D / kDimsPerLane;
  const RowThread t = row_thread<kLanes>(p);
  if (!t.active) return;
  const int64_t rh = t.r * p.H + t.h;
  const int64_t off = rh * D + t.lane * kDimsPerLane;
  T* dq = dq_out + off;
  const RowInfo row = row_info(p.seq, t.r);
  if (row.b < 0) {
    float zero[kDimsPerLane] = {};
    Vec16<T>::store(dq, zero);
    if (t.lane == 0) aux[rh * 2] = aux[rh * 2 + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
    return;
  }
  float q[kDimsPerLane], dout[kDimsPerLane], tmp[kDimsPerLane];
  Vec16<T>::load(static_cast<const T*>(p.q) + t.bq * p.q_sb + t.n * p.q_sn + t.h * p.q_sh +
                     t.lane * kDimsPerLane, q);
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) q[e] *= p.scale_log2;
  Vec16<T>::load(static_cast<const T*>(in.dout) + off, dout);
  Vec16<T>::load(static_cast<const T*>(in.o_sel) + off, tmp);
  const float dot_sel = segment_sum<kLanes>(dot16(dout, tmp));
  Vec16<T>::load(static_cast<const T*>(in.o_win) + off, tmp);
  const float dot_win = segment_sum<kLanes>(dot16(dout, tmp));
  const float2 gate = *reinterpret_cast<const float2*>(p.gates + rh * 2);
  const float2 lse = *reinterpret_cast<const float2*>(in.lse + rh * 2);
  if (t.lane == 0) {
    aux[rh * 2] = make_float4(gate.x, lse.x * kLog2e, gate.x * dot_sel, dot_sel);
    aux[rh * 2 + 1] = make_float4(gate.y, lse.y * kLog2e, gate.y * dot_win, dot_win);
  }
  const int64_t n0 = row.base - t.bq * p.seq.N;
  const T* kbase = static_cast<const T*>(p.k) + t.bq * p.k_sb + n0 * p.k_sn + t.g * p.k_sh +
                   t.lane * kDimsPerLane;
  const T* vbase = static_cast<const T*>(p.v) + t.bq * p.v_sb + n0 * p.v_sn + t.g * p.v_sh +
                   t.lane * kDimsPerLane;

  float acc[kDimsPerLane];
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) acc[e] = 0.f;
  float gate_b, lse2_b, delta_b;
  // ds = p * (dp - delta) with dp = gate * <dout, v_j>: the gradient of the branch logit. The keys
  // are independent (lse is known), so kChunk of them are loaded before any is used.
  constexpr int kChunk = 2;
  auto grad = [&](int64_t lo, int64_t hi) {
    for (int64_t j0 = lo; j0 < hi; j0 += kChunk) {
      float kv[kChunk][kDimsPerLane], vv[kChunk][kDimsPerLane];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const int64_t j = j0 + c < hi ? j0 + c : hi - 1;
        Vec16<T>::load(kbase + j * p.k_sn, kv[c]);
        Vec16<T>::load(vbase + j * p.v_sn, vv[c]);
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const float s = segment_sum<kLanes>(dot16(q, kv[c]));
        const float pw = j0 + c < hi ? exp2f(s - lse2_b) : 0.f;
        const float dp = gate_b * segment_sum<kLanes>(dot16(dout, vv[c]));
        const float ds = pw * (dp - delta_b);
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) acc[e] = fmaf(ds, kv[c][e], acc[e]);
      }
    }
  };
  gate_b = gate.x;
  lse2_b = lse.x * kLog2e;
  delta_b = gate.x * dot_sel;
  for_each_selected_range(p, t.r, t.g, row.i, row.L, grad);
  gate_b = gate.y;
  lse2_b = lse.y * kLog2e;
  delta_b = gate.y * dot_win;
  for_each_stis_range(row.i, row.L, p.stis, grad);
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) acc[e] *= p.scale;
  Vec16<T>::store(dq, acc);
}

// ---------------------------------------------------------------------------------------------
// Pass 2: keys of the inverted selection index
// ---------------------------------------------------------------------------------------------
__global__ void selection_keys_kernel(const AttnParams p, int64_t* keys) {
  const int64_t rows = p.seq.Bq * p.seq.N;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * p.KVH * p.width) return;
  const int64_t c = e % p.width;
  const int64_t g = (e / p.width) % p.KVH;
  const int64_t r = e / (p.width * p.KVH);
  int64_t key = p.KVH * rows;  // sentinel: sorts after every real block
  const RowInfo row = row_info(p.seq, r);
  if (row.b >= 0) {
    const int64_t bq = r / p.seq.N, n = r - bq * p.seq.N;
    const int64_t cnt = p.sel_cnt[bq * p.cnt_sb + n * p.cnt_sn + g * p.cnt_sh];
    if (c < cnt) {
      const int64_t J = p.sel_idx[bq * p.sel_sb + n * p.sel_sn + g * p.sel_sh + c];
      // The same filter as for_each_selected_range, so both passes agree on the key sets.
      if (block_visible(J, row.i, row.L / p.select_block, p.select_block, p.stis.causal)) {
        key = g * rows + row.base + J * p.select_block;
      }
    }
  }
  keys[e] = key;
}

// ---------------------------------------------------------------------------------------------
// Pass 3: dk and dv
// ---------------------------------------------------------------------------------------------
struct Inverted {
  const int64_t* rows;     // entry -> the buffer row of a query that selected the block
  const int64_t* offsets;  // [KVH * rows + 1]: block key -> first entry
};

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    bwd_dkdv_kernel(const AttnParams p, const BwdIn in, const Aux* aux, const Inverted inv,
                    T* dk_out, T* dv_out) {
  // The forward's layout with key rows for query rows: one segment per (key row, head of the
  // group) sums that head's contributions, then the G partial sums of a key are added in head
  // order through shared memory (fixed order: deterministic). G threads per key shorten the serial
  // walk over a popular block's queries G times.
  constexpr int kLanes = D / kDimsPerLane;
  __shared__ float partial[2 * kDimsPerLane][kAttnThreads];  // [element][thread]: no bank conflicts
  const RowThread t = row_thread<kLanes>(p);
  const RowInfo row = t.active ? row_info(p.seq, t.r) : RowInfo{-1, 0, 0, 0};
  float dk[kDimsPerLane], dv[kDimsPerLane];
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) dk[e] = dv[e] = 0.f;

  if (row.b >= 0) {
    float k[kDimsPerLane], v[kDimsPerLane];
    Vec16<T>::load(static_cast<const T*>(p.k) + t.bq * p.k_sb + t.n * p.k_sn + t.g * p.k_sh +
                       t.lane * kDimsPerLane, k);
    Vec16<T>::load(static_cast<const T*>(p.v) + t.bq * p.v_sb + t.n * p.v_sn + t.g * p.v_sh +
                       t.lane * kDimsPerLane, v);
    // Adds what query i (same sequence), head t.h, sends to this key through branch br
    // (0 selected, 1 STIS).
    // Query i of this sequence: buffer row row.base + i, in the key's batch entry t.bq (no
    // division in the loop).
    const T* qbase = static_cast<const T*>(p.q) + t.bq * p.q_sb + (row.base - t.bq * p.seq.N) * p.q_sn +
                     t.h * p.q_sh + t.lane * kDimsPerLane;
    auto add_query = [&](int64_t i, int br) {
      const int64_t rh = (row.base + i) * p.H + t.h;
      float q[kDimsPerLane], dout[kDimsPerLane];
      Vec16<T>::load(qbase + i * p.q_sn, q);
      Vec16<T>::load(static_cast<const T*>(in.dout) + rh * D + t.lane * kDimsPerLane, dout);
      const Aux a = aux[rh * 2 + br];  // {gate, lse2, delta, -}
      const float s = segment_sum<kLanes>(dot16(q, k)) * p.scale_log2;
      const float pw = exp2f(s - a.y);
      const float dp = a.x * segment_sum<kLanes>(dot16(dout, v));
      const float ds = pw * (dp - a.z);
      const float pg = pw * a.x;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) {
        dv[e] = fmaf(pg, dout[e], dv[e]);
        dk[e] = fmaf(ds, q[e], dk[e]);
      }
    };
    const int64_t j = row.i;
    const int64_t bsz = p.select_block;
    const int64_t block = j / bsz;
    // Own block: the queries whose own range holds j.
    {
      const int64_t lo = p.stis.causal ? j : block * bsz;
      const int64_t end = (block + 1) * bsz;
      const int64_t hi = end < row.L ? end : row.L;
      for (int64_t i = lo; i < hi; ++i) add_query(i, 0);
    }
    // Queries that selected this key's block (pass 2), in increasing row order.
    {
      const int64_t key = t.g * p.seq.Bq * p.seq.N + row.base + block * bsz;
      const int64_t e1 = inv.offsets[key + 1];
      for (int64_t e = inv.offsets[key]; e < e1; ++e) add_query(inv.rows[e] - row.base, 0);
    }
    // STIS queries.
    for_each_stis_query_range(j, row.L, p.stis, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) add_query(i, 1);
    });
  }
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) {
    partial[e][threadIdx.x] = dk[e];
    partial[kDimsPerLane + e][threadIdx.x] = dv[e];
  }
  __syncthreads();
  const int64_t hg = t.h - t.g * p.G;
  if (!t.active || hg != 0) return;
  // Head 0's segment adds the group's partials in head order and writes the key row.
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) dk[e] = dv[e] = 0.f;
  for (int64_t h = 0; h < p.G; ++h) {
    const int src = threadIdx.x + int(h) * kLanes;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) {
      dk[e] += partial[e][src];
      dv[e] += partial[kDimsPerLane + e][src];
    }
  }
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) dk[e] *= p.scale;
  const int64_t off = (t.r * p.KVH + t.g) * D + t.lane * kDimsPerLane;
  Vec16<T>::store(dk_out + off, dk);  // padding rows: zeros
  Vec16<T>::store(dv_out + off, dv);
}

template <typename T, int D>
void launch_bwd(const AttnParams& p, const BwdIn& in, Aux* aux, const Inverted& inv,
                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, cudaStream_t stream) {
  const dim3 grid = attn_grid<D / kDimsPerLane>(p);
  bwd_dq_kernel<T, D><<<grid, kAttnThreads, 0, stream>>>(p, in, aux, static_cast<T*>(dq.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bwd_dkdv_kernel<T, D><<<grid, kAttnThreads, 0, stream>>>(
      p, in, aux, inv, static_cast<T*>(dk.data_ptr()), static_cast<T*>(dv.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D>
void launch_bwd_dtype(at::ScalarType dtype, const AttnParams& p, const BwdIn& in, Aux* aux,
                      const Inverted& inv, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                      cudaStream_t stream) {
  switch (dtype) {
    case at::kFloat: launch_bwd<float, D>(p, in, aux, inv, dq, dk, dv, stream); break;
    case at::kHalf: launch_bwd<__half, D>(p, in, aux, inv, dq, dk, dv, stream); break;
    case at::kBFloat16: launch_bwd<__nv_bfloat16, D>(p, in, aux, inv, dq, dk, dv, stream); break;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gates, const at::Tensor& o_sel, const at::Tensor& o_win,
    const at::Tensor& lse, const at::Tensor& sel_idx, const at::Tensor& sel_cnt,
    const at::Tensor& seq_start, const at::Tensor& seq_len, int64_t select_block, int64_t window,
    int64_t power_block, bool use_power, bool use_sink, bool causal, double scale) {
  const Dims d = check_attention_inputs(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len,
                                        select_block, window, power_block, use_sink, causal);
  check_saved(dout, q, d, "dout");
  check_saved(o_sel, q, d, "o_sel");
  check_saved(o_win, q, d, "o_win");
  BR_CHECK_SHAPE(lse, d.Bq, d.N, d.H, 2);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor gates_f = gates.to(at::kFloat).contiguous();
  const at::Tensor st = seq_start.contiguous(), ln = seq_len.contiguous();
  const AttnParams p = make_attn_params(q, k, v, gates_f, sel_idx, sel_cnt, st, ln, d,
                                        select_block, window, power_block, use_power, use_sink,
                                        causal, scale);
  const at::Tensor dout_c = dout.contiguous(), o_sel_c = o_sel.contiguous(),
                   o_win_c = o_win.contiguous(), lse_c = lse.contiguous();
  const BwdIn in{dout_c.data_ptr(), o_sel_c.data_ptr(), o_win_c.data_ptr(), lse_c.data_ptr<float>()};

  at::Tensor dq = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor dk = alloc_output({d.Bq, d.N, d.KVH, d.D}, k.options());
  at::Tensor dv = alloc_output({d.Bq, d.N, d.KVH, d.D}, v.options());
  const int64_t rows = d.Bq * d.N;
  if (rows == 0) return {dq, dk, dv, alloc_output(gates.sizes(), gates.options())};
  at::Tensor aux = at::empty({d.Bq, d.N, d.H, 2, 4}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Pass 2 first: it only reads the selection.
  const int64_t entries = rows * d.KVH * p.width;
  at::Tensor keys = at::empty({entries}, q.options().dtype(at::kLong));
  selection_keys_kernel<<<unsigned(ceil_div(entries, 256)), 256, 0, stream>>>(p, keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_keys = std::get<0>(sorted);
  // The sort's permutation indexes (row, kv head, slot) entries: keep the row.
  const at::Tensor q_rows = std::get<1>(sorted).div(d.KVH * p.width, "floor");
  const at::Tensor offsets =
      at::searchsorted(sorted_keys, at::arange(d.KVH * rows + 1, keys.options()));
  const Inverted inv{q_rows.data_ptr<int64_t>(), offsets.data_ptr<int64_t>()};

  Aux* aux_p = reinterpret_cast<Aux*>(aux.data_ptr<float>());
  switch (d.D) {
    case 16: launch_bwd_dtype<16>(q.scalar_type(), p, in, aux_p, inv, dq, dk, dv, stream); break;
    case 32: launch_bwd_dtype<32>(q.scalar_type(), p, in, aux_p, inv, dq, dk, dv, stream); break;
    case 64: launch_bwd_dtype<64>(q.scalar_type(), p, in, aux_p, inv, dq, dk, dv, stream); break;
    case 128: launch_bwd_dtype<128>(q.scalar_type(), p, in, aux_p, inv, dq, dk, dv, stream); break;
    default: TORCH_CHECK(false, "unsupported head dim ", d.D);
  }
  at::Tensor dgates = aux.select(-1, 3).to(gates.scalar_type()).contiguous();
  return {dq, dk, dv, dgates};
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) {
  m.impl("sparse_attention_bwd", &blossomrec::cuda::sparse_attention_bwd_cuda);
}
