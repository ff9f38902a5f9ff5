// blossomrec::select_blocks on CUDA: block scores and top-n selection (SPEC 1b) in one pass.
//
// score[g, i, J] = mean over the G heads and the m windows of block J of scale * q_h . kc_c, which
// equals scale * qbar[g, i] . kcb[g, J] with qbar the group-mean query and kcb the block-mean
// compressed key (the mean of the m = b / s rows of kc in block J, in float32, formed as the kernel
// reads kc: a chain of ATen ops per call cost more host time than the kernel, docs/PERF_NOTES.md
// v17). The kernels stream the blocks once per query, keep the top-n in registers/local memory,
// decide SPEC's P > 1e-10 cut from a bound on the softmax normaliser (SelectState; rows whose
// candidates sit near the cut sum the normaliser in a second scan), and write only the selected
// indices and their count: no N x N/s score tensor ever exists. float16 / bfloat16 inputs score on
// tensor cores (select_blocks_mma_kernel), float32 on FFMA (select_blocks_kernel).
//
// FFMA kernel: one thread per (buffer row, kv head), a CTA of 128 consecutive rows. When the CTA's
// rows belong to one sequence (every sequence longer than a few CTAs), kcb streams through
// shared-memory tiles, read once per CTA and then as broadcasts, and each thread computes a tile
// of independent dot products before it touches the top-n. CTAs that straddle sequences (short or
// packed ones, with few blocks each) read their blocks directly. Causal CTAs are issued last to
// first: the last rows of a sequence see the most blocks, and started first they do not form the
// tail of the grid (S6 selection 1.10 -> 0.90 ms on an H200, docs/PERF_NOTES.md v7).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "cuda/common.cuh"
#include "cuda/dispatch.h"
#include "cuda/mma.cuh"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kMaxSelect = 64;  // the op's limit on num_select (checks.h)
constexpr int kSelectThreads = 128;

struct SelectParams {
  const void* q;
  int64_t q_sb, q_sn, q_sh;  // strides in elements (last dim contiguous)
  const void* kc;            // [B, C, KVH, D], last dim contiguous, 16-byte aligned rows
  int64_t kc_sb, kc_sc, kc_sh;
  int64_t m;                 // compressed rows per selection block
  float inv_m;
  int64_t nb_max, c_avail;
  int32_t* idx;  // [Bq * N, KVH, width]
  int32_t* cnt;  // [Bq * N, KVH]
  SeqParams seq;
  int64_t KVH, G, width;
  int64_t compress_stride, select_block, num_select;
  bool causal;
  float scale_log2;  // scale * log2(e): scores are kept in base 2
};

// Blocks per shared-memory tile of kcb: enough independent dot products per thread to hide the
// shared-memory latency, few enough registers for D = 128.
template <int D>
constexpr int select_tile() { return D <= 32 ? 32 : 16; }

// SPEC's cut P > 1e-10 in base 2, and the margin (in log2 units, far above the float32 error of a
// score difference or of log2f) within which the cut is decided from the exact normaliser.
constexpr float kCutLog2 = -33.219280948873624f;  // log2(1e-10)
constexpr float kCutMargin = 1.f / 64;

// Running state of one (row, kv head): the top-n of the visible blocks' scores, in base-2 logits.
// The softmax normaliser is not kept while the blocks stream (v22): the largest softmax entry is
// the -1000 entry or the best block (top_s[0]), and S = sum 2^(s - max) lies in [1, 1 + #visible],
// so P = 2^(s - max) / S clears 1e-10 for sure when s - max > log2(1e-10) + log2(1 + #visible)
// and fails for sure when s - max <= log2(1e-10). Only rows with a candidate between the two
// (scores ~23 nats below their best) sum S, in a second scan of their blocks.
struct SelectState {
  float thresh;  // the n-th best score once the top-n is full; +inf when n = 0 (nothing to keep)
  int count = 0;
  float top_s[kMaxSelect];
  int32_t top_j[kMaxSelect];

  __device__ __forceinline__ explicit SelectState(int n) : thresh(n > 0 ? -INFINITY : INFINITY) {}

  // Blocks arrive in increasing J, so an equal score never displaces an earlier block; -inf (not
  // a candidate) never enters.
  __device__ __forceinline__ void add(float s, int32_t J, int n) {
    if (s > thresh) {
      topn_insert(top_s, top_j, count, n, s, J);
      if (count == n) thresh = top_s[n - 1];
    }
  }

  // A tile of scores (-inf for blocks that are not candidates) of blocks J0, J0 + 1, ...
  template <int kTile>
  __device__ __forceinline__ void add_tile(const float* sc, float tile_max, int32_t J0, int n) {
    if (!(tile_max > thresh)) return;
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) add(sc[jj], J0 + jj, n);
  }

  // The largest entry of the row's softmax (base 2).
  __device__ __forceinline__ float max_logit() const {
    constexpr float null2 = kSelectNullLogit * kLog2e;
    return count > 0 && top_s[0] > null2 ? top_s[0] : null2;
  }

  // How many of the top-n (a prefix: they are sorted) clear the cut, decided from the bound above;
  // -1 when a candidate lies within the bound's slack and the normaliser decides.
  __device__ __forceinline__ int kept_by_bound(int64_t visible) const {
    const float M = max_logit();
    const float keep_above = kCutLog2 + log2f(1.f + float(visible)) + kCutMargin;
    for (int c = 0; c < count; ++c) {
      const float d = top_s[c] - M;
      if (d > keep_above) continue;
      if (d <= kCutLog2 - kCutMargin) return c;
      return -1;
    }
    return count;
  }

  // The same from the normaliser S = 2^(-1000 log2 e - max) + sum over visible blocks 2^(s - max).
  __device__ __forceinline__ int kept_by_sum(float S) const {
    const float M = max_logit();
    int kept = 0;
    while (kept < count && exp2f(top_s[kept] - M) / S > kSelectMinProb) ++kept;
    return kept;
  }
};

// The blocks visible to a row that sees blocks [0, j_end) but its own (non-causal).
__device__ __forceinline__ int64_t visible_blocks(int64_t j_end, int64_t own, bool causal) {
  return causal || own >= j_end ? j_end : j_end - 1;
}

// Row r's selection for kv head g: the first `kept` of the top blocks, -1 past them.
__device__ __forceinline__ void write_selection(const SelectParams& p, const SelectState& st,
                                                int kept, int64_t r, int64_t g) {
  int32_t* idx_out = p.idx + (r * p.KVH + g) * p.width;
  for (int c = 0; c < p.width; ++c) idx_out[c] = c < kept ? st.top_j[c] : -1;
  p.cnt[r * p.KVH + g] = kept;
}

template <int D>
__device__ __forceinline__ float dot_smem(const float* qbar, const float* k) {
  float s = 0.f;
#pragma unroll
  for (int v = 0; v < D / 4; ++v) {
    const float4 k4 = reinterpret_cast<const float4*>(k)[v];
    s = fmaf(qbar[4 * v], k4.x, s);
    s = fmaf(qbar[4 * v + 1], k4.y, s);
    s = fmaf(qbar[4 * v + 2], k4.z, s);
    s = fmaf(qbar[4 * v + 3], k4.w, s);
  }
  return s;
}

// kcb[b, J, g, e .. e + 15] = the mean of kc[b, J m + c, g, e .. e + 15] over c < m, in float32
// (summed in increasing c, then scaled by 1 / m).
template <typename T>
__device__ __forceinline__ void load_kcb16(const SelectParams& p, int64_t b, int64_t g, int64_t J,
                                           int e, float (&x)[kDimsPerLane]) {
  const T* row = static_cast<const T*>(p.kc) + b * p.kc_sb + J * p.m * p.kc_sc + g * p.kc_sh + e;
  Vec16<T>::load(row, x);
#pragma unroll 1
  for (int64_t c = 1; c < p.m; ++c) {
    float y[kDimsPerLane];
    Vec16<T>::load(row + c * p.kc_sc, y);
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) x[k] += y[k];
  }
  if (p.m > 1) {
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) x[k] *= p.inv_m;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kSelectThreads) select_blocks_kernel(const SelectParams p) {
  constexpr int kTile = select_tile<D>();
  __shared__ __align__(16) float tile[kTile * D];
  const int64_t rows = p.seq.Bq * p.seq.N;
  const int64_t cta = p.causal ? int64_t(gridDim.x) - 1 - blockIdx.x : int64_t(blockIdx.x);
  const int64_t r0 = cta * blockDim.x;
  const int64_t r = r0 + threadIdx.x;
  const int64_t g = blockIdx.y;
  const RowInfo row = r < rows ? row_info(p.seq, r) : RowInfo{-1, 0, 0, 0};

  // Group-mean query, pre-multiplied by scale * log2(e).
  float qbar[D];
#pragma unroll
  for (int e = 0; e < D; ++e) qbar[e] = 0.f;
  if (row.b >= 0) {
    const int64_t bq = r / p.seq.N;
    const int64_t n = r - bq * p.seq.N;
    const T* qrow = static_cast<const T*>(p.q) + bq * p.q_sb + n * p.q_sn + g * p.G * p.q_sh;
    for (int64_t h = 0; h < p.G; ++h) {
#pragma unroll
      for (int c = 0; c < D / kDimsPerLane; ++c) {
        float x[kDimsPerLane];
        Vec16<T>::load(qrow + h * p.q_sh + c * kDimsPerLane, x);
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) qbar[c * kDimsPerLane + e] += x[e];
      }
    }
    const float qs = p.scale_log2 / float(p.G);
#pragma unroll
    for (int e = 0; e < D; ++e) qbar[e] *= qs;
  }
  const int n_sel = int(p.num_select);
  const int64_t nb = row.b >= 0
                         ? num_select_blocks(row.L, p.c_avail, p.compress_stride, p.select_block)
                         : 0;
  const int64_t own = row.i / p.select_block;
  const int64_t j_end = row.b < 0 ? 0 : (p.causal ? (own < nb ? own : nb) : nb);
  SelectState st(n_sel);

  // Do all rows of this CTA belong to one sequence? (CTA-uniform: every row between two rows of a
  // sequence belongs to it.) Then its blocks stream through shared memory once for all rows.
  const int64_t r_last = (r0 + blockDim.x < rows ? r0 + blockDim.x : rows) - 1;
  const RowInfo first = row_info(p.seq, r0), last = row_info(p.seq, r_last);
  const bool shared_tiles = first.b >= 0 && first.b == last.b;
  // One scan of the row's visible blocks: into the top-n, or (sum) into the normaliser S of the
  // rows that need it, relative to their max M. The scores are the same bits in both scans.
  auto scan = [&](auto sum_pass, bool need, float M, float& S) {
    constexpr bool sum = decltype(sum_pass)::value;
    if (shared_tiles) {
      const int64_t nb_seq = num_select_blocks(first.L, p.c_avail, p.compress_stride, p.select_block);
      const int64_t last_own = last.i / p.select_block;
      const int64_t cta_end = p.causal ? (last_own < nb_seq ? last_own : nb_seq) : nb_seq;
      for (int64_t J0 = 0; J0 < cta_end; J0 += kTile) {
        __syncthreads();  // the previous tile is consumed
        const int64_t count = (cta_end - J0 < kTile ? cta_end - J0 : kTile) * (D / kDimsPerLane);
        for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
          const int64_t jj = e / (D / kDimsPerLane);
          const int c = int(e - jj * (D / kDimsPerLane)) * kDimsPerLane;
          float x[kDimsPerLane];
          load_kcb16<T>(p, first.b, g, J0 + jj, c, x);
#pragma unroll
          for (int k = 0; k < kDimsPerLane; ++k) tile[jj * D + c + k] = x[k];
        }
        __syncthreads();
        if (J0 >= j_end || (sum && !need)) continue;
        if constexpr (sum) {
#pragma unroll
          for (int jj = 0; jj < kTile; ++jj) {
            const int64_t J = J0 + jj;
            if (J < j_end && (p.causal || J != own)) S += exp2f(dot_smem<D>(qbar, tile + jj * D) - M);
          }
        } else {
          float sc[kTile];
          float tile_max = -INFINITY;
#pragma unroll
          for (int jj = 0; jj < kTile; ++jj) {
            const int64_t J = J0 + jj;
            const bool visible = J < j_end && (p.causal || J != own);
            sc[jj] = visible ? dot_smem<D>(qbar, tile + jj * D) : -INFINITY;
            tile_max = fmaxf(tile_max, sc[jj]);
          }
          st.add_tile<kTile>(sc, tile_max, int32_t(J0), n_sel);
        }
      }
    } else if (row.b >= 0 && (!sum || need)) {
      // Rows of several sequences (short or packed sequences): each thread reads its own blocks.
      for (int64_t J = 0; J < j_end; ++J) {
        if (!p.causal && J == own) continue;
        float s = 0.f;  // the FMA order of dot_smem: the same score as the shared-memory path
#pragma unroll
        for (int c = 0; c < D / kDimsPerLane; ++c) {
          float x[kDimsPerLane];
          load_kcb16<T>(p, row.b, g, J, c * kDimsPerLane, x);
#pragma unroll
          for (int e = 0; e < kDimsPerLane; ++e) s = fmaf(qbar[c * kDimsPerLane + e], x[e], s);
        }
        if constexpr (sum) S += exp2f(s - M); else st.add(s, int32_t(J), n_sel);
      }
    }
  };
  float S = 0.f;
  scan(std::false_type{}, false, 0.f, S);
  int kept = st.kept_by_bound(visible_blocks(j_end, own, p.causal));
  // A second scan where some row of the CTA needs its normaliser (CTA-uniform for the barriers).
  if (__syncthreads_or(kept < 0)) {
    const float M = st.max_logit();
    S = exp2f(kSelectNullLogit * kLog2e - M);
    scan(std::true_type{}, kept < 0, M, S);
    if (kept < 0) kept = st.kept_by_sum(S);
  }
  if (r >= rows) return;
  write_selection(p, st, kept, r, g);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core scores (float16 / bfloat16 inputs, sm_80 and newer)
// ---------------------------------------------------------------------------------------------
// The FFMA kernel above spent ~56 instructions per score and row (Nsight, docs/PERF_NOTES.md v9),
// a D-long dot product, the normaliser and the top-n; here mma.sync computes a warp's 32 rows x
// 16-32 blocks of scores per step, and each lane then tests its row's scores against the row's
// top-n threshold as a bit mask (one compare per score), inserting only the candidates above it
// (rare once the top-n is full: v22; v20 ran the online normaliser per score here and was no faster
// than FFMA at D = 16). The products stay float32-accurate: qbar (float32) and
// the block-mean keys kcb (float32 when m > 1) are each split into a bfloat16 high part and a
// bfloat16 remainder, x = hi + lo with |x - hi - lo| <= 2^-17 |x| (bfloat16 whatever the input
// dtype: float32's exponent range, so no float16 overflow of qbar at large scales), and
// S = qhi.khi + qlo.khi + qhi.klo with float32 accumulation (qlo.klo, <= 2^-18 |q||k| per element,
// is dropped; for bfloat16 inputs with m = 1 klo is exactly zero and its product is skipped).
// Scores are relative errors of ~1e-5 of |qbar||kcb| from float64: selections equal the
// reference's away from near-ties, as the FFMA kernel's do (its error is ~1e-6).
//
// Every warp works alone (no CTA barrier): its 32 consecutive buffer rows, lane l owning row l's
// state, are served one sequence at a time (the rows of a warp belong to one sequence except for
// short or packed ones), and each block tile of that sequence is loaded by the warp into its own
// shared memory. A row's scores depend only on its own qbar and the blocks (MMA rows are
// independent), so they are the same bits whatever rows share its warp: padding invariance holds
// as in the FFMA kernel.
constexpr int kSelWarps = kSelectThreads / 32;

// A warp's shared memory at head dim D (byte offsets): qbar hi, lo [2][32 rows][KS], kcb hi, lo
// [2][blocks][KS], the scores [32 rows][SS], with the bfloat16 row stride KS = D + 8
// (conflict-free ldmatrix) and the float score row stride SS = blocks + 8 (16-byte aligned rows
// for the row's vector reads; the accumulators' 8-byte stores conflict-free). Blocks per step:
// 32 up to D = 32 (work enough per tile load), 16 above (shared memory). The kernel's carve-up
// and the host's shared-memory check (select_blocks_cuda) both read it.
struct MmaSelectLayout {
  int blocks, ks, ss, q, k, s, warp, total;
};
constexpr MmaSelectLayout mma_select_layout(int D) {
  const int blocks = D <= 32 ? 32 : 16;
  const int ks = D + 8, ss = blocks + 8, q = 2 * 32 * ks * 2, k = 2 * blocks * ks * 2;
  const int warp = q + k + 32 * ss * 4;
  return MmaSelectLayout{blocks, ks, ss, 0, q, q + k, warp, kSelWarps * warp};
}

// 16 floats as their bfloat16 high parts and the bfloat16 roundings of the remainders, stored at
// hi and lo (16-byte aligned).
__device__ __forceinline__ void split_store16(const float (&x)[kDimsPerLane], __nv_bfloat16* hi,
                                              __nv_bfloat16* lo) {
  __align__(16) __nv_bfloat162 h[kDimsPerLane / 2], l[kDimsPerLane / 2];
#pragma unroll
  for (int e = 0; e < kDimsPerLane / 2; ++e) {
    h[e] = __floats2bfloat162_rn(x[2 * e], x[2 * e + 1]);
    const float2 hf = __bfloat1622float2(h[e]);
    l[e] = __floats2bfloat162_rn(x[2 * e] - hf.x, x[2 * e + 1] - hf.y);
  }
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    reinterpret_cast<uint4*>(hi)[v] = reinterpret_cast<const uint4*>(h)[v];
    reinterpret_cast<uint4*>(lo)[v] = reinterpret_cast<const uint4*>(l)[v];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kSelectThreads, 4) select_blocks_mma_kernel(const SelectParams p) {
  constexpr MmaSelectLayout M = mma_select_layout(D);
  constexpr int kT = M.blocks, KS = M.ks, SS = M.ss;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  unsigned char* wbuf = smem + warp * M.warp;
  __nv_bfloat16* qa = reinterpret_cast<__nv_bfloat16*>(wbuf + M.q);  // [2][32][KS]
  __nv_bfloat16* kb = reinterpret_cast<__nv_bfloat16*>(wbuf + M.k);  // [2][kT][KS]
  float* sc = reinterpret_cast<float*>(wbuf + M.s);                  // [32][SS]

  const int64_t rows = p.seq.Bq * p.seq.N;
  const int64_t cta = p.causal ? int64_t(gridDim.x) - 1 - blockIdx.x : int64_t(blockIdx.x);
  const int64_t r = cta * blockDim.x + threadIdx.x;
  const int64_t g = blockIdx.y;
  const RowInfo row = r < rows ? row_info(p.seq, r) : RowInfo{-1, 0, 0, 0};

  // Group-mean query, pre-multiplied by scale * log2(e) (the FFMA kernel's float32 qbar), split
  // into the two bfloat16 rows of this lane (zeros for padding rows).
  {
    float qbar[kDimsPerLane];
    const T* qrow = nullptr;
    if (row.b >= 0) {
      const int64_t bq = r / p.seq.N;
      qrow = static_cast<const T*>(p.q) + bq * p.q_sb + (r - bq * p.seq.N) * p.q_sn +
             g * p.G * p.q_sh;
    }
    const float qs = p.scale_log2 / float(p.G);
#pragma unroll
    for (int c = 0; c < D / kDimsPerLane; ++c) {
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) qbar[e] = 0.f;
      if (qrow != nullptr) {
        for (int64_t h = 0; h < p.G; ++h) {
          float x[kDimsPerLane];
          Vec16<T>::load(qrow + h * p.q_sh + c * kDimsPerLane, x);
#pragma unroll
          for (int e = 0; e < kDimsPerLane; ++e) qbar[e] += x[e];
        }
      }
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) qbar[e] *= qs;
      split_store16(qbar, qa + lane * KS + c * kDimsPerLane, qa + (32 + lane) * KS + c * kDimsPerLane);
    }
  }
  const int n_sel = int(p.num_select);
  const int64_t nb = row.b >= 0
                         ? num_select_blocks(row.L, p.c_avail, p.compress_stride, p.select_block)
                         : 0;
  const int64_t own = row.i / p.select_block;
  const int64_t j_end = row.b < 0 || n_sel == 0 ? 0 : (p.causal ? (own < nb ? own : nb) : nb);
  // bfloat16 keys with m = 1 are their own high part: no remainder product.
  const bool k_exact = std::is_same<T, __nv_bfloat16>::value && p.m == 1;
  SelectState st(n_sel);
  __syncwarp();

  // One scan of the warp's rows' visible blocks: into the top-n, or (sum) into the normaliser S of
  // the lanes that need it (relative to their max M). The scores are the same bits in both scans.
  auto scan = [&](auto sum_pass, bool need, float M_row, float& S) {
    constexpr bool sum = decltype(sum_pass)::value;
    unsigned todo = __ballot_sync(~0u, j_end > 0 && (!sum || need));
    while (todo) {
      // The lanes of the next sequence and the blocks the furthest of them sees.
      const int64_t b = __shfl_sync(~0u, row.b, __ffs(todo) - 1);
      const unsigned seg = __ballot_sync(~0u, row.b == b) & todo;
      todo &= ~seg;
      const bool mine = (seg >> lane) & 1u;
      int64_t jmax = mine ? j_end : 0;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const int64_t o = __shfl_xor_sync(~0u, jmax, off);
        jmax = o > jmax ? o : jmax;
      }
      // kcb of the blocks J0 .. J0 + kT - 1 (zeros past jmax), 16 dims per (block, chunk), loaded
      // a tile ahead: the loads of the next tile are in flight while this one is scored.
      constexpr int kChunks = kT * (D / kDimsPerLane);
      constexpr int kPerLane = (kChunks + 31) / 32;
      float xn[kPerLane][kDimsPerLane];
      auto fetch = [&](int64_t J0) {
#pragma unroll
        for (int v = 0; v < kPerLane; ++v) {
          const int e = lane + 32 * v;
          const int jj = e / (D / kDimsPerLane);
          const int c = (e - jj * (D / kDimsPerLane)) * kDimsPerLane;
          if (e < kChunks && J0 + jj < jmax) {
            load_kcb16<T>(p, b, g, J0 + jj, c, xn[v]);
          } else {
#pragma unroll
            for (int k = 0; k < kDimsPerLane; ++k) xn[v][k] = 0.f;
          }
        }
      };
      fetch(0);
      for (int64_t J0 = 0; J0 < jmax; J0 += kT) {
#pragma unroll
        for (int v = 0; v < kPerLane; ++v) {
          const int e = lane + 32 * v;
          const int jj = e / (D / kDimsPerLane);
          const int c = (e - jj * (D / kDimsPerLane)) * kDimsPerLane;
          if (e < kChunks) split_store16(xn[v], kb + jj * KS + c, kb + (kT + jj) * KS + c);
        }
        if (J0 + kT < jmax) fetch(J0 + kT);
        __syncwarp();
        // Scores of the warp's 32 rows (two m16 tiles) x kT blocks.
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          float acc[kT / 8][4];
#pragma unroll
          for (int n = 0; n < kT / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
          }
          const __nv_bfloat16* arow = qa + (mt * 16 + (lane & 15)) * KS + (lane >> 4) * 8;
          const __nv_bfloat16* brow = kb + ((lane >> 4) * 8 + (lane & 7)) * KS + ((lane >> 3) & 1) * 8;
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t ahi[4], alo[4];
            ldmatrix_x4(ahi, arow + ks * 16);
            ldmatrix_x4(alo, arow + 32 * KS + ks * 16);
#pragma unroll
            for (int np = 0; np < kT / 16; ++np) {
              uint32_t bhi[4];
              ldmatrix_x4(bhi, brow + np * 16 * KS + ks * 16);
              Mma<__nv_bfloat16>::run(acc[2 * np], ahi, bhi[0], bhi[1]);
              Mma<__nv_bfloat16>::run(acc[2 * np + 1], ahi, bhi[2], bhi[3]);
              Mma<__nv_bfloat16>::run(acc[2 * np], alo, bhi[0], bhi[1]);
              Mma<__nv_bfloat16>::run(acc[2 * np + 1], alo, bhi[2], bhi[3]);
              if (!k_exact) {
                uint32_t blo[4];
                ldmatrix_x4(blo, brow + (kT + np * 16) * KS + ks * 16);
                Mma<__nv_bfloat16>::run(acc[2 * np], ahi, blo[0], blo[1]);
                Mma<__nv_bfloat16>::run(acc[2 * np + 1], ahi, blo[2], blo[3]);
              }
            }
          }
#pragma unroll
          for (int n = 0; n < kT / 8; ++n) {
            float* s0 = sc + (mt * 16 + gq) * SS + n * 8 + 2 * tq;
            *reinterpret_cast<float2*>(s0) = make_float2(acc[n][0], acc[n][1]);
            *reinterpret_cast<float2*>(s0 + 8 * SS) = make_float2(acc[n][2], acc[n][3]);
          }
        }
        __syncwarp();
        // The row's scores: its visible blocks of the tile as bits (the blocks below j_end, but
        // its own when non-causal), then either the candidates above the row's threshold, in
        // increasing J (rare once the top-n is full), or the terms of the normaliser.
        if (mine && J0 < j_end) {
          const int64_t lim = j_end - J0 < kT ? j_end - J0 : kT;
          uint32_t vis = lim >= 32 ? ~0u : (1u << lim) - 1u;
          if (!p.causal && own >= J0 && own < J0 + kT) vis &= ~(1u << (own - J0));
          const float* srow = sc + lane * SS;
          if constexpr (sum) {
#pragma unroll
            for (int jj = 0; jj < kT; ++jj) {
              if ((vis >> jj) & 1u) S += exp2f(srow[jj] - M_row);
            }
          } else {
            uint32_t cand = 0;
#pragma unroll
            for (int v = 0; v < kT / 4; ++v) {
              const float4 x = reinterpret_cast<const float4*>(srow)[v];
              cand |= (x.x > st.thresh ? 1u : 0u) << (4 * v);
              cand |= (x.y > st.thresh ? 1u : 0u) << (4 * v + 1);
              cand |= (x.z > st.thresh ? 1u : 0u) << (4 * v + 2);
              cand |= (x.w > st.thresh ? 1u : 0u) << (4 * v + 3);
            }
            cand &= vis;
            while (cand) {
              const int jj = __ffs(cand) - 1;
              cand &= cand - 1;
              st.add(srow[jj], int32_t(J0 + jj), n_sel);
            }
          }
        }
        __syncwarp();  // kb and sc are refilled next step
      }
    }
  };
  float S = 0.f;
  scan(std::false_type{}, false, 0.f, S);
  int kept = st.kept_by_bound(visible_blocks(j_end, own, p.causal));
  // A second scan for the lanes that need their normaliser (warp-uniform: the warp scores).
  if (__any_sync(~0u, kept < 0)) {
    const float M_row = st.max_logit();
    S = exp2f(kSelectNullLogit * kLog2e - M_row);
    scan(std::true_type{}, kept < 0, M_row, S);
    if (kept < 0) kept = st.kept_by_sum(S);
  }
  if (r >= rows) return;
  write_selection(p, st, kept, r, g);
}

// float16 / bfloat16 on the tensor cores, float32 on the FFMA kernel. Measured on an H200
// (docs/PERF_NOTES.md, v20, v22).
template <typename T, int D>
void launch_select(const SelectParams& p, int64_t rows, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(rows, kSelectThreads)), unsigned(p.KVH));
  if constexpr (std::is_same<T, float>::value) {
    select_blocks_kernel<T, D><<<grid, kSelectThreads, 0, stream>>>(p);
  } else {
    constexpr int kSmem = mma_select_layout(D).total;
    auto kernel = select_blocks_mma_kernel<T, D>;
    allow_dynamic_smem(kernel, kSmem);
    kernel<<<grid, kSelectThreads, size_t(kSmem), stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> select_blocks_cuda(const at::Tensor& q_in, const at::Tensor& kc,
                                                      const at::Tensor& seq_start,
                                                      const at::Tensor& seq_len,
                                                      int64_t compress_stride, int64_t select_block,
                                                      int64_t num_select, bool causal,
                                                      double scale) {
  Dims d;
  check_select_inputs(q_in, kc, seq_start, seq_len, compress_stride, select_block, num_select, &d);
  BR_CHECK_TYPE(q_in.scalar_type() != at::kDouble,
                   "float64 runs on CPU only; the CUDA ops take float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(q_in.device());
  // float16 / bfloat16 score on tensor cores (launch_select) where the card has the mma.sync and
  // the kernel's shared memory (sm_80 on; sm_86 / sm_89 give a CTA at most 99 KiB, less than
  // D = 128 takes); elsewhere those inputs are scored in float32 by the FFMA kernel.
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const bool upcast = q_in.scalar_type() != at::kFloat &&
                      (prop->major < 8 ||
                       mma_select_layout(int(q_in.size(-1))).total >
                           int64_t(prop->sharedMemPerBlockOptin));
  const at::Tensor q = vec_aligned(upcast ? q_in.to(at::kFloat) : q_in);
  const int64_t width = num_select > 1 ? num_select : 1;
  at::Tensor idx = alloc_output({d.Bq, d.N, d.KVH, width}, q.options().dtype(at::kInt));
  at::Tensor cnt = alloc_output({d.Bq, d.N, d.KVH}, q.options().dtype(at::kInt));
  const int64_t rows = d.Bq * d.N;
  if (rows == 0 || d.KVH == 0) return {idx, cnt};

  const int64_t m = select_block / compress_stride;
  const int64_t nb_max = kc.size(1) / m;
  const at::Tensor kc_a = vec_aligned(upcast ? kc.to(at::kFloat) : kc);
  const at::Tensor st = seq_start.contiguous();
  const at::Tensor ln = seq_len.contiguous();

  SelectParams p;
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sn = q.stride(1);
  p.q_sh = q.stride(2);
  p.kc = kc_a.data_ptr();
  p.kc_sb = kc_a.stride(0);
  p.kc_sc = kc_a.stride(1);
  p.kc_sh = kc_a.stride(2);
  p.m = m;
  p.inv_m = float(1.0 / double(m));
  p.nb_max = nb_max;
  p.c_avail = nb_max * m;
  p.idx = idx.data_ptr<int32_t>();
  p.cnt = cnt.data_ptr<int32_t>();
  p.seq = SeqParams{st.data_ptr<int32_t>(), ln.data_ptr<int32_t>(), d.B, d.Bq, d.N};
  p.KVH = d.KVH;
  p.G = d.G;
  p.width = width;
  p.compress_stride = compress_stride;
  p.select_block = select_block;
  p.num_select = num_select;
  p.causal = causal;
  p.scale_log2 = float(scale) * kLog2e;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BR_DTYPE_SWITCH(q.scalar_type(), [&] {
    BR_HEADDIM_SWITCH(d.D, [&] { launch_select<scalar_t, kHeadDim>(p, rows, stream); });
  });
  return {idx, cnt};
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) {
  m.impl("select_blocks", &blossomrec::cuda::select_blocks_cuda);
}
