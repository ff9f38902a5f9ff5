// Unit test of the pure mask helpers in csrc/common/mask.h (docs/ALGORITHM.md sections 1b, 1c and 2).
//
// mask.h is plain C++ when nvcc does not compile it, so this test needs neither torch nor a GPU and
// builds in seconds. Each rule is checked two ways: on hand-worked cases from the spec, and against
// an independent brute-force statement of the same rule (distance sets built by enumeration, a
// stable sort instead of the running top-n) over every (i, j) of several sequence lengths.
//
// Exit status: 0 when every check passed, 1 otherwise. The last line is "test_mask: N passed, M failed".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/mask.h"

namespace {

int g_passed = 0;
int g_failed = 0;

// Records one check; prints the failing expression with its context (at most 20 failures printed,
// so that a systematic bug does not flood the log).
void record(bool ok, const char* expr, const char* file, int line, const std::string& context) {
  if (ok) {
    ++g_passed;
    return;
  }
  ++g_failed;
  if (g_failed <= 20) {
    std::printf("FAIL %s:%d: %s%s%s\n", file, line, expr, context.empty() ? "" : "  [",
                context.empty() ? "" : (context + "]").c_str());
  }
}

#define CHECK(cond) record((cond), #cond, __FILE__, __LINE__, std::string())
#define CHECK_CTX(cond, ctx) record((cond), #cond, __FILE__, __LINE__, (ctx))
#define CHECK_EQ(a, b)                                                                          \
  record((a) == (b), #a " == " #b, __FILE__, __LINE__,                                        \
         "got " + std::to_string(a) + " vs " + std::to_string(b))

std::string at(int64_t i, int64_t j, int64_t L) {
  return "i=" + std::to_string(i) + " j=" + std::to_string(j) + " L=" + std::to_string(L);
}

// ---------------------------------------------------------------------------------------------
// Independent statements of the rules
// ---------------------------------------------------------------------------------------------

// Powers of two 1, 2, 4, ... up to `limit`, built by doubling (no bit tricks).
std::set<int64_t> powers_of_two_up_to(int64_t limit) {
  std::set<int64_t> out;
  for (int64_t p = 1; p <= limit; p *= 2) out.insert(p);
  return out;
}

// SPEC 2 with the block distance d = floor(i / p) - floor(j / p), written as set membership.
bool stis_brute(int64_t i, int64_t j, int64_t L, int64_t w, int64_t p, bool use_power, bool use_sink,
                bool causal) {
  if (i < 0 || j < 0 || i >= L || j >= L) return false;
  const int64_t d = i / p - j / p;
  const std::set<int64_t> pow2 = powers_of_two_up_to(L);
  const bool in_window = causal ? (d >= 0 && d < w) : (d > -w && d < w);
  const bool in_power = use_power && (d == 0 || pow2.count(d) > 0);
  if (causal) return in_window || (d >= 0 && in_power);
  const bool power_forward = use_power && d > 0 && pow2.count(d) > 0;
  return in_window || power_forward || (use_sink && j == L - 1);
}

// The top-n of SPEC 1b: sort (score desc, block asc) and take the first n.
std::vector<std::pair<float, int32_t>> topn_brute(const std::vector<float>& scores, int n) {
  std::vector<std::pair<float, int32_t>> all;
  for (size_t b = 0; b < scores.size(); ++b) all.emplace_back(scores[b], static_cast<int32_t>(b));
  std::stable_sort(all.begin(), all.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  if (static_cast<int>(all.size()) > n) all.resize(n);
  return all;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

void test_floor_div() {
  using blossomrec::floor_div;
  CHECK_EQ(floor_div(7, 2), 3);
  CHECK_EQ(floor_div(-7, 2), -4);
  CHECK_EQ(floor_div(-8, 2), -4);
  CHECK_EQ(floor_div(7, -2), -4);
  CHECK_EQ(floor_div(-7, -2), 3);
  CHECK_EQ(floor_div(0, 5), 0);
  CHECK_EQ(floor_div(-1, 16), -1);
  CHECK_EQ(floor_div(-16, 16), -1);
  CHECK_EQ(floor_div(-17, 16), -2);
  CHECK_EQ(floor_div(15, 16), 0);
  for (int64_t a = -100; a <= 100; ++a) {
    for (int64_t b : {1, 2, 3, 7, 16, -1, -5}) {
      const int64_t q = floor_div(a, b);
      // The floor quotient is the unique q with b*q <= a < b*(q+1) (for b > 0; reversed for b < 0).
      const bool ok = b > 0 ? (b * q <= a && a < b * (q + 1)) : (b * q >= a && a > b * (q + 1));
      CHECK_CTX(ok, "a=" + std::to_string(a) + " b=" + std::to_string(b));
    }
  }
}

void test_is_pow2_or_zero() {
  using blossomrec::is_pow2_or_zero;
  const std::set<int64_t> pow2 = powers_of_two_up_to(1 << 20);
  for (int64_t d = -40; d <= 5000; ++d) {
    CHECK_CTX(is_pow2_or_zero(d) == (d == 0 || pow2.count(d) > 0), "d=" + std::to_string(d));
  }
  CHECK(is_pow2_or_zero(int64_t(1) << 40));
  CHECK(!is_pow2_or_zero((int64_t(1) << 40) + 1));
}

void test_stis_causal_defaults() {
  using blossomrec::stis_visible;
  // SPEC 2 with the defaults (w = 8, p = 1): d in {0..8} U {16, 32, 64, ...}.
  const int64_t L = 300, i = 200;
  std::vector<int64_t> seen;
  for (int64_t j = 0; j < L; ++j) {
    if (stis_visible(i, j, L, 8, 1, true, false, true)) seen.push_back(i - j);
  }
  const std::vector<int64_t> expect = {128, 64, 32, 16, 8, 7, 6, 5, 4, 3, 2, 1, 0};
  CHECK_CTX(seen == expect, "distances seen by query 200");
  // Never a future key, never out of range.
  CHECK(!stis_visible(10, 11, 20, 8, 1, true, false, true));
  CHECK(!stis_visible(10, -1, 20, 8, 1, true, false, true));
  CHECK(!stis_visible(20, 4, 20, 8, 1, true, false, true));
  CHECK(!stis_visible(-1, 0, 20, 8, 1, true, false, true));
  // Query 0 sees only itself.
  for (int64_t j = 0; j < 20; ++j) CHECK_CTX(stis_visible(0, j, 20, 8, 1, true, false, true) == (j == 0), at(0, j, 20));
  // The sink is a non-causal rule: no effect when causal.
  CHECK(!stis_visible(5, 19, 20, 8, 1, true, true, true));
}

void test_stis_causal_no_power() {
  using blossomrec::stis_visible;
  // Power-of-two part off: a plain sliding window of w keys (NSA's window).
  const int64_t L = 100;
  for (int64_t i = 0; i < L; ++i) {
    int count = 0;
    for (int64_t j = 0; j < L; ++j) count += stis_visible(i, j, L, 8, 1, false, false, true);
    CHECK_EQ(count, static_cast<int>(std::min<int64_t>(i + 1, 8)));
  }
  CHECK(!stis_visible(50, 34, L, 8, 1, false, false, true));  // d = 16: only a power of two
  CHECK(stis_visible(50, 34, L, 8, 1, true, false, true));
  // w = 1 with power off: only the key itself.
  CHECK(stis_visible(7, 7, L, 1, 1, false, false, true));
  CHECK(!stis_visible(7, 6, L, 1, 1, false, false, true));
  // w = 1 with power on: d in {0, 1, 2, 4, 8, ...}.
  CHECK(stis_visible(9, 8, L, 1, 1, true, false, true));
  CHECK(stis_visible(9, 5, L, 1, 1, true, false, true));
  CHECK(!stis_visible(9, 6, L, 1, 1, true, false, true));
}

void test_stis_power_block() {
  using blossomrec::stis_visible;
  // p = 4: distances are counted in blocks of 4 positions. Query 21 is in block 5.
  const int64_t L = 64;
  // Block distance 0: keys 20..23, but causal keeps j <= 23 by block, so 22 and 23 are visible too
  // (the rule is on blocks: d = 5 - 5 = 0 >= 0).
  CHECK(stis_visible(21, 23, L, 2, 4, false, false, true));
  CHECK(stis_visible(21, 20, L, 2, 4, false, false, true));
  CHECK(stis_visible(21, 16, L, 2, 4, false, false, true));  // block distance 1 < 2
  CHECK(!stis_visible(21, 15, L, 2, 4, false, false, true));  // block distance 2
  CHECK(stis_visible(21, 15, L, 2, 4, true, false, true));   // ... a power of two
  CHECK(!stis_visible(21, 3, L, 2, 4, true, false, true));   // block distance 5
  CHECK(stis_visible(21, 7, L, 2, 4, true, false, true));    // block distance 4
  CHECK(!stis_visible(21, 24, L, 2, 4, true, false, true));  // next block: d = -1
}

void test_stis_non_causal() {
  using blossomrec::stis_visible;
  const int64_t L = 40;
  // |d| < w both ways.
  CHECK(stis_visible(10, 17, L, 8, 1, true, false, false));
  CHECK(!stis_visible(10, 18, L, 8, 1, true, false, false));
  CHECK(stis_visible(10, 3, L, 8, 1, true, false, false));
  // Powers of two only backwards (d > 0): j = 26 is d = -16.
  CHECK(stis_visible(30, 14, L, 8, 1, true, false, false));
  CHECK(!stis_visible(10, 26, L, 8, 1, true, false, false));
  // The sink: the last valid token, only with use_sink.
  CHECK(stis_visible(0, L - 1, L, 8, 1, true, true, false));
  CHECK(!stis_visible(0, L - 1, L, 8, 1, true, false, false));
  CHECK(!stis_visible(0, L - 2, L, 8, 1, true, true, false));
  // The sink is the last *valid* token: with L = 25 it is 24, never a padded row beyond.
  CHECK(stis_visible(0, 24, 25, 8, 1, false, true, false));
  CHECK(!stis_visible(0, 25, 25, 8, 1, false, true, false));
}

void test_stis_brute_force() {
  using blossomrec::stis_visible;
  int cases = 0;
  for (int64_t L : {1, 2, 7, 17, 33, 97, 130}) {
    for (int64_t w : {1, 3, 8}) {
      for (int64_t p : {1, 2, 3, 4}) {
        for (int flags = 0; flags < 8; ++flags) {
          const bool use_power = flags & 1, use_sink = flags & 2, causal = flags & 4;
          bool all_ok = true;
          std::string first_bad;
          for (int64_t i = -1; i <= L; ++i) {
            for (int64_t j = -1; j <= L; ++j) {
              const bool got = stis_visible(i, j, L, w, p, use_power, use_sink, causal);
              const bool want = stis_brute(i, j, L, w, p, use_power, use_sink, causal);
              if (got != want && all_ok) {
                all_ok = false;
                first_bad = at(i, j, L) + " w=" + std::to_string(w) + " p=" + std::to_string(p) +
                            " flags=" + std::to_string(flags);
              }
            }
          }
          CHECK_CTX(all_ok, first_bad);
          ++cases;
        }
      }
    }
  }
  CHECK(cases == 7 * 3 * 4 * 8);
}

void test_num_select_blocks() {
  using blossomrec::num_select_blocks;
  // L = 50, s = 16: C = 3 windows; b = 16 (m = 1): 3 blocks; b = 32 (m = 2): 1 block.
  CHECK_EQ(num_select_blocks(50, 1000, 16, 16), 3);
  CHECK_EQ(num_select_blocks(50, 1000, 16, 32), 1);
  CHECK_EQ(num_select_blocks(64, 1000, 16, 32), 2);
  CHECK_EQ(num_select_blocks(15, 1000, 16, 16), 0);
  CHECK_EQ(num_select_blocks(0, 1000, 16, 16), 0);
  CHECK_EQ(num_select_blocks(16, 1000, 16, 16), 1);
  // kc holds fewer rows than the sequence needs: clipped to C_avail.
  CHECK_EQ(num_select_blocks(50, 2, 16, 16), 2);
  CHECK_EQ(num_select_blocks(200, 5, 16, 32), 2);
  CHECK_EQ(num_select_blocks(200, 0, 16, 16), 0);
  // s = 8, b = 16 (m = 2): L = 100 -> C = 12 -> 6 blocks.
  CHECK_EQ(num_select_blocks(100, 1000, 8, 16), 6);
}

void test_block_visible() {
  using blossomrec::block_visible;
  // Causal: J visible iff (J + 1) * b <= i: query i's own block is never a candidate.
  CHECK(block_visible(0, 16, 4, 16, true));
  CHECK(!block_visible(0, 15, 4, 16, true));
  CHECK(block_visible(0, 31, 4, 16, true));
  CHECK(!block_visible(1, 31, 4, 16, true));
  CHECK(block_visible(1, 32, 4, 16, true));
  // Out of range blocks.
  CHECK(!block_visible(-1, 100, 4, 16, true));
  CHECK(!block_visible(4, 100, 4, 16, true));
  CHECK(!block_visible(4, 100, 4, 16, false));
  // Non-causal: every block except the own block, future ones included.
  CHECK(block_visible(3, 20, 4, 16, false));
  CHECK(!block_visible(1, 20, 4, 16, false));
  CHECK(block_visible(0, 20, 4, 16, false));
  // The own block is excluded for any m = b / s (the deviation from the authors' code).
  CHECK(!block_visible(0, 5, 3, 32, false));
  CHECK(block_visible(1, 5, 3, 32, false));
  // Brute force: count of candidates per query.
  for (int64_t b : {16, 32}) {
    for (int64_t nb : {0, 1, 3, 8}) {
      for (int64_t i = 0; i < nb * b + b; ++i) {
        int64_t causal_count = 0, non_causal_count = 0;
        for (int64_t J = -2; J < nb + 2; ++J) {
          causal_count += block_visible(J, i, nb, b, true);
          non_causal_count += block_visible(J, i, nb, b, false);
        }
        const int64_t want_causal = std::min<int64_t>(i / b, nb);
        const int64_t want_non_causal = nb - (i / b < nb ? 1 : 0);
        CHECK_CTX(causal_count == want_causal, "i=" + std::to_string(i) + " nb=" + std::to_string(nb));
        CHECK_CTX(non_causal_count == want_non_causal,
                  "i=" + std::to_string(i) + " nb=" + std::to_string(nb));
      }
    }
  }
}

void test_own_block_range() {
  using blossomrec::own_block_range;
  int64_t lo = -1, hi = -1;
  own_block_range(20, 100, 16, true, &lo, &hi);
  CHECK(lo == 16 && hi == 21);
  own_block_range(16, 100, 16, true, &lo, &hi);
  CHECK(lo == 16 && hi == 17);
  own_block_range(0, 1, 16, true, &lo, &hi);
  CHECK(lo == 0 && hi == 1);
  own_block_range(20, 100, 16, false, &lo, &hi);
  CHECK(lo == 16 && hi == 32);
  // Non-causal own block clipped to the sequence.
  own_block_range(20, 25, 16, false, &lo, &hi);
  CHECK(lo == 16 && hi == 25);
  own_block_range(47, 48, 16, false, &lo, &hi);
  CHECK(lo == 32 && hi == 48);
  // Every query lies inside its own range; causal ranges end at the query.
  for (int64_t L : {1, 15, 16, 17, 97}) {
    for (int64_t i = 0; i < L; ++i) {
      for (bool causal : {true, false}) {
        own_block_range(i, L, 16, causal, &lo, &hi);
        const bool ok = lo <= i && i < hi && hi <= L && lo % 16 == 0 && hi - lo <= 16 &&
                        (!causal || hi == i + 1);
        CHECK_CTX(ok, "i=" + std::to_string(i) + " L=" + std::to_string(L) +
                          (causal ? " causal" : " non-causal"));
      }
    }
  }
}

void test_topn_insert_hand() {
  using blossomrec::topn_insert;
  float scores[4];
  int32_t blocks[4];
  int count = 0;
  // Offered in increasing block order, as the kernels do.
  const float offered[] = {0.5f, 0.9f, 0.5f, 0.1f, 0.9f, 0.7f};
  for (int32_t b = 0; b < 6; ++b) topn_insert(scores, blocks, count, 3, offered[b], b);
  CHECK_EQ(count, 3);
  // 0.9 (block 1), 0.9 (block 4: equal score, higher block, so after 1), 0.7 (block 5).
  CHECK(blocks[0] == 1 && blocks[1] == 4 && blocks[2] == 5);
  CHECK(scores[0] == 0.9f && scores[1] == 0.9f && scores[2] == 0.7f);

  // Ties at the cut: an equal score never displaces the lower block already held.
  count = 0;
  for (int32_t b = 0; b < 5; ++b) topn_insert(scores, blocks, count, 2, 1.0f, b);
  CHECK(count == 2 && blocks[0] == 0 && blocks[1] == 1);

  // n = 0 keeps nothing; fewer offers than n fill only that many slots.
  count = 0;
  topn_insert(scores, blocks, count, 0, 3.0f, 0);
  CHECK_EQ(count, 0);
  topn_insert(scores, blocks, count, 4, 3.0f, 7);
  topn_insert(scores, blocks, count, 4, 5.0f, 8);
  CHECK(count == 2 && blocks[0] == 8 && blocks[1] == 7);

  // Works with double scores (the CPU kernels' accumulation type) and negative scores.
  double dscores[2];
  count = 0;
  topn_insert(dscores, blocks, count, 2, -3.0, 0);
  topn_insert(dscores, blocks, count, 2, -1.0, 1);
  topn_insert(dscores, blocks, count, 2, -2.0, 2);
  CHECK(count == 2 && blocks[0] == 1 && blocks[1] == 2);
}

void test_topn_insert_random() {
  using blossomrec::topn_insert;
  std::mt19937 rng(1234);
  // Scores drawn from a handful of values so that ties are common.
  std::uniform_int_distribution<int> level(0, 5);
  std::uniform_int_distribution<int> length(0, 40);
  bool all_ok = true;
  std::string first_bad;
  for (int trial = 0; trial < 2000; ++trial) {
    const int nb = length(rng);
    const int n = trial % 9;  // 0..8
    std::vector<float> s(nb);
    for (auto& x : s) x = 0.25f * static_cast<float>(level(rng));
    std::vector<float> got_s(std::max(n, 1));
    std::vector<int32_t> got_b(std::max(n, 1), -1);
    int count = 0;
    for (int b = 0; b < nb; ++b) topn_insert(got_s.data(), got_b.data(), count, n, s[b], b);
    const auto want = topn_brute(s, n);
    bool ok = count == static_cast<int>(want.size());
    for (int r = 0; ok && r < count; ++r) ok = got_b[r] == want[r].second && got_s[r] == want[r].first;
    if (!ok && all_ok) {
      all_ok = false;
      first_bad = "trial=" + std::to_string(trial) + " nb=" + std::to_string(nb) +
                  " n=" + std::to_string(n);
    }
  }
  CHECK_CTX(all_ok, first_bad);
}

void test_constants() {
  CHECK(blossomrec::kSelectNullLogit == -1000.0f);
  CHECK(blossomrec::kSelectMinProb == 1e-10f);
}

// The range enumerators against the rule: for every (i, j) of several lengths and switch settings,
// the key ranges of query i are disjoint, non-empty and cover exactly {j : stis_visible(i, j)}, and
// the query ranges of key j cover exactly {i : stis_visible(i, j)}.
void test_stis_ranges() {
  struct Setting {
    int64_t w, p;
    bool power, sink, causal;
  };
  const Setting settings[] = {
      {8, 1, true, false, true},  {8, 1, true, true, false},  {1, 2, true, false, true},
      {1, 2, true, true, false},  {3, 1, false, true, false}, {3, 1, false, false, true},
      {5, 3, true, true, false},  {2, 4, true, false, true},  {100, 1, true, true, false},
      {1, 1, true, true, false},  {6, 5, false, false, false}};
  bool all_ok = true;
  std::string first_bad;
  for (const Setting& s : settings) {
    const blossomrec::StisParams st{s.w, s.p, s.power, s.sink, s.causal};
    for (int64_t L : {1, 2, 7, 16, 17, 40, 97, 130}) {
      for (int64_t x = 0; x < L; ++x) {
        for (int pass = 0; pass < 2; ++pass) {
          std::vector<int> hits(static_cast<size_t>(L), 0);
          bool empty_range = false;
          auto mark = [&](int64_t lo, int64_t hi) {
            if (lo >= hi || lo < 0 || hi > L) empty_range = true;
            for (int64_t y = std::max<int64_t>(lo, 0); y < std::min(hi, L); ++y) ++hits[y];
          };
          if (pass == 0) blossomrec::for_each_stis_range(x, L, st, mark);
          else blossomrec::for_each_stis_query_range(x, L, st, mark);
          // The 32-bit instantiation (the fused CUDA kernels') marks the same ranges again.
          if (pass == 0) blossomrec::for_each_stis_range(int(x), int(L), st, mark);
          else blossomrec::for_each_stis_query_range(int(x), int(L), st, mark);
          bool ok = !empty_range;
          for (int64_t y = 0; y < L && ok; ++y) {
            const int64_t i = pass == 0 ? x : y, j = pass == 0 ? y : x;
            const bool want = blossomrec::stis_visible(i, j, L, s.w, s.p, s.power, s.sink, s.causal);
            ok = hits[y] == (want ? 2 : 0);
          }
          if (!ok && all_ok) {
            all_ok = false;
            first_bad = std::string(pass == 0 ? "keys of i=" : "queries of j=") +
                        std::to_string(x) + " L=" + std::to_string(L) + " w=" + std::to_string(s.w) +
                        " p=" + std::to_string(s.p) + " power=" + std::to_string(s.power) +
                        " sink=" + std::to_string(s.sink) + " causal=" + std::to_string(s.causal);
          }
        }
      }
    }
  }
  CHECK_CTX(all_ok, first_bad);
}

}  // namespace

int main() {
  test_floor_div();
  test_is_pow2_or_zero();
  test_stis_causal_defaults();
  test_stis_causal_no_power();
  test_stis_power_block();
  test_stis_non_causal();
  test_stis_brute_force();
  test_num_select_blocks();
  test_block_visible();
  test_own_block_range();
  test_topn_insert_hand();
  test_topn_insert_random();
  test_constants();
  test_stis_ranges();
  std::printf("test_mask: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
