// blossomrec::select_blocks on CUDA: block scores and top-n selection (SPEC 1b) in one pass.
//
// score[g, i, J] = mean over the G heads and the m windows of block J of scale * q_h . kc_c, which
// equals scale * qbar[g, i] . kcb[g, J] with qbar the group-mean query and kcb the block-mean
// compressed key. kcb is tiny ([B, N/b, KVH, D]) and computed first with ATen; the kernel then
// streams it once per query, keeps the softmax normaliser (with SPEC's -1000 entry) and the top-n in
// registers/local memory, and writes only the selected indices and their count: no N x N/s score
// tensor ever exists.
//
// One thread per (buffer row, kv head), a CTA of 128 consecutive rows. When the CTA's rows belong to
// one sequence (every sequence longer than a few CTAs), kcb streams through shared-memory tiles,
// read once per CTA and then as broadcasts, and each thread computes a tile of independent dot
// products before it touches the running softmax and top-n. CTAs that straddle sequences (short or
// packed ones, with few blocks each) read their blocks directly.
//
// Tensor-core scoring (head dims up to 64, sm_80+, the default; BLOSSOMREC_SELECT_MMA=0 turns it
// off): in a CTA of one sequence each warp scores its 32 rows against a tile of blocks with
// mma.sync m16n8k8 in TF32, three products per tile (hi*hi + hi*lo + lo*hi of each operand split
// into a TF32 high part and a TF32 remainder), which keeps the scores within ~1e-6 relative of
// float32 FMAs: plain TF32 (~1e-3) would move the top-n cut on scores that the tests' 1e-4
// near-tie rule calls distinct. A thread then holds 2 columns of every 8 blocks for 4 rows, so it
// keeps a partial normaliser and top-n per row over its columns; the four threads of a row merge
// them at the end (the top-n of a union is the top-n of the parts' top-n under the same order:
// score, then lower block). CTAs are issued heaviest first when causal (the last rows see the most
// blocks) so that the long CTAs do not form the tail.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>

#include "common/alloc.h"
#include "common/checks.h"
#include "cuda/common.cuh"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kMaxSelect = 64;  // the op's limit on num_select (checks.h)
constexpr int kSelectThreads = 128;

struct SelectParams {
  const void* q;
  int64_t q_sb, q_sn, q_sh;  // strides in elements (last dim contiguous)
  const float* kcb;          // [B, NB_max, KVH, D] contiguous
  int64_t nb_max, c_avail;
  int32_t* idx;  // [Bq * N, KVH, width]
  int32_t* cnt;  // [Bq * N, KVH]
  SeqParams seq;
  int64_t KVH, G, width;
  int64_t compress_stride, select_block, num_select;
  bool causal;
  bool use_mma;      // tensor-core scoring in CTAs of one sequence (D <= 64, sm_80+)
  float scale_log2;  // scale * log2(e): scores are kept in base 2
};

// Blocks per shared-memory tile of kcb: enough independent dot products per thread to hide the
// shared-memory latency, few enough registers for D = 128.
template <int D>
constexpr int select_tile() { return D <= 32 ? 32 : 16; }

// The MMA path's shared memory: the CTA's 128 group-mean queries (float32, the A operand) and a
// tile of block-mean keys split into TF32 high and low parts (the B operand), rows padded by 4
// floats so that the fragment loads (8 rows x 4 consecutive columns) hit 32 distinct banks.
constexpr int kMmaPad = 4;
template <int D>
constexpr bool mma_select_supported() { return D <= 64; }  // D = 128: the queries need 67 KiB
template <int D>
constexpr int mma_select_tile() { return D <= 32 ? 32 : 16; }
template <int D>
constexpr int64_t mma_select_smem_bytes() {
  return int64_t(sizeof(float)) * (D + kMmaPad) * (kSelectThreads + 2 * mma_select_tile<D>());
}
template <int D>
constexpr int64_t ffma_select_smem_bytes() { return int64_t(sizeof(float)) * select_tile<D>() * D; }

// Running state of one (row, kv head): the softmax normaliser over the visible blocks (started
// from the -1000 entry) and the top-n, in base-2 logits.
struct SelectState {
  float M = kSelectNullLogit * kLog2e;
  float S = 1.f;  // 0 in the partial states of the MMA path but one (the -1000 entry counts once)
  float thresh = -INFINITY;  // the n-th best score once the top-n is full
  int count = 0;
  float top_s[kMaxSelect];
  int32_t top_j[kMaxSelect];

  // A tile of scores (-inf for blocks that are not candidates) of blocks block_of(0), block_of(1),
  // ... (increasing): one rescale of the normaliser per tile, and the top-n visited in increasing J.
  template <int kTile, typename BlockOf>
  __device__ __forceinline__ void add_tile(const float* sc, float tile_max, BlockOf block_of,
                                           int n) {
    if (tile_max > M) {
      S *= exp2f(M - tile_max);
      M = tile_max;
    }
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) S += exp2f(sc[jj] - M);  // exp2(-inf) = 0
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) {
      if (sc[jj] > thresh || (count < n && sc[jj] > -INFINITY)) {
        topn_insert(top_s, top_j, count, n, sc[jj], block_of(jj));
        if (count == n) thresh = top_s[n - 1];
      }
    }
  }

  // Blocks arrive in increasing J, so an equal score never displaces an earlier block.
  __device__ __forceinline__ void add(float s, int32_t J, int n) {
    if (s > M) {
      S = S * exp2f(M - s) + 1.f;
      M = s;
    } else {
      S += exp2f(s - M);
    }
    if (s > thresh || count < n) {
      topn_insert(top_s, top_j, count, n, s, J);
      if (count == n) thresh = top_s[n - 1];
    }
  }
};

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

// x = hi + lo with hi = x rounded to TF32 and lo the remainder rounded to TF32 (~2^-22 |x| lost).
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(x));
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(x - __uint_as_float(hi)));
#else
  __trap();
#endif
}

// c += a b for a 16 x 8 (rows x dims) A, an 8 x 8 (dims x blocks) B. Fragments (PTX ISA, "Matrix
// fragments for mma.m16n8k8", .tf32), g = lane / 4, t = lane % 4: a0 (row g, dim t), a1 (row g+8,
// dim t), a2 (row g, dim t+4), a3 (row g+8, dim t+4); b0 (dim t, block g), b1 (dim t+4, block g);
// c0, c1 (row g, blocks 2t, 2t+1), c2, c3 (row g+8, same blocks).
__device__ __forceinline__ void mma_tf32(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Scores and selection of a CTA whose rows all belong to sequence `b` (see the file comment).
// Warp w scores rows 32w .. 32w+31 of the CTA (its own threads' rows) in two 16-row MMA tiles;
// lane (g, t) keeps the partial states of rows g, g+8, 16+g, 24+g over blocks 2t, 2t+1 mod 8.
template <int D>
__device__ __forceinline__ void select_rows_mma(const SelectParams& p, float* smem, const float* qbar, int64_t b,
                                int64_t r0, int64_t cta_end, int64_t j_end, int64_t own) {
  constexpr int kLd = D + kMmaPad;
  constexpr int kT = mma_select_tile<D>();
  constexpr int kNt = kT / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const unsigned full = 0xffffffffu;
  float* qs = smem;                                                 // [kSelectThreads][kLd]
  uint32_t* kh = reinterpret_cast<uint32_t*>(smem + kSelectThreads * kLd);  // [kT][kLd]
  uint32_t* kl = kh + kT * kLd;

#pragma unroll
  for (int e = 0; e < D; e += 4) {
    *reinterpret_cast<float4*>(qs + threadIdx.x * kLd + e) =
        make_float4(qbar[e], qbar[e + 1], qbar[e + 2], qbar[e + 3]);
  }
  // The visible range of the 4 rows this lane scores (rows of its own warp: shuffles).
  const int32_t my_end = int32_t(j_end), my_own = int32_t(own);
  int32_t row_end[4], row_own[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int src = (k >> 1) * 16 + (k & 1) * 8 + gq;
    row_end[k] = __shfl_sync(full, my_end, src);
    row_own[k] = __shfl_sync(full, my_own, src);
  }
  const int32_t warp_end = __reduce_max_sync(full, my_end);
  const int n_sel = int(p.num_select);
  SelectState st[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) st[k].S = tq == 0 ? 1.f : 0.f;

  const float* kcb = p.kcb + (b * p.KVH + blockIdx.y) * p.nb_max * D;  // [B, KVH, nb_max, D]
  const float* qw = qs + warp * 32 * kLd;
  for (int64_t J0 = 0; J0 < cta_end; J0 += kT) {
    __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
    for (int e = threadIdx.x; e < kT * D / 4; e += kSelectThreads) {
      const int jr = e / (D / 4), c = (e % (D / 4)) * 4;
      const float4 v = J0 + jr < cta_end
                           ? __ldg(reinterpret_cast<const float4*>(kcb + (J0 + jr) * D + c))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
      uint4 hi, lo;
      split_tf32(v.x, hi.x, lo.x);
      split_tf32(v.y, hi.y, lo.y);
      split_tf32(v.z, hi.z, lo.z);
      split_tf32(v.w, hi.w, lo.w);
      *reinterpret_cast<uint4*>(kh + jr * kLd + c) = hi;
      *reinterpret_cast<uint4*>(kl + jr * kLd + c) = lo;
    }
    __syncthreads();
    if (J0 >= warp_end) continue;  // warp-uniform: none of the warp's rows sees these blocks

    float acc[2][kNt][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 8) {
      uint32_t ahi[2][4], alo[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const float* a = qw + (mt * 16 + gq) * kLd + k0 + tq;
        split_tf32(a[0], ahi[mt][0], alo[mt][0]);
        split_tf32(a[8 * kLd], ahi[mt][1], alo[mt][1]);
        split_tf32(a[4], ahi[mt][2], alo[mt][2]);
        split_tf32(a[8 * kLd + 4], ahi[mt][3], alo[mt][3]);
      }
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        const int o = (nt * 8 + gq) * kLd + k0 + tq;
        const uint32_t bh0 = kh[o], bh1 = kh[o + 4], bl0 = kl[o], bl1 = kl[o + 4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {  // small products first
          mma_tf32(acc[mt][nt], alo[mt], bh0, bh1);
          mma_tf32(acc[mt][nt], ahi[mt], bl0, bl1);
          mma_tf32(acc[mt][nt], ahi[mt], bh0, bh1);
        }
      }
    }
    // This lane's blocks of the tile, in increasing order: J0 + 8 nt + 2 tq + c.
    const auto block_of = [J0, tq](int jj) { return int32_t(J0) + (jj >> 1) * 8 + 2 * tq + (jj & 1); };
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int mt = k >> 1, hh = k & 1;
      float sc[2 * kNt];
      float tile_max = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < 2 * kNt; ++jj) {
        const int32_t J = block_of(jj);
        const bool visible = J < row_end[k] && (p.causal || J != row_own[k]);
        sc[jj] = visible ? acc[mt][jj >> 1][2 * hh + (jj & 1)] : -INFINITY;
        tile_max = fmaxf(tile_max, sc[jj]);
      }
      st[k].add_tile<2 * kNt>(sc, tile_max, block_of, n_sel);
    }
  }

  // Merge the four partial states of each row (lanes 4g .. 4g+3) and write the row.
  const int64_t rows = p.seq.Bq * p.seq.N;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    SelectState& s = st[k];
    float M = fmaxf(s.M, __shfl_xor_sync(full, s.M, 1));
    M = fmaxf(M, __shfl_xor_sync(full, M, 2));
    float S = s.S * exp2f(s.M - M);
    S += __shfl_xor_sync(full, S, 1);
    S += __shfl_xor_sync(full, S, 2);
    const int64_t r = r0 + warp * 32 + (k >> 1) * 16 + (k & 1) * 8 + gq;
    const bool writer = tq == 0 && r < rows;
    int32_t* idx_out = p.idx + (r * p.KVH + blockIdx.y) * p.width;
    int ptr = 0, kept = 0;
    bool done = false;
    for (int c = 0; c < n_sel; ++c) {  // warp-uniform trip count: the shuffles need every lane
      const bool has = ptr < s.count;
      float best = has ? s.top_s[ptr] : -INFINITY;
      int32_t best_j = has ? s.top_j[ptr] : INT32_MAX;
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float o_s = __shfl_xor_sync(full, best, off);
        const int32_t o_j = __shfl_xor_sync(full, best_j, off);
        if (o_s > best || (o_s == best && o_j < best_j)) {
          best = o_s;
          best_j = o_j;
        }
      }
      if (has && s.top_j[ptr] == best_j) ++ptr;  // blocks are disjoint between the lanes
      if (!done && best > -INFINITY && exp2f(best - M) / S > kSelectMinProb) {
        if (writer) idx_out[c] = best_j;
        kept = c + 1;
      } else {
        done = true;
      }
    }
    if (writer) {
      for (int c = kept; c < p.width; ++c) idx_out[c] = -1;
      p.cnt[r * p.KVH + blockIdx.y] = kept;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kSelectThreads) select_blocks_kernel(const SelectParams p) {
  constexpr int kTile = select_tile<D>();
  extern __shared__ __align__(16) float smem[];
  float* tile = smem;  // [kTile][D] on the FFMA path
  const int64_t rows = p.seq.Bq * p.seq.N;
  // Causal: the last rows of a sequence see the most blocks, so issue the CTAs last to first.
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
  SelectState st;

  // Do all rows of this CTA belong to one sequence? (CTA-uniform: every row between two rows of a
  // sequence belongs to it.) Then its blocks stream through shared memory once for all rows.
  const int64_t r_last = (r0 + blockDim.x < rows ? r0 + blockDim.x : rows) - 1;
  const RowInfo first = row_info(p.seq, r0), last = row_info(p.seq, r_last);
  if (first.b >= 0 && first.b == last.b) {
    const int64_t nb_seq = num_select_blocks(first.L, p.c_avail, p.compress_stride, p.select_block);
    const int64_t last_own = last.i / p.select_block;
    const int64_t cta_end = p.causal ? (last_own < nb_seq ? last_own : nb_seq) : nb_seq;
    if constexpr (mma_select_supported<D>()) {
      if (p.use_mma) {
        select_rows_mma<D>(p, smem, qbar, first.b, r0, cta_end, j_end, own);
        return;
      }
    }
    const float* kcb = p.kcb + (first.b * p.KVH + g) * p.nb_max * D;  // [B, KVH, nb_max, D]
    for (int64_t J0 = 0; J0 < cta_end; J0 += kTile) {
      __syncthreads();  // the previous tile is consumed
      const int64_t count = (cta_end - J0 < kTile ? cta_end - J0 : kTile) * D / 4;
      for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
        reinterpret_cast<float4*>(tile)[e] = __ldg(reinterpret_cast<const float4*>(kcb + J0 * D) + e);
      }
      __syncthreads();
      if (J0 >= j_end) continue;
      float sc[kTile];
      float tile_max = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < kTile; ++jj) {
        const int64_t J = J0 + jj;
        const bool visible = J < j_end && (p.causal || J != own);
        sc[jj] = visible ? dot_smem<D>(qbar, tile + jj * D) : -INFINITY;
        tile_max = fmaxf(tile_max, sc[jj]);
      }
      st.add_tile<kTile>(sc, tile_max, [J0](int jj) { return int32_t(J0) + jj; }, n_sel);
    }
  } else if (row.b >= 0) {
    // Rows of several sequences (short or packed sequences): each thread reads its own blocks.
    const float* kcb = p.kcb + (row.b * p.KVH + g) * p.nb_max * D;
    for (int64_t J = 0; J < j_end; ++J) {
      if (!p.causal && J == own) continue;
      float k[D];
#pragma unroll
      for (int v = 0; v < D / 4; ++v) {
        const float4 k4 = __ldg(reinterpret_cast<const float4*>(kcb + J * D) + v);
        k[4 * v] = k4.x; k[4 * v + 1] = k4.y; k[4 * v + 2] = k4.z; k[4 * v + 3] = k4.w;
      }
      st.add(dot_smem<D>(qbar, k), int32_t(J), n_sel);
    }
  }
  if (r >= rows) return;
  // Keep the blocks whose probability clears SPEC's threshold; they are sorted, so a prefix.
  int kept = 0;
  for (int c = 0; c < st.count; ++c) {
    if (exp2f(st.top_s[c] - st.M) / st.S > kSelectMinProb) kept = c + 1; else break;
  }
  int32_t* idx_out = p.idx + (r * p.KVH + g) * p.width;
  for (int c = 0; c < p.width; ++c) idx_out[c] = c < kept ? st.top_j[c] : -1;
  p.cnt[r * p.KVH + g] = kept;
}

// Tensor-core scoring unless BLOSSOMREC_SELECT_MMA=0 (read on every call: tests and benchmarks
// compare both paths), for D <= 64 on sm_80 and newer.
bool mma_select_enabled() {
  const char* e = std::getenv("BLOSSOMREC_SELECT_MMA");
  if (e != nullptr && e[0] == '0') return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

template <int D>
void launch_select(SelectParams p, at::ScalarType dtype, int64_t rows, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(rows, kSelectThreads)), unsigned(p.KVH));
  p.use_mma = mma_select_supported<D>() && mma_select_enabled();
  // Dynamic shared memory, at most 43.5 KiB (D = 64 with MMA): under the 48 KiB default.
  const size_t smem = size_t(p.use_mma ? mma_select_smem_bytes<D>() : ffma_select_smem_bytes<D>());
  static_assert(mma_select_smem_bytes<64>() <= 48 * 1024, "select smem over the default limit");
  switch (dtype) {
    case at::kFloat:
      select_blocks_kernel<float, D><<<grid, kSelectThreads, smem, stream>>>(p);
      break;
    case at::kHalf:
      select_blocks_kernel<__half, D><<<grid, kSelectThreads, smem, stream>>>(p);
      break;
    case at::kBFloat16:
      select_blocks_kernel<__nv_bfloat16, D><<<grid, kSelectThreads, smem, stream>>>(p);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", dtype);
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
  TORCH_CHECK(q_in.scalar_type() != at::kDouble,
              "float64 runs on CPU only; the CUDA ops take float32, float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vec_aligned(q_in);
  const int64_t width = num_select > 1 ? num_select : 1;
  at::Tensor idx = alloc_output({d.Bq, d.N, d.KVH, width}, q.options().dtype(at::kInt));
  at::Tensor cnt = alloc_output({d.Bq, d.N, d.KVH}, q.options().dtype(at::kInt));
  const int64_t rows = d.Bq * d.N;
  if (rows == 0 || d.KVH == 0) return {idx, cnt};

  const int64_t m = select_block / compress_stride;
  const int64_t nb_max = kc.size(1) / m;
  // Block-mean compressed keys in float32, laid out [B, KVH, nb_max, D] so that a tile of blocks
  // is one contiguous range.
  at::Tensor kcb = kc.narrow(1, 0, nb_max * m)
                       .to(at::kFloat)
                       .reshape({d.B, nb_max, m, d.KVH, d.D})
                       .mean(2)
                       .permute({0, 2, 1, 3})
                       .contiguous();
  const at::Tensor st = seq_start.contiguous();
  const at::Tensor ln = seq_len.contiguous();

  SelectParams p;
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sn = q.stride(1);
  p.q_sh = q.stride(2);
  p.kcb = kcb.data_ptr<float>();
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
  p.use_mma = false;
  p.scale_log2 = float(scale) * kLog2e;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (d.D) {
    case 16: launch_select<16>(p, q.scalar_type(), rows, stream); break;
    case 32: launch_select<32>(p, q.scalar_type(), rows, stream); break;
    case 64: launch_select<64>(p, q.scalar_type(), rows, stream); break;
    case 128: launch_select<128>(p, q.scalar_type(), rows, stream); break;
    default: TORCH_CHECK(false, "unsupported head dim ", d.D);
  }
  return {idx, cnt};
}

}  // namespace
}  // namespace cuda
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CUDA, m) {
  m.impl("select_blocks", &blossomrec::cuda::select_blocks_cuda);
}
