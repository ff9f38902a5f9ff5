// Every schema of the blossomrec op library, in one place. Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). See docs/DESIGN.md for layouts and semantics.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A dummy module so that `import blossomrec_cuda._C` loads this library (and registers the ops)
// without a pybind11 function table.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(blossomrec, m) {
  m.def(
      "select_blocks(Tensor q, Tensor kc, Tensor seq_start, Tensor seq_len, int compress_stride, "
      "int select_block, int num_select, bool causal, float scale) -> (Tensor sel_idx, Tensor sel_cnt)");
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor gates, Tensor sel_idx, "
      "Tensor sel_cnt, Tensor seq_start, Tensor seq_len, int select_block, int window, "
      "int power_block, bool use_power, bool use_sink, bool causal, float scale) "
      "-> (Tensor out, Tensor o_sel, Tensor o_win, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor gates, Tensor o_sel, "
      "Tensor o_win, Tensor lse, Tensor sel_idx, Tensor sel_cnt, Tensor seq_start, Tensor seq_len, "
      "int select_block, int window, int power_block, bool use_power, bool use_sink, bool causal, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dgates)");
  // Rotary embedding of x [B, N, heads, D] at pos = max(n - seq_start[b], 0); `inverse` turns the
  // other way (its own backward). Returns a contiguous tensor.
  m.def("rope(Tensor x, Tensor seq_start, float theta, bool inverse) -> Tensor");
  // The compressor's input windows of k [B, N, KVH, D]: [B, N // s, KVH, l * D], window c at
  // position t holding row c*s - (l - s) + t of each sequence (relative to seq_start[b]; 0 below
  // row 0, clamped to N - 1 past the end) plus pos [KVH, l, D] (k's dtype). Returns a contiguous
  // tensor; no autograd.
  m.def("compress_windows(Tensor k, Tensor seq_start, Tensor pos, int l, int s) -> Tensor");
}
