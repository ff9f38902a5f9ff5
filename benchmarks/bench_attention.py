"""Microbenchmarks of the BlossomRec attention op against dense SDPA and FlexAttention.

What to measure and how: ../shared/PERF.md.

Methods (PERF.md names):

- ``blossomrec``: the whole op, ``blossomrec_cuda.blossom_attention`` (selection + fused attention);
- ``blossomrec_select`` / ``blossomrec_attn``: its two parts (``select_blocks``, ``sparse_attention``
  on a selection made outside the timed region); ``blossomrec_select`` has no backward and runs in
  the ``fwd`` pass only;
- ``blossomrec_gather``: the whole op without the staged row kernels for short padded sequences
  (``BLOSSOMREC_STAGED=0``; only float32 or sequences past the fused kernels' limits take them);
- ``sdpa_dense``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` on the
  ``[B, H, N, D]`` layout (transposed copies made outside the timed region);
- ``flex_stis``: ``torch.compile(flex_attention)`` with a ``create_block_mask`` of the STIS mask alone
  (N < 128: q, k, v padded to one BlockMask tile per call);
- ``flex_blossomrec``: the whole op with FlexAttention: ``select_blocks``, then two compiled
  ``flex_attention`` calls (LTIS with a BlockMask built from the selection per call, STIS) and the
  gated combine (``flex_blossomrec``); on request;
- ``reference``: ``blossomrec_cuda.reference`` (float32 math), tiny shapes only, on request.

Every measurement appends one JSON line (keys of PERF.md plus ``bytes``, ``floor_ms``, ``bw_ratio``)
to ``--out``; rows of one invocation share a ``run`` id. The card's copy bandwidth is measured once
per run and recorded as method ``copy_bandwidth``.

Examples::

    python benchmarks/bench_attention.py                          # everything PERF.md lists
    python benchmarks/bench_attention.py --quick --shapes S1,S4 --pass fwd+bwd --dims 16
    python benchmarks/bench_attention.py --custom L1=8x8192 --methods blossomrec,sdpa_dense
    python benchmarks/bench_attention.py --cpu-smoke              # tiny CPU run, no GPU needed
    python benchmarks/bench_attention.py --print-table benchmarks/results/bench-h200-20261201.jsonl
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

# PERF.md's standard shapes: name -> (B, N). R1 is ragged (lengths from Amazon Beauty, clipped to 50).
SHAPES: dict[str, tuple[int, int]] = {
    "S1": (2048, 50),
    "S2": (512, 200),
    "S3": (64, 1024),
    "S4": (16, 4096),
    "S5": (4, 16384),
    "S6": (1, 65536),
    "R1": (2048, 50),
}
RAGGED_SHAPES = {"R1"}
# Tiny CPU shapes for --cpu-smoke: (B, N); CR is ragged like R1.
CPU_SMOKE_SHAPES: dict[str, tuple[int, int]] = {"C1": (4, 64), "C2": (2, 256), "CR": (16, 50)}

ALL_METHODS = ("blossomrec", "blossomrec_graph", "blossomrec_gather", "blossomrec_select",
               "blossomrec_attn", "sdpa_dense", "sdpa_dense_graph", "flex_stis", "flex_blossomrec",
               "reference")
# The opt-in variant (blossomrec_gather), the CUDA-graph replays (*_graph: the GPU time without the
# host's launch overhead, as under torch.compile(mode="reduce-overhead")), flex_blossomrec (two
# FlexAttention compiles per shape and pass on top of flex_stis's one: it would more than double a
# full sweep, most of which is FlexAttention compiling) and the reference run only on request.
DEFAULT_METHODS = ("blossomrec", "blossomrec_select", "blossomrec_attn", "sdpa_dense", "flex_stis")
FWD_ONLY_METHODS = {"blossomrec_select"}
# Methods that call blossomrec_cuda: recorded as errors when it does not import.
PACKAGE_METHODS = {m for m in ALL_METHODS if m.startswith("blossomrec")} | {"flex_blossomrec",
                                                                           "reference"}
REFERENCE_MAX_TOKENS = 8192  # the reference loops over sequences in Python: tiny shapes only

# The op's hyper-parameters (docs/ALGORITHM.md defaults).
HPARAMS = dict(compress_stride=16, select_block=16, num_select=4, window=8, power_block=1,
               use_power=True, causal=True)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# Inputs smaller than this are rotated among several copies so that repeated runs do not measure
# a warm L2 (50-60 MB on an H100/H200).
ROTATE_BELOW_BYTES = 100 * 2**20
MAX_INPUT_SETS = 8


# --------------------------------------------------------------------------------------------------
# Shapes, data and inputs
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    shape: str
    B: int
    N: int
    H: int
    KVH: int
    D: int
    dtype: torch.dtype
    lengths: Optional[list[int]] = None  # None: every sequence has N tokens

    @property
    def valid_tokens(self) -> int:
        return self.B * self.N if self.lengths is None else int(sum(self.lengths))


def find_data_dir(explicit: Optional[str]) -> Optional[Path]:
    """--data-dir, else $BLOSSOMREC_DATA, else ../shared/data beside the repo, else .data/ in it."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("BLOSSOMREC_DATA"):
        env = Path(os.environ["BLOSSOMREC_DATA"])
        candidates += [env, REPO / env] if not env.is_absolute() else [env]
    candidates += [REPO.parent / "shared" / "data", REPO / ".data"]
    for c in candidates:
        if (c / "amazon-beauty.txt").is_file():
            return c
    return None


def ragged_lengths(data_dir: Optional[Path], B: int, max_len: int, seed: int = 0) -> list[int]:
    """B sequence lengths drawn (with replacement, fixed seed) from Amazon Beauty, clipped to max_len.

    Each line of amazon-beauty.txt is ``user item item ...``: the length is the number of items.
    """
    if data_dir is None:
        raise FileNotFoundError(
            "amazon-beauty.txt not found: pass --data-dir, set BLOSSOMREC_DATA, or copy "
            "../shared/data into .data/")
    lengths = []
    with open(data_dir / "amazon-beauty.txt") as f:
        for line in f:
            n_items = len(line.split()) - 1
            if n_items > 0:
                lengths.append(min(n_items, max_len))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(lengths), (B,), generator=gen)
    return [lengths[i] for i in picks.tolist()]


def make_inputs(case: Case, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """One random input set in the op's padded layout (right padding). Never zeros.

    ``q [B, N, H, D]``, ``k, v [B, N, KVH, D]``, ``kc [B, N // 16, KVH, D]``, ``gates [B, N, H, 2]``
    (sigmoid of a normal, as the module computes them), ``dout`` like ``q``, ``lengths [B]`` int32.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    B, N, H, KVH, D, dt = case.B, case.N, case.H, case.KVH, case.D, case.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    C = max(N // HPARAMS["compress_stride"], 1)
    lengths = case.lengths if case.lengths is not None else [N] * B
    return {
        "q": randn(B, N, H, D),
        "k": randn(B, N, KVH, D),
        "v": randn(B, N, KVH, D),
        "kc": randn(B, C, KVH, D),
        "gates": torch.sigmoid(randn(B, N, H, 2).float()).to(dt),
        "dout": randn(B, N, H, D),
        "lengths": torch.tensor(lengths, dtype=torch.int32, device=device),
        # The op takes the lengths from the host, as a data loader yields them: lengths on the GPU
        # cost a device sync per call for the op's range check (docs/PERF_NOTES.md v17).
        "lengths_host": torch.tensor(lengths, dtype=torch.int32),
    }


def input_set_bytes(inputs: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


# --------------------------------------------------------------------------------------------------
# Compulsory bytes (PERF.md): each input read once, each output written once
# --------------------------------------------------------------------------------------------------
def compulsory_bytes(method: str, case: Case, pass_: str) -> int:
    """The fewest bytes a kernel must move through device memory for one call.

    BlossomRec methods: forward reads q, k, v, gates (and kc for selection) of the valid tokens and
    writes out and lse (float32, 2 per row and head) for every row of the buffer (padding rows are
    written as zeros); backward reads q, k, v, gates, out, lse, dout and writes dq, dk, dv, dgates.
    Dense methods (sdpa_dense, flex_stis) have no gates and one lse per row and head, and run over
    every row, padding included. flex_blossomrec computes the whole op: the op's bytes.
    ``fwd+bwd`` is the sum of both.
    """
    e = torch.tensor([], dtype=case.dtype).element_size()
    rows_all = case.B * case.N
    H, KVH, D = case.H, case.KVH, case.D
    if method in ("sdpa_dense", "flex_stis"):
        q = o = rows_all * H * D * e
        kv = 2 * rows_all * KVH * D * e
        lse = rows_all * H * 4
        fwd = q + kv + o + lse
        bwd = (q + kv + o + lse + o) + (q + kv)  # read q, k, v, out, lse, dout; write dq, dk, dv
        return fwd if pass_ == "fwd" else fwd + bwd
    rows = case.valid_tokens
    q_r, q_w = rows * H * D * e, rows_all * H * D * e
    kv_r, kv_w = 2 * rows * KVH * D * e, 2 * rows_all * KVH * D * e
    g_r, g_w = rows * H * 2 * e, rows_all * H * 2 * e
    lse_w, lse_r = rows_all * H * 2 * 4, rows * H * 2 * 4
    kc = case.valid_tokens // HPARAMS["compress_stride"] * KVH * D * e
    n_sel = max(HPARAMS["num_select"], 1)
    sel_w = rows_all * KVH * (n_sel + 1) * 4  # sel_idx + sel_cnt, int32
    sel_r = rows * KVH * (n_sel + 1) * 4
    if method == "blossomrec_select":
        return q_r + kc + sel_w
    attn_in = q_r + kv_r + g_r + (sel_r if method == "blossomrec_attn" else kc)
    fwd = attn_in + q_w + lse_w
    bwd = (q_r + kv_r + g_r + 2 * q_r + lse_r) + (q_w + kv_w + g_w)
    return fwd if pass_ == "fwd" else fwd + bwd


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[int], object], n_sets: int, device: torch.device, warmup_ms: float,
            rep_ms: float, min_reps: int = 5) -> tuple[float, int]:
    """Median time of ``fn(set_index)`` in ms, rotating over ``n_sets`` input sets; returns
    ``(median_ms, repetitions)``. CUDA: one event pair per call; CPU: perf_counter."""
    fn(0)
    _sync(device)
    # Estimate one call's time to size the warm-up and the repetitions (as triton's do_bench does):
    # up to 3 calls, fewer when one call already takes most of the warm-up budget.
    calls, t0 = 0, time.perf_counter()
    while calls < 3 and (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn(calls % n_sets)
        _sync(device)
        calls += 1
    est_ms = max((time.perf_counter() - t0) * 1e3 / max(calls, 1), 1e-3)
    for i in range(int(warmup_ms / est_ms)):
        fn(i % n_sets)
    reps = int(min(max(rep_ms / est_ms, min_reps), 1000))
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i % n_sets)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i % n_sets)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), reps


def peak_extra_mib(fn: Callable[[int], object], device: torch.device) -> Optional[float]:
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(0)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_copy_bandwidth(device: torch.device) -> tuple[float, float, int]:
    """Device-to-device (or RAM-to-RAM) copy bandwidth, counting bytes read plus written.

    Returns ``(bytes_per_ms, median_ms, bytes_moved)``."""
    nbytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda _: dst.copy_(src), 1, device, warmup_ms=50, rep_ms=300)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    moved = 2 * nbytes
    return moved / ms, ms, moved


# --------------------------------------------------------------------------------------------------
# Methods: each returns fn(set_index) running one call (forward, or forward + backward)
# --------------------------------------------------------------------------------------------------
def _grad_leaves(sets: list[dict], names: tuple[str, ...]) -> list[dict]:
    """Per set: detached leaf copies of ``names`` that require grad (the rest shared)."""
    out = []
    for s in sets:
        d = dict(s)
        for n in names:
            d[n] = s[n].detach().clone().requires_grad_(True)
        out.append(d)
    return out


def _op_kwargs(s: dict, ragged: bool) -> dict:
    kw = dict(compress_stride=HPARAMS["compress_stride"], select_block=HPARAMS["select_block"],
              num_select=HPARAMS["num_select"], window=HPARAMS["window"],
              power_block=HPARAMS["power_block"], use_power=HPARAMS["use_power"],
              causal=HPARAMS["causal"])
    if ragged:
        kw["lengths"] = s["lengths_host"]
    return kw


QKVG = ("q", "k", "v", "gates")


def _pass_fn(pass_: str, sets: list[dict], call: Callable[[int], torch.Tensor],
             grads: tuple[str, ...]) -> Callable[[int], object]:
    """The timed function of one method: ``call(i)`` (the output for input set i) under no_grad
    for the forward; for fwd+bwd, the gradients w.r.t. ``sets[i][n]`` for n in ``grads`` of that
    output against ``sets[i]["dout"]``."""
    if pass_ == "fwd":
        def fwd(i):
            with torch.no_grad():
                return call(i)
        return fwd

    def fwd_bwd(i):
        s = sets[i]
        return torch.autograd.grad(call(i), tuple(s[n] for n in grads), s["dout"])
    return fwd_bwd


def build_blossomrec(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    import blossomrec_cuda

    ragged = case.lengths is not None
    src = sets if pass_ == "fwd" else _grad_leaves(sets, QKVG)

    def call(i):
        s = src[i]
        return blossomrec_cuda.blossom_attention(s["q"], s["k"], s["v"], s["kc"], s["gates"],
                                                 **_op_kwargs(s, ragged))
    return _pass_fn(pass_, src, call, QKVG)


def _with_env(inner: Callable[[int], object], env: dict[str, str]) -> Callable[[int], object]:
    """Runs inner with env set (the C++ launchers read these switches on every call)."""
    def run(i):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return inner(i)
        finally:
            for k, v in old.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return run


def build_blossomrec_gather(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    """The whole op without the staged kernels for short padded sequences (BLOSSOMREC_STAGED=0):
    the first CUDA version."""
    return _with_env(build_blossomrec(sets, case, pass_), {"BLOSSOMREC_STAGED": "0"})


def build_blossomrec_select(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    import blossomrec_cuda

    ragged = case.lengths is not None
    kw_names = ("compress_stride", "select_block", "num_select", "causal", "lengths")
    kws = [{k: v for k, v in _op_kwargs(s, ragged).items() if k in kw_names} for s in sets]

    def fwd(i):
        with torch.no_grad():
            return blossomrec_cuda.select_blocks(sets[i]["q"], sets[i]["kc"], **kws[i])
    return fwd


def build_blossomrec_attn(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    import blossomrec_cuda

    ragged = case.lengths is not None
    sel_names = ("compress_stride", "select_block", "num_select", "causal", "lengths")
    attn_names = ("select_block", "window", "power_block", "use_power", "causal", "lengths")
    prepared = []
    for s in sets:
        kw = _op_kwargs(s, ragged)
        with torch.no_grad():
            idx, cnt = blossomrec_cuda.select_blocks(
                s["q"], s["kc"], **{k: v for k, v in kw.items() if k in sel_names})
        d = dict(s, sel_idx=idx, sel_cnt=cnt,
                 attn_kw={k: v for k, v in kw.items() if k in attn_names})
        prepared.append(d)
    src = prepared if pass_ == "fwd" else _grad_leaves(prepared, QKVG)

    def call(i):
        s = src[i]
        return blossomrec_cuda.sparse_attention(s["q"], s["k"], s["v"], s["gates"], s["sel_idx"],
                                                s["sel_cnt"], **s["attn_kw"])
    return _pass_fn(pass_, src, call, QKVG)


def _to_bhnd(sets: list[dict], pass_: str) -> list[dict]:
    """[B, N, heads, D] -> contiguous [B, heads, N, D] copies (outside the timed region)."""
    out = []
    for s in sets:
        d = {n: s[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "dout")}
        if pass_ != "fwd":
            for n in ("q", "k", "v"):
                d[n].requires_grad_(True)
        out.append(d)
    return out


def build_sdpa_dense(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    tsets = _to_bhnd(sets, pass_)

    def call(i):
        s = tsets[i]
        return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], is_causal=True,
                                              enable_gqa=True)
    return _pass_fn(pass_, tsets, call, ("q", "k", "v"))


_FLEX_COMPILED = None


def _compiled_flex():
    """torch.compile(flex_attention), once per process, with a recompile limit high enough for a
    sweep (past the limit dynamo silently falls back to an unfused path needing tens of GB)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = 1000
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = 10000
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


_BLOCK_MASK_COMPILED = None


def _compiled_create_block_mask():
    """torch.compile(create_block_mask), once per process (what torch suggests in place of its
    deprecated ``_compile=True``): a BlockMask rebuilt per call costs a few kernels, not an eager
    evaluation of the mask at every point. A new mask_mod closure per call does not recompile."""
    global _BLOCK_MASK_COMPILED
    if _BLOCK_MASK_COMPILED is None:
        from torch.nn.attention.flex_attention import create_block_mask

        _compiled_flex()  # the recompile limits
        _BLOCK_MASK_COMPILED = torch.compile(create_block_mask)
    return _BLOCK_MASK_COMPILED


# FlexAttention's BlockMask tiles. torch 2.11 on the H200 found no kernel for a sequence shorter than
# one tile (NoValidChoicesError at N = 50): such inputs are padded up to one tile, the padded keys
# and queries masked out (what a user with short sequences has to do on every call).
FLEX_BLOCK = 128


def flex_len(N: int) -> int:
    """The sequence length FlexAttention runs at: N, or one BlockMask tile when N is shorter."""
    return max(N, FLEX_BLOCK)


def _pad_seq(x: torch.Tensor, n: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """x padded with ``value`` along ``dim`` to length n (x itself when it is already n long)."""
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad, value=value)


def _bound_mask(visible, b, q_idx, kv_idx, N: int, lengths: Optional[torch.Tensor], padded: bool):
    """Both indices inside the sequence: ``lengths[b]`` for ragged batches, N for padded inputs."""
    if lengths is not None:
        return visible & (q_idx < lengths[b]) & (kv_idx < lengths[b])
    if padded:
        return visible & (q_idx < N) & (kv_idx < N)
    return visible


def stis_mask_mod(window: int, lengths: Optional[torch.Tensor], *, N: int = 0, padded: bool = False,
                  power_block: int = 1, use_power: bool = True, causal: bool = True,
                  use_sink: bool = True):
    """SPEC 2 as a mask_mod, with d = i // p - j // p. Causal: d >= 0 and (d < w or d a power of
    two); non-causal: |d| < w, or d > 0 a power of two, or j the last valid token (the sink, when
    ``use_sink``). Keys and queries past ``lengths[b]`` (right padding), or past N when the inputs
    were padded to ``flex_len(N)``, are masked out."""
    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx // power_block - kv_idx // power_block if power_block > 1 else q_idx - kv_idx
        if causal:
            near = (d >= 0) & (d < window)
            far = (d & (d - 1)) == 0  # with d >= 0; d = 0 is in the window anyway
            visible = near | ((d >= 0) & far) if use_power else near
        else:
            visible = d.abs() < window
            if use_power:
                visible = visible | ((d > 0) & ((d & (d - 1)) == 0))
            if use_sink:
                last = (lengths[b] if lengths is not None else N) - 1
                visible = visible | (kv_idx == last)
        return _bound_mask(visible, b, q_idx, kv_idx, N, lengths, padded)
    return mask_mod


def ltis_mask_mod(sel_idx: torch.Tensor, group: int, select_block: int, causal: bool,
                  lengths: Optional[torch.Tensor], *, N: int, padded: bool):
    """SPEC 1c as a mask_mod reading the selection: key j visible to query i of head h iff j is in
    i's own block (j <= i when causal) or in one of the blocks ``sel_idx[b, i, h // group, :]``
    (-1 past the count: matches no block). ``sel_idx [B, >= flex_len(N) rows, KVH, n]``."""
    n = sel_idx.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        g = h // group
        kv_block = kv_idx // select_block
        visible = kv_block == q_idx // select_block
        if causal:
            visible = visible & (kv_idx <= q_idx)
        for t in range(n):
            visible = visible | (sel_idx[b, q_idx, g, t] == kv_block)
        return _bound_mask(visible, b, q_idx, kv_idx, N, lengths, padded)
    return mask_mod


def ltis_block_mask(sel_idx: torch.Tensor, H: int, N: int, select_block: int, causal: bool,
                    lengths: Optional[torch.Tensor]):
    """The LTIS BlockMask of one call, built from the selection in O(selection) work.

    ``create_block_mask`` would evaluate the mask_mod at every (b, h, i, j): B * H * N^2 points per
    call. The selection already says which tiles hold keys: a query tile's key tiles are the tiles
    of its rows' own blocks and of every block they selected (a block of ``select_block <= 128``
    keys touches at most two tiles: its first and its last key's). Those go into a
    ``[B, KVH, tiles, tiles]`` map (one scatter), become ``kv_num_blocks`` / ``kv_indices`` (as
    FlexAttention's ``_dense_to_ordered``: a count and a stable descending argsort) and are expanded
    to the H query heads; every tile is partial (the mask_mod decides inside it), and
    ``from_kv_blocks`` derives the query-tile lists the backward needs.
    Returns ``(block_mask, sel_idx padded to the tiles' rows with -1)``."""
    from torch.nn.attention.flex_attention import BlockMask

    if select_block > FLEX_BLOCK:
        raise ValueError(f"select_block must be at most {FLEX_BLOCK} (one BlockMask tile), "
                         f"got {select_block}")
    B, _, KVH, n = sel_idx.shape
    Nf = flex_len(N)
    tiles = -(-Nf // FLEX_BLOCK)
    R = tiles * FLEX_BLOCK
    sel = _pad_seq(sel_idx, R, dim=1, value=-1)
    rows = torch.arange(R, device=sel.device)
    q_tile = (rows // FLEX_BLOCK)[None, :, None, None]
    own_first = rows // select_block * select_block
    own_last = rows if causal else own_first + select_block - 1
    own = torch.stack([own_first, own_last], dim=-1)[None, :, None, :].expand(B, R, KVH, 2)
    first = sel * select_block
    keys = torch.cat([first, first + select_block - 1], dim=-1)  # [B, R, KVH, 2n]
    kv_tile = torch.where(keys >= 0, keys // FLEX_BLOCK, q_tile)
    kv_tile = torch.cat([kv_tile, own // FLEX_BLOCK], dim=-1).clamp_(0, tiles - 1)
    flat = (q_tile * tiles + kv_tile).permute(0, 2, 1, 3).reshape(B, KVH, -1)
    dense = torch.zeros(B, KVH, tiles * tiles, dtype=torch.int32, device=sel.device)
    dense.scatter_(2, flat, 1)
    dense = dense.view(B, KVH, tiles, tiles)
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    group = H // KVH
    num, idx = num.repeat_interleave(group, dim=1), idx.repeat_interleave(group, dim=1)
    mask_mod = ltis_mask_mod(sel, group, select_block, causal, lengths, N=N, padded=Nf > N)
    block_mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                          seq_lengths=(Nf, Nf))
    return block_mask, sel


def stis_block_mask(B: int, N: int, device: torch.device, lengths: Optional[torch.Tensor], *,
                    window: int, power_block: int, use_power: bool, causal: bool, use_sink: bool):
    """The STIS BlockMask (compiled ``create_block_mask``), at ``flex_len(N)``; per batch (B rows)
    when it depends on the lengths, else broadcast over the batch."""
    Nf = flex_len(N)
    mask_mod = stis_mask_mod(window, lengths, N=N, padded=Nf > N, power_block=power_block,
                             use_power=use_power, causal=causal, use_sink=use_sink)
    return _compiled_create_block_mask()(mask_mod, B=B if lengths is not None else None, H=None,
                                         Q_LEN=Nf, KV_LEN=Nf, device=device)


def flex_blossomrec(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                    gates: torch.Tensor, *, lengths_host: Optional[torch.Tensor] = None,
                    lengths: Optional[torch.Tensor] = None, stis_mask=None,
                    compress_stride: int = 16, select_block: int = 16, num_select: int = 4,
                    window: int = 8, power_block: int = 1, use_power: bool = True,
                    use_sink: bool = True, causal: bool = True) -> torch.Tensor:
    """The whole BlossomRec op (SPEC 1b-3) with FlexAttention, as a user would write it.

    ``q [B, H, N, D]``, ``k, v [B, KVH, N, D]`` (FlexAttention's layout), ``kc [B, C, KVH, D]``,
    ``gates [B, N, H, 2]`` -> ``out [B, H, N, D]`` (padding rows 0). Ragged batches (right padding)
    pass ``lengths_host`` (CPU int, for the selection) and ``lengths`` (the same on q's device, for
    the mask_mods). Per call: the project's ``select_blocks`` (no gradient), the LTIS BlockMask from
    that selection (:func:`ltis_block_mask`), the STIS BlockMask unless ``stis_mask`` is given (one
    built by :func:`stis_block_mask` for this N and these lengths), two compiled ``flex_attention``
    calls with ``enable_gqa=True`` and no lse (the gated combine needs none), then
    ``g_sel * o_sel + g_win * o_win``. Differentiable w.r.t. q, k, v, gates (FlexAttention's
    autograd; its backward runs on CUDA only). N shorter than one tile runs padded to
    ``flex_len(N)``."""
    import blossomrec_cuda

    B, H, N, _ = q.shape
    flex = _compiled_flex()
    with torch.no_grad():
        sel_idx, _ = blossomrec_cuda.select_blocks(
            q.detach().transpose(1, 2), kc, lengths=lengths_host, compress_stride=compress_stride,
            select_block=select_block, num_select=num_select, causal=causal)
        sel_mask, _ = ltis_block_mask(sel_idx, H, N, select_block, causal, lengths)
        if stis_mask is None:
            stis_mask = stis_block_mask(B, N, q.device, lengths, window=window,
                                        power_block=power_block, use_power=use_power,
                                        causal=causal, use_sink=use_sink)
    Nf = flex_len(N)
    qf, kf, vf = (_pad_seq(t, Nf, dim=2) for t in (q, k, v))
    o_sel = flex(qf, kf, vf, block_mask=sel_mask, enable_gqa=True)[:, :, :N]
    o_win = flex(qf, kf, vf, block_mask=stis_mask, enable_gqa=True)[:, :, :N]
    g = gates.transpose(1, 2).to(q.dtype)  # [B, H, N, 2]
    return g[..., 0:1] * o_sel + g[..., 1:2] * o_win


def _flex_hparams() -> dict:
    return {k: HPARAMS[k] for k in ("compress_stride", "select_block", "num_select", "window",
                                    "power_block", "use_power", "causal")}


def _pinned_lengths(sets: list[dict]) -> list[torch.Tensor]:
    """The host lengths in pinned memory, as a DataLoader with ``pin_memory=True`` yields them, so
    that the per-call copy to the GPU is asynchronous."""
    cuda = sets[0]["q"].device.type == "cuda"
    return [s["lengths_host"].pin_memory() if cuda else s["lengths_host"] for s in sets]


def build_flex_stis(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    """The STIS mask alone. Its BlockMask depends on N only: built once, outside the timed region,
    as a user caches it per length. A ragged batch's mask depends on its lengths: rebuilt per call
    (the lengths copied to the GPU per call). N shorter than one tile: q, k, v padded per call."""
    flex = _compiled_flex()
    tsets = _to_bhnd(sets, pass_)
    device = sets[0]["q"].device
    ragged = case.lengths is not None
    N, Nf = case.N, flex_len(case.N)
    hp = dict(window=HPARAMS["window"], power_block=HPARAMS["power_block"],
              use_power=HPARAMS["use_power"], causal=HPARAMS["causal"], use_sink=True)
    pinned = _pinned_lengths(sets)
    static_mask = None if ragged else stis_block_mask(case.B, N, device, None, **hp)

    def call(i):
        s = tsets[i]
        if ragged:
            lengths = pinned[i].to(device, non_blocking=True)
            block_mask = stis_block_mask(case.B, N, device, lengths, **hp)
        else:
            block_mask = static_mask
        qf, kf, vf = (_pad_seq(s[n], Nf, dim=2) for n in ("q", "k", "v"))
        return flex(qf, kf, vf, block_mask=block_mask, enable_gqa=True)[:, :, :N]
    return _pass_fn(pass_, tsets, call, ("q", "k", "v"))


def build_flex_blossomrec(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    """The whole op with FlexAttention (:func:`flex_blossomrec`). Inside the timed region: the
    selection, the LTIS BlockMask from it, (ragged: the lengths' copy to the GPU and the STIS
    BlockMask), the padding of short inputs, both flex calls and the combine. Outside: the
    ``[B, H, N, D]`` copies of q, k, v, dout (as for sdpa_dense and flex_stis) and, for full-length
    shapes, the STIS BlockMask (it depends on N only)."""
    tsets = _to_bhnd(sets, pass_)
    device = sets[0]["q"].device
    ragged = case.lengths is not None
    hp = _flex_hparams()
    pinned = _pinned_lengths(sets)
    static_mask = None if ragged else stis_block_mask(
        case.B, case.N, device, None, window=hp["window"], power_block=hp["power_block"],
        use_power=hp["use_power"], causal=hp["causal"], use_sink=True)
    for t, s in zip(tsets, sets):
        t["kc"] = s["kc"]
        t["gates"] = s["gates"].detach().clone().requires_grad_(pass_ != "fwd")

    def call(i):
        s = tsets[i]
        kw = dict(hp)
        if ragged:
            kw.update(lengths_host=sets[i]["lengths_host"],
                      lengths=pinned[i].to(device, non_blocking=True))
        return flex_blossomrec(s["q"], s["k"], s["v"], s["kc"], s["gates"], stis_mask=static_mask,
                               **kw)
    return _pass_fn(pass_, tsets, call, QKVG)


def build_reference(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
    from blossomrec_cuda import reference

    src = sets if pass_ == "fwd" else _grad_leaves(sets, QKVG)

    def call(i):
        s = src[i]
        return reference.blossom_attention(s["q"], s["k"], s["v"], s["kc"], s["gates"],
                                           torch.zeros_like(s["lengths"]), s["lengths"],
                                           **HPARAMS).out
    return _pass_fn(pass_, src, call, QKVG)


def capture(fn: Callable[[int], object], n_sets: int) -> Callable[[int], object]:
    """``fn(i)`` for each input set i captured in a CUDA graph after three warm-up rounds on a side
    stream (torch.cuda.graphs' recipe); the returned function replays graph i. What remains is the
    GPU time of the kernels."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA-graph methods need a GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for i in range(n_sets):
                fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for i in range(n_sets):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    return lambda i: graphs[i].replay()


def _graphed(build: Callable[[list[dict], Case, str], Callable[[int], object]]):
    """A builder whose calls replay CUDA graphs (:func:`capture`), one per input set."""
    def builder(sets: list[dict], case: Case, pass_: str) -> Callable[[int], object]:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA-graph methods need a GPU")
        # A captured call cannot copy the lengths from the host: the graph takes them on the GPU.
        inner = build([dict(s, lengths_host=s["lengths"]) for s in sets], case, pass_)
        return capture(inner, len(sets))
    return builder


BUILDERS = {
    "blossomrec": build_blossomrec,
    "blossomrec_graph": _graphed(build_blossomrec),
    "sdpa_dense_graph": _graphed(build_sdpa_dense),
    "blossomrec_gather": build_blossomrec_gather,
    "blossomrec_select": build_blossomrec_select,
    "blossomrec_attn": build_blossomrec_attn,
    "sdpa_dense": build_sdpa_dense,
    "flex_stis": build_flex_stis,
    "flex_blossomrec": build_flex_blossomrec,
    "reference": build_reference,
}


# --------------------------------------------------------------------------------------------------
# Result rows
# --------------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run: str
    device: str
    torch: str
    commit: str
    copy_bytes_per_ms: Optional[float] = None
    rows: list[dict] = field(default_factory=list)


def git_commit() -> str:
    if os.environ.get("BLOSSOMREC_COMMIT"):
        return os.environ["BLOSSOMREC_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_row(info: RunInfo, method: str, case: Case, pass_: str, ms: Optional[float],
             peak: Optional[float], status: str, **extra) -> dict:
    row = {
        "method": method, "shape": case.shape, "B": case.B, "N": case.N, "H": case.H,
        "KVH": case.KVH, "D": case.D, "dtype": DTYPE_NAMES[case.dtype], "pass": pass_,
        "ms": None if ms is None else round(ms, 5),
        "peak_mib": None if peak is None else round(peak, 3),
        "device": info.device, "torch": info.torch, "commit": info.commit, "status": status,
        "run": info.run,
    }
    if status == "ok" and method in BUILDERS:
        nbytes = compulsory_bytes(method, case, pass_)
        row["bytes"] = nbytes
        if info.copy_bytes_per_ms:
            floor = nbytes / info.copy_bytes_per_ms
            row["floor_ms"] = round(floor, 5)
            row["bw_ratio"] = round(ms / floor, 3) if ms else None
    row.update(extra)
    return row


def emit(info: RunInfo, row: dict, out_path: Optional[Path]) -> None:
    info.rows.append(row)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    ms = "-" if row["ms"] is None else f"{row['ms']:.4f}"
    peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
    print(f"  {row['method']:<18} {row['shape']:<4} D={row['D']:<3} {row['pass']:<8} ms={ms:<10} "
          f"peak_mib={peak:<9} {row['status']}", flush=True)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def format_table(rows: list[dict], baseline: str = "sdpa_dense") -> str:
    """Method x shape tables, one per (pass, D, dtype): median ms and the ratio to ``baseline``."""
    copy = [r for r in rows if r.get("method") == "copy_bandwidth" and r.get("status") == "ok"]
    rows = [r for r in rows if r.get("method") != "copy_bandwidth"]
    lines = []
    groups = sorted({(r["pass"], r["D"], r["dtype"]) for r in rows},
                    key=lambda g: (g[0] != "fwd", g[1], g[2]))
    for pass_, D, dtype in groups:
        sub = [r for r in rows if (r["pass"], r["D"], r["dtype"]) == (pass_, D, dtype)]
        shapes = sorted({r["shape"] for r in sub}, key=_shape_order)
        methods = sorted({r["method"] for r in sub}, key=_method_order)
        cell = {(r["method"], r["shape"]): r for r in sub}  # the last row of a (method, shape) wins
        device = sub[0]["device"]
        lines.append(f"\n{pass_}, D={D}, {dtype}, {device}: median ms (x {baseline})")
        width = 18
        lines.append(f"{'method':<18}" + "".join(f"{s:>{width}}" for s in shapes))
        for m in methods:
            cells = []
            for s in shapes:
                r = cell.get((m, s))
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"].split(":")[0])
                else:
                    base = cell.get((baseline, s))
                    ratio = (f" ({r['ms'] / base['ms']:.2f}x)"
                             if base and base["status"] == "ok" and base["ms"] else "")
                    cells.append(f"{r['ms']:.3f}{ratio}")
            lines.append(f"{m:<18}" + "".join(f"{c:>{width}}" for c in cells))
    for r in copy:
        lines.append(f"\ncopy bandwidth: {r['tb_per_s']:.2f} TB/s (read + write) on {r['device']}")
    return "\n".join(lines)


def _shape_order(name: str):
    m = re.match(r"([A-Z]+)(\d+)$", name)
    return (0 if name.startswith("S") else 1, m.group(1), int(m.group(2))) if m else (2, name, 0)


def _method_order(name: str):
    return (ALL_METHODS.index(name) if name in ALL_METHODS else len(ALL_METHODS), name)


def load_rows(path: Path, run: Optional[str] = None) -> list[dict]:
    """Rows of ``run`` in a results file (default: the file's last run; "all" for every run)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if run == "all" or not rows:
        return rows
    run = run or rows[-1]["run"]
    return [r for r in rows if r.get("run") == run]


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def import_package() -> Optional[str]:
    """Import blossomrec_cuda: this checkout when it holds an in-place build, else the installed
    package. Returns None, or the error status to record for its methods."""
    if (REPO / "blossomrec_cuda" / "_build_info.py").is_file() and str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import blossomrec_cuda  # noqa: F401
        return None
    except ImportError as e:
        return _error_status(e)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_status(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"error: {type(e).__name__}: {msg[:300]}"


def bench_case(case: Case, methods: list[str], passes: list[str], device: torch.device,
               info: RunInfo, out_path: Optional[Path], warmup_ms: float, rep_ms: float,
               import_error: Optional[str], min_reps: int = 5) -> None:
    try:
        first = make_inputs(case, device, seed=0)
    except torch.cuda.OutOfMemoryError:
        _free(device)
        for m in methods:
            for p in passes:
                if not (m in FWD_ONLY_METHODS and p != "fwd"):
                    emit(info, make_row(info, m, case, p, None, None, "oom"), out_path)
        return
    set_bytes = input_set_bytes(first)
    n_sets = 1 if set_bytes >= ROTATE_BELOW_BYTES else min(
        MAX_INPUT_SETS, math.ceil(2 * ROTATE_BELOW_BYTES / set_bytes))
    sets = [first] + [make_inputs(case, device, seed=s) for s in range(1, n_sets)]
    for method in methods:
        for pass_ in passes:
            if method in FWD_ONLY_METHODS and pass_ != "fwd":
                continue
            if method in PACKAGE_METHODS and import_error:
                emit(info, make_row(info, method, case, pass_, None, None, import_error), out_path)
                continue
            if method == "reference" and case.B * case.N > REFERENCE_MAX_TOKENS:
                print(f"  reference skipped at {case.shape} (more than {REFERENCE_MAX_TOKENS} rows)")
                continue
            fn = None
            try:
                fn = BUILDERS[method](sets, case, pass_)
                fn(0)  # compile / autotune / load outside the memory and time measurements
                # A graph's memory lives in its pool from the capture on: no peak to measure.
                peak = None if method.endswith("_graph") else peak_extra_mib(fn, device)
                ms, reps = time_ms(fn, n_sets, device, warmup_ms, rep_ms, min_reps)
                row = make_row(info, method, case, pass_, ms, peak, "ok", reps=reps,
                               input_sets=n_sets, valid_tokens=case.valid_tokens)
            except torch.cuda.OutOfMemoryError:
                row = make_row(info, method, case, pass_, None, None, "oom")
            except Exception as e:  # a failing method must not end the sweep
                row = make_row(info, method, case, pass_, None, None, _error_status(e))
            fn = None
            _free(device)
            emit(info, row, out_path)
    del sets, first
    _free(device)


def default_out_path(device: torch.device) -> Path:
    card = device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-").replace("nvidia-", "")
    return REPO / "benchmarks" / "results" / f"bench-{slug}-{_dt.date.today():%Y%m%d}.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    shapes = ", ".join(f"{k}=B{b}xN{n}" for k, (b, n) in SHAPES.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Shapes: {shapes} (R1 ragged).")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated PERF.md shape names")
    p.add_argument("--custom", action="append", default=[], metavar="NAME=BxN",
                   help="an extra full-length shape, e.g. L1=8x8192 (repeatable)")
    p.add_argument("--dims", default="16,64", help="head dims, comma-separated")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    p.add_argument("--pass", dest="pass_", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--quick", action="store_true", help="short warm-up and timing windows")
    p.add_argument("--out", help="results file to append to (default benchmarks/results/"
                                 "bench-<card>-<date>.jsonl; --cpu-smoke writes none by default)")
    p.add_argument("--data-dir", help="folder with amazon-beauty.txt (default: $BLOSSOMREC_DATA, "
                                      "../shared/data, .data)")
    p.add_argument("--run-id", help="run id shared by this invocation's rows (default: generated)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny float32 run on the CPU (blossomrec, sdpa_dense, reference unless "
                        "--methods is given; D=16 unless --dims is given; FlexAttention runs its "
                        "forward only on the CPU)")
    p.add_argument("--print-table", metavar="JSONL",
                   help="print the tables of a results file and exit")
    p.add_argument("--table-run",
                   help="with --print-table: the run id to show (default the last; 'all')")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_table:
        print(format_table(load_rows(Path(args.print_table), args.table_run)))
        return 0

    if args.cpu_smoke:
        device = torch.device("cpu")
        shapes = dict(CPU_SMOKE_SHAPES)
        ragged = {"CR"}
        methods = ["blossomrec", "sdpa_dense", "reference"]
        if args.methods != ",".join(DEFAULT_METHODS):
            methods = args.methods.split(",")
        dtype = torch.float32
        warmup_ms, rep_ms, min_reps = 20.0, 60.0, 3
        if args.dims == "16,64":
            args.dims = "16"
    else:
        if not torch.cuda.is_available():
            print("bench_attention: no CUDA device is visible. The benchmarks time GPU kernels; run "
                  "them on a machine with a GPU (benchmarks/device_run.sh), or pass --cpu-smoke for a "
                  "tiny CPU run that checks the script itself.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes = {n: SHAPES[n] for n in args.shapes.split(",") if n}
        unknown = [n for n in args.shapes.split(",") if n and n not in SHAPES]
        if unknown:
            print(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        ragged = set(RAGGED_SHAPES)
        methods = args.methods.split(",")
        dtype = DTYPES[args.dtype]
        warmup_ms, rep_ms = (10.0, 40.0) if args.quick else (50.0, 200.0)
        min_reps = 5
    for spec in args.custom:
        m = re.match(r"(\w+)=(\d+)x(\d+)$", spec)
        if not m:
            print(f"--custom takes NAME=BxN, got {spec!r}", file=sys.stderr)
            return 2
        shapes[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    bad = [m for m in methods if m not in BUILDERS]
    if bad:
        print(f"unknown methods {bad}; known: {', '.join(ALL_METHODS)}", file=sys.stderr)
        return 2
    passes = ["fwd", "fwd+bwd"] if args.pass_ == "both" else [args.pass_]
    dims = [int(d) for d in args.dims.split(",")]

    import_error = None
    if any(m in PACKAGE_METHODS for m in methods):
        import_error = import_package()
        if import_error:
            print("blossomrec_cuda does not import; its methods are recorded as errors: "
                  f"{import_error}")

    run_id = args.run_id or f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    info = RunInfo(run=run_id, device=device_name(device), torch=torch.__version__,
                   commit=git_commit())
    out_path = Path(args.out) if args.out else (None if args.cpu_smoke else default_out_path(device))
    print(f"run {run_id} on {info.device}, torch {info.torch}, commit {info.commit}")
    if out_path:
        print(f"appending to {out_path}")

    bpm, copy_ms, moved = measure_copy_bandwidth(device)
    info.copy_bytes_per_ms = bpm
    # One row in the common format: a [1, N] float32 tensor copied; H, KVH, D do not apply (0).
    copy_case = Case("copy", 1, moved // 2 // 4, 0, 0, 0, torch.float32)
    emit(info, make_row(info, "copy_bandwidth", copy_case, "fwd", copy_ms, None, "ok", bytes=moved,
                        tb_per_s=round(bpm / 1e9, 4)), out_path)

    data_dir = find_data_dir(args.data_dir)
    for D in dims:
        for name, (B, N) in shapes.items():
            lengths = None
            if name in ragged:
                try:
                    lengths = ragged_lengths(data_dir, B, max_len=N)
                except FileNotFoundError as e:
                    case = Case(name, B, N, args.heads, args.kv_heads, D, dtype)
                    for m in methods:
                        for p in passes:
                            emit(info, make_row(info, m, case, p, None, None, _error_status(e)),
                                 out_path)
                    continue
            case = Case(name, B, N, args.heads, args.kv_heads, D, dtype, lengths)
            print(f"{name}: B={B} N={N} H={args.heads} KVH={args.kv_heads} D={D} "
                  f"valid tokens {case.valid_tokens}", flush=True)
            bench_case(case, methods, passes, device, info, out_path, warmup_ms, rep_ms, import_error,
                       min_reps)

    print(format_table(info.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
