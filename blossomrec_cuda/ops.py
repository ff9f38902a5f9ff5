"""Typed wrappers over ``torch.ops.blossomrec.*``, their fake (meta) kernels and autograd.

Layouts (docs/DESIGN.md):

- padded: ``q [B, N, H, D]``, ``k, v [B, N, KVH, D]``, ``gates [B, N, H, 2]`` with ``lengths [B]``
  (default: all ``N``) and ``padding_side`` ``"right"`` (valid tokens first) or ``"left"``;
- packed: ``q [T, H, D]``, ``k, v [T, KVH, D]``, ``gates [T, H, 2]`` with ``cu_seqlens [B + 1]``.

``kc`` is always per sequence: ``[B, C, KVH, D]`` with ``C >= floor(L_b / compress_stride)``.

Errors (docs/ERRORS.md): ``TypeError`` for a type (a tensor's dtype, an argument that is not an
int, a tensor or a list), ``ValueError`` for every other bad input (ranks, shapes, strides, devices,
values, ranges, offsets). The wrappers check what they can see before calling an op and word it in
the caller's layout (packed shapes ``[T, ...]``, offsets as ``cu_seqlens[i]``); the ops raise the
same types (csrc/common/checks.h), and so do the fake kernels, which run for meta inputs: an input
on another device than ``q``, the meta device included, is a ``ValueError``. ``RuntimeError`` is
left for internal invariants. Messages name the argument, say what was expected, and list at most a
few offending entries (``"... and N more"``), so their length does not grow with the input.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

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

    @property
    def row_names(self) -> tuple[str, ...]:
        """The leading dims of q, k, v, gates, sel_idx, sel_cnt as the caller passes them."""
        return ("T",) if self.packed else ("B", "N")


# --------------------------------------------------------------------------------------------------
# Short messages
# --------------------------------------------------------------------------------------------------
_MAX_LISTED = 4  # offending entries a message lists before "... and N more"
_MAX_REPR = 60  # characters of a caller's value quoted in a message


def _offending(bad: Tensor, entry: Callable[[int], str]) -> str:
    """``entry(i)`` for the first few indices where the 1-D bool ``bad`` holds, then how many more:
    ``"lengths[3] = 20, lengths[7] = 18 ... and 12 more"``."""
    where = bad.nonzero().flatten()
    shown = ", ".join(entry(i) for i in where[:_MAX_LISTED].tolist())
    more = where.numel() - _MAX_LISTED
    return f"{shown} ... and {more} more" if more > 0 else shown


def _short_repr(x: object) -> str:
    r = repr(x)
    return r if len(r) <= _MAX_REPR else r[: _MAX_REPR - 3] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------------
# Layouts: lengths and cu_seqlens
# --------------------------------------------------------------------------------------------------
def _is_tracing() -> bool:
    """Compiling, or capturing a CUDA graph on the current stream. No capture can run before CUDA
    is initialised: ``is_initialized`` (a flag) rather than ``is_available`` (a driver query, ~1.5
    us, and this runs a few times per eager call)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def seq_layout(q: Tensor, lengths: Lengths = None, padding_side: str = "right",
               cu_seqlens: CuSeqlens = None) -> SeqLayout:
    """Describe a padded (``q [B, N, H, D]``) or packed (``q [T, H, D]`` + ``cu_seqlens``) batch.

    ``cu_seqlens [B + 1]`` starts at 0 and does not decrease; rows from ``cu_seqlens[-1]`` to ``T``
    belong to no sequence (padding: their outputs are 0)."""
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a tensor, got {type(q).__name__}")
    if cu_seqlens is not None:
        if lengths is not None:
            raise ValueError("pass either lengths (padded layout) or cu_seqlens (packed), not both")
        if q.dim() != 3:
            raise ValueError(f"the packed layout takes q as [T, H, D]; got rank {q.dim()}")
        cu_in = _int_tensor(cu_seqlens, "cu_seqlens")
        if cu_in.dim() != 1 or cu_in.numel() < 1:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [B + 1] of cumulative lengths, got "
                             f"shape {list(cu_in.shape)}")
        if cu_in.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_in.dtype}")
        _check_host_readable(cu_in, "cu_seqlens", q.device)
        # Checked in int64, before the narrowing to the ops' int32 (which would wrap large values),
        # and where the values are: host offsets need no round trip through the device.
        cu = cu_in.to(torch.int64)
        max_len = _validate_offsets(cu, q.shape[0])
        start, length = _bounds_to(q.device, torch.int32, cu[:-1], cu[1:] - cu[:-1])
        return SeqLayout(start, length, True, max_len)
    if q.dim() != 4:
        raise ValueError(f"the padded layout takes q as [B, N, H, D]; got rank {q.dim()} "
                         "(pass cu_seqlens for a packed [T, H, D] batch)")
    B, N = q.shape[0], q.shape[1]
    if lengths is None:
        _check_padding_side(padding_side)
        # Full-length batches need no check (and no device sync).
        start, length = _full_bounds(q, B, N)
        return SeqLayout(start, length, False, N)
    start, length, max_len = _padded_bounds(lengths, B, N, padding_side, q.device, torch.int32)
    return SeqLayout(start, length, False, max_len)


# (B, N, device, stream) -> the int32 (seq_start, seq_len) of a full-length batch. Two fills per call
# were a visible share of the op's host time at S1 (docs/PERF_NOTES.md v17). Keyed by the stream:
# the tensors are filled on the stream that first asks, so its later kernels are ordered after the
# fill; the kernels only read them (and nobody may write them: seq_layout hands them out). Only plain
# tensors outside tracing, capture and inference mode use the cache: a fake, functional or inference
# tensor kept there would break later eager or training calls (an inference tensor cannot be saved
# for backward).
_FULL_BOUNDS: dict[tuple, tuple[Tensor, Tensor]] = {}
_FULL_BOUNDS_MAX = 16


def _full_bounds(q: Tensor, B: int, N: int) -> tuple[Tensor, Tensor]:
    device = q.device

    def make() -> tuple[Tensor, Tensor]:
        length = torch.full((B,), N, dtype=torch.int32, device=device)
        return torch.zeros_like(length), length

    if (_is_tracing() or device.type == "meta" or type(q) is not Tensor
            or torch.is_inference_mode_enabled()):
        return make()
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (B, N, device, stream)
    hit = _FULL_BOUNDS.get(key)
    if hit is None:
        if len(_FULL_BOUNDS) >= _FULL_BOUNDS_MAX:
            _FULL_BOUNDS.clear()
        hit = _FULL_BOUNDS[key] = make()
    return hit


def _bounds_to(device: torch.device, dtype: torch.dtype, start: Optional[Tensor],
               length: Tensor) -> tuple[Tensor, Tensor]:
    """Checked bounds as contiguous ``dtype`` tensors on ``device``; ``start`` None: every
    sequence starts at row 0 (right padding), written as zeros where the bounds are made instead
    of built on the host and copied (one small operator less per call: the eager module is
    host-bound at short sequences, docs/PERF_NOTES.md). From the host to a GPU in one pinned,
    asynchronous copy (written straight into the pinned buffer: each small host op costs
    microseconds): a copy from pageable memory waits for the work already queued on the stream, a
    device sync per call (R1's eager op was host-bound by it, docs/PERF_NOTES.md v17)."""
    length_on_host = length.device.type == "cpu"
    start_on_host = start is not None and start.device.type == "cpu"
    if length_on_host and (start is None or start_on_host) and _host_to_gpu(length, device):
        both = torch.empty((2, length.shape[0]), dtype=dtype, pin_memory=True)
        if start is None:
            both[0].zero_()
        else:
            both[0].copy_(start)
        both[1].copy_(length)
        both = both.to(device, non_blocking=True)
        return both[0], both[1]
    if (device.type == "cuda" and (length_on_host or start_on_host)
            and torch.cuda.is_current_stream_capturing()):
        raise ValueError("lengths and cu_seqlens must be on q's device while a CUDA graph is "
                         "captured: a capture cannot copy them from the host")
    length = _to_contiguous(length, device, dtype)
    start = torch.zeros_like(length) if start is None else _to_contiguous(start, device, dtype)
    return start, length


def _to_contiguous(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``x.to(device, dtype).contiguous()`` without the calls that would return ``x`` itself."""
    if x.dtype != dtype or x.device != device:
        x = x.to(device=device, dtype=dtype)
    return x if x.is_contiguous() else x.contiguous()


def _host_to_gpu(x: Tensor, device: torch.device) -> bool:
    """Host values bound for a GPU outside a capture (a captured call cannot copy from the host)."""
    return device.type == "cuda" and x.device.type == "cpu" and not _is_tracing()


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {_short_repr(padding_side)}")


def _check_host_readable(x: Tensor, name: str, device: torch.device) -> None:
    """Lengths and offsets may live on the host or on q's device, but a meta tensor holds no values
    to check or to copy: allowed only with a meta q."""
    if x.device.type == "meta" and torch.device(device).type != "meta":
        raise ValueError(f"{name} must hold values: it is on the meta device but q is on {device} "
                         f"(pass it on the host or on q's device)")


def padded_bounds(lengths: Union[Tensor, Sequence[int]], B: int, N: int, padding_side: str,
                  device: torch.device) -> tuple[Tensor, Tensor, Optional[int]]:
    """``(seq_start, seq_len, max_len)`` for the ``lengths [B]`` of a padded ``[B, N, ...]`` batch,
    the tensors int64 on ``device``: the valid tokens sit at the end opposite ``padding_side``.
    Values are checked (0 <= length <= N) in int64, before anything narrows them to the ops' int32,
    which would wrap large ones, and before they move to ``device`` (lengths given as a list or a
    CPU tensor are checked on the host, with no round trip through the GPU); eager only, see
    :func:`_skip_value_checks` (``max_len`` is None when skipped). Shared by the op wrappers and the
    attention modules."""
    return _padded_bounds(lengths, B, N, padding_side, device, torch.int64)


def _padded_bounds(lengths: Union[Tensor, Sequence[int]], B: int, N: int, padding_side: str,
                   device: torch.device, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Optional[int]]:
    _check_padding_side(padding_side)
    length = _int_tensor(lengths, "lengths")
    if length.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be a 1-D integer tensor or list, got {length.dtype}")
    if length.dim() != 1:
        raise ValueError(f"lengths must be a 1-D integer tensor or list [B], got rank "
                         f"{length.dim()}")
    if length.shape[0] != B:
        raise ValueError(f"lengths has {length.shape[0]} entries for a batch of {B}")
    _check_host_readable(length, "lengths", device)
    length = length.to(torch.int64)
    max_len = _validate_lengths(length, N)
    start = None if padding_side == "right" else N - length  # None: zeros, made on `device`
    start, length = _bounds_to(device, dtype, start, length)
    return start, length, max_len


def _int_tensor(x: Union[Tensor, Sequence[int]], name: str) -> Tensor:
    """``x`` as a tensor: tensors pass through, Python sequences become int64 tensors (an empty
    list too) or raise a TypeError that names the argument."""
    if isinstance(x, Tensor):
        return x
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise TypeError(f"{name} must be a 1-D integer tensor or list, got {type(x).__name__} "
                        f"({_short_repr(str(e))})") from None
    return t.to(torch.int64) if t.numel() == 0 else t


def _skip_value_checks(x: Tensor) -> bool:
    """Value checks need the values on the host (a device sync for CUDA ones): skipped while
    tracing or capturing, and for meta tensors (the kernels clamp lengths, so bad values there
    cannot go out of bounds)."""
    return _is_tracing() or x.device.type == "meta"


def _validate_lengths(length: Tensor, N: int) -> Optional[int]:
    """``0 <= lengths[b] <= N`` for int64 ``lengths [B]``; returns the longest, None if skipped."""
    if _skip_value_checks(length):
        return None
    if length.numel() == 0:
        return 0
    length = length.cpu()
    lo, hi = (int(x) for x in torch.aminmax(length))  # one pass; the messages only on failure
    if lo >= 0 and hi <= N:
        return hi

    def entry(i: int) -> str:
        return f"lengths[{i}] = {int(length[i])}"

    if bool((length < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {_offending(length < 0, entry)}")
    if bool((length > N).any()):
        raise ValueError(f"lengths must be <= the sequence dimension N = {N}, got "
                         f"{_offending(length > N, entry)}")
    return int(length.max())


def _validate_offsets(cu: Tensor, T: int) -> Optional[int]:
    """``cu_seqlens [B + 1]`` (int64) are offsets into q's ``T`` rows: ``cu_seqlens[0] = 0``,
    non-decreasing, ``cu_seqlens[-1] <= T``. Returns the longest sequence, None if skipped."""
    if _skip_value_checks(cu):
        return None
    cu = cu.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])} (offsets "
                         f"[0, L_0, L_0 + L_1, ...] into q's rows, not the lengths themselves)")
    decreasing = cu[1:] < cu[:-1]
    if bool(decreasing.any()):
        def entry(i: int) -> str:
            return f"cu_seqlens[{i + 1}] = {int(cu[i + 1])} < cu_seqlens[{i}] = {int(cu[i])}"
        raise ValueError(f"cu_seqlens must be non-decreasing (offsets of the sequences in q's "
                         f"rows), got {_offending(decreasing, entry)}")
    if int(cu[-1]) > T:
        raise ValueError(f"cu_seqlens[-1] = {int(cu[-1])} exceeds the T = {T} rows of q (the last "
                         f"offset is the end of the last sequence; rows after it are padding)")
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _check_kc_rows(kc: Tensor, layout: SeqLayout, compress_stride: int) -> None:
    if layout.max_len is None:
        return
    need = layout.max_len // compress_stride
    if kc.shape[1] < need:
        raise ValueError(f"kc holds {kc.shape[1]} compressed rows per sequence but the longest "
                         f"sequence needs floor(L / compress_stride) = {need}")


# --------------------------------------------------------------------------------------------------
# Tensors and hyper-parameters (the rules of csrc/common/checks.h, in the caller's layout)
# --------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HEAD_DIMS = (16, 32, 64, 128)
_MAX_GROUP = 8
_MAX_SELECT = 64


def _check_rank(t: Tensor, name: str, dims: tuple[str, ...]) -> None:
    if t.dim() != len(dims):
        raise ValueError(f"{name} must have rank {len(dims)} [{', '.join(dims)}], got rank "
                         f"{t.dim()}")


def _check_shape(t: Tensor, name: str, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_dtype(t: Tensor, name: str, allowed: tuple[torch.dtype, ...], rule: str) -> None:
    """``rule`` completes "``name`` must ...": ``"be int32"``, ``"have q's dtype (float32)"``."""
    if t.dtype not in allowed:
        raise TypeError(f"{name} must {rule}, got {_dtype_name(t.dtype)}")


def _check_inputs(q: Tensor, rows: tuple[str, ...], num_seqs: int, *, k: Optional[Tensor] = None,
                  v: Optional[Tensor] = None, kc: Optional[Tensor] = None,
                  gates: Optional[Tensor] = None, sel_idx: Optional[Tensor] = None,
                  sel_cnt: Optional[Tensor] = None, saved: Optional[dict[str, Tensor]] = None,
                  lse: Optional[Tensor] = None, sizes: bool = True) -> None:
    """The tensor checks of the ops for ``q [*rows, H, D]`` and whichever of the other inputs are
    given, ``rows`` naming q's leading dims (``("B", "N")``, ``("T",)``, the ops' ``("Bq", "N")``);
    ``saved`` are forward outputs shaped and typed like q (the backward's ``dout``, ``o_sel``,
    ``o_win``). Devices, dtypes and ranks always; sizes and strides unless ``sizes`` is False
    (symbolic shapes in a fake kernel, where a Python comparison would add a guard).

    Every eager call of the wrappers runs this (the eager module is host-bound at short sequences,
    docs/PERF_NOTES.md), so each rule is a plain comparison and the helpers that word an error
    (``_check_rank``, ``_check_dtype``, ``_check_shape``) are called only for an input that fails
    it; the order of the rules, and so which error a bad call gets, is that of the ops."""
    given = [(name, t) for name, t in (("k", k), ("v", v), ("kc", kc), ("gates", gates),
                                        ("sel_idx", sel_idx), ("sel_cnt", sel_cnt), ("lse", lse))
             if t is not None]
    if saved:
        given += [(name, t) for name, t in saved.items() if t is not None]
    device = q.device
    for name, t in given:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} must be on the same device as q ({device}), got {t.device}")

    rank = len(rows) + 2  # q, k, v, gates, sel_idx, lse, saved: [*rows, heads, last]
    if q.dim() != rank:
        _check_rank(q, "q", (*rows, "H", "D"))
    for name, t in (("k", k), ("v", v)):
        if t is not None and t.dim() != rank:
            _check_rank(t, name, (*rows, "KVH", "D"))
    if saved:
        for name, t in saved.items():
            if t.dim() != rank:
                _check_rank(t, name, (*rows, "H", "D"))
    if kc is not None and kc.dim() != 4:
        _check_rank(kc, "kc", ("B", "C", "KVH", "D"))
    if gates is not None and gates.dim() != rank:
        _check_rank(gates, "gates", (*rows, "H", "2"))
    if lse is not None and lse.dim() != rank:
        _check_rank(lse, "lse", (*rows, "H", "2"))
    if sel_idx is not None and sel_idx.dim() != rank:
        _check_rank(sel_idx, "sel_idx", (*rows, "KVH", "n"))
    if sel_cnt is not None and sel_cnt.dim() != rank - 1:
        _check_rank(sel_cnt, "sel_cnt", (*rows, "KVH"))

    dtype = q.dtype
    if dtype not in _FLOAT_DTYPES:
        _check_dtype(q, "q", _FLOAT_DTYPES, "be float32, float16, bfloat16 or float64")
    for name, t in (("k", k), ("v", v), ("kc", kc), *(saved.items() if saved else ())):
        if t is not None and t.dtype != dtype:
            _check_dtype(t, name, (dtype,), f"have q's dtype ({_dtype_name(dtype)})")
    if gates is not None and gates.dtype != dtype and gates.dtype != torch.float32:
        _check_dtype(gates, "gates", (dtype, torch.float32),
                     f"have q's dtype ({_dtype_name(dtype)}) or float32")
    for name, t in (("sel_idx", sel_idx), ("sel_cnt", sel_cnt)):
        if t is not None and t.dtype != torch.int32:
            _check_dtype(t, name, (torch.int32,), "be int32")
    if lse is not None and lse.dtype != torch.float32:
        _check_dtype(lse, "lse", (torch.float32,), "be float32")

    if not sizes:
        return
    for name, t in (("q", q), *given):
        # (an empty tensor addresses no element: any stride will do, as in checks.h; the ranks
        # above make stride(-1) valid for every tensor here)
        if t.stride(-1) != 1 and name != "sel_cnt" and t.numel() > 0 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got stride "
                             f"{t.stride(-1)}")

    shape = q.shape
    lead, H, D = tuple(shape[:-2]), shape[-2], shape[-1]
    if D not in _HEAD_DIMS:
        raise ValueError(f"head dim must be one of 16, 32, 64, 128, got {D}")
    # the kv heads: k's where given (the attention), else kc's (the selection alone)
    KVH = k.shape[-2] if k is not None else kc.shape[2]
    kv_shape = (*lead, KVH, D)
    if k is not None and k.shape != kv_shape:
        _check_shape(k, "k", kv_shape)
    if v is not None and v.shape != kv_shape:
        _check_shape(v, "v", kv_shape)
    if kc is not None:
        if kc.shape[0] != num_seqs:
            raise ValueError(f"kc's batch ({kc.shape[0]}) must equal the number of sequences "
                             f"({num_seqs})")
        if kc.shape[3] != D:
            raise ValueError(f"kc's head dim ({kc.shape[3]}) must equal q's ({D})")
        if kc.shape[2] != KVH:
            raise ValueError(f"kc must have k's {KVH} kv heads, got {kc.shape[2]}")
    if KVH < 1 or H % KVH != 0:
        raise ValueError(f"the number of query heads ({H}) must be divisible by the number of kv "
                         f"heads ({KVH})")
    if H // KVH > _MAX_GROUP:
        raise ValueError(f"group size H / KVH must be 1..{_MAX_GROUP}, got {H // KVH}")
    if gates is not None and gates.shape != (*lead, H, 2):
        _check_shape(gates, "gates", (*lead, H, 2))
    if sel_idx is not None and (tuple(sel_idx.shape[:-1]) != (*lead, KVH) or sel_idx.shape[-1] < 1):
        want = ", ".join(str(n) for n in (*lead, KVH))
        raise ValueError(f"sel_idx must have shape [{', '.join(rows)}, KVH, n] = [{want}, n>=1], "
                         f"got {list(sel_idx.shape)}")
    if sel_cnt is not None and sel_cnt.shape != (*lead, KVH):
        _check_shape(sel_cnt, "sel_cnt", (*lead, KVH))
    if saved:
        for name, t in saved.items():
            if t.shape != shape:
                _check_shape(t, name, shape)
    if lse is not None and lse.shape != (*lead, H, 2):
        _check_shape(lse, "lse", (*lead, H, 2))


_INT32_MAX = 2**31 - 1


def _check_int_args(**args: int) -> None:
    """Integer hyper-parameters: ints (anything ``operator.index`` takes) within int32, checked
    before anything else sees them (a value past int64 would fail in torch's argument parser with
    a confusing message)."""
    for name, value in args.items():
        if isinstance(value, bool):  # an int to operator.index: window=True would read as 1
            raise TypeError(f"{name} must be an int, got bool")
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
        if not -_INT32_MAX <= v <= _INT32_MAX:
            raise ValueError(f"{name} must be within int32 (|{name}| <= {_INT32_MAX}), got {v}")


def _check_bool_args(**args: bool) -> None:
    """Switches (causal, use_power, use_sink) must be bools: ``causal=None`` would otherwise read as
    False, non-causal attention that sees future keys, without an error."""
    for name, value in args.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} "
                            f"{_short_repr(value)}")


def _check_hparam_max(**args: int) -> None:
    """The ops' bound on positions (checks.h's check_hparam_max): the wrappers' _check_int_args has
    run first, so this fires for the fake kernels only."""
    for name, value in args.items():
        if value > _INT32_MAX:
            raise ValueError(f"{name} must be <= {_INT32_MAX} (int32), got {value}")


def _check_select_hparams(compress_stride: int, select_block: int, num_select: int) -> None:
    _check_hparam_max(compress_stride=compress_stride, select_block=select_block)
    if compress_stride < 1:
        raise ValueError(f"compress_stride must be >= 1, got {compress_stride}")
    if select_block < compress_stride or select_block % compress_stride != 0:
        raise ValueError(f"select_block ({select_block}) must be a positive multiple of "
                         f"compress_stride ({compress_stride})")
    if not 0 <= num_select <= _MAX_SELECT:
        raise ValueError(f"num_select must be 0..{_MAX_SELECT}, got {num_select}")


def _check_attention_hparams(select_block: int, window: int, power_block: int) -> None:
    _check_hparam_max(select_block=select_block, window=window, power_block=power_block)
    for name, value in (("select_block", select_block), ("window", window),
                        ("power_block", power_block)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _real(value: object, name: str) -> float:
    """A finite real number (int, float, numpy or 0-dim tensor values) as a float."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _scale(q: Tensor, scale: Optional[float]) -> float:
    """The softmax scale: ``D ** -0.5`` by default, else a finite real number."""
    return float(q.shape[-1] ** -0.5) if scale is None else _real(scale, "scale")


# --------------------------------------------------------------------------------------------------
# The raw ops: fake kernels and autograd
# --------------------------------------------------------------------------------------------------
# The fake kernels run for meta tensors and under torch.compile's fake tensors, where the C++ checks
# do not: they run the same checks (sizes only where they are plain ints), so that a meta call fails
# as a CPU call would. One meta input among CPU or CUDA ones also lands here (the dispatcher picks
# the meta kernel), which the device check refuses instead of returning empty tensors on q's device.
_OP_ROWS = ("Bq", "N")


def _concrete(*tensors: Tensor) -> bool:
    return all(isinstance(n, int) for t in tensors for n in t.shape)


def _check_raw_seq(q: Tensor, seq_start: Tensor, seq_len: Tensor, sizes: bool) -> None:
    """seq_start / seq_len as checks.h takes them: [B] int32 on q's device, B = Bq or Bq = 1."""
    for name, t in (("seq_start", seq_start), ("seq_len", seq_len)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
        _check_rank(t, name, ("B",))
        _check_dtype(t, name, (torch.int32,), "be int32")
    if sizes and seq_start.shape[0] != seq_len.shape[0]:
        raise ValueError(f"seq_start and seq_len must have the same length, got "
                         f"{seq_start.shape[0]} and {seq_len.shape[0]}")
    if sizes and q.dim() == 4 and q.shape[0] not in (seq_len.shape[0], 1):
        raise ValueError(f"q's batch ({q.shape[0]}) must equal the number of sequences "
                         f"({seq_len.shape[0]}) or be 1 for the packed layout")


@torch.library.register_fake("blossomrec::select_blocks")
def _select_blocks_fake(q, kc, seq_start, seq_len, compress_stride, select_block, num_select,
                        causal, scale):
    sizes = _concrete(q, kc, seq_start, seq_len)
    _check_raw_seq(q, seq_start, seq_len, sizes)
    _check_inputs(q, _OP_ROWS, seq_len.shape[0], kc=kc, sizes=sizes)
    _check_select_hparams(compress_stride, select_block, num_select)
    Bq, N, _, _ = q.shape
    KVH = kc.shape[2]
    idx = q.new_empty((Bq, N, KVH, max(num_select, 1)), dtype=torch.int32)
    cnt = q.new_empty((Bq, N, KVH), dtype=torch.int32)
    return idx, cnt


def _check_raw_attention(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, select_block,
                         window, power_block, use_sink, causal, saved=None, lse=None) -> None:
    tensors = [q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, *(saved or {}).values()]
    sizes = _concrete(*tensors, *([] if lse is None else [lse]))
    _check_raw_seq(q, seq_start, seq_len, sizes)
    _check_inputs(q, _OP_ROWS, seq_len.shape[0], k=k, v=v, gates=gates, sel_idx=sel_idx,
                  sel_cnt=sel_cnt, saved=saved, lse=lse, sizes=sizes)
    _check_attention_hparams(select_block, window, power_block)
    if use_sink and causal:
        raise ValueError("use_sink applies to non-causal attention only")


@torch.library.register_fake("blossomrec::sparse_attention_fwd")
def _sparse_attention_fwd_fake(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, select_block,
                               window, power_block, use_power, use_sink, causal, scale):
    _check_raw_attention(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, select_block,
                         window, power_block, use_sink, causal)
    Bq, N, H, D = q.shape
    out = q.new_empty((Bq, N, H, D))
    lse = q.new_empty((Bq, N, H, 2), dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out), lse


@torch.library.register_fake("blossomrec::sparse_attention_bwd")
def _sparse_attention_bwd_fake(dout, q, k, v, gates, o_sel, o_win, lse, sel_idx, sel_cnt, seq_start,
                               seq_len, select_block, window, power_block, use_power, use_sink,
                               causal, scale):
    _check_raw_attention(q, k, v, gates, sel_idx, sel_cnt, seq_start, seq_len, select_block,
                         window, power_block, use_sink, causal,
                         saved=dict(dout=dout, o_sel=o_sel, o_win=o_win), lse=lse)
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    dgates = gates.new_empty(gates.shape)
    return dq, dk, dv, dgates


def _check_rope(x: Tensor, seq_start: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have rank 4 [B, N, heads, D], got rank {x.dim()}")
    _check_dtype(x, "x", _FLOAT_DTYPES, "be float32, float16, bfloat16 or float64")
    if x.shape[3] <= 0 or x.shape[3] % 2:
        raise ValueError(f"the rotary head dim must be positive and even, got {x.shape[3]}")
    if x.numel() and x.shape[3] > 1 and x.stride(3) != 1:
        raise ValueError(f"x must have a contiguous last dimension, got stride {x.stride(3)}")
    if seq_start.device != x.device:
        raise ValueError(f"seq_start must be on x's device ({x.device}), got {seq_start.device}")
    if seq_start.dim() != 1 or seq_start.shape[0] != x.shape[0]:
        raise ValueError(f"seq_start must have shape [B] = [{x.shape[0]}], got "
                         f"{list(seq_start.shape)}")
    if seq_start.dtype != torch.int32:
        raise TypeError(f"seq_start must be int32, got {_dtype_name(seq_start.dtype)}")


@torch.library.register_fake("blossomrec::rope")
def _rope_fake(x, seq_start, theta, inverse):
    _check_rope(x, seq_start)
    return x.new_empty(x.shape)


def _check_compress_windows(k: Tensor, seq_start: Tensor, pos: Tensor, l: int, s: int) -> None:
    """compress_windows' inputs as checks.h takes them (check_compress_windows_inputs)."""
    if k.dim() != 4:
        raise ValueError(f"k must have rank 4 [B, N, KVH, D], got rank {k.dim()}")
    _check_dtype(k, "k", _FLOAT_DTYPES, "be float32, float16, bfloat16 or float64")
    if k.numel() and k.shape[3] > 1 and k.stride(3) != 1:
        raise ValueError(f"k must have a contiguous last dimension, got stride {k.stride(3)}")
    if not (s >= 1 and l >= s):
        raise ValueError(f"need 0 < compress_stride <= compress_block_size, got "
                         f"compress_stride={s}, compress_block_size={l}")
    _check_hparam_max(compress_block_size=l)
    if seq_start.device != k.device:
        raise ValueError(f"seq_start must be on k's device ({k.device}), got {seq_start.device}")
    if seq_start.dim() != 1 or seq_start.shape[0] != k.shape[0]:
        raise ValueError(f"seq_start must have shape [B] = [{k.shape[0]}], got "
                         f"{list(seq_start.shape)}")
    _check_dtype(seq_start, "seq_start", (torch.int32,), "be int32")
    if pos.device != k.device:
        raise ValueError(f"pos must be on k's device ({k.device}), got {pos.device}")
    _check_shape(pos, "pos", (k.shape[2], l, k.shape[3]))
    if pos.dtype != k.dtype:  # (the rule's words only for a failing call: eager host time)
        _check_dtype(pos, "pos", (k.dtype,), f"have k's dtype ({_dtype_name(k.dtype)})")


@torch.library.register_fake("blossomrec::compress_windows")
def _compress_windows_fake(k, seq_start, pos, l, s):
    _check_compress_windows(k, seq_start, pos, l, s)
    B, N, KVH, D = k.shape
    return k.new_empty((B, N // s, KVH, l * D))


def _compress_windows(k: Tensor, seq_start: Tensor, pos: Tensor, l: int, s: int) -> Tensor:
    """BlossomAttention.compress_keys' windows in one op: ``k [B, N, KVH, D]`` (any strides with a
    contiguous last dim), ``seq_start [B]`` int32 on k's device, ``pos [KVH, l, D]`` in k's dtype
    -> ``[B, N // s, KVH, l * D]`` contiguous, window ``c`` at position ``t`` holding row
    ``clamp(seq_start[b] + c*s - (l - s) + t, 0, N - 1)`` of k (zeros where ``c*s - (l - s) + t <
    0``) plus ``pos[:, t]``: bitwise the module's PyTorch statement (shift_to_start, a cat with
    zeros, unfold, + pos). No autograd (the module calls it on detached keys under no_grad)."""
    _check_int_args(compress_block_size=l, compress_stride=s)
    _check_compress_windows(k, seq_start, pos, l, s)
    return torch.ops.blossomrec.compress_windows(k, seq_start, pos, l, s)


# The autograd of sparse_attention_fwd (its backward is sparse_attention_bwd) and of rope (rope the
# other way) is registered in C++, csrc/autograd.cpp: a Python wrapper cost more host time than S1's
# kernels take.


# --------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------
def select_blocks(q: Tensor, kc: Tensor, *, lengths: Lengths = None, padding_side: str = "right",
                  cu_seqlens: CuSeqlens = None, compress_stride: int = 16,
                  select_block: int = 16, num_select: int = 4, causal: bool = True,
                  scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """LTIS block selection (docs/ALGORITHM.md, SPEC 1b): for each query and kv group, the
    ``num_select`` past blocks whose mean compressed key scores highest against the group's mean
    query (no gradient).

    Returns ``sel_idx [B, N, KVH, max(num_select, 1)]`` int32 (block indices by decreasing score,
    -1 past the count) and ``sel_cnt [B, N, KVH]`` int32 (packed: without the leading ``B``);
    padding rows hold -1 and 0. Takes q, kc, the layout and compress_stride, select_block,
    num_select, causal, scale as :func:`blossom_attention` describes them."""
    _check_int_args(compress_stride=compress_stride, select_block=select_block,
                    num_select=num_select)
    _check_bool_args(causal=causal)
    _check_select_hparams(compress_stride, select_block, num_select)
    layout = seq_layout(q, lengths, padding_side, cu_seqlens)
    _check_inputs(q, layout.row_names, layout.seq_len.shape[0], kc=kc)
    _check_kc_rows(kc, layout, compress_stride)
    sc = _scale(q, scale)  # checked before the op is looked up: no call with a bad scale
    idx, cnt = torch.ops.blossomrec.select_blocks(
        layout.to_rows(q), kc, layout.seq_start, layout.seq_len, compress_stride, select_block,
        num_select, causal, sc)
    return layout.from_rows(idx), layout.from_rows(cnt)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, sel_idx: Tensor,
                     sel_cnt: Tensor, *, lengths: Lengths = None, padding_side: str = "right",
                     cu_seqlens: CuSeqlens = None, select_block: int = 16, window: int = 8,
                     power_block: int = 1, use_power: bool = True, use_sink: bool = True,
                     causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Selected-block + STIS attention with the gated combine (SPEC 1c-3), differentiable w.r.t.
    ``q``, ``k``, ``v`` and ``gates``. Returns ``out`` shaped like ``q``; padding rows are 0.
    Arguments as :func:`blossom_attention` describes them, with ``sel_idx`` / ``sel_cnt`` in
    place of ``kc`` (:func:`select_blocks`'s outputs).

    ``use_sink`` is ignored when ``causal`` (the sink is a non-causal rule).

    ``sel_idx``/``sel_cnt`` should come from :func:`select_blocks` with the same ``select_block``
    and layout. Other values are safe and treated alike by every backend: counts are clipped to
    ``[0, n]``, a block listed twice is attended once, and entries that are not visible whole
    blocks of the sequence (negative, past its ``floor(L / select_block)`` whole blocks, the
    query's own block, causal: not ending before the own block) are skipped (docs/DESIGN.md)."""
    _check_int_args(select_block=select_block, window=window, power_block=power_block)
    _check_bool_args(use_power=use_power, use_sink=use_sink, causal=causal)
    _check_attention_hparams(select_block, window, power_block)
    layout = seq_layout(q, lengths, padding_side, cu_seqlens)
    _check_inputs(q, layout.row_names, layout.seq_len.shape[0], k=k, v=v, gates=gates,
                  sel_idx=sel_idx, sel_cnt=sel_cnt)
    sc = _scale(q, scale)
    return _sparse_attention(layout, q, k, v, gates, sel_idx, sel_cnt, select_block, window,
                             power_block, use_power, use_sink, causal, sc)


def _sparse_attention(layout: SeqLayout, q, k, v, gates, sel_idx, sel_cnt, select_block, window,
                      power_block, use_power, use_sink, causal, scale) -> Tensor:
    r = layout.to_rows
    out, _, _, _ = torch.ops.blossomrec.sparse_attention_fwd(
        r(q), r(k), r(v), r(gates), r(sel_idx), r(sel_cnt), layout.seq_start, layout.seq_len,
        select_block, window, power_block, use_power, use_sink and not causal, causal, scale)
    return layout.from_rows(out)


def blossom_attention(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, gates: Tensor, *,
                      lengths: Lengths = None, padding_side: str = "right",
                      cu_seqlens: CuSeqlens = None, layout: Optional[SeqLayout] = None,
                      compress_stride: int = 16, select_block: int = 16, num_select: int = 4,
                      window: int = 8, power_block: int = 1, use_power: bool = True,
                      use_sink: bool = True, causal: bool = True,
                      scale: Optional[float] = None) -> Tensor:
    """The whole BlossomRec op: block selection (no gradient), then both sparse branches and the
    gated combine, ``out = gates[..., 0] * LTIS + gates[..., 1] * STIS`` (docs/ALGORITHM.md).
    Returns ``out`` shaped like ``q``; padding rows (and their gradients) are exactly 0;
    differentiable w.r.t. q, k, v and gates.

    Inputs (padded layout; packed: drop ``B, N`` for ``T`` and pass ``cu_seqlens``):
        q: ``[B, N, H, D]`` float16 / bfloat16 / float32 (float64 on the CPU), ``D`` in
            {16, 32, 64, 128}, any strides with a contiguous last dim.
        k, v: ``[B, N, KVH, D]``, q's dtype; ``H`` a multiple of ``KVH`` with ``H / KVH <= 8``
            (grouped-query attention: query head h reads kv head ``h // (H / KVH)``).
        kc: ``[B, C, KVH, D]`` compressed keys per sequence (``C >= floor(L_b / compress_stride)``;
            BlossomAttention's compressor makes them), q's dtype; gets no gradient.
        gates: ``[B, N, H, 2]`` branch weights (not logits: sigmoid outputs, typically in [0, 1]),
            ``[..., 0]`` for LTIS and ``[..., 1]`` for STIS; q's dtype or float32.
        lengths: ``[B]`` valid tokens per row (a list or an int tensor, best on the host: lengths
            on the GPU cost a device sync per call for the range check), placed at the start
            (``padding_side="right"``) or the end (``"left"``) of each row; default all ``N``.
        cu_seqlens: ``[B + 1]`` cumulative lengths of a packed ``[T, ...]`` batch (rows from
            ``cu_seqlens[-1]`` to ``T`` are padding).
    Hyper-parameters (keyword-only; docs/ALGORITHM.md):
        compress_stride (16): positions per compressed key (kc row); >= 1.
        select_block (16): the LTIS block size b, a multiple of compress_stride.
        num_select (4): n, the selected blocks per query and kv group besides its own, 0..64;
            blocks whose softmax probability is below 1e-10 are dropped.
        window (8): STIS window w in power blocks, >= 1 (query i sees block distances 0..w-1,
            and -(w-1)..w-1 when not causal).
        power_block (1): p, STIS positions per power block, >= 1; keys at power-of-two block
            distances beyond the window are seen when ``use_power``.
        use_power (True): the power-of-two distances of STIS.
        use_sink (True): non-causal only, every query also sees the sequence's last key.
        causal (True): no key after the query, in either branch.
        scale (``D ** -0.5``): the softmax scale of both branches and of the selection scores.
        layout: instead of ``lengths`` / ``cu_seqlens``, a :class:`SeqLayout` (each sequence's
            first row and length, as :func:`seq_layout` builds it, or as a caller with its own
            padding rule does: the modules), used as given (int32 on q's device; the kernels
            clamp the bounds to the buffer, their values are not checked again).
    Errors: ValueError for values and shapes, TypeError for types (docs/ERRORS.md)."""
    _check_int_args(compress_stride=compress_stride, select_block=select_block,
                    num_select=num_select, window=window, power_block=power_block)
    _check_bool_args(use_power=use_power, use_sink=use_sink, causal=causal)
    _check_select_hparams(compress_stride, select_block, num_select)
    _check_attention_hparams(select_block, window, power_block)
    if layout is None:
        layout = seq_layout(q, lengths, padding_side, cu_seqlens)
    elif not isinstance(layout, SeqLayout):
        raise TypeError(f"layout must be a SeqLayout, got {type(layout).__name__}")
    elif lengths is not None or cu_seqlens is not None:
        raise ValueError("pass either layout or lengths / cu_seqlens, not both")
    _check_inputs(q, layout.row_names, layout.seq_len.shape[0], k=k, v=v, kc=kc, gates=gates)
    _check_kc_rows(kc, layout, compress_stride)
    sc = _scale(q, scale)
    # No gradient: the op has no autograd and its inputs are detached (no graph to record; a
    # no_grad block around it cost more host time than the op's own dispatch at small sizes). kc
    # needs it only where it requires grad (the modules' kc is made under no_grad).
    idx, cnt = torch.ops.blossomrec.select_blocks(
        layout.to_rows(q).detach(), kc.detach() if kc.requires_grad else kc, layout.seq_start,
        layout.seq_len, compress_stride, select_block, num_select, causal, sc)
    return _sparse_attention(layout, q, k, v, gates, layout.from_rows(idx), layout.from_rows(cnt),
                             select_block, window, power_block, use_power, use_sink, causal, sc)


def rope(x: Tensor, seq_start: Optional[Tensor] = None, theta: float = 10000.0) -> Tensor:
    """Rotary position embedding, one kernel forward and one backward (the modules' RoPE).

    ``x [B, N, heads, D]`` (any strides with a contiguous last dim, ``D`` even; float32, float16,
    bfloat16 or float64) is turned pairwise: dims ``(2m, 2m+1)`` of row ``n`` of sequence ``b`` by
    the angle ``pos * theta ** (-2m / D)`` with ``pos = max(n - seq_start[b], 0)``, the position
    relative to the sequence's first valid row (``seq_start [B]``, integer, on x's device; default
    all 0). Returns a new contiguous tensor of x's shape and dtype; differentiable w.r.t. ``x``.

    The same function as :func:`blossomrec_cuda.reference.apply_rope` at those positions, computed
    in the same precision (float32 for float32 / float16 / bfloat16, float64 for float64) except
    that ``theta ** (-2m / D)``, cos and sin are evaluated in float64 and rounded once: as accurate
    as the reference against the float64 statement, and equal to it up to a few units in the last
    place where the reference's float32 frequencies are correctly rounded (the power-of-two head
    dims); elsewhere the two differ by up to pos times one ulp of a frequency. An int64
    ``seq_start`` is checked to fit in int32 (eager mode; a device sync for a GPU tensor).
    Errors: ValueError for values and shapes, TypeError for types."""
    if seq_start is None:
        seq_start = torch.zeros(x.shape[0] if x.dim() else 0, dtype=torch.int32, device=x.device)
    elif isinstance(seq_start, Tensor) and seq_start.dtype in (torch.int64, torch.int16,
                                                                torch.int8, torch.uint8):
        if (seq_start.dtype == torch.int64 and seq_start.numel() and not _is_tracing()
                and seq_start.device.type != "meta"):
            lo, hi = (int(v) for v in torch.aminmax(seq_start))
            if lo < -2 ** 31 or hi >= 2 ** 31:
                raise ValueError(f"seq_start values must fit in int32, got {lo} .. {hi}")
        seq_start = seq_start.to(torch.int32)
    if not isinstance(seq_start, Tensor):
        raise TypeError(f"seq_start must be an integer tensor, got {type(seq_start).__name__}")
    _check_rope(x, seq_start)
    theta = _real(theta, "theta")
    if theta <= 0:
        raise ValueError(f"theta (RoPE's base) must be > 0, got {theta}")
    return torch.ops.blossomrec.rope(x, seq_start, theta, False)
