"""Typed wrappers over ``torch.ops.blossomrec.*``, their fake (meta) kernels and autograd.

Layouts (docs/DESIGN.md):

- padded: ``q [B, N, H, D]``, ``k, v [B, N, KVH, D]``, ``gates [B, N, H, 2]`` with ``lengths [B]``
  (default: all ``N``) and ``padding_side`` ``"right"`` (valid tokens first) or ``"left"``;
- packed: ``q [T, H, D]``, ``k, v [T, KVH, D]``, ``gates [T, H, 2]`` with ``cu_seqlens [B + 1]``.

``kc`` is always per sequence: ``[B, C, KVH, D]`` with ``C >= floor(L_b / compress_stride)``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Lengths = Optional[Union[Tensor, Sequence[int]]]
CuSeqlens = Optional[Union[Tensor, Sequence[int]]]


@dataclass(frozen=True)
class SeqLayout:
    """A batch as the ops see it: a row buffer and each sequence's first row and length."""

    seq_start: Tensor  # [B] int32
    seq_len: Tensor  # [B] int32
    packed: bool
    max_len: Optional[int] = None  # the longest sequence, where known on the host without a sync

    def to_rows(self, x: Tensor) -> Tensor:
        """``[T, ...] -> [1, T, ...]`` for the packed layout; padded tensors pass through."""
        return x.unsqueeze(0) if self.packed else x

    def from_rows(self, x: Tensor) -> Tensor:
        return x.squeeze(0) if self.packed else x


def _is_tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def seq_layout(q: Tensor, lengths: Lengths = None, padding_side: str = "right",
               cu_seqlens: CuSeqlens = None) -> SeqLayout:
    """Describe a padded (``q [B, N, H, D]``) or packed (``q [T, H, D]`` + ``cu_seqlens``) batch.

    ``cu_seqlens [B + 1]`` starts at 0 and does not decrease; rows from ``cu_seqlens[-1]`` to ``T``
    belong to no sequence (padding: their outputs are 0)."""
    if cu_seqlens is not None:
        if lengths is not None:
            raise ValueError("pass either lengths (padded layout) or cu_seqlens (packed), not both")
        if q.dim() != 3:
            raise ValueError(f"the packed layout takes q as [T, H, D]; got rank {q.dim()}")
        cu_in = _int_tensor(cu_seqlens, "cu_seqlens")
        if cu_in.dim() != 1 or cu_in.numel() < 1:
            raise ValueError("cu_seqlens must be a 1-D tensor [B + 1] of cumulative lengths")
        if cu_in.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_in.dtype}")
        # Checked in int64, before the narrowing to the ops' int32 (which would wrap large values),
        # and where the values are: host offsets need no round trip through the device.
        cu = cu_in.to(torch.int64)
        start, length = cu[:-1], cu[1:] - cu[:-1]
        max_len = _validate(start, length, q.shape[0], packed=True)
        return SeqLayout(_ops_int(start, q.device), _ops_int(length, q.device), True, max_len)
    if q.dim() != 4:
        raise ValueError(f"the padded layout takes q as [B, N, H, D]; got rank {q.dim()} "
                         "(pass cu_seqlens for a packed [T, H, D] batch)")
    B, N = q.shape[0], q.shape[1]
    if lengths is None:
        _check_padding_side(padding_side)
        # Full-length batches need no check (and no device sync).
        start, length = _full_bounds(B, N, q.device)
        return SeqLayout(start, length, False, N)
    start, length, max_len = padded_bounds(lengths, B, N, padding_side, q.device)
    return SeqLayout(_ops_int(start, q.device), _ops_int(length, q.device), False, max_len)


# (B, N, device, stream) -> the int32 (seq_start, seq_len) of a full-length batch. Two fills per call
# were a visible share of the op's host time at S1 (docs/PERF_NOTES.md v17). Keyed by the stream:
# the tensors are filled on the stream that first asks, so its later kernels are ordered after the
# fill; the kernels only read them. Not used while tracing or capturing (those make their own).
_FULL_BOUNDS: dict[tuple, tuple[Tensor, Tensor]] = {}
_FULL_BOUNDS_MAX = 16


def _full_bounds(B: int, N: int, device: torch.device) -> tuple[Tensor, Tensor]:
    def make() -> tuple[Tensor, Tensor]:
        length = torch.full((B,), N, dtype=torch.int32, device=device)
        return torch.zeros_like(length), length

    if _is_tracing() or device.type == "meta":
        return make()
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (B, N, device, stream)
    hit = _FULL_BOUNDS.get(key)
    if hit is None:
        if len(_FULL_BOUNDS) >= _FULL_BOUNDS_MAX:
            _FULL_BOUNDS.clear()
        hit = _FULL_BOUNDS[key] = make()
    return hit


def _ops_int(x: Tensor, device: torch.device) -> Tensor:
    """A checked int64 bound as the ops take it: contiguous int32 on ``device``."""
    return x.to(device=device, dtype=torch.int32).contiguous()


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")


def padded_bounds(lengths: Union[Tensor, Sequence[int]], B: int, N: int, padding_side: str,
                  device: torch.device) -> tuple[Tensor, Tensor, Optional[int]]:
    """``(seq_start, seq_len, max_len)`` for the ``lengths [B]`` of a padded ``[B, N, ...]`` batch,
    the tensors int64 on ``device``: the valid tokens sit at the end opposite ``padding_side``.
    Values are checked (0 <= length <= N) in int64, before anything narrows them to the ops' int32,
    which would wrap large ones, and before they move to ``device`` (lengths given as a list or a
    CPU tensor are checked on the host, with no round trip through the GPU); eager only, see
    :func:`_validate` (``max_len`` is None when skipped). Shared by the op wrappers and the
    attention modules."""
    _check_padding_side(padding_side)
    length = _int_tensor(lengths, "lengths")
    if length.dtype not in (torch.int32, torch.int64) or length.dim() != 1:
        raise TypeError(f"lengths must be a 1-D integer tensor or list, got {length.dtype} "
                        f"of rank {length.dim()}")
    if length.shape[0] != B:
        raise ValueError(f"lengths has {length.shape[0]} entries for a batch of {B}")
    length = length.to(torch.int64)
    start = torch.zeros_like(length) if padding_side == "right" else N - length
    max_len = _validate(start, length, N, packed=False)
    return start.to(device), length.to(device), max_len


def _int_tensor(x: Union[Tensor, Sequence[int]], name: str) -> Tensor:
    """``x`` as a tensor: tensors pass through, Python sequences become int64 tensors (an empty
    list too) or raise a TypeError that names the argument."""
    if isinstance(x, Tensor):
        return x
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise TypeError(f"{name} must be a 1-D integer tensor or list, got {type(x).__name__} "
                        f"({e})") from None
    return t.to(torch.int64) if t.numel() == 0 else t


def _validate(seq_start: Tensor, seq_len: Tensor, N: int, packed: bool) -> Optional[int]:
    """Value checks that need the lengths on the host (a device sync for CUDA lengths); skipped
    while tracing or capturing, and for meta tensors (the kernels clamp lengths, so bad values there
    cannot go out of bounds). Returns the longest length when it was checked."""
    if _is_tracing() or seq_len.device.type == "meta":
        return None
    if seq_len.numel() == 0:
        return 0
    start, length = seq_start.cpu(), seq_len.cpu()
    # Messages name what the caller passed: cu_seqlens (packed) or lengths (padded).
    if packed and int(start[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(start[0])} (cumulative lengths "
                         f"[0, L_0, L_0 + L_1, ...], not the lengths themselves)")
    if packed and bool((length < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got differences {length.tolist()}")
    if bool((length < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {length.tolist()}")
    # (packed starts are >= 0 from here on; a padded start is below 0 only for a left-padded
    # length above N)
    if bool((start < 0).any()) or bool((start + length > N).any()):
        raise ValueError(f"lengths must be <= the sequence dimension N = {N}, got "
                         f"{length.tolist()} at starts {start.tolist()}")
    return int(length.max())


def _check_kc_rows(kc: Tensor, layout: SeqLayout, compress_stride: int) -> None:
    if compress_stride < 1:  # checked here too: the division below would raise ZeroDivisionError
        raise ValueError(f"compress_stride must be >= 1, got {compress_stride}")
    if layout.max_len is None or kc.dim() != 4:
        return
    need = layout.max_len // compress_stride
    if kc.shape[1] < need:
        raise ValueError(f"kc holds {kc.shape[1]} compressed rows per sequence but the longest "
                         f"sequence needs floor(L / compress_stride) = {need}")


_INT32_MAX = 2**31 - 1


def _check_int_args(**args: int) -> None:
    """Integer hyper-parameters: ints (anything ``operator.index`` takes) within int32. The ops
    check the exact ranges (``window >= 1``, ...) and the raw ops the same int32 bound; a value past
    int64 would otherwise fail in torch's argument parser with a confusing message."""
    for name, value in args.items():
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
        if not -_INT32_MAX <= v <= _INT32_MAX:
            raise ValueError(f"{name} must be within int32 (|{name}| <= {_INT32_MAX}), got {v}")


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1] ** -0.5) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------------
# The raw ops: fake kernels and autograd
# --------------------------------------------------------------------------------------------------
@torch.library.register_fake("blossomrec::select_blocks")
def _select_blocks_fake(q, kc, seq_start, seq_len, compress_stride, select_block, num_select,
                        causal, scale):
    Bq, N, _, _ = q.shape
    KVH = kc.shape[2]
    idx = q.new_empty((Bq, N, KVH, max(num_select, 1)), dtype=torch.int32)
    cnt = q.new_empty((Bq, N, KVH), dtype=torch.int32)
    return idx, cnt


@torch.library.register_fake("blossomrec::sparse_attention_fwd")
def _sparse_attention_fwd_fake(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, select_block,
                               window, power_block, use_power, use_sink, causal, scale):
    Bq, N, H, D = q.shape
    out = q.new_empty((Bq, N, H, D))
    lse = q.new_empty((Bq, N, H, 2), dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out), lse


@torch.library.register_fake("blossomrec::sparse_attention_bwd")
def _sparse_attention_bwd_fake(dout, q, k, v, gates, o_sel, o_win, lse, sel_idx, sel_cnt, seq_start,
                               seq_len, select_block, window, power_block, use_power, use_sink,
                               causal, scale):
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    dgates = gates.new_empty(gates.shape)
    return dq, dk, dv, dgates


# The autograd of sparse_attention_fwd (its backward is sparse_attention_bwd) is registered in C++,
# csrc/autograd.cpp: a Python wrapper cost more host time than S1's kernels take.


# --------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------
def select_blocks(q: Tensor, kc: Tensor, *, lengths: Lengths = None, padding_side: str = "right",
                  cu_seqlens: CuSeqlens = None, compress_stride: int = 16,
                  select_block: int = 16, num_select: int = 4, causal: bool = True,
                  scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """LTIS block selection (SPEC 1b). ``q [B, N, H, D]`` (or packed ``[T, H, D]``),
    ``kc [B, C, KVH, D]`` -> ``sel_idx [B, N, KVH, max(n,1)]`` int32 (-1 past the count) and
    ``sel_cnt [B, N, KVH]`` int32 (packed: without the leading ``B``)."""
    _check_int_args(compress_stride=compress_stride, select_block=select_block,
                    num_select=num_select)
    layout = seq_layout(q, lengths, padding_side, cu_seqlens)
    _check_kc_rows(kc, layout, compress_stride)
    idx, cnt = torch.ops.blossomrec.select_blocks(
        layout.to_rows(q), kc, layout.seq_start, layout.seq_len, compress_stride, select_block,
        num_select, causal, _scale(q, scale))
    return layout.from_rows(idx), layout.from_rows(cnt)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, sel_idx: Tensor,
                     sel_cnt: Tensor, *, lengths: Lengths = None, padding_side: str = "right",
                     cu_seqlens: CuSeqlens = None, select_block: int = 16, window: int = 8,
                     power_block: int = 1, use_power: bool = True, use_sink: bool = True,
                     causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Selected-block + STIS attention with the gated combine (SPEC 1c-3), differentiable w.r.t.
    ``q``, ``k``, ``v`` and ``gates``. Returns ``out`` shaped like ``q``; padding rows are 0.

    ``use_sink`` is ignored when ``causal`` (the sink is a non-causal rule).

    ``sel_idx``/``sel_cnt`` should come from :func:`select_blocks` with the same ``select_block``
    and layout. Other values are safe (nothing is read out of bounds: counts are clipped to
    ``[0, n]``, blocks outside the sequence are skipped) but the CPU and CUDA kernels may treat
    them differently (docs/DESIGN.md, "known gap")."""
    _check_int_args(select_block=select_block, window=window, power_block=power_block)
    layout = seq_layout(q, lengths, padding_side, cu_seqlens)
    return _sparse_attention(layout, q, k, v, gates, sel_idx, sel_cnt, select_block, window,
                             power_block, use_power, use_sink, causal, _scale(q, scale))


def _sparse_attention(layout: SeqLayout, q, k, v, gates, sel_idx, sel_cnt, select_block, window,
                      power_block, use_power, use_sink, causal, scale) -> Tensor:
    r = layout.to_rows
    out, _, _, _ = torch.ops.blossomrec.sparse_attention_fwd(
        r(q), r(k), r(v), r(gates), r(sel_idx), r(sel_cnt), layout.seq_start, layout.seq_len,
        select_block, window, power_block, use_power, use_sink and not causal, causal, scale)
    return layout.from_rows(out)


def blossom_attention(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, gates: Tensor, *,
                      lengths: Lengths = None, padding_side: str = "right",
                      cu_seqlens: CuSeqlens = None, compress_stride: int = 16,
                      select_block: int = 16, num_select: int = 4, window: int = 8,
                      power_block: int = 1, use_power: bool = True, use_sink: bool = True,
                      causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """The whole BlossomRec op: selection (no gradient) then the fused sparse attention.

    ``q [B, N, H, D]``, ``k, v [B, N, KVH, D]``, ``kc [B, C, KVH, D]``, ``gates [B, N, H, 2]`` (or
    packed ``[T, ...]`` with ``cu_seqlens``) -> ``out`` shaped like ``q``."""
    _check_int_args(compress_stride=compress_stride, select_block=select_block,
                    num_select=num_select, window=window, power_block=power_block)
    layout = seq_layout(q, lengths, padding_side, cu_seqlens)
    _check_kc_rows(kc, layout, compress_stride)
    sc = _scale(q, scale)
    with torch.no_grad():
        idx, cnt = torch.ops.blossomrec.select_blocks(
            layout.to_rows(q).detach(), kc.detach(), layout.seq_start, layout.seq_len,
            compress_stride, select_block, num_select, causal, sc)
    return _sparse_attention(layout, q, k, v, gates, layout.from_rows(idx), layout.from_rows(cnt),
                             select_block, window, power_block, use_power, use_sink, causal, sc)
