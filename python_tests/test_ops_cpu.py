"""The CPU ops against the reference (docs/ALGORITHM.md in plain PyTorch).

Forward: selection (sel_idx, sel_cnt) and every output of the fused attention (out, o_sel,
o_win, lse). Backward: dq, dk, dv and dgates through the autograd of ``blossomrec_cuda.ops``.
float64 is held to the reference tightly (and to ``gradcheck``); float32, bfloat16 and float16 to
the error criterion of FlashAttention: ``max|x - ref| <= 2 * max|x_lowprec_ref - ref| + atol``,
with ``ref`` the reference in float64 and ``x_lowprec_ref`` the reference run in the test dtype
(``upcast=False``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

import blossomrec_cuda as br
from blossomrec_cuda import reference as R
from blossomrec_cuda.ops import SeqLayout

OPS = torch.ops.blossomrec


# --------------------------------------------------------------------------------------------------
# Cases and inputs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One batch shape and hyper-parameter set. ``layout``: "right" | "left" | "packed"."""

    name: str
    lengths: tuple[int, ...]
    N: int  # buffer length of the padded layouts (unused when packed)
    H: int
    KVH: int
    D: int
    layout: str = "right"
    causal: bool = True
    compress_stride: int = 2
    select_block: int = 4
    num_select: int = 3
    window: int = 8
    power_block: int = 1
    use_power: bool = True
    use_sink: bool = True

    def select_kwargs(self) -> dict:
        return dict(compress_stride=self.compress_stride, select_block=self.select_block,
                    num_select=self.num_select, causal=self.causal)

    def attention_kwargs(self) -> dict:
        return dict(select_block=self.select_block, window=self.window,
                    power_block=self.power_block, use_power=self.use_power,
                    use_sink=self.use_sink, causal=self.causal)

    def all_kwargs(self) -> dict:
        """Every hyper-parameter, as ``blossom_attention`` (ops and reference) takes them."""
        return {**self.select_kwargs(), **self.attention_kwargs()}

    def raw_attention_args(self) -> tuple:
        """The hyper-parameters as the raw op takes them (the sink exists for non-causal only)."""
        return (self.select_block, self.window, self.power_block, self.use_power,
                self.use_sink and not self.causal, self.causal, self.D ** -0.5)


CASES = [
    Case("right-ragged-causal-w1", (17, 15, 1, 0), N=17, H=2, KVH=1, D=16, window=1),
    Case("left-noncausal-sink-p2", (17, 9, 0), N=17, H=4, KVH=2, D=32, layout="left",
         causal=False, power_block=2),
    Case("packed-causal-G4", (15, 1, 0, 40), N=0, H=8, KVH=2, D=16, layout="packed",
         compress_stride=4, select_block=8, num_select=2),
    Case("packed-noncausal-plain-window", (33, 17, 2), N=0, H=2, KVH=2, D=64, layout="packed",
         causal=False, window=1, use_power=False, use_sink=False),
    Case("right-N97-G8-p2", (97, 60), N=97, H=8, KVH=1, D=16, num_select=4, power_block=2),
    Case("left-N200-D128-noncausal", (200, 1), N=200, H=2, KVH=1, D=128, layout="left",
         causal=False, compress_stride=4, select_block=8),
    Case("right-N1", (1, 0, 1), N=1, H=2, KVH=1, D=16),
    Case("right-n-exceeds-blocks-noncausal", (17, 16), N=17, H=2, KVH=1, D=16, causal=False,
         num_select=16, use_sink=False),
    Case("left-N15-n0-causal-nopower", (15, 12), N=15, H=4, KVH=1, D=16, layout="left",
         num_select=0, use_power=False),
]
CASE_IDS = [c.name for c in CASES]
LOW_PRECISION_CASES = [CASES[i] for i in (0, 1, 2, 4)]


@dataclass
class Batch:
    """Random inputs of a case in the public layout (padded ``[B, N, ...]`` or packed ``[T, ...]``).

    q, k and v are views of one ``qkv`` tensor (strided, contiguous last dim) and ``kc`` is a
    strided view too, so that the kernels' stride handling is exercised.
    """

    qkv: Tensor  # [B, N, H + 2 KVH, D] or [T, H + 2 KVH, D]
    kc: Tensor  # [B, C, KVH, D]
    gates: Tensor  # [B, N, H, 2] or [T, H, 2]
    layout_kwargs: dict  # lengths + padding_side, or cu_seqlens, for the public wrappers
    layout: SeqLayout
    H: int
    KVH: int

    def split(self, qkv: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        qkv = self.qkv if qkv is None else qkv
        H, KVH = self.H, self.KVH
        return qkv[..., :H, :], qkv[..., H:H + KVH, :], qkv[..., H + KVH:, :]


def make_batch(case: Case, dtype: torch.dtype, seed: int = 0,
               gates_dtype: Optional[torch.dtype] = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    B = len(case.lengths)
    heads = case.H + 2 * case.KVH
    if case.layout == "packed":
        lead: tuple[int, ...] = (sum(case.lengths),)
        cu = torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], dtype=torch.int32)
        layout_kwargs: dict = dict(cu_seqlens=cu)
    else:
        lead = (B, case.N)
        layout_kwargs = dict(lengths=torch.tensor(case.lengths), padding_side=case.layout)
    qkv = torch.randn(*lead, heads, case.D, generator=g).to(dtype)
    C = max(case.lengths) // case.compress_stride + 1  # one spare window: kc may hold more rows
    kc = torch.randn(B, C, 2 * case.KVH, case.D, generator=g).to(dtype)[:, :, ::2]
    gates = torch.sigmoid(torch.randn(*lead, case.H, 2, generator=g)).to(gates_dtype or dtype)
    layout = br.seq_layout(qkv[..., :case.H, :], **layout_kwargs)
    return Batch(qkv, kc, gates, layout_kwargs, layout, case.H, case.KVH)


# --------------------------------------------------------------------------------------------------
# The reference on the row buffer, given a selection
# --------------------------------------------------------------------------------------------------
def reference_rows(case: Case, batch: Batch, qkv: Tensor, gates: Tensor, sel_idx: Tensor,
                   sel_cnt: Tensor, upcast: bool = True) -> dict[str, Tensor]:
    """The reference's out, o_sel, o_win ``[Bq, N, H, D]`` and lse ``[Bq, N, H, 2]`` in row-buffer
    layout, computed with the given selection (row layout ``[Bq, N, KVH, n]``) so that the attention
    is checked independently of the scoring. Differentiable w.r.t. ``qkv`` and ``gates``."""
    rows = batch.layout.to_rows
    q, k, v = (rows(x) for x in batch.split(qkv))
    gr = rows(gates)
    Bq, N, H, D = q.shape
    out = q.new_zeros(Bq, N, H, D)
    o_sel = q.new_zeros(Bq, N, H, D)
    o_win = q.new_zeros(Bq, N, H, D)
    lse = torch.zeros(Bq, N, H, 2, dtype=R._softmax_dtype(q))
    kc = batch.kc.to(q.dtype)
    starts, lens = batch.layout.seq_start.tolist(), batch.layout.seq_len.tolist()
    for b, (st, L) in enumerate(zip(starts, lens)):
        if L == 0:
            continue
        bq = b if Bq > 1 else 0
        sl = slice(st, st + L)
        r = R.blossom_attention_seq(q[bq, sl], k[bq, sl], v[bq, sl], kc[b], gr[bq, sl],
                                    sel=(sel_idx[bq, sl], sel_cnt[bq, sl]),
                                    compress_stride=case.compress_stride,
                                    num_select=case.num_select, upcast=upcast,
                                    **case.attention_kwargs())
        out[bq, sl] = r.out.to(q.dtype)
        o_sel[bq, sl] = r.o_sel.to(q.dtype)
        o_win[bq, sl] = r.o_win.to(q.dtype)
        lse[bq, sl] = r.lse
    return dict(out=out, o_sel=o_sel, o_win=o_win, lse=lse)


def op_forward(case: Case, batch: Batch) -> dict[str, Tensor]:
    """Every output of the two raw ops, in row-buffer layout."""
    rows = batch.layout.to_rows
    q, k, v = (rows(x) for x in batch.split())
    st, ln = batch.layout.seq_start, batch.layout.seq_len
    idx, cnt = OPS.select_blocks(q, batch.kc, st, ln, case.compress_stride, case.select_block,
                                 case.num_select, case.causal, case.D ** -0.5)
    out, o_sel, o_win, lse = OPS.sparse_attention_fwd(q, k, v, rows(batch.gates), idx, cnt, st, ln,
                                                      *case.raw_attention_args())
    return dict(sel_idx=idx, sel_cnt=cnt, out=out, o_sel=o_sel, o_win=o_win, lse=lse)


def reference_selection(case: Case, batch: Batch) -> tuple[Tensor, Tensor]:
    """The reference's selection (computed in float64 from the same input values), row layout."""
    rows = batch.layout.to_rows
    q, k, v = (rows(x).double() for x in batch.split())
    r = R.blossom_attention(q, k, v, batch.kc.double(), rows(batch.gates).double(),
                            batch.layout.seq_start, batch.layout.seq_len, **case.all_kwargs())
    return r.sel_idx, r.sel_cnt


# --------------------------------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------------------------------
NEAR_TIE = 1e-5


def assert_selection_matches(case: Case, batch: Batch, idx: Tensor, cnt: Tensor, ref_idx: Tensor,
                             ref_cnt: Tensor) -> None:
    """Selections must be equal, except for rows where the float64 scores have a near-tie (two
    competing blocks closer than 1e-5) or a probability within 1e-4 (relative) of the threshold."""
    if torch.equal(idx, ref_idx) and torch.equal(cnt, ref_cnt):
        return
    rows = batch.layout.to_rows
    q = rows(batch.split()[0]).double()
    Bq = q.shape[0]
    mismatched = ((idx != ref_idx).any(-1) | (cnt != ref_cnt)).nonzero().tolist()
    for bq, n, g in mismatched:
        owner = [b for b, (st, L) in enumerate(zip(batch.layout.seq_start.tolist(),
                                                   batch.layout.seq_len.tolist()))
                 if (b if Bq > 1 else 0) == bq and st <= n < st + L]
        assert owner, f"padding row {bq, n} has a selection {idx[bq, n, g].tolist()}"
        b = owner[0]
        st, L = int(batch.layout.seq_start[b]), int(batch.layout.seq_len[b])
        i = torch.tensor([n - st])
        scores = R.block_scores(q[bq, st + i], batch.kc[b].double(), L, i, case.compress_stride,
                                case.select_block, case.D ** -0.5)[g, 0]
        visible = R.block_visible(i, scores.shape[0], case.select_block, case.causal)[0]
        s = scores[visible].sort(descending=True).values
        take = min(case.num_select, s.numel())
        gaps = (s[:-1] - s[1:])[:take]
        logp = torch.log_softmax(torch.cat([torch.tensor([R.NULL_LOGIT], dtype=s.dtype), s]), 0)[1:]
        near_threshold = ((logp[:take + 1] - torch.log(torch.tensor(R.MIN_PROB, dtype=s.dtype)))
                          .abs() < 1e-4).any()
        assert (gaps.numel() > 0 and bool((gaps < NEAR_TIE).any())) or bool(near_threshold), (
            f"selection differs at row {bq, n}, kv head {g} without a near-tie: got "
            f"{idx[bq, n, g].tolist()} (count {int(cnt[bq, n, g])}), reference "
            f"{ref_idx[bq, n, g].tolist()} (count {int(ref_cnt[bq, n, g])}); sorted scores "
            f"{s[:take + 1].tolist()}")


# atol of the FlashAttention criterion: the kernels accumulate in float32 (float64 for float64) in a
# different order than the reference's matmuls, which adds a few float32 ulps of the largest value
# beyond the final rounding to the dtype that the low-precision reference shares. 8 float32 ulps of
# max|ref| (about 1e-6 relative) covers that and nothing more.
ATOL_ULPS = 8 * torch.finfo(torch.float32).eps


def assert_fa_close(name: str, got: Tensor, ref: Tensor, lowprec_ref: Tensor) -> None:
    """``max|got - ref| <= 2 * max|lowprec_ref - ref| + atol`` (FlashAttention's criterion)."""
    ref = ref.double()
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    lp_err = (lowprec_ref.double() - ref).abs().max().item() if ref.numel() else 0.0
    atol = ATOL_ULPS * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= 2 * lp_err + atol, (
        f"{name}: max error {err:.3e} exceeds 2 x low-precision reference error {lp_err:.3e} + "
        f"atol {atol:.1e}")


def assert_padding_zero(name: str, x: Tensor, layout: SeqLayout) -> None:
    """Rows of the row buffer ``x [Bq, N, ...]`` that belong to no sequence must be exactly 0."""
    valid = torch.zeros(x.shape[:2], dtype=torch.bool)
    Bq = x.shape[0]
    for b, (st, L) in enumerate(zip(layout.seq_start.tolist(), layout.seq_len.tolist())):
        valid[b if Bq > 1 else 0, st:st + L] = True
    pad = x[~valid]
    assert bool((pad == 0).all()), f"{name}: padding rows are not 0 (max |x| {pad.abs().max()})"


def grad_split(batch: Batch, dqkv: Tensor) -> dict[str, Tensor]:
    dq, dk, dv = batch.split(dqkv)
    return dict(dq=dq, dk=dk, dv=dv)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_forward_matches_reference(case: Case, dtype: torch.dtype) -> None:
    batch = make_batch(case, dtype)
    got = op_forward(case, batch)
    assert_selection_matches(case, batch, got["sel_idx"], got["sel_cnt"],
                             *reference_selection(case, batch))

    sel = (got["sel_idx"], got["sel_cnt"])
    qkv64 = batch.qkv.double()
    ref = reference_rows(case, batch, qkv64, batch.gates.double(), *sel)
    if dtype == torch.float64:
        for name in ("out", "o_sel", "o_win"):
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-12, msg=name)
        # lse is float32 for every dtype (docs/DESIGN.md): a float32 rounding of values of O(10).
        torch.testing.assert_close(got["lse"].double(), ref["lse"], rtol=0, atol=4e-6)
    else:
        lowprec = reference_rows(case, batch, batch.qkv, batch.gates, *sel)
        for name in ("out", "o_sel", "o_win", "lse"):
            assert_fa_close(name, got[name], ref[name], lowprec[name])
    for name in ("out", "o_sel", "o_win", "lse"):
        assert_padding_zero(name, got[name], batch.layout)
    assert_padding_zero("sel_cnt", got["sel_cnt"], batch.layout)
    assert_padding_zero("sel_idx + 1", got["sel_idx"] + 1, batch.layout)


def test_selection_exercised() -> None:
    """The cases above must actually select blocks (not only fall back to the own block)."""
    counts = []
    for case in CASES:
        batch = make_batch(case, torch.float32)
        counts.append(int(op_forward(case, batch)["sel_cnt"].sum()))
    assert all(c > 0 for c, case in zip(counts, CASES)
               if case.num_select > 0 and max(case.lengths) >= 16)
    full = next(c for c in CASES if c.name == "right-n-exceeds-blocks-noncausal")
    cnt = op_forward(full, make_batch(full, torch.float32))["sel_cnt"][0, :, 0]
    # n = 16 exceeds the 4 blocks of a 17-token sequence: every visible block is kept, i.e. all but
    # the own block, and all 4 for the last token, whose own block (4) has no compressed windows.
    assert cnt[:16].tolist() == [3] * 16 and int(cnt[16]) == 4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_selection_ties_prefer_lower_blocks(causal: bool) -> None:
    """Identical compressed keys make every block score equal: SPEC picks the lowest visible
    blocks."""
    case = Case("ties", (40,), N=40, H=2, KVH=1, D=16, causal=causal, num_select=3)
    batch = make_batch(case, torch.float32, seed=12)
    batch.kc[:] = batch.kc[:, :1].clone()
    got = op_forward(case, batch)
    assert_selection_matches(case, batch, got["sel_idx"], got["sel_cnt"],
                             *reference_selection(case, batch))
    for i in range(40):
        own = i // case.select_block
        visible = [J for J in range(10) if ((J + 1) * 4 <= i if causal else J != own)]
        assert got["sel_idx"][0, i, 0].tolist() == (visible[:3] + [-1] * 3)[:3], f"query {i}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_selection_threshold_and_null_logit(dtype: torch.dtype) -> None:
    """Scores near -1000: SPEC's -1000 softmax entry and the P > 1e-10 threshold decide how many
    blocks survive, so counts fall below min(n, #visible)."""
    case = Case("threshold", (64, 50), N=64, H=2, KVH=1, D=16, causal=False, num_select=8)
    batch = make_batch(case, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    # score = scale * qbar . kcb + (small terms); with q[..., 0] = 1 and scale = 1/4,
    # kc[b, ..., 0] = 4 * (mu_b + sigma_b * x) puts sequence b's scores near mu_b +- sigma_b.
    # Sequence 0: a wide spread, so the threshold cuts relative to the best block. Sequence 1: every
    # score near exp(-1024 + 1000) ~ 4e-11 relative to the -1000 entry, straddling the threshold.
    batch.qkv[..., :case.H, 0] = 1.0
    x = torch.randn(batch.kc.shape[:-1], generator=g, dtype=torch.float64)
    mu = torch.tensor([-1010.0, -1024.0], dtype=torch.float64).view(2, 1, 1)
    sigma = torch.tensor([40.0, 2.0], dtype=torch.float64).view(2, 1, 1)
    batch.kc[..., 0] = (4 * (mu + sigma * x)).to(dtype)
    got = op_forward(case, batch)
    assert_selection_matches(case, batch, got["sel_idx"], got["sel_cnt"],
                             *reference_selection(case, batch))
    cnt0 = got["sel_cnt"][0, :64, 0]
    cnt1 = got["sel_cnt"][1, :50, 0]  # 12 blocks: at least 11 visible to every query
    assert int(cnt0.min()) < case.num_select, "the threshold must drop blocks of sequence 0"
    assert int(cnt1.min()) < case.num_select and int(cnt1.max()) > 0, (
        f"sequence 1 must straddle the threshold, got counts {cnt1.unique().tolist()}")


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------
def op_and_reference_grads(case: Case, batch: Batch, upcast_ref_dtype: torch.dtype
                           ) -> tuple[dict, dict, dict]:
    """Gradients of ``<dout, out>`` w.r.t. q, k, v and gates: from the op (autograd through
    ``blossomrec_cuda.blossom_attention``), from the reference in ``upcast_ref_dtype`` and from the
    reference in the batch dtype (``upcast=False``)."""
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(batch.split()[0].shape, generator=g)

    qkv = batch.qkv.clone().requires_grad_()
    gates = batch.gates.clone().requires_grad_()
    q, k, v = batch.split(qkv)
    out = br.blossom_attention(q, k, v, batch.kc, gates, **batch.layout_kwargs, **case.all_kwargs())
    dqkv, dgates = torch.autograd.grad(out, (qkv, gates), dout.to(out.dtype))
    got = dict(out=out.detach(), **grad_split(batch, dqkv), dgates=dgates)

    with torch.no_grad():
        idx, cnt = br.select_blocks(batch.split()[0], batch.kc, **batch.layout_kwargs,
                                    **case.select_kwargs())
    sel = (batch.layout.to_rows(idx), batch.layout.to_rows(cnt))

    def reference_grads(dtype: torch.dtype, upcast: bool) -> dict:
        qkv_r = batch.qkv.detach().to(dtype).requires_grad_()
        # The float64 reference takes float64 gates; the low-precision one the gates as given.
        gates_dtype = torch.float64 if dtype == torch.float64 else batch.gates.dtype
        gates_r = batch.gates.detach().to(gates_dtype).requires_grad_()
        r = reference_rows(case, batch, qkv_r, gates_r, *sel, upcast=upcast)
        r_out = batch.layout.from_rows(r["out"])
        d_qkv, d_gates = torch.autograd.grad(r_out, (qkv_r, gates_r), dout.to(r_out.dtype))
        return dict(out=r_out.detach(), **grad_split(batch, d_qkv), dgates=d_gates)

    return got, reference_grads(upcast_ref_dtype, True), reference_grads(batch.qkv.dtype, False)


GRAD_NAMES = ("out", "dq", "dk", "dv", "dgates")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gradients_match_reference(case: Case, dtype: torch.dtype) -> None:
    batch = make_batch(case, dtype)
    got, ref, lowprec = op_and_reference_grads(case, batch, torch.float64)
    for name in GRAD_NAMES:
        if dtype == torch.float64:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-11, msg=name)
        else:
            assert_fa_close(name, got[name], ref[name], lowprec[name])


@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=[c.name for c in LOW_PRECISION_CASES])
@pytest.mark.parametrize("dtype,gates_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16)],
    ids=["bf16", "bf16-gates-f32", "f16"])
def test_low_precision_forward_and_gradients(case: Case, dtype: torch.dtype,
                                             gates_dtype: torch.dtype) -> None:
    batch = make_batch(case, dtype, gates_dtype=gates_dtype)
    got = op_forward(case, batch)
    assert_selection_matches(case, batch, got["sel_idx"], got["sel_cnt"],
                             *reference_selection(case, batch))
    sel = (got["sel_idx"], got["sel_cnt"])
    ref = reference_rows(case, batch, batch.qkv.double(), batch.gates.double(), *sel)
    lowprec = reference_rows(case, batch, batch.qkv, batch.gates, *sel, upcast=False)
    for name in ("out", "o_sel", "o_win", "lse"):
        assert_fa_close(name, got[name], ref[name], lowprec[name])

    grads, ref_grads, lowprec_grads = op_and_reference_grads(case, batch, torch.float64)
    assert grads["dgates"].dtype == gates_dtype
    for name in GRAD_NAMES:
        assert_fa_close(name, grads[name], ref_grads[name], lowprec_grads[name])


GRADCHECK_CASES = [
    Case("gc-right-causal", (17, 9), N=17, H=2, KVH=1, D=16, window=2),
    Case("gc-packed-noncausal-sink-p2", (10, 7), N=0, H=2, KVH=1, D=16, layout="packed",
         causal=False, window=2, power_block=2),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.name for c in GRADCHECK_CASES])
def test_gradcheck_float64(case: Case) -> None:
    """Finite differences w.r.t. q, k, v and gates, with the selection fixed (it is discrete)."""
    batch = make_batch(case, torch.float64)
    q, k, v = (x.contiguous().requires_grad_() for x in batch.split())
    gates = batch.gates.clone().requires_grad_()
    idx, cnt = br.select_blocks(q.detach(), batch.kc, **batch.layout_kwargs, **case.select_kwargs())
    assert int(cnt.sum()) > 0, "the case must select blocks"

    def f(q_: Tensor, k_: Tensor, v_: Tensor, g_: Tensor) -> Tensor:
        return br.sparse_attention(q_, k_, v_, g_, idx, cnt, **batch.layout_kwargs,
                                   **case.attention_kwargs())

    assert torch.autograd.gradcheck(f, (q, k, v, gates), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_duplicate_selections_backward() -> None:
    """Every query selects the same blocks (and repeats them): the backward must add each query's
    contribution to those keys exactly once per query, the case sparse backward passes get wrong."""
    case = Case("dup", (33, 20), N=33, H=4, KVH=2, D=16, num_select=4)
    batch = make_batch(case, torch.float64)
    rows = batch.layout.to_rows
    Bq, N = rows(batch.qkv).shape[:2]
    idx = torch.tensor([0, 1, 0, 1], dtype=torch.int32).expand(Bq, N, case.KVH, 4).contiguous()
    cnt = torch.full((Bq, N, case.KVH), 4, dtype=torch.int32)

    qkv = batch.qkv.clone().requires_grad_()
    gates = batch.gates.clone().requires_grad_()
    out = br.sparse_attention(*batch.split(qkv), gates, idx, cnt, **batch.layout_kwargs,
                              **case.attention_kwargs())
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, gates), dout)

    qkv_r = batch.qkv.clone().requires_grad_()
    gates_r = batch.gates.clone().requires_grad_()
    ref = reference_rows(case, batch, qkv_r, gates_r, idx, cnt)
    torch.testing.assert_close(out, ref["out"], rtol=0, atol=1e-12)
    want = torch.autograd.grad(ref["out"], (qkv_r, gates_r), dout)
    for name, a, b in zip(("dqkv", "dgates"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)
    # Block 0 is read by every query: its keys' dv is the sum over all queries and must be nonzero.
    assert bool((got[0][0, :4, case.H + case.KVH:] != 0).all())


# --------------------------------------------------------------------------------------------------
# Layouts, determinism, poisoning
# --------------------------------------------------------------------------------------------------
def _lay_out(per_seq: list[Tensor], layout: str, N: int) -> tuple[Tensor, dict]:
    """Place per-sequence tensors ``[L_b, ...]`` in a right/left padded ``[B, N, ...]`` buffer or a
    packed ``[T, ...]`` one; returns it and the wrappers' layout arguments."""
    lengths = [x.shape[0] for x in per_seq]
    if layout == "packed":
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return torch.cat(per_seq), dict(cu_seqlens=cu)
    buf = per_seq[0].new_zeros(len(per_seq), N, *per_seq[0].shape[1:])
    for b, x in enumerate(per_seq):
        if layout == "right":
            buf[b, :x.shape[0]] = x
        else:
            buf[b, N - x.shape[0]:] = x
    return buf, dict(lengths=lengths, padding_side=layout)


def _take_seq(buf: Tensor, layout: str, lengths: list[int], b: int, N: int) -> Tensor:
    L = lengths[b]
    if layout == "packed":
        st = sum(lengths[:b])
        return buf[st:st + L]
    return buf[b, :L] if layout == "right" else buf[b, N - L:]


def test_layouts_agree_bitwise() -> None:
    """Right-padded, left-padded and packed batches of the same sequences give identical results
    (padding invariance): the kernels do the same arithmetic per sequence whatever the layout."""
    lengths = [21, 0, 1, 13]
    N, H, KVH, D = 24, 4, 2, 32
    case = Case("agree", tuple(lengths), N=N, H=H, KVH=KVH, D=D, causal=False, power_block=2)
    src = make_batch(case, torch.float32, seed=3)  # right padded: sequence b is src.qkv[b, :L]
    g = torch.Generator().manual_seed(4)
    qkv_seqs = [src.qkv[b, :L] for b, L in enumerate(lengths)]
    gate_seqs = [src.gates[b, :L] for b, L in enumerate(lengths)]
    dout_seqs = [torch.randn(L, H, D, generator=g) for L in lengths]
    results = {}
    for layout in ("right", "left", "packed"):
        qkv, kw = _lay_out(qkv_seqs, layout, N)
        gates, _ = _lay_out(gate_seqs, layout, N)
        dout, _ = _lay_out(dout_seqs, layout, N)
        qkv.requires_grad_()
        gates.requires_grad_()
        out = br.blossom_attention(*src.split(qkv), src.kc, gates, **kw, **case.all_kwargs())
        dqkv, dgates = torch.autograd.grad(out, (qkv, gates), dout)
        results[layout] = [[_take_seq(t, layout, lengths, b, N) for t in (out, dqkv, dgates)]
                           for b in range(len(lengths))]
    for layout in ("left", "packed"):
        for b in range(len(lengths)):
            pairs = zip(("out", "dqkv", "dgates"), results["right"][b], results[layout][b])
            for name, x, y in pairs:
                assert torch.equal(x, y), f"{layout} differs from right padding: seq {b}, {name}"


def test_backward_is_deterministic() -> None:
    case = Case("det", (40, 33, 5), N=0, H=8, KVH=2, D=16, layout="packed")
    batch = make_batch(case, torch.float32, seed=5)
    results = []
    for _ in range(2):
        qkv = batch.qkv.clone().requires_grad_()
        gates = batch.gates.clone().requires_grad_()
        out = br.blossom_attention(*batch.split(qkv), batch.kc, gates, **batch.layout_kwargs,
                                   **case.select_kwargs())
        results.append(torch.autograd.grad(out, (qkv, gates), torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_outputs_fully_written_under_poisoning(monkeypatch: pytest.MonkeyPatch) -> None:
    """With outputs poisoned (NaN, or -777777 for int32), every element must still be written:
    padding rows exactly 0 (indices -1) and no NaN anywhere, forward and backward."""
    monkeypatch.setenv("BLOSSOMREC_POISON_OUTPUTS", "1")
    N, H, KVH, D = 20, 4, 2, 16
    g = torch.Generator().manual_seed(7)
    i32 = torch.int32
    layouts = {  # name: (seq_start, seq_len, Bq)
        "padded": ([0, 3, 20], [12, 17, 0], 3),
        # A packed buffer with gaps: rows 5..9 and 16..19 belong to no sequence.
        "packed-gaps": ([0, 10], [5, 6], 1),
    }
    for name, (starts, lens, Bq) in layouts.items():
        st, ln = torch.tensor(starts, dtype=i32), torch.tensor(lens, dtype=i32)
        B = ln.shape[0]
        q = torch.randn(Bq, N, H, D, generator=g)
        k = torch.randn(Bq, N, KVH, D, generator=g)
        v = torch.randn(Bq, N, KVH, D, generator=g)
        kc = torch.randn(B, N // 2, KVH, D, generator=g)
        gates = torch.rand(Bq, N, H, 2, generator=g)
        layout = SeqLayout(st, ln, packed=Bq == 1)
        idx, cnt = OPS.select_blocks(q, kc, st, ln, 2, 4, 3, True, D ** -0.5)
        assert bool((idx != -777777).all() and (cnt != -777777).all()), name
        assert_padding_zero(f"{name} sel_idx + 1", idx + 1, layout)
        assert_padding_zero(f"{name} sel_cnt", cnt, layout)
        hp = (4, 3, 1, True, False, True, D ** -0.5)
        fwd = OPS.sparse_attention_fwd(q, k, v, gates, idx, cnt, st, ln, *hp)
        out, o_sel, o_win, lse = fwd
        dout = torch.randn_like(out)
        bwd = OPS.sparse_attention_bwd(dout, q, k, v, gates, o_sel, o_win, lse, idx, cnt, st, ln,
                                       *hp)
        for t_name, t in zip(("out", "o_sel", "o_win", "lse", "dq", "dk", "dv", "dgates"),
                             (*fwd, *bwd)):
            assert not bool(t.isnan().any()), f"{name}: {t_name} has unwritten (NaN) elements"
            assert_padding_zero(f"{name} {t_name}", t, layout)


# --------------------------------------------------------------------------------------------------
# opcheck and input errors
# --------------------------------------------------------------------------------------------------
def _opcheck_samples() -> list[tuple[Case, torch.dtype]]:
    return [
        (Case("oc-padded", (9, 4), N=9, H=2, KVH=1, D=16), torch.float32),
        (Case("oc-packed", (9, 6), N=0, H=4, KVH=2, D=16, layout="packed", causal=False),
         torch.float32),
        (Case("oc-f64", (8,), N=8, H=2, KVH=2, D=32), torch.float64),
    ]


@pytest.mark.parametrize("sample", range(3), ids=["padded-f32", "packed-f32", "padded-f64"])
def test_opcheck(sample: int) -> None:
    case, dtype = _opcheck_samples()[sample]
    batch = make_batch(case, dtype, seed=11)
    rows = batch.layout.to_rows
    q, k, v = (rows(x).contiguous() for x in batch.split())
    st, ln = batch.layout.seq_start, batch.layout.seq_len
    sel_args = (q, batch.kc, st, ln, case.compress_stride, case.select_block, case.num_select,
                case.causal, case.D ** -0.5)
    torch.library.opcheck(OPS.select_blocks.default, sel_args)
    idx, cnt = OPS.select_blocks(*sel_args)

    gates = rows(batch.gates).contiguous()
    hp = case.raw_attention_args()
    fwd_args = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
                gates.clone().requires_grad_(), idx, cnt, st, ln, *hp)
    torch.library.opcheck(OPS.sparse_attention_fwd.default, fwd_args)
    out, o_sel, o_win, lse = OPS.sparse_attention_fwd(q, k, v, gates, idx, cnt, st, ln, *hp)
    bwd_args = (torch.randn_like(out), q, k, v, gates, o_sel, o_win, lse, idx, cnt, st, ln, *hp)
    torch.library.opcheck(OPS.sparse_attention_bwd.default, bwd_args)


def test_input_errors_name_the_problem() -> None:
    case = Case("err", (8,), N=8, H=2, KVH=1, D=16)
    batch = make_batch(case, torch.float32)
    q, k, v = batch.split()
    st, ln = batch.layout.seq_start, batch.layout.seq_len
    with pytest.raises(ValueError, match="head dim"):
        OPS.select_blocks(q[..., :8], batch.kc[..., :8], st, ln, 2, 4, 3, True, 0.25)
    with pytest.raises(ValueError, match="multiple of compress_stride"):
        OPS.select_blocks(q, batch.kc, st, ln, 3, 4, 3, True, 0.25)
    idx, cnt = OPS.select_blocks(q, batch.kc, st, ln, 2, 4, 3, True, 0.25)
    with pytest.raises(ValueError, match="non-causal"):
        OPS.sparse_attention_fwd(q, k, v, batch.gates, idx, cnt, st, ln, 4, 8, 1, True, True, True,
                                 0.25)
    with pytest.raises(ValueError, match="runs past"):
        OPS.sparse_attention_fwd(q, k, v, batch.gates, idx, cnt, st, ln + 1, 4, 8, 1, True, False,
                                 True, 0.25)
