// The fused tensor-core kernels of sparse_attention_fwd / _bwd for short and medium sequences
// (float16 / bfloat16, at most fused_max_len() tokens).
//
// Why tiles work here when they did not for long sequences (docs/PERF_NOTES.md, v6 and "Kernel
// design"): a sequence of L <= 1024 tokens has at most 64 key tiles of 16, and each 16-row query
// tile needs only the key tiles that some row of it sees, in either branch (its own block, the
// blocks its rows selected, the STIS window, one tile per power of two >= 16). Over that union the
// work is dense:
// S = Q K^T is one mma.sync m16n8k16 per 8 keys and 16 dims, and ONE S tile feeds both branches.
// Each branch masks it per (row, key) by the rules of common/mask.h (LTIS: own range or a selected
// block, a block listed twice counting once; STIS: window, powers of two, sink), read as one bit
// per element, and keeps its own exact online softmax and P V accumulator; the gated combine is
// the epilogue.
//
// Layout of the work: the G query heads of a kv group share their key sets, so a CTA serves one
// (sequence, kv group, chunk of 16 * tiles positions) with one warp per (16-row tile, head): the M
// dimension of the products is G heads x 16 rows, spread over G warps that read the same shared
// memory. A small kernel first computes, per (row, 16-key tile), a 32-bit word of the keys the row
// sees in each branch, and per 16-row query tile which key tiles it needs in each branch
// (fused_masks_kernel, a thread per row: the words replace ~40 instructions of range arithmetic
// per lane and tile, docs/PERF_NOTES.md v16; computed inside each CTA, one warp's serial work kept
// the others waiting at a barrier for 44% of the forward's cycles, v13-v14); a tile that no row of
// a query tile needs is never touched.
//
// - Forward (query-outer): K and V of the keys the chunk needs stream through shared memory in
//   segments (all of them at once up to 672 keys at D = 16, 336 at D = 64; a later segment only
//   the key tiles some query tile of the chunk needs, v35); each warp keeps the
//   16 x D accumulators of both branches of its M tile in registers. An M tile is P = 16 / G
//   positions x the G heads of the group (v31): its key tiles are the union over P positions,
//   computed in the kernel from the staged words (m_tile_needs), not over 16.
// - dq (query-outer, the forward's layout and M tiles): the gate gradients and each branch's
//   delta = gate * <dout, o_branch> first (written to aux for the dk/dv kernel), then per key tile
//   S, both P from the saved lse, dP = dout V^T once for both branches (the gates scale it per
//   branch), dS = P_sel (g_sel dP - delta_sel) + P_win (g_win dP - delta_win), dQ += dS K.
// - dk/dv (key-outer): a warp per 16 keys of the kv group walks the M tiles (P positions x G
//   heads, as above; v32) that need those keys in increasing order: S^T = K Q^T, dP^T = V dout^T,
//   dV += (g_sel P_sel + g_win P_win)^T dout, dK += dS^T Q; Q, dout and aux tiles double-buffered
//   per warp with cp.async from per-CTA row offsets (MTileRows, v34); each dK, dV element one
//   warp's sum in a fixed order (deterministic, no atomics).
// Padded batches: the kernels zero their chunk's padding rows themselves (position i >= L of
// sequence b is buffer row (seq_start + i) mod N, a bijection onto the padding rows). Packed batches:
// the row kernels zero the padding rows and serve the sequences longer than fused_max_len().
#include "cuda/fused_attention.cuh"

#include <ATen/cuda/CUDAContext.h>

#include <cstdlib>
#include <limits>

#include "cuda/dispatch.h"
#include "cuda/mma.cuh"

namespace blossomrec {
namespace cuda {
namespace {

constexpr int kTile = 16;          // query rows and keys per MMA tile
constexpr int kMaxTiles = 64;      // key tiles of a sequence: one 64-bit mask
constexpr int kMaxLen = kTile * kMaxTiles;
constexpr int kMaxWarps = 8;
constexpr int kThreads = 32 * kMaxWarps;
constexpr int kDkdvWarps = 4;  // warps (key tiles) per fused_dkdv_kernel CTA, at most

// Shared-memory row stride in elements of a D-wide row: 16 bytes of padding put the 8 rows of an
// ldmatrix in distinct bank groups for every D here.
constexpr int row_stride(int D) { return D + 8; }

template <int D>
struct FusedTraits {
  static constexpr int kStride = row_stride(D);
  // Registers: the forward holds two 16 x D float32 accumulators per warp (D / 2 registers per lane
  // each), dq Q and dout fragments and one accumulator, dk/dv two accumulators plus K and V
  // fragments. Two CTAs of 256 threads per SM cap a thread at 128 registers, three at 80 (local
  // ptxas, nvcc 13.0, sm_90; H200 timings in docs/PERF_NOTES.md):
  // - D = 16, three CTAs: forward 16 bytes of spill, dk/dv 20; pays (v16: S1 fwd 175 -> 155 us,
  //   dq 223 -> 169, dk/dv 177 -> 142).
  // - D = 64, two CTAs for the forward and dq (108 and 56 bytes of spill since v18 staged the
  //   chunk's masks and gates in shared memory): S1 fwd 486 -> 355 us, dq 543 -> 310 (v18).
  // - fused_dkdv_kernel (CTAs of kDkdvWarps = 4 warps since v32, so its bounds count 128
  //   threads): D = 16 six CTAs (78 registers, no spill; eight at 64 registers spilled 24 bytes
  //   and were slower, v33: S3 372 -> 422 us per call), D = 32 four (124), D = 64 three (168, no
  //   spill; v33: S3 711 -> 625 us, S2 505 -> 435 against two CTAs at 190). Before v32 (CTAs of
  //   8 warps) two CTAs at D = 64 spilled 276 bytes and were slower (S2 655 -> 800 us), and warp
  //   pairs (a key warp with K and dK, a value warp with V and dV, 125 registers, 16 warps per
  //   SM) too (v30: S3 1016 -> 1355 us per call; each warp of a pair waits on the other).
  static constexpr int kFwdMinBlocks = D <= 16 ? 3 : (D <= 64 ? 2 : 1);
  static constexpr int kDkdvMinBlocks = D <= 16 ? 6 : (D <= 32 ? 4 : (D <= 64 ? 3 : 1));
  // The long-sequence dk/dv adds a row loop with 16-dim k, v, q, dout and two accumulators per
  // lane: at D = 16 three CTAs (80 registers) spilled 456 bytes, two do not (local ptxas).
  static constexpr int kLongDkdvMinBlocks = D <= 16 ? 2 : 1;
  // K + V of one forward / dq segment: three CTAs per SM at D = 16, two above.
  static constexpr int64_t kSegmentBudget = (D <= 16 ? 64 : 96) * 1024;
};

struct FusedArgs {
  AttnParams p;
  const int32_t* unit_end;  // packed: inclusive prefix of the units per sequence; null: padded
  int64_t per_seq;          // padded: units per sequence
  int rows;                 // positions per unit (a multiple of 16)
  int seg;                  // keys per shared-memory segment (forward, dq)
  // What fused_masks_kernel computed: words[(g * tiles_cap + t) * mask_rows + buffer row] says which
  // keys 16 t .. 16 t + 15 the row sees (bit k: LTIS, bit 16 + k: STIS; see mask_words);
  // need[((g * B + b) * tiles_cap + t) * 2 + branch] the key tiles that query tile t of sequence b
  // needs in each branch (LTIS 0, STIS 1).
  uint32_t* words;
  uint64_t* need;
  int64_t mask_rows;
  int tiles_cap;
  // The launch's kv groups are g0 .. g0 + gridDim.y - 1 (blockIdx.y counts from g0): words and
  // need hold those groups only, and aux (the dq and dk/dv kernels) rows of aux_heads heads from
  // head g0 G on. The fused backward may run a chunk of the groups per launch (launch_bwd).
  int64_t g0 = 0;
  int64_t aux_heads = 0;
  // The hyper-parameters in 32-bit arithmetic: positions are below 2^11 here, so a window, block
  // or power block above 2^11 acts as 2^11 does.
  int b;                    // select_block (clamped)
  StisParams st;            // p.stis with window and power block clamped
  // Padded batches: the units of the sequences with min_len < L <= max_len only (the one-CTA
  // backward takes the short ones, empty ones included, dq and dk/dv the rest; packed batches
  // count their units so).
  int64_t min_len = -1, max_len = std::numeric_limits<int64_t>::max();
};

// One unit of work: a chunk of positions [c0, c0 + rows) of sequence b.
struct Unit {
  int64_t bq, s, b;  // batch entry, buffer row of token 0 within it, sequence
  int L, c0;
};

// Padded: unit x is chunk x / B of sequence x % B (the chunks of every sequence before the next
// chunk index). Packed: the units of sequence b are unit_end[b-1] .. unit_end[b] - 1. reverse
// numbers the chunks of a sequence from its end (causal query chunks: the last are the heaviest).
__device__ __forceinline__ bool find_unit(const FusedArgs& a, bool reverse, Unit* u) {
  const SeqParams& sp = a.p.seq;
  const int64_t x = blockIdx.x;
  int64_t b, c, count;
  if (a.unit_end == nullptr) {
    b = blockIdx.x % unsigned(sp.B);  // the grid is B * per_seq < 2^31 units
    c = blockIdx.x / unsigned(sp.B);
    count = a.per_seq;
    if (c >= count) return false;
  } else {
    int64_t lo = 0, hi = sp.B;  // first b with unit_end[b] > x
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (a.unit_end[mid] > x) hi = mid; else lo = mid + 1;
    }
    b = lo;
    if (b >= sp.B) return false;
    const int64_t before = b > 0 ? a.unit_end[b - 1] : 0;
    c = x - before;
    count = a.unit_end[b] - before;
  }
  if (reverse) c = count - 1 - c;
  int64_t s, L;
  seq_bounds(sp, b, &s, &L);
  if (a.unit_end == nullptr && (L <= a.min_len || L > a.max_len)) return false;
  u->bq = sp.Bq == 1 ? 0 : b;
  u->s = s;
  u->b = b;
  u->L = int(L);
  u->c0 = int(c * a.rows);
  return true;
}

// Padded batches: does the unit's chunk hold padding positions (L <= i < N)?
__device__ __forceinline__ bool has_padding(const AttnParams& p, const Unit& u, int rows) {
  return u.L < p.seq.N && u.c0 + rows > u.L;
}

// ---------------------------------------------------------------------------------------------
// Masks
// ---------------------------------------------------------------------------------------------
// Key tiles [lo / 16, (hi - 1) / 16] as bits (0 <= lo < hi <= 1024).
__device__ __forceinline__ uint64_t tile_bits(int lo, int hi) {
  const int t0 = lo >> 4, t1 = (hi - 1) >> 4;
  return (~0ull >> (63 - t1)) & (~0ull << t0);
}

// The masks as words: for each (row, 16-key tile) one 32-bit word, bit k (k < 16) set when the row
// sees key 16 t + k in the LTIS branch (own range or a selected block, each block once), bit 16 + k
// in the STIS branch (window, powers of two, sink). One thread per (position, kv group) builds its
// row's words from the ranges of common/mask.h in a column of shared memory, then stores them. The
// kernels then test one bit per element (v16, docs/PERF_NOTES.md: per element the range
// arithmetic cost about 40 instructions per lane and 16 x 16 tile).
constexpr int kMaskRows = 128;  // positions per masks CTA (a column of tiles_cap words each)

// ORs the keys [lo, hi) (0 <= lo < hi) into a row's words (word t at col[t * kMaskRows]), shifted
// by `shift` (0: LTIS, 16: STIS).
__device__ __forceinline__ void or_range(uint32_t* col, int lo, int hi, int shift) {
  for (int t = lo >> 4; t <= (hi - 1) >> 4; ++t) {
    const int a0 = max(lo, t * kTile) - t * kTile, a1 = min(hi, t * kTile + kTile) - t * kTile;
    col[t * kMaskRows] |= ((1u << (a1 - a0)) - 1u) << (a0 + shift);
  }
}

// Row i (0 <= i < L) of kv group g: its words in col, its selected blocks from the selection
// (visible whole blocks only; a block listed twice is one bit).
__device__ __forceinline__ void mask_words(const FusedArgs& a, const Unit& u, int64_t g, int i,
                                           uint32_t* col) {
  const AttnParams& p = a.p;
  const int64_t n = u.s + i;
  const int nb = u.L / a.b;  // <= 64 (fused_max_len)
  const int64_t c_raw = p.sel_cnt[u.bq * p.cnt_sb + n * p.cnt_sn + g * p.cnt_sh];
  const int cnt = int(c_raw < 0 ? 0 : (c_raw < p.width ? c_raw : p.width));
  const int32_t* sel = p.sel_idx + u.bq * p.sel_sb + n * p.sel_sn + g * p.sel_sh;
  uint64_t blocks = 0;
  for (int c0 = 0; c0 < cnt; c0 += 4) {  // four loads in flight at a time
    int J[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) J[k] = c0 + k < cnt ? sel[c0 + k] : -1;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (block_visible(J[k], i, nb, a.b, p.stis.causal)) blocks |= 1ull << J[k];
    }
  }
  int lo, hi;
  own_block_range(i, u.L, a.b, p.stis.causal, &lo, &hi);
  or_range(col, lo, hi, 0);
  for (uint64_t bits = blocks; bits != 0; bits &= bits - 1) {
    const int J = __ffsll(static_cast<long long>(bits)) - 1;
    or_range(col, J * a.b, (J + 1) * a.b, 0);
  }
  for_each_stis_range(i, u.L, a.st, [&](int lo_, int hi_) { or_range(col, lo_, hi_, kTile); });
}

// One thread per (position, kv group) of the fused sequences, in units of kMaskRows positions: the
// row's words and, OR-ed over each 16-row tile (lanes 16 t .. 16 t + 15 of a warp), the tile's
// needs. Dynamic shared memory: tiles_cap * kMaskRows words.
__global__ void __launch_bounds__(kMaskRows) fused_masks_kernel(const FusedArgs a) {
  extern __shared__ uint32_t word_smem[];
  Unit u;
  if (!find_unit(a, false, &u)) return;
  const int64_t g = a.g0 + blockIdx.y;
  const int i = u.c0 + int(threadIdx.x);
  uint32_t* col = word_smem + threadIdx.x;
  uint64_t need_sel = 0, need_win = 0;
  if (i < u.L) {
    const int tiles = (u.L + kTile - 1) / kTile;
    for (int t = 0; t < tiles; ++t) col[t * kMaskRows] = 0u;
    mask_words(a, u, g, i, col);
    uint32_t* out = a.words + blockIdx.y * a.tiles_cap * a.mask_rows + u.bq * a.p.seq.N + u.s + i;
    for (int t = 0; t < tiles; ++t) {
      const uint32_t w = col[t * kMaskRows];
      out[t * a.mask_rows] = w;
      need_sel |= uint64_t((w & 0xffffu) != 0u) << t;
      need_win |= uint64_t((w >> 16) != 0u) << t;
    }
  }
#pragma unroll
  for (int off = 1; off < kTile; off <<= 1) {
    need_sel |= __shfl_xor_sync(0xffffffffu, need_sel, off);
    need_win |= __shfl_xor_sync(0xffffffffu, need_win, off);
  }
  if ((threadIdx.x & (kTile - 1)) == 0 && i < u.L) {
    uint64_t* nd = a.need + ((blockIdx.y * a.p.seq.B + u.b) * a.tiles_cap + i / kTile) * 2;
    nd[0] = need_sel;
    nd[1] = need_win;
  }
}

// The needs of query tile t (0 <= 16 t < L) of the unit's sequence.
__device__ __forceinline__ const uint64_t* tile_need(const FusedArgs& a, const Unit& u, int64_t g,
                                                     int t) {
  return a.need + (((g - a.g0) * a.p.seq.B + u.b) * a.tiles_cap + t) * 2;
}

// The index in aux of (buffer row, head h)'s first branch (FusedArgs::g0, aux_heads).
__device__ __forceinline__ int64_t aux_index(const FusedArgs& a, int64_t row, int64_t h) {
  return (row * a.aux_heads + h - a.g0 * a.p.G) * 2;
}

// A C tile's element masks: a lane holds rows g and g + 8, columns c -> 8 (c / 2) + 2 t + c % 2 of
// two n8 tiles. With the row's word shifted right by 2 t, column c's LTIS bit is col_bit(c) and its
// STIS bit 16 + col_bit(c).
__device__ __forceinline__ constexpr int col_bit(int c) { return (c >> 1) * 8 + (c & 1); }
__device__ __forceinline__ bool word_bit(uint32_t w, int bit) { return (w >> bit) & 1u; }

// ---------------------------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------------------------
// A fragments (16 rows x D) of two rows per lane read straight from global memory: row0 is row g,
// row1 row g + 8 (nullptr: zeros).
template <typename T, int D>
__device__ __forceinline__ void load_a_rows(uint32_t (&f)[D / 16][4], const T* row0, const T* row1,
                                            int tq) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int c = ks * 16 + 2 * tq;
    f[ks][0] = row0 ? *reinterpret_cast<const uint32_t*>(row0 + c) : 0u;
    f[ks][1] = row1 ? *reinterpret_cast<const uint32_t*>(row1 + c) : 0u;
    f[ks][2] = row0 ? *reinterpret_cast<const uint32_t*>(row0 + c + 8) : 0u;
    f[ks][3] = row1 ? *reinterpret_cast<const uint32_t*>(row1 + c + 8) : 0u;
  }
}

// C[16 x 16] (two n8 tiles) += A[16 x D] (fragments) . Bt^T, with Bt[16][D] row-major in shared
// memory (row stride KS): the product with the keys of a K or V tile, or the queries of a Q or
// dout tile.
template <typename T, int D, int KS>
__device__ __forceinline__ void mma_abt(float (&c)[2][4], const uint32_t (&a)[D / 16][4],
                                        const T* bt, int lane) {
  const T* row = bt + ((lane >> 4) * 8 + (lane & 7)) * KS + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t b[4];
    ldmatrix_x4(b, row + ks * 16);
    Mma<T>::run(c[0], a[ks], b[0], b[1]);
    Mma<T>::run(c[1], a[ks], b[2], b[3]);
  }
}

// acc[16 x 16] += A[16 x 16] . B, with B[16][16] a column slice of a row-major shared-memory
// matrix (row stride KS): one 16-column step of mma_ab.
template <typename T, int KS>
__device__ __forceinline__ void mma_ab16(float (&acc)[2][4], const uint32_t (&a)[4], const T* b,
                                         int lane) {
  uint32_t f[4];
  ldmatrix_x4_trans(f, b + (((lane >> 3) & 1) * 8 + (lane & 7)) * KS + (lane >> 4) * 8);
  Mma<T>::run(acc[0], a, f[0], f[1]);
  Mma<T>::run(acc[1], a, f[2], f[3]);
}

// acc[16 x D] += A[16 x 16] . B, with B[16][D] row-major in shared memory: P V, dS K, Pg^T dout,
// dS^T Q.
template <typename T, int D, int KS>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const uint32_t (&a)[4], const T* b,
                                       int lane) {
#pragma unroll
  for (int np = 0; np < D / 16; ++np) {
    mma_ab16<T, KS>(reinterpret_cast<float (&)[2][4]>(acc[2 * np]), a, b + np * 16, lane);
  }
}

// A fragments (16 rows x D) of a row-major shared-memory tile (row stride KS), as load_a_rows
// lays them out.
template <int D, int KS, typename T>
__device__ __forceinline__ void load_a_smem(uint32_t (&f)[D / 16][4], const T* tile, int lane) {
  const T* row = tile + (lane & 15) * KS + (lane >> 4) * 8;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(f[ks], row + ks * 16);
}

// Two C tiles (16 x 16) as the A fragment of the next product.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[2][4]) {
  a[0] = Mma<T>::pack(c[0][0], c[0][1]);
  a[1] = Mma<T>::pack(c[0][2], c[0][3]);
  a[2] = Mma<T>::pack(c[1][0], c[1][1]);
  a[3] = Mma<T>::pack(c[1][2], c[1][3]);
}

// x rounded up to whole tiles.
__device__ __forceinline__ int round_tile(int x) { return (x + kTile - 1) & ~(kTile - 1); }

// The keys a query chunk can see, rounded up to whole tiles: all of them when not causal; when
// causal, those up to the end of the last row's power block (d = i / p - j / p = 0 there: a
// causal STIS query sees the rest of its own power block).
__device__ __forceinline__ int key_end(const FusedArgs& a, const Unit& u) {
  if (!a.p.stis.causal) return round_tile(u.L);
  const int p = int(a.st.power_block);
  const int last = u.c0 + a.rows - 1;
  return round_tile(min(u.L, (last / p + 1) * p));
}

// Sum over the four lanes of a quad (the lanes holding one row of a C tile).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Keys [seg0, seg1) of the unit's sequence, kv group g, into ks / vs (rows past L zero-filled: a
// masked probability times a finite value stays 0); kMasked: only the key tiles of `tiles` (a
// subset of [seg0, seg1)'s), each at its place in the segment. All threads; issues and commits the
// copies (cp_async_wait<0> and a barrier publish them).
template <typename T, int D, int KS, bool kMasked = false>
__device__ __forceinline__ void stage_kv(T* ks, T* vs, const AttnParams& p, const Unit& u,
                                         int64_t g, int seg0, int seg1, uint64_t tiles = ~0ull) {
  constexpr int kChunks = D / 8;
  constexpr int kPerTile = kTile * kChunks;  // (row, 16-byte chunk) steps per key tile
  if (!kMasked) tiles = ~0ull;
  tiles = seg1 > seg0 ? tiles & tile_bits(seg0, seg1) : 0ull;
  if (tiles == 0) {  // an empty sequence (the one-CTA backward's)
    cp_async_commit();
    return;
  }
  const int lo = __ffsll(static_cast<long long>(tiles)) - 1;  // tiles != 0
  // A run of whole tiles from lo (the first segment, every D = 16 segment): steps map to keys
  // directly; else a thread walks the mask to its step's tile (v35: a later segment copies only
  // the tiles some query tile of the chunk needs, at N = 1024 about half of them).
  const bool run = !kMasked || ((tiles >> lo) & ((tiles >> lo) + 1)) == 0;
  const int n = __popcll(tiles) * kPerTile;
  const T* kbase = static_cast<const T*>(p.k) + u.bq * p.k_sb + g * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + u.bq * p.v_sb + g * p.v_sh;
  uint64_t rem = tiles;  // the mask from this thread's current tile on
  int cur = 0;           // its slot among the mask's tiles
  // A (row, 16-byte chunk) of K and the same of V per step: one row position for both (v28b).
  for (int x = threadIdx.x; x < n; x += blockDim.x) {
    const int slot = x / kPerTile, e = x - slot * kPerTile;
    int kt = lo + slot;
    if (!run) {
      for (; cur < slot; ++cur) rem &= rem - 1;
      kt = __ffsll(static_cast<long long>(rem)) - 1;
    }
    const int r = kt * kTile - seg0 + e / kChunks, c = e % kChunks;
    const int j = seg0 + r;
    const bool valid = j < u.L;
    const int64_t row = valid ? (u.s + j) : 0;
    cp_async16(ks + r * KS + c * 8, kbase + row * p.k_sn + c * 8, valid);
    cp_async16(vs + r * KS + c * 8, vbase + row * p.v_sn + c * 8, valid);
  }
  cp_async_commit();
}

// A later segment of keys [seg0, seg1) into ks / vs for the query-outer kernels (forward, dq), all
// threads, a barrier before (the previous segment is consumed) and after. False, staging nothing,
// when no query tile of the chunk needs these keys (`all`: CTA-uniform, so every warp skips the
// segment alike). kMasked (the forward): only the key tiles in `all`; the others hold the previous
// segment's keys, and no warp's pending tiles include them. The dq kernel copies whole segments
// (v35: masked, its time per call rose 2-4% at D = 64).
template <typename T, int D, int KS, bool kMasked>
__device__ __forceinline__ bool restage_kv(T* ks, T* vs, const AttnParams& p, const Unit& u,
                                           int64_t g, int seg0, int seg1, uint64_t all) {
  if ((all & tile_bits(seg0, seg1)) == 0) return false;
  __syncthreads();
  stage_kv<T, D, KS, kMasked>(ks, vs, p, u, g, seg0, seg1, all);
  cp_async_wait<0>();
  __syncthreads();
  return true;
}

// The lowest tile of `pending`, taken off it.
__device__ __forceinline__ int pop_tile(uint64_t& pending) {
  const int kt = __ffsll(static_cast<long long>(pending)) - 1;
  pending &= pending - 1;
  return kt;
}

// A query tile's next key tile: the lowest of `pending` (taken off it), with the lane's rows'
// mask words of it in w, shifted to the lane's columns (col_bit).
__device__ __forceinline__ int next_key_tile(uint64_t& pending, const uint32_t* wq, int rows,
                                             int tq, uint32_t (&w)[2]) {
  const int kt = pop_tile(pending);
  w[0] = wq[kt * rows] >> (2 * tq);
  w[1] = wq[kt * rows + 8] >> (2 * tq);
  return kt;
}

// Shared memory of the query-outer kernels (forward, dq) after the K and V segment: for the chunk's
// rows the mask words of every key tile up to key_end ([key tile][row], zeros past L), the needs
// of its query tiles ([tile][branch]), and per (row, head of the group) the gates and, in dq, the
// lse as float2. All of it is copied with the first segment in one batch of cp.async, so that the
// prologue waits on global memory once: before (v17) the tile needs, the words they pointed at and
// the gates each waited for a round trip of their own (docs/PERF_NOTES.md, v18).
struct RowSmemLayout {
  int64_t words, need, gates, lse, total;
};
__host__ __device__ __forceinline__ RowSmemLayout row_smem_layout(int64_t kv_bytes, int rows,
                                                                  int key_tiles, int64_t G,
                                                                  bool with_lse) {
  RowSmemLayout l;
  l.words = kv_bytes;                               // a multiple of 16 bytes
  l.need = l.words + int64_t(rows) * key_tiles * 4;  // rows: a multiple of 16
  l.gates = l.need + int64_t(rows / kTile) * 16;
  l.lse = l.gates + int64_t(rows) * G * 8;
  l.total = l.lse + (with_lse ? int64_t(rows) * G * 8 : 0);
  return l;
}

struct RowSmem {
  const uint32_t* words;  // [key tile][row]
  const uint64_t* need;   // [query tile][branch]
  const float2* gates;    // [row][head of the group]
  const float2* lse;      // [row][head of the group] (dq)
};

// Issues (does not commit) the copies of the chunk's words, needs, gates and lse (lse: null for
// the forward). key_tiles: the words' capacity in key tiles (the layout of row_smem_layout).
__device__ __forceinline__ RowSmem stage_rows(unsigned char* smem, int64_t kv_bytes,
                                              const FusedArgs& a, const Unit& u, int64_t g,
                                              int kend, const float* lse, int key_tiles) {
  const AttnParams& p = a.p;
  const int rows = a.rows;
  const RowSmemLayout l = row_smem_layout(kv_bytes, rows, key_tiles, p.G, lse != nullptr);
  uint32_t* words = reinterpret_cast<uint32_t*>(smem + l.words);
  uint64_t* need = reinterpret_cast<uint64_t*>(smem + l.need);
  float2* gates = reinterpret_cast<float2*>(smem + l.gates);
  float2* lses = reinterpret_cast<float2*>(smem + l.lse);
  {
    // Thread x copies row x % rows of key tiles x / rows, x / rows + step, ...; the threads past
    // step * rows (a block that is not a multiple of the rows: G = 3) copy nothing.
    const int t0 = int(threadIdx.x) / rows, r = int(threadIdx.x) - t0 * rows;
    const int step = int(blockDim.x) / rows;
    const int t_end = t0 < step ? kend / kTile : 0;
    const int i = u.c0 + r;
    const bool valid = i < u.L;
    const uint32_t* src = a.words + (g - a.g0) * a.tiles_cap * a.mask_rows + u.bq * p.seq.N + u.s +
                          (valid ? i : u.c0);
    for (int t = t0; t < t_end; t += step) {
      cp_async4(words + t * rows + r, src + t * a.mask_rows, valid);
    }
  }
  if (int(threadIdx.x) < rows / kTile) {
    const int t = int(threadIdx.x);
    const bool valid = u.c0 + t * kTile < u.L;
    cp_async16(need + 2 * t, tile_need(a, u, g, (u.c0 + (valid ? t * kTile : 0)) / kTile), valid);
  }
  const int G = int(p.G);
  for (int x = int(threadIdx.x); x < rows * G; x += int(blockDim.x)) {
    const int r = x / G, hg = x - r * G;
    const int i = u.c0 + r;
    const bool valid = i < u.L;
    const int64_t rh = (u.bq * p.seq.N + u.s + (valid ? i : u.c0)) * p.H + g * p.G + hg;
    // A float32 pair fills the slot; a 16-bit one its first half (gate_pair<T> reads it back).
    if (p.gates_f32) {
      cp_async8(gates + x, static_cast<const float*>(p.gates) + rh * 2, valid);
    } else {
      cp_async4(gates + x, static_cast<const uint32_t*>(p.gates) + rh, valid);
    }
    if (lse != nullptr) cp_async8(lses + x, lse + rh * 2, valid);
  }
  return RowSmem{words, need, gates, lses};
}

// Online softmax of one branch over one S tile (already scaled to base 2): masks it with vis(row,
// col), rescales the running state and the accumulator, and returns P as an A fragment.
template <typename T, int D, typename Vis>
__device__ __forceinline__ void softmax_tile(const float (&s)[2][4], Vis&& vis, float (&m)[2],
                                             float (&l)[2], float (&acc)[D / 8][4],
                                             uint32_t (&pa)[4]) {
  float x[2][4];
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[nt][e] = vis(e >> 1, nt * 2 + (e & 1)) ? s[nt][e] : -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], x[nt][e]);
    }
  }
  float base[2], corr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m[r], quad_max(mx[r]));
    base[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
    corr[r] = exp2f(m[r] - base[r]);
    m[r] = m_new;
    l[r] *= corr[r];
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[nt][e] = exp2f(x[nt][e] - base[e >> 1]);
      l[e >> 1] += x[nt][e];
    }
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    acc[n][0] *= corr[0];
    acc[n][1] *= corr[0];
    acc[n][2] *= corr[1];
    acc[n][3] *= corr[1];
  }
  c_to_a<T>(pa, x);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void fwd_zero_padding(const AttnParams& p, const FwdOut& o,
                                                 const Unit& u, int rows, int64_t g) {
  constexpr int kChunks = D / 8;
  const int per = int(p.G) * kChunks;
  for (int e = threadIdx.x; e < rows * per; e += blockDim.x) {
    const int r = e / per;
    const int i = u.c0 + r;
    if (i < u.L || i >= p.seq.N) continue;
    const int hg = (e - r * per) / kChunks, c = e % kChunks;
    const int64_t rr = u.bq * p.seq.N + (u.s + i) % p.seq.N;
    const int64_t off = (rr * p.H + g * p.G + hg) * D + c * 8;
    const uint4 z = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(static_cast<T*>(o.out) + off) = z;
    *reinterpret_cast<uint4*>(static_cast<T*>(o.o_sel) + off) = z;
    *reinterpret_cast<uint4*>(static_cast<T*>(o.o_win) + off) = z;
    if (c == 0) *reinterpret_cast<float2*>(o.lse + (rr * p.H + g * p.G + hg) * 2) = make_float2(0.f, 0.f);
  }
}

// Positions per M tile of the query-outer kernels (forward, dq): as many as the group's G heads
// fit in 16 rows (G = 3, 5, 6, 7 leave 1, 1, 4, 2 rows idle).
__host__ __device__ __forceinline__ int m_positions(int64_t G) { return int(kTile / G); }

// Row r (0 .. 15) of an M tile: position offset r / G in the tile, head r % G of the group; rows
// past P G are idle (used false). The one statement of the layout (m_rows, stage_m_tile).
struct MRow {
  int dp, hg;
  bool used;
};
__host__ __device__ __forceinline__ MRow m_row(int r, int G, int P) {
  return MRow{r / G, r % G, r < P * G};
}

// The lane's two rows (gq, gq + 8) of M tile mt of a query-outer chunk (forward, dq): head hg of
// the group and chunk position pl (-1: no row: idle, past the chunk or past L), sequence
// position i.
struct MRows {
  int hg[2], pl[2], i[2];
};
__device__ __forceinline__ MRows m_rows(const FusedArgs& a, const Unit& u, int G, int P, int mt,
                                        int m_tiles, int gq) {
  MRows m;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const MRow row = m_row(gq + 8 * r, G, P);
    const int x = mt * P + row.dp;
    const bool ok = row.used && mt < m_tiles && x < a.rows && u.c0 + x < u.L;
    m.hg[r] = row.hg;
    m.pl[r] = ok ? x : -1;
    m.i[r] = u.c0 + x;
  }
  return m;
}

// The key tiles M tile mt needs in each branch: those where one of its P positions has a bit in
// the staged words ([key tile][chunk row], zeros past L). All lanes (ballots).
__device__ __forceinline__ void m_tile_needs(const RowSmem& rs, int rows, int P, int mt,
                                             int m_tiles, int key_tiles, int lane, uint64_t* sel,
                                             uint64_t* win) {
  uint64_t ns = 0, nw = 0;
  for (int t0 = 0; t0 < key_tiles; t0 += 32) {
    const int t = t0 + lane;
    uint32_t any = 0;
    if (t < key_tiles && mt < m_tiles) {
      const int x0 = mt * P, x1 = min(x0 + P, rows);
      for (int x = x0; x < x1; ++x) any |= rs.words[t * rows + x];
    }
    ns |= uint64_t(__ballot_sync(0xffffffffu, (any & 0xffffu) != 0u)) << t0;
    nw |= uint64_t(__ballot_sync(0xffffffffu, (any >> 16) != 0u)) << t0;
  }
  *sel = ns;
  *win = nw;
}

// The rows' words of key tile kt, shifted to the lane's columns (col_bit); 0 for no row.
__device__ __forceinline__ void m_tile_words(const RowSmem& rs, int rows, const MRows& m, int kt,
                                             int tq, uint32_t (&w)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) w[r] = m.pl[r] >= 0 ? rs.words[kt * rows + m.pl[r]] >> (2 * tq) : 0u;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, FusedTraits<D>::kFwdMinBlocks)
    fused_fwd_kernel(const FusedArgs a, const FwdOut o) {
  constexpr int KS = FusedTraits<D>::kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnParams& p = a.p;
  Unit u;
  if (!find_unit(a, p.stis.causal, &u)) return;
  const int64_t g = a.g0 + blockIdx.y;
  if (a.unit_end == nullptr && has_padding(p, u, a.rows)) fwd_zero_padding<T, D>(p, o, u, a.rows, g);
  if (u.c0 >= u.L) return;

  const int tiles = a.rows / kTile;
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + a.seg * KS;
  // The first segment, the chunk's masks and gates and the first queries load together.
  const int kend = key_end(a, u);
  const RowSmem rs = stage_rows(smem, 2 * int64_t(a.seg) * KS * sizeof(T), a, u, g, kend, nullptr,
                                a.tiles_cap);
  // The masked copy here too (the whole first segment: a run of tiles): so compiled, the D = 64
  // forward spills 40 bytes instead of 108 (v35; local ptxas, nvcc 13.0).
  stage_kv<T, D, KS, true>(ks, vs, p, u, g, 0, min(a.seg, kend));

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int G = int(p.G);
  // The M dimension of a warp's products is P positions x the G heads of the group (row r:
  // position r / G, head r % G; rows past P G are idle): its key tiles are the union over P
  // positions, not 16 (v31, docs/PERF_NOTES.md: at N = 1024 15.3 key tiles per M tile instead of
  // 26.6 on the benchmark's data). A warp serves `reps` of the chunk's M tiles: in rep r the tiles
  // r * per .. r * per + per - 1, every other rep in reverse (causal: the warps' key counts even out).
  const int P = m_positions(G);
  const int m_tiles = (a.rows + P - 1) / P;
  const int per = int(blockDim.x >> 5), reps = (m_tiles + per - 1) / per;
  const int key_tiles = kend / kTile;
  uint64_t all = 0;  // the tiles any query tile of the chunk needs (CTA-uniform)
  for (int rep = 0; rep < reps; ++rep) {
    const int mt = rep * per + ((rep & 1) ? warp : per - 1 - warp);
    const MRows mr = m_rows(a, u, G, P, mt, m_tiles, gq);
    uint32_t qf[D / 16][4];
    {
      const T* qb = static_cast<const T*>(p.q) + u.bq * p.q_sb + g * p.G * p.q_sh;
      load_a_rows<T, D>(qf, mr.pl[0] >= 0 ? qb + (u.s + mr.i[0]) * p.q_sn + mr.hg[0] * p.q_sh : nullptr,
                        mr.pl[1] >= 0 ? qb + (u.s + mr.i[1]) * p.q_sn + mr.hg[1] * p.q_sh : nullptr,
                        tq);
    }
    float m[2][2], l[2][2], acc[2][D / 8][4];
#pragma unroll
    for (int br = 0; br < 2; ++br) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        m[br][r] = -INFINITY;
        l[br][r] = 0.f;
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[br][n][e] = 0.f;
      }
    }
    if (rep == 0) {
      cp_async_wait<0>();
      __syncthreads();  // the first segment and the masks are in shared memory
      for (int t = 0; t < tiles; ++t) all |= rs.need[2 * t] | rs.need[2 * t + 1];  // zeros past L
    }
    uint64_t my_sel, my_win;
    m_tile_needs(rs, a.rows, P, mt, m_tiles, key_tiles, lane, &my_sel, &my_win);
    // The warp's key tiles in increasing order.
    uint64_t pending = my_sel | my_win;

    for (int seg0 = 0; seg0 < kend; seg0 += a.seg) {
      const int seg1 = min(seg0 + a.seg, kend);
      const uint64_t seg_mask = tile_bits(seg0, seg1);
      // A later segment, or the first again in a later rep when the keys took several.
      if ((seg0 > 0 || (rep > 0 && kend > a.seg)) &&
          !restage_kv<T, D, KS, true>(ks, vs, p, u, g, seg0, seg1, all)) {
        continue;
      }
      // The lowest pending tile lies in this segment while any does (lower ones are done).
      while ((pending & seg_mask) != 0) {
        const int kt = pop_tile(pending);
        uint32_t w[2];
        m_tile_words(rs, a.rows, mr, kt, tq, w);
        const bool do_sel = (my_sel >> kt) & 1, do_win = (my_win >> kt) & 1;
        const T* kt_s = ks + (kt * kTile - seg0) * KS;
        const T* vt_s = vs + (kt * kTile - seg0) * KS;
        float s[2][4] = {};
        mma_abt<T, D, KS>(s, qf, kt_s, lane);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale_log2;
        }
        uint32_t pa_sel[4], pa_win[4];
        if (do_sel) {
          softmax_tile<T, D>(s, [&](int r, int c) { return word_bit(w[r], col_bit(c)); }, m[0],
                             l[0], acc[0], pa_sel);
        }
        if (do_win) {
          softmax_tile<T, D>(s, [&](int r, int c) { return word_bit(w[r], kTile + col_bit(c)); },
                             m[1], l[1], acc[1], pa_win);
        }
        if (do_sel) mma_ab<T, D, KS>(acc[0], pa_sel, vt_s, lane);
        if (do_win) mma_ab<T, D, KS>(acc[1], pa_win, vt_s, lane);
      }
    }

    // Epilogue: normalise, combine with the gates, store out, both branch outputs and both lse.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l_sel = quad_sum(l[0][r]), l_win = quad_sum(l[1][r]);
      if (mr.pl[r] < 0) continue;
      const int64_t rr = u.bq * p.seq.N + u.s + mr.i[r];
      const int64_t rh = rr * p.H + g * p.G + mr.hg[r];
      const float2 gt = gate_pair<T>(rs.gates + mr.pl[r] * G + mr.hg[r], p.gates_f32, 0);
      const float g_sel = gt.x, g_win = gt.y;
      const float inv_sel = 1.f / l_sel, inv_win = 1.f / l_win;
      T* out = static_cast<T*>(o.out) + rh * D;
      T* osel = static_cast<T*>(o.o_sel) + rh * D;
      T* owin = static_cast<T*>(o.o_win) + rh * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int col = n * 8 + 2 * tq;
        const float s0 = acc[0][n][2 * r] * inv_sel, s1 = acc[0][n][2 * r + 1] * inv_sel;
        const float w0 = acc[1][n][2 * r] * inv_win, w1 = acc[1][n][2 * r + 1] * inv_win;
        *reinterpret_cast<uint32_t*>(out + col) =
            Mma<T>::pack(g_sel * s0 + g_win * w0, g_sel * s1 + g_win * w1);
        *reinterpret_cast<uint32_t*>(osel + col) = Mma<T>::pack(s0, s1);
        *reinterpret_cast<uint32_t*>(owin + col) = Mma<T>::pack(w0, w1);
      }
      if (tq == 0) {
        *reinterpret_cast<float2*>(o.lse + rh * 2) =
            make_float2((m[0][r] + log2f(l_sel)) * kLn2, (m[1][r] + log2f(l_win)) * kLn2);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, query-outer: dgates, aux, dq
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void dq_zero_padding(const FusedArgs& a, const BwdIn& in, Aux* aux,
                                                T* dq, const Unit& u, int rows, int64_t g) {
  const AttnParams& p = a.p;
  constexpr int kChunks = D / 8;
  const int per = int(p.G) * kChunks;
  for (int e = threadIdx.x; e < rows * per; e += blockDim.x) {
    const int r = e / per;
    const int i = u.c0 + r;
    if (i < u.L || i >= p.seq.N) continue;
    const int hg = (e - r * per) / kChunks, c = e % kChunks;
    const int64_t row = u.bq * p.seq.N + (u.s + i) % p.seq.N, rh = row * p.H + g * p.G + hg;
    *reinterpret_cast<uint4*>(dq + rh * D + c * 8) = make_uint4(0, 0, 0, 0);
    if (c == 0) {
      if (aux != nullptr) {
        Aux* ar = aux + aux_index(a, row, g * p.G + hg);
        ar[0] = ar[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      store_gate_pair<T>(in.dgates, in.dgates_f32, rh, 0.f, 0.f);
    }
  }
}

// The saved branch outputs at the lane's A-fragment columns (load_a_rows) of its rows g and g + 8:
// o[r][br][2 ks + half] holds columns 16 ks + 8 half + 2 tq, + 1 of row r, branch br (0 past L).
// Loaded apart from branch_dots so that a kernel can issue the loads ahead of their use.
template <int D>
struct BranchRows {
  uint32_t o[2][2][D / 8];
};

template <typename T, int D>
__device__ __forceinline__ void load_branch_rows(BranchRows<D>& b, const BwdIn& in,
                                                 const int64_t (&rh)[2], const bool (&valid)[2],
                                                 int tq) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int br = 0; br < 2; ++br) {
      const T* o_row = static_cast<const T*>(br == 0 ? in.o_sel : in.o_win) + rh[r] * D;
#pragma unroll
      for (int x = 0; x < D / 8; ++x) {
        const int c = (x >> 1) * 16 + (x & 1) * 8 + 2 * tq;
        b.o[r][br][x] = valid[r] ? *reinterpret_cast<const uint32_t*>(o_row + c) : 0u;
      }
    }
  }
}

// dot[r][br] = <dout, o_branch> of the lane's rows r (g, g + 8) from the dout fragments df (A
// layout, load_a_rows) and the saved branch outputs b, summed over the quad.
template <typename T, int D>
__device__ __forceinline__ void branch_dots(float (&dot)[2][2], const uint32_t (&df)[D / 16][4],
                                            const BranchRows<D>& b) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int br = 0; br < 2; ++br) {
      float d = 0.f;
#pragma unroll
      for (int x = 0; x < D / 8; ++x) {
        const float2 dv = Mma<T>::unpack(df[x >> 1][2 * (x & 1) + r]);
        const float2 ov = Mma<T>::unpack(b.o[r][br][x]);
        d = fmaf(dv.x, ov.x, fmaf(dv.y, ov.y, d));
      }
      dot[r][br] = quad_sum(d);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, FusedTraits<D>::kFwdMinBlocks)
    fused_dq_kernel(const FusedArgs a, const BwdIn in, Aux* aux, T* dq_out) {
  constexpr int KS = FusedTraits<D>::kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnParams& p = a.p;
  Unit u;
  if (!find_unit(a, p.stis.causal, &u)) return;
  const int64_t g = a.g0 + blockIdx.y;
  if (a.unit_end == nullptr && has_padding(p, u, a.rows)) dq_zero_padding<T, D>(a, in, aux, dq_out, u, a.rows, g);
  if (u.c0 >= u.L) return;

  const int tiles = a.rows / kTile;
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + a.seg * KS;
  const int kend = key_end(a, u);
  const RowSmem rs = stage_rows(smem, 2 * int64_t(a.seg) * KS * sizeof(T), a, u, g, kend, in.lse,
                                a.tiles_cap);
  stage_kv<T, D, KS>(ks, vs, p, u, g, 0, min(a.seg, kend));

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int G = int(p.G);
  // A warp per M tile of P positions x G heads, as in the forward (v31).
  const int P = m_positions(G);
  const int m_tiles = (a.rows + P - 1) / P;
  const MRows mr = m_rows(a, u, G, P, warp, m_tiles, gq);
  uint32_t qf[D / 16][4], df[D / 16][4];
  // Per row r and branch br: <dout, o_branch>, then gate, lse in base 2, delta.
  float dot[2][2], gate[2][2], lse2[2][2], delta[2][2];
  int64_t row[2], rh[2];  // buffer rows, (row, head) indices
  {
    const T* qb = static_cast<const T*>(p.q) + u.bq * p.q_sb + g * p.G * p.q_sh;
    const T* row_q[2];
    const T* row_d[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool valid = mr.pl[r] >= 0;
      row[r] = u.bq * p.seq.N + u.s + mr.i[r];
      rh[r] = row[r] * p.H + g * p.G + mr.hg[r];
      row_q[r] = valid ? qb + (u.s + mr.i[r]) * p.q_sn + mr.hg[r] * p.q_sh : nullptr;
      row_d[r] = valid ? static_cast<const T*>(in.dout) + rh[r] * D : nullptr;
    }
    load_a_rows<T, D>(qf, row_q[0], row_q[1], tq);
    load_a_rows<T, D>(df, row_d[0], row_d[1], tq);
    const bool valid[2] = {row_d[0] != nullptr, row_d[1] != nullptr};
    BranchRows<D> ob;
    load_branch_rows<T, D>(ob, in, rh, valid, tq);
    branch_dots<T, D>(dot, df, ob);
  }
  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  }
  cp_async_wait<0>();
  __syncthreads();  // the first segment, the masks, gates and lse are in shared memory
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int x = mr.pl[r] >= 0 ? mr.pl[r] * G + mr.hg[r] : 0;
    const float2 gt = gate_pair<T>(rs.gates + x, p.gates_f32, 0), ls = rs.lse[x];
    gate[r][0] = gt.x;
    gate[r][1] = gt.y;
    lse2[r][0] = ls.x * kLog2e;
    lse2[r][1] = ls.y * kLog2e;
#pragma unroll
    for (int br = 0; br < 2; ++br) delta[r][br] = gate[r][br] * dot[r][br];
    if (tq == 0 && mr.pl[r] >= 0) {
      Aux* ar = aux + aux_index(a, row[r], g * p.G + mr.hg[r]);
      ar[0] = make_float4(gate[r][0], lse2[r][0], delta[r][0], dot[r][0]);
      ar[1] = make_float4(gate[r][1], lse2[r][1], delta[r][1], dot[r][1]);
      store_gate_pair<T>(in.dgates, in.dgates_f32, rh[r], dot[r][0], dot[r][1]);
    }
  }
  uint64_t all = 0;  // zeros for the tiles past L
  for (int t = 0; t < tiles; ++t) all |= rs.need[2 * t] | rs.need[2 * t + 1];
  uint64_t my_sel, my_win;
  m_tile_needs(rs, a.rows, P, warp, m_tiles, kend / kTile, lane, &my_sel, &my_win);
  uint64_t pending = my_sel | my_win;  // as in the forward

  for (int seg0 = 0; seg0 < kend; seg0 += a.seg) {
    const int seg1 = min(seg0 + a.seg, kend);
    const uint64_t seg_mask = tile_bits(seg0, seg1);
    if (seg0 > 0 && !restage_kv<T, D, KS, false>(ks, vs, p, u, g, seg0, seg1, all)) continue;
    // The lowest pending tile lies in this segment while any does (lower ones are done).
    while ((pending & seg_mask) != 0) {
      const int kt = pop_tile(pending);
      uint32_t w[2];
      m_tile_words(rs, a.rows, mr, kt, tq, w);
      const bool do_sel = (my_sel >> kt) & 1, do_win = (my_win >> kt) & 1;
      const T* kt_s = ks + (kt * kTile - seg0) * KS;
      const T* vt_s = vs + (kt * kTile - seg0) * KS;
      float s[2][4] = {}, dp[2][4] = {};
      mma_abt<T, D, KS>(s, qf, kt_s, lane);
      mma_abt<T, D, KS>(dp, df, vt_s, lane);
      float ds[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, c = nt * 2 + (e & 1);
          float v = 0.f;
          if (do_sel && word_bit(w[r], col_bit(c))) {
            v += exp2f(fmaf(s[nt][e], p.scale_log2, -lse2[r][0])) *
                 (gate[r][0] * dp[nt][e] - delta[r][0]);
          }
          if (do_win && word_bit(w[r], kTile + col_bit(c))) {
            v += exp2f(fmaf(s[nt][e], p.scale_log2, -lse2[r][1])) *
                 (gate[r][1] * dp[nt][e] - delta[r][1]);
          }
          ds[nt][e] = v;
        }
      }
      uint32_t dsa[4];
      c_to_a<T>(dsa, ds);
      mma_ab<T, D, KS>(acc, dsa, kt_s, lane);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (mr.pl[r] < 0) continue;
    T* dq = dq_out + rh[r] * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dq + n * 8 + 2 * tq) =
          Mma<T>::pack(acc[n][2 * r] * p.scale, acc[n][2 * r + 1] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, key-outer: dk, dv
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void dkdv_zero_padding(const AttnParams& p, T* dk, T* dv, const Unit& u,
                                                  int rows, int64_t g) {
  constexpr int kChunks = D / 8;
  for (int e = threadIdx.x; e < rows * kChunks; e += blockDim.x) {
    const int r = e / kChunks, c = e - r * kChunks;
    const int j = u.c0 + r;
    if (j < u.L || j >= p.seq.N) continue;
    const int64_t off = ((u.bq * p.seq.N + (u.s + j) % p.seq.N) * p.KVH + g) * D + c * 8;
    *reinterpret_cast<uint4*>(dk + off) = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(dv + off) = make_uint4(0, 0, 0, 0);
  }
}

// One stage of a dk/dv warp's buffer: Q and dout of a query tile (two [16][KS] matrices of T), the
// tile's aux rows ([16][2] float4: gate, lse2, delta per branch) and its rows' mask words of the
// warp's key tile ([16] uint32).
constexpr int stage_bytes(int D, int elem) {
  return 2 * kTile * row_stride(D) * elem + kTile * 2 * int(sizeof(Aux)) + kTile * 4;
}

// fused_dkdv_kernel: a warp's list of the M tiles (P positions x G heads, at most kMaxLen / 2 at
// G = 8) that need its key tile, 16 bits each (tile index, bit 14 LTIS, bit 15 STIS).
constexpr int kMaxMTiles = kMaxLen / 2;
// the list's bound: at most 8 heads per group (checks.h), so P = 16 / G >= 2 positions per M tile
static_assert(kMaxMTiles >= kMaxLen / (kTile / 8) && kMaxMTiles < (1 << 14), "M-tile list size");
// The 16 rows of an M tile (m_row) as offsets from its first position, in shared memory, written
// once per dk/dv CTA: a warp stages an M tile per step, and recomputing m_row's divisions by the
// runtime G and each row's 64-bit addresses there took ~330 instructions per step at D = 64, more
// than the step's products and softmax (SASS of v33; v34, docs/PERF_NOTES.md).
struct MTileRows {
  int64_t q[kTile];  // dp q_sn + hg q_sh: the row's query from the M tile's first position's
  int32_t d[kTile];  // dp H D + hg D: its dout (and the head's offset)
  int32_t x[kTile];  // dp aux_heads + hg: its aux row
  int32_t dp[kTile]; // dp; kMaxLen for an idle row (past P G), so that dp < L - mt P is `valid`
};
static_assert(sizeof(MTileRows) % 16 == 0, "the stages after it stay 16-byte aligned");
// Shared memory of a dk/dv CTA of `warps` warps: two stages per warp; in fused_dkdv_kernel
// (`fused`) also the tile needs of the sequence's query tiles (2 x kMaxTiles words of 64 bits),
// the M tile's row offsets (MTileRows) and each warp's M-tile list.
constexpr int64_t dkdv_smem(int64_t warps, int D, int elem, bool fused) {
  return (fused ? 2 * kMaxTiles * 8 + int64_t(sizeof(MTileRows)) : 0) +
         warps * (2 * stage_bytes(D, elem) + (fused ? 2 * kMaxMTiles : 0));
}

// A stage row's sequence position and whether it holds one (else it is zero-filled: no mask sees
// it, and zeros keep every product finite).
template <typename I>
struct StageRow {
  bool valid;
  I i;
  int dh = 0;  // the row's head: h + dh
};

// The copies of one stage's Q, dout and aux rows, row r < 16 at pos_of(r) (a StageRow: position,
// head h + dh).
// All lanes (pos_of may shuffle). A lane copies the same 16-byte column c of its rows r0, r0 +
// 32 / (D / 8), ... of Q and of dout, one row position and two 64-bit offsets per row pair: the
// loop over every (matrix, row, chunk) element before (v28, docs/PERF_NOTES.md) ran ~35
// instructions of 64-bit index arithmetic per copy, 280 per stage at D = 64, half the dk/dv
// kernel's instructions per query tile there.
template <typename T, int D, int KS, typename Pos>
__device__ __forceinline__ void stage_q_dout_aux(unsigned char* stage, const FusedArgs& a,
                                                 const BwdIn& in, const Aux* aux, const Unit& u,
                                                 int64_t h, int lane, Pos&& pos_of) {
  const AttnParams& p = a.p;
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = 32 / kChunks;
  static_assert(32 % kChunks == 0 && kTile % kRowsPerPass == 0, "whole rows per pass");
  T* buf = reinterpret_cast<T*>(stage);
  Aux* abuf = reinterpret_cast<Aux*>(stage + 2 * kTile * KS * sizeof(T));
  const int c = lane % kChunks, r0 = lane / kChunks;
  // Position n's rows: q at qrow + n q_sn, dout (contiguous [rows, H, D]) at drow + n H D.
  const T* qrow = static_cast<const T*>(p.q) + u.bq * p.q_sb + h * p.q_sh + c * 8;
  const T* drow = static_cast<const T*>(in.dout) + (u.bq * p.seq.N * p.H + h) * D + c * 8;
  const int64_t d_sn = p.H * D;
  T* dst = buf + r0 * KS + c * 8;
#pragma unroll
  for (int k = 0; k < kTile / kRowsPerPass; ++k) {
    const auto sr = pos_of(r0 + k * kRowsPerPass);
    const int64_t n = u.s + (sr.valid ? sr.i : 0);
    const int dh = sr.valid ? sr.dh : 0;
    cp_async16(dst + k * kRowsPerPass * KS, qrow + n * p.q_sn + dh * p.q_sh, sr.valid);
    cp_async16(dst + (kTile + k * kRowsPerPass) * KS, drow + n * d_sn + dh * D, sr.valid);
  }
  {  // 32 float4: one per lane
    const int r = lane >> 1, br = lane & 1;
    const auto sr = pos_of(r);
    const Aux* arow = aux + aux_index(a, u.bq * p.seq.N + u.s, h) + br;
    cp_async16(abuf + lane, arow + (sr.valid ? sr.i * a.aux_heads + sr.dh : 0) * 2, sr.valid);
  }
}

// Q, dout and aux of M tile mt (positions mt P .. mt P + P - 1 x the G heads of kv group g: row
// r is position mt P + r / G, head g G + r % G), and the rows' words of the warp's key tile
// (wcol[i]: query position i's), into one stage (rows past L or past P G zero-filled).
template <typename T, int D, int KS>
__device__ __forceinline__ void stage_m_tile(unsigned char* stage, const FusedArgs& a,
                                             const BwdIn& in, const Aux* aux, const uint32_t* wcol,
                                             const Unit& u, int64_t g, const MTileRows& rows, int P,
                                             int mt, int lane) {
  const AttnParams& p = a.p;
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = 32 / kChunks;
  static_assert(32 % kChunks == 0 && kTile % kRowsPerPass == 0, "whole rows per pass");
  T* buf = reinterpret_cast<T*>(stage);
  Aux* abuf = reinterpret_cast<Aux*>(stage + 2 * kTile * KS * sizeof(T));
  const int x0 = mt * P, lim = u.L - x0;  // row r holds a position when rows.dp[r] < lim
  const int64_t n0 = u.s + x0;           // the M tile's first position in the buffer
  // A lane copies the same 16-byte column c of its rows r0, r0 + kRowsPerPass, ... of Q and dout.
  const int c = lane % kChunks, r0 = lane / kChunks;
  const T* qt = static_cast<const T*>(p.q) + u.bq * p.q_sb + g * p.G * p.q_sh + n0 * p.q_sn + c * 8;
  const T* dt = static_cast<const T*>(in.dout) + ((u.bq * p.seq.N + n0) * p.H + g * p.G) * D + c * 8;
  T* dst = buf + r0 * KS + c * 8;
#pragma unroll
  for (int k = 0; k < kTile / kRowsPerPass; ++k) {
    const int r = r0 + k * kRowsPerPass;
    const bool valid = rows.dp[r] < lim;
    cp_async16(dst + k * kRowsPerPass * KS, qt + (valid ? rows.q[r] : 0), valid);
    cp_async16(dst + (kTile + k * kRowsPerPass) * KS, dt + (valid ? rows.d[r] : 0), valid);
  }
  {  // aux: 32 float4, one per lane (row lane / 2, branch lane % 2)
    const int r = lane >> 1;
    const bool valid = rows.dp[r] < lim;
    const Aux* at = aux + aux_index(a, u.bq * p.seq.N + n0, g * p.G) + (lane & 1);
    cp_async16(abuf + lane, at + (valid ? rows.x[r] * 2 : 0), valid);
  }
  if (lane < kTile) {  // the rows' words of the warp's key tile
    const bool valid = rows.dp[lane] < lim;
    cp_async4(reinterpret_cast<uint32_t*>(abuf + 2 * kTile) + lane, wcol + x0 + (valid ? rows.dp[lane] : 0),
              valid);
  }
  cp_async_commit();
}

// The A fragments of a dk/dv warp's 16 keys j0 .. j0 + 15 of the unit's sequence, kv group g (rows
// past L: zeros): K for S^T = K Q^T, V for dP^T = V dout^T.
template <typename T, int D, typename I>
__device__ __forceinline__ void load_key_fragments(uint32_t (&kf)[D / 16][4], uint32_t (&vf)[D / 16][4],
                                                   const AttnParams& p, const Unit& u, int64_t g,
                                                   I j0, int lane) {
  const I ja = j0 + (lane >> 2), jb = ja + 8;
  const int tq = lane & 3;
  const T* kb = static_cast<const T*>(p.k) + u.bq * p.k_sb + g * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + u.bq * p.v_sb + g * p.v_sh;
  load_a_rows<T, D>(kf, ja < u.L ? kb + (u.s + ja) * p.k_sn : nullptr,
                    jb < u.L ? kb + (u.s + jb) * p.k_sn : nullptr, tq);
  load_a_rows<T, D>(vf, ja < u.L ? vb + (u.s + ja) * p.v_sn : nullptr,
                    jb < u.L ? vb + (u.s + jb) * p.v_sn : nullptr, tq);
}

// A long dk/dv warp's partial sums in shared memory (lane-major float32, 2 x D / 8 x 4 x 32), in
// the warp's two stages once its tiles are done: element e of n8 tile n of dk (mat 0) or dv (mat 1)
// held by lane `lane` is at part_index(mat, n, e, lane).
template <int D>
__device__ __forceinline__ int part_index(int mat, int n, int e, int lane) {
  static_assert(2 * (D / 8) * 4 * 32 * 4 <= 2 * stage_bytes(D, 2), "the partials fit the stages");
  return ((mat * (D / 8) + n) * 4 + e) * 32 + lane;
}
template <int D>
__device__ __forceinline__ void store_parts(float* part, const float (&dk)[D / 8][4],
                                            const float (&dv)[D / 8][4], int lane) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      part[part_index<D>(0, n, e, lane)] = dk[n][e];
      part[part_index<D>(1, n, e, lane)] = dv[n][e];
    }
  }
}

// One query tile of a dk/dv warp (a stage of stage_bytes: Q, dout, aux and the rows' mask words of
// the warp's key tile): S^T = K Q^T and dP^T = V dout^T for the warp's 16 keys (kf, vf) and the
// stage's 16 query columns, P and dS of each branch under the words' bits (do_sel / do_win: the
// branch has a bit in the tile at all), then dV += (g_sel P_sel + g_win P_win)^T dout and
// dK += dS^T Q.
template <typename T, int D, int KS>
__device__ __forceinline__ void dkdv_tile(const unsigned char* stage, const uint32_t (&kf)[D / 16][4],
                                          const uint32_t (&vf)[D / 16][4], bool do_sel, bool do_win,
                                          float scale_log2, int lane, float (&dk)[D / 8][4],
                                          float (&dv)[D / 8][4]) {
  const int gq = lane >> 2, tq = lane & 3;
  const T* qs = reinterpret_cast<const T*>(stage);
  const T* dos = qs + kTile * KS;
  const Aux* as = reinterpret_cast<const Aux*>(dos + kTile * KS);

  const uint32_t* ws = reinterpret_cast<const uint32_t*>(as + 2 * kTile);
  // The four query columns this lane holds: c = 2 nt + e2 -> the stage's row 8 nt + 2 tq + e2,
  // their words shifted so that key row gq + 8 r is bit 8 r (LTIS) and 16 + 8 r (STIS).
  uint32_t wq[4];
  float cg[4][2], cl[4][2], cd[4][2];  // gate, lse2, delta per column and branch
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int r = col_bit(c) + 2 * tq;
    wq[c] = ws[r] >> gq;  // zeros past L
    const float4 a0 = as[r * 2], a1 = as[r * 2 + 1];  // zeros past L
    cg[c][0] = a0.x; cl[c][0] = a0.y; cd[c][0] = a0.z;
    cg[c][1] = a1.x; cl[c][1] = a1.y; cd[c][1] = a1.z;
  }

  float s[2][4] = {}, dpt[2][4] = {};
  mma_abt<T, D, KS>(s, kf, qs, lane);
  mma_abt<T, D, KS>(dpt, vf, dos, lane);
  float ds[2][4], pg[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = nt * 2 + (e & 1);
      const int kb = 8 * (e >> 1);  // key row gq + kb
      float dsv = 0.f, pgv = 0.f;
      if (do_sel && word_bit(wq[c], kb)) {
        const float pw = exp2f(fmaf(s[nt][e], scale_log2, -cl[c][0]));
        dsv += pw * (cg[c][0] * dpt[nt][e] - cd[c][0]);
        pgv += pw * cg[c][0];
      }
      if (do_win && word_bit(wq[c], kTile + kb)) {
        const float pw = exp2f(fmaf(s[nt][e], scale_log2, -cl[c][1]));
        dsv += pw * (cg[c][1] * dpt[nt][e] - cd[c][1]);
        pgv += pw * cg[c][1];
      }
      ds[nt][e] = dsv;
      pg[nt][e] = pgv;
    }
  }
  uint32_t dsa[4], pga[4];
  c_to_a<T>(dsa, ds);
  c_to_a<T>(pga, pg);
  mma_ab<T, D, KS>(dv, pga, dos, lane);
  mma_ab<T, D, KS>(dk, dsa, qs, lane);
}

template <typename T, int D>
__global__ void __launch_bounds__(32 * kDkdvWarps, FusedTraits<D>::kDkdvMinBlocks)
    fused_dkdv_kernel(const FusedArgs a, const BwdIn in, const Aux* aux, T* dk_out, T* dv_out) {
  // Launched with dkdv_tiles_per_cta <= kDkdvWarps warps (the bounds' 128 threads x
  // kDkdvMinBlocks CTAs set the register cap). Warp w: key tile c0 / 16 + w, for every head of
  // the group: its query side is the M tiles of P positions x G heads (the query-outer kernels'
  // layout, v32) that need the tile, in increasing order, so that each dK, dV element is one
  // warp's sum in a fixed order (deterministic, no atomics) over the union of P positions' key
  // sets (not 16 positions' per head).
  constexpr int KS = FusedTraits<D>::kStride;
  constexpr int kStage = stage_bytes(D, int(sizeof(T)));
  constexpr int kBuf = 2 * kStage;  // a warp's two stages
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnParams& p = a.p;
  Unit u;
  if (!find_unit(a, false, &u)) return;
  const int64_t g = a.g0 + blockIdx.y;
  if (a.unit_end == nullptr && has_padding(p, u, a.rows)) dkdv_zero_padding<T, D>(p, dk_out, dv_out, u, a.rows, g);
  if (u.c0 >= u.L) return;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int P = m_positions(p.G);
  const int kt = u.c0 / kTile + warp;  // the warp's key tile
  const bool active = kt * kTile < u.L;
  // The warp's keys and values load while the tile needs come to shared memory.
  const int ja = kt * kTile + gq, jb = ja + 8;
  uint32_t kf[D / 16][4], vf[D / 16][4];
  load_key_fragments<T, D>(kf, vf, p, u, g, kt * kTile, lane);
  // Which key tiles each query tile needs ([tile][branch]), in shared memory.
  uint64_t* need = reinterpret_cast<uint64_t*>(smem);
  MTileRows* rows_s = reinterpret_cast<MTileRows*>(need + 2 * kMaxTiles);
  unsigned char* bufs = reinterpret_cast<unsigned char*>(rows_s + 1);
  const int q_tiles = (u.L + kTile - 1) / kTile;
  for (int t = threadIdx.x; t < q_tiles; t += blockDim.x) {
    cp_async16(need + 2 * t, tile_need(a, u, g, t), true);
  }
  cp_async_commit();
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const MRow m = m_row(r, int(p.G), P);
    rows_s->q[r] = m.dp * p.q_sn + m.hg * p.q_sh;
    rows_s->d[r] = int32_t((m.dp * p.H + m.hg) * D);
    rows_s->x[r] = int32_t(m.dp * a.aux_heads + m.hg);
    rows_s->dp[r] = m.used ? m.dp : kMaxLen;
  }
  const MTileRows& rows = *rows_s;
  cp_async_wait<0>();
  __syncthreads();
  unsigned char* buf = bufs + warp * (kBuf + 2 * kMaxMTiles);
  uint16_t* list = reinterpret_cast<uint16_t*>(buf + kBuf);
  // The mask words of key tile kt: wcol[i] is query position i's.
  const uint32_t* wcol =
      a.words + ((g - a.g0) * a.tiles_cap + kt) * a.mask_rows + u.bq * p.seq.N + u.s;

  // The M tiles that need key tile kt, a lane per M tile: those overlapping a 16-position query
  // tile that needs it, then their P positions' words (zero past L), compacted in order.
  int n_list = 0;
  if (active) {
    uint64_t tlist = 0;  // query tiles that need this key tile
    for (int t = 0; t < q_tiles; ++t) {
      if (((need[2 * t] | need[2 * t + 1]) >> kt) & 1) tlist |= 1ull << t;
    }
    // Only the M tiles that overlap the first to the last of those query tiles (causal: none
    // before the key tile's own).
    const int t_lo = tlist != 0 ? __ffsll(static_cast<long long>(tlist)) - 1 : 0;
    const int t_hi = tlist != 0 ? 63 - __clzll(static_cast<long long>(tlist)) : -1;
    const int mt_lo = t_lo * kTile / P;
    const int mt_hi = min((u.L + P - 1) / P, ((t_hi + 1) * kTile - 1) / P + 1);
    for (int m0 = mt_lo; m0 < mt_hi; m0 += 32) {
      const int mt = m0 + lane;
      uint32_t any = 0;
      if (mt < mt_hi) {
        const int i0 = mt * P, i1 = min(i0 + P, u.L);
        if (((tlist >> (i0 / kTile)) | (tlist >> ((i1 - 1) / kTile))) & 1) {
          for (int i = i0; i < i1; ++i) any |= wcol[i];
        }
      }
      const bool keep = any != 0u;
      const uint32_t bal = __ballot_sync(0xffffffffu, keep);
      if (keep) {
        list[n_list + __popc(bal & ((1u << lane) - 1u))] =
            uint16_t(mt | ((any & 0xffffu) != 0u ? 1 << 14 : 0) | ((any >> 16) != 0u ? 1 << 15 : 0));
      }
      n_list += __popc(bal);
    }
    __syncwarp();
  }
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  }

  // The M tiles in increasing order, the next one's Q, dout and aux loading while this one runs.
  if (n_list > 0) stage_m_tile<T, D, KS>(buf, a, in, aux, wcol, u, g, rows, P, list[0] & 0x3fff, lane);
  for (int e = 0; e < n_list; ++e) {
    const int stage = e & 1;
    if (e + 1 < n_list) {
      stage_m_tile<T, D, KS>(buf + (stage ^ 1) * kStage, a, in, aux, wcol, u, g, rows, P,
                             list[e + 1] & 0x3fff, lane);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
    const int ent = list[e];
    dkdv_tile<T, D, KS>(buf + stage * kStage, kf, vf, (ent >> 14) & 1, (ent >> 15) & 1,
                        p.scale_log2, lane, dk, dv);
    __syncwarp();  // the buffer is refilled two steps on
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = r == 0 ? ja : jb;
    if (j >= u.L) continue;
    const int64_t off = ((u.bq * p.seq.N + u.s + j) * p.KVH + g) * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int col = n * 8 + 2 * tq;
      *reinterpret_cast<uint32_t*>(dk_out + off + col) =
          Mma<T>::pack(dk[n][2 * r] * p.scale, dk[n][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + off + col) = Mma<T>::pack(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward of the short sequences in one CTA: dgates, dq, dk and dv
// ---------------------------------------------------------------------------------------------
// A sequence of at most kSeqMaxLen tokens has at most 4 query and 4 key tiles: one CTA per
// (sequence, kv group) keeps all of it in shared memory (K, V, and Q and dout of the group's
// heads) and computes the backward in two phases instead of the dq and dk/dv kernels' two
// launches, which both recompute S, P and dP:
// - phase 1, a warp per (query tile, head): the gate gradients and deltas, then per key tile the
//   tile's S, dP, dS and Pg = g_sel P_sel + g_win P_win, dQ += dS K (as fused_dq_kernel), and dS
//   and Pg transposed in registers (movmatrix) into shared memory as the A fragments of the key
//   side's products (512 bytes each per (head, query tile, key tile));
// - phase 2, a warp per (key tile, 16 head dims): dK += dS^T Q and dV += Pg^T dout over the heads
//   of the group in head order and, within a head, the query tiles in increasing order: each
//   element is summed by one warp in a fixed order (deterministic, no atomics, the same whatever
//   the batch's padding or the CTA's warp count).
// No aux tensor: the deltas never leave phase 1.
constexpr int kSeqMaxLen = 64;
constexpr int kPairBytes = 2 * 32 * 16;  // dS^T and Pg^T of one (head, query tile, key tile)

template <int D>
struct SeqTraits {
  // D = 16: three CTAs per SM (80 registers; ~73 KiB of shared memory at G = 4, L <= 64, causal,
  // power block 1), the dq kernel's occupancy: with two (96 registers) the kernel took as long as
  // dq and dk/dv together (v25). D = 32: two (~95 KiB); above: one.
  static constexpr int kMinBlocks = D <= 16 ? 3 : (D <= 32 ? 2 : 1);
};

// The key tiles query tile qt (of T) can need: causal, those up to the end of its last row's
// power block (p: the clamped power block); else all.
__host__ __device__ __forceinline__ int seq_pair_tiles(int qt, int T, int p, bool causal) {
  if (!causal) return T;
  const int end = ((qt * kTile + kTile - 1) / p + 1) * p;
  const int t = (end + kTile - 1) / kTile;
  return t < T ? t : T;
}
// Pairs (query tile, key tile) before query tile qt's: its first pair's index (qt = T: all).
__host__ __device__ __forceinline__ int seq_pair_base(int qt, int T, int p, bool causal) {
  int n = 0;
  for (int t = 0; t < qt; ++t) n += seq_pair_tiles(t, T, p, causal);
  return n;
}

// K, V ([rows][KS] each), the row state of the query-outer kernels (row_smem_layout), Q and dout
// of the G heads ([head][rows][KS] each), the pairs ([head][pair][dS^T, Pg^T][lane] uint4).
struct SeqSmemLayout {
  int64_t qd, pairs, total;
};
__host__ __device__ __forceinline__ SeqSmemLayout seq_smem_layout(int rows, int64_t G, int D,
                                                                  int elem, int p, bool causal) {
  const int T = rows / kTile;
  const int64_t KS = D + 8;  // row_stride(D)
  const int64_t kv = 2 * rows * KS * elem;
  SeqSmemLayout l;
  l.qd = (row_smem_layout(kv, rows, T, G, false).total + 15) / 16 * 16;  // lse read from global
  l.pairs = l.qd + 2 * G * rows * KS * elem;
  l.total = l.pairs + G * seq_pair_base(T, T, p, causal) * kPairBytes;
  return l;
}

// Q and dout rows of the group's heads, positions 0 .. used - 1 (the sequence's tiles; past L
// zero-filled) of each head's rows-row block. Issues the copies; a thread copies one fixed 16-byte
// column of its rows of Q and of dout (as a lane does in stage_q_dout_aux).
template <typename T, int D, int KS>
__device__ __forceinline__ void stage_group_rows(T* qs, T* dos, const AttnParams& p,
                                                 const BwdIn& in, const Unit& u, int64_t g,
                                                 int rows, int used) {
  constexpr int kChunks = D / 8;
  const int c = int(threadIdx.x) % kChunks, step = int(blockDim.x) / kChunks;
  const int64_t d_sn = p.H * D;
  for (int hg = 0; hg < int(p.G); ++hg) {
    const int64_t h = g * p.G + hg;
    const T* qb = static_cast<const T*>(p.q) + u.bq * p.q_sb + h * p.q_sh + c * 8;
    const T* db = static_cast<const T*>(in.dout) + (u.bq * p.seq.N * p.H + h) * D + c * 8;
    for (int i = int(threadIdx.x) / kChunks; i < used; i += step) {
      const bool valid = i < u.L;
      const int64_t row = u.s + (valid ? i : 0);
      const int64_t at = (hg * rows + i) * KS + c * 8;
      cp_async16(qs + at, qb + row * p.q_sn, valid);
      cp_async16(dos + at, db + row * d_sn, valid);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, SeqTraits<D>::kMinBlocks)
    fused_seq_bwd_kernel(const FusedArgs a, const BwdIn in, T* dq_out, T* dk_out, T* dv_out) {
  constexpr int KS = FusedTraits<D>::kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnParams& p = a.p;
  Unit u;
  if (!find_unit(a, false, &u)) return;
  const int64_t g = a.g0 + blockIdx.y;
  const int G = int(p.G);
  const int rows = a.rows, tiles = rows / kTile;
  const int pb = int(a.st.power_block);
  const bool causal = p.stis.causal;
  if (a.unit_end == nullptr && u.L < p.seq.N) {
    // Every padding position L .. N - 1 of the sequence (its one unit may be shorter than N).
    dq_zero_padding<T, D>(a, in, nullptr, dq_out, u, int(p.seq.N), g);
    dkdv_zero_padding<T, D>(p, dk_out, dv_out, u, int(p.seq.N), g);
  }
  if (u.L == 0) return;

  const SeqSmemLayout sl = seq_smem_layout(rows, p.G, D, int(sizeof(T)), pb, causal);
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + rows * KS;
  T* qs = reinterpret_cast<T*>(smem + sl.qd);
  T* dos = qs + G * rows * KS;
  uint4* pairs = reinterpret_cast<uint4*>(smem + sl.pairs);
  const int n_pairs = seq_pair_base(tiles, tiles, pb, causal);
  const int kend = key_end(a, u);
  const RowSmem rs = stage_rows(smem, 2 * int64_t(rows) * KS * sizeof(T), a, u, g, kend, nullptr,
                                tiles);
  stage_group_rows<T, D, KS>(qs, dos, p, in, u, g, rows, round_tile(u.L));
  stage_kv<T, D, KS>(ks, vs, p, u, g, 0, kend);  // commits every copy above

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int warps = int(blockDim.x) >> 5;

  // Phase 1: units (query tile, head), the heaviest query tiles (the last, when causal) first,
  // every other round in reverse so that the warps' loads even out. A warp's unit of round r:
  const int units = G * tiles;
  auto unit_of = [&](int r, int* qt, int* hg) {
    const int x = r * warps + ((r & 1) ? warps - 1 - warp : warp);
    *qt = tiles - 1 - x / G;
    *hg = x % G;
    return x < units && *qt * kTile < u.L;
  };
  auto next_round = [&](int r) {  // the warp's first round >= r with a unit, -1: none
    for (int qt, hg; r * warps < units; ++r) {
      if (unit_of(r, &qt, &hg)) return r;
    }
    return -1;
  };
  // What a unit reads from global memory outside the staged batch (the branch outputs and lse
  // of its rows; waited for at the unit's start, these loads held 17% of the kernel's stall
  // samples at S1, D = 16) is loaded ahead from D = 32: the first unit's before the prologue's
  // barrier, each next unit's at the start of the one before (v26: S1, D = 32 329 -> 311 us per
  // call). At D = 16 (80 registers) the values held ahead spilled 16 bytes and the kernel got
  // slower (219 -> 225 us), so there each unit loads its own at its start.
  constexpr bool kAheadAll = D > 16;
  struct Ahead {
    BranchRows<D> ob;
    float2 ls[2];
  } ahead;
  auto rows_of = [&](int qt, int hg, int64_t (&rh)[2], bool (&valid)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = qt * kTile + gq + 8 * r;
      valid[r] = i < u.L;
      rh[r] = (u.bq * p.seq.N + u.s + i) * p.H + g * p.G + hg;
    }
  };
  auto load_ahead = [&](int r) {
    int qt, hg;
    unit_of(r, &qt, &hg);
    int64_t rh[2];
    bool valid[2];
    rows_of(qt, hg, rh, valid);
    load_branch_rows<T, D>(ahead.ob, in, rh, valid, tq);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      ahead.ls[k] = valid[k] ? *reinterpret_cast<const float2*>(in.lse + rh[k] * 2)
                             : make_float2(0.f, 0.f);
    }
  };
  int round = next_round(0);
  if (kAheadAll && round >= 0) load_ahead(round);
  cp_async_wait<0>();
  __syncthreads();

  while (round >= 0) {
    if (!kAheadAll) load_ahead(round);
    int qt, hg;
    unit_of(round, &qt, &hg);
    const int i0 = qt * kTile;
    int64_t rh[2];
    bool valid[2];
    rows_of(qt, hg, rh, valid);
    const int rows_i[2] = {i0 + gq, i0 + gq + 8};
    const BranchRows<D> ob = ahead.ob;
    const float2 ls[2] = {ahead.ls[0], ahead.ls[1]};
    round = next_round(round + 1);  // the warp's next unit (-1: none) for the loop's next turn
    if (kAheadAll && round >= 0) load_ahead(round);
    uint32_t qf[D / 16][4], df[D / 16][4];
    load_a_smem<D, KS>(qf, qs + (hg * rows + i0) * KS, lane);
    load_a_smem<D, KS>(df, dos + (hg * rows + i0) * KS, lane);
    float dot[2][2], gate[2][2], lse2[2][2], delta[2][2];
    branch_dots<T, D>(dot, df, ob);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 gt = gate_pair<T>(rs.gates + rows_i[r] * G + hg, p.gates_f32, 0);
      gate[r][0] = gt.x;
      gate[r][1] = gt.y;
      lse2[r][0] = ls[r].x * kLog2e;
      lse2[r][1] = ls[r].y * kLog2e;
      delta[r][0] = gate[r][0] * dot[r][0];
      delta[r][1] = gate[r][1] * dot[r][1];
      if (tq == 0 && valid[r]) store_gate_pair<T>(in.dgates, in.dgates_f32, rh[r], dot[r][0], dot[r][1]);
    }
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    }
    const uint64_t my_sel = rs.need[2 * qt], my_win = rs.need[2 * qt + 1];
    uint64_t pending = (my_sel | my_win) & ((1ull << seq_pair_tiles(qt, tiles, pb, causal)) - 1);
    const uint32_t* wq = rs.words + i0 + gq;
    uint4* slot0 = pairs + int64_t(hg * n_pairs + seq_pair_base(qt, tiles, pb, causal)) * 64 + lane;
    while (pending != 0) {
      uint32_t w[2];
      const int kt = next_key_tile(pending, wq, rows, tq, w);
      const bool do_sel = (my_sel >> kt) & 1, do_win = (my_win >> kt) & 1;
      const T* kt_s = ks + kt * kTile * KS;
      float s[2][4] = {}, dp[2][4] = {};
      mma_abt<T, D, KS>(s, qf, kt_s, lane);
      mma_abt<T, D, KS>(dp, df, vs + kt * kTile * KS, lane);
      float ds[2][4], pg[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, c = nt * 2 + (e & 1);
          float dsv = 0.f, pgv = 0.f;
          if (do_sel && word_bit(w[r], col_bit(c))) {
            const float pw = exp2f(fmaf(s[nt][e], p.scale_log2, -lse2[r][0]));
            dsv += pw * (gate[r][0] * dp[nt][e] - delta[r][0]);
            pgv += pw * gate[r][0];
          }
          if (do_win && word_bit(w[r], kTile + col_bit(c))) {
            const float pw = exp2f(fmaf(s[nt][e], p.scale_log2, -lse2[r][1]));
            dsv += pw * (gate[r][1] * dp[nt][e] - delta[r][1]);
            pgv += pw * gate[r][1];
          }
          ds[nt][e] = dsv;
          pg[nt][e] = pgv;
        }
      }
      uint32_t dsa[4], pga[4];
      c_to_a<T>(dsa, ds);
      c_to_a<T>(pga, pg);
      mma_ab<T, D, KS>(acc, dsa, kt_s, lane);
      // The transposes as A fragments (keys x queries): the 8 x 8 blocks trade places across the
      // diagonal and each is transposed.
      uint4* slot = slot0 + kt * 64;
      slot[0] = make_uint4(movmatrix_trans(dsa[0]), movmatrix_trans(dsa[2]),
                           movmatrix_trans(dsa[1]), movmatrix_trans(dsa[3]));
      slot[32] = make_uint4(movmatrix_trans(pga[0]), movmatrix_trans(pga[2]),
                            movmatrix_trans(pga[1]), movmatrix_trans(pga[3]));
    }
    rows_of(qt, hg, rh, valid);  // recomputed: fewer registers live across the tiles
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!valid[r]) continue;
      T* dq = dq_out + rh[r] * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(dq + n * 8 + 2 * tq) =
            Mma<T>::pack(acc[n][2 * r] * p.scale, acc[n][2 * r + 1] * p.scale);
      }
    }
  }
  __syncthreads();  // every pair is in shared memory

  // Phase 2: units (key tile, 16 head dims).
  constexpr int kSlices = D / 16;
  for (int x = warp; x < tiles * kSlices; x += warps) {
    const int kt = x / kSlices, np = x - kt * kSlices;
    if (kt * kTile >= u.L) continue;
    uint64_t tlist = 0;  // the query tiles that need key tile kt
    for (int t = 0; t < tiles; ++t) {
      if ((((rs.need[2 * t] | rs.need[2 * t + 1]) >> kt) & 1) &&
          kt < seq_pair_tiles(t, tiles, pb, causal)) {
        tlist |= 1ull << t;
      }
    }
    float dk[2][4] = {}, dv[2][4] = {};
    for (int hg = 0; hg < G; ++hg) {
      for (uint64_t bits = tlist; bits != 0; bits &= bits - 1) {
        const int qt = __ffsll(static_cast<long long>(bits)) - 1;
        const uint4* slot =
            pairs + int64_t(hg * n_pairs + seq_pair_base(qt, tiles, pb, causal) + kt) * 64 + lane;
        const uint4 dsv = slot[0], pgv = slot[32];
        const uint32_t dsa[4] = {dsv.x, dsv.y, dsv.z, dsv.w};
        const uint32_t pga[4] = {pgv.x, pgv.y, pgv.z, pgv.w};
        const int64_t off = (hg * rows + qt * kTile) * KS + np * 16;
        mma_ab16<T, KS>(dv, pga, dos + off, lane);
        mma_ab16<T, KS>(dk, dsa, qs + off, lane);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = kt * kTile + gq + 8 * r;
      if (j >= u.L) continue;
      const int64_t off = ((u.bq * p.seq.N + u.s + j) * p.KVH + g) * D + np * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = nt * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(dk_out + off + col) =
            Mma<T>::pack(dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv_out + off + col) = Mma<T>::pack(dv[nt][2 * r], dv[nt][2 * r + 1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, key-outer, for the sequences longer than fused_max_len(): dk/dv
// ---------------------------------------------------------------------------------------------
// The row kernels' dk/dv pass walks, per (key row, head), every query that sees the key one at a
// time (a GEMV per query with a dependent index load); the popular blocks' long lists made it
// the largest kernel at S4-S6 (docs/PERF_NOTES.md). Here a warp per (16-key tile, head of the
// group), as in fused_dkdv_kernel, takes its queries as 16-row tiles through the same MMA step
// (dkdv_tile), from two sources:
// - the contiguous rows [x_lo, x_hi): whole 16-row tiles covering the own-block queries of the
//   tile's keys and their STIS window; a row's word holds its own-range LTIS bits and all its
//   STIS bits for these keys (window, powers of two, sink), from the ranges of common/mask.h;
// - the rows that selected a block of these keys (the inverted index of pass 2, increasing row
//   order per block, the blocks in increasing order), 16 entries per tile, the LTIS bits of the
//   entry's block only (a block is listed once per row; the own block is never selected).
// The STIS queries outside [x_lo, x_hi) (the powers of two beyond the window, the sink: one key
// per row each, 1/16 of an MMA tile) are added afterwards per (key, 16 dims) as the row kernels do.
// Every sum runs in a fixed order (tiles, then the row loop, then the G heads in head order):
// deterministic, no atomics.
struct LongArgs {
  FusedArgs f;               // units: packed, of the sequences longer than fused_max_len; padded, all
  const int32_t* inv_rows;   // entry -> buffer row of a query that selected the block
  const int32_t* inv_offsets;  // [KVH * rows + 1]: (kv head, buffer row of a block's first key)
};

// The keys [lo, hi) among j0 .. j0 + 15 as bits 0 .. 15, for any range (or_range's tiles overlap
// their range by construction; here a row's range may miss the warp's keys).
__device__ __forceinline__ uint32_t range_bits16(int64_t lo, int64_t hi, int64_t j0) {
  const int64_t a = lo - j0 < 0 ? 0 : (lo - j0 > kTile ? kTile : lo - j0);
  const int64_t b = hi - j0 < 0 ? 0 : (hi - j0 > kTile ? kTile : hi - j0);
  return b > a ? ((1u << b) - 1u) ^ ((1u << a) - 1u) : 0u;
}

// Query i's word for the keys j0 .. j0 + 15: its own-range LTIS bits and all its STIS bits.
__device__ __forceinline__ uint32_t contiguous_word(const AttnParams& p, int64_t i, int64_t L,
                                                    int64_t j0) {
  int64_t lo, hi;
  own_block_range<int64_t>(i, L, p.select_block, p.stis.causal, &lo, &hi);
  uint32_t w = range_bits16(lo, hi, j0);
  for_each_stis_range<int64_t>(i, L, p.stis, [&](int64_t a, int64_t b) {
    w |= range_bits16(a, b, j0) << kTile;
  });
  return w;
}

// One stage of the long dk/dv kernel: Q, dout and aux rows of the sequence's positions pos (lane
// r < 16 holds row r's position, -1: none, zero-filled) and the rows' words (lane r's word). All
// lanes.
template <typename T, int D, int KS>
__device__ __forceinline__ void stage_rows_long(unsigned char* stage, const FusedArgs& a,
                                                const BwdIn& in, const Aux* aux, const Unit& u,
                                                int64_t pos, uint32_t word, int64_t h, int lane) {
  stage_q_dout_aux<T, D, KS>(stage, a, in, aux, u, h, lane,
                             [&](int r) {
                               const int64_t i = __shfl_sync(~0u, pos, r);
                               return StageRow<int64_t>{i >= 0, i};
                             });
  Aux* abuf = reinterpret_cast<Aux*>(stage + 2 * kTile * KS * sizeof(T));
  if (lane < kTile) reinterpret_cast<uint32_t*>(abuf + 2 * kTile)[lane] = word;
  cp_async_commit();
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, FusedTraits<D>::kLongDkdvMinBlocks)
    long_dkdv_kernel(const LongArgs la, const BwdIn in, const Aux* aux, T* dk_out, T* dv_out) {
  constexpr int KS = FusedTraits<D>::kStride;
  constexpr int kStage = stage_bytes(D, int(sizeof(T)));
  constexpr int kBuf = 2 * kStage;
  extern __shared__ __align__(16) unsigned char smem[];
  const FusedArgs& a = la.f;
  const AttnParams& p = a.p;
  Unit u;
  // Padded batches: every sequence (min_len is 0 there: the fused kernels take all or none), the
  // empty ones too, whose padding rows are zeroed here. Packed: units only for L > min_len.
  if (!find_unit(a, false, &u)) return;
  const int64_t g = a.g0 + blockIdx.y;
  if (a.unit_end == nullptr && has_padding(p, u, a.rows)) {
    dkdv_zero_padding<T, D>(p, dk_out, dv_out, u, a.rows, g);
  }
  if (u.c0 >= u.L) return;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = int(p.G);
  const int tl = warp / G, hg = warp - tl * G;
  const int64_t h = g * p.G + hg;
  const int64_t L = u.L;
  const int64_t j0 = int64_t(u.c0) + tl * kTile;  // the warp's keys j0 .. j0 + 15
  const bool active = j0 < L;
  const int64_t j1 = active ? (j0 + kTile < L ? j0 + kTile : L) : j0;
  const int64_t base = u.bq * p.seq.N + u.s;  // buffer row of position 0
  unsigned char* buf = smem + warp * kBuf;
  float* part = reinterpret_cast<float*>(buf);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  }
  int64_t x_lo = 0, x_hi = 0;  // the contiguous rows
  if (active) {
    uint32_t kf[D / 16][4], vf[D / 16][4];
    load_key_fragments<T, D>(kf, vf, p, u, g, j0, lane);
    // Own-block queries and the STIS window of the keys, as whole tiles.
    const int64_t bsz = p.select_block;
    {
      int64_t own_lo = p.stis.causal ? j0 : (j0 / bsz) * bsz;
      int64_t own_hi = ((j1 - 1) / bsz + 1) * bsz;
      own_hi = own_hi < L ? own_hi : L;
      int64_t w_lo, w_hi, w_lo1, w_hi1;
      stis_window_query_range<int64_t>(j0, L, p.stis, &w_lo, &w_hi);
      stis_window_query_range<int64_t>(j1 - 1, L, p.stis, &w_lo1, &w_hi1);
      const int64_t lo = own_lo < w_lo ? own_lo : w_lo;
      const int64_t hi = own_hi > w_hi1 ? own_hi : w_hi1;
      x_lo = lo / kTile * kTile;
      x_hi = (hi + kTile - 1) / kTile * kTile;
      x_hi = x_hi < L ? x_hi : L;
    }
    const int n_contig = int((x_hi - x_lo + kTile - 1) / kTile);
    // The selection lists of the blocks jf .. jf + nblk - 1 (<= 16) that hold these keys: lane l's
    // block's first entry and count, and the entries before it (exclusive scan).
    const int64_t jf = j0 / bsz;
    const int nblk = int((j1 - 1) / bsz - jf + 1);
    int64_t start = 0;
    int cnt = 0;
    if (lane < nblk) {
      const int64_t key = g * p.seq.Bq * p.seq.N + base + (jf + lane) * bsz;
      start = la.inv_offsets[key];
      cnt = int(la.inv_offsets[key + 1] - start);
    }
    int excl = cnt;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(~0u, excl, off);
      if (lane >= off) excl += y;
    }
    const int total = __shfl_sync(~0u, excl, 31);
    excl -= cnt;
    const int n_tiles = n_contig + (total + kTile - 1) / kTile;

    // Tile t's rows: lane r < 16's position and word.
    auto tile_rows = [&](int t, int64_t* pos, uint32_t* word) {
      const int r = lane & (kTile - 1);
      *pos = -1;
      *word = 0u;
      if (t < n_contig) {
        const int64_t i = x_lo + int64_t(t) * kTile + r;
        if (i < x_hi) {
          *pos = i;
          *word = contiguous_word(p, i, L, j0);
        }
      } else {
        const int e = (t - n_contig) * kTile + r;
        int64_t entry = -1, J = 0;
        for (int l = 0; l < nblk; ++l) {
          const int ex = __shfl_sync(~0u, excl, l), cn = __shfl_sync(~0u, cnt, l);
          const int64_t st = __shfl_sync(~0u, start, l);
          if (e >= ex && e < ex + cn) {
            entry = st + (e - ex);
            J = jf + l;
          }
        }
        if (entry >= 0) {
          *pos = int64_t(la.inv_rows[entry]) - base;
          *word = range_bits16(J * bsz, (J + 1) * bsz, j0);
        }
      }
    };
    int stage = 0;
    if (n_tiles > 0) {
      int64_t pos;
      uint32_t word;
      tile_rows(0, &pos, &word);
      stage_rows_long<T, D, KS>(buf, a, in, aux, u, pos, word, h, lane);
    }
    for (int t = 0; t < n_tiles; ++t) {
      if (t + 1 < n_tiles) {
        int64_t pos;
        uint32_t word;
        tile_rows(t + 1, &pos, &word);
        stage_rows_long<T, D, KS>(buf + (stage ^ 1) * kStage, a, in, aux, u, pos, word, h, lane);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();
      dkdv_tile<T, D, KS>(buf + stage * kStage, kf, vf, true, t < n_contig, p.scale_log2, lane,
                          dk, dv);
      __syncwarp();  // the buffer is refilled two steps on
      stage ^= 1;
    }
  }
  // The fragments to shared memory (lane-major), then the row loop over the remaining STIS
  // queries per (key, 16 dims), in place: each lane reads and writes only its own elements.
  auto part_at = [&](int mat, int key, int col) {  // element (key, col) of dk (0) or dv (1)
    const int src_lane = (key & 7) * 4 + ((col & 7) >> 1);
    return part_index<D>(mat, col >> 3, (key >> 3) * 2 + (col & 1), src_lane);
  };
  store_parts<D>(part, dk, dv, lane);
  __syncwarp();
  constexpr int kLanes = D / kDimsPerLane;            // lanes per key
  constexpr int kKeys = 32 / kLanes < kTile ? 32 / kLanes : kTile;  // keys per pass
  const int kk = lane / kLanes, cc = (lane % kLanes) * kDimsPerLane;
  if (active) {
    const T* qb = static_cast<const T*>(p.q) + u.bq * p.q_sb + u.s * p.q_sn + h * p.q_sh + cc;
    const T* db = static_cast<const T*>(in.dout) + (base * p.H + h) * D + cc;
    const Aux* ab = aux + aux_index(a, base, h) + 1;  // the STIS branch
    for (int k0 = 0; k0 < kTile; k0 += kKeys) {
      const int64_t j = j0 + k0 + kk;
      if (kk >= kKeys || j >= L) continue;  // lanes of one key stay together
      float kr[kDimsPerLane], vr[kDimsPerLane], dka[kDimsPerLane], dva[kDimsPerLane];
      Vec16<T>::load(static_cast<const T*>(p.k) + u.bq * p.k_sb + (u.s + j) * p.k_sn + g * p.k_sh + cc, kr);
      Vec16<T>::load(static_cast<const T*>(p.v) + u.bq * p.v_sb + (u.s + j) * p.v_sn + g * p.v_sh + cc, vr);
#pragma unroll
      for (int x = 0; x < kDimsPerLane; ++x) {
        dka[x] = part[part_at(0, int(j - j0), cc + x)];
        dva[x] = part[part_at(1, int(j - j0), cc + x)];
      }
      auto add_query = [&](int64_t i) {
        float q[kDimsPerLane], dd[kDimsPerLane];
        Vec16<T>::load(qb + i * p.q_sn, q);
        Vec16<T>::load(db + i * p.H * D, dd);
        dkdv_add_query<kLanes>(q, dd, kr, vr, ab[i * a.aux_heads * 2], p.scale_log2, dka, dva);
      };
      for_each_stis_query_range<int64_t>(j, L, p.stis, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi && i < x_lo; ++i) add_query(i);
        for (int64_t i = lo > x_hi ? lo : x_hi; i < hi; ++i) add_query(i);
      });
#pragma unroll
      for (int x = 0; x < kDimsPerLane; ++x) {
        part[part_at(0, int(j - j0), cc + x)] = dka[x];
        part[part_at(1, int(j - j0), cc + x)] = dva[x];
      }
    }
  }
  // Head reduction in head order by the warps of head 0 of the group, then the store.
  __syncthreads();
  if (hg > 0 || !active) return;
  for (int k0 = 0; k0 < kTile; k0 += kKeys) {
    const int64_t j = j0 + k0 + kk;
    if (kk >= kKeys || j >= L) continue;
    float dks[kDimsPerLane], dvs[kDimsPerLane];
#pragma unroll
    for (int x = 0; x < kDimsPerLane; ++x) dks[x] = dvs[x] = 0.f;
    for (int hh = 0; hh < G; ++hh) {
      const float* other = reinterpret_cast<const float*>(smem + (warp + hh) * kBuf);
#pragma unroll
      for (int x = 0; x < kDimsPerLane; ++x) {
        dks[x] += other[part_at(0, int(j - j0), cc + x)];
        dvs[x] += other[part_at(1, int(j - j0), cc + x)];
      }
    }
#pragma unroll
    for (int x = 0; x < kDimsPerLane; ++x) dks[x] *= p.scale;
    const int64_t off = ((base + j) * p.KVH + g) * D + cc;
    Vec16<T>::store(dk_out + off, dks);
    Vec16<T>::store(dv_out + off, dvs);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
// Packed batches: units of `rows` positions per sequence of at most max_len tokens.
__global__ void unit_count_kernel(const SeqParams sp, int64_t min_len, int64_t max_len, int rows,
                                  int32_t* count) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= sp.B) return;
  int64_t s, L;
  seq_bounds(sp, b, &s, &L);
  count[b] = (L > min_len && L <= max_len) ? int32_t((L + rows - 1) / rows) : 0;
}

// The mask words and tile needs of the fused sequences (fused_masks_kernel) for the kv groups g0
// .. g0 + groups - 1, kept alive by the returned tensors until the kernels that read them are
// launched. A launch planned with them covers those groups.
struct Masks {
  at::Tensor words, need;
  int64_t g0 = 0, groups = 0;
};

// Key tiles per fused dk/dv CTA, a warp each serving every head of the group (v32): kDkdvWarps,
// no more than the longest sequence has. Small CTAs spread the long walks of early key tiles over
// more of them, and their register bound is finer (v33: three CTAs of the 168-register D = 64
// kernel per SM).
int64_t dkdv_tiles_per_cta(int64_t n_max) {
  return kDkdvWarps < ceil_div(n_max, kTile) ? kDkdvWarps : ceil_div(n_max, kTile);
}

Masks compute_masks(const AttnParams& p, const Dims& d, int64_t max_len, int64_t n_max,
                    const at::Tensor& seq_len, cudaStream_t stream, int64_t g0 = 0,
                    int64_t groups = -1);

struct Launch {
  FusedArgs args;
  dim3 grid;
  int threads;
  int64_t smem;
  at::Tensor unit_end;  // keeps the packed prefix alive until the launch
};

// Units of `rows` positions of the sequences of min_len < L <= max_len tokens: packed batches
// count them (unit_count_kernel); padded ones get units for every sequence and the kernels skip
// the others' (FusedArgs::min_len, max_len), each zeroing its own sequences' padding rows.
Launch plan_units(const AttnParams& p, const Dims& d, int64_t max_len, int rows,
                  const at::Tensor& seq_len, cudaStream_t stream, const Masks* masks,
                  int64_t min_len = 0) {
  Launch l;
  FusedArgs& a = l.args;
  a.p = p;
  a.words = masks ? reinterpret_cast<uint32_t*>(masks->words.data_ptr<int32_t>()) : nullptr;
  a.need = masks ? reinterpret_cast<uint64_t*>(masks->need.data_ptr<int64_t>()) : nullptr;
  a.mask_rows = d.Bq * d.N;
  a.tiles_cap = masks ? int(masks->need.size(2)) : 0;
  a.g0 = masks ? masks->g0 : 0;
  const int64_t groups = masks ? masks->groups : d.KVH;
  a.aux_heads = p.H;  // launch_bwd's chunks of groups set theirs
  a.rows = rows;
  constexpr int64_t kClamp = 2 * kMaxLen;
  a.b = int(p.select_block < kClamp ? p.select_block : kClamp);
  a.st = p.stis;
  a.st.window = p.stis.window < kClamp ? p.stis.window : kClamp;
  a.st.power_block = p.stis.power_block < kClamp ? p.stis.power_block : kClamp;
  a.seg = 0;
  if (d.Bq == d.B) {
    a.unit_end = nullptr;
    a.per_seq = ceil_div(d.N, rows);
    l.grid = dim3(unsigned(d.B * a.per_seq), unsigned(groups));
    // the kernels skip the other sequences' units (min_len 0: empty sequences are units too, to
    // zero their padding rows)
    if (min_len > 0) a.min_len = min_len;
    a.max_len = max_len;
  } else {
    at::Tensor count = at::empty({d.B}, seq_len.options());
    unit_count_kernel<<<unsigned(ceil_div(d.B, 256)), 256, 0, stream>>>(
        p.seq, min_len, max_len, rows, count.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l.unit_end = at::cumsum(count, 0, at::kInt);
    a.unit_end = l.unit_end.data_ptr<int32_t>();
    a.per_seq = 0;
    l.grid = dim3(unsigned(ceil_div(d.N, rows) + d.B), unsigned(groups));
  }
  return l;
}

// The longest sequence a launch sees (the shared-memory sizes follow it).
int64_t longest(const Dims& d, int64_t max_len) { return d.N < max_len ? d.N : max_len; }

// 16-row (or 16-key) tiles per CTA: a warp per (tile, head of the group), G * tiles <= 8 warps,
// no more tiles than the longest sequence has.
int64_t tiles_per_cta(const Dims& d, int64_t n_max) {
  int64_t t = kMaxWarps / d.G;
  t = t < 1 ? 1 : t;
  return t < ceil_div(n_max, kTile) ? t : ceil_div(n_max, kTile);
}

Masks compute_masks(const AttnParams& p, const Dims& d, int64_t max_len, int64_t n_max,
                    const at::Tensor& seq_len, cudaStream_t stream, int64_t g0, int64_t groups) {
  Masks m;
  m.g0 = g0;
  m.groups = groups < 0 ? d.KVH : groups;
  const auto opts = seq_len.options().dtype(at::kLong);
  const int64_t tiles_cap = ceil_div(n_max, kTile);
  m.words = at::empty({m.groups, tiles_cap, d.Bq * d.N}, opts.dtype(at::kInt));
  m.need = at::empty({m.groups, d.B, tiles_cap, 2}, opts);
  Launch l = plan_units(p, d, max_len, kMaskRows, seq_len, stream, &m);
  const int64_t smem = tiles_cap * kMaskRows * 4;  // <= 32 KiB
  fused_masks_kernel<<<l.grid, kMaskRows, size_t(smem), stream>>>(l.args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return m;
}

// Keys per shared-memory segment of a query-outer CTA of `rows` positions: K + V within the
// budget, and with the chunk's row state (words, needs, gates, lse) within what kFwdMinBlocks CTAs
// per SM can each have: at G <= 2 a chunk has 64-128 rows and up to 32 KiB of words, which on top
// of a full segment left one CTA per SM at D = 32, 64 (found in review, docs/PERF_NOTES.md v18d).
template <typename T, int D>
int64_t segment_keys(const Dims& d, int64_t n_max, int rows, int tiles_cap, bool with_lse) {
  constexpr int KS = FusedTraits<D>::kStride;
  const int64_t kv_row = 2 * KS * int64_t(sizeof(T));
  const int64_t row_state = row_smem_layout(0, rows, tiles_cap, d.G, with_lse).total;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t per_cta = int64_t(prop->sharedMemPerMultiprocessor) / FusedTraits<D>::kFwdMinBlocks -
                          int64_t(prop->reservedSharedMemPerBlock);
  int64_t kv_budget = FusedTraits<D>::kSegmentBudget;
  if (per_cta - row_state < kv_budget) kv_budget = per_cta - row_state;
  int64_t seg_cap = kv_budget / kv_row / kTile * kTile;
  if (seg_cap < kTile) seg_cap = kTile;
  const int64_t keys = ceil_div(n_max, kTile) * kTile;
  return keys < seg_cap ? keys : seg_cap;
}

// reps: query tiles per warp (the forward's, fused_fwd_kernel; dq takes one): a chunk is reps x
// tiles_per_cta tiles.
template <typename T, int D>
Launch plan_query_outer(const AttnParams& p, const Dims& d, int64_t max_len,
                        const at::Tensor& seq_len, cudaStream_t stream, const Masks& masks,
                        bool with_lse, int64_t min_len = 0, int reps = 1) {
  constexpr int KS = FusedTraits<D>::kStride;
  const int64_t n_max = longest(d, max_len);
  const int64_t tpc = tiles_per_cta(d, n_max);
  Launch l = plan_units(p, d, max_len, int(reps * tpc * kTile), seq_len, stream, &masks, min_len);
  l.args.seg = int(segment_keys<T, D>(d, n_max, l.args.rows, l.args.tiles_cap, with_lse));
  // a warp per M tile of P positions x G heads (m_positions) of one rep's tpc tiles: G tpc warps
  // where G divides 16, up to 8 (G = 3: 7, G = 5: 6)
  l.threads = int(32 * ceil_div(tpc * kTile, m_positions(d.G)));
  l.smem = row_smem_layout(l.args.seg * 2 * KS * int64_t(sizeof(T)), l.args.rows, l.args.tiles_cap,
                           d.G, with_lse).total;
  return l;
}

// Query tiles per forward warp: two where a sequence has at most kFwdRepsMaxLen tokens and
// more tiles than one CTA's warps take, so that a CTA's prologue (finding its unit, one wait on
// the staged K, V and row state) serves twice the tiles (v26, docs/PERF_NOTES.md), provided the
// keys still fit one segment. BLOSSOMREC_FWD_REPS=1 or 2 forces it (benchmarks, tests).
constexpr int64_t kFwdRepsMaxLen = 256;

template <typename T, int D>
int fwd_reps(const Dims& d, int64_t max_len, const Masks& masks) {
  const char* e = std::getenv("BLOSSOMREC_FWD_REPS");
  const int64_t n_max = longest(d, max_len);
  if (e != nullptr && (e[0] == '1' || e[0] == '2')) return e[0] - '0';
  const int64_t tpc = tiles_per_cta(d, n_max);
  if (n_max > kFwdRepsMaxLen || ceil_div(n_max, kTile) <= tpc) return 1;
  const int rows = int(2 * tpc * kTile);
  const int64_t seg = segment_keys<T, D>(d, n_max, rows, int(masks.need.size(2)), false);
  return seg >= ceil_div(n_max, kTile) * kTile ? 2 : 1;
}

template <typename T, int D>
void launch_fwd(const AttnParams& p, const FwdOut& o, const Dims& d, int64_t max_len,
                const at::Tensor& seq_len, cudaStream_t stream) {
  const Masks masks = compute_masks(p, d, max_len, longest(d, max_len), seq_len, stream);
  const int reps = fwd_reps<T, D>(d, max_len, masks);
  const Launch l = plan_query_outer<T, D>(p, d, max_len, seq_len, stream, masks, false, 0, reps);
  auto kernel = fused_fwd_kernel<T, D>;
  allow_dynamic_smem(kernel, l.smem);
  kernel<<<l.grid, l.threads, size_t(l.smem), stream>>>(l.args, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The power block as the fused kernels clamp it (plan_units).
int clamped_power_block(const AttnParams& p) {
  return int(p.stis.power_block < 2 * kMaxLen ? p.stis.power_block : 2 * kMaxLen);
}

// The longest sequence fused_seq_bwd_kernel takes here (0: none): up to kSeqMaxLen tokens where
// its shared memory fits one CTA, at D <= 32 (v25, docs/PERF_NOTES.md: at D = 64 one CTA per SM
// of 8 warps was slower than the dq and dk/dv kernels). BLOSSOMREC_SEQ_BWD=0: never, =1: at every
// head dim (benchmarks, tests).
int64_t seq_bwd_len(const AttnParams& p, const Dims& d, int64_t max_len) {
  const char* e = std::getenv("BLOSSOMREC_SEQ_BWD");
  if (e != nullptr && e[0] == '0') return 0;
  if (d.D > 32 && !(e != nullptr && e[0] == '1')) return 0;
  const int64_t n = longest(d, max_len) < kSeqMaxLen ? longest(d, max_len) : kSeqMaxLen;
  if (n <= 0) return 0;
  const int rows = int(ceil_div(n, kTile) * kTile);
  const int64_t smem =
      seq_smem_layout(rows, d.G, int(d.D), 2, clamped_power_block(p), p.stis.causal).total;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return smem <= int64_t(prop->sharedMemPerBlockOptin) ? n : 0;
}

template <typename T, int D>
void launch_seq_bwd(const AttnParams& p, const BwdIn& in, T* dq, T* dk, T* dv, const Dims& d,
                    int64_t short_len, const at::Tensor& seq_len, cudaStream_t stream,
                    const Masks& masks) {
  const int rows = int(ceil_div(short_len, kTile) * kTile);
  Launch l = plan_units(p, d, short_len, rows, seq_len, stream, &masks);
  if (l.args.unit_end == nullptr) {  // padded: one unit per sequence (the longer ones skip it)
    l.args.per_seq = 1;
    l.grid = dim3(unsigned(d.B), l.grid.y);
  }
  const int64_t warps = d.G * (rows / kTile) < kMaxWarps ? d.G * (rows / kTile) : kMaxWarps;
  l.threads = int(32 * warps);
  l.smem = seq_smem_layout(rows, d.G, D, int(sizeof(T)), clamped_power_block(p), p.stis.causal).total;
  auto kernel = fused_seq_bwd_kernel<T, D>;
  allow_dynamic_smem(kernel, l.smem);
  kernel<<<l.grid, l.threads, size_t(l.smem), stream>>>(l.args, in, dq, dk, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kv groups per launch of the fused backward where it owns aux (aux_free): one at a time while
// each launch of the dk/dv kernel still has kChunkMinPairs (key tile, head) pairs per SM (64: v29's
// 8 CTAs of 8 such warps), so that the mask words and aux exist for one group at a time (v29,
// docs/PERF_NOTES.md: at N = 1024, D = 16 they are twice and half dq's size per group, and held
// the peak above dense SDPA's); all at once where that would leave SMs idle.
// BLOSSOMREC_BWD_GROUPS=n forces n (tests, benchmarks).
constexpr int64_t kChunkMinPairs = 64;

int64_t bwd_groups_per_launch(const Dims& d, int64_t n_max, bool aux_free) {
  if (!aux_free) return d.KVH;  // the caller's aux covers every head
  const char* e = std::getenv("BLOSSOMREC_BWD_GROUPS");
  if (e != nullptr && e[0] >= '1' && e[0] <= '9') {
    const int64_t n = std::atoll(e);
    return n < d.KVH ? n : d.KVH;
  }
  const int64_t tiles = dkdv_tiles_per_cta(n_max), rows = tiles * kTile;
  // the dk/dv CTAs of one group: every unit of a padded batch, those of the packed tokens
  const int64_t units = d.Bq == d.B ? d.B * ceil_div(n_max, rows) : ceil_div(d.N, rows);
  const int64_t pairs = units * tiles * d.G;
  const int64_t want = kChunkMinPairs * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per = ceil_div(want, pairs > 0 ? pairs : 1);
  return per < d.KVH ? per : d.KVH;
}

// aux: the caller's (every head; it also serves the row kernels' sequences), or null: the dq and
// dk/dv kernels then get their own, for the heads of one chunk of kv groups at a time.
template <typename T, int D>
void launch_bwd(const AttnParams& p, const BwdIn& in, Aux* aux, T* dq, T* dk, T* dv, const Dims& d,
                int64_t max_len, const at::Tensor& seq_len, cudaStream_t stream) {
  const int64_t n_max = longest(d, max_len);
  // The sequences of at most short_len tokens in one CTA each; the dq and dk/dv kernels take the
  // longer ones.
  const int64_t short_len = seq_bwd_len(p, d, max_len);
  const bool dq_dkdv = n_max > short_len;
  const int64_t per = dq_dkdv ? bwd_groups_per_launch(d, n_max, aux == nullptr) : d.KVH;
  at::Tensor own_aux;
  int64_t aux_heads = p.H;
  if (dq_dkdv && aux == nullptr) {
    aux_heads = per * p.G;
    own_aux = at::empty({d.Bq, d.N, aux_heads, 2, 4}, seq_len.options().dtype(at::kFloat));
    aux = reinterpret_cast<Aux*>(own_aux.data_ptr<float>());
  }
  for (int64_t g0 = 0; g0 < d.KVH; g0 += per) {
    const int64_t groups = per < d.KVH - g0 ? per : d.KVH - g0;
    const Masks masks = compute_masks(p, d, max_len, n_max, seq_len, stream, g0, groups);
    if (short_len > 0) launch_seq_bwd<T, D>(p, in, dq, dk, dv, d, short_len, seq_len, stream, masks);
    if (!dq_dkdv) continue;
    {
      Launch l = plan_query_outer<T, D>(p, d, max_len, seq_len, stream, masks, true, short_len);
      l.args.aux_heads = aux_heads;
      auto kernel = fused_dq_kernel<T, D>;
      allow_dynamic_smem(kernel, l.smem);
      kernel<<<l.grid, l.threads, size_t(l.smem), stream>>>(l.args, in, aux, dq);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t tiles = dkdv_tiles_per_cta(n_max);  // a warp per key tile
    Launch l = plan_units(p, d, max_len, int(tiles * kTile), seq_len, stream, &masks, short_len);
    l.args.aux_heads = aux_heads;
    l.threads = int(32 * tiles);
    l.smem = dkdv_smem(tiles, D, int(sizeof(T)), /*fused=*/true);
    auto kernel = fused_dkdv_kernel<T, D>;
    allow_dynamic_smem(kernel, l.smem);
    kernel<<<l.grid, l.threads, size_t(l.smem), stream>>>(l.args, in, aux, dk, dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void launch_long_dkdv(const AttnParams& p, const BwdIn& in, const Aux* aux, const int32_t* inv_rows,
                      const int32_t* inv_offsets, T* dk, T* dv, const Dims& d, int64_t min_len,
                      const at::Tensor& seq_len, cudaStream_t stream) {
  const int64_t tiles = tiles_per_cta(d, d.N);
  const int64_t warps = d.G * tiles;
  Launch l = plan_units(p, d, std::numeric_limits<int64_t>::max(), int(tiles * kTile), seq_len,
                        stream, nullptr, min_len);
  l.threads = int(32 * warps);
  l.smem = dkdv_smem(warps, D, int(sizeof(T)), /*fused=*/false);
  BR_CHECK(fused_long_dkdv_fits(d), "long_dkdv_kernel launched where it does not fit");
  const LongArgs la{l.args, inv_rows, inv_offsets};
  auto kernel = long_dkdv_kernel<T, D>;
  allow_dynamic_smem(kernel, l.smem);
  kernel<<<l.grid, l.threads, size_t(l.smem), stream>>>(la, in, aux, dk, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t fused_max_len(at::ScalarType dtype, int64_t head_dim, int64_t select_block,
                      bool backward) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return 0;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8) return 0;  // mma.sync bf16 needs sm_80
  if (backward) {
    // fused_dkdv_kernel's shared memory (kDkdvWarps warps) must fit one CTA.
    if (dkdv_smem(kDkdvWarps, int(head_dim), 2, true) > int64_t(prop->sharedMemPerBlockOptin)) return 0;
  }
  // Measured on an H200 (docs/PERF_NOTES.md, v15, v16, v18, v31): the fused kernels win at every
  // length up to kMaxLen and every D, forward and backward (S3, D = 16, v31: the fused forward
  // 0.282 ms with the selection against the row forward's 0.328; it stopped at 256 tokens there
  // from v18c until the M tiles of P positions x G heads).
  const int64_t by_dim = kMaxLen;
  // floor(L / b) <= 64 selection blocks, i.e. L < 65 b.
  const int64_t by_blocks = 65 * select_block - 1;
  return by_blocks < by_dim ? by_blocks : by_dim;
}

FusedPlan plan_fused(const Dims& d, at::ScalarType dtype, int64_t select_block, bool backward) {
  FusedPlan plan;
  const int64_t max_len = fused_max_len(dtype, d.D, select_block, backward);
  // No sequences (a packed buffer of padding only): the row kernels zero it.
  if (max_len <= 0 || d.B == 0) return plan;
  if (d.Bq == d.B) {
    if (d.N > max_len) return plan;  // padded: all or nothing
    plan.max_len = max_len;
    plan.row_kernels = false;
    return plan;
  }
  plan.max_len = max_len;
  plan.row_kernels = true;  // longer sequences and the padding rows
  return plan;
}

void fused_forward(const AttnParams& p, const FwdOut& o, const Dims& d, at::ScalarType dtype,
                   int64_t max_len, const at::Tensor& seq_len, cudaStream_t stream) {
  BR_HALF_DTYPE_SWITCH(dtype, [&] {
    BR_HEADDIM_SWITCH(d.D, [&] { launch_fwd<scalar_t, kHeadDim>(p, o, d, max_len, seq_len, stream); });
  });
}

void fused_backward(const AttnParams& p, const BwdIn& in, Aux* aux, void* dq, void* dk, void* dv,
                    const Dims& d, at::ScalarType dtype, int64_t max_len, const at::Tensor& seq_len,
                    cudaStream_t stream) {
  BR_HALF_DTYPE_SWITCH(dtype, [&] {
    BR_HEADDIM_SWITCH(d.D, [&] {
      launch_bwd<scalar_t, kHeadDim>(p, in, aux, static_cast<scalar_t*>(dq),
                                     static_cast<scalar_t*>(dk), static_cast<scalar_t*>(dv), d,
                                     max_len, seq_len, stream);
    });
  });
}

bool fused_long_dkdv_fits(const Dims& d) {
  const int64_t warps = d.G * tiles_per_cta(d, d.N);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return d.N < std::numeric_limits<int32_t>::max() &&
         dkdv_smem(warps, int(d.D), 2, false) <= int64_t(prop->sharedMemPerBlockOptin);
}

void fused_long_dkdv(const AttnParams& p, const BwdIn& in, const Aux* aux, const int32_t* inv_rows,
                     const int32_t* inv_offsets, void* dk, void* dv, const Dims& d,
                     at::ScalarType dtype, int64_t min_len, const at::Tensor& seq_len,
                     cudaStream_t stream) {
  BR_HALF_DTYPE_SWITCH(dtype, [&] {
    BR_HEADDIM_SWITCH(d.D, [&] {
      launch_long_dkdv<scalar_t, kHeadDim>(p, in, aux, inv_rows, inv_offsets,
                                           static_cast<scalar_t*>(dk), static_cast<scalar_t*>(dv),
                                           d, min_len, seq_len, stream);
    });
  });
}

}  // namespace cuda
}  // namespace blossomrec
