// The mask rules of docs/ALGORITHM.md as pure host/device functions.
//
// One statement of "which key does query i see", shared by the CPU kernels, the CUDA kernels and the
// C++ unit test (tests_cpp/test_mask.cpp). Positions are relative to the sequence's first valid token.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define BR_HD __host__ __device__ __forceinline__
#else
#define BR_HD inline
#endif

namespace blossomrec {

BR_HD bool is_pow2_or_zero(int64_t d) { return d >= 0 && (d & (d - 1)) == 0; }

// Floor division for possibly negative numerators (the power block index of a position is never
// negative, but differences are).
BR_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// SPEC 2: is key j visible to query i in the short-term (STIS, "power") branch of a sequence of
// length L? d = i//p - j//p.
BR_HD bool stis_visible(int64_t i, int64_t j, int64_t L, int64_t window, int64_t power_block,
                        bool use_power, bool use_sink, bool causal) {
  if (i < 0 || j < 0 || i >= L || j >= L) return false;
  const int64_t d = i / power_block - j / power_block;
  if (causal) return d >= 0 && (d < window || (use_power && is_pow2_or_zero(d)));
  const int64_t ad = d < 0 ? -d : d;
  if (ad < window) return true;
  if (use_power && d > 0 && is_pow2_or_zero(d)) return true;
  return use_sink && j == L - 1;
}

// Number of selection blocks of a sequence (SPEC 1b): floor(C / m) with C = floor(L / s) compressed
// windows (clipped to the C_avail rows that kc holds) and m = b / s windows per block.
BR_HD int64_t num_select_blocks(int64_t L, int64_t C_avail, int64_t compress_stride,
                                int64_t select_block) {
  int64_t C = L / compress_stride;
  if (C > C_avail) C = C_avail;
  return C / (select_block / compress_stride);
}

// SPEC 1b: is selection block J a candidate for query i? The index type I is J's (int64_t, or int
// where positions are small: the fused CUDA kernels).
template <typename I>
BR_HD bool block_visible(I J, std::type_identity_t<I> i, std::type_identity_t<I> num_blocks,
                         std::type_identity_t<I> select_block, bool causal) {
  if (J < 0 || J >= num_blocks) return false;
  if (causal) return (J + 1) * select_block <= i;
  return J != i / select_block;
}

// SPEC 1c: the own block of query i is the key range [*lo, *hi).
template <typename I>
BR_HD void own_block_range(std::type_identity_t<I> i, std::type_identity_t<I> L,
                           std::type_identity_t<I> select_block, bool causal, I* lo, I* hi) {
  *lo = (i / select_block) * select_block;
  if (causal) {
    *hi = i + 1;
  } else {
    const I end = *lo + select_block;
    *hi = end < L ? end : L;
  }
}

// ---------------------------------------------------------------------------------------------
// SPEC 2 key sets as ranges: the enumerators every kernel walks instead of testing stis_visible on
// all keys (tests_cpp/test_mask.cpp checks each against {j : stis_visible(i, j)}).
// ---------------------------------------------------------------------------------------------
struct StisParams {
  int64_t window, power_block;
  bool use_power, use_sink, causal;
};

BR_HD int64_t first_power_at_least(int64_t w) {
  int64_t d = 1;
  while (d < w) d <<= 1;
  return d;
}

// Calls f(lo, hi) for disjoint, non-empty key ranges [lo, hi) whose union is the STIS key set of
// query i (0 <= i < L): the window as one range, then one range per power-of-two distance beyond
// it (each a power block), then the sink where the other rules miss it (the last key lies in the
// last power block, so only the window can reach it). About w + log2(L / p) calls. I is the index
// type: int64_t anywhere, int where positions, window and power block are known to be small (the
// fused CUDA kernels clamp both to 2^11, which changes nothing for L <= 1024).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename I, typename F>
BR_HD void for_each_stis_range(I i, I L, const StisParams& st, F&& f) {
  const I p = I(st.power_block), w = I(st.window);
  const I ib = i / p;
  const I last_block = (L - 1) / p;
  {
    I lo_b = ib - (w - 1);
    I hi_b = st.causal ? ib : ib + (w - 1);
    lo_b = lo_b < 0 ? 0 : lo_b;
    hi_b = hi_b > last_block ? last_block : hi_b;
    const I hi = (hi_b + 1) * p < L ? (hi_b + 1) * p : L;
    f(lo_b * p, hi);
  }
  if (st.use_power) {
    for (I d = I(first_power_at_least(w)); ib - d >= 0; d <<= 1) {
      const I lo = (ib - d) * p;
      f(lo, lo + p < L ? lo + p : L);
    }
  }
  if (!st.causal && st.use_sink && last_block - ib >= w) f(L - 1, L);
}

// The queries that see key j (0 <= j < L) through the STIS window: [*lo, *hi), the first range of
// for_each_stis_query_range (from the power block jb to jb + w - 1, and back to jb - (w - 1) when
// not causal).
template <typename I>
BR_HD void stis_window_query_range(I j, I L, const StisParams& st, I* lo, I* hi) {
  const I p = I(st.power_block), w = I(st.window);
  const I jb = j / p;
  const I last_block = (L - 1) / p;
  I lo_b = st.causal ? jb : jb - (w - 1);
  I hi_b = jb + (w - 1);
  lo_b = lo_b < 0 ? 0 : lo_b;
  hi_b = hi_b > last_block ? last_block : hi_b;
  *lo = lo_b * p;
  *hi = (hi_b + 1) * p < L ? (hi_b + 1) * p : L;
}

// The inverse: calls f(lo, hi) for disjoint, non-empty query ranges whose union is the set of
// queries that see key j (0 <= j < L) through STIS. O(w + log2(L / p)) calls, the sink included:
// no query sees the last key at a positive distance and the window reaches back to block
// jb - (w - 1); the sink adds every query before that, one range.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename I, typename F>
BR_HD void for_each_stis_query_range(I j, I L, const StisParams& st, F&& f) {
  const I p = I(st.power_block), w = I(st.window);
  const I jb = j / p;
  const I last_block = (L - 1) / p;
  I lo, hi;
  stis_window_query_range(j, L, st, &lo, &hi);
  f(lo, hi);
  if (st.use_power) {
    for (I d = I(first_power_at_least(w)); jb + d <= last_block; d <<= 1) {
      const I r0 = (jb + d) * p;
      f(r0, r0 + p < L ? r0 + p : L);
    }
  }
  if (!st.causal && st.use_sink && j == L - 1 && lo > 0) f(I(0), lo);
}

// Running top-n of (score, block) pairs, kept sorted by decreasing score; ties keep the lower block
// first. Blocks must be offered in increasing order, so a new block never displaces an equal score.
// `count` is the number of filled slots (<= n). Indices compile-time unrolled when n is a constant.
template <typename T>
BR_HD void topn_insert(T* scores, int32_t* blocks, int& count, int n, T score, int32_t block) {
  if (n <= 0) return;
  if (count == n && !(score > scores[n - 1])) return;
  int pos = count < n ? count : n - 1;
  // Shift strictly smaller scores down; equal scores (lower block) stay ahead.
  while (pos > 0 && scores[pos - 1] < score) {
    scores[pos] = scores[pos - 1];
    blocks[pos] = blocks[pos - 1];
    --pos;
  }
  scores[pos] = score;
  blocks[pos] = block;
  if (count < n) ++count;
}

// SPEC 1b threshold: the softmax includes a constant -1000 logit; only P > 1e-10 is kept.
constexpr float kSelectNullLogit = -1000.0f;
constexpr float kSelectMinProb = 1e-10f;

}  // namespace blossomrec
