// Shared pieces of the sparse attention forward and backward kernels: parameters, the thread
// layout of the row kernels and the selected-branch key enumeration.
//
// Two kernel families compute the op (docs/DESIGN.md, "CUDA paths"):
// - the fused tensor-core kernels (fused_attention.cu) for float16 / bfloat16 sequences up to
//   fused_max_len() tokens: 16-row query tiles x 16-key tiles through mma.sync, both branches from
//   one QK^T tile;
// - the row kernels here and in sparse_attention_{fwd,bwd}.cu for everything else (float32, longer
//   sequences): a "segment" of kLanes = D / 16 threads serves one (query row, head), each lane
//   holding 16 dims in float32. The G segments of one row (the heads of one kv group) are adjacent,
//   so they walk identical key lists (the group shares its selection and STIS set) and their k/v
//   loads coincide.
#pragma once

#include <cstdlib>

#include "common/checks.h"
#include "cuda/common.cuh"

namespace blossomrec {
namespace cuda {

constexpr int kAttnThreads = 256;
// The kernels wait on scattered loads far more than they compute: cap registers at
// 65536 / (256 * 2) = 128 per thread so that at least two CTAs (16 warps) share an SM (a cap of 85
// for three CTAs spilled kilobytes).
constexpr int kAttnMinBlocks = 2;

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sn, q_sh;
  int64_t k_sb, k_sn, k_sh;
  int64_t v_sb, v_sn, v_sh;
  const void* gates;       // [rows, H, 2] contiguous, float32 or the kernels' T (gate_pair)
  bool gates_f32;
  const int32_t* sel_idx;  // [rows, KVH, width]
  const int32_t* sel_cnt;  // [rows, KVH]
  int64_t sel_sb, sel_sn, sel_sh;  // sel_idx strides (last dim contiguous)
  int64_t cnt_sb, cnt_sn, cnt_sh;
  int64_t width;
  SeqParams seq;
  StisParams stis;
  int64_t H, KVH, G, select_block;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
  // Row kernels only: valid rows of sequences of at most skip_len tokens belong to the fused
  // kernels, which run in the same call (packed batches mix both); 0 skips nothing.
  int64_t skip_len;
};

// The forward's outputs.
struct FwdOut {
  void* out;    // [rows, H, D] contiguous
  void* o_sel;  // [rows, H, D]
  void* o_win;  // [rows, H, D]
  float* lse;   // [rows, H, 2]
};

// Position of one thread: which (row, head, lane) it serves.
struct RowThread {
  int64_t r;   // buffer row
  int64_t bq, n;
  int64_t h, g;
  int lane;
  bool active;
};

template <int kLanes>
__device__ __forceinline__ RowThread row_thread(const AttnParams& p) {
  RowThread t;
  const int per_row = int(p.G) * kLanes;
  const int rows_per_block = kAttnThreads / per_row;
  const int local = threadIdx.x / per_row;
  const int within = threadIdx.x - local * per_row;
  t.lane = within % kLanes;
  const int64_t hg = within / kLanes;
  t.g = blockIdx.y;
  t.h = t.g * p.G + hg;
  t.r = int64_t(blockIdx.x) * rows_per_block + local;
  t.active = local < rows_per_block && t.r < p.seq.Bq * p.seq.N;
  t.bq = t.active ? t.r / p.seq.N : 0;
  t.n = t.active ? t.r - t.bq * p.seq.N : 0;
  return t;
}

template <int kLanes>
inline dim3 attn_grid(const AttnParams& p) {
  const int64_t per_row = p.G * kLanes;
  const int64_t rows_per_block = kAttnThreads / per_row;
  return dim3(unsigned(ceil_div(p.seq.Bq * p.seq.N, rows_per_block)), unsigned(p.KVH));
}

// Does the selection list sel[0 .. c) already hold block J? A hand-made selection may repeat a
// block; the key set is a set (SPEC 1c), so only the first entry counts.
__device__ __forceinline__ bool listed_before(const int32_t* sel, int64_t c, int64_t J) {
  for (int64_t x = 0; x < c; ++x) {
    if (sel[x] == J) return true;
  }
  return false;
}

// Calls f(lo, hi) for the disjoint key ranges of the selected branch of query i (SPEC 1c): the own
// block, then the selected blocks in selection order. Indices that are not visible whole blocks
// cannot come from select_blocks and are skipped.
template <typename F>
__device__ __forceinline__ void for_each_selected_range(const AttnParams& p, int64_t r, int64_t g,
                                                        int64_t i, int64_t L, F&& f) {
  int64_t lo, hi;
  own_block_range(i, L, p.select_block, p.stis.causal, &lo, &hi);
  f(lo, hi);
  const int64_t bq = r / p.seq.N, n = r - bq * p.seq.N;
  const int64_t cnt_raw = p.sel_cnt[bq * p.cnt_sb + n * p.cnt_sn + g * p.cnt_sh];
  const int64_t cnt = cnt_raw < p.width ? cnt_raw : p.width;
  const int32_t* sel = p.sel_idx + bq * p.sel_sb + n * p.sel_sn + g * p.sel_sh;
  for (int64_t c = 0; c < cnt; ++c) {
    const int64_t J = sel[c];
    if (!block_visible(J, i, L / p.select_block, p.select_block, p.stis.causal)) continue;
    if (listed_before(sel, c, J)) continue;  // a block listed twice is attended once
    f(J * p.select_block, (J + 1) * p.select_block);
  }
}

// ---------------------------------------------------------------------------------------------
// The staged path for short padded sequences
// ---------------------------------------------------------------------------------------------
// In the padded layout (Bq > 1, one sequence per batch entry) with short sequences, one CTA per
// (batch entry, kv head[, row split]) copies what every row of the sequence reads (k and v for the
// forward and dq; q and dout of the G heads, plus the sequence's inverted selection lists, for dk/dv)
// into shared memory once, and the per-row loops then read it there instead of gathering the same
// rows from L2 again for every query: the gathers are latency-bound (docs/PERF_NOTES.md). Same
// per-row code, same summation order, so both paths give bitwise-identical results.
// BLOSSOMREC_STAGED=0 turns the staged path off (tests run both paths).
constexpr int64_t kStagedMaxN = 1024;
constexpr int64_t kStagedKvBudget = 96 * 1024;    // fwd and dq: no static shared memory
constexpr int64_t kStagedDkdvBudget = 72 * 1024;  // + 32 KiB static partial sums: 2 CTAs per SM

inline bool staging_enabled() {
  const char* e = std::getenv("BLOSSOMREC_STAGED");
  return !(e != nullptr && e[0] == '0');
}

inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Dynamic shared memory of the forward / dq kernels (k and v of one sequence and kv head, in the
// input dtype), or 0 when the batch does not take the staged path. (Staging as float32 to save the
// per-key conversions was measured slower: twice the shared-memory traffic and fewer CTAs per SM,
// benchmarks/results/dev/bench-h200-20261128-staged-f32-quick.jsonl, git history at 2b6f2c9.)
inline int64_t staged_kv_bytes(const Dims& d, int64_t elem) {
  if (!staging_enabled() || d.Bq <= 1 || d.N > kStagedMaxN) return 0;
  const int64_t bytes = 2 * align16(d.N * d.D * elem);
  return bytes <= kStagedKvBudget ? bytes : 0;
}

// Layout of the dk/dv kernel's dynamic shared memory: q and dout of the G heads of one sequence,
// the inverted selection lists (query positions) and their offsets per block.
struct DkdvSmem {
  int64_t q, dout, list, offsets, total;  // byte offsets; total 0: not staged
};

inline DkdvSmem staged_dkdv_smem(const Dims& d, int64_t elem, int64_t width, int64_t select_block) {
  DkdvSmem s{0, 0, 0, 0, 0};
  if (!staging_enabled() || d.Bq <= 1 || d.N > kStagedMaxN) return s;
  const int64_t qbytes = align16(d.N * d.G * d.D * elem);
  s.dout = qbytes;
  s.list = 2 * qbytes;
  s.offsets = s.list + align16(d.N * width * int64_t(sizeof(int32_t)));
  const int64_t total = s.offsets + align16((d.N / select_block + 1) * int64_t(sizeof(int32_t)));
  if (total <= kStagedDkdvBudget) s.total = total;
  return s;
}

// Row splits per (batch entry, kv head) so that a small batch still fills the GPU.
inline unsigned staged_splits(const Dims& d, int64_t rows_per_block, int num_sms) {
  const int64_t ctas = d.Bq * d.KVH;
  const int64_t want = ceil_div(int64_t(num_sms) * 4, ctas);
  const int64_t most = ceil_div(d.N, rows_per_block);
  return unsigned(want < 1 ? 1 : (want > most ? most : want));
}

// The RowThread of buffer row (bq, n) for this thread in the staged kernels (blockIdx.y = kv head).
template <int kLanes>
__device__ __forceinline__ RowThread staged_row_thread(const AttnParams& p, int64_t bq, int64_t n) {
  RowThread t;
  const int per_row = int(p.G) * kLanes;
  const int rows_per_block = kAttnThreads / per_row;
  const int local = threadIdx.x / per_row;
  const int within = threadIdx.x - local * per_row;
  t.lane = within % kLanes;
  t.g = blockIdx.y;
  t.h = t.g * p.G + within / kLanes;
  t.bq = bq;
  t.n = n + local;
  t.r = bq * p.seq.N + t.n;
  t.active = local < rows_per_block && t.n < p.seq.N;
  return t;
}

// RowInfo of a row of the staged kernels' sequence (start s, length L in batch entry t.bq).
__device__ __forceinline__ RowInfo staged_row_info(const AttnParams& p, const RowThread& t,
                                                   int64_t s, int64_t L) {
  if (!t.active || t.n < s || t.n >= s + L) return RowInfo{-1, 0, 0, 0};
  return RowInfo{t.bq, t.n - s, L, t.bq * p.seq.N + s};
}

// Copies rows x heads vectors of D elements into shared memory as dst[row][head][D] (type S: T or
// float32, exact either way); source vector (r, h) at src + r * row_stride + h * head_stride.
template <typename T, int D, typename S>
__device__ __forceinline__ void stage_rows(S* dst, const T* src, int64_t row_stride,
                                           int64_t head_stride, int64_t rows, int64_t heads) {
  constexpr int kChunks = D / kDimsPerLane;
  const int64_t total = rows * heads * kChunks;
  for (int64_t c = threadIdx.x; c < total; c += blockDim.x) {
    const int64_t vec = c / kChunks;
    const int64_t e = (c - vec * kChunks) * kDimsPerLane;
    const int64_t r = vec / heads, h = vec - r * heads;
    float x[kDimsPerLane];
    Vec16<T>::load(src + r * row_stride + h * head_stride + e, x);
    Vec16<S>::store(dst + vec * D + e, x);
  }
}

// The backward's saved inputs.
struct BwdIn {
  const void* dout;   // [rows, H, D] contiguous
  const void* o_sel;  // [rows, H, D] contiguous
  const void* o_win;  // [rows, H, D] contiguous
  const float* lse;   // [rows, H, 2] contiguous
  void* dgates;       // [rows, H, 2] contiguous, the gates' dtype: float32 or the kernels' T
  bool dgates_f32;
};

// Per (row, head, branch) what the dk/dv pass needs of a query, in one 16-byte load, written by the
// dq pass: {gate, lse in base 2, delta = gate * <dout, o_branch>, <dout, o_branch>}. The last is
// the gate gradient.
using Aux = float4;

// What query q (its dout, its branch's aux row a) sends to key k (value v) through one branch, in
// a segment of kLanes lanes of 16 dims each: p = exp2(scale_log2 q.k - lse2), dv += gate p dout,
// dk += p (gate dout.v - delta) q (dk is scaled by the softmax scale once, at the end). The row
// kernels' pass 3 and the long sequences' tensor-core dk/dv (its row loop) add queries with it.
template <int kLanes>
__device__ __forceinline__ void dkdv_add_query(const float (&q)[kDimsPerLane],
                                               const float (&dout)[kDimsPerLane],
                                               const float (&k)[kDimsPerLane],
                                               const float (&v)[kDimsPerLane], const Aux a,
                                               float scale_log2, float* dk, float* dv) {
  const float s = segment_sum<kLanes>(dot16(q, k)) * scale_log2;
  const float pw = exp2f(s - a.y);
  const float dp = a.x * segment_sum<kLanes>(dot16(dout, v));
  const float dsc = pw * (dp - a.z);
  const float pg = pw * a.x;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) {
    dv[e] = fmaf(pg, dout[e], dv[e]);
    dk[e] = fmaf(dsc, q[e], dk[e]);
  }
}

// The (LTIS, STIS) pair of (row, head) rh in a [rows, H, 2] contiguous tensor of float32 (f32) or
// of the kernels' T: the gates are read, and their gradient written, in their own dtype (a cast of
// each per call cost two launches and a strided copy, docs/PERF_NOTES.md v19).
template <typename T>
__device__ __forceinline__ float2 gate_pair(const void* base, bool f32, int64_t rh) {
  if constexpr (!std::is_same_v<T, float>) {
    if (!f32) {
      const typename Pair2<T>::type v = static_cast<const typename Pair2<T>::type*>(base)[rh];
      return make_float2(to_acc(v.x), to_acc(v.y));
    }
  }
  return static_cast<const float2*>(base)[rh];
}

template <typename T>
__device__ __forceinline__ void store_gate_pair(void* base, bool f32, int64_t rh, float a,
                                                float b) {
  if constexpr (!std::is_same_v<T, float>) {
    if (!f32) {
      static_cast<typename Pair2<T>::type*>(base)[rh] = Vec16<T>::from_float2(a, b);
      return;
    }
  }
  static_cast<float2*>(base)[rh] = make_float2(a, b);
}

// A float32 tensor the kernels read with 8- or 16-byte loads: contiguous, and copied when its data
// pointer is not 16-byte aligned (a contiguous view at an odd element offset stays one after
// .contiguous()).
inline at::Tensor aligned_f32(const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  if (c.numel() > 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The gates as the kernels read them: the tensor itself when it has q's 16-bit dtype, is contiguous
// and 4-byte aligned; else a contiguous float32 copy (aligned_f32).
inline at::Tensor kernel_gates(const at::Tensor& gates, const at::Tensor& q) {
  const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  if (half && gates.scalar_type() == q.scalar_type() && gates.is_contiguous() &&
      reinterpret_cast<uintptr_t>(gates.data_ptr()) % 4 == 0) {
    return gates;
  }
  return aligned_f32(gates);
}

// Fills AttnParams from checked inputs (defined in sparse_attention_fwd.cu). gates_k is the gates
// tensor as kernel_gates returns it.
AttnParams make_attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& gates_k, const at::Tensor& sel_idx,
                            const at::Tensor& sel_cnt, const at::Tensor& seq_start,
                            const at::Tensor& seq_len, const Dims& d, int64_t select_block,
                            int64_t window, int64_t power_block, bool use_power, bool use_sink,
                            bool causal, double scale);

}  // namespace cuda
}  // namespace blossomrec
