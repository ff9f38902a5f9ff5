"""Shared test harness: random batches in the row-buffer layout, FlashAttention's error criterion,
the op-against-reference check and the case table that the CPU and CUDA op tests share.

The row-buffer layout (docs/DESIGN.md): ``q [Bq, N, H, D]``, ``k, v [Bq, N, KVH, D]``,
``gates [Bq, N, H, 2]``, per-sequence ``kc [B, C, KVH, D]`` and int32 ``seq_start``/``seq_len [B]``,
with ``Bq == B`` for padded layouts and ``Bq == 1`` for the packed one.

:func:`make_batch` draws every sequence's values from a generator seeded by ``seed`` in an order
that does not depend on the layout, so ``make_batch(lengths, layout=X, seed=s)`` for X in
``LAYOUTS`` carries the *same* sequences in three storage layouts: the basis of the
padding-invariance tests. Padding rows hold large finite garbage (or NaN on request) so that a
kernel that reads them shows up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

import blossomrec_cuda  # noqa: F401  (registers torch.ops.blossomrec: a test file may run alone)

LAYOUTS = ("right", "left", "packed")


@dataclass
class Batch:
    """A batch in the row-buffer layout, plus what the public wrappers need to describe it."""

    q: Tensor  # [Bq, Nbuf, H, D]
    k: Tensor  # [Bq, Nbuf, KVH, D]
    v: Tensor  # [Bq, Nbuf, KVH, D]
    kc: Tensor  # [B, C, KVH, D]
    gates: Tensor  # [Bq, Nbuf, H, 2]
    seq_start: Tensor  # [B] int32
    seq_len: Tensor  # [B] int32
    layout: str  # "right" | "left" | "packed"
    lengths: list[int]
    qkv: Optional[Tensor] = None  # [Bq, Nbuf, (H + 2*KVH) * D] when q, k, v are views of it

    @property
    def Bq(self) -> int:
        return self.q.shape[0]

    @property
    def packed(self) -> bool:
        return self.layout == "packed"

    def rows(self, b: int) -> tuple[int, slice]:
        """(row-buffer batch index, row slice) of sequence ``b``."""
        start = int(self.seq_start[b])
        return (0 if self.packed else b), slice(start, start + self.lengths[b])

    def seq(self, x: Tensor, b: int) -> Tensor:
        """Sequence ``b``'s ``L_b`` rows of a row-buffer tensor ``x [Bq, Nbuf, ...]``."""
        bq, sl = self.rows(b)
        return x[bq, sl]

    def valid_rows(self) -> Tensor:
        """``[Bq, Nbuf]`` bool, True on rows that belong to a sequence."""
        return ~padding_rows(self.seq_start, self.seq_len, *self.q.shape[:2]).to(self.q.device)

    def layout_kwargs(self) -> dict:
        """``lengths``/``padding_side`` or ``cu_seqlens`` for the public wrappers."""
        if self.packed:
            cu = torch.zeros(len(self.lengths) + 1, dtype=torch.int32, device=self.q.device)
            cu[1:] = torch.cumsum(torch.tensor(self.lengths, device=self.q.device), 0)
            return {"cu_seqlens": cu}
        return {"lengths": list(self.lengths), "padding_side": self.layout}

    def to_wrapper(self, x: Tensor) -> Tensor:
        """A row-buffer tensor as the public wrappers take it (packed: ``[T, ...]``)."""
        return x.squeeze(0) if self.packed else x

    def from_wrapper(self, x: Tensor) -> Tensor:
        """A wrapper's output back in the row-buffer layout."""
        return x.unsqueeze(0) if self.packed else x


def make_batch(lengths: Sequence[int], *, H: int = 2, KVH: int = 1, D: int = 16,
               N: Optional[int] = None, layout: str = "right", dtype: torch.dtype = torch.float32,
               device: str = "cpu", compress_stride: int = 4, extra_kc_rows: int = 1,
               packed_extra_rows: int = 3, fused_qkv: bool = False, requires_grad: bool = False,
               pad_fill: str = "garbage", seed: Optional[int] = None,
               gates_dtype: Optional[torch.dtype] = None, strided_kc: bool = False) -> Batch:
    """Random inputs for sequences of ``lengths`` in one of ``LAYOUTS``.

    ``N`` (padded layouts) defaults to ``max(lengths)``; the packed buffer holds ``sum(lengths)``
    rows plus ``packed_extra_rows`` trailing padding rows. ``kc`` has ``max(L // s) +
    extra_kc_rows`` rows per sequence (rows past a sequence's ``floor(L / s)`` must be ignored).
    ``gates`` lie in (0, 1) like the module's sigmoid gates. ``pad_fill``: ``"garbage"`` (finite
    values of order 1e3) or ``"nan"``. ``fused_qkv``: q, k, v are strided views of one
    ``[Bq, Nbuf, (H + 2*KVH) * D]`` tensor (kept in ``Batch.qkv``). ``gates_dtype`` (default
    ``dtype``): the op takes gates in q's dtype or float32. ``strided_kc``: kc is a view with a
    stride of 2 KVH D along its kv-head dim (every other head of a wider buffer). ``requires_grad``
    makes q, k, v
    (or qkv) and gates leaves that need grad. ``seed`` defaults to a draw from the global generator
    (which conftest seeds per test).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lengths = [int(L) for L in lengths]
    B = len(lengths)
    N = max(lengths, default=0) if N is None else N
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    width = H + 2 * KVH

    # Per-sequence values first, in a fixed order: identical across layouts for the same seed.
    seq_rows = [torch.randn(L, width, D, generator=gen, dtype=torch.float64) for L in lengths]
    seq_gates = [torch.rand(L, H, 2, generator=gen, dtype=torch.float64) for L in lengths]
    C = max((L // compress_stride for L in lengths), default=0) + extra_kc_rows
    kc = torch.randn(B, C, KVH, D, generator=gen, dtype=torch.float64)

    if layout == "packed":
        starts = [sum(lengths[:b]) for b in range(B)]
        Bq, Nbuf = 1, sum(lengths) + packed_extra_rows
    else:
        starts = [0 if layout == "right" else N - L for L in lengths]
        Bq, Nbuf = B, N
    if any(L > N for L in lengths) and layout != "packed":
        raise ValueError(f"lengths {lengths} exceed N = {N}")

    # Padding: drawn from a generator of its own so that it never shifts the sequences' values.
    pad_gen = torch.Generator().manual_seed(seed + 1)
    if pad_fill == "garbage":
        qkv = 1e3 * torch.randn(Bq, Nbuf, width, D, generator=pad_gen, dtype=torch.float64)
        gates = 1e3 * torch.randn(Bq, Nbuf, H, 2, generator=pad_gen, dtype=torch.float64)
    elif pad_fill == "nan":
        qkv = torch.full((Bq, Nbuf, width, D), float("nan"), dtype=torch.float64)
        gates = torch.full((Bq, Nbuf, H, 2), float("nan"), dtype=torch.float64)
    else:
        raise ValueError(f"pad_fill must be 'garbage' or 'nan', got {pad_fill!r}")
    for b, (st, L) in enumerate(zip(starts, lengths)):
        bq = 0 if layout == "packed" else b
        qkv[bq, st:st + L] = seq_rows[b]
        gates[bq, st:st + L] = seq_gates[b]

    qkv = qkv.to(device=device, dtype=dtype)
    gates = gates.to(device=device, dtype=gates_dtype or dtype)
    kc = kc.to(device=device, dtype=dtype)
    if strided_kc:
        wide = torch.zeros(B, C, 2 * KVH, D, device=device, dtype=dtype)
        wide[:, :, ::2] = kc
        kc = wide[:, :, ::2]
    fused = None
    if fused_qkv:
        fused = qkv.reshape(Bq, Nbuf, width * D)
        if requires_grad:
            fused.requires_grad_(True)
        q, k, v = fused.view(Bq, Nbuf, width, D).split([H, KVH, KVH], dim=2)
    else:
        q, k, v = (t.contiguous() for t in qkv.split([H, KVH, KVH], dim=2))
        if requires_grad:
            q.requires_grad_(True)
            k.requires_grad_(True)
            v.requires_grad_(True)
    if requires_grad:
        gates.requires_grad_(True)
    seq_start = torch.tensor(starts, dtype=torch.int32, device=device)
    seq_len = torch.tensor(lengths, dtype=torch.int32, device=device)
    return Batch(q, k, v, kc, gates, seq_start, seq_len, layout, lengths, fused)


# --------------------------------------------------------------------------------------------------
# The op against the reference: one criterion, one check (CPU and CUDA alike)
# --------------------------------------------------------------------------------------------------
# atol of the criterion per test dtype on the GPU (the kernels accumulate in float32, float64 for
# float64, in another order than the reference's matmuls); gradients get 4x.
ATOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# On the CPU the kernels' order differs less from the reference's: 1e-12 (outputs) / 1e-11
# (gradients) in float64, and 8 float32 ulps of max(1, max|ref|) for the other dtypes, 4x for
# gradients (dk, dv sum over every query of a key, G heads each).
CPU_ULPS = 8 * torch.finfo(torch.float32).eps


def tolerance(device: str, dtype: torch.dtype, ref: Tensor, gradient: bool) -> float:
    """The criterion's atol for a tensor compared on ``device`` (see ATOL, CPU_ULPS)."""
    if str(device).startswith("cuda"):
        return ATOL[dtype] * (4 if gradient else 1)
    if dtype == torch.float64:
        return 1e-11 if gradient else 1e-12
    scale = max(1.0, ref.detach().abs().max().item() if ref.numel() else 0.0)
    return CPU_ULPS * scale * (4 if gradient else 1)


def assert_fa_close(out: Tensor, ref: Tensor, lowprec_ref: Tensor, atol: float,
                    name: str = "out") -> None:
    """FlashAttention's criterion: ``max|out - ref| <= 2 * max|lowprec_ref - ref| + atol``.

    ``ref`` is the reference in high precision (float64), ``lowprec_ref`` the reference run in the
    test dtype (``upcast=False``); for float64 inputs the two coincide and this is ``<= atol``.
    Over the tensor, not elementwise (elementwise fails wherever the low-precision reference
    happens to round exactly). NaN in ``out`` fails. The message names the worst element.
    """
    assert out.shape == ref.shape == lowprec_ref.shape, (
        f"{name}: shapes differ: out {tuple(out.shape)}, ref {tuple(ref.shape)}, "
        f"lowprec_ref {tuple(lowprec_ref.shape)}")
    o, r, lp = (t.detach().to(device="cpu", dtype=torch.float64) for t in (out, ref, lowprec_ref))
    nan = int(o.isnan().sum())
    assert nan == 0, f"{name}: {nan} NaN elements"
    if o.numel() == 0:
        return
    err = (o - r).abs()
    low = (lp - r).abs().max().item()
    if err.max().item() <= 2 * low + atol:
        return
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    raise AssertionError(
        f"{name}: max |out-ref| = {err.max().item():.3e} exceeds 2 x max |lowprec_ref-ref| "
        f"({low:.3e}) + {atol:g}; worst at {worst}: out {o[worst]:.6e}, ref {r[worst]:.6e}, "
        f"lowprec_ref {lp[worst]:.6e}")


def sequences(seq_start: Tensor, seq_len: Tensor, Bq: int):
    """(b, row-buffer batch index, first row, length) of every sequence of a row buffer with ``Bq``
    batch entries (1: packed)."""
    for b, (st, L) in enumerate(zip(seq_start.tolist(), seq_len.tolist())):
        yield b, (b if Bq > 1 else 0), st, L


def padding_rows(seq_start: Tensor, seq_len: Tensor, Bq: int, N: int) -> Tensor:
    """``[Bq, N]`` bool (on the CPU), True on rows that belong to no sequence."""
    covered = torch.zeros(Bq, N, dtype=torch.bool)
    for _, bq, st, L in sequences(seq_start, seq_len, Bq):
        covered[bq, st:st + L] = True
    return ~covered


def leaves_like(batch: Batch, dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """q, k, v, gates as leaves that need grad, and kc: detached views of the batch's tensors
    (strides kept: q, k, v of a fused qkv stay strided through the backward), or copies cast to
    ``dtype``."""
    t = {n: getattr(batch, n).detach() for n in ("q", "k", "v", "gates", "kc")}
    if dtype is not None:
        t = {n: x.to(dtype) for n, x in t.items()}
    for n in ("q", "k", "v", "gates"):
        t[n].requires_grad_(True)
    return t


def reference_given_selection(t: dict[str, Tensor], seq_start: Tensor, seq_len: Tensor,
                              idx: Tensor, cnt: Tensor, hp: dict,
                              upcast: bool = True) -> dict[str, Tensor]:
    """The reference's out, o_sel, o_win ``[Bq, Nbuf, H, D]`` and lse ``[Bq, Nbuf, H, 2]`` in the
    row buffer, for the given selection (so that the attention is checked apart from the scoring);
    differentiable w.r.t. ``t``'s q, k, v, gates. Padding rows are 0."""
    from blossomrec_cuda import reference as ref
    q = t["q"]
    Bq, N, H, D = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    res = {n: [] for n in ("out", "o_sel", "o_win", "lse")}
    index = []
    attn_hp = {k_: v_ for k_, v_ in hp.items() if k_ not in ("compress_stride", "num_select")}
    for b, bq, st, L in sequences(seq_start, seq_len, Bq):
        if L == 0:
            continue
        sl = slice(st, st + L)
        r = ref.blossom_attention_seq(q[bq, sl], t["k"][bq, sl], t["v"][bq, sl], t["kc"][b],
                                      t["gates"][bq, sl], sel=(idx[bq, sl].to(q.device),
                                                               cnt[bq, sl].to(q.device)),
                                      upcast=upcast, **attn_hp)
        for n in res:
            res[n].append(r.lse.to(lse_dtype) if n == "lse" else getattr(r, n).to(q.dtype))
        index.append((torch.full((L,), bq, device=q.device), torch.arange(st, st + L,
                                                                           device=q.device)))
    out = {}
    for n, parts in res.items():
        shape = (Bq, N, H, 2) if n == "lse" else (Bq, N, H, D)
        z = torch.zeros(shape, dtype=lse_dtype if n == "lse" else q.dtype, device=q.device)
        if parts:
            rows = (torch.cat([i for i, _ in index]), torch.cat([j for _, j in index]))
            z = z.index_put(rows, torch.cat(parts))
        out[n] = z
    return out


def near_tie_rows(t64: dict[str, Tensor], seq_start: Tensor, seq_len: Tensor, hp: dict,
                  tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Two ``[Bq, Nbuf, KVH]`` bool masks: rows where the reference's choice is fragile (scores
    within ``tol`` at the top-n cut, or a probability within a factor 1.01 of the 1e-10
    threshold), and rows where its order is (two of the top n + 1 scores within ``tol``)."""
    from blossomrec_cuda import reference as ref
    q, kc = t64["q"].detach().cpu(), t64["kc"].detach().cpu()
    Bq, N = q.shape[:2]
    KVH = kc.shape[2]
    fragile = torch.zeros(Bq, N, KVH, dtype=torch.bool)
    order = torch.zeros(Bq, N, KVH, dtype=torch.bool)
    n = hp["num_select"]
    scale = hp.get("scale") or q.shape[-1] ** -0.5
    for b, bq, st, L in sequences(seq_start, seq_len, Bq):
        if L == 0 or n == 0:
            continue
        rows = torch.arange(L)
        sc = ref.block_scores(q[bq, st:st + L], kc[b], L, rows, hp["compress_stride"],
                              hp["select_block"], scale)  # [KVH, L, NB]
        NB = sc.shape[-1]
        if NB == 0:
            continue
        vis = ref.block_visible(rows, NB, hp["select_block"], hp["causal"])
        masked = sc.masked_fill(~vis[None], float("-inf"))
        srt = masked.sort(dim=-1, descending=True).values
        if NB > n:
            a, c = srt[..., n - 1], srt[..., n]
            close = torch.isfinite(c) & ((a - c).abs() < tol)
            fragile[bq, st:st + L] |= close.permute(1, 0)
        top = srt[..., :n + 1]
        gaps = (top[..., :-1] - top[..., 1:]).abs()
        order[bq, st:st + L] |= (torch.isfinite(top[..., 1:]) & (gaps < tol)).any(-1).permute(1, 0)
        logp = torch.log_softmax(torch.cat([torch.full_like(masked[..., :1], ref.NULL_LOGIT),
                                            masked], dim=-1), dim=-1)[..., 1:]
        near_thr = (logp - math.log(ref.MIN_PROB)).abs() < 0.01
        fragile[bq, st:st + L] |= near_thr.any(dim=-1).permute(1, 0)
    return fragile, order | fragile


def check_selection(idx: Tensor, cnt: Tensor, t64: dict[str, Tensor], seq_start: Tensor,
                    seq_len: Tensor, hp: dict) -> int:
    """The op's selection equals the reference's: as sets with equal counts on every row without a
    near-tie at the cut, in the same order (decreasing probability, docs/DESIGN.md) where no two of
    the top n + 1 scores are near-tied; padding rows select nothing. Returns the number of rows
    fragile at the cut."""
    from blossomrec_cuda import reference as ref
    idx, cnt = idx.cpu(), cnt.cpu()
    ref_idx = torch.full_like(idx, -1)
    ref_cnt = torch.zeros_like(cnt)
    Bq, N = idx.shape[:2]
    for b, bq, st, L in sequences(seq_start, seq_len, Bq):
        if L == 0:
            continue
        i_, c_ = ref.select_blocks(t64["q"].detach()[bq, st:st + L].cpu(),
                                   t64["kc"].detach()[b].cpu(), L,
                                   compress_stride=hp["compress_stride"],
                                   select_block=hp["select_block"], num_select=hp["num_select"],
                                   causal=hp["causal"])
        ref_idx[bq, st:st + L] = i_
        ref_cnt[bq, st:st + L] = c_
    fragile, order_fragile = near_tie_rows(t64, seq_start, seq_len, hp)
    got = idx.sort(dim=-1).values
    want = ref_idx.sort(dim=-1).values
    same = (got == want).all(dim=-1) & (cnt == ref_cnt)
    bad = ~same & ~fragile
    assert not bad.any(), (f"{int(bad.sum())} rows select differently from the reference, e.g. "
                           f"{bad.nonzero()[:3].tolist()}: got {got[bad][:3].tolist()} want "
                           f"{want[bad][:3].tolist()}")
    misordered = ~(idx == ref_idx).all(dim=-1) & ~order_fragile
    assert not misordered.any(), (
        f"{int(misordered.sum())} rows list the right blocks in another order than decreasing "
        f"probability, e.g. {misordered.nonzero()[:3].tolist()}: got "
        f"{idx[misordered][:3].tolist()} want {ref_idx[misordered][:3].tolist()}")
    pad = padding_rows(seq_start, seq_len, Bq, N)
    assert bool((cnt[pad] == 0).all() and (idx[pad] == -1).all()), "padding rows select blocks"
    return int(fragile.sum())


def stis_hp(case_hp: dict, stis: dict, causal: bool) -> dict:
    """A case's selection hyper-parameters with an STIS switch set and the causality (the sink
    exists for non-causal attention only)."""
    hp = dict(case_hp)
    hp.update(stis)
    hp["causal"] = causal
    hp["use_sink"] = hp["use_sink"] and not causal
    return hp


def check_against_reference(lengths: Sequence[int], N: Optional[int], H: int, KVH: int, D: int,
                            hp: dict, layout: str, dtype: torch.dtype, *, device: str = "cpu",
                            seed: int = 0, sel_fn=None,
                            gates_dtype: Optional[torch.dtype] = None,
                            scale: Optional[float] = None) -> None:
    """The op on ``device`` against the reference: its selection against the reference's (sets,
    outside near-ties), then, given that selection, out, o_sel, o_win and lse (forward, padding
    rows exactly 0) and the gradients of out w.r.t. q, k, v and gates (FlashAttention's criterion:
    :func:`assert_fa_close` with :func:`tolerance`), q, k, v strided views of one buffer and kc
    strided too. ``sel_fn(idx, cnt)`` may edit
    the selection first (hand-made input). ``gates_dtype``: gates in float32 with low-precision q;
    every gradient comes back in its input's dtype. ``scale``: the attention's softmax scale
    (default ``D ** -0.5``, which the selection keeps)."""
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N, layout=layout, dtype=dtype, device=device,
                       compress_stride=hp["compress_stride"], fused_qkv=True, seed=seed,
                       gates_dtype=gates_dtype, strided_kc=True)
    t = leaves_like(batch)
    t64 = leaves_like(batch, torch.float64)
    sel_scale = D ** -0.5
    ops = torch.ops.blossomrec
    idx, cnt = ops.select_blocks(batch.q.detach(), batch.kc, batch.seq_start, batch.seq_len,
                                 hp["compress_stride"], hp["select_block"], hp["num_select"],
                                 hp["causal"], sel_scale)
    st, ln = batch.seq_start, batch.seq_len
    check_selection(idx, cnt, t64, st, ln, hp)
    if sel_fn is not None:
        idx, cnt = sel_fn(idx, cnt)
    scale = sel_scale if scale is None else scale
    attn = (hp["select_block"], hp["window"], hp["power_block"], hp["use_power"], hp["use_sink"],
            hp["causal"], scale)
    hp = dict(hp, scale=scale)
    # One forward (its autograd is the op's own, csrc/autograd.cpp): every output it saves for the
    # backward is checked, and out's gradients; the low-precision reference shares t's leaves.
    saved = ops.sparse_attention_fwd(t["q"], t["k"], t["v"], t["gates"], idx, cnt, st, ln, *attn)
    out = saved[0]
    ref64 = reference_given_selection(t64, st, ln, idx, cnt, hp)
    low = reference_given_selection(t, st, ln, idx, cnt, hp, upcast=False)
    pad = ~batch.valid_rows()
    for name, got in zip(("out", "o_sel", "o_win", "lse"), saved):
        lowprec, tol = low[name], tolerance(device, dtype, ref64[name], False)
        if name == "lse":
            # lse is float32 for every input dtype (docs/DESIGN.md): its low-precision reference is
            # at most float32, and float32 accumulation in another order costs a few ulps of it.
            lowprec = lowprec.to(got.dtype)
            tol = max(tol, CPU_ULPS * max(1.0, ref64[name].detach().abs().max().item()))
        assert_fa_close(got, ref64[name], lowprec, tol, name)
        assert bool((got[pad] == 0).all()), f"{name}: padding rows are not 0"

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2),
                       dtype=torch.float64).to(device=device, dtype=out.dtype)
    names = ("q", "k", "v", "gates")
    grads = torch.autograd.grad(out, [t[n] for n in names], dout)
    g64 = torch.autograd.grad(ref64["out"], [t64[n] for n in names], dout.double())
    glow = torch.autograd.grad(low["out"], [t[n] for n in names], dout)
    for name, a, b_, c in zip(names, grads, g64, glow):
        assert a.dtype == t[name].dtype, f"d{name} is {a.dtype}, {name} {t[name].dtype}"
        assert_fa_close(a, b_, c, tolerance(device, dtype, b_, True), "d" + name)
        assert bool((a[pad] == 0).all()), f"d{name}: padding rows are not 0"


# The shared case table of the op tests (test_ops.py runs it on every device; the CUDA tests add
# their kernel-specific grids): lengths, N (None: packed only), H, KVH, D, selection parameters.
CASES = [
    ([17], 17, 2, 1, 16, dict(compress_stride=2, select_block=4, num_select=2)),
    ([1, 15, 0, 9], 15, 4, 2, 32, dict(compress_stride=2, select_block=4, num_select=3)),
    ([97, 40], 97, 8, 1, 64, dict(compress_stride=4, select_block=8, num_select=4)),
    ([200, 3, 150], 200, 8, 2, 16, dict(compress_stride=4, select_block=4, num_select=8)),
    ([64, 33], 64, 3, 3, 128, dict(compress_stride=2, select_block=6, num_select=20)),
    ([1025], 1025, 8, 2, 16, dict(compress_stride=16, select_block=16, num_select=4)),
    ([17, 16], 17, 2, 1, 16, dict(compress_stride=2, select_block=4, num_select=16)),  # n > blocks
    ([15, 12], 15, 4, 1, 16, dict(compress_stride=2, select_block=4, num_select=0)),   # n = 0
    ([1, 0, 1], 1, 2, 1, 16, dict(compress_stride=2, select_block=4, num_select=3)),   # N = 1
]
STIS = [
    dict(window=8, power_block=1, use_power=True, use_sink=True),
    dict(window=1, power_block=2, use_power=True, use_sink=False),
    dict(window=3, power_block=1, use_power=False, use_sink=True),
]
