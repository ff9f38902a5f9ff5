// blossomrec::select_blocks on CPU: block scores and top-n selection (SPEC 1b), one pass per query.
//
// score[g, i, J] = mean over the G heads of group g and the m windows of block J of
// scale * q_h . kc_c = scale * qbar[g, i] . kcb[g, J], with qbar the group-mean query and kcb the
// block-mean compressed key. kcb is small ([B, N/b, KVH, D]) and computed first; each query then
// streams the visible blocks once, keeping a running softmax normaliser (SPEC's -1000 entry
// included) and the top-n in a small array. No N x N/s score tensor is ever built.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/mask.h"
#include "cpu/cpu_common.h"

namespace blossomrec {
namespace cpu {
namespace {

constexpr int kMaxSelect = 64;  // the op's limit on num_select (check_select_inputs)

struct SelectArgs {
  int64_t compress_stride, select_block, num_select, width;
  bool causal;
  double scale;
};

// kcb[b, J, g, :] = mean of kc[b, J*m .. J*m+m-1, g, :] for the blocks sequence b has; computed in
// the accumulation type so that float16/bfloat16 keys are summed in float32.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> block_mean_keys(const at::Tensor& kc, const SeqTable& seqs, const Dims& d,
                                   const SelectArgs& a, std::vector<int64_t>* num_blocks,
                                   int64_t* nb_max) {
  const int64_t m = a.select_block / a.compress_stride;
  num_blocks->resize(seqs.B);
  *nb_max = 0;
  for (int64_t b = 0; b < seqs.B; ++b) {
    (*num_blocks)[b] =
        num_select_blocks(seqs.len[b], kc.size(1), a.compress_stride, a.select_block);
    *nb_max = std::max(*nb_max, (*num_blocks)[b]);
  }
  std::vector<acc_t> kcb(static_cast<size_t>(seqs.B * *nb_max * d.KVH * d.D), acc_t(0));
  const RowView<const scalar_t> kcv = row_view<scalar_t>(kc);
  const int64_t stride_b = *nb_max * d.KVH * d.D;
  at::parallel_for(0, seqs.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t J = 0; J < (*num_blocks)[b]; ++J) {
        for (int64_t g = 0; g < d.KVH; ++g) {
          acc_t* dst = kcb.data() + b * stride_b + (J * d.KVH + g) * d.D;
          for (int64_t c = J * m; c < (J + 1) * m; ++c) {
            // kc's rows are addressed like a row buffer with "N" = C windows per sequence.
            const scalar_t* src = kcv.at(b * kc.size(1) + c, g);
            for (int64_t e = 0; e < d.D; ++e) dst[e] += static_cast<acc_t>(src[e]);
          }
          for (int64_t e = 0; e < d.D; ++e) dst[e] /= acc_t(m);
        }
      }
    }
  });
  return kcb;
}

template <typename scalar_t>
void select_blocks_kernel(const at::Tensor& q, const at::Tensor& kc, const SeqTable& seqs,
                          const Dims& d, const SelectArgs& a, at::Tensor& idx, at::Tensor& cnt) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> num_blocks;
  int64_t nb_max = 0;
  const std::vector<acc_t> kcb =
      block_mean_keys<scalar_t, acc_t>(kc, seqs, d, a, &num_blocks, &nb_max);
  const RowView<const scalar_t> qv = row_view<scalar_t>(q);
  int32_t* idx_ptr = idx.mutable_data_ptr<int32_t>();
  int32_t* cnt_ptr = cnt.mutable_data_ptr<int32_t>();
  const int n_sel = static_cast<int>(a.num_select);

  at::parallel_for(0, d.Bq * d.N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> qbar(d.D);
    acc_t top_s[kMaxSelect];
    int32_t top_j[kMaxSelect];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = seqs.row_seq[r];
      for (int64_t g = 0; g < d.KVH; ++g) {
        int32_t* idx_out = idx_ptr + (r * d.KVH + g) * a.width;
        int kept = 0;
        if (b >= 0 && n_sel > 0) {
          const int64_t i = r - seqs.first_row(b);
          const int64_t nb = num_blocks[b];
          // Group-mean query with scale / G folded in: one dot product per block.
          std::fill(qbar.begin(), qbar.end(), acc_t(0));
          for (int64_t h = g * d.G; h < (g + 1) * d.G; ++h) {
            const scalar_t* qh = qv.at(r, h);
            for (int64_t e = 0; e < d.D; ++e) qbar[e] += static_cast<acc_t>(qh[e]);
          }
          const acc_t qs = static_cast<acc_t>(a.scale) / acc_t(d.G);
          for (int64_t e = 0; e < d.D; ++e) qbar[e] *= qs;

          const acc_t* kcb_bg = kcb.data() + (b * nb_max * d.KVH + g) * d.D;
          // Running softmax normaliser sum_J exp(score_J - M), started from the -1000 entry.
          acc_t M = static_cast<acc_t>(kSelectNullLogit);
          acc_t S = 1;
          int count = 0;
          for (int64_t J = 0; J < nb; ++J) {
            if (!block_visible(J, i, nb, a.select_block, a.causal)) continue;
            const acc_t* kj = kcb_bg + J * d.KVH * d.D;
            acc_t s = 0;
            for (int64_t e = 0; e < d.D; ++e) s += qbar[e] * kj[e];
            if (s > M) {
              S = S * std::exp(M - s) + acc_t(1);
              M = s;
            } else {
              S += std::exp(s - M);
            }
            topn_insert(top_s, top_j, count, n_sel, s, static_cast<int32_t>(J));
          }
          // The top-n is sorted by score, hence by probability: the kept blocks are a prefix.
          while (kept < count &&
                 std::exp(top_s[kept] - M) / S > static_cast<acc_t>(kSelectMinProb)) {
            ++kept;
          }
        }
        for (int64_t c = 0; c < a.width; ++c) idx_out[c] = c < kept ? top_j[c] : -1;
        cnt_ptr[r * d.KVH + g] = kept;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> select_blocks_cpu(const at::Tensor& q, const at::Tensor& kc,
                                                     const at::Tensor& seq_start,
                                                     const at::Tensor& seq_len,
                                                     int64_t compress_stride, int64_t select_block,
                                                     int64_t num_select, bool causal,
                                                     double scale) {
  Dims d;
  check_select_inputs(q, kc, seq_start, seq_len, compress_stride, select_block, num_select, &d);
  const SelectArgs a{compress_stride, select_block, num_select, std::max<int64_t>(num_select, 1),
                     causal, scale};
  at::Tensor idx = alloc_output({d.Bq, d.N, d.KVH, a.width}, q.options().dtype(at::kInt));
  at::Tensor cnt = alloc_output({d.Bq, d.N, d.KVH}, q.options().dtype(at::kInt));
  const SeqTable seqs = make_seq_table(seq_start, seq_len, d.Bq, d.N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "select_blocks_cpu",
                                  [&] {
                                    select_blocks_kernel<scalar_t>(q, kc, seqs, d, a, idx, cnt);
                                  });
  return {idx, cnt};
}

}  // namespace
}  // namespace cpu
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, CPU, m) {
  m.impl("select_blocks", &blossomrec::cpu::select_blocks_cpu);
}
