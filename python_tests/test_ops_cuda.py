"""What only the CUDA kernels are checked for, beyond test_ops.py's shared case table (which runs the
op against the reference on every device, this one included): the fused tensor-core kernels' grid
of lengths, group sizes and head dims and which kernel family each pass takes, the staged path
against the gather path, padding invariance, determinism, hand-made and empty selections,
misaligned views, long selections, the selection's 1e-10 cut and -1000 entry, N = 65536, opcheck,
torch.compile and CUDA graphs.

Every test here needs a GPU and is marked ``cuda``; it skips with a reason elsewhere. The harness is
``helpers.py``'s (one ``make_batch``, one criterion: ``assert_fa_close``, FlashAttention's
``max|out - ref| <= 2 max|out_lowprec_ref - ref| + atol``, and ``check_against_reference``).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import blossomrec_cuda
from blossomrec_cuda import reference as ref
from helpers import (ATOL, STIS, assert_fa_close, check_against_reference, check_selection,
                     make_batch, padding_rows, reference_given_selection)
from helpers import sequences as per_sequence
from helpers import stis_hp as _hp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def gpu_batch(lengths, N, H, KVH, D, dtype, layout, s=4, seed=0):
    """``helpers.make_batch`` on the GPU, q, k, v strided views of one buffer, as the tests below
    take it: (dict of q, k, v, kc, gates in the row buffer, seq_start, seq_len)."""
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N, layout=layout, dtype=dtype, device=DEV,
                       compress_stride=s, fused_qkv=True, seed=seed)
    t = dict(q=batch.q, k=batch.k, v=batch.v, kc=batch.kc, gates=batch.gates)
    return t, batch.seq_start, batch.seq_len


def run_op(t, seq_start, seq_len, hp):
    """The selection and every forward output: (idx, cnt, out, o_sel, o_win, lse)."""
    idx, cnt = torch.ops.blossomrec.select_blocks(
        t["q"], t["kc"], seq_start, seq_len, hp["compress_stride"], hp["select_block"],
        hp["num_select"], hp["causal"], t["q"].shape[-1] ** -0.5)
    fwd = torch.ops.blossomrec.sparse_attention_fwd(
        t["q"], t["k"], t["v"], t["gates"], idx, cnt, seq_start, seq_len, hp["select_block"],
        hp["window"], hp["power_block"], hp["use_power"], hp["use_sink"], hp["causal"],
        t["q"].shape[-1] ** -0.5)
    return (idx, cnt, *fwd)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 16), (torch.float16, 64), (torch.float32, 16)])
def test_padding_invariance_and_zero_padding(dtype, D):
    """One set of sequences, right-padded, left-padded and packed: identical rows, forward and
    gradients (bitwise: each row's work does not depend on the layout); padding rows exactly 0.
    bfloat16 / float16 take the fused tensor-core kernels, float32 the row kernels."""
    lengths = [37, 0, 1, 64, 20]
    N, H, KVH = 64, 4, 2
    results = {}
    base, _, _ = gpu_batch(lengths, N, H, KVH, D, dtype, "right", s=4, seed=3)
    base_dout = torch.randn(len(lengths), N, H, D, device=DEV, dtype=dtype)
    for layout in ("right", "left", "packed"):
        t, seq_start, seq_len = gpu_batch(lengths, N, H, KVH, D, dtype, layout, s=4, seed=3)
        # Same sequence contents in every layout: copy them over from the right-padded batch.
        for b, bq, st, L in per_sequence(seq_start, seq_len, t["q"].shape[0]):
            for name in ("q", "k", "v", "gates"):
                t[name][bq, st:st + L] = base[name][b, :L]
        t["kc"] = base["kc"]
        t = {k_: v_.detach().requires_grad_(k_ in ("q", "k", "v", "gates")) for k_, v_ in t.items()}
        kwargs = dict(compress_stride=4, select_block=8, num_select=3)
        if layout == "packed":
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                              device=DEV)
            out = blossomrec_cuda.blossom_attention(t["q"][0], t["k"][0], t["v"][0], t["kc"],
                                                    t["gates"][0], cu_seqlens=cu, **kwargs)[None]
        else:
            out = blossomrec_cuda.blossom_attention(t["q"], t["k"], t["v"], t["kc"], t["gates"],
                                                    lengths=seq_len, padding_side=layout, **kwargs)
        # The same cotangent rows for each sequence in every layout; padding rows get noise, which
        # must not leak anywhere.
        dout = torch.randn(out.shape, device=DEV, dtype=dtype)
        for b, bq, st, L in per_sequence(seq_start, seq_len, out.shape[0]):
            dout[bq, st:st + L] = base_dout[b, :L]
        pad = padding_rows(seq_start, seq_len, out.shape[0], out.shape[1]).to(DEV)
        grads = torch.autograd.grad(out, [t[n] for n in ("q", "k", "v", "gates")], dout)
        assert (out.detach()[pad] == 0).all(), "padding rows of out must be exactly 0"
        for name, gr in zip(("q", "k", "v", "gates"), grads):
            assert not torch.isnan(gr).any(), f"NaN in d{name}"
            assert (gr[pad] == 0).all(), f"padding rows of d{name} must be 0"
        rows = {}
        for b, bq, st, L in per_sequence(seq_start, seq_len, out.shape[0]):
            rows[b] = [out.detach()[bq, st:st + L]] + [gr[bq, st:st + L] for gr in grads]
        results[layout] = rows
    for layout in ("left", "packed"):
        for b in range(len(lengths)):
            for x, y in zip(results["right"][b], results[layout][b]):
                assert torch.equal(x, y), f"{layout} differs from right padding for sequence {b}"


@pytest.mark.parametrize("select_block,layout", [(4, "right"), (16, "right"), (16, "packed")])
def test_backward_is_deterministic(select_block, layout):
    """Bitwise-identical repeated backward runs: the row kernels (b = 4: N = 300 is past the fused
    kernels' 64 selection blocks) and the fused kernels (b = 16), padded and packed."""
    lengths, N, H, KVH, D = [300, 250], 300, 8, 2, 16
    b = select_block
    hp = _hp(dict(compress_stride=4, select_block=b, num_select=4), STIS[0], True)
    t, seq_start, seq_len = gpu_batch(lengths, N, H, KVH, D, torch.bfloat16, layout, s=4)
    idx, cnt, out, o_sel, o_win, lse = run_op(t, seq_start, seq_len, hp)
    dout = torch.randn_like(out)
    runs = [torch.ops.blossomrec.sparse_attention_bwd(
        dout, t["q"], t["k"], t["v"], t["gates"], o_sel, o_win, lse, idx, cnt, seq_start, seq_len,
        b, 8, 1, True, False, True, D ** -0.5) for _ in range(3)]
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_), "two backward runs differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["all_same", "repeated", "none"])
def test_duplicate_and_empty_selections(mode, dtype):
    """Every query selects the same blocks (the normal case for a sparse backward, at its most
    extreme), a hand-made selection lists one block three times (attended once, as the reference's
    key set says), or nothing at all. bfloat16 takes the fused kernels, float32 the row kernels."""
    lengths, N, H, KVH, D = [128, 77], 128, 4, 2, 32
    hp = _hp(dict(compress_stride=4, select_block=8, num_select=3), STIS[0], True)
    t, seq_start, seq_len = gpu_batch(lengths, N, H, KVH, D, dtype, "right", s=4, seed=11)
    pos = torch.arange(N, device=DEV)
    idx = torch.full((2, N, KVH, 3), -1, dtype=torch.int32, device=DEV)
    cnt = torch.zeros((2, N, KVH), dtype=torch.int32, device=DEV)
    if mode == "all_same":
        for c, J in enumerate((0, 1, 2)):
            vis = (J + 1) * 8 <= pos  # causal visibility of block J
            idx[:, :, :, c] = torch.where(vis, J, -1)[None, :, None].to(torch.int32)
            cnt += vis[None, :, None].to(torch.int32)
        # compact: visible blocks come first because J grows with c
    elif mode == "repeated":
        vis = 8 <= pos  # block 0 is visible from row 8 on
        idx[:] = torch.where(vis, 0, -1)[None, :, None, None].to(torch.int32)
        cnt += 3 * vis[None, :, None].to(torch.int32)
    t = {k_: v_.detach().requires_grad_(k_ in ("q", "k", "v", "gates")) for k_, v_ in t.items()}
    t64 = {k_: v_.detach().double().requires_grad_(k_ in ("q", "k", "v", "gates"))
           for k_, v_ in t.items()}
    tlow = {k_: v_.detach().clone().requires_grad_(k_ in ("q", "k", "v", "gates"))
            for k_, v_ in t.items()}
    out = blossomrec_cuda.sparse_attention(t["q"], t["k"], t["v"], t["gates"], idx, cnt,
                                           lengths=seq_len, select_block=8)
    ref64 = reference_given_selection(t64, seq_start, seq_len, idx, cnt, hp)["out"]
    low = reference_given_selection(tlow, seq_start, seq_len, idx, cnt, hp, upcast=False)["out"]
    assert_fa_close(out.detach(), ref64.detach(), low.detach(), ATOL[dtype], "out")
    dout = torch.randn_like(out)
    names = ("q", "k", "v", "gates")
    grads = torch.autograd.grad(out, [t[n] for n in names], dout)
    g64 = torch.autograd.grad(ref64, [t64[n] for n in names], dout.double())
    glow = torch.autograd.grad(low, [tlow[n] for n in names], dout)
    for name, a, b_, c in zip(names, grads, g64, glow):
        assert_fa_close(a, b_, c, 4 * ATOL[dtype], "d" + name)


@pytest.mark.parametrize("N,D,n_rows", [(65536, 16, 200), (262144, 16, 60), (262144, 64, 60)])
def test_long_sequence_sampled_rows(N, D, n_rows):
    """One sequence of N tokens (B = 1; no N x N or N x N/s buffer anywhere) against the reference
    on sampled rows: the selection (away from near-ties), out, and, with dout zero outside the
    sampled rows, every gradient: dq and dgates of those rows, and all of dk and dv (exactly what
    the sampled rows send to the keys they see)."""
    H, KVH = 8, 2
    dtype = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(0)

    def leaf(*shape, rand=False):
        x = (torch.rand if rand else torch.randn)(1, *shape, device=DEV, dtype=dtype, generator=g)
        return x.requires_grad_()

    q, k, v = leaf(N, H, D), leaf(N, KVH, D), leaf(N, KVH, D)
    kc = torch.randn(1, N // 16, KVH, D, device=DEV, dtype=dtype, generator=g)
    gates = leaf(N, H, 2, rand=True)
    hp = dict(select_block=16, window=8, power_block=1, use_power=True, use_sink=False,
              causal=True)
    idx, cnt = torch.ops.blossomrec.select_blocks(q.detach(), kc,
                                                  torch.zeros(1, dtype=torch.int32, device=DEV),
                                                  torch.full((1,), N, dtype=torch.int32, device=DEV),
                                                  16, 16, 4, True, D ** -0.5)
    out = blossomrec_cuda.blossom_attention(q, k, v, kc, gates)
    gen = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.arange(0, 40), torch.randint(40, N, (n_rows - 41,), generator=gen),
                      torch.tensor([N - 1])]).unique().to(DEV)
    d64 = {n: x[0].detach().double().requires_grad_() for n, x in
           dict(q=q, k=k, v=v, gates=gates).items()}
    kcd = kc[0].double()
    ri, rc = ref.select_blocks(d64["q"].detach(), kcd, N, rows, compress_stride=16,
                               select_block=16, num_select=4)
    # Selection on the sampled rows (sets), where the reference has no near-tie at the cut.
    sc = ref.block_scores(d64["q"].detach()[rows], kcd, N, rows, 16, 16, D ** -0.5)
    vis = ref.block_visible(rows, sc.shape[-1], 16, True)
    srt = sc.masked_fill(~vis[None], float("-inf")).sort(dim=-1, descending=True).values
    fragile = (torch.isfinite(srt[..., 4]) & ((srt[..., 3] - srt[..., 4]).abs() < 1e-3)).permute(1, 0)
    same = (idx[0, rows].sort(-1).values == ri.sort(-1).values).all(-1) & (cnt[0, rows] == rc)
    assert bool((same | fragile).all()), "selection differs from the reference on sampled rows"
    sel = (idx[0, rows], cnt[0, rows])
    r64 = ref.blossom_attention_seq(d64["q"], d64["k"], d64["v"], kcd, d64["gates"], rows, sel=sel,
                                    **hp)
    low_leaves = {n: x[0] for n, x in dict(q=q, k=k, v=v, gates=gates).items()}
    rlow = ref.blossom_attention_seq(low_leaves["q"], low_leaves["k"], low_leaves["v"], kc[0],
                                     low_leaves["gates"], rows, sel=sel, upcast=False, **hp)
    assert_fa_close(out[0, rows], r64.out, rlow.out, ATOL[dtype], "out (sampled rows)")
    dout_rows = torch.randn(len(rows), H, D, generator=gen).to(DEV)
    dout = torch.zeros_like(out)
    dout[0, rows] = dout_rows.to(dtype)
    names = ("q", "k", "v", "gates")
    grads = torch.autograd.grad(out, [q, k, v, gates], dout)
    g64 = torch.autograd.grad(r64.out, [d64[n] for n in names], dout_rows.double())
    glow = torch.autograd.grad(rlow.out, [low_leaves[n] for n in names], dout_rows.to(dtype))
    for name, a, b_, c in zip(names, grads, g64, glow):
        a = a[0]
        if name in ("q", "gates"):  # only the sampled rows receive a gradient
            assert bool((a[~torch.isin(torch.arange(N, device=DEV), rows)] == 0).all()), name
            a, b_, c = a[rows], b_[rows], c[rows]
        assert_fa_close(a, b_, c, 4 * ATOL[dtype], f"d{name} (N = {N}, D = {D})")


def _small_inputs(dtype=torch.float32, packed=False):
    lengths = [12, 7]
    t, seq_start, seq_len = gpu_batch(lengths, 12, 4, 2, 16, dtype, "packed" if packed else "right",
                                       s=2, seed=2)
    return t, seq_start, seq_len


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    t, seq_start, seq_len = _small_inputs(packed=packed)
    q, k, v, kc, gates = (t[n] for n in ("q", "k", "v", "kc", "gates"))
    sel_args = (q, kc, seq_start, seq_len, 2, 4, 2, True, 0.25)
    torch.library.opcheck(torch.ops.blossomrec.select_blocks, sel_args)
    idx, cnt = torch.ops.blossomrec.select_blocks(*sel_args)
    fwd_args = (q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_(),
                v.detach().clone().requires_grad_(), gates.detach().clone().requires_grad_(),
                idx, cnt, seq_start, seq_len, 4, 3, 1, True, False, True, 0.25)
    torch.library.opcheck(torch.ops.blossomrec.sparse_attention_fwd, fwd_args)
    out, o_sel, o_win, lse = torch.ops.blossomrec.sparse_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, gates, o_sel.detach(), o_win.detach(), lse.detach(),
                idx, cnt, seq_start, seq_len, 4, 3, 1, True, False, True, 0.25)
    torch.library.opcheck(torch.ops.blossomrec.sparse_attention_bwd, bwd_args)


def test_torch_compile_fullgraph_and_cuda_graph():
    t, seq_start, seq_len = gpu_batch([40, 33], 40, 4, 2, 16, torch.bfloat16, "right", s=4, seed=4)
    lengths = seq_len.clone()

    def step(q, k, v, kc, gates):
        out = blossomrec_cuda.blossom_attention(q, k, v, kc, gates, lengths=lengths,
                                                compress_stride=4, select_block=8, num_select=2)
        return out.float().square().sum()

    leaves = [t[n].detach().clone().requires_grad_() for n in ("q", "k", "v")]
    gates = t["gates"].detach().clone().requires_grad_()
    loss = step(*leaves, t["kc"], gates)
    eager = torch.autograd.grad(loss, leaves + [gates])

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(*leaves, t["kc"], gates)
    comp = torch.autograd.grad(loss_c, leaves + [gates])
    for a, b_ in zip(eager, comp):
        assert torch.equal(a, b_), "torch.compile(fullgraph=True) changes the gradients"

    # CUDA graph: capture a whole forward + backward step, replay, compare with eager.
    static = [x.detach().clone().requires_grad_() for x in leaves + [gates]]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the capture
            for x in static:
                x.grad = None
            step(static[0], static[1], static[2], t["kc"], static[3]).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for x in static:
        x.grad = None
    with torch.cuda.graph(graph):
        step(static[0], static[1], static[2], t["kc"], static[3]).backward()
    new_vals = [torch.randn_like(x) for x in static]
    with torch.no_grad():
        for x, nv in zip(static, new_vals):
            x.copy_(nv)
    graph.replay()
    torch.cuda.synchronize()
    fresh = [nv.detach().clone().requires_grad_() for nv in new_vals]
    want = torch.autograd.grad(step(fresh[0], fresh[1], fresh[2], t["kc"], fresh[3]), fresh)
    for x, w in zip(static, want):
        assert torch.equal(x.grad, w), "CUDA-graph replay differs from eager"


def test_module_compiles_fullgraph_on_cuda():
    """torch.compile(fullgraph=True) on a module that calls the ops: same forward and gradients as
    eager, under bf16 autocast, with left padding given as a mask."""
    torch.manual_seed(0)
    module = blossomrec_cuda.BlossomAttention(64, heads=4, kv_heads=2, dim_head=16, compress_stride=4,
                                              compress_block_size=8, select_block=8,
                                              num_select=2).to(DEV)
    x = torch.randn(3, 40, 64, device=DEV)
    mask = torch.zeros(3, 40, dtype=torch.bool, device=DEV)
    for b, L in enumerate((40, 17, 1)):
        mask[b, 40 - L:] = True

    def run(fn):
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, attention_mask=mask)
        y.float().square().sum().backward()
        # The compiled wrapper shares the module's parameters: read the gradients there.
        return y.detach(), {n: p.grad.clone() for n, p in module.named_parameters()
                            if p.grad is not None}

    y_eager, g_eager = run(module)
    y_comp, g_comp = run(torch.compile(module, fullgraph=True))
    assert torch.allclose(y_eager.float(), y_comp.float(), atol=2e-2, rtol=2e-2)
    assert g_eager.keys() == g_comp.keys() and len(g_eager) > 0
    for name in g_eager:
        assert torch.allclose(g_eager[name], g_comp[name], atol=5e-2, rtol=5e-2), name


# --------------------------------------------------------------------------------------------------
# the staged path (short padded sequences in shared memory) against the gather path
# --------------------------------------------------------------------------------------------------
STAGED_CASES = [
    # lengths, N, H, KVH, D, dtype, hyper-parameters; comments: which kernels take the staged path
    # (the row kernels: float32, or float16 / bfloat16 past the fused kernels' 64 selection blocks)
    ([50, 9, 1, 0, 50], 50, 8, 2, 16, torch.float32,
     dict(compress_stride=16, select_block=16, num_select=4)),  # all three, small shared memory
    ([300, 133, 7], 300, 8, 2, 16, torch.bfloat16,
     dict(compress_stride=4, select_block=4, num_select=4)),  # dk/dv with > 48 KiB (opt-in)
    ([1000, 517], 1000, 8, 2, 16, torch.float16,
     dict(compress_stride=8, select_block=8, num_select=4)),  # fwd/dq 64 KiB; dk/dv gathers
    ([97, 40, 96], 97, 8, 1, 64, torch.float32,
     dict(compress_stride=4, select_block=8, num_select=5)),  # G = 8, float32, fwd/dq > 48 KiB
    ([33, 64], 64, 3, 3, 128, torch.float32,
     dict(compress_stride=2, select_block=6, num_select=20)),  # G = 1, D = 128, width 20
]


def _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout):
    D = t["q"].shape[-1]
    args = (hp["select_block"], hp["window"], hp["power_block"], hp["use_power"], hp["use_sink"],
            hp["causal"], D ** -0.5)
    fwd = torch.ops.blossomrec.sparse_attention_fwd(t["q"], t["k"], t["v"], t["gates"], idx, cnt,
                                                    seq_start, seq_len, *args)
    _, o_sel, o_win, lse = fwd
    bwd = torch.ops.blossomrec.sparse_attention_bwd(dout, t["q"], t["k"], t["v"], t["gates"], o_sel,
                                                    o_win, lse, idx, cnt, seq_start, seq_len, *args)
    return list(fwd) + list(bwd)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("case", range(len(STAGED_CASES)))
def test_staged_path_matches_gather_path_bitwise(case, layout, causal, monkeypatch):
    """Short padded sequences take kernels that stage the sequence in shared memory
    (csrc/cuda/sparse_attention.cuh); BLOSSOMREC_STAGED=0 forces the gather kernels. Both run the
    same per-row code in the same order, so every output and gradient must be bitwise equal (the
    reference comparison of test_forward_backward_matches_reference covers the staged path's
    values). The selection includes a block listed twice in some rows (hand-made input): both
    paths attend it once."""
    lengths, N, H, KVH, D, dtype, case_hp = STAGED_CASES[case]
    hp = _hp(case_hp, STIS[0], causal)
    t, seq_start, seq_len = gpu_batch(lengths, N, H, KVH, D, dtype, layout,
                                       s=hp["compress_stride"], seed=40 + case)
    idx, cnt = torch.ops.blossomrec.select_blocks(
        t["q"], t["kc"], seq_start, seq_len, hp["compress_stride"], hp["select_block"],
        hp["num_select"], causal, D ** -0.5)
    # Repeat the first selected block in the second slot of every third row that has one.
    idx = idx.clone()
    rows = torch.arange(N, device=DEV)[None, :, None].expand_as(cnt)
    dup = (cnt >= 2) & (rows % 3 == 0)
    idx[..., 1] = torch.where(dup, idx[..., 0], idx[..., 1])
    dout = torch.randn(t["q"].shape, device=DEV, dtype=dtype)
    monkeypatch.setenv("BLOSSOMREC_STAGED", "1")
    staged = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    monkeypatch.setenv("BLOSSOMREC_STAGED", "0")
    gather = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    names = ("out", "o_sel", "o_win", "lse", "dq", "dk", "dv", "dgates")
    for name, a, b_ in zip(names, staged, gather):
        assert not torch.isnan(a).any(), f"{name}: NaN on the staged path"
        assert torch.equal(a, b_), (f"{name}: staged and gather paths differ, max diff "
                                    f"{(a.double() - b_.double()).abs().max().item():.3e}")


# --------------------------------------------------------------------------------------------------
# the fused tensor-core kernels (csrc/cuda/fused_attention.cu): float16 / bfloat16 sequences of at most
# 1024 tokens and 64 selection blocks
# --------------------------------------------------------------------------------------------------
def cuda_kernel_counts(fn) -> dict:
    """Launches per name of the CUDA kernels that ``fn()`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {e.key: e.count for e in prof.key_averages()
              if e.device_type == torch.autograd.DeviceType.CUDA}
    if not counts and os.environ.get("BLOSSOMREC_UNDER_SANITIZER") == "1":
        # compute-sanitizer holds CUPTI: the profiler sees no kernel (device_run.sh sets the flag)
        pytest.skip("kernel launches cannot be profiled under compute-sanitizer")
    assert counts, "the profiler saw no CUDA kernel: CUPTI unavailable?"
    return counts


def cuda_kernel_names(fn) -> set:
    """Names of the CUDA kernels that ``fn()`` launches."""
    return set(cuda_kernel_counts(fn))


def _has(names, kernel):
    return any(kernel in n for n in names)


ROW_FWD = ("sparse_attention_fwd_kernel", "sparse_attention_fwd_staged_kernel")
ROW_DQ = ("bwd_dq_kernel", "bwd_dq_staged_kernel")
ROW_DKDV = ("bwd_dkdv_kernel", "bwd_dkdv_staged_kernel")
FUSED_FWD = ("fused_fwd_kernel",)
FUSED_BWD = ("fused_dq_kernel", "fused_dkdv_kernel")
LONG_DKDV = ("long_dkdv_kernel",)
LONG_FWD = ("long_fwd_kernel",)
LONG_DQ = ("long_dq_kernel",)
SEQ_BWD = ("fused_seq_bwd_kernel",)


# expect: which kernel families run, as nine letters: fused forward, fused backward (dq and dk/dv),
# row forward, row dq, row dk/dv, tensor-core dk/dv of the longer sequences, tensor-core forward
# and dq of the rows the fused kernels leave (D = 32, 64), the one-CTA backward of the sequences of
# at most 64 tokens at D <= 32 ("F" / "B" / "f" / "q" / "d" / "L" / "l" / "m" / "s" launched, "-"
# not; a padded batch launches the one-CTA backward wherever N may hold short sequences, and the dq
# and dk/dv kernels wherever it may hold longer ones: the host does not read the lengths).
@pytest.mark.parametrize("dtype,D,layout,lengths,N,select_block,expect,seq_bwd", [
    (torch.bfloat16, 16, "right", [200, 37], 200, 16, "FB------s", None),
    (torch.bfloat16, 16, "right", [256, 37], 256, 16, "FB------s", None),
    # every sequence within 64 tokens: the one-CTA backward only (and the dq and dk/dv kernels
    # where it is switched off)
    (torch.bfloat16, 16, "right", [50, 9, 0], 50, 16, "F-------s", None),
    (torch.float16, 32, "left", [64, 17, 1], 64, 16, "F-------s", None),
    (torch.float16, 64, "left", [64, 17, 1], 64, 16, "FB-------", None),  # D = 64: off unless forced
    (torch.float16, 64, "left", [64, 17, 1], 64, 16, "F-------s", "1"),
    # packed: the dq and dk/dv kernels launch too (the host does not know the longest sequence;
    # their units count none), the row kernels zero the padding rows
    (torch.bfloat16, 16, "packed", [50, 9, 64], None, 16, "FBfqd---s", None),
    (torch.bfloat16, 16, "right", [50, 9, 0], 50, 16, "FB-------", "0"),
    # D = 16 past 256 tokens: the fused forward too (the row forward took it until v31)
    (torch.bfloat16, 16, "right", [257], 257, 16, "FB------s", None),
    # D = 16 forward and backward over two K/V segments (672 and 336 keys), left padding
    (torch.bfloat16, 16, "left", [1000, 700], 1000, 16, "FB------s", None),
    (torch.bfloat16, 16, "right", [1025], 1025, 16, "--fq-L---", None),   # past 1024 tokens
    (torch.float16, 32, "left", [1024, 1], 1024, 16, "FB------s", None),
    (torch.float16, 32, "right", [1100, 7], 1100, 16, "-----Llm-", None),  # past 1024 tokens
    (torch.bfloat16, 64, "right", [1025], 1025, 16, "-----Llm-", None),   # past 1024 tokens
    (torch.bfloat16, 64, "right", [300], 300, 4, "-----Llm-", None),      # past 64 blocks
    (torch.bfloat16, 128, "right", [1025], 1025, 16, "--fq-L---", None),  # D = 128: row kernels
    (torch.float32, 16, "right", [200, 37], 200, 16, "--fqd----", None),  # float32: row kernels
    (torch.bfloat16, 16, "packed", [50, 200, 9], None, 16, "FBfqd---s", None),  # rows: padding
    (torch.bfloat16, 16, "packed", [50, 300, 9], None, 16, "FBfqd---s", None),  # 300 fwd, padding
    (torch.bfloat16, 64, "packed", [1100, 50, 300], None, 16, "FB---Llm-", None),  # rows: the long
    (torch.bfloat16, 64, "packed", [1100, 50, 300], None, 16, "FB---Llms", "1"),
])
def test_fused_path_is_taken(dtype, D, layout, lengths, N, select_block, expect, seq_bwd,
                             monkeypatch):
    """Dispatch: each kernel family runs exactly where claimed (a fallback to the row kernels, or
    the fused kernels running where they cannot, fails here), forward and backward separately;
    results are the reference's (the packed buffers mix the kernel families). seq_bwd: the
    BLOSSOMREC_SEQ_BWD switch ("0": the one-CTA backward off)."""
    if seq_bwd is not None:
        monkeypatch.setenv("BLOSSOMREC_SEQ_BWD", seq_bwd)
    N = N or max(lengths)
    H, KVH = 8, 2
    hp = _hp(dict(compress_stride=4, select_block=select_block, num_select=4), STIS[0], True)
    t, seq_start, seq_len = gpu_batch(lengths, N, H, KVH, D, dtype, layout, s=4, seed=21)
    idx, cnt = torch.ops.blossomrec.select_blocks(t["q"], t["kc"], seq_start, seq_len, 4,
                                                  select_block, 4, True, D ** -0.5)
    args = (select_block, 8, 1, True, False, True, D ** -0.5)
    dout = torch.randn(t["q"].shape, device=DEV, dtype=dtype)
    saved = {}

    def fwd():
        saved["o"] = torch.ops.blossomrec.sparse_attention_fwd(
            t["q"], t["k"], t["v"], t["gates"], idx, cnt, seq_start, seq_len, *args)

    def bwd():
        o = saved["o"]
        torch.ops.blossomrec.sparse_attention_bwd(dout, t["q"], t["k"], t["v"], t["gates"], o[1],
                                                  o[2], o[3], idx, cnt, seq_start, seq_len, *args)

    fwd_names = cuda_kernel_names(fwd)
    bwd_names = cuda_kernel_names(bwd)
    checks = (("fused forward", fwd_names, FUSED_FWD, expect[0]),
              ("fused backward", bwd_names, FUSED_BWD, expect[1]),
              ("row forward", fwd_names, ROW_FWD, expect[2]),
              ("row dq", bwd_names, ROW_DQ, expect[3]),
              ("row dk/dv", bwd_names, ROW_DKDV, expect[4]),
              ("fused long dk/dv", bwd_names, LONG_DKDV, expect[5]),
              ("long forward", fwd_names, LONG_FWD, expect[6]),
              ("long dq", bwd_names, LONG_DQ, expect[7]),
              ("fused one-CTA backward", bwd_names, SEQ_BWD, expect[8]))
    for what, names, kernels, letter in checks:
        want = letter != "-"
        if what.startswith("fused"):  # every kernel of the pass
            for k_ in kernels:
                assert _has(names, k_) == want, f"{what}: {k_} {'missing' if want else 'ran'}: {names}"
        else:  # one of the family (staged or gather twins)
            got = any(_has(names, k_) for k_ in kernels)
            assert got == want, f"{what}: expected {'a' if want else 'no'} launch in {names}"
    check_against_reference(lengths, N, H, KVH, D, hp, layout, dtype, device=DEV, seed=21)


# Sequence lengths around every tile, block and limit edge, each with its own choice of group size,
# head dim, block size, window, power block, selection width and dtype, so that every value of each
# appears several times without the full product.
FUSED_N = [1, 15, 17, 47, 48, 49, 97, 255, 256, 257, 1023, 1024]
FUSED_G = [1, 2, 4, 8, 3, 5, 6, 4]
FUSED_D = [16, 32, 64, 128]
FUSED_HP = [  # compress stride, select block, num_select, window, power block, use_power
    (16, 16, 4, 8, 1, True), (4, 8, 3, 1, 2, True), (8, 32, 2, 17, 1, True),
    (2, 16, 8, 3, 1, False), (16, 16, 1, 40, 3, True), (4, 16, 16, 8, 1, True),
    (16, 16, 0, 8, 1, True),
]
FUSED_LAYOUTS = ["right", "left", "packed"]
FUSED_GRID = [(x, causal) for x in range(len(FUSED_N)) for causal in (True, False)]


@pytest.mark.parametrize("x,causal", FUSED_GRID)
def test_fused_matches_reference(x, causal):
    N = FUSED_N[x]
    G, D = FUSED_G[x % len(FUSED_G)], FUSED_D[x % len(FUSED_D)]
    s, b, n, w, p, power = FUSED_HP[x % len(FUSED_HP)]
    if N > 65 * b - 1:
        b, s = 16, 16  # the fused kernels' 64 selection blocks
    KVH = 2 if G <= 4 else 1
    H = G * KVH
    dtype = torch.bfloat16 if x % 2 == 0 else torch.float16
    layout = FUSED_LAYOUTS[x % 3]
    lengths = [N, max(N // 3, 1), 0] if layout != "left" else [N, 1]
    hp = dict(compress_stride=s, select_block=b, num_select=n, window=w, power_block=p,
              use_power=power, use_sink=not causal, causal=causal)
    check_against_reference(lengths, N, H, KVH, D, hp, layout, dtype, device=DEV, seed=200 + x)


# The one-CTA backward forced at every head dim (BLOSSOMREC_SEQ_BWD=1; by default it runs at
# D <= 32, which test_fused_matches_reference covers): sequences of 1 .. 64 tokens around the tile
# edges, next to a longer one that the dq and dk/dv kernels take, every group size, the sink,
# power blocks, and the shared-memory fallback (G = 8 at D = 128 does not fit: the dq and dk/dv
# kernels then take everything).
SEQ_CASES = [  # lengths, N (None: packed), G, D, causal, (s, b, n, w, p, power)
    ([64, 1, 17], 64, 4, 64, True, (16, 16, 4, 8, 1, True)),
    ([48, 49, 0], 49, 2, 128, False, (4, 8, 3, 1, 2, True)),
    ([15, 64, 33, 200], None, 8, 32, True, (8, 16, 2, 17, 3, True)),
    ([47, 16, 100], 100, 1, 64, False, (2, 16, 8, 3, 1, False)),
    ([64, 30], 64, 8, 128, True, (16, 16, 1, 40, 1, True)),
    ([31, 2], None, 3, 16, False, (4, 16, 16, 8, 2, True)),
]


@pytest.mark.parametrize("x", range(len(SEQ_CASES)))
def test_seq_bwd_forced_matches_reference(x, monkeypatch):
    monkeypatch.setenv("BLOSSOMREC_SEQ_BWD", "1")
    lengths, N, G, D, causal, (s, b, n, w, p, power) = SEQ_CASES[x]
    KVH = 2 if G <= 4 else 1
    hp = dict(compress_stride=s, select_block=b, num_select=n, window=w, power_block=p,
              use_power=power, use_sink=not causal, causal=causal)
    layout = "packed" if N is None else ("right" if x % 2 == 0 else "left")
    dtype = torch.bfloat16 if x % 2 == 0 else torch.float16
    check_against_reference(lengths, N or max(lengths), G * KVH, KVH, D, hp, layout, dtype,
                            device=DEV, seed=400 + x)


# The forward's query tiles per warp (BLOSSOMREC_FWD_REPS; by default two up to 256 tokens where
# a sequence has more tiles than one CTA's warps take, fused_attention.cu fwd_reps): each (query
# tile, head) is computed the same way whichever warp takes it, so one and two give the same bits,
# also where two is forced past one shared-memory segment (D = 64, G = 1 at 1000 tokens: the first
# segment is staged again for the second tile). The reference checks the forced two as well.
FWD_REPS_CASES = [  # lengths, N, G, D, causal, layout
    ([50, 17, 1, 0], 50, 4, 16, True, "right"),
    ([200, 64, 33], 200, 2, 32, False, "packed"),
    ([255, 97], 255, 1, 64, True, "left"),
    ([1000, 300], 1000, 1, 64, True, "right"),
    ([49, 48], 49, 8, 128, False, "right"),
]


@pytest.mark.parametrize("x", range(len(FWD_REPS_CASES)))
def test_fwd_reps_bitwise_equal(x, monkeypatch):
    lengths, N, G, D, causal, layout = FWD_REPS_CASES[x]
    KVH = 2 if G <= 4 else 1
    hp = dict(compress_stride=4, select_block=16, num_select=4, window=8, power_block=1,
              use_power=True, use_sink=not causal, causal=causal)
    dtype = torch.bfloat16 if x % 2 == 0 else torch.float16
    t, seq_start, seq_len = gpu_batch(lengths, N, G * KVH, KVH, D, dtype, layout, s=4, seed=500 + x)
    got = {}
    for reps in ("1", "2"):
        monkeypatch.setenv("BLOSSOMREC_FWD_REPS", reps)
        got[reps] = run_op(t, seq_start, seq_len, hp)
    for name, a, b in zip(("idx", "cnt", "out", "o_sel", "o_win", "lse"), got["1"], got["2"]):
        assert torch.equal(a, b), f"{name} differs between one and two query tiles per warp"
    check_against_reference(lengths, N, G * KVH, KVH, D, hp, layout, dtype, device=DEV,
                            seed=500 + x)


# The fused backward's kv groups per launch (BLOSSOMREC_BWD_GROUPS; by default one at a time where
# each launch still fills the GPU, fused_attention.cu bwd_groups_per_launch): each (tile, head) is
# computed the same way in any chunk, so every chunking gives the same bits, uneven ones (3 of 4
# groups, then 1) too; the one-CTA backward's short sequences run in each chunk beside the long
# ones; packed buffers too where the fused kernels take every sequence (the row kernels then only
# zero padding rows, without aux). Where the row kernels also take sequences (one past 1024
# tokens) the caller's aux covers every head and the fused kernels take all groups in one launch.
BWD_GROUPS_CASES = [  # lengths, N (None: packed), G, KVH, D, causal, layout, launches by groups
    ([200, 64, 33, 0], 200, 2, 4, 16, True, "right", {"1": 4, "3": 2, "4": 1}),
    ([130, 1], 130, 1, 4, 32, False, "left", {"1": 4, "2": 2}),
    ([300, 100, 17], None, 4, 2, 64, True, "packed", {"1": 2, "2": 1}),
    ([1024, 5], 1024, 1, 4, 16, False, "right", {"1": 4, "3": 2}),
    ([1100, 50, 300], None, 2, 4, 64, True, "packed", {"1": 1, "4": 1}),
]


@pytest.mark.parametrize("x", range(len(BWD_GROUPS_CASES)))
def test_bwd_groups_per_launch_bitwise_equal(x, monkeypatch):
    lengths, N, G, KVH, D, causal, layout, launches = BWD_GROUPS_CASES[x]
    hp = dict(compress_stride=4, select_block=16, num_select=4, window=8, power_block=1,
              use_power=True, use_sink=not causal, causal=causal)
    dtype = torch.bfloat16 if x % 2 == 0 else torch.float16
    t, seq_start, seq_len = gpu_batch(lengths, N, G * KVH, KVH, D, dtype, layout, s=4, seed=540 + x)
    idx, cnt = torch.ops.blossomrec.select_blocks(
        t["q"], t["kc"], seq_start, seq_len, 4, 16, 4, causal, D ** -0.5)
    dout = torch.randn(t["q"].shape, device=DEV, dtype=dtype)
    names = ("out", "o_sel", "o_win", "lse", "dq", "dk", "dv", "dgates")
    monkeypatch.delenv("BLOSSOMREC_BWD_GROUPS", raising=False)
    want = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    for groups, n_launch in launches.items():
        monkeypatch.setenv("BLOSSOMREC_BWD_GROUPS", groups)
        got = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
        for name, a, b_ in zip(names, got, want):
            assert torch.equal(a, b_), f"{name}: {groups} groups per launch differ from the default"
    monkeypatch.setenv("BLOSSOMREC_BWD_GROUPS", "1")
    check_against_reference(lengths, N or max(lengths), G * KVH, KVH, D, hp, layout, dtype,
                            device=DEV, seed=540 + x)
    # last: the launch counts need the profiler (skipped under compute-sanitizer)
    for groups, n_launch in launches.items():
        monkeypatch.setenv("BLOSSOMREC_BWD_GROUPS", groups)
        counts = cuda_kernel_counts(lambda: _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout))
        ran = sum(c for name, c in counts.items() if "fused_dkdv_kernel" in name)
        assert ran == n_launch, f"{groups} groups per launch: {ran} dk/dv launches, not {n_launch}"


# The fused backward at D = 64 at the group sizes the fused grid leaves out there: G = 1 (M tiles
# of 16 positions), 3 (5 positions x 3 heads: M tiles straddle 16-position query tiles, one row
# idle), 8 (2 positions x 8 heads); padded both ways and packed, both dtypes, up to 1024 tokens
# (v30, docs/PERF_NOTES.md, ran its warp-pair dk/dv kernel through these). The backward is bitwise
# the same twice (no atomics), and the fused dk/dv kernel ran.
D64_GROUP_CASES = [  # lengths, N (None: packed), G, causal, layout
    ([200, 37, 0], 200, 1, True, "right"),
    ([130, 16, 1], 130, 8, False, "left"),
    ([64, 250, 5], None, 3, True, "packed"),
    ([1024, 500], 1024, 8, True, "right"),
]


@pytest.mark.parametrize("x", range(len(D64_GROUP_CASES)))
def test_fused_d64_group_sizes_match_reference(x):
    lengths, N, G, causal, layout = D64_GROUP_CASES[x]
    KVH = 2 if G <= 4 else 1
    D = 64
    hp = dict(compress_stride=4, select_block=16, num_select=4, window=8, power_block=1,
              use_power=True, use_sink=not causal, causal=causal)
    dtype = torch.bfloat16 if x % 2 == 0 else torch.float16
    check_against_reference(lengths, N or max(lengths), G * KVH, KVH, D, hp, layout, dtype,
                            device=DEV, seed=560 + x)
    t, seq_start, seq_len = gpu_batch(lengths, N, G * KVH, KVH, D, dtype, layout, s=4, seed=560 + x)
    idx, cnt = torch.ops.blossomrec.select_blocks(
        t["q"], t["kc"], seq_start, seq_len, 4, 16, 4, causal, D ** -0.5)
    dout = torch.randn(t["q"].shape, device=DEV, dtype=dtype)
    first = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    again = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    for name, a, b_ in zip(("out", "o_sel", "o_win", "lse", "dq", "dk", "dv", "dgates"), first, again):
        assert torch.equal(a, b_), f"{name} differs between two identical calls"
    counts = cuda_kernel_counts(lambda: _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout))
    assert any("fused_dkdv_kernel" in name for name in counts), f"no fused dk/dv launch: {counts}"


# Sharp softmaxes (eight times the default scale): later key tiles raise the rows' running maxima
# by many units, so the online softmax's rescale of l and of the accumulators carries most of the
# result (a slack before rescaling, tried in v27, docs/PERF_NOTES.md, would be checked here), over
# one and over two K/V segments (D = 32, 700 tokens), and the one-CTA and the dq / dk/dv backward
# follow.
SHARP_CASES = [  # lengths, N (None: packed), G, D, causal, layout
    ([50, 33, 1], 50, 4, 16, True, "right"),
    ([200, 120], 200, 4, 64, False, "left"),
    ([700, 64, 9], None, 2, 32, True, "packed"),
]


@pytest.mark.parametrize("x", range(len(SHARP_CASES)))
def test_fused_sharp_softmax_matches_reference(x):
    lengths, N, G, D, causal, layout = SHARP_CASES[x]
    KVH = 2
    hp = dict(compress_stride=16, select_block=16, num_select=4, window=8, power_block=1,
              use_power=True, use_sink=not causal, causal=causal)
    check_against_reference(lengths, N or max(lengths), G * KVH, KVH, D, hp, layout,
                            torch.bfloat16, device=DEV, seed=520 + x, scale=8 * D ** -0.5)


@pytest.mark.parametrize("G,lengths,layout", [(1, [1023, 341], "right"),
                                            (2, [700, 233, 1], "packed")])
def test_fused_backward_d16_past_one_segment(G, lengths, layout):
    """D = 16 past 256 tokens: the fused forward and dq walk two K/V segments (672 keys each at
    most), at group sizes 1 and 2 (more rows per CTA)."""
    hp = _hp(dict(compress_stride=16, select_block=16, num_select=4), STIS[0], True)
    KVH = 2
    check_against_reference(lengths, max(lengths), G * KVH, KVH, 16, hp, layout, torch.bfloat16,
                            device=DEV, seed=300 + G)


def test_fused_hand_made_selection_matches_reference():
    """A hand-made selection on the fused kernels: blocks listed two or three times in a row are
    attended once, as the reference's key set says."""
    def edit(idx, cnt):
        idx, cnt = idx.clone(), cnt.clone()
        rows = torch.arange(idx.shape[1], device=DEV)[None, :, None].expand_as(cnt)
        idx[..., 1] = torch.where((cnt >= 2) & (rows % 3 == 0), idx[..., 0], idx[..., 1])
        idx[..., 2] = torch.where((cnt >= 3) & (rows % 5 == 1), idx[..., 0], idx[..., 2])
        return idx, cnt

    hp = _hp(dict(compress_stride=4, select_block=8, num_select=4), STIS[0], True)
    check_against_reference([300, 120], 300, 8, 2, 16, hp, "right", torch.bfloat16, device=DEV,
                            seed=7, sel_fn=edit)


# The tensor-core dk/dv of the sequences the fused kernels do not take (fused_attention.cu,
# long_dkdv_kernel): lengths past 1024 (and 300 tokens past 64 selection blocks), every group size
# family, head dim, select block dividing 16, equal to it, above it and not dividing it (6), window,
# power block, no powers, no selection; causal and non-causal with the sink; the three layouts.
LONG_CASES = [  # N, G, D, (compress stride, select block, num_select, window, power block, powers)
    (1025, 4, 16, (16, 16, 4, 8, 1, True)),
    (1041, 2, 32, (4, 8, 3, 1, 2, True)),
    (1100, 1, 64, (8, 32, 2, 17, 1, True)),
    (1300, 8, 16, (2, 6, 3, 3, 1, False)),
    (1500, 3, 128, (16, 16, 1, 40, 3, True)),
    (2047, 4, 16, (4, 4, 8, 8, 1, True)),
    (300, 4, 64, (4, 4, 4, 8, 1, True)),
    (1100, 5, 32, (16, 16, 0, 8, 1, True)),
    (1030, 8, 64, (16, 16, 4, 8, 1, True)),
    (1200, 6, 32, (8, 16, 3, 5, 2, True)),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("x", range(len(LONG_CASES)))
def test_long_dkdv_matches_reference(x, causal):
    N, G, D, (s, b, n, w, p, power) = LONG_CASES[x]
    KVH = 2 if G <= 4 else 1
    dtype = torch.bfloat16 if x % 2 == 0 else torch.float16
    layout = FUSED_LAYOUTS[x % 3]
    lengths = [N, max(N // 3, 1), 0] if layout != "left" else [N, 1]
    hp = dict(compress_stride=s, select_block=b, num_select=n, window=w, power_block=p,
              use_power=power, use_sink=not causal, causal=causal)
    check_against_reference(lengths, N, G * KVH, KVH, D, hp, layout, dtype, device=DEV,
                            seed=400 + x)


@pytest.mark.parametrize("x", [0, 3, 5])
def test_long_rows_forced_at_d16_match_reference(x, monkeypatch):
    """BLOSSOMREC_LONG_FWD=1 / BLOSSOMREC_LONG_DQ=1 run the tensor-core forward and dq of long
    sequences at D = 16 too (a benchmark switch; the row kernels are the default there): the
    D = 16 cases of LONG_CASES, causal and not, against the reference."""
    monkeypatch.setenv("BLOSSOMREC_LONG_FWD", "1")
    monkeypatch.setenv("BLOSSOMREC_LONG_DQ", "1")
    N, G, D, (s, b, n, w, p, power) = LONG_CASES[x]
    assert D == 16
    for causal in (True, False):
        hp = dict(compress_stride=s, select_block=b, num_select=n, window=w, power_block=p,
                  use_power=power, use_sink=not causal, causal=causal)
        check_against_reference([N, N // 2 + 1], N, G * (2 if G <= 4 else 1), 2 if G <= 4 else 1,
                                D, hp, "right", torch.bfloat16, device=DEV, seed=450 + x)


@pytest.mark.parametrize("D", [16, 64])
def test_long_dkdv_skewed_lists_deterministic(D):
    """Every query selects the same four blocks: their lists hold ~N rows each (hundreds of
    16-row tiles for one warp), a block listed twice in some rows is attended once; results are
    the reference's and the backward is bitwise deterministic."""
    N, H, KVH = 3000, 8, 2

    def edit(idx, cnt):  # one right-padded sequence: buffer row = position
        pos = torch.arange(idx.shape[1], device=idx.device)[None, :, None]
        cnt = torch.clamp(pos // 16, max=4).expand_as(cnt).to(cnt.dtype)  # the visible of 0..3
        slot = torch.arange(idx.shape[-1], device=idx.device)
        idx = torch.where(slot < cnt[..., None], slot.to(idx.dtype), -1)
        dup = (pos[..., None] % 7 == 0) & (cnt[..., None] >= 2) & (slot == 1)
        return torch.where(dup, 0, idx).to(torch.int32), cnt  # block 0 twice in every 7th row

    hp = _hp(dict(compress_stride=16, select_block=16, num_select=4), STIS[0], True)
    check_against_reference([N], N, H, KVH, D, hp, "right", torch.bfloat16, device=DEV, seed=9,
                            sel_fn=edit)
    t, seq_start, seq_len = gpu_batch([N], N, H, KVH, D, torch.bfloat16, "right", s=16, seed=9)
    idx, cnt = torch.ops.blossomrec.select_blocks(t["q"], t["kc"], seq_start, seq_len, 16, 16, 4,
                                                  True, D ** -0.5)
    idx, cnt = edit(idx, cnt)
    dout = torch.randn(t["q"].shape, device=DEV, dtype=torch.bfloat16)
    first = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    second = _fwd_bwd(t, idx, cnt, seq_start, seq_len, hp, dout)
    for name, a, b_ in zip(("out", "o_sel", "o_win", "lse", "dq", "dk", "dv", "dgates"), first,
                           second):
        assert torch.equal(a, b_), f"{name}: two runs differ"


def _odd_view(x):
    """x's values in a view at an odd element offset (a contiguous tensor whose data pointer is not
    16-byte aligned: what ``torch.rand(1 + n)[1:].view(...)`` gives a new user)."""
    buf = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    return view


@pytest.mark.parametrize("gate_kind", ["float32-odd", "q-dtype-odd", "q-dtype-strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_misaligned_inputs_are_copied(dtype, gate_kind):
    """The kernels use 8- and 16-byte accesses: views at an odd element offset (and row strides
    that are not multiples of 16 bytes) are copied to an aligned buffer first, never read
    misaligned, for every input of the three ops (q, k, v, kc, gates; dout, o_sel, o_win, lse in
    the backward). Same results as on aligned copies. bfloat16: the fused kernels; float32: the row
    kernels. The gates: float32 or q's dtype at an odd offset, or a strided view of q's dtype (the
    kernels read 16-bit gates in place only when contiguous and 4-byte aligned, else a float32
    copy, while dgates is written in the gates' dtype either way)."""
    N, H, KVH, D = 40, 2, 1, 16
    g = torch.Generator(device="cpu").manual_seed(9)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEV, dtype)  # noqa: E731
    q = rnd(1, N, H * D + 1)[..., 1:].view(1, N, H, D)
    k = rnd(1, N, KVH * D + 3)[..., 3:].view(1, N, KVH, D)
    v = rnd(1, N, KVH * D + 1)[..., 1:].view(1, N, KVH, D)
    kc = _odd_view(rnd(1, N // 4, KVH, D))
    gates_values = torch.rand(1, N, H, 2, generator=g)
    if gate_kind == "float32-odd":
        gates32 = _odd_view(gates_values.to(DEV))
    elif gate_kind == "q-dtype-odd":
        gates32 = _odd_view(gates_values.to(DEV, dtype))
    else:
        wide = torch.rand(1, N, H + 1, 2, generator=g).to(DEV, dtype)
        wide[:, :, :H] = gates_values.to(DEV, dtype)
        gates32 = wide[:, :, :H]
        assert not gates32.is_contiguous()
    st = torch.zeros(1, dtype=torch.int32, device=DEV)
    ln = torch.full((1,), N, dtype=torch.int32, device=DEV)
    args = (8, 8, 1, True, False, True, D ** -0.5)

    def run(q_, k_, v_, kc_, gates_, odd_saved):
        idx, cnt = torch.ops.blossomrec.select_blocks(q_, kc_, st, ln, 4, 8, 2, True, D ** -0.5)
        fwd = torch.ops.blossomrec.sparse_attention_fwd(q_, k_, v_, gates_, idx, cnt, st, ln, *args)
        dout = torch.ones_like(fwd[0]).mul_(0.5)
        saved = [dout, fwd[1], fwd[2], fwd[3]]
        if odd_saved:
            saved = [_odd_view(x) for x in saved]
        bwd = torch.ops.blossomrec.sparse_attention_bwd(saved[0], q_, k_, v_, gates_, saved[1],
                                                        saved[2], saved[3], idx, cnt, st, ln, *args)
        return [idx, cnt] + list(fwd) + list(bwd)

    assert q.data_ptr() % 16 != 0 and k.data_ptr() % 16 != 0
    odd = run(q, k, v, kc, gates32, True)
    torch.cuda.synchronize()  # a misaligned access would surface here as a CUDA error
    aligned = run(q.clone(), k.clone(), v.clone(), kc.clone(), gates32.contiguous().clone(), False)
    assert odd[-1].dtype == gates32.dtype and odd[-1].is_contiguous()  # dgates
    for a, b_ in zip(odd, aligned):
        assert torch.equal(a, b_), "a misaligned view gives a different result from its copy"


# --------------------------------------------------------------------------------------------------
# selection on sequences of several 128-row CTAs (the shared-memory tiles, causal CTAs issued last to
# first) against the reference
# --------------------------------------------------------------------------------------------------
SELECT_LONG = [
    # lengths, N, H, KVH, D, hyper-parameters
    ([700, 300, 129], 700, 4, 2, 16, dict(compress_stride=4, select_block=8, num_select=4)),
    ([1000], 1000, 8, 2, 32, dict(compress_stride=16, select_block=16, num_select=16)),
    ([520, 260], 520, 6, 3, 64, dict(compress_stride=2, select_block=4, num_select=64)),
    ([300], 300, 2, 1, 128, dict(compress_stride=4, select_block=4, num_select=3)),
    ([333, 12, 257], 333, 2, 2, 16, dict(compress_stride=2, select_block=6, num_select=1)),
    ([400], 400, 4, 2, 16, dict(compress_stride=4, select_block=8, num_select=0)),  # no selection
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["right", "packed"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", range(len(SELECT_LONG)))
def test_selection_long_sequences_matches_reference(case, causal, layout, dtype):
    """float32 (and D < 64) scores on FFMA, float16 / bfloat16 at D >= 64 on tensor cores (hi/lo
    bfloat16 splits, csrc/cuda/select_blocks.cu): both equal the reference away from near-ties,
    m = b / s of 1-3, D = 16-128, warps whose rows span several packed sequences."""
    lengths, N, H, KVH, D, hp = SELECT_LONG[case]
    hp = dict(hp, causal=causal)
    t, seq_start, seq_len = gpu_batch(lengths, N, H, KVH, D, dtype, layout,
                                       s=hp["compress_stride"], seed=100 + case)
    t64 = {k_: v_.detach().double() for k_, v_ in t.items()}
    idx, cnt = torch.ops.blossomrec.select_blocks(
        t["q"], t["kc"], seq_start, seq_len, hp["compress_stride"], hp["select_block"],
        hp["num_select"], causal, D ** -0.5)
    fragile = check_selection(idx, cnt, t64, seq_start, seq_len, hp)
    rows = int(seq_len.sum()) * KVH
    assert fragile < rows // 20, f"{fragile} of {rows} rows near a tie: the check says little"
    if hp["num_select"] == 0:
        assert int(cnt.abs().sum()) == 0 and bool((idx == -1).all())
    else:
        assert int(cnt.sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 64])
def test_selection_ties_take_the_lower_blocks(D, dtype):
    """All block-mean keys equal: every visible block has the same score, and the n lowest visible
    blocks must win (SPEC 1b), in the FFMA kernel's shared-memory tiles (one sequence of several
    CTAs) and in the tensor-core kernel's block tiles (equal columns, equal scores)."""
    L, H, KVH, n = 600, 4, 2, 5
    g = torch.Generator(device="cpu").manual_seed(5)
    q = torch.randn(1, L, H, D, generator=g).to(DEV, dtype)
    kc = torch.randn(1, 1, KVH, D, generator=g).expand(1, L // 4, KVH, D).contiguous().to(DEV, dtype)
    st = torch.zeros(1, dtype=torch.int32, device=DEV)
    ln = torch.full((1,), L, dtype=torch.int32, device=DEV)
    for causal in (True, False):
        idx, cnt = torch.ops.blossomrec.select_blocks(q, kc, st, ln, 4, 8, n, causal, D ** -0.5)
        ri, rc = ref.select_blocks(q[0].double().cpu(), kc[0].double().cpu(), L, compress_stride=4,
                                   select_block=8, num_select=n, causal=causal)
        assert torch.equal(cnt[0].cpu(), rc)
        assert torch.equal(idx[0].cpu().sort(-1).values, ri.sort(-1).values), causal


# --------------------------------------------------------------------------------------------------
# selection: the P > 1e-10 cut and the -1000 entry of SPEC 1b, with rows that the cut decides mixed
# with rows it leaves alone in every warp and CTA
# --------------------------------------------------------------------------------------------------
CUT_CASES = [
    # lengths, N (None: packed), H, KVH, compress stride, select block, num_select
    ([3000], 3000, 2, 1, 16, 16, 8),  # one long sequence, m = 1: 187 blocks, many score tiles
    ([1600, 0, 700], 1600, 2, 2, 8, 16, 4),  # right-padded, m = 2, G = 1
    ([700, 33, 300, 129, 1, 450, 64, 17, 0, 260], None, 6, 2, 4, 8, 8),  # packed, G = 3
    ([520, 3, 260], None, 2, 1, 2, 4, 64),  # packed, n = 64
]
# Row kinds: the offset of a row's scores (nats) and the half range of a per-row shift around it.
# Far above the -1000 entry (the cut is relative to the row's best block), just around it, and
# below it (the -1000 entry dominates the softmax: a block is kept iff its score > -1023.03).
CUT_KINDS = [(0.0, 16.0), (-1000.0, 6.0), (-1020.0, 10.0)]
CUT_BIG_Q = 0.8125  # 13/16: 13/16 * scale * log2(e) splits exactly into two bfloat16s at D = 64


def _cut_batch(lengths, N, H, KVH, D, s, b, n, dtype, seed):
    """Inputs (on the CPU) whose block scores put the cut among a row's top n blocks.

    score[i, J] = lam_i a_J + u_i b_J + c_i (+ about -1024 on the rows of the two lower kinds):
    q[..., 0] = lam_i in [0.8, 1.9] (+-0.2 between the heads of a group, mean lam_i),
    q[..., 1] = u_i in [-1, 1], q[..., 2] = c_i (the kind's offset and a shift; + 1024 on the lower
    kinds), q[..., D-1] = 13/16 on the lower kinds (else 0); kc[..., 0] = a_J / scale (m > 1: the
    block's rows a_J +- e_J, mean a_J), kc[..., 1] = b_J / scale with b_J = 3 N(0, 1),
    kc[..., 2] = 1 / scale, kc[..., D-1] = -1024 / (13/16 scale) (after rounding -1027 nats in
    bfloat16, -1023.75 in float16). a_J = -sigma log(rank_J + 1/2) over a random ranking of the
    blocks: the k-th best block of a row that sees them all lies sigma lam log(2k - 1) below the
    best, sigma such that lam = 1 puts the cut at about the n-th (at least 7: a wider ladder for
    n = 64, the threshold away from the dense part). Causal rows see a prefix, a random subset of
    the ladder. The small terms come first in q's dims and the large one last, so the kernels'
    float32 sums (FFMA chain, tensor-core k-steps) add it last and keep the order of the scores, and
    the tensor-core kernel's bfloat16 hi/lo split of qbar is exact on the large term (q = 1 there
    would shift every score of those rows by 0.005 nats, half of check_selection's 0.01 window at
    the threshold). Every value is float16-safe (|kc| < 10100); the reference sees the rounded
    inputs.
    """
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N, layout="packed" if N is None else "right",
                       dtype=dtype, compress_stride=s, seed=seed)
    G, m, scale = H // KVH, b // s, D ** -0.5
    gen = torch.Generator().manual_seed(seed + 1)
    f64 = dict(generator=gen, dtype=torch.float64)
    sigma = max(23.0 / math.log(2 * max(n, 2) - 1), 7.0)
    C = batch.kc.shape[1]
    nbk = -(-C // m)
    head_dev = torch.tensor([(-1.0) ** h if h < G - G % 2 else 0.0 for h in range(G)],
                            dtype=torch.float64)
    row_dev = torch.tensor([(-1.0) ** c if c < m - m % 2 else 0.0 for c in range(m)],
                           dtype=torch.float64)
    offset = torch.tensor([k[0] for k in CUT_KINDS], dtype=torch.float64)
    spread = torch.tensor([k[1] for k in CUT_KINDS], dtype=torch.float64)
    for bi, L in enumerate(lengths):
        bq, rows = batch.rows(bi)
        kind = torch.randint(0, len(CUT_KINDS), (L, KVH), generator=gen)
        low = (kind > 0).double()
        qs = torch.zeros(L, KVH, G, D, dtype=torch.float64)
        qs[..., 0] = (0.8 + 1.1 * torch.rand(L, KVH, **f64))[..., None] + 0.2 * head_dev
        qs[..., 1] = (2 * torch.rand(L, KVH, **f64) - 1)[..., None]
        qs[..., 2] = (offset[kind] + 1024 * low
                      + spread[kind] * (2 * torch.rand(L, KVH, **f64) - 1))[..., None]
        qs[..., D - 1] = CUT_BIG_Q * low[..., None]
        batch.q[bq, rows] = qs.reshape(L, H, D).to(dtype)
        rank = torch.stack([torch.randperm(nbk, generator=gen) for _ in range(KVH)], -1)
        a = -sigma * torch.log(rank.double() + 0.5)
        e = 2.0 * torch.randn(nbk, KVH, **f64)
        kcs = torch.zeros(C, KVH, D, dtype=torch.float64)
        a_rows = a[:, None] + e[:, None] * row_dev[None, :, None]  # [nbk, m, KVH]
        kcs[..., 0] = a_rows.reshape(-1, KVH)[:C] / scale
        kcs[..., 1] = (3.0 * torch.randn(nbk, KVH, **f64)).repeat_interleave(m, 0)[:C] / scale
        kcs[..., 2] = 1.0 / scale
        kcs[..., D - 1] = -1024.0 / (CUT_BIG_Q * scale)
        batch.kc[bi] = kcs.to(dtype)
    return batch


def _cut_rows(t64, seq_start, seq_len, hp, D):
    """Per valid (row, kv head), from the float64 scores of the rounded inputs: the number of
    visible blocks, the best visible score, and whether a candidate of the row's top n lies in the
    band that a bound on the normaliser cannot decide: score - max(best, -1000) in (log 1e-10,
    log 1e-10 + log(1 + #visible)] (outside it a candidate is kept or dropped whatever the other
    blocks add). Returns (bq, row, kv head, #visible, best, uncertain) as flat tensors."""
    s, b, n = hp["compress_stride"], hp["select_block"], hp["num_select"]
    m, scale, log_min = b // s, D ** -0.5, math.log(ref.MIN_PROB)
    out = []
    for bi, bq, st, L in per_sequence(seq_start, seq_len, t64["q"].shape[0]):
        kc = t64["kc"][bi]
        KVH = kc.shape[1]
        nb = min(L // s, kc.shape[0]) // m
        if L == 0 or nb == 0:
            continue
        q = t64["q"][bq, st:st + L]
        qbar = q.view(L, KVH, -1, D).mean(2)
        kcb = kc[:nb * m].view(nb, m, KVH, D).mean(1)
        vis = ref.block_visible(torch.arange(L), nb, b, hp["causal"])  # [L, nb]
        sc = (scale * torch.einsum("igd,jgd->igj", qbar, kcb)).masked_fill(~vis[:, None],
                                                                            float("-inf"))
        top = sc.topk(min(n, nb), dim=-1).values  # [L, KVH, n]
        nvis = vis.sum(-1, keepdim=True).expand(L, KVH)
        d = top - top[..., :1].clamp(min=ref.NULL_LOGIT)
        unc = ((d > log_min) & (d <= log_min + torch.log1p(nvis.double())[..., None])).any(-1)
        out.append((torch.full((L, KVH), bq), torch.arange(st, st + L)[:, None].expand(L, KVH),
                    torch.arange(KVH).expand(L, KVH), nvis, top[..., 0], unc))
    return [torch.cat([o[k].reshape(-1) for o in out]) for k in range(6)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", range(len(CUT_CASES)))
def test_selection_probability_cut_matches_reference(case, causal, D, dtype):
    """SPEC 1b's P > 1e-10 cut and the -1000 softmax entry decide the counts: scores built so that
    the cut falls among each row's top n blocks (relative to the row's best block, or, below -1000,
    to the -1000 entry), with rows of three kinds drawn at random, so that rows the cut leaves
    undecided by a bound on the normaliser sit next to rows it decides, in every warp and CTA, over
    many tiles of blocks; FFMA (float32) and tensor-core (float16 / bfloat16) scores, long,
    right-padded (m = 1, 2) and packed sequences, n = 4, 8, 64. The op equals the reference away
    from near-ties, and the case is checked to exercise the cut: some rows keep fewer than
    min(n, #visible) blocks, some keep blocks, rows below the -1000 entry both keep and drop, and
    both undecided and decided rows are plentiful."""
    lengths, N, H, KVH, s, b, n = CUT_CASES[case]
    hp = dict(compress_stride=s, select_block=b, num_select=n, causal=causal)
    batch = _cut_batch(lengths, N, H, KVH, D, s, b, n, dtype, seed=500 + case)
    t64 = dict(q=batch.q.double(), kc=batch.kc.double())
    seq_start, seq_len = batch.seq_start.to(DEV), batch.seq_len.to(DEV)
    idx, cnt = torch.ops.blossomrec.select_blocks(batch.q.to(DEV), batch.kc.to(DEV), seq_start,
                                                  seq_len, s, b, n, causal, D ** -0.5)
    fragile = check_selection(idx, cnt, t64, batch.seq_start, batch.seq_len, hp)
    bq, row, g, nvis, best, uncertain = _cut_rows(t64, batch.seq_start, batch.seq_len, hp, D)
    rows = int(batch.seq_len.sum()) * KVH
    assert fragile < rows // 20, f"{fragile} of {rows} rows near a tie: the check says little"
    got = cnt.cpu()[bq, row, g]
    seen = nvis > 0
    assert int((seen & (got < nvis.clamp(max=n))).sum()) > 0, "the cut never drops a block"
    assert int((got > 0).sum()) > 0, "no row keeps a block"
    below = best < ref.NULL_LOGIT - 10  # the -1000 entry dominates these rows' softmax
    assert int((below & (got > 0)).sum()) > 0 and int((below & seen & (got == 0)).sum()) > 0, (
        "rows below the -1000 entry must both keep and drop blocks")
    n_unc, n_sure = int(uncertain.sum()), int((seen & ~uncertain).sum())
    assert n_unc > rows // 10 and n_sure > rows // 10, (
        f"{n_unc} undecided and {n_sure} decided rows of {rows}: the mix is not there")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_buffer_without_sequences(dtype):
    """cu_seqlens = [0]: every row is padding; the output and every gradient are exactly 0 (the
    fused kernels have no sequence to serve and must not be launched on an empty unit grid)."""
    T, H, KVH, D = 20, 4, 2, 16
    q = torch.randn(T, H, D, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(T, KVH, D, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(T, KVH, D, device=DEV, dtype=dtype, requires_grad=True)
    gates = torch.rand(T, H, 2, device=DEV, dtype=dtype, requires_grad=True)
    kc = torch.randn(0, 1, KVH, D, device=DEV, dtype=dtype)
    out = blossomrec_cuda.blossom_attention(q, k, v, kc, gates, cu_seqlens=[0])
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, [q, k, v, gates], torch.randn_like(out))
    for gr in grads:
        assert torch.equal(gr, torch.zeros_like(gr))
