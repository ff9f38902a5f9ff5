// Host helpers shared by the CPU kernels: the row -> sequence map of the row-buffer layout and a
// strided view of a [Bq, N, heads, D] tensor.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

namespace blossomrec {
namespace cpu {

// The row-buffer layout of docs/DESIGN.md: sequence b's token i sits at buffer row
// (Bq == 1 ? 0 : b) * N + seq_start[b] + i. Built once per call on the host (the values have been
// checked by check_seq_values), so the kernels look a row's sequence up in O(1).
struct SeqTable {
  int64_t Bq = 0, N = 0, B = 0;
  std::vector<int64_t> start, len;  // [B]
  std::vector<int64_t> row_seq;     // [Bq * N]: sequence owning the row, -1 for padding

  int64_t first_row(int64_t b) const { return (Bq == 1 ? 0 : b) * N + start[b]; }
};

inline SeqTable make_seq_table(const at::Tensor& seq_start, const at::Tensor& seq_len, int64_t Bq,
                               int64_t N) {
  SeqTable t;
  t.Bq = Bq;
  t.N = N;
  t.B = seq_len.size(0);
  const at::Tensor st = seq_start.contiguous();
  const at::Tensor ln = seq_len.contiguous();
  const int32_t* s = st.const_data_ptr<int32_t>();
  const int32_t* l = ln.const_data_ptr<int32_t>();
  t.start.assign(s, s + t.B);
  t.len.assign(l, l + t.B);
  t.row_seq.assign(static_cast<size_t>(Bq * N), -1);
  for (int64_t b = 0; b < t.B; ++b) {
    const int64_t r0 = t.first_row(b);
    for (int64_t i = 0; i < t.len[b]; ++i) t.row_seq[r0 + i] = b;
  }
  return t;
}

// A [Bq, N, heads, inner] tensor with a contiguous last dim, addressed by buffer row
// r = bq * N + n.
// Strides are in elements and 64-bit (batch x sequence x heads can exceed 2^31).
template <typename T>
struct RowView {
  T* data;
  int64_t N, s0, s1, s2;

  T* at(int64_t r, int64_t h) const {
    const int64_t bq = r / N;
    return data + bq * s0 + (r - bq * N) * s1 + h * s2;
  }
};

template <typename T>
RowView<const T> row_view(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
RowView<T> row_view_mut(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename acc_t, typename T>
inline void load_row(const T* src, int64_t D, acc_t* dst) {
  for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<acc_t>(src[e]);
}

template <typename acc_t, typename T>
inline acc_t dot_row(const acc_t* a, const T* b, int64_t D) {
  acc_t s = 0;
  for (int64_t e = 0; e < D; ++e) s += a[e] * static_cast<acc_t>(b[e]);
  return s;
}

}  // namespace cpu
}  // namespace blossomrec
