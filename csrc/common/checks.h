// Input checks shared by the CPU and CUDA entry points. Messages say what was expected and what came.
// Host only. Value checks on seq_start / seq_len run only for CPU tensors here (docs/DESIGN.md).
//
// The error convention (docs/ERRORS.md): BR_CHECK_TYPE (Python TypeError) for a dtype,
// BR_CHECK_VALUE (Python ValueError) for every other bad input: shapes, ranks, strides, values,
// ranges, devices. A plain BR_CHECK (RuntimeError) states an internal invariant only. Messages
// name the argument and print a few numbers (the first offending sequence, never a list of them).
// The BR_CHECK* macros are TORCH_CHECK* with the message built by blossomrec::msg (message.h: no
// std::ostream numeric inserters, which crashed the process on the H200 device's toolchain).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/message.h"

#include <utility>


namespace blossomrec {

// `name` says which argument; the expected sizes are printed as values, not as expressions.
#define BR_CHECK_SHAPE_NAMED(x, name, ...)                                                    \
  BR_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), name, " must have shape ", \
                    at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define BR_CHECK_SHAPE(x, ...) BR_CHECK_SHAPE_NAMED(x, #x, __VA_ARGS__)

struct Dims {
  int64_t Bq, N, H, KVH, D, G, B;
};

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  BR_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", dt);
}

inline void check_dtype_of_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  BR_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype (",
                   q.scalar_type(), "), got ", t.scalar_type());
}

inline void check_int32(const at::Tensor& t, const char* name) {
  BR_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  // An empty tensor addresses no element; autograd hands one over with stride 0 (sum() of it).
  BR_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must have a contiguous last dimension, got stride ", t.stride(-1));
}

// Under a CPU or CUDA dispatch every input is a CPU or CUDA tensor (one meta input sends the call
// to the fake kernels of ops.py instead, which run the same device check).
inline void check_same_device(const at::Tensor& a, const at::Tensor& ref, const char* name) {
  BR_CHECK_VALUE(a.device() == ref.device(), name, " must be on the same device as q (",
                    ref.device(), "), got ", a.device());
}

// Checks q, k, v (k, v may be undefined for select_blocks) and the sequence vectors; returns dims.
inline Dims check_qkv_seq(const at::Tensor& q, const at::Tensor* k, const at::Tensor* v,
                          const at::Tensor& seq_start, const at::Tensor& seq_len, int64_t kvh_hint) {
  BR_CHECK_VALUE(q.dim() == 4, "q must have rank 4 [Bq, N, H, D], got rank ", q.dim());
  check_float_dtype(q, "q");
  check_last_dim_contiguous(q, "q");
  Dims d{};
  d.Bq = q.size(0);
  d.N = q.size(1);
  d.H = q.size(2);
  d.D = q.size(3);
  BR_CHECK_VALUE(d.D == 16 || d.D == 32 || d.D == 64 || d.D == 128,
                    "head dim must be one of 16, 32, 64, 128, got ", d.D);
  d.KVH = kvh_hint;
  if (k != nullptr) {
    BR_CHECK_VALUE(k->dim() == 4, "k must have rank 4 [Bq, N, KVH, D], got rank ", k->dim());
    BR_CHECK_VALUE(v->dim() == 4, "v must have rank 4 [Bq, N, KVH, D], got rank ", v->dim());
    check_same_device(*k, q, "k");
    check_same_device(*v, q, "v");
    d.KVH = k->size(2);
    BR_CHECK_SHAPE_NAMED(*k, "k", d.Bq, d.N, d.KVH, d.D);
    BR_CHECK_SHAPE_NAMED(*v, "v", d.Bq, d.N, d.KVH, d.D);
    check_dtype_of_q(*k, q, "k");
    check_dtype_of_q(*v, q, "v");
    check_last_dim_contiguous(*k, "k");
    check_last_dim_contiguous(*v, "v");
  }
  BR_CHECK_VALUE(d.KVH >= 1 && d.H % d.KVH == 0, "the number of query heads (", d.H,
                    ") must be divisible by the number of kv heads (", d.KVH, ")");
  d.G = d.H / d.KVH;
  BR_CHECK_VALUE(d.G >= 1 && d.G <= 8, "group size H / KVH must be 1..8, got ", d.G);
  for (const auto& [t, name] :
       {std::pair{&seq_start, "seq_start"}, std::pair{&seq_len, "seq_len"}}) {
    check_same_device(*t, q, name);
    BR_CHECK_VALUE(t->dim() == 1, name, " must have rank 1 [B], got rank ", t->dim());
    check_int32(*t, name);
  }
  d.B = seq_len.size(0);
  BR_CHECK_VALUE(seq_start.size(0) == d.B,
                    "seq_start and seq_len must have the same length, got ", seq_start.size(0),
                    " and ", d.B);
  BR_CHECK_VALUE(d.Bq == d.B || d.Bq == 1, "q's batch (", d.Bq,
                    ") must equal the number of sequences (", d.B,
                    ") or be 1 for the packed layout");
  return d;
}

// Value checks of seq_start / seq_len, for host tensors (the CPU backend). Each message names the
// first offending sequence only, so that its length does not grow with the batch.
inline void check_seq_values(const at::Tensor& seq_start, const at::Tensor& seq_len, const Dims& d) {
  if (!seq_start.device().is_cpu()) return;
  auto st = seq_start.contiguous();
  auto ln = seq_len.contiguous();
  const int32_t* s = st.data_ptr<int32_t>();
  const int32_t* l = ln.data_ptr<int32_t>();
  for (int64_t b = 0; b < d.B; ++b) {
    BR_CHECK_VALUE(s[b] >= 0 && l[b] >= 0, "sequence ", b, " has a negative start (", s[b],
                      ") or length (", l[b], ")");
    BR_CHECK_VALUE(int64_t(s[b]) + l[b] <= d.N, "sequence ", b, " (start ", s[b], ", length ",
                      l[b], ") runs past the ", d.N, " rows of q");
    // Packed sequences share one row buffer: they must come in order and must not overlap (the
    // CUDA kernels find a row's sequence by binary search over the sequence ends).
    if (d.Bq == 1 && b > 0) {
      BR_CHECK_VALUE(s[b] >= int64_t(s[b - 1]) + l[b - 1],
                        "packed sequences must be in order and must not overlap: sequence ", b,
                        " starts at row ", s[b], " before sequence ", b - 1, " ends at row ",
                        int64_t(s[b - 1]) + l[b - 1], " (cu_seqlens must be non-decreasing)");
    }
  }
}

// Block sizes, window and power block are positions: at most INT32_MAX. Larger values mean nothing
// for any sequence a buffer can hold, and they would overflow the kernels' position arithmetic
// (block J * select_block, the powers of two up to the window).
constexpr int64_t kMaxHparam = 2147483647;

inline void check_hparam_max(int64_t value, const char* name) {
  BR_CHECK_VALUE(value <= kMaxHparam, name, " must be <= ", kMaxHparam, " (int32), got ", value);
}

inline void check_hparams(int64_t select_block, int64_t window, int64_t power_block, bool use_sink,
                          bool causal) {
  BR_CHECK_VALUE(select_block >= 1, "select_block must be >= 1, got ", select_block);
  BR_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  BR_CHECK_VALUE(power_block >= 1, "power_block must be >= 1, got ", power_block);
  check_hparam_max(select_block, "select_block");
  check_hparam_max(window, "window");
  check_hparam_max(power_block, "power_block");
  BR_CHECK_VALUE(!(use_sink && causal), "use_sink applies to non-causal attention only");
}

inline void check_select_inputs(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& seq_start,
                                const at::Tensor& seq_len, int64_t compress_stride,
                                int64_t select_block, int64_t num_select, Dims* out) {
  BR_CHECK_VALUE(kc.dim() == 4, "kc must have rank 4 [B, C, KVH, D], got rank ", kc.dim());
  const Dims d = check_qkv_seq(q, nullptr, nullptr, seq_start, seq_len, kc.size(2));
  check_same_device(kc, q, "kc");
  BR_CHECK_VALUE(kc.size(0) == d.B, "kc's batch (", kc.size(0),
                    ") must equal the number of sequences (", d.B, ")");
  BR_CHECK_VALUE(kc.size(3) == d.D, "kc's head dim (", kc.size(3), ") must equal q's (", d.D,
                    ")");
  check_dtype_of_q(kc, q, "kc");
  check_last_dim_contiguous(kc, "kc");
  BR_CHECK_VALUE(compress_stride >= 1, "compress_stride must be >= 1, got ", compress_stride);
  BR_CHECK_VALUE(select_block >= compress_stride && select_block % compress_stride == 0,
                    "select_block (", select_block,
                    ") must be a positive multiple of compress_stride (", compress_stride, ")");
  check_hparam_max(compress_stride, "compress_stride");
  check_hparam_max(select_block, "select_block");
  BR_CHECK_VALUE(num_select >= 0 && num_select <= 64, "num_select must be 0..64, got ",
                    num_select);
  check_seq_values(seq_start, seq_len, d);
  if (seq_len.device().is_cpu()) {
    auto ln = seq_len.contiguous();
    const int32_t* l = ln.data_ptr<int32_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      BR_CHECK_VALUE(kc.size(1) >= l[b] / compress_stride, "kc holds ", kc.size(1),
                        " compressed rows but sequence ", b, " (length ", l[b], ") needs ",
                        l[b] / compress_stride);
    }
  }
  *out = d;
}

inline void check_gates(const at::Tensor& gates, const at::Tensor& q, const Dims& d) {
  BR_CHECK_VALUE(gates.dim() == 4, "gates must have rank 4 [Bq, N, H, 2], got rank ",
                    gates.dim());
  check_same_device(gates, q, "gates");
  BR_CHECK_SHAPE(gates, d.Bq, d.N, d.H, 2);
  BR_CHECK_TYPE(gates.scalar_type() == q.scalar_type() || gates.scalar_type() == at::kFloat,
                   "gates must have q's dtype (", q.scalar_type(), ") or float32, got ",
                   gates.scalar_type());
  check_last_dim_contiguous(gates, "gates");
}

inline void check_selection(const at::Tensor& sel_idx, const at::Tensor& sel_cnt, const at::Tensor& q,
                            const Dims& d) {
  BR_CHECK_VALUE(sel_idx.dim() == 4, "sel_idx must have rank 4 [Bq, N, KVH, n], got rank ",
                    sel_idx.dim());
  check_same_device(sel_idx, q, "sel_idx");
  check_same_device(sel_cnt, q, "sel_cnt");
  BR_CHECK_VALUE(sel_idx.size(0) == d.Bq && sel_idx.size(1) == d.N &&
                        sel_idx.size(2) == d.KVH && sel_idx.size(3) >= 1,
                    "sel_idx must have shape [Bq, N, KVH, n] = [", d.Bq, ", ", d.N, ", ", d.KVH,
                    ", n>=1], got ", sel_idx.sizes());
  BR_CHECK_SHAPE(sel_cnt, d.Bq, d.N, d.KVH);
  check_int32(sel_idx, "sel_idx");
  check_int32(sel_cnt, "sel_cnt");
  // The CUDA kernels read a row's selection as one contiguous list; the CPU kernels could stride,
  // but both backends take the same inputs.
  check_last_dim_contiguous(sel_idx, "sel_idx");
}

// All checks of sparse_attention_fwd / _bwd's common inputs.
inline Dims check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& gates, const at::Tensor& sel_idx,
                                   const at::Tensor& sel_cnt, const at::Tensor& seq_start,
                                   const at::Tensor& seq_len, int64_t select_block, int64_t window,
                                   int64_t power_block, bool use_sink, bool causal) {
  const Dims d = check_qkv_seq(q, &k, &v, seq_start, seq_len, 0);
  check_gates(gates, q, d);
  check_selection(sel_idx, sel_cnt, q, d);
  check_hparams(select_block, window, power_block, use_sink, causal);
  check_seq_values(seq_start, seq_len, d);
  return d;
}

// A forward output handed back to the backward (dout, o_sel, o_win): shaped and typed like q.
inline void check_saved(const at::Tensor& t, const at::Tensor& q, const Dims& d, const char* name) {
  check_same_device(t, q, name);
  BR_CHECK_SHAPE_NAMED(t, name, d.Bq, d.N, d.H, d.D);
  check_dtype_of_q(t, q, name);
  check_last_dim_contiguous(t, name);
}

// The forward's log-sum-exps handed back to the backward: [Bq, N, H, 2] float32.
inline void check_lse(const at::Tensor& lse, const at::Tensor& q, const Dims& d) {
  check_same_device(lse, q, "lse");
  BR_CHECK_SHAPE(lse, d.Bq, d.N, d.H, 2);
  BR_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ",
                   lse.scalar_type());
  check_last_dim_contiguous(lse, "lse");
}

}  // namespace blossomrec

namespace blossomrec {

// blossomrec::rope: x [B, N, heads, D] (D even, last dimension contiguous), seq_start [B] int32 on
// x's device. Returns nothing; the kernels read any other strides.
inline void check_rope_inputs(const at::Tensor& x, const at::Tensor& seq_start) {
  BR_CHECK_VALUE(x.dim() == 4, "x must have rank 4 [B, N, heads, D], got rank ", x.dim());
  check_float_dtype(x, "x");
  check_last_dim_contiguous(x, "x");
  BR_CHECK_VALUE(x.size(3) % 2 == 0 && x.size(3) > 0,
                    "the rotary head dim must be positive and even, got ", x.size(3));
  BR_CHECK_VALUE(x.device() == seq_start.device(), "seq_start must be on x's device (",
                    x.device(), "), got ", seq_start.device());
  BR_CHECK_VALUE(seq_start.dim() == 1 && seq_start.size(0) == x.size(0),
                    "seq_start must have shape [B] = [", x.size(0), "], got ", seq_start.sizes());
  check_int32(seq_start, "seq_start");
  BR_CHECK_VALUE(x.size(1) < (int64_t(1) << 31), "x has too many rows (", x.size(1), ")");
}

}  // namespace blossomrec

namespace blossomrec {

// blossomrec::compress_windows: k [B, N, KVH, D] (float, last dimension contiguous), seq_start [B]
// int32 on k's device, pos [KVH, l, D] in k's dtype on k's device (any strides), 0 < s <= l.
inline void check_compress_windows_inputs(const at::Tensor& k, const at::Tensor& seq_start,
                                          const at::Tensor& pos, int64_t l, int64_t s) {
  BR_CHECK_VALUE(k.dim() == 4, "k must have rank 4 [B, N, KVH, D], got rank ", k.dim());
  check_float_dtype(k, "k");
  check_last_dim_contiguous(k, "k");
  BR_CHECK_VALUE(s >= 1 && l >= s, "need 0 < compress_stride <= compress_block_size, got "
                    "compress_stride=", s, ", compress_block_size=", l);
  check_hparam_max(l, "compress_block_size");
  BR_CHECK_VALUE(seq_start.device() == k.device(), "seq_start must be on k's device (",
                    k.device(), "), got ", seq_start.device());
  BR_CHECK_VALUE(seq_start.dim() == 1 && seq_start.size(0) == k.size(0),
                    "seq_start must have shape [B] = [", k.size(0), "], got ", seq_start.sizes());
  check_int32(seq_start, "seq_start");
  BR_CHECK_VALUE(pos.device() == k.device(), "pos must be on k's device (", k.device(),
                    "), got ", pos.device());
  BR_CHECK_SHAPE(pos, k.size(2), l, k.size(3));
  BR_CHECK_TYPE(pos.scalar_type() == k.scalar_type(), "pos must have k's dtype (",
                   k.scalar_type(), "), got ", pos.scalar_type());
}

}  // namespace blossomrec
