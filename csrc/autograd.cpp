// Autograd of blossomrec::sparse_attention_fwd and blossomrec::rope, in C++ (one kernel for
// every backend, at the Autograd dispatch key).
//
// The backward is the sparse_attention_bwd op: dq, dk, dv and dgates from the saved inputs, both
// branch outputs and their log-sum-exps. Selection indices, counts and the sequence bounds get no
// gradient, nor do o_sel, o_win and lse (non-differentiable outputs).
//
// Why C++ and not torch.library.register_autograd: torch.profiler put ~0.27 ms of host time per
// forward + backward at S1 (2048 x 50) in the Python wrapper, about half of what the kernels take,
// and the Python Function materialised zero gradients for o_sel and o_win (two output-sized fills
// per backward). With this file and the other host changes of docs/PERF_NOTES.md v17 the eager op
// at S1 went from 0.90 to 0.55-0.62 ms on an H200.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace blossomrec {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

FwdOut call_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gates,
                const Tensor& sel_idx, const Tensor& sel_cnt, const Tensor& seq_start,
                const Tensor& seq_len, int64_t select_block, int64_t window, int64_t power_block,
                bool use_power, bool use_sink, bool causal, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossomrec::sparse_attention_fwd", "")
                             .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, int64_t, int64_t,
                                           int64_t, bool, bool, bool, double)>();
  return op.call(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, select_block, window,
                 power_block, use_power, use_sink, causal, scale);
}

FwdOut call_bwd(const Tensor& dout, const variable_list& s, int64_t select_block, int64_t window,
                int64_t power_block, bool use_power, bool use_sink, bool causal, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("blossomrec::sparse_attention_bwd", "")
          .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, int64_t, int64_t, int64_t, bool, bool, bool,
                        double)>();
  return op.call(dout, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10],
                 select_block, window, power_block, use_power, use_sink, causal, scale);
}

class SparseAttention : public torch::autograd::Function<SparseAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& gates, const Tensor& sel_idx,
                               const Tensor& sel_cnt, const Tensor& seq_start,
                               const Tensor& seq_len, int64_t select_block, int64_t window,
                               int64_t power_block, bool use_power, bool use_sink, bool causal,
                               double scale) {
    // The gradients of o_sel, o_win and lse are never used: not materialised as zeros (two
    // output-sized fills per backward under the default).
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, o_sel, o_win, lse] = call_fwd(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len,
                                             select_block, window, power_block, use_power,
                                             use_sink, causal, scale);
    ctx->save_for_backward({q, k, v, gates, o_sel, o_win, lse, sel_idx, sel_cnt, seq_start,
                            seq_len});
    ctx->saved_data["select_block"] = select_block;
    ctx->saved_data["window"] = window;
    ctx->saved_data["power_block"] = power_block;
    ctx->saved_data["use_power"] = use_power;
    ctx->saved_data["use_sink"] = use_sink;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({o_sel, o_win, lse});
    return {out, o_sel, o_win, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    // Only `out` is differentiable; its gradient is undefined when the graph did not use it.
    const Tensor dout = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s[0]);
    const auto& d = ctx->saved_data;
    auto [dq, dk, dv, dgates] =
        call_bwd(dout, s, d.at("select_block").toInt(), d.at("window").toInt(),
                 d.at("power_block").toInt(), d.at("use_power").toBool(),
                 d.at("use_sink").toBool(), d.at("causal").toBool(), d.at("scale").toDouble());
    const Tensor none;
    return {dq, dk, dv, dgates, none, none, none, none, none, none, none, none, none, none, none};
  }
};

FwdOut sparse_attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& gates, const Tensor& sel_idx,
                                     const Tensor& sel_cnt, const Tensor& seq_start,
                                     const Tensor& seq_len, int64_t select_block, int64_t window,
                                     int64_t power_block, bool use_power, bool use_sink,
                                     bool causal, double scale) {
  const variable_list r = SparseAttention::apply(q, k, v, gates, sel_idx, sel_cnt, seq_start,
                                                 seq_len, select_block, window, power_block,
                                                 use_power, use_sink, causal, scale);
  return {r[0], r[1], r[2], r[3]};
}

Tensor call_rope(const Tensor& x, const Tensor& seq_start, double theta, bool inverse) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossomrec::rope", "")
                             .typed<Tensor(const Tensor&, const Tensor&, double, bool)>();
  return op.call(x, seq_start, theta, inverse);
}

// A rotation's backward is the rotation the other way: one more rope call on the gradient.
class Rope : public torch::autograd::Function<Rope> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& seq_start,
                               double theta, bool inverse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({seq_start});
    ctx->saved_data["theta"] = theta;
    ctx->saved_data["inverse"] = inverse;
    return {call_rope(x, seq_start, theta, inverse)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    Tensor g = grads[0];
    if (g.dim() == 4 && g.size(3) > 1 && g.stride(3) != 1) g = g.contiguous();
    const Tensor dx = call_rope(g, s[0], ctx->saved_data["theta"].toDouble(),
                                !ctx->saved_data["inverse"].toBool());
    return {dx, Tensor(), Tensor(), Tensor()};
  }
};

Tensor rope_autograd(const Tensor& x, const Tensor& seq_start, double theta, bool inverse) {
  return Rope::apply(x, seq_start, theta, inverse)[0];
}

}  // namespace
}  // namespace blossomrec

TORCH_LIBRARY_IMPL(blossomrec, Autograd, m) {
  m.impl("sparse_attention_fwd", &blossomrec::sparse_attention_fwd_autograd);
  m.impl("rope", &blossomrec::rope_autograd);
}
