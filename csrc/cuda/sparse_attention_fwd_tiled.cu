// blossomrec::sparse_attention_fwd on CUDA, the tensor-core path (float16 / bfloat16, p = 1):
// query tiles of 16 rows of one sequence, one warp per query head of the kv group, keys streamed
// through shared memory in chunks, S = Q K^T and O += P V with mma.sync m16n8k16 (float32
// accumulation), exact online softmax per branch, the gated combine in registers.
//
// What a tile of rows [i0, i0 + 16) of one sequence reads, per branch (SPEC 1c and 2), as a list of
// key "slots" (each slot one key position, or nothing):
//   selected branch: the union of the rows' own blocks as one range, then every block that some row of
//     the tile selected (the union of the rows' selections, b keys each). A per-(block, row) count
//     masks the rows that did not select the block (count 0) and reproduces the row kernels'
//     treatment of a block listed twice (count 2: the keys weigh twice, log2(2) added to the logit).
//   STIS branch: the near range [i0 - max(w - 1, 16), i0 + 16 (+ w - 1 when not causal)), which holds
//     the window and the distances up to 16; then, for every power of two d > 16, the 16 keys
//     [i0 - d, i0 - d + 16): for a tile of 16 rows, distance d is exactly that contiguous range (the
//     issue's "one contiguous range per distance"); then the sink when it lies past the near range.
// Slots are masked per (row, key) by the exact rules of common/mask.h, so the key set of each row is
// exactly SPEC's whatever the tile sees; every key position appears at most once per branch list.
//
// Chunks of KT slots are double-buffered with cp.async (16-byte copies, zero-filled empty slots)
// while the warps run the MMAs of the previous chunk. Rows of a tile past the sequence's end read
// zeros and write nothing; a separate small kernel zeroes the padding rows of the buffer.
//
// Eligibility (sparse_attention_fwd.cu takes the row kernels otherwise): BLOSSOMREC_TILED=1
// (opt-in: measured slower than the row kernels on the PERF.md shapes, docs/PERF_NOTES.md v6),
// float16 or bfloat16, power block 1, selection width <= 16, G <= 8, sm_80 or newer.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>

#include "cuda/sparse_attention.cuh"
#include "cuda/sparse_attention_tiled.h"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kTileRows = 16;
constexpr int kMaxFar = 40;  // powers of two above 16 below 2^31 (the near range covers the rest)

template <int D>
struct TiledConfig {
  static constexpr int KT = D <= 64 ? 64 : 32;  // key slots per chunk
  static constexpr int KS = D + 8;              // smem row stride (elements): conflict-free fragments
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers: asynchronous 16-byte copies and the m16n8k16 MMA with float32 accumulators.
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16 x 16, row-major): reg0 (row g, cols 2t, 2t+1), reg1 (row g+8, same cols),
//                           reg2 (row g, cols 2t+8, 2t+9), reg3 (row g+8, cols 2t+8, 2t+9)
//   B (16 x 8):             reg0 (rows 2t, 2t+1, col g), reg1 (rows 2t+8, 2t+9, col g)
//   C (16 x 8):             c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, cols 2t, 2t+1)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Two 16-bit values into one register, the first in the low half (the lower column / row).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  const uint32_t a = *reinterpret_cast<const uint16_t*>(&lo);
  const uint32_t b = *reinterpret_cast<const uint16_t*>(&hi);
  return a | (b << 16);
}

// ---------------------------------------------------------------------------------------------
// Which tile does this CTA serve?
// ---------------------------------------------------------------------------------------------
struct Tile {
  int64_t bq;   // batch entry of the buffer
  int64_t s;    // buffer row (within the batch entry) of the sequence's token 0
  int64_t b;    // sequence
  int L;        // sequence length
  int i0;       // first row of the tile (position in the sequence)
};

// Padded layouts: tile x is tile x % tiles_per_seq of sequence x / tiles_per_seq. Packed layout:
// tile_end[b] is the inclusive prefix sum of the sequences' tile counts.
__device__ __forceinline__ bool find_tile(const SeqParams& sp, const int32_t* tile_end,
                                          int64_t tiles_per_seq, int64_t x, Tile* t) {
  int64_t b, tt;
  if (tile_end == nullptr) {
    b = x / tiles_per_seq;
    tt = x - b * tiles_per_seq;
    if (b >= sp.B) return false;
  } else {
    int64_t lo = 0, hi = sp.B;  // first b with tile_end[b] > x
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (tile_end[mid] > x) hi = mid; else lo = mid + 1;
    }
    b = lo;
    if (b >= sp.B) return false;
    tt = x - (b > 0 ? tile_end[b - 1] : 0);
  }
  int64_t s, L;
  seq_bounds(sp, b, &s, &L);
  if (tt * kTileRows >= L) return false;
  t->bq = sp.Bq == 1 ? 0 : b;
  t->s = s;
  t->b = b;
  t->L = int(L);
  t->i0 = int(tt * kTileRows);
  return true;
}

// The key lists of the tile's two branches (see the file comment).
struct TileKeys {
  // selected branch: own range, then n_union blocks of b keys
  int own_lo, own_len, n_union, b;
  // STIS branch: near range, far ranges (shared memory), sink
  int near_lo, near_len, n_far, sink;
  int len[2];  // slots per branch
};

// Slot k (< keys.len[branch]) -> key position and tag (-1: masked by the rule of the branch;
// u >= 0: union block u, masked by its per-row count).
__device__ __forceinline__ void slot_key(const TileKeys& kk, int branch, int k, const int32_t* uni,
                                         const int32_t* far_lo, const int32_t* far_len, int* pos,
                                         int* tag) {
  *tag = -1;
  if (branch == 0) {
    if (k < kk.own_len) {
      *pos = kk.own_lo + k;
      return;
    }
    k -= kk.own_len;
    const int u = k / kk.b;
    *pos = uni[u] * kk.b + (k - u * kk.b);
    *tag = u;
    return;
  }
  if (k < kk.near_len) {
    *pos = kk.near_lo + k;
    return;
  }
  k -= kk.near_len;
  for (int f = 0; f < kk.n_far; ++f) {
    if (k < far_len[f]) {
      *pos = far_lo[f] + k;
      return;
    }
    k -= far_len[f];
  }
  *pos = kk.sink;  // the one slot left
}

template <typename T, int D>
__global__ void __launch_bounds__(256)
    sparse_attention_fwd_tiled_kernel(const AttnParams p, const FwdOut o, const int32_t* tile_end,
                                      int64_t tiles_per_seq) {
  using Cfg = TiledConfig<D>;
  constexpr int KT = Cfg::KT, KS = Cfg::KS;
  constexpr int kPieces = D / 8;  // 16-byte pieces per key row
  using M = Mma<T>;

  extern __shared__ __align__(16) unsigned char smem[];
  T* kbuf = reinterpret_cast<T*>(smem);  // [2][KT][KS]
  T* vbuf = kbuf + 2 * KT * KS;          // [2][KT][KS]
  const int width = int(p.width);
  int32_t* ent = reinterpret_cast<int32_t*>(vbuf + 2 * KT * KS);  // [16 * width] row selections
  int32_t* uni = ent + kTileRows * width;                          // [16 * width] union blocks
  uint8_t* ucnt = reinterpret_cast<uint8_t*>(uni + kTileRows * width);  // [16 * width][16]
  __shared__ int32_t slot_pos[2][KT];
  __shared__ int32_t slot_tag[2][KT];
  __shared__ int32_t far_lo[kMaxFar], far_len[kMaxFar];
  __shared__ int32_t s_n_union, s_n_far;

  Tile tile;
  if (!find_tile(p.seq, tile_end, tiles_per_seq, blockIdx.x, &tile)) return;
  const int g = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t h = int64_t(g) * p.G + warp;
  const int L = tile.L, i0 = tile.i0;
  const int b = int(p.select_block);
  const bool causal = p.stis.causal;
  const int64_t row0 = tile.bq * p.seq.N + tile.s;  // buffer row of token 0

  // ---- the selected branch's union of blocks -------------------------------------------------
  const int n_ent = kTileRows * width;
  for (int e = threadIdx.x; e < n_ent; e += blockDim.x) {
    const int r = e / width, c = e - r * width;
    const int i = i0 + r;
    int J = -1;
    if (i < L) {
      const int64_t n = tile.s + i;
      const int64_t cnt_raw = p.sel_cnt[tile.bq * p.cnt_sb + n * p.cnt_sn + g * p.cnt_sh];
      if (c < cnt_raw) {
        J = p.sel_idx[tile.bq * p.sel_sb + n * p.sel_sn + g * p.sel_sh + c];
        if (!block_visible(J, i, L / b, b, causal)) J = -1;
      }
    }
    ent[e] = J;
  }
  __syncthreads();
  // First occurrences (ucnt, not yet in use, holds the flags), then their compaction by warp 0.
  for (int e = threadIdx.x; e < n_ent; e += blockDim.x) {
    const int J = ent[e];
    bool first = J >= 0;
    for (int e2 = 0; e2 < e && first; ++e2) first = ent[e2] != J;
    ucnt[e] = first ? 1 : 0;
  }
  __syncthreads();
  if (warp == 0) {
    int count = 0;
    for (int base = 0; base < n_ent; base += 32) {
      const int e = base + lane;
      const bool first = e < n_ent && ucnt[e] != 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, first);
      if (first) uni[count + __popc(ballot & ((1u << lane) - 1u))] = ent[e];
      count += __popc(ballot);
    }
    if (lane == 0) s_n_union = count;
  }

  // ---- the STIS branch's far ranges ------------------------------------------------------------
  TileKeys kk;
  const int w = int(p.stis.window);
  const int reach = p.stis.use_power ? (w - 1 > 16 ? w - 1 : 16) : w - 1;
  kk.near_lo = i0 - reach > 0 ? i0 - reach : 0;
  {
    const int hi = causal ? i0 + kTileRows : i0 + kTileRows + w - 1;
    kk.near_len = (hi < L ? hi : L) - kk.near_lo;
  }
  if (threadIdx.x == 0) {
    int nf = 0;
    if (p.stis.use_power) {
      for (int64_t d = 32; d <= i0 && nf < kMaxFar; d <<= 1) {
        const int lo = i0 - int(d);
        const int hi = lo + kTileRows < kk.near_lo ? lo + kTileRows : kk.near_lo;
        if (hi > lo) {
          far_lo[nf] = lo;
          far_len[nf] = hi - lo;
          ++nf;
        }
      }
    }
    s_n_far = nf;
  }
  __syncthreads();
  kk.n_far = s_n_far;
  int far_total = 0;
  for (int f = 0; f < kk.n_far; ++f) far_total += far_len[f];
  kk.sink = (!causal && p.stis.use_sink && L - 1 >= kk.near_lo + kk.near_len) ? L - 1 : -1;
  kk.len[1] = kk.near_len + far_total + (kk.sink >= 0 ? 1 : 0);

  // ---- per-(union block, row) counts -----------------------------------------------------------
  kk.n_union = s_n_union;
  kk.b = b;
  for (int x = threadIdx.x; x < kk.n_union * kTileRows; x += blockDim.x) {
    const int u = x / kTileRows, r = x - u * kTileRows;
    int c = 0;
    for (int e = 0; e < width; ++e) c += ent[r * width + e] == uni[u];
    ucnt[x] = uint8_t(c);
  }
  kk.own_lo = (i0 / b) * b;
  {
    const int last = i0 + kTileRows - 1 < L - 1 ? i0 + kTileRows - 1 : L - 1;
    const int hi = causal ? last + 1 : (last / b + 1) * b;
    kk.own_len = (hi < L ? hi : L) - kk.own_lo;
  }
  kk.len[0] = kk.own_len + kk.n_union * b;
  __syncthreads();  // ucnt

  // ---- Q fragments (unscaled, the input dtype) --------------------------------------------------
  uint32_t qa[D / 16][4];
  {
    const T* qh = static_cast<const T*>(p.q) + tile.bq * p.q_sb + h * p.q_sh;
    const int ia = i0 + gid, ib = i0 + gid + 8;
    const T* qra = qh + (tile.s + ia) * p.q_sn;
    const T* qrb = qh + (tile.s + ib) * p.q_sn;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int c0 = ks * 16 + 2 * tig;
      qa[ks][0] = ia < L ? *reinterpret_cast<const uint32_t*>(qra + c0) : 0u;
      qa[ks][1] = ib < L ? *reinterpret_cast<const uint32_t*>(qrb + c0) : 0u;
      qa[ks][2] = ia < L ? *reinterpret_cast<const uint32_t*>(qra + c0 + 8) : 0u;
      qa[ks][3] = ib < L ? *reinterpret_cast<const uint32_t*>(qrb + c0 + 8) : 0u;
    }
  }

  // ---- the chunk pipeline ------------------------------------------------------------------------
  const int n_chunks0 = (kk.len[0] + KT - 1) / KT;
  const int n_chunks = n_chunks0 + (kk.len[1] + KT - 1) / KT;
  const T* kseq = static_cast<const T*>(p.k) + tile.bq * p.k_sb + tile.s * p.k_sn + g * p.k_sh;
  const T* vseq = static_cast<const T*>(p.v) + tile.bq * p.v_sb + tile.s * p.v_sn + g * p.v_sh;

  auto issue = [&](int c) {
    const int buf = c & 1;
    const int branch = c < n_chunks0 ? 0 : 1;
    const int k0 = (branch == 0 ? c : c - n_chunks0) * KT;
    for (int x = threadIdx.x; x < KT * kPieces; x += blockDim.x) {
      const int slot = x / kPieces, piece = x - slot * kPieces;
      const int k = k0 + slot;
      int pos = -1, tag = -1;
      if (k < kk.len[branch]) slot_key(kk, branch, k, uni, far_lo, far_len, &pos, &tag);
      if (piece == 0) {
        slot_pos[buf][slot] = pos;
        slot_tag[buf][slot] = tag;
      }
      const int64_t j = pos >= 0 ? pos : 0;
      cp_async16(kbuf + (buf * KT + slot) * KS + piece * 8, kseq + j * p.k_sn + piece * 8, pos >= 0);
      cp_async16(vbuf + (buf * KT + slot) * KS + piece * 8, vseq + j * p.v_sn + piece * 8, pos >= 0);
    }
    cp_async_commit();
  };

  // Per-thread state: rows gid (index 0) and gid + 8 (index 1) of the warp's 16 x D output.
  float acc[D / 8][4];
  float m_run[2], l_run[2];
  float o_sel[D / 8][4];
  float lse_sel[2] = {0.f, 0.f};
  auto reset = [&]() {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    m_run[0] = m_run[1] = -INFINITY;
    l_run[0] = l_run[1] = 0.f;
  };
  // Normalises acc in place and returns the two rows' lse (natural log).
  auto finish = [&](float* lse) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float l = l_run[rr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        acc[nt][2 * rr] *= inv;
        acc[nt][2 * rr + 1] *= inv;
      }
      lse[rr] = l > 0.f ? (m_run[rr] + log2f(l)) * kLn2 : 0.f;
    }
  };
  auto store_rows = [&](void* dst, float (*val)[4]) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int i = i0 + gid + 8 * rr;
      if (i >= L) continue;
      T* row = static_cast<T*>(dst) + ((row0 + i) * p.H + h) * D;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(row + nt * 8 + 2 * tig) =
            M::pack(val[nt][2 * rr], val[nt][2 * rr + 1]);
      }
    }
  };

  reset();
  issue(0);
  for (int c = 0; c < n_chunks; ++c) {
    const int buf = c & 1;
    if (c + 1 < n_chunks) {
      issue(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (c == n_chunks0) {  // the selected branch is complete
      finish(lse_sel);
      store_rows(o.o_sel, acc);
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o_sel[nt][e] = acc[nt][e];
      reset();
    }
    const int branch = c < n_chunks0 ? 0 : 1;
    const int valid = kk.len[branch] - (branch == 0 ? c : c - n_chunks0) * KT;  // slots in use
    const T* ks = kbuf + buf * KT * KS;
    const T* vs = vbuf + buf * KT * KS;

    // S = Q K^T for the chunk's key slots (8-key tiles past the valid slots are skipped).
    float s[KT / 8][4];
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
      if (nt * 8 >= valid) continue;
      const T* krow = ks + (nt * 8 + gid) * KS + 2 * tig;
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kd * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kd * 16 + 8);
        M::run(s[nt], qa[kd], b0, b1);
      }
    }

    // Scale to base 2, mask per (row, key) and take the rows' running maxima.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int i = i0 + gid + 8 * rr;
        const int col = nt * 8 + 2 * tig + (e & 1);
        const int j = slot_pos[buf][col];
        const int tag = slot_tag[buf][col];
        float bias = -INFINITY;
        if (j >= 0 && i < L) {
          if (branch == 0) {
            if (tag < 0) {
              const int lo = (i / b) * b;
              const int hi = causal ? i + 1 : (lo + b < L ? lo + b : L);
              if (j >= lo && j < hi) bias = 0.f;
            } else {
              const int cnt = ucnt[tag * kTileRows + gid + 8 * rr];
              if (cnt > 0) bias = cnt == 1 ? 0.f : log2f(float(cnt));
            }
          } else if (stis_visible(i, j, L, p.stis.window, 1, p.stis.use_power, p.stis.use_sink,
                                  causal)) {
            bias = 0.f;
          }
        }
        s[nt][e] = s[nt][e] * p.scale_log2 + bias;
        mx[rr] = fmaxf(mx[rr], s[nt][e]);
      }
    }

    // Online softmax update of the two rows (the 4 threads of a quad share a row).
    float corr[2], m_use[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
      const float m_new = fmaxf(m_run[rr], mx[rr]);
      m_use[rr] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
      corr[rr] = exp2f(m_run[rr] - m_use[rr]);
      m_run[rr] = m_new;
      l_run[rr] *= corr[rr];
    }
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      acc[nt][0] *= corr[0];
      acc[nt][1] *= corr[0];
      acc[nt][2] *= corr[1];
      acc[nt][3] *= corr[1];
    }
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);
        l_run[e >> 1] += s[nt][e];
      }
    }

    // O += P V, P in the input dtype (the C fragments of two 8-key tiles are the A fragment of
    // one 16-key step).
#pragma unroll
    for (int kd = 0; kd < KT / 16; ++kd) {
      if (kd * 16 >= valid) continue;
      uint32_t pa[4];
      pa[0] = M::pack(s[2 * kd][0], s[2 * kd][1]);
      pa[1] = M::pack(s[2 * kd][2], s[2 * kd][3]);
      pa[2] = M::pack(s[2 * kd + 1][0], s[2 * kd + 1][1]);
      pa[3] = M::pack(s[2 * kd + 1][2], s[2 * kd + 1][3]);
      const T* v0 = vs + (kd * 16 + 2 * tig) * KS + gid;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        const T* vc = v0 + nt * 8;
        const uint32_t b0 = pack2<T>(vc[0], vc[KS]);
        const uint32_t b1 = pack2<T>(vc[8 * KS], vc[9 * KS]);
        M::run(acc[nt], pa, b0, b1);
      }
    }
    __syncthreads();  // the buffer is refilled by the next iteration's issue
  }

  // ---- the STIS branch's result and the gated combine -----------------------------------------
  float lse_win[2];
  finish(lse_win);
  store_rows(o.o_win, acc);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int i = i0 + gid + 8 * rr;
    if (i >= L) continue;
    const int64_t rh = (row0 + i) * p.H + h;
    const float2 gate = *reinterpret_cast<const float2*>(p.gates + rh * 2);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      o_sel[nt][2 * rr] = gate.x * o_sel[nt][2 * rr] + gate.y * acc[nt][2 * rr];
      o_sel[nt][2 * rr + 1] = gate.x * o_sel[nt][2 * rr + 1] + gate.y * acc[nt][2 * rr + 1];
    }
    if (tig == 0) *reinterpret_cast<float2*>(o.lse + rh * 2) = make_float2(lse_sel[rr], lse_win[rr]);
  }
  store_rows(o.out, o_sel);
}

// Padding rows of the buffer (no sequence covers them): zeros in every output.
__global__ void zero_padding_rows_kernel(const AttnParams p, const FwdOut o, int64_t row_bytes) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= p.seq.Bq * p.seq.N) return;
  if (row_info(p.seq, r).b >= 0) return;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t x = threadIdx.x; x < row_bytes / 16; x += blockDim.x) {
    reinterpret_cast<uint4*>(static_cast<char*>(o.out) + r * row_bytes)[x] = zero;
    reinterpret_cast<uint4*>(static_cast<char*>(o.o_sel) + r * row_bytes)[x] = zero;
    reinterpret_cast<uint4*>(static_cast<char*>(o.o_win) + r * row_bytes)[x] = zero;
  }
  for (int64_t x = threadIdx.x; x < p.H; x += blockDim.x) {
    reinterpret_cast<float2*>(o.lse + r * p.H * 2)[x] = make_float2(0.f, 0.f);
  }
}

template <int D>
int64_t tiled_smem_bytes(int64_t width) {
  using Cfg = TiledConfig<D>;
  const int64_t kv = 4 * int64_t(Cfg::KT) * Cfg::KS * 2;  // k and v, two buffers, 16-bit
  return kv + 2 * kTileRows * width * 4 + kTileRows * width * kTileRows;
}

template <typename T, int D>
void launch_tiled_typed(const AttnParams& p, const FwdOut& o, const Dims& d,
                        const int32_t* tile_end, int64_t tiles_per_seq, int64_t n_tiles,
                        cudaStream_t stream) {
  auto kernel = sparse_attention_fwd_tiled_kernel<T, D>;
  const int64_t smem = align16(tiled_smem_bytes<D>(p.width));
  allow_dynamic_smem(kernel, smem, 4 * 1024);
  const dim3 grid(unsigned(n_tiles), unsigned(d.KVH));
  kernel<<<grid, unsigned(32 * d.G), size_t(smem), stream>>>(p, o, tile_end, tiles_per_seq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_tiled_dtype(const AttnParams& p, const FwdOut& o, const Dims& d,
                        const int32_t* tile_end, int64_t tiles_per_seq, int64_t n_tiles,
                        cudaStream_t stream) {
  switch (d.D) {
    case 16: launch_tiled_typed<T, 16>(p, o, d, tile_end, tiles_per_seq, n_tiles, stream); break;
    case 32: launch_tiled_typed<T, 32>(p, o, d, tile_end, tiles_per_seq, n_tiles, stream); break;
    case 64: launch_tiled_typed<T, 64>(p, o, d, tile_end, tiles_per_seq, n_tiles, stream); break;
    case 128: launch_tiled_typed<T, 128>(p, o, d, tile_end, tiles_per_seq, n_tiles, stream); break;
    default: TORCH_CHECK(false, "unsupported head dim ", d.D);
  }
}

}  // namespace

bool fwd_tiled_eligible(const Dims& d, at::ScalarType dtype, int64_t power_block, int64_t width,
                        int64_t window) {
  const char* e = std::getenv("BLOSSOMREC_TILED");
  if (e == nullptr || e[0] != '1') return false;
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (power_block != 1 || width > 16 || d.G > 8) return false;
  if (d.D != 16 && d.D != 32 && d.D != 64 && d.D != 128) return false;
  // positions and slot counts are int32 inside a tile
  if (d.N >= (int64_t(1) << 30) || window >= (int64_t(1) << 20)) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

void launch_fwd_tiled(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                      const at::Tensor& seq_start, const at::Tensor& seq_len, cudaStream_t stream) {
  const bool packed = d.Bq == 1 && d.B > 1;
  at::Tensor tile_end;
  int64_t tiles_per_seq = ceil_div(d.N, kTileRows), n_tiles = d.B * tiles_per_seq;
  if (packed) {
    // The sequences' tile counts, clamped to the buffer as seq_bounds does, summed on the device
    // (no host sync): tile_end[b] = sum of ceil(L_b' / 16) for b' <= b.
    const at::Tensor s = seq_start.clamp(0, d.N);
    const at::Tensor l = at::minimum(seq_len.clamp_min(0), d.N - s);
    tile_end = at::cumsum(at::floor_divide(l + (kTileRows - 1), kTileRows), 0).to(at::kInt);
    n_tiles = ceil_div(d.N, kTileRows) + d.B;  // at least the sum of the sequences' counts
  }
  const int32_t* te = packed ? tile_end.data_ptr<int32_t>() : nullptr;
  if (n_tiles > 0) {
    if (dtype == at::kHalf) {
      launch_tiled_dtype<__half>(p, o, d, te, tiles_per_seq, n_tiles, stream);
    } else {
      launch_tiled_dtype<__nv_bfloat16>(p, o, d, te, tiles_per_seq, n_tiles, stream);
    }
  }
  const dim3 block(32, 8);
  const int64_t rows = d.Bq * d.N;
  zero_padding_rows_kernel<<<unsigned(ceil_div(rows, 8)), block, 0, stream>>>(
      p, o, d.H * d.D * 2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace blossomrec
