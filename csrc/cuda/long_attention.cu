// The forward of the sequences the fused kernels do not take (longer than fused_max_len()), on
// tensor cores: long_fwd_kernel, a warp per (query row, kv group).
//
// The G heads of a row share its key sets (the group's selection, the STIS set), so they are the
// rows of one m16n8k16 product: M = G <= 8 heads (the other 16 - G rows are zeros), N = 16 keys of the
// row's own list, K = head dims. A row's keys are gathered, not tiled: the ranges of each branch
// (the own block, the selected blocks; the STIS window, one range per power of two, the sink)
// are packed 16 keys at a time into "slots" (one slot per lane of the warp's first half), so a
// 16-key product holds only keys the row attends to (the lesson of v6, docs/PERF_NOTES.md: tiles
// of query rows waste most of their keys at long lengths). Per 16 slots: S = Q K^T, an online
// softmax per branch in base 2, O += P V, both as mma.sync with float32 accumulation.
//
// The fragments are loaded straight from global memory (L2): the dimension order inside a
// product is free (a dot product and an output row can be permuted as long as both operands and
// the store agree), so each lane reads contiguous runs of a key's row: for S = Q K^T lane t holds
// dims [t D/4, (t + 1) D/4) of its query heads and of its keys (logical column pair (2t, 2t+1) of
// k-step ks is physical dims t D/4 + 4 ks + {0, 1}, the pair (2t+8, 2t+9) is + {2, 3}); for
// O = P V lane g = lane / 4 holds output n = g of every n-tile od, physical dim g D/8 + od, so it
// reads dims [g D/8, (g + 1) D/8) of its four keys (slots 2t, 2t+1, 2t+8, 2t+9) and writes dims
// [2t D/8, (2t + 2) D/8) of its rows at the end.
#include <ATen/cuda/CUDAContext.h>

#include <cstdlib>
#include <limits>

#include "common/checks.h"
#include "common/mask.h"
#include "cuda/dispatch.h"
#include "cuda/fused_attention.cuh"
#include "cuda/mma.cuh"
#include "cuda/sparse_attention.cuh"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kLongWarps = 4;  // warps (rows) per CTA: consecutive rows share keys in L1
// Groups hold at most 8 heads (checks.h), so the products' rows g + 8 are zeros: a lane keeps the
// state of row g only (kRowHalves = 1; the fragments' rows g + 8 stay 0).
constexpr int kRowHalves = 1;
constexpr int kLongThreads = 32 * kLongWarps;

// n 16-bit elements (n * 2 bytes, a multiple of 4) of src as 32-bit words, or zeros.
template <int kWords>
__device__ __forceinline__ void load_words(uint32_t (&w)[kWords], const void* src, bool valid) {
  if (!valid) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
    return;
  }
  if constexpr (kWords % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 x = static_cast<const uint4*>(src)[i];
      w[4 * i] = x.x;
      w[4 * i + 1] = x.y;
      w[4 * i + 2] = x.z;
      w[4 * i + 3] = x.w;
    }
  } else if constexpr (kWords == 2) {
    const uint2 x = *static_cast<const uint2*>(src);
    w[0] = x.x;
    w[1] = x.y;
  } else {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = static_cast<const uint32_t*>(src)[i];
  }
}

// Element e (16 bits) of a run of words.
template <int kWords>
__device__ __forceinline__ uint32_t half_of(const uint32_t (&w)[kWords], int e) {
  return (e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xffffu);
}

// The keys a warp's row attends to in one branch, packed 16 at a time: lane l < 16 holds the
// key (position in the sequence) of slot l, -1 when empty; every 16 keys (and at the end of the
// branch) the caller's product runs over them. Warp-uniform: every lane pushes the same ranges.
struct Slots {
  int slot = -1;
  int pending = 0;  // slots filled

  template <typename F>
  __device__ __forceinline__ void push(int64_t lo, int64_t hi, int lane, F&& product) {
    while (lo < hi) {
      const int take = int(hi - lo < 16 - pending ? hi - lo : 16 - pending);
      if (lane >= pending && lane < pending + take) slot = int(lo + (lane - pending));
      pending += take;
      lo += take;
      if (pending == 16) {
        product();
        slot = -1;
        pending = 0;
      }
    }
  }
  template <typename F>
  __device__ __forceinline__ void flush(F&& product) {
    if (pending > 0) product();
    slot = -1;
    pending = 0;
  }
  __device__ __forceinline__ int key(int s) const { return __shfl_sync(~0u, slot, s); }
  // The keys of the C-fragment columns of lane t: slots 2t, 2t + 1, 2t + 8, 2t + 9 (the k rows of
  // the next product's B fragments).
  __device__ __forceinline__ void columns(int t, int (&jv)[4]) const {
    jv[0] = key(2 * t);
    jv[1] = key(2 * t + 1);
    jv[2] = key(2 * t + 8);
    jv[3] = key(2 * t + 9);
  }
};

// B fragments (k = the 16 slots, n = output dim od of this lane) from the rows of the lane's four
// column keys, kWords words each: b0 = (key 2t, key 2t + 1), b1 = (key 2t + 8, key 2t + 9).
template <int kWords, int ND>
__device__ __forceinline__ void column_pairs(const uint32_t (&w)[4][kWords], uint32_t (&b)[ND][2]) {
#pragma unroll
  for (int od = 0; od < ND; ++od) {
    b[od][0] = half_of(w[0], od) | (half_of(w[1], od) << 16);
    b[od][1] = half_of(w[2], od) | (half_of(w[3], od) << 16);
  }
}

// kWords words of key j's row from element `at` (j = -1, an empty slot: zeros).
template <int kWords, typename T>
__device__ __forceinline__ void load_key_row(uint32_t (&w)[kWords], const T* base, int64_t stride,
                                             int j, int at) {
  load_words<kWords>(w, base + int64_t(j < 0 ? 0 : j) * stride + at, j >= 0);
}

// The rows of the lane's four column keys jv: the B fragments of P V (value rows) and of dS K
// (key rows), dims [g D/8, (g + 1) D/8).
template <int kWords, typename T>
__device__ __forceinline__ void load_column_rows(uint32_t (&w)[4][kWords], const T* base,
                                                 int64_t stride, const int (&jv)[4], int at) {
#pragma unroll
  for (int x = 0; x < 4; ++x) load_key_row(w[x], base, stride, jv[x], at);
}

// The A fragments of a 16 x D product from the words of its rows g (w0) and g + 8 (w1), dims
// [t D/4, (t + 1) D/4) in the permuted order of the file's header.
template <int KSTEPS, int kWords>
__device__ __forceinline__ void a_fragments(uint32_t (&a)[KSTEPS][4], const uint32_t (&w0)[kWords],
                                            const uint32_t (&w1)[kWords]) {
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    a[ks][0] = w0[2 * ks];
    a[ks][1] = w1[2 * ks];
    a[ks][2] = w0[2 * ks + 1];
    a[ks][3] = w1[2 * ks + 1];
  }
}

// acc = A B over the head dims for one n-tile of S = Q K^T: B the words of the tile's key row held
// by this lane.
template <typename T, int KSTEPS>
__device__ __forceinline__ void row_product(float (&acc)[4], const uint32_t (&a)[KSTEPS][4],
                                            const uint32_t (&w)[2 * KSTEPS]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) Mma<T>::run(acc, a[ks], w[2 * ks], w[2 * ks + 1]);
}

// Online softmax (base 2) and P V of one branch for the 16 query rows of a warp's product: rows g
// and g + 8 of the C fragments live in this lane; m and l per row, l summed over the quad at the
// end.
template <typename T, int D>
struct LongBranch {
  static constexpr int ND = D / 8;
  float o[ND][4];
  float m[2], l[2];

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int od = 0; od < ND; ++od) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[od][e] = 0.f;
    }
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }

  // s: the two n-tiles' score fragments (base 2, -inf for empty slots); vb: the P V B fragments.
  __device__ __forceinline__ void add(float (&s)[2][4], const uint32_t (&vb)[ND][2]) {
#pragma unroll
    for (int h = 0; h < kRowHalves; ++h) {  // row g (c0, c1); g + 8 (c2, c3) unused
      float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(~0u, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(~0u, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no keys yet: nothing to rescale
      const float alpha = exp2f(m[h] - m_use);
      m[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[nt][2 * h + c] = exp2f(s[nt][2 * h + c] - m_use);
          sum += s[nt][2 * h + c];
        }
      }
      l[h] = l[h] * alpha + sum;
#pragma unroll
      for (int od = 0; od < ND; ++od) {
        o[od][2 * h] *= alpha;
        o[od][2 * h + 1] *= alpha;
      }
    }
    const uint32_t a[4] = {Mma<T>::pack(s[0][0], s[0][1]), 0u, Mma<T>::pack(s[1][0], s[1][1]), 0u};
#pragma unroll
    for (int od = 0; od < ND; ++od) Mma<T>::run(o[od], a, vb[od][0], vb[od][1]);
  }

  // The row sums over the quad and the branch's log-sum-exp (natural log) per row.
  __device__ __forceinline__ void finish(float (&lse)[2]) {
#pragma unroll
    for (int h = 0; h < kRowHalves; ++h) {
      l[h] += __shfl_xor_sync(~0u, l[h], 1);
      l[h] += __shfl_xor_sync(~0u, l[h], 2);
      const float inv = 1.f / l[h];
#pragma unroll
      for (int od = 0; od < ND; ++od) {
        o[od][2 * h] *= inv;
        o[od][2 * h + 1] *= inv;
      }
      lse[h] = (m[h] + log2f(l[h])) * kLn2;
    }
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kLongThreads, 4) long_fwd_kernel(const AttnParams p, const FwdOut o) {
  constexpr int KQ = D / 4;       // dims of a query / key row per lane in S = Q K^T
  constexpr int KSTEPS = D / 16;
  constexpr int ND = D / 8;       // output n-tiles; dims of a value row per lane in P V
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t rows = p.seq.Bq * p.seq.N;
  const int64_t r = int64_t(blockIdx.x) * kLongWarps + warp;
  if (r >= rows) return;  // warp-uniform
  const int64_t grp = blockIdx.y;
  const int64_t h0 = grp * p.G;
  const RowInfo row = row_info(p.seq, r);
  if (row.b < 0) {  // padding row: zeros in every output of the group's heads
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    constexpr int kVecs = D * int(sizeof(T)) / 16;
    for (int64_t e = lane; e < p.G * kVecs; e += 32) {
      const int64_t off = (r * p.H + h0) * D * int64_t(sizeof(T)) / 16 + e;
      static_cast<uint4*>(o.out)[off] = z;
      static_cast<uint4*>(o.o_sel)[off] = z;
      static_cast<uint4*>(o.o_win)[off] = z;
    }
    for (int64_t e = lane; e < p.G; e += 32) {
      *reinterpret_cast<float2*>(o.lse + (r * p.H + h0 + e) * 2) = make_float2(0.f, 0.f);
    }
    return;
  }
  if (row.L <= p.skip_len) return;  // the fused kernels' row
  const int64_t bq = r / p.seq.N, n = r - bq * p.seq.N;
  const int64_t n0 = row.base - bq * p.seq.N;  // key j of the sequence: buffer row n0 + j

  // Q fragments of heads g and g + 8 (zeros past G), dims [t KQ, (t + 1) KQ).
  uint32_t qa[KSTEPS][4];
  {
    uint32_t w0[KQ / 2], w1[KQ / 2];
    const T* qrow = static_cast<const T*>(p.q) + bq * p.q_sb + n * p.q_sn + t * KQ;
    load_words<KQ / 2>(w0, qrow + (h0 + g) * p.q_sh, g < p.G);
    load_words<KQ / 2>(w1, qrow + (h0 + g + 8) * p.q_sh, kRowHalves > 1 && g + 8 < p.G);
    a_fragments<KSTEPS>(qa, w0, w1);
  }
  const T* kbase = static_cast<const T*>(p.k) + bq * p.k_sb + n0 * p.k_sn + grp * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + bq * p.v_sb + n0 * p.v_sn + grp * p.v_sh;

  LongBranch<T, D> br;
  Slots slots;
  auto product = [&]() {
    // S = Q K^T over the 16 slots: keys of slots nt * 8 + g feed the B fragments.
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      uint32_t kw[KQ / 2];
      load_key_row(kw, kbase, p.k_sn, slots.key(nt * 8 + g), t * KQ);
      row_product<T>(s[nt], qa, kw);
    }
    // This lane's columns: slots 2t, 2t + 1 of each n-tile, which are also its P V keys.
    int jv[4];
    slots.columns(t, jv);
    uint32_t vw[4][ND / 2];
    load_column_rows(vw, vbase, p.v_sn, jv, g * ND);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool valid = jv[2 * nt + c] >= 0;
        s[nt][c] = valid ? s[nt][c] * p.scale_log2 : -INFINITY;
        s[nt][2 + c] = valid ? s[nt][2 + c] * p.scale_log2 : -INFINITY;
      }
    }
    uint32_t vb[ND][2];
    column_pairs<ND / 2, ND>(vw, vb);
    br.add(s, vb);
  };
  auto push = [&](int64_t lo, int64_t hi) { slots.push(lo, hi, lane, product); };

  // Selected branch, then STIS; o_sel stays in registers for the combine.
  float lse_sel[2], lse_win[2];
  br.reset();
  for_each_selected_range(p, r, grp, row.i, row.L, push);
  slots.flush(product);
  br.finish(lse_sel);
  float sel[ND][4];
#pragma unroll
  for (int od = 0; od < ND; ++od) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sel[od][e] = br.o[od][e];
  }
  br.reset();
  for_each_stis_range(row.i, row.L, p.stis, push);
  slots.flush(product);
  br.finish(lse_win);

  // Row g (head h0 + g): dims [2t ND, (2t + 2) ND), gated combine.
#pragma unroll
  for (int hh = 0; hh < kRowHalves; ++hh) {
    const int64_t hl = g + 8 * hh;
    if (hl >= p.G) continue;
    const int64_t rh = r * p.H + h0 + hl;
    const float2 gate = gate_pair<T>(p.gates, p.gates_f32, rh);
    float vs[2 * ND], vw_[2 * ND], vc[2 * ND];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int od = 0; od < ND; ++od) {
        vs[c * ND + od] = sel[od][2 * hh + c];
        vw_[c * ND + od] = br.o[od][2 * hh + c];
        vc[c * ND + od] = gate.x * vs[c * ND + od] + gate.y * vw_[c * ND + od];
      }
    }
    const int64_t off = rh * D + 2 * t * ND;
    using P2 = typename Pair2<T>::type;
#pragma unroll
    for (int e = 0; e < ND; ++e) {
      reinterpret_cast<P2*>(static_cast<T*>(o.out) + off)[e] = Vec16<T>::from_float2(vc[2 * e], vc[2 * e + 1]);
      reinterpret_cast<P2*>(static_cast<T*>(o.o_sel) + off)[e] = Vec16<T>::from_float2(vs[2 * e], vs[2 * e + 1]);
      reinterpret_cast<P2*>(static_cast<T*>(o.o_win) + off)[e] = Vec16<T>::from_float2(vw_[2 * e], vw_[2 * e + 1]);
    }
    if (t == 0) *reinterpret_cast<float2*>(o.lse + rh * 2) = make_float2(lse_sel[hh], lse_win[hh]);
  }
}

// Pass 1 of the backward for the same rows (what bwd_dq_kernel does, on tensor cores): per head of
// the group the gate gradients <dout, o_sel>, <dout, o_win> and each branch's aux row, then over
// each branch's gathered keys S = Q K^T and dP = dout V^T (the fragments of V in the layout of
// K's), dS = P (gate dP - delta) and dq += dS K, the B fragments of K for that last product read
// in the layout of the forward's V (rows g D/8 ..).
template <typename T, int D>
__global__ void __launch_bounds__(kLongThreads, 4)
    long_dq_kernel(const AttnParams p, const BwdIn in, Aux* aux, T* dq_out) {
  constexpr int KQ = D / 4;
  constexpr int KSTEPS = D / 16;
  constexpr int ND = D / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t rows = p.seq.Bq * p.seq.N;
  const int64_t r = int64_t(blockIdx.x) * kLongWarps + warp;
  if (r >= rows) return;  // warp-uniform
  const int64_t grp = blockIdx.y;
  const int64_t h0 = grp * p.G;
  const RowInfo row = row_info(p.seq, r);
  if (row.b < 0) {  // padding row: dq, aux (where there is one) and the gate gradient are zeros
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    constexpr int kVecs = D * int(sizeof(T)) / 16;
    for (int64_t e = lane; e < p.G * kVecs; e += 32) {
      reinterpret_cast<uint4*>(dq_out)[(r * p.H + h0) * kVecs + e] = z;
    }
    for (int64_t e = lane; e < p.G; e += 32) {
      const int64_t rh = r * p.H + h0 + e;
      if (aux != nullptr) aux[rh * 2] = aux[rh * 2 + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
      store_gate_pair<T>(in.dgates, in.dgates_f32, rh, 0.f, 0.f);
    }
    return;
  }
  if (row.L <= p.skip_len) return;  // the fused kernels' row
  const int64_t bq = r / p.seq.N, n = r - bq * p.seq.N;
  const int64_t n0 = row.base - bq * p.seq.N;

  // Q and dout fragments of heads g and g + 8 (zeros past G), dims [t KQ, (t + 1) KQ); the dots
  // <dout, o_sel>, <dout, o_win> summed over the quad; gate, lse (base 2), delta per row, branch.
  uint32_t qa[KSTEPS][4], da[KSTEPS][4];
  float gate[2][2], lse2[2][2], delta[2][2];
  {
    const T* qrow = static_cast<const T*>(p.q) + bq * p.q_sb + n * p.q_sn + t * KQ;
    uint32_t qw[2][KQ / 2], dw[2][KQ / 2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t hl = g + 8 * hh;
      const bool valid = hh < kRowHalves && hl < p.G;
      const int64_t rh = r * p.H + h0 + (valid ? hl : 0);
      load_words<KQ / 2>(qw[hh], qrow + (h0 + hl) * p.q_sh, valid);
      load_words<KQ / 2>(dw[hh], static_cast<const T*>(in.dout) + rh * D + t * KQ, valid);
      uint32_t sw[KQ / 2], ww[KQ / 2];
      load_words<KQ / 2>(sw, static_cast<const T*>(in.o_sel) + rh * D + t * KQ, valid);
      load_words<KQ / 2>(ww, static_cast<const T*>(in.o_win) + rh * D + t * KQ, valid);
      float dot_sel = 0.f, dot_win = 0.f;
#pragma unroll
      for (int i = 0; i < KQ / 2; ++i) {
        const float2 d2 = Mma<T>::unpack(dw[hh][i]), s2 = Mma<T>::unpack(sw[i]),
                     w2 = Mma<T>::unpack(ww[i]);
        dot_sel = fmaf(d2.x, s2.x, fmaf(d2.y, s2.y, dot_sel));
        dot_win = fmaf(d2.x, w2.x, fmaf(d2.y, w2.y, dot_win));
      }
      dot_sel += __shfl_xor_sync(~0u, dot_sel, 1);
      dot_sel += __shfl_xor_sync(~0u, dot_sel, 2);
      dot_win += __shfl_xor_sync(~0u, dot_win, 1);
      dot_win += __shfl_xor_sync(~0u, dot_win, 2);
      const float2 gt = valid ? gate_pair<T>(p.gates, p.gates_f32, rh) : make_float2(0.f, 0.f);
      const float2 ls = valid ? *reinterpret_cast<const float2*>(in.lse + rh * 2)
                              : make_float2(0.f, 0.f);
      gate[hh][0] = gt.x;
      gate[hh][1] = gt.y;
      lse2[hh][0] = ls.x * kLog2e;
      lse2[hh][1] = ls.y * kLog2e;
      delta[hh][0] = gt.x * dot_sel;
      delta[hh][1] = gt.y * dot_win;
      if (valid && t == 0) {
        aux[rh * 2] = make_float4(gt.x, lse2[hh][0], delta[hh][0], dot_sel);
        aux[rh * 2 + 1] = make_float4(gt.y, lse2[hh][1], delta[hh][1], dot_win);
        store_gate_pair<T>(in.dgates, in.dgates_f32, rh, dot_sel, dot_win);
      }
    }
    a_fragments<KSTEPS>(qa, qw[0], qw[1]);
    a_fragments<KSTEPS>(da, dw[0], dw[1]);
  }
  const T* kbase = static_cast<const T*>(p.k) + bq * p.k_sb + n0 * p.k_sn + grp * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + bq * p.v_sb + n0 * p.v_sn + grp * p.v_sh;

  float acc[ND][4];
#pragma unroll
  for (int od = 0; od < ND; ++od) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[od][e] = 0.f;
  }
  int b = 0;  // the branch of the keys being pushed: 0 selected, 1 STIS
  Slots slots;
  auto product = [&]() {
    float s[2][4], dp[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int j = slots.key(nt * 8 + g);
      uint32_t kw[KQ / 2], vw[KQ / 2];
      load_key_row(kw, kbase, p.k_sn, j, t * KQ);
      load_key_row(vw, vbase, p.v_sn, j, t * KQ);
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        Mma<T>::run(s[nt], qa[ks], kw[2 * ks], kw[2 * ks + 1]);
        Mma<T>::run(dp[nt], da[ks], vw[2 * ks], vw[2 * ks + 1]);
      }
    }
    int jv[4];
    slots.columns(t, jv);
    uint32_t kd[4][ND / 2];
    load_column_rows(kd, kbase, p.k_sn, jv, g * ND);
    // dS = P (gate dP - delta), P = exp2(scale_log2 s - lse2); 0 in empty slots.
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool valid = jv[2 * nt + c] >= 0;
#pragma unroll
        for (int hh = 0; hh < kRowHalves; ++hh) {
          const int e = 2 * hh + c;
          const float pw = valid ? exp2f(s[nt][e] * p.scale_log2 - lse2[hh][b]) : 0.f;
          s[nt][e] = pw * (gate[hh][b] * dp[nt][e] - delta[hh][b]);
        }
      }
    }
    const uint32_t a[4] = {Mma<T>::pack(s[0][0], s[0][1]), 0u, Mma<T>::pack(s[1][0], s[1][1]), 0u};
    uint32_t kb[ND][2];
    column_pairs<ND / 2, ND>(kd, kb);
#pragma unroll
    for (int od = 0; od < ND; ++od) Mma<T>::run(acc[od], a, kb[od][0], kb[od][1]);
  };
  auto push = [&](int64_t lo, int64_t hi) { slots.push(lo, hi, lane, product); };
  b = 0;
  for_each_selected_range(p, r, grp, row.i, row.L, push);
  slots.flush(product);
  b = 1;
  for_each_stis_range(row.i, row.L, p.stis, push);
  slots.flush(product);

  // Row g: dims [2t ND, (2t + 2) ND), scaled by the softmax scale.
#pragma unroll
  for (int hh = 0; hh < kRowHalves; ++hh) {
    const int64_t hl = g + 8 * hh;
    if (hl >= p.G) continue;
    const int64_t off = (r * p.H + h0 + hl) * D + 2 * t * ND;
    using P2 = typename Pair2<T>::type;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int e = 0; e < ND / 2; ++e) {
        reinterpret_cast<P2*>(dq_out + off + c * ND)[e] = Vec16<T>::from_float2(
            acc[2 * e][2 * hh + c] * p.scale, acc[2 * e + 1][2 * hh + c] * p.scale);
      }
    }
  }
}

}  // namespace

bool long_rows_fit(const Dims& d, at::ScalarType dtype, bool backward) {
  // BLOSSOMREC_LONG_FWD / _DQ: 0 off, 1 at every head dim up to 64 (benchmarks), unset: D >= 32
  // (at D = 16 the row kernels were faster: docs/PERF_NOTES.md v23).
  const char* e = std::getenv(backward ? "BLOSSOMREC_LONG_DQ" : "BLOSSOMREC_LONG_FWD");
  if (e != nullptr && e[0] == '0') return false;
  const bool forced = e != nullptr && e[0] == '1';
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return half && prop->major >= 8 && d.G <= 8 && d.D <= 64 && (forced || d.D >= 32) &&
         d.N < std::numeric_limits<int32_t>::max();
}

void long_dq(const AttnParams& p, const BwdIn& in, Aux* aux, void* dq, const Dims& d,
             at::ScalarType dtype, cudaStream_t stream) {
  const int64_t rows = d.Bq * d.N;
  const dim3 grid(unsigned(ceil_div(rows, kLongWarps)), unsigned(d.KVH));
  BR_HALF_DTYPE_SWITCH(dtype, [&] {
    BR_HEADDIM_SWITCH(d.D, [&] {
      if constexpr (kHeadDim <= 64) {
        long_dq_kernel<scalar_t, kHeadDim>
            <<<grid, kLongThreads, 0, stream>>>(p, in, aux, static_cast<scalar_t*>(dq));
      } else {
        BR_CHECK(false, "internal: long_dq at D = ", d.D);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void long_forward(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                  cudaStream_t stream) {
  const int64_t rows = d.Bq * d.N;
  const dim3 grid(unsigned(ceil_div(rows, kLongWarps)), unsigned(d.KVH));
  BR_HALF_DTYPE_SWITCH(dtype, [&] {
    BR_HEADDIM_SWITCH(d.D, [&] {
      if constexpr (kHeadDim <= 64) {
        long_fwd_kernel<scalar_t, kHeadDim><<<grid, kLongThreads, 0, stream>>>(p, o);
      } else {
        BR_CHECK(false, "internal: long_forward at D = ", d.D);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace blossomrec
