"""``BlossomAttention``: the SPEC 4 module around the op, and ``DenseAttention``, its dense baseline.

Both take ``x [B, N, dim]`` plus the padding, given either as a ``[B, N]`` bool mask (True = valid;
right, left or any single contiguous run per row) or as ``lengths [B]`` with a ``padding_side``.
Internally a batch is described the way the ops see it (docs/DESIGN.md): ``seq_start [B]`` (row of the
first valid token) and ``seq_len [B]``, both on the device. Computing ``seq_start`` from the mask on
the device, instead of deciding "left or right" on the host, is what lets the module run under
``torch.compile(fullgraph=True)`` without a graph break and without a device-to-host sync.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from . import ops as _ops  # also registers the fake kernels of the ops

BACKENDS = ("ops", "reference")

# BlossomAttention's op hyper-parameters, named as on the op functions (blossomrec_cuda.ops), and the
# names they had before 0.2.0, which the recommender's builders still accept (old configs,
# checkpoints and RecBole yaml files) with a DeprecationWarning.
SPARSE_NAMES = ("compress_block_size", "compress_stride", "select_block", "num_select", "window",
                "power_block")
LEGACY_SPARSE_NAMES = {"stride": "compress_stride", "selection_block_size": "select_block",
                       "num_selected_blocks": "num_select", "power_block_size": "power_block"}


def normalize_sparse_names(kwargs: dict) -> dict:
    """``kwargs`` with legacy hyper-parameter names replaced by :data:`SPARSE_NAMES` (warning once
    per call); a name given twice (old and new) or an unknown name raises ValueError."""
    out = {}
    for name, value in kwargs.items():
        new = LEGACY_SPARSE_NAMES.get(name, name)
        if new != name:
            warnings.warn(f"BlossomAttention's {name!r} is now {new!r} (the op's name); the old "
                          "name will go away", DeprecationWarning, stacklevel=3)
        if new not in SPARSE_NAMES:
            raise ValueError(f"unknown BlossomAttention hyper-parameter {name!r}; expected one of "
                             f"{SPARSE_NAMES}")
        if new in out:
            raise ValueError(f"{new!r} given twice (once under its old name)")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------------
# Padding: mask or lengths -> (seq_start, seq_len)
# --------------------------------------------------------------------------------------------------
def sequence_bounds(x: Tensor, attention_mask: Optional[Tensor] = None,
                    lengths: Optional[Tensor] = None, padding_side: str = "right",
                    dtype: torch.dtype = torch.int64) -> tuple[Tensor, Tensor]:
    """``seq_start [B]`` and ``seq_len [B]`` (``dtype``: int64, or int32 as the ops take them; on
    ``x.device``) for ``x [B, N, ...]``.

    ``attention_mask [B, N]`` bool (True = valid) must hold one contiguous run of valid tokens per
    row; ``lengths [B]`` (each in ``0..N``) counts valid tokens placed at the ``padding_side`` end
    opposite the padding. Neither: every row is fully valid. The mask's contiguity and the lengths'
    range are checked in eager mode only (the checks need the values on the host; while compiling
    they are skipped, as the op wrappers skip theirs).
    """
    B, N = x.shape[0], x.shape[1]
    if attention_mask is not None and lengths is not None:
        raise ValueError("pass either attention_mask or lengths, not both")
    _ops._check_padding_side(padding_side)
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            hint = ("; for per-row lengths pass them as lengths=... (the second positional "
                    "argument is attention_mask)" if attention_mask.dim() == 1
                    else "; convert it with `mask.bool()`")
            raise TypeError(f"attention_mask must be a bool tensor (True = valid token), got "
                            f"{attention_mask.dtype}{hint}")
        if tuple(attention_mask.shape) != (B, N):
            raise ValueError(f"attention_mask must be [B, N] = [{B}, {N}], got "
                             f"{list(attention_mask.shape)}")
        mask = attention_mask.to(x.device)
        seq_len = mask.sum(dim=1)
        # argmax returns the first maximal entry: the first valid token (0 for an empty row)
        seq_start = mask.to(torch.int8).argmax(dim=1)
        if not _ops._is_tracing():  # compiling or capturing: no host reads
            _check_contiguous(mask, seq_start, seq_len)
        return seq_start.to(dtype), seq_len.to(dtype)
    if lengths is None:
        full = torch.full((B,), N, dtype=dtype, device=x.device)
        return torch.zeros_like(full), full
    # The op wrappers' conversion and range check (eager only, in int64 before any narrowing):
    # out-of-range lengths would otherwise be clamped (CUDA kernels, dense masks) or wrap in the
    # ops' int32, without an error. The bounds come in `dtype` (no cast kernels after the copy).
    seq_start, seq_len, _ = _ops._padded_bounds(lengths, B, N, padding_side, x.device, dtype)
    return seq_start, seq_len


def _check_contiguous(mask: Tensor, seq_start: Tensor, seq_len: Tensor) -> None:
    N = mask.shape[1]
    j = torch.arange(N, device=mask.device)
    last = torch.where(mask, j, -1).max(dim=1).values
    bad = (seq_len > 0) & (last - seq_start + 1 != seq_len)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        first, end = int(seq_start[row]), int(last[row]) + 1
        holes = _ops._offending(~mask[row, first:end], lambda i: str(first + i))
        raise ValueError(
            f"attention_mask row {row} has holes: its valid tokens run from {first} to {end - 1} "
            f"but tokens {holes} in between are padding. Move each sequence's valid tokens "
            "together (right or left padding) or pass lengths instead of a mask.")


def valid_mask(seq_start: Tensor, seq_len: Tensor, N: int) -> Tensor:
    """``[B, N]`` bool: row ``j`` of sequence ``b`` is one of its valid tokens."""
    j = torch.arange(N, device=seq_start.device)
    return (j[None, :] >= seq_start[:, None]) & (j[None, :] < (seq_start + seq_len)[:, None])


def shift_to_start(t: Tensor, seq_start: Tensor) -> Tensor:
    """``t [B, N, ...]`` with the rows of batch entry b moved up by ``seq_start[b]`` (row n takes row
    ``n + seq_start[b]``, clamped to ``0 .. N - 1``): each sequence's first valid token at row 0, as
    in right padding. A negative ``seq_start`` moves rows back down. The rows that the clamp fills
    are padding for every caller."""
    B, N = t.shape[0], t.shape[1]
    rows = (torch.arange(N, device=t.device)[None, :] + seq_start[:, None]).clamp(0, N - 1)
    return t.gather(1, rows.view(B, N, *([1] * (t.dim() - 2))).expand(t.shape))


def relative_positions(seq_start: Tensor, N: int) -> Tensor:
    """``[B, N]`` positions relative to each sequence's first valid token (padding rows: 0)."""
    j = torch.arange(N, device=seq_start.device)
    return (j[None, :] - seq_start[:, None]).clamp(min=0)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, contiguous, with no call where it is already both (the ops' own
    ``_to_contiguous``): the eager modules are host-bound at short sequences (docs/PERF_NOTES.md),
    and a no-op ``to`` still goes through the dispatcher (~1 us of host time each)."""
    return _ops._to_contiguous(t, t.device, dtype)


def _int32(t: Tensor) -> Tensor:
    """Bounds as the ops take them (int32), converted only where they are not."""
    return _as(t, torch.int32)


# --------------------------------------------------------------------------------------------------
# The shared front end: qkv projection and RoPE
# --------------------------------------------------------------------------------------------------
# What the compiled ops take (csrc/common/checks.h).
OPS_HEAD_DIMS = (16, 32, 64, 128)
OPS_MAX_GROUP = 8


class _QKVAttention(nn.Module):
    """One bias-free ``dim -> (H + 2*KVH) * D`` projection, interleaved RoPE on q and k, and a
    bias-free ``H*D -> dim`` output projection: the parameters both attention modules share, under the
    same names so one's projections load into the other."""

    def __init__(self, dim: int, heads: int, kv_heads: int, dim_head: int, causal: bool,
                 rope_theta: float) -> None:
        super().__init__()
        _ops._check_int_args(dim=dim, heads=heads, kv_heads=kv_heads, dim_head=dim_head)
        _ops._check_bool_args(causal=causal)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        rope_theta = _ops._real(rope_theta, "rope_theta")
        if rope_theta <= 0:
            raise ValueError(f"rope_theta (RoPE's base) must be > 0, got {rope_theta}")
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads != 0:
            raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
        if dim_head % 2 != 0:
            raise ValueError(f"dim_head must be even for the pairwise RoPE, got {dim_head}")
        self.dim, self.heads, self.kv_heads, self.dim_head = dim, heads, kv_heads, dim_head
        self.causal = causal
        self.rope_theta = rope_theta
        self.to_qkv = nn.Linear(dim, (heads + 2 * kv_heads) * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, N, dim] with dim = {self.dim}, got shape "
                             f"{list(x.shape)}")
        # The projections need x in the parameters' dtype, unless autocast casts both.
        weight = self.to_qkv.weight
        if not x.is_floating_point() or (x.dtype != weight.dtype and
                                         not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x must have the module's dtype ({_ops._dtype_name(weight.dtype)}), "
                            f"got {_ops._dtype_name(x.dtype)}: convert it with x.to(...) or "
                            "run under torch.autocast")

    @property
    def _rope_op(self) -> bool:
        """RoPE through blossomrec::rope (one kernel forward, one backward, for q and k together);
        BlossomAttention(backend="reference") keeps the PyTorch statement, reference.apply_rope
        (read at every call, so a changed ``backend`` takes effect)."""
        return getattr(self, "backend", "ops") == "ops"

    def _qkv(self, x: Tensor, seq_start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, N, dim]`` -> RoPE'd ``q [B, N, H, D]``, ``k [B, N, KVH, D]`` and ``v``, views
        (the ops accept any strides with a contiguous last dimension). ``seq_start [B]``: each
        sequence's first valid row, where its positions start at 0."""
        B, N, _ = x.shape
        H, KVH, D = self.heads, self.kv_heads, self.dim_head
        qkv = self.to_qkv(x).view(B, N, H + 2 * KVH, D)
        # the op has CPU and CUDA kernels (and a fake for meta / compile); other devices keep the
        # PyTorch statement
        if self._rope_op and x.device.type in ("cpu", "cuda", "meta"):
            # split, not slicing: the backward of a split is one cat of the gradients, that of
            # two slices two zero-filled copies and an add
            qk, v = qkv.split([H + KVH, KVH], dim=2)
            return (*self._rope(qk, seq_start), v)
        q, k, v = qkv.split([H, KVH, KVH], dim=2)
        pos = relative_positions(seq_start, N)
        q = reference.apply_rope(q, pos, self.rope_theta)
        k = reference.apply_rope(k, pos, self.rope_theta)
        return q, k, v

    def _rope(self, qk: Tensor, seq_start: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE through the op on the q and k heads together, ``qk [B, N, H + KVH, D]`` (any
        strides with a contiguous last dim) -> ``q [B, N, H, D]``, ``k [B, N, KVH, D]``."""
        qk = _ops.rope(qk, _int32(seq_start), self.rope_theta)
        return qk.split([self.heads, self.kv_heads], dim=2)

    def _project_out(self, o: Tensor) -> Tensor:
        B, N = o.shape[0], o.shape[1]
        return self.to_out(o.reshape(B, N, self.heads * self.dim_head))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"dim_head={self.dim_head}, causal={self.causal}")


# --------------------------------------------------------------------------------------------------
# BlossomAttention
# --------------------------------------------------------------------------------------------------
class BlossomAttention(_QKVAttention):
    """BlossomRec sparse attention (SPEC 4): qkv projection -> RoPE at positions relative to each
    sequence's first valid token -> compressed keys (SPEC 1a) -> the op (LTIS + STIS + gates, SPEC
    1b-3) -> output projection.

    Parameters that train: ``to_qkv``, ``to_gates`` (weight init 0, bias ``[-2, +2]`` per head, so
    LTIS starts at sigmoid(-2) ~ 0.12 and STIS at ~0.88) and ``to_out``.

    Parameters that get NO gradient, by the spec: the compressor (``compress_mlp`` and the intra-block
    position table ``compress_pos``). They only feed the block selection, which is discrete (top-n and a
    threshold), so no gradient path reaches them; after ``backward`` their ``.grad`` stays ``None``.
    They keep their initial values unless trained by some other objective; :meth:`no_grad_parameters`
    lists them (e.g. to freeze them so that DistributedDataParallel does not wait for their gradients).

    ``backend="ops"`` runs ``torch.ops.blossomrec.*`` (CPU or CUDA kernels; works under autocast and
    ``torch.compile(fullgraph=True)``); ``backend="reference"`` runs :mod:`blossomrec_cuda.reference`
    (same math in plain PyTorch, the whole padded batch at once through
    ``reference.blossom_attention_batched``: ``O(N^2)`` masks, for checking and for comparisons).

    Arguments: ``dim`` the model width (input and output ``[B, N, dim]``); ``heads`` / ``kv_heads``
    the query and key/value heads (``heads`` a multiple of ``kv_heads``; with ``backend="ops"``
    ``heads / kv_heads <= 8``); ``dim_head`` the head dim (16, 32, 64 or 128 with the ops);
    ``compress_block_size`` l, the positions one compressed key summarises (>= compress_stride);
    ``causal`` and ``rope_theta`` (RoPE's base); the op's hyper-parameters ``compress_stride``,
    ``select_block``, ``num_select``, ``window``, ``power_block``, ``use_power``, ``use_sink`` as
    :func:`blossomrec_cuda.blossom_attention` describes them. ``forward(x, attention_mask=None,
    lengths=None, padding_side="right")``: ``x [B, N, dim]``; padding as a ``[B, N]`` bool mask
    (one contiguous run of valid tokens per row) or as ``lengths [B]``; padding rows give 0.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, dim_head: int,
                 compress_block_size: int = 32, compress_stride: int = 16, select_block: int = 16,
                 num_select: int = 4, window: int = 8, power_block: int = 1,
                 causal: bool = True, rope_theta: float = 10000.0, *, use_power: bool = True,
                 use_sink: bool = True, backend: str = "ops") -> None:
        super().__init__(dim, heads, kv_heads, dim_head, causal, rope_theta)
        _ops._check_int_args(compress_block_size=compress_block_size,
                             compress_stride=compress_stride)
        _ops._check_bool_args(use_power=use_power, use_sink=use_sink)
        if compress_stride <= 0 or compress_block_size < compress_stride:
            raise ValueError(f"need 0 < compress_stride <= compress_block_size, got "
                             f"compress_stride={compress_stride}, "
                             f"compress_block_size={compress_block_size}")
        # The op's own checks of its hyper-parameters, said here rather than at the first forward.
        _ops._check_int_args(select_block=select_block, num_select=num_select, window=window,
                             power_block=power_block)
        _ops._check_select_hparams(compress_stride, select_block, num_select)
        _ops._check_attention_hparams(select_block, window, power_block)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "ops" and (dim_head not in OPS_HEAD_DIMS or heads // kv_heads > OPS_MAX_GROUP):
            # Said here rather than at the first forward (the ops would refuse it there).
            raise ValueError(f"backend='ops' needs dim_head in {OPS_HEAD_DIMS} and heads / kv_heads "
                             f"<= {OPS_MAX_GROUP}, got dim_head={dim_head}, heads={heads}, "
                             f"kv_heads={kv_heads} (backend='reference' takes any)")
        self.compress_block_size = compress_block_size
        self.compress_stride = compress_stride
        self.select_block = select_block
        self.num_select = num_select
        self.window = window
        self.power_block = power_block
        self.use_power = use_power
        self.use_sink = use_sink
        self.backend = backend
        flat = compress_block_size * dim_head
        self.compress_pos = nn.Parameter(torch.zeros(kv_heads, compress_block_size, dim_head))
        self.compress_mlp = nn.Sequential(nn.Linear(flat, flat), nn.ReLU(), nn.Linear(flat, dim_head))
        self.to_gates = nn.Linear(dim, 2 * heads)
        self.reset_gate()

    @torch.no_grad()
    def reset_gate(self) -> None:
        """SPEC 3: weight 0, bias ``[-2, +2]`` per head (index 0 = LTIS, 1 = STIS). A model that
        re-initialises its Linear layers must call this afterwards."""
        self.to_gates.weight.zero_()
        self.to_gates.bias.copy_(torch.tensor([-2.0, 2.0]).repeat(self.heads))

    def no_grad_parameters(self) -> Iterator[nn.Parameter]:
        """The compressor's parameters, which by the spec receive no gradient (see the class doc)."""
        yield self.compress_pos
        yield from self.compress_mlp.parameters()

    def compress_keys(self, k: Tensor, seq_start: Tensor) -> Tensor:
        """SPEC 1a, batched: ``k [B, N, KVH, D]`` (RoPE'd) -> ``kc [B, N // compress_stride, KVH, D]``.

        Each sequence's windows are built from its own tokens: rows are first shifted so that the
        first valid token sits at row 0 (left padding then looks like right padding), so window ``c``
        covers relative positions ``c*s - (l - s) .. c*s + s - 1`` with zeros below 0, whatever the
        padding. Windows that reach past a sequence's end are computed but never read by the op
        (sequence b uses ``c < floor(L_b / s)``).
        """
        B, N, KVH, D = k.shape
        s, l = self.compress_stride, self.compress_block_size
        C = N // s
        if C == 0:
            return k.new_zeros(B, 0, KVH, D)
        if self.backend == "ops":
            # the same windows, bitwise, in one op (blossomrec::compress_windows) in place of the
            # ~6 kernels of the statement below
            seq_start = _int32(seq_start)
            cast = self._compressor_cast(k)
            if cast is None:
                windows = _ops._compress_windows(k, seq_start, self.compress_pos.to(k.dtype), l, s)
                return self.compress_mlp(windows)
            pos, w1t, b1, w2t, b2 = cast
            windows = _ops._compress_windows(k, seq_start, pos, l, s)  # contiguous
            # the MLP as the two addmm that F.linear runs on the rows, bitwise, without its
            # per-call views and weight transposes (the transposes are cached); in place ReLU
            h = torch.addmm(b1, windows.view(-1, l * D), w1t).relu_()
            return torch.addmm(b2, h, w2t).view(B, C, KVH, -1)
        k = shift_to_start(k, seq_start)
        k = torch.cat([k.new_zeros(B, l - s, KVH, D), k[:, : C * s]], dim=1)
        windows = k.unfold(1, l, s).transpose(-1, -2)  # [B, C, KVH, l, D]
        windows = windows + self.compress_pos.to(k.dtype)
        return self.compress_mlp(windows.reshape(B, C, KVH, l * D))

    def _compressor_cast(self, k: Tensor) -> Optional[tuple[Tensor, ...]]:
        """Under autocast, in eager mode: the compressor's parameters (``compress_pos`` and the
        MLP's weights, transposed, and biases, in that order) in the autocast dtype, cast once and
        kept until a parameter changes (its version counter, its identity, the device or the
        dtype), instead of five cast kernels per forward (the eager module is host-bound at N <= 1024,
        docs/PERF_NOTES.md). The compressor gets no gradient (the class doc) and runs under
        no_grad, so detached copies compute the same values, bitwise, as autocast's own casts.
        None: no autocast, the MLP is not two Linears around a ReLU, or tracing / capturing /
        inference mode (the plain path)."""
        device = k.device.type
        if (not torch.is_autocast_enabled(device) or _ops._is_tracing()
                or torch.is_inference_mode_enabled()):
            return None
        mlp = tuple(self.compress_mlp)  # (one pass: indexing a Sequential lists its modules)
        if not (len(mlp) == 3 and isinstance(mlp[0], nn.Linear) and isinstance(mlp[1], nn.ReLU)
                and isinstance(mlp[2], nn.Linear)):
            return None
        params = (self.compress_pos, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
        if any(p is None for p in params):
            return None
        dtype = torch.get_autocast_dtype(device)
        key = (dtype, k.device, tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in params))
        cached = self.__dict__.get("_compressor_cache")
        if cached is None or cached[0] != key:
            pos, w1, b1, w2, b2 = (p.detach().to(dtype) for p in params)
            cached = (key, (pos, w1.t(), b1, w2.t(), b2))
            self.__dict__["_compressor_cache"] = cached  # a plain attribute: not in state_dict
        return cached[1]

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None, padding_side: str = "right") -> Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``; padding rows give exactly 0.

        ``attention_mask [B, N]`` bool (True = valid, one contiguous run per row) or ``lengths [B]``
        with ``padding_side`` ("right" | "left"); neither means every token is valid.
        """
        self._check_input(x)
        seq_start, seq_len = sequence_bounds(x, attention_mask, lengths, padding_side, torch.int32)
        B, N = x.shape[0], x.shape[1]
        # The gate projection stays its own GEMM: folded into the qkv projection's (one GEMM over
        # the stacked weights) it cost the GPU 0.10 ms more per fwd+bwd at N = 50 and 200 (H200;
        # docs/PERF_NOTES.md, module level, runs ab-*-9337d72).
        q, k, v = self._qkv(x, seq_start)
        logits = self.to_gates(x)
        with torch.no_grad():
            # the selection is discrete, so the compressor gets no gradient (class doc)
            kc = _as(self.compress_keys(k, seq_start), q.dtype)
        gates = _as(torch.sigmoid(logits).view(B, N, self.heads, 2), q.dtype)
        o = self._attend(q, k, v, kc, gates, seq_start, seq_len)
        return self._project_out(o)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, kc: Tensor, gates: Tensor,
                seq_start: Tensor, seq_len: Tensor) -> Tensor:
        scale = self.dim_head ** -0.5
        hp = dict(select_block=self.select_block, window=self.window,
                  power_block=self.power_block, use_power=self.use_power,
                  use_sink=self.use_sink and not self.causal, causal=self.causal, scale=scale)
        if self.backend == "reference":
            # batched (no Python loop over sequences); equal to reference.blossom_attention
            return reference.blossom_attention_batched(
                q, k, v, kc, gates, seq_start, seq_len, compress_stride=self.compress_stride,
                num_select=self.num_select, **hp).out
        # The public op with the module's own bounds (the row-buffer contract of docs/DESIGN.md),
        # so one call serves right, left and mixed padding without a host-side decision.
        return _ops.blossom_attention(q, k, v, kc, gates,
                                      layout=_ops.SeqLayout(seq_start, seq_len, packed=False),
                                      compress_stride=self.compress_stride,
                                      num_select=self.num_select, **hp)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", compress_block_size={self.compress_block_size}, "
                f"compress_stride={self.compress_stride}, select_block={self.select_block}, "
                f"num_select={self.num_select}, window={self.window}, "
                f"power_block={self.power_block}, backend={self.backend!r}")


# --------------------------------------------------------------------------------------------------
# DenseAttention: the baseline
# --------------------------------------------------------------------------------------------------
class DenseAttention(_QKVAttention):
    """Dense (causal by default) GQA softmax attention with the same interface, the same qkv / output
    projections and the same RoPE as :class:`BlossomAttention`: SASRec's attention, and the fair
    dense baseline, written the way a user would pick it.

    No ``N x N`` mask and no k/v expanded to all heads: ``scaled_dot_product_attention(...,
    enable_gqa=True)`` (torch >= 2.5), with ``is_causal=True`` when causal. Right padding (or full
    rows) needs no mask at all when causal: pad keys come after every valid query. Any other padding
    (left, or a valid run in the middle of the row) is moved to the right-padded form by an ``O(N)``
    row gather and moved back after the attention; when not causal, pad keys are masked by a
    ``[B, 1, 1, N]`` key mask. Costs ``O(N^2)`` per sequence; padding rows give exactly 0, like the
    sparse module. RoPE is the compiled ``blossomrec::rope`` op (CPU and CUDA kernels), as in
    BlossomAttention's default backend.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, dim_head: int, causal: bool = True,
                 rope_theta: float = 10000.0) -> None:
        super().__init__(dim, heads, kv_heads, dim_head, causal, rope_theta)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None, padding_side: str = "right") -> Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``; padding as in :meth:`BlossomAttention.forward`."""
        self._check_input(x)
        B, N, _ = x.shape
        seq_start, seq_len = sequence_bounds(x, attention_mask, lengths, padding_side)
        q, k, v = self._qkv(x, seq_start)
        # Where the valid tokens may not start at row 0 (a mask, or left padding), shift them there.
        shift = attention_mask is not None or (lengths is not None and padding_side == "left")
        if shift:
            q, k, v = (shift_to_start(t, seq_start) for t in (q, k, v))
        key_mask = None
        if not self.causal and (attention_mask is not None or lengths is not None):
            j = torch.arange(N, device=x.device)
            # An empty sequence keeps key 0 so that no row is all -inf (its output is zeroed below).
            key_mask = ((j[None, :] < seq_len[:, None]) | (j[None, :] == 0))[:, None, None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=key_mask, is_causal=self.causal,
                                           enable_gqa=True).transpose(1, 2)
        if shift:
            o = shift_to_start(o, -seq_start)  # back: row n - seq_start to row n
        o = o * valid_mask(seq_start, seq_len, N)[:, :, None, None].to(o.dtype)
        return self._project_out(o)
