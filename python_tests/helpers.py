"""Shared test helpers: random batches in the row-buffer layout, FlashAttention's error criterion.

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

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

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
        mask = torch.zeros(self.q.shape[:2], dtype=torch.bool, device=self.q.device)
        for b in range(len(self.lengths)):
            bq, sl = self.rows(b)
            mask[bq, sl] = True
        return mask

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
               pad_fill: str = "garbage", seed: Optional[int] = None) -> Batch:
    """Random inputs for sequences of ``lengths`` in one of ``LAYOUTS``.

    ``N`` (padded layouts) defaults to ``max(lengths)``; the packed buffer holds ``sum(lengths)``
    rows plus ``packed_extra_rows`` trailing padding rows. ``kc`` has ``max(L // s) +
    extra_kc_rows`` rows per sequence (rows past a sequence's ``floor(L / s)`` must be ignored).
    ``gates`` lie in (0, 1) like the module's sigmoid gates. ``pad_fill``: ``"garbage"`` (finite
    values of order 1e3) or ``"nan"``. ``fused_qkv``: q, k, v are strided views of one
    ``[Bq, Nbuf, (H + 2*KVH) * D]`` tensor (kept in ``Batch.qkv``). ``requires_grad`` makes q, k, v
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
    gates = gates.to(device=device, dtype=dtype)
    kc = kc.to(device=device, dtype=dtype)
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


def assert_close_fa(out: Tensor, ref: Tensor, lowprec_ref: Tensor, atol: float,
                    name: str = "out") -> None:
    """FlashAttention's criterion, elementwise: ``|out - ref| <= 2 * |lowprec_ref - ref| + atol``.

    ``ref`` is the reference in high precision (float64 or upcast), ``lowprec_ref`` the reference
    run in the test dtype. NaN anywhere in ``out`` fails. The message names the worst element.
    """
    assert out.shape == ref.shape == lowprec_ref.shape, (
        f"{name}: shapes differ: out {tuple(out.shape)}, ref {tuple(ref.shape)}, "
        f"lowprec_ref {tuple(lowprec_ref.shape)}")
    o, r, lp = (t.detach().to(device="cpu", dtype=torch.float64) for t in (out, ref, lowprec_ref))
    err = (o - r).abs()
    allowed = 2 * (lp - r).abs() + atol
    bad = ~(err <= allowed)  # NaN compares False, so NaN counts as bad
    if not bool(bad.any()):
        return
    max_err = err.nan_to_num(nan=float("inf")).max()
    excess = torch.where(bad, (err - allowed).nan_to_num(nan=float("inf")), torch.zeros_like(err))
    worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed |out-ref| <= "
        f"2*|lowprec_ref-ref| + {atol:g}; max |out-ref| = {max_err:.3e}, "
        f"max |lowprec_ref-ref| = {(lp - r).abs().max():.3e}, NaN in out: {int(o.isnan().sum())}; "
        f"worst at {worst}: out {o[worst]:.6e}, ref {r[worst]:.6e}, lowprec_ref {lp[worst]:.6e}")
