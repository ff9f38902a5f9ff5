"""What only the CPU kernels are checked for, beyond test_ops.py's shared case table (which runs the
op against the reference on every device, this one included): exact selection choices on ties and
at the threshold, finite differences in float64, repeated selections in the backward, determinism,
outputs fully written under poisoning, opcheck and the input errors of the raw ops.

Inputs come from ``helpers.make_batch`` (row-buffer layout, every layout from one seed), results are
compared with ``helpers.assert_fa_close`` (FlashAttention's criterion) or exactly.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import blossomrec_cuda as br
from blossomrec_cuda.ops import SeqLayout
from helpers import (CASES, STIS, check_selection, leaves_like, make_batch, padding_rows,
                     reference_given_selection, stis_hp)

OPS = torch.ops.blossomrec


def _select(batch, hp) -> tuple[Tensor, Tensor]:
    return OPS.select_blocks(batch.q, batch.kc, batch.seq_start, batch.seq_len,
                             hp["compress_stride"], hp["select_block"], hp["num_select"],
                             hp["causal"], batch.q.shape[-1] ** -0.5)


def _attention_args(hp, D) -> tuple:
    return (hp["select_block"], hp["window"], hp["power_block"], hp["use_power"], hp["use_sink"],
            hp["causal"], D ** -0.5)


def _assert_padding_zero(name: str, x: Tensor, layout: SeqLayout) -> None:
    """Rows of the row buffer ``x [Bq, N, ...]`` that belong to no sequence must be exactly 0."""
    pad = x[padding_rows(layout.seq_start, layout.seq_len, *x.shape[:2])]
    assert bool((pad == 0).all()), f"{name}: padding rows are not 0 (max |x| {pad.abs().max()})"


# --------------------------------------------------------------------------------------------------
# Selection: the exact choices
# --------------------------------------------------------------------------------------------------
def test_selection_exercised() -> None:
    """The shared cases must actually select blocks (not only fall back to the own block)."""
    for lengths, N, H, KVH, D, case_hp in CASES:
        if case_hp["num_select"] == 0 or max(lengths) < 16 or max(lengths) > 300:
            continue
        batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N,
                           compress_stride=case_hp["compress_stride"], seed=1)
        _, cnt = _select(batch, dict(case_hp, causal=True))
        assert int(cnt.sum()) > 0, f"case {lengths}: nothing selected"
    # n = 16 exceeds the 4 blocks of a 17-token sequence: every visible block is kept, i.e. all but
    # the own block (non-causal), and all 4 for the last token, whose own block (4) has no
    # compressed windows.
    lengths, N, H, KVH, D, case_hp = CASES[6]
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N, compress_stride=2, seed=1)
    _, cnt = _select(batch, dict(case_hp, causal=False))
    assert cnt[0, :, 0].tolist() == [3] * 16 + [4]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_selection_ties_prefer_lower_blocks(causal: bool) -> None:
    """Identical compressed keys make every block score equal: the lowest visible blocks win
    (docs/ALGORITHM.md), in order."""
    hp = dict(compress_stride=2, select_block=4, num_select=3, causal=causal)
    batch = make_batch([40], H=2, KVH=1, D=16, compress_stride=2, seed=12)
    batch.kc[:] = batch.kc[:, :1].clone()
    idx, cnt = _select(batch, hp)
    check_selection(idx, cnt, leaves_like(batch, torch.float64), batch.seq_start,
                    batch.seq_len, hp)
    for i in range(40):
        own = i // hp["select_block"]
        visible = [J for J in range(10) if ((J + 1) * 4 <= i if causal else J != own)]
        assert idx[0, i, 0].tolist() == (visible[:3] + [-1] * 3)[:3], f"query {i}"
        assert int(cnt[0, i, 0]) == min(3, len(visible)), f"query {i}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_selection_threshold_and_null_logit(dtype: torch.dtype) -> None:
    """Scores near -1000: the -1000 softmax entry and the P > 1e-10 threshold decide how many
    blocks survive, so counts fall below min(n, #visible)."""
    hp = dict(compress_stride=2, select_block=4, num_select=8, causal=False)
    batch = make_batch([64, 50], H=2, KVH=1, D=16, N=64, dtype=dtype, compress_stride=2, seed=9)
    g = torch.Generator().manual_seed(10)
    # score = scale * qbar . kcb + (small terms); with q[..., 0] = 1 and scale = 1/4,
    # kc[b, ..., 0] = 4 * (mu_b + sigma_b * x) puts sequence b's scores near mu_b +- sigma_b.
    # Sequence 0: a wide spread, so the threshold cuts relative to the best block. Sequence 1: every
    # score near exp(-1024 + 1000) ~ 4e-11 relative to the -1000 entry, straddling the threshold.
    batch.q[..., 0] = 1.0
    x = torch.randn(batch.kc.shape[:-1], generator=g, dtype=torch.float64)
    mu = torch.tensor([-1010.0, -1024.0], dtype=torch.float64).view(2, 1, 1)
    sigma = torch.tensor([40.0, 2.0], dtype=torch.float64).view(2, 1, 1)
    batch.kc[..., 0] = (4 * (mu + sigma * x)).to(dtype)
    idx, cnt = _select(batch, hp)
    check_selection(idx, cnt, leaves_like(batch, torch.float64), batch.seq_start,
                    batch.seq_len, hp)
    cnt0 = cnt[0, :64, 0]
    cnt1 = cnt[1, :50, 0]  # 12 blocks: at least 11 visible to every query
    assert int(cnt0.min()) < hp["num_select"], "the threshold must drop blocks of sequence 0"
    assert int(cnt1.min()) < hp["num_select"] and int(cnt1.max()) > 0, (
        f"sequence 1 must straddle the threshold, got counts {cnt1.unique().tolist()}")


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------
GRADCHECK = [  # lengths, N, layout, causal, window, power block
    ([17, 9], 17, "right", True, 2, 1),
    ([10, 7], None, "packed", False, 2, 2),
]


@pytest.mark.parametrize("lengths,N,layout,causal,window,power_block", GRADCHECK,
                         ids=["right-causal", "packed-noncausal-sink-p2"])
def test_gradcheck_float64(lengths, N, layout, causal, window, power_block) -> None:
    """Finite differences w.r.t. q, k, v and gates, with the selection fixed (it is discrete)."""
    hp = dict(compress_stride=2, select_block=4, num_select=3, causal=causal)
    batch = make_batch(lengths, H=2, KVH=1, D=16, N=N, layout=layout, dtype=torch.float64,
                       compress_stride=2, seed=3)
    w = batch.to_wrapper
    q, k, v = (w(x).contiguous().requires_grad_() for x in (batch.q, batch.k, batch.v))
    gates = w(batch.gates).clone().requires_grad_()
    kw = batch.layout_kwargs()
    idx, cnt = br.select_blocks(q.detach(), batch.kc, **kw, **hp)
    assert int(cnt.sum()) > 0, "the case must select blocks"

    def f(q_: Tensor, k_: Tensor, v_: Tensor, g_: Tensor) -> Tensor:
        return br.sparse_attention(q_, k_, v_, g_, idx, cnt, **kw, select_block=4, window=window,
                                   power_block=power_block, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v, gates), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_duplicate_selections_backward() -> None:
    """Every query selects the same blocks (and repeats them): the backward must add each query's
    contribution to those keys exactly once per query, the case sparse backward passes get wrong."""
    H, KVH = 4, 2
    hp = stis_hp(dict(compress_stride=2, select_block=4, num_select=4), STIS[0], True)
    batch = make_batch([33, 20], H=H, KVH=KVH, D=16, dtype=torch.float64, compress_stride=2,
                       seed=4)
    Bq, N = batch.q.shape[:2]
    idx = torch.tensor([0, 1, 0, 1], dtype=torch.int32).expand(Bq, N, KVH, 4).contiguous()
    cnt = torch.full((Bq, N, KVH), 4, dtype=torch.int32)
    t = leaves_like(batch)
    out = br.sparse_attention(t["q"], t["k"], t["v"], t["gates"], idx, cnt,
                              **batch.layout_kwargs(), select_block=4)
    dout = torch.randn_like(out)
    names = ("q", "k", "v", "gates")
    got = torch.autograd.grad(out, [t[n] for n in names], dout)
    tr = leaves_like(batch)
    ref = reference_given_selection(tr, batch.seq_start, batch.seq_len, idx, cnt, hp)["out"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    want = torch.autograd.grad(ref, [tr[n] for n in names], dout)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg="d" + name)
    # Block 0 is read by every query: its keys' dv is the sum over all queries and must be nonzero.
    assert bool((got[2][0, :4] != 0).all())


def test_backward_is_deterministic() -> None:
    batch = make_batch([40, 33, 5], H=8, KVH=2, D=16, layout="packed", compress_stride=2, seed=5)
    w = batch.to_wrapper
    results = []
    for _ in range(2):
        t = leaves_like(batch)
        out = br.blossom_attention(w(t["q"]), w(t["k"]), w(t["v"]), batch.kc, w(t["gates"]),
                                   **batch.layout_kwargs(), compress_stride=2, select_block=4,
                                   num_select=3)
        results.append(torch.autograd.grad(out, [t[n] for n in ("q", "k", "v", "gates")],
                                           torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Poisoning, opcheck and input errors
# --------------------------------------------------------------------------------------------------
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
        _assert_padding_zero(f"{name} sel_idx + 1", idx + 1, layout)
        _assert_padding_zero(f"{name} sel_cnt", cnt, layout)
        hp = (4, 3, 1, True, False, True, D ** -0.5)
        fwd = OPS.sparse_attention_fwd(q, k, v, gates, idx, cnt, st, ln, *hp)
        out, o_sel, o_win, lse = fwd
        dout = torch.randn_like(out)
        bwd = OPS.sparse_attention_bwd(dout, q, k, v, gates, o_sel, o_win, lse, idx, cnt, st, ln,
                                       *hp)
        for t_name, t in zip(("out", "o_sel", "o_win", "lse", "dq", "dk", "dv", "dgates"),
                             (*fwd, *bwd)):
            assert not bool(t.isnan().any()), f"{name}: {t_name} has unwritten (NaN) elements"
            _assert_padding_zero(f"{name} {t_name}", t, layout)


OPCHECK = [  # lengths, N, layout, causal, H, KVH, D, dtype
    ([9, 4], 9, "right", True, 2, 1, 16, torch.float32),
    ([9, 6], None, "packed", False, 4, 2, 16, torch.float32),
    ([8], 8, "right", True, 2, 2, 32, torch.float64),
]


@pytest.mark.parametrize("sample", range(3), ids=["padded-f32", "packed-f32", "padded-f64"])
def test_opcheck(sample: int) -> None:
    lengths, N, layout, causal, H, KVH, D, dtype = OPCHECK[sample]
    hp = stis_hp(dict(compress_stride=2, select_block=4, num_select=3), STIS[0], causal)
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N, layout=layout, dtype=dtype,
                       compress_stride=2, seed=11)
    q, k, v, gates = (x.contiguous() for x in (batch.q, batch.k, batch.v, batch.gates))
    st, ln = batch.seq_start, batch.seq_len
    sel_args = (q, batch.kc, st, ln, 2, 4, 3, causal, D ** -0.5)
    torch.library.opcheck(OPS.select_blocks.default, sel_args)
    idx, cnt = OPS.select_blocks(*sel_args)
    attn = _attention_args(hp, D)
    fwd_args = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
                gates.clone().requires_grad_(), idx, cnt, st, ln, *attn)
    torch.library.opcheck(OPS.sparse_attention_fwd.default, fwd_args)
    out, o_sel, o_win, lse = OPS.sparse_attention_fwd(q, k, v, gates, idx, cnt, st, ln, *attn)
    bwd_args = (torch.randn_like(out), q, k, v, gates, o_sel, o_win, lse, idx, cnt, st, ln, *attn)
    torch.library.opcheck(OPS.sparse_attention_bwd.default, bwd_args)


def test_input_errors_name_the_problem() -> None:
    batch = make_batch([8], H=2, KVH=1, D=16, compress_stride=2, seed=2)
    q, k, v, kc, gates = batch.q, batch.k, batch.v, batch.kc, batch.gates
    st, ln = batch.seq_start, batch.seq_len
    with pytest.raises(ValueError, match="head dim"):
        OPS.select_blocks(q[..., :8], kc[..., :8], st, ln, 2, 4, 3, True, 0.25)
    with pytest.raises(ValueError, match="multiple of compress_stride"):
        OPS.select_blocks(q, kc, st, ln, 3, 4, 3, True, 0.25)
    idx, cnt = OPS.select_blocks(q, kc, st, ln, 2, 4, 3, True, 0.25)
    with pytest.raises(ValueError, match="non-causal"):
        OPS.sparse_attention_fwd(q, k, v, gates, idx, cnt, st, ln, 4, 8, 1, True, True, True, 0.25)
    with pytest.raises(ValueError, match="runs past"):
        OPS.sparse_attention_fwd(q, k, v, gates, idx, cnt, st, ln + 1, 4, 8, 1, True, False,
                                 True, 0.25)
