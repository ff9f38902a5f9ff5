// blossomrec::sparse_attention_bwd on CUDA: dq, dk, dv and dgates of the fused sparse attention,
// deterministic (no floating-point atomics; every sum runs in a fixed order). float16 / bfloat16
// sequences up to fused_max_len() take the tensor-core kernels of fused_attention.cu; the row
// kernels here serve the rest:
//
// Pass 1 (query-centric, one segment per (row, head), the forward's layout): the gate gradients
// <dout, o_sel> and <dout, o_win> (with each branch's gate, lse and softmax correction
// delta = gate * <dout, o>, kept in float32 for pass 3), then dq over the row's two key sets,
// recomputing the probabilities from the saved lse.
// Pass 2: the inverted selection index. For every valid (row, kv head, slot) a 32-bit key names the
// selected block (kv head, buffer row of the block's first token); a stable radix sort groups the
// rows that selected each block in increasing row order, and an exclusive scan of the keys'
// counts gives each block's range.
// Pass 3 (key-centric, one segment per (key row, head), the G heads' partial sums then added in head
// order): dk and dv gather from the queries of the key's own block, the queries that selected its
// block (pass 2) and the STIS queries, whose set inverts analytically (key j is seen by j + d).
// Short padded sequences take staged passes 1 and 3 (sparse_attention.cuh): the rows every thread
// of a CTA reads sit in shared memory, and pass 3 builds its sequence's selection lists there, in
// the order of pass 2, which is then skipped.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/cub.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/alloc.h"
#include "common/checks.h"
#include "cuda/dispatch.h"
#include "cuda/fused_attention.cuh"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Pass 1: dgates and dq
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void dq_padding_row(const AttnParams& p, const BwdIn& in, Aux* aux,
                                               T* dq_out, const RowThread& t) {
  const int64_t rh = t.r * p.H + t.h;
  float zero[kDimsPerLane] = {};
  Vec16<T>::store(dq_out + rh * D + t.lane * kDimsPerLane, zero);
  if (t.lane == 0) {
    // no aux where the fused kernels take every sequence (the row kernels only zero padding)
    if (aux != nullptr) aux[rh * 2] = aux[rh * 2 + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
    store_gate_pair<T>(in.dgates, in.dgates_f32, rh, 0.f, 0.f);
  }
}

// One (valid row, head) segment of pass 1. Key j of the row's sequence is read at kbase + j * ks
// (v likewise): global memory, or shared memory when staged.
template <typename T, int D, typename KT>
__device__ __forceinline__ void dq_row(const AttnParams& p, const BwdIn& in, Aux* aux, T* dq_out,
                                       const RowThread& t, const RowInfo& row, const KT* kbase,
                                       int64_t ks, const KT* vbase, int64_t vs) {
  constexpr int kLanes = D / kDimsPerLane;
  const int64_t rh = t.r * p.H + t.h;
  const int64_t off = rh * D + t.lane * kDimsPerLane;
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
  const float2 gate = gate_pair<T>(p.gates, p.gates_f32, rh);
  const float2 lse = *reinterpret_cast<const float2*>(in.lse + rh * 2);
  if (t.lane == 0) {
    aux[rh * 2] = make_float4(gate.x, lse.x * kLog2e, gate.x * dot_sel, dot_sel);
    aux[rh * 2 + 1] = make_float4(gate.y, lse.y * kLog2e, gate.y * dot_win, dot_win);
    store_gate_pair<T>(in.dgates, in.dgates_f32, rh, dot_sel, dot_win);
  }

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
        Vec16<KT>::load(kbase + j * ks, kv[c]);
        Vec16<KT>::load(vbase + j * vs, vv[c]);
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
  Vec16<T>::store(dq_out + off, acc);
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    bwd_dq_kernel(const AttnParams p, const BwdIn in, Aux* aux, T* dq_out) {
  constexpr int kLanes = D / kDimsPerLane;
  const RowThread t = row_thread<kLanes>(p);
  if (!t.active) return;
  const RowInfo row = row_info(p.seq, t.r);
  if (row.b < 0) return dq_padding_row<T, D>(p, in, aux, dq_out, t);
  if (row.L <= p.skip_len) return;  // the fused kernels' row
  const int64_t n0 = row.base - t.bq * p.seq.N;
  const T* kbase = static_cast<const T*>(p.k) + t.bq * p.k_sb + n0 * p.k_sn + t.g * p.k_sh +
                   t.lane * kDimsPerLane;
  const T* vbase = static_cast<const T*>(p.v) + t.bq * p.v_sb + n0 * p.v_sn + t.g * p.v_sh +
                   t.lane * kDimsPerLane;
  dq_row<T, D>(p, in, aux, dq_out, t, row, kbase, p.k_sn, vbase, p.v_sn);
}

// Staged pass 1 (sparse_attention.cuh): the forward's staged layout.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    bwd_dq_staged_kernel(const AttnParams p, const BwdIn in, Aux* aux, T* dq_out) {
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
      dq_padding_row<T, D>(p, in, aux, dq_out, t);
      continue;
    }
    const int64_t lane_off = t.lane * kDimsPerLane;
    dq_row<T, D>(p, in, aux, dq_out, t, row, ks + lane_off, D, vs + lane_off, D);
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: keys of the inverted selection index
// ---------------------------------------------------------------------------------------------
// One key per (row, kv head, slot) entry and the entry's row, in entry order (rows ascending), and
// per key the number of its entries (integer atomics: the counts do not depend on their order).
__global__ void selection_keys_kernel(const AttnParams p, int32_t* keys, int32_t* q_rows,
                                      int32_t* counts) {
  const int64_t rows = p.seq.Bq * p.seq.N;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * p.KVH * p.width) return;
  const int64_t c = e % p.width;
  const int64_t g = (e / p.width) % p.KVH;
  const int64_t r = e / (p.width * p.KVH);
  int64_t key = p.KVH * rows;  // sentinel: sorts after every real block, never counted
  const RowInfo row = row_info(p.seq, r);
  if (row.b >= 0 && row.L > p.skip_len) {
    const int64_t bq = r / p.seq.N, n = r - bq * p.seq.N;
    const int64_t cnt = p.sel_cnt[bq * p.cnt_sb + n * p.cnt_sn + g * p.cnt_sh];
    if (c < cnt) {
      const int32_t* sel = p.sel_idx + bq * p.sel_sb + n * p.sel_sn + g * p.sel_sh;
      const int64_t J = sel[c];
      // The same filter as for_each_selected_range, so both passes agree on the key sets.
      if (block_visible(J, row.i, row.L / p.select_block, p.select_block, p.stis.causal) &&
          !listed_before(sel, c, J)) {
        key = g * rows + row.base + J * p.select_block;
        atomicAdd(counts + key, 1);
      }
    }
  }
  keys[e] = int32_t(key);
  q_rows[e] = int32_t(r);
}

// ---------------------------------------------------------------------------------------------
// Pass 3: dk and dv
// ---------------------------------------------------------------------------------------------
// Static shared memory of both dk/dv kernels (the head-order reduction's partial sums).
constexpr int64_t kDkdvStaticSmem = 2 * kDimsPerLane * kAttnThreads * sizeof(float);

struct Inverted {
  const int32_t* rows;     // entry -> the buffer row of a query that selected the block
  const int32_t* offsets;  // [KVH * rows + 1]: block key -> first entry
};

// One (valid key row, head) segment of pass 3: adds into dk, dv what every query of the key's
// sequence sends it through head t.h. Query i's q is read at qbase + i * qs and its dout at
// dbase + i * ds (global memory, or shared memory when staged); for_selected(f) calls f(i) for
// the queries that selected the key's block, in increasing i.
template <typename T, int D, typename ForSelected>
__device__ __forceinline__ void dkdv_row(const AttnParams& p, const Aux* aux, const RowThread& t,
                                         const RowInfo& row, const T* qbase, int64_t qs,
                                         const T* dbase, int64_t ds, ForSelected&& for_selected,
                                         float* dk, float* dv) {
  constexpr int kLanes = D / kDimsPerLane;
  float k[kDimsPerLane], v[kDimsPerLane];
  Vec16<T>::load(static_cast<const T*>(p.k) + t.bq * p.k_sb + t.n * p.k_sn + t.g * p.k_sh +
                     t.lane * kDimsPerLane, k);
  Vec16<T>::load(static_cast<const T*>(p.v) + t.bq * p.v_sb + t.n * p.v_sn + t.g * p.v_sh +
                     t.lane * kDimsPerLane, v);
  // Adds what query i (same sequence), head t.h, sends to this key through branch br
  // (0 selected, 1 STIS).
  const Aux* aux_h = aux + (row.base * p.H + t.h) * 2;
  auto add_query = [&](int64_t i, int br) {
    float q[kDimsPerLane], dout[kDimsPerLane];
    Vec16<T>::load(qbase + i * qs, q);
    Vec16<T>::load(dbase + i * ds, dout);
    dkdv_add_query<kLanes>(q, dout, k, v, aux_h[i * p.H * 2 + br], p.scale_log2, dk, dv);
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
  // Queries that selected this key's block, in increasing order.
  for_selected([&](int64_t i) { add_query(i, 0); });
  // STIS queries.
  for_each_stis_query_range(j, row.L, p.stis, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) add_query(i, 1);
  });
}

// The G partial sums of a key (one per head of the group, adjacent segments) are added in head
// order through shared memory (fixed order: deterministic) and head 0's segment writes the key
// row. Every thread of the CTA calls this (it synchronises).
template <typename T, int D>
__device__ __forceinline__ void dkdv_reduce_store(const AttnParams& p, const RowThread& t,
                                                  float (*partial)[kAttnThreads], float* dk,
                                                  float* dv, T* dk_out, T* dv_out,
                                                  bool store = true) {
  constexpr int kLanes = D / kDimsPerLane;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) {
    partial[e][threadIdx.x] = dk[e];
    partial[kDimsPerLane + e][threadIdx.x] = dv[e];
  }
  __syncthreads();
  const int64_t hg = t.h - t.g * p.G;
  if (t.active && hg == 0 && store) {
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
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    bwd_dkdv_kernel(const AttnParams p, const BwdIn in, const Aux* aux, const Inverted inv,
                    T* dk_out, T* dv_out) {
  // The forward's layout with key rows for query rows: one segment per (key row, head of the
  // group) sums that head's contributions, then the G partial sums of a key are added in head
  // order. G threads per key shorten the serial walk over a popular block's queries G times.
  __shared__ float partial[2 * kDimsPerLane][kAttnThreads];  // [element][thread]: no bank conflicts
  static_assert(sizeof(partial) == kDkdvStaticSmem, "kDkdvStaticSmem");
  const RowThread t = row_thread<D / kDimsPerLane>(p);
  const RowInfo row = t.active ? row_info(p.seq, t.r) : RowInfo{-1, 0, 0, 0};
  // The fused kernels' rows: computed and stored there (the barrier below still needs everyone).
  const bool skip = row.b >= 0 && row.L <= p.skip_len;
  float dk[kDimsPerLane], dv[kDimsPerLane];
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) dk[e] = dv[e] = 0.f;
  if (row.b >= 0 && !skip) {
    // Query i of this sequence: buffer row row.base + i, in the key's batch entry t.bq (no
    // division in the loop).
    const int64_t lane_off = t.lane * kDimsPerLane;
    const T* qbase = static_cast<const T*>(p.q) + t.bq * p.q_sb +
                     (row.base - t.bq * p.seq.N) * p.q_sn + t.h * p.q_sh + lane_off;
    const T* dbase = static_cast<const T*>(in.dout) + (row.base * p.H + t.h) * D + lane_off;
    const int64_t key = t.g * p.seq.Bq * p.seq.N + row.base + (row.i / p.select_block) * p.select_block;
    auto for_selected = [&](auto&& f) {  // pass 2's list of the block
      const int64_t e1 = inv.offsets[key + 1];
      for (int64_t e = inv.offsets[key]; e < e1; ++e) f(int64_t(inv.rows[e]) - row.base);
    };
    dkdv_row<T, D>(p, aux, t, row, qbase, p.q_sn, dbase, p.H * D, for_selected, dk, dv);
  }
  dkdv_reduce_store<T, D>(p, t, partial, dk, dv, dk_out, dv_out, !skip);
}

// Staged pass 3 (sparse_attention.cuh): grid (Bq, KVH, splits). Shared memory holds the
// sequence's q and dout of the group's G heads and the inverted selection lists of the sequence,
// built here in increasing query order (the order of pass 2's stable sort), so passes 2's global
// sort is not needed.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
    bwd_dkdv_staged_kernel(const AttnParams p, const BwdIn in, const Aux* aux, DkdvSmem layout,
                           T* dk_out, T* dv_out) {
  constexpr int kLanes = D / kDimsPerLane;
  __shared__ float partial[2 * kDimsPerLane][kAttnThreads];
  static_assert(sizeof(partial) == kDkdvStaticSmem, "kDkdvStaticSmem");
  extern __shared__ __align__(16) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + layout.q);
  T* dos = reinterpret_cast<T*>(smem + layout.dout);
  int32_t* list = reinterpret_cast<int32_t*>(smem + layout.list);
  int32_t* offsets = reinterpret_cast<int32_t*>(smem + layout.offsets);
  const int64_t bq = blockIdx.x, g = blockIdx.y;
  int64_t s, L;
  seq_bounds(p.seq, bq, &s, &L);
  stage_rows<T, D>(qs, static_cast<const T*>(p.q) + bq * p.q_sb + s * p.q_sn + g * p.G * p.q_sh,
                   p.q_sn, p.q_sh, L, p.G);
  stage_rows<T, D>(dos, static_cast<const T*>(in.dout) + ((bq * p.seq.N + s) * p.H + g * p.G) * D,
                   p.H * D, D, L, p.G);

  // Inverted selection lists of this (sequence, kv head): one warp per block J counts, then
  // (after a prefix sum over the blocks) lists, the queries i that selected J, 32 queries per step.
  const int64_t nb = L / p.select_block;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int32_t* sel = p.sel_idx + bq * p.sel_sb + s * p.sel_sn + g * p.sel_sh;
  const int32_t* cnt = p.sel_cnt + bq * p.cnt_sb + s * p.cnt_sn + g * p.cnt_sh;
  // Whether query i lists block J (once, however often a hand-made selection repeats it): the
  // filter of for_each_selected_range.
  auto times_selected = [&](int64_t i, int64_t J) {
    if (i >= L || !block_visible(J, i, nb, p.select_block, p.stis.causal)) return 0;
    const int64_t c_raw = cnt[i * p.cnt_sn];
    const int64_t c = c_raw < p.width ? c_raw : p.width;
    for (int64_t x = 0; x < c; ++x) {
      if (sel[i * p.sel_sn + x] == J) return 1;
    }
    return 0;
  };
  // Inclusive prefix sum over the warp's lanes.
  auto warp_scan = [&](int x) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(~0u, x, off);
      if (lane >= off) x += y;
    }
    return x;
  };
  for (int64_t J = warp; J < nb; J += warps) {
    int32_t count = 0;
    for (int64_t i0 = 0; i0 < L; i0 += 32) count += __shfl_sync(~0u, warp_scan(times_selected(i0 + lane, J)), 31);
    if (lane == 0) offsets[J + 1] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t J = 0; J < nb; ++J) offsets[J + 1] += offsets[J];
  }
  __syncthreads();
  for (int64_t J = warp; J < nb; J += warps) {
    int32_t pos = offsets[J];
    for (int64_t i0 = 0; i0 < L; i0 += 32) {
      const int hits = times_selected(i0 + lane, J);
      const int incl = warp_scan(hits);
      for (int x = 0; x < hits; ++x) list[pos + incl - hits + x] = int32_t(i0 + lane);
      pos += __shfl_sync(~0u, incl, 31);
    }
  }
  __syncthreads();

  const int64_t rows_per_block = kAttnThreads / (p.G * kLanes);
  for (int64_t n = blockIdx.z * rows_per_block; n < p.seq.N; n += gridDim.z * rows_per_block) {
    const RowThread t = staged_row_thread<kLanes>(p, bq, n);
    const RowInfo row = staged_row_info(p, t, s, L);
    float dk[kDimsPerLane], dv[kDimsPerLane];
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) dk[e] = dv[e] = 0.f;
    if (row.b >= 0) {
      const int64_t hg = t.h - t.g * p.G;
      const int64_t lane_off = hg * D + t.lane * kDimsPerLane;
      const int64_t J = row.i / p.select_block;
      auto for_selected = [&](auto&& f) {
        if (J >= nb) return;  // a partial block is never selected
        const int32_t e1 = offsets[J + 1];
        for (int32_t e = offsets[J]; e < e1; ++e) f(int64_t(list[e]));
      };
      dkdv_row<T, D>(p, aux, t, row, qs + lane_off, p.G * D, dos + lane_off, p.G * D,
                     for_selected, dk, dv);
    }
    dkdv_reduce_store<T, D>(p, t, partial, dk, dv, dk_out, dv_out);
    __syncthreads();  // partial is reused by the next rows
  }
}

// Which pass-1 / pass-3 kernels a call takes (sparse_attention.cuh): staged ones for short padded
// sequences, else the gather kernels; without a staged pass 3 the global inverted index is built.
struct BwdPlan {
  int64_t dq_smem;   // 0: gather kernel
  DkdvSmem dkdv;     // total 0: gather kernel, needs pass 2
};

template <typename T, int D>
void launch_bwd(const AttnParams& p, const Dims& d, const BwdPlan& plan, const BwdIn& in,
                Aux* aux, const Inverted& inv, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                bool with_dq, bool with_dkdv, cudaStream_t stream) {
  const dim3 grid = attn_grid<D / kDimsPerLane>(p);
  const int64_t rows_per_block = kAttnThreads / (p.G * (D / kDimsPerLane));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const dim3 staged_grid(unsigned(d.Bq), unsigned(d.KVH), staged_splits(d, rows_per_block, sms));
  T* dq_p = static_cast<T*>(dq.data_ptr());
  T* dk_p = static_cast<T*>(dk.data_ptr());
  T* dv_p = static_cast<T*>(dv.data_ptr());
  if (!with_dq) {
    // long_dq ran instead
  } else if (plan.dq_smem > 0) {
    auto kernel = bwd_dq_staged_kernel<T, D>;
    allow_dynamic_smem(kernel, plan.dq_smem);
    kernel<<<staged_grid, kAttnThreads, size_t(plan.dq_smem), stream>>>(p, in, aux, dq_p);
  } else {
    bwd_dq_kernel<T, D><<<grid, kAttnThreads, 0, stream>>>(p, in, aux, dq_p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!with_dkdv) return;
  if (plan.dkdv.total > 0) {
    auto kernel = bwd_dkdv_staged_kernel<T, D>;
    allow_dynamic_smem(kernel, plan.dkdv.total, kDkdvStaticSmem);
    kernel<<<staged_grid, kAttnThreads, size_t(plan.dkdv.total), stream>>>(p, in, aux, plan.dkdv,
                                                                           dk_p, dv_p);
  } else {
    bwd_dkdv_kernel<T, D><<<grid, kAttnThreads, 0, stream>>>(p, in, aux, inv, dk_p, dv_p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& gates, const at::Tensor& o_sel,
    const at::Tensor& o_win,
    const at::Tensor& lse, const at::Tensor& sel_idx, const at::Tensor& sel_cnt,
    const at::Tensor& seq_start, const at::Tensor& seq_len, int64_t select_block, int64_t window,
    int64_t power_block, bool use_power, bool use_sink, bool causal, double scale) {
  const Dims d = check_attention_inputs(q_in, k_in, v_in, gates, sel_idx, sel_cnt, seq_start,
                                        seq_len, select_block, window, power_block, use_sink,
                                        causal);
  check_saved(dout, q_in, d, "dout");
  check_saved(o_sel, q_in, d, "o_sel");
  check_saved(o_win, q_in, d, "o_win");
  const at::Tensor q = vec_aligned(q_in), k = vec_aligned(k_in), v = vec_aligned(v_in);
  check_lse(lse, q_in, d);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor gates_k = kernel_gates(gates, q);
  const at::Tensor st = seq_start.contiguous(), ln = seq_len.contiguous();
  const AttnParams p = make_attn_params(q, k, v, gates_k, sel_idx, sel_cnt, st, ln, d,
                                        select_block, window, power_block, use_power, use_sink,
                                        causal, scale);
  const at::Tensor dout_c = vec_aligned(dout.contiguous()),
                   o_sel_c = vec_aligned(o_sel.contiguous()),
                   o_win_c = vec_aligned(o_win.contiguous()), lse_c = aligned_f32(lse);
  // The gate gradient in the gates' dtype (float32 or q's), written by the dq kernels.
  at::Tensor dgates = alloc_output(gates.sizes(), gates.options().memory_format(at::MemoryFormat::Contiguous));
  const BwdIn in{dout_c.data_ptr(), o_sel_c.data_ptr(), o_win_c.data_ptr(), lse_c.data_ptr<float>(),
                 dgates.data_ptr(), dgates.scalar_type() == at::kFloat};

  const int64_t rows = d.Bq * d.N;
  if (rows == 0) {
    return {alloc_output({d.Bq, d.N, d.H, d.D}, q.options()),
            alloc_output({d.Bq, d.N, d.KVH, d.D}, k.options()),
            alloc_output({d.Bq, d.N, d.KVH, d.D}, v.options()), dgates};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const FusedPlan fused = plan_fused(d, q.scalar_type(), select_block, /*backward=*/true);
  // A packed buffer no longer than fused_max_len: every sequence is the fused kernels' (the row
  // kernels only zero its padding rows).
  const bool fused_takes_all = fused.max_len > 0 && d.N <= fused.max_len;
  // float16 / bfloat16 (sm_80 on): the dk/dv of the sequences the fused kernels do not take run
  // on tensor cores (fused_long_dkdv) after the row kernels' dq pass; not where the fused kernels
  // take every sequence, nor for a buffer without sequences.
  const bool long_dkdv = fused.row_kernels && d.B > 0 &&
                         fused_max_len(q.scalar_type(), d.D, select_block, true) > 0 &&
                         !fused_takes_all && fused_long_dkdv_fits(d);
  AttnParams pr = p;
  pr.skip_len = fused.max_len;
  const int64_t elem = q.element_size();
  const BwdPlan plan{staged_kv_bytes(d, elem),
                     long_dkdv ? DkdvSmem{} : staged_dkdv_smem(d, elem, p.width, select_block)};
  // Pass 2 (for the row kernels, unless pass 3 is staged and builds its lists itself, or the fused
  // kernels take every sequence): it only reads the selection, so it runs before dq, dk, dv and aux are allocated, and its keys, counts and
  // sort buffers are freed before they exist (they were the backward's peak at S4-S6).
  at::Tensor q_rows, offsets;
  Inverted inv{nullptr, nullptr};
  if (fused.row_kernels && plan.dkdv.total == 0 && !fused_takes_all) {
    // 32-bit keys (kv head, buffer row of the block's first token) and rows, a radix sort over
    // the key's bits only (stable: the rows of a block stay in increasing order, the order the
    // dk/dv passes sum in) and the block ranges from the keys' counts by an exclusive scan (v22:
    // a stable 64-bit at::sort, a division and a searchsorted before).
    const int64_t entries = rows * d.KVH * p.width;
    const int64_t n_keys = d.KVH * rows;
    BR_CHECK(n_keys < std::numeric_limits<int32_t>::max() &&
                 entries <= std::numeric_limits<int32_t>::max(),
             "sparse_attention_bwd: ", entries, " selection entries over ", n_keys,
             " (kv head, row) keys do not fit the 32-bit inverted index");
    const auto i32 = q.options().dtype(at::kInt);
    at::Tensor keys = at::empty({entries}, i32), rows_in = at::empty({entries}, i32);
    at::Tensor counts = at::zeros({n_keys + 1}, i32);
    selection_keys_kernel<<<unsigned(ceil_div(entries, 256)), 256, 0, stream>>>(
        pr, keys.data_ptr<int32_t>(), rows_in.data_ptr<int32_t>(), counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor sorted_keys = at::empty_like(keys);
    q_rows = at::empty_like(rows_in);
    at::cuda::cub::radix_sort_pairs(keys.data_ptr<int32_t>(), sorted_keys.data_ptr<int32_t>(),
                                    rows_in.data_ptr<int32_t>(), q_rows.data_ptr<int32_t>(),
                                    entries, /*descending=*/false, /*begin_bit=*/0,
                                    at::cuda::cub::get_num_bits(uint64_t(n_keys)));
    offsets = at::empty({n_keys + 1}, i32);
    at::cuda::cub::exclusive_sum(counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                 n_keys + 1);
    inv = Inverted{q_rows.data_ptr<int32_t>(), offsets.data_ptr<int32_t>()};
  }

  at::Tensor dq = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor dk = alloc_output({d.Bq, d.N, d.KVH, d.D}, k.options());
  at::Tensor dv = alloc_output({d.Bq, d.N, d.KVH, d.D}, v.options());
  // Per (row, head, branch) gate, lse, delta for the row kernels' dk/dv passes (and then for the
  // fused ones' too); where the fused kernels take every sequence (no row kernels, or a packed
  // buffer whose row kernels only zero the padding rows) the fused backward makes its own, for a
  // chunk of kv groups at a time, where its dq and dk/dv kernels run (the one-CTA backward of the
  // short sequences keeps them in shared memory).
  const bool need_aux = fused.row_kernels && !fused_takes_all;
  at::Tensor aux = at::empty({need_aux ? d.Bq : 0, d.N, d.H, 2, 4}, q.options().dtype(at::kFloat));
  Aux* aux_p = need_aux ? reinterpret_cast<Aux*>(aux.data_ptr<float>()) : nullptr;
  // Packed buffers: the padding rows' dk / dv are the row dk/dv kernels' to zero, and with the
  // tensor-core dk/dv there are none of those (zeroed before the fused kernels write theirs).
  if (long_dkdv && d.Bq != d.B) {
    dk.zero_();
    dv.zero_();
  }
  if (fused.max_len > 0) {
    fused_backward(p, in, aux_p, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), d, q.scalar_type(),
                   fused.max_len, ln, stream);
  }
  if (fused.row_kernels) {
    // float16 / bfloat16 at D <= 64: dq on tensor cores too (long_dq: the row dq kernel's work).
    const bool long_dq_pass = long_rows_fit(d, q.scalar_type(), /*backward=*/true);
    if (long_dq_pass) long_dq(pr, in, aux_p, dq.data_ptr(), d, q.scalar_type(), stream);
    BR_DTYPE_SWITCH(q.scalar_type(), [&] {
      BR_HEADDIM_SWITCH(d.D, [&] {
        launch_bwd<scalar_t, kHeadDim>(pr, d, plan, in, aux_p, inv, dq, dk, dv, !long_dq_pass,
                                       !long_dkdv, stream);
      });
    });
    if (long_dkdv) {
      fused_long_dkdv(pr, in, aux_p, inv.rows, inv.offsets, dk.data_ptr(), dv.data_ptr(), d,
                      q.scalar_type(), fused.max_len, ln, stream);
    }
  }
  return {dq, dk, dv, dgates};
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) {
  m.impl("sparse_attention_bwd", &blossomrec::cuda::sparse_attention_bwd_cuda);
}
