// blossomrec::sparse_attention_fwd / _bwd on CPU: exact softmax attention of every query over its
// selected-block key set (SPEC 1c) and its STIS key set (SPEC 2), and the gated combine (SPEC 3).
//
// Both key sets are enumerated per query (about (n + 1) * b and w + log2(L) keys), never as an
// L x L mask. The forward is parallel over buffer rows. The backward is parallel over
// (sequence, kv head): one task owns every query head of the group and every key row of that kv
// head, so dq, dk and dv are accumulated without races and in a fixed order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/mask.h"
#include "cpu/cpu_common.h"

namespace blossomrec {
namespace cpu {
namespace {

struct AttnArgs {
  int64_t select_block, window, power_block;
  bool use_power, use_sink, causal;
  double scale;
};

inline void push_range(std::vector<int64_t>& keys, int64_t lo, int64_t hi) {
  for (int64_t j = lo; j < hi; ++j) keys.push_back(j);
}

// SPEC 1c: own(i) united with the selected blocks, as increasing positions without repeats. The
// selection is read as a set of blocks: a block listed twice counts once, and entries that are not
// visible whole blocks of the sequence (block_visible of common/mask.h: out of range, a partial
// last block, the own block, causal: not ending before the own block) are skipped, as every CUDA
// kernel skips them.
inline void selected_keys(int64_t i, int64_t L, const int32_t* sel, int64_t sel_stride,
                          int64_t cnt, const AttnArgs& a, std::vector<int64_t>& blocks,
                          std::vector<int64_t>& keys) {
  const int64_t bs = a.select_block;
  blocks.clear();
  for (int64_t c = 0; c < cnt; ++c) {
    const int64_t J = sel[c * sel_stride];
    if (block_visible(J, i, L / bs, bs, a.causal)) blocks.push_back(J);
  }
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());

  int64_t own_lo, own_hi;
  own_block_range(i, L, bs, a.causal, &own_lo, &own_hi);
  const int64_t own = i / bs;  // never among the blocks (block_visible)
  bool own_done = false;
  keys.clear();
  for (const int64_t J : blocks) {
    if (!own_done && J > own) {
      own_done = true;
      push_range(keys, own_lo, own_hi);
    }
    push_range(keys, J * bs, (J + 1) * bs);  // a whole block of the sequence
  }
  if (!own_done) push_range(keys, own_lo, own_hi);
}

// SPEC 2: the STIS key set of query i in increasing order, from the ranges of common/mask.h (the
// enumerator the CUDA kernels walk too).
inline void stis_keys(int64_t i, int64_t L, const AttnArgs& a, std::vector<int64_t>& keys) {
  const StisParams st{a.window, a.power_block, a.use_power, a.use_sink && !a.causal, a.causal};
  keys.clear();
  for_each_stis_range(i, L, st, [&](int64_t lo, int64_t hi) { push_range(keys, lo, hi); });
  std::sort(keys.begin(), keys.end());
}

// Calls fn(q_tag, gate_tag) with values of q's dtype and of the gates' dtype (q's or float32,
// docs/DESIGN.md), so that both become template parameters of the kernel.
template <typename Fn>
void dispatch_dtypes(const at::Tensor& q, const at::Tensor& gates, const char* name, Fn&& fn) {
  // The dispatch macro wants a constant name on some torch versions; `name` goes into the error.
  // An internal invariant: check_float_dtype has refused every other dtype.
  BR_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                  q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              name, ": unsupported dtype ", q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "blossomrec_cpu", [&] {
    if (gates.scalar_type() == at::kFloat) {
      fn(scalar_t(), float());
    } else {
      fn(scalar_t(), scalar_t());
    }
  });
}

// Exact softmax attention of one query row q (already in acc_t) over `keys` (positions of the
// sequence starting at buffer row `base`, kv head g). Writes o[D], returns the log-sum-exp.
template <typename scalar_t, typename acc_t>
acc_t attend(const acc_t* q, const RowView<const scalar_t>& k, const RowView<const scalar_t>& v,
             int64_t base, int64_t g, int64_t D, acc_t scale, const std::vector<int64_t>& keys,
             std::vector<acc_t>& logits, acc_t* o) {
  logits.resize(keys.size());
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (size_t t = 0; t < keys.size(); ++t) {
    logits[t] = scale * dot_row(q, k.at(base + keys[t], g), D);
    mx = std::max(mx, logits[t]);
  }
  std::fill(o, o + D, acc_t(0));
  acc_t sum = 0;
  for (size_t t = 0; t < keys.size(); ++t) {
    const acc_t p = std::exp(logits[t] - mx);
    sum += p;
    const scalar_t* vj = v.at(base + keys[t], g);
    for (int64_t e = 0; e < D; ++e) o[e] += p * static_cast<acc_t>(vj[e]);
  }
  for (int64_t e = 0; e < D; ++e) o[e] /= sum;
  return mx + std::log(sum);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename gate_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& gates, const at::Tensor& sel_idx, const at::Tensor& sel_cnt,
                const SeqTable& seqs, const Dims& d, const AttnArgs& a, at::Tensor& out,
                at::Tensor& o_sel, at::Tensor& o_win, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto qv = row_view<scalar_t>(q);
  const auto kv = row_view<scalar_t>(k);
  const auto vv = row_view<scalar_t>(v);
  const auto gv = row_view<gate_t>(gates);
  const auto idxv = row_view<int32_t>(sel_idx);
  const auto cntv = row_view<int32_t>(sel_cnt.unsqueeze(-1));
  const int64_t idx_last_stride = sel_idx.stride(3);
  const int64_t width = sel_idx.size(3);
  auto outv = row_view_mut<scalar_t>(out);
  auto selv = row_view_mut<scalar_t>(o_sel);
  auto winv = row_view_mut<scalar_t>(o_win);
  auto lsev = row_view_mut<float>(lse);
  const int64_t D = d.D;
  const acc_t scale = static_cast<acc_t>(a.scale);

  at::parallel_for(0, d.Bq * d.N, 8, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> win_keys, sel_keys, blocks;
    std::vector<acc_t> logits, qrow(D), os(D), ow(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = seqs.row_seq[r];
      if (b < 0) {  // padding: every output exactly 0
        for (int64_t h = 0; h < d.H; ++h) {
          std::fill(outv.at(r, h), outv.at(r, h) + D, scalar_t(0));
          std::fill(selv.at(r, h), selv.at(r, h) + D, scalar_t(0));
          std::fill(winv.at(r, h), winv.at(r, h) + D, scalar_t(0));
          lsev.at(r, h)[0] = lsev.at(r, h)[1] = 0.f;
        }
        continue;
      }
      const int64_t base = seqs.first_row(b);
      const int64_t i = r - base;
      const int64_t L = seqs.len[b];
      stis_keys(i, L, a, win_keys);
      for (int64_t g = 0; g < d.KVH; ++g) {
        const int64_t cnt = std::clamp<int64_t>(cntv.at(r, g)[0], 0, width);
        selected_keys(i, L, idxv.at(r, g), idx_last_stride, cnt, a, blocks, sel_keys);
        for (int64_t h = g * d.G; h < (g + 1) * d.G; ++h) {
          load_row(qv.at(r, h), D, qrow.data());
          const acc_t lse_sel = attend(qrow.data(), kv, vv, base, g, D, scale, sel_keys, logits,
                                       os.data());
          const acc_t lse_win = attend(qrow.data(), kv, vv, base, g, D, scale, win_keys, logits,
                                       ow.data());
          const acc_t g0 = static_cast<acc_t>(gv.at(r, h)[0]);
          const acc_t g1 = static_cast<acc_t>(gv.at(r, h)[1]);
          scalar_t* out_h = outv.at(r, h);
          scalar_t* sel_h = selv.at(r, h);
          scalar_t* win_h = winv.at(r, h);
          for (int64_t e = 0; e < D; ++e) {
            // The combine uses the unrounded branch outputs, as the reference does.
            out_h[e] = static_cast<scalar_t>(g0 * os[e] + g1 * ow[e]);
            sel_h[e] = static_cast<scalar_t>(os[e]);
            win_h[e] = static_cast<scalar_t>(ow[e]);
          }
          lsev.at(r, h)[0] = static_cast<float>(lse_sel);
          lsev.at(r, h)[1] = static_cast<float>(lse_win);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gates,
    const at::Tensor& sel_idx, const at::Tensor& sel_cnt, const at::Tensor& seq_start,
    const at::Tensor& seq_len, int64_t select_block, int64_t window, int64_t power_block,
    bool use_power, bool use_sink, bool causal, double scale) {
  const Dims d = check_attention_inputs(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len,
                                        select_block, window, power_block, use_sink, causal);
  const AttnArgs a{select_block, window, power_block, use_power, use_sink, causal, scale};
  at::Tensor out = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor o_sel = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor o_win = alloc_output({d.Bq, d.N, d.H, d.D}, q.options());
  at::Tensor lse = alloc_output({d.Bq, d.N, d.H, 2}, q.options().dtype(at::kFloat));
  const SeqTable seqs = make_seq_table(seq_start, seq_len, d.Bq, d.N);
  dispatch_dtypes(q, gates, "sparse_attention_fwd_cpu", [&](auto q_tag, auto gate_tag) {
    fwd_kernel<decltype(q_tag), decltype(gate_tag)>(q, k, v, gates, sel_idx, sel_cnt, seqs, d, a,
                                                    out, o_sel, o_win, lse);
  });
  return {out, o_sel, o_win, lse};
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
// One softmax branch of one query head: P_j = exp(s_j - lse), dO = gate * dout,
// dS_j = P_j * (dO . v_j - gate * <dout, o_branch>); accumulates dq and the key rows' dk, dv.
template <typename scalar_t, typename acc_t>
void branch_backward(const acc_t* q, const acc_t* dout, acc_t gate, acc_t dout_dot_o,
                     float lse_saved,
                     const RowView<const scalar_t>& k, const RowView<const scalar_t>& v,
                     int64_t base, int64_t g, int64_t D, acc_t scale,
                     const std::vector<int64_t>& keys, acc_t* dq, acc_t* dk, acc_t* dv) {
  acc_t lse = static_cast<acc_t>(lse_saved);
  if constexpr (std::is_same_v<acc_t, double>) {
    // The saved lse is float32 (one layout for every dtype); float64 gradients would inherit its
    // 1e-7 relative error. One extra pass corrects it: lse + log(sum_j exp(s_j - lse)), where the
    // saved value keeps every term near 1 (no overflow).
    acc_t sum = 0;
    for (const int64_t j : keys) sum += std::exp(scale * dot_row(q, k.at(base + j, g), D) - lse);
    lse += std::log(sum);
  }
  const acc_t delta = gate * dout_dot_o;
  for (const int64_t j : keys) {
    const scalar_t* kj = k.at(base + j, g);
    const scalar_t* vj = v.at(base + j, g);
    const acc_t p = std::exp(scale * dot_row(q, kj, D) - lse);
    const acc_t ds = p * (gate * dot_row(dout, vj, D) - delta);
    const acc_t pg = p * gate;
    acc_t* dk_j = dk + j * D;
    acc_t* dv_j = dv + j * D;
    for (int64_t e = 0; e < D; ++e) {
      dq[e] += scale * ds * static_cast<acc_t>(kj[e]);
      dk_j[e] += scale * ds * q[e];
      dv_j[e] += pg * dout[e];
    }
  }
}

template <typename scalar_t, typename gate_t>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const at::Tensor& gates, const at::Tensor& o_sel,
                const at::Tensor& o_win, const at::Tensor& lse, const at::Tensor& sel_idx,
                const at::Tensor& sel_cnt, const SeqTable& seqs, const Dims& d, const AttnArgs& a,
                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dgates) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto dov = row_view<scalar_t>(dout);
  const auto qv = row_view<scalar_t>(q);
  const auto kv = row_view<scalar_t>(k);
  const auto vv = row_view<scalar_t>(v);
  const auto gv = row_view<gate_t>(gates);
  const auto osv = row_view<scalar_t>(o_sel);
  const auto owv = row_view<scalar_t>(o_win);
  const auto lsev = row_view<float>(lse);
  const auto idxv = row_view<int32_t>(sel_idx);
  const auto cntv = row_view<int32_t>(sel_cnt.unsqueeze(-1));
  const int64_t idx_last_stride = sel_idx.stride(3);
  const int64_t width = sel_idx.size(3);
  auto dqv = row_view_mut<scalar_t>(dq);
  auto dkv = row_view_mut<scalar_t>(dk);
  auto dvv = row_view_mut<scalar_t>(dv);
  auto dgv = row_view_mut<gate_t>(dgates);
  const int64_t D = d.D;
  const acc_t scale = static_cast<acc_t>(a.scale);

  // Padding rows get zero gradients; valid rows are written by their sequence's tasks below.
  at::parallel_for(0, d.Bq * d.N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (seqs.row_seq[r] >= 0) continue;
      for (int64_t h = 0; h < d.H; ++h) {
        std::fill(dqv.at(r, h), dqv.at(r, h) + D, scalar_t(0));
        dgv.at(r, h)[0] = dgv.at(r, h)[1] = gate_t(0);
      }
      for (int64_t g = 0; g < d.KVH; ++g) {
        std::fill(dkv.at(r, g), dkv.at(r, g) + D, scalar_t(0));
        std::fill(dvv.at(r, g), dvv.at(r, g) + D, scalar_t(0));
      }
    }
  });

  at::parallel_for(0, seqs.B * d.KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> win_keys, sel_keys, blocks;
    std::vector<acc_t> qrow(D), dorow(D), dqrow(D), dk_acc, dv_acc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / d.KVH;
      const int64_t g = t % d.KVH;
      const int64_t L = seqs.len[b];
      const int64_t base = seqs.first_row(b);
      dk_acc.assign(static_cast<size_t>(L * D), acc_t(0));
      dv_acc.assign(static_cast<size_t>(L * D), acc_t(0));
      for (int64_t i = 0; i < L; ++i) {
        const int64_t r = base + i;
        stis_keys(i, L, a, win_keys);
        const int64_t cnt = std::clamp<int64_t>(cntv.at(r, g)[0], 0, width);
        selected_keys(i, L, idxv.at(r, g), idx_last_stride, cnt, a, blocks, sel_keys);
        for (int64_t h = g * d.G; h < (g + 1) * d.G; ++h) {
          load_row(qv.at(r, h), D, qrow.data());
          load_row(dov.at(r, h), D, dorow.data());
          // SPEC 3: d gates = <dout, o_branch>; the same products are the softmax corrections.
          const acc_t do_sel = dot_row(dorow.data(), osv.at(r, h), D);
          const acc_t do_win = dot_row(dorow.data(), owv.at(r, h), D);
          const acc_t g0 = static_cast<acc_t>(gv.at(r, h)[0]);
          const acc_t g1 = static_cast<acc_t>(gv.at(r, h)[1]);
          std::fill(dqrow.begin(), dqrow.end(), acc_t(0));
          branch_backward(qrow.data(), dorow.data(), g0, do_sel,
                          lsev.at(r, h)[0], kv, vv, base, g, D, scale,
                          sel_keys, dqrow.data(), dk_acc.data(), dv_acc.data());
          branch_backward(qrow.data(), dorow.data(), g1, do_win,
                          lsev.at(r, h)[1], kv, vv, base, g, D, scale,
                          win_keys, dqrow.data(), dk_acc.data(), dv_acc.data());
          scalar_t* dq_h = dqv.at(r, h);
          for (int64_t e = 0; e < D; ++e) dq_h[e] = static_cast<scalar_t>(dqrow[e]);
          dgv.at(r, h)[0] = static_cast<gate_t>(do_sel);
          dgv.at(r, h)[1] = static_cast<gate_t>(do_win);
        }
      }
      for (int64_t j = 0; j < L; ++j) {
        scalar_t* dk_j = dkv.at(base + j, g);
        scalar_t* dv_j = dvv.at(base + j, g);
        for (int64_t e = 0; e < D; ++e) {
          dk_j[e] = static_cast<scalar_t>(dk_acc[j * D + e]);
          dv_j[e] = static_cast<scalar_t>(dv_acc[j * D + e]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
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
  check_lse(lse, q, d);
  const AttnArgs a{select_block, window, power_block, use_power, use_sink, causal, scale};
  at::Tensor dq = alloc_output(q.sizes(), q.options());
  at::Tensor dk = alloc_output(k.sizes(), k.options());
  at::Tensor dv = alloc_output(v.sizes(), v.options());
  at::Tensor dgates = alloc_output(gates.sizes(), gates.options());
  const SeqTable seqs = make_seq_table(seq_start, seq_len, d.Bq, d.N);
  dispatch_dtypes(q, gates, "sparse_attention_bwd_cpu", [&](auto q_tag, auto gate_tag) {
    bwd_kernel<decltype(q_tag), decltype(gate_tag)>(dout, q, k, v, gates, o_sel, o_win, lse,
                                                    sel_idx, sel_cnt, seqs, d, a, dq, dk, dv,
                                                    dgates);
  });
  return {dq, dk, dv, dgates};
}

}  // namespace
}  // namespace cpu
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CPU, m) {
  m.impl("sparse_attention_fwd", &blossomrec::cpu::sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &blossomrec::cpu::sparse_attention_bwd_cpu);
}
