"""The main job on a built-in default: ``python -m blossomrec_cuda.demo``.

1. Builds a synthetic padded batch with ragged lengths (an empty sequence and a one-token sequence
   included): random q, k, v, compressed keys from the spec's compressor (SPEC 1a) and sigmoid gates.
2. Runs :func:`blossomrec_cuda.blossom_attention` forward and backward on the best device available
   (CUDA when the extension was built with it and a GPU is visible, else the CPU).
3. Checks it against :mod:`blossomrec_cuda.reference` on that batch: the block selection row by row,
   then the output and the gradients of q, k, v and gates (reference in float64 for float32 inputs,
   float32 for bf16 inputs); padding rows must be exactly 0 and nothing may be NaN.
4. Times the op forward + backward against dense ``F.scaled_dot_product_attention`` on a few shapes:
   PERF.md's standard shapes in bf16 on a GPU, modest float32 sizes on the CPU.

Exit status 0 when every check passed, 1 otherwise. ``--check-only`` skips the timing (the
device script runs it under compute-sanitizer). Runs in well under a minute on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blossomrec_cuda
from blossomrec_cuda import reference

# The op's hyper-parameters: docs/ALGORITHM.md's defaults (compression block l = 32 for the compressor).
COMPRESS_BLOCK = 32
HPARAMS = dict(compress_stride=16, select_block=16, num_select=4, window=8, power_block=1,
               use_power=True, causal=True)
SELECT_KEYS = ("compress_stride", "select_block", "num_select", "causal")
ATTN_KEYS = ("select_block", "window", "power_block", "use_power", "causal")

# The checked batch: 8 right-padded sequences of at most 96 tokens (6 selection blocks), the paper's
# head layout (8 query heads sharing 2 kv heads, D = 16).
CHECK_LENGTHS = [96, 80, 65, 40, 17, 16, 1, 0]
CHECK_N, CHECK_H, CHECK_KVH, CHECK_D = 96, 8, 2, 16

# Relative L2 error allowed against the reference, by input dtype: float32 kernels against a
# float64 reference land near 1e-6; bf16 operands land between 1e-3 and 1e-2.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
MIN_SELECTION_AGREEMENT = 0.99  # near-ties may flip a block in low precision; more is a bug

# Timed shapes (name, B, N). GPU: PERF.md's S1, S3, S4, S5 (full size). CPU: small enough for a
# 2-core machine.
CUDA_SHAPES = [("S1", 2048, 50), ("S3", 64, 1024), ("S4", 16, 4096), ("S5", 4, 16384)]
CPU_SHAPES = [("c50", 32, 50), ("c200", 8, 200), ("c1024", 2, 1024), ("c4096", 1, 4096)]


# --------------------------------------------------------------------------------------------------
# The synthetic batch
# --------------------------------------------------------------------------------------------------
def make_batch(B: int, N: int, H: int, KVH: int, D: int, lengths: list[int], dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """A right-padded batch: ``q [B, N, H, D]``, ``k, v [B, N, KVH, D]``,
    ``kc [B, N // 16, KVH, D]``, ``gates [B, N, H, 2]``, ``dout [B, N, H, D]``, ``lengths [B]`` int32.
    Random, never zeros.

    ``kc`` comes from SPEC 1a's compressor (a randomly initialised MLP) applied to each sequence's
    own keys, so the block scores look like those of a real model rather than of noise.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = randn(B, N, H, D), randn(B, N, KVH, D), randn(B, N, KVH, D)
    gates = torch.sigmoid(randn(B, N, H, 2).float()).to(dtype)
    dout = randn(B, N, H, D)
    stride = HPARAMS["compress_stride"]
    torch.manual_seed(seed)
    flat = COMPRESS_BLOCK * D
    mlp = nn.Sequential(nn.Linear(flat, flat), nn.ReLU(), nn.Linear(flat, D)).to(device, dtype)
    pos_table = 0.1 * randn(KVH, COMPRESS_BLOCK, D)
    kc = torch.zeros(B, max(N // stride, 1), KVH, D, device=device, dtype=dtype)
    with torch.no_grad():
        for b, L in enumerate(lengths):
            c = reference.compress_keys(k[b, :L], pos_table, mlp, COMPRESS_BLOCK, stride)
            kc[b, : c.shape[0]] = c
    return dict(q=q, k=k, v=v, kc=kc, gates=gates, dout=dout,
                lengths=torch.tensor(lengths, dtype=torch.int32, device=device))


# --------------------------------------------------------------------------------------------------
# The check against the reference
# --------------------------------------------------------------------------------------------------
def _rel_err(x: Tensor, ref: Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _max_abs(x: Tensor, ref: Tensor) -> float:
    return float((x.detach().double() - ref.detach().double()).abs().max()) if x.numel() else 0.0


def reference_with_selection(inp: dict[str, Tensor], sel_idx: Tensor, sel_cnt: Tensor,
                             dtype: torch.dtype) -> Tensor:
    """The reference's ``out [B, N, H, D]`` (in ``dtype``, differentiable w.r.t. the inputs given)
    on the selection ``(sel_idx, sel_cnt)`` of the op under test, so that a near-tie decided the
    other way in low precision cannot masquerade as an attention error."""
    q, k, v, gates = (inp[n] for n in ("q", "k", "v", "gates"))
    B, N = q.shape[0], q.shape[1]
    attn = {k_: HPARAMS[k_] for k_ in ATTN_KEYS}
    rows = []
    for b, L in enumerate(inp["lengths"].tolist()):
        seq = torch.zeros(N, *q.shape[2:], dtype=dtype, device=q.device)
        if L > 0:
            r = reference.blossom_attention_seq(
                q[b, :L].to(dtype), k[b, :L].to(dtype), v[b, :L].to(dtype), inp["kc"][b].to(dtype),
                gates[b, :L].to(dtype), compress_stride=HPARAMS["compress_stride"],
                num_select=HPARAMS["num_select"], sel=(sel_idx[b, :L], sel_cnt[b, :L]), **attn)
            seq = torch.cat([r.out, seq[L:]], dim=0)
        rows.append(seq)
    return torch.stack(rows)


def check(device: torch.device, dtype: torch.dtype, seed: int) -> bool:
    """Runs the op forward + backward on the check batch and compares it with the reference."""
    B, N = len(CHECK_LENGTHS), CHECK_N
    inp = make_batch(B, N, CHECK_H, CHECK_KVH, CHECK_D, CHECK_LENGTHS, dtype, device, seed)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    print(f"check: B={B} N={N} H={CHECK_H} KVH={CHECK_KVH} D={CHECK_D} {dtype} on {device}, "
          f"lengths {CHECK_LENGTHS}, reference in {ref_dtype}")
    names = ("q", "k", "v", "gates")
    leaves = {n: inp[n].clone().requires_grad_(True) for n in names}
    lengths = inp["lengths"]

    t0 = time.perf_counter()
    out = blossomrec_cuda.blossom_attention(leaves["q"], leaves["k"], leaves["v"], inp["kc"],
                                            leaves["gates"], lengths=lengths, **HPARAMS)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], inp["dout"])
    sel_idx, sel_cnt = blossomrec_cuda.select_blocks(
        inp["q"], inp["kc"], lengths=lengths, **{k: HPARAMS[k] for k in SELECT_KEYS})
    if device.type == "cuda":
        torch.cuda.synchronize()
    op_s = time.perf_counter() - t0

    ok = True
    # 1. Selection, row by row against the reference's own selection (valid rows only).
    agree = total = 0
    for b, L in enumerate(CHECK_LENGTHS):
        if L == 0:
            continue
        ref_idx, ref_cnt = reference.select_blocks(
            inp["q"][b, :L].to(ref_dtype), inp["kc"][b].to(ref_dtype), L,
            **{k: HPARAMS[k] for k in SELECT_KEYS})
        same = (sel_cnt[b, :L] == ref_cnt.to(sel_cnt.device)) & (
            sel_idx[b, :L] == ref_idx.to(sel_idx.device)).all(dim=-1)
        agree += int(same.sum())
        total += same.numel()
    frac = agree / max(total, 1)
    sel_ok = frac >= MIN_SELECTION_AGREEMENT
    ok &= sel_ok
    print(f"  selection: {agree}/{total} (row, kv head) selections identical to the reference "
          f"({100 * frac:.2f}%)  {'ok' if sel_ok else 'FAIL'}")

    # 2. Output and gradients against the reference on the op's own selection.
    ref_leaves = {n: inp[n].to(ref_dtype).requires_grad_(True) for n in names}
    ref_inp = dict(inp, **ref_leaves)
    ref_out = reference_with_selection(ref_inp, sel_idx, sel_cnt, ref_dtype)
    ref_grads = torch.autograd.grad(ref_out, [ref_leaves[n] for n in names],
                                    inp["dout"].to(ref_dtype))
    tol = REL_TOL[dtype]
    print(f"  {'tensor':<8}{'max |err|':>12}{'rel L2 err':>13}   (tolerance rel {tol:g})")
    for name, got, want in [("out", out, ref_out)] + [
            (f"d{n}", g, r) for n, g, r in zip(names, grads, ref_grads)]:
        finite = bool(torch.isfinite(got).all())
        rel = _rel_err(got, want)
        this_ok = finite and rel <= tol
        ok &= this_ok
        print(f"  {name:<8}{_max_abs(got, want):>12.3e}{rel:>13.3e}   "
              f"{'ok' if this_ok else ('FAIL: NaN/inf' if not finite else 'FAIL')}")

    # 3. Padding rows: output and gradients exactly 0.
    pad = torch.arange(N, device=device)[None, :] >= lengths[:, None].long()
    pad_ok = all(bool((t[pad] == 0).all()) for t in (out, *grads))
    ok &= pad_ok
    print(f"  padding rows of out, dq, dk, dv, dgates exactly 0: {'ok' if pad_ok else 'FAIL'}")
    print(f"  op forward + backward + selection: {op_s * 1e3:.1f} ms (first call, includes loading)")
    return ok


# --------------------------------------------------------------------------------------------------
# Timing against dense SDPA
# --------------------------------------------------------------------------------------------------
def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median of ``reps`` timed calls after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def timing_table(device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Forward + backward of the whole op and of dense causal SDPA (GQA), full-length sequences."""
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    reps = 20 if device.type == "cuda" else 3
    H, KVH, D = CHECK_H, CHECK_KVH, CHECK_D
    print(f"\ntiming: forward + backward, H={H} KVH={KVH} D={D} {dtype} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; median of {reps}")
    header = f"{'shape':<7}{'B':>6}{'N':>7}{'blossomrec ms':>15}{'sdpa_dense ms':>15}{'ratio':>8}"
    if device.type == "cuda":
        header += f"{'blossomrec MiB':>16}{'sdpa MiB':>10}"
    print(header)
    for name, B, N in shapes:
        inp = make_batch(B, N, H, KVH, D, [N] * B, dtype, device, seed)
        names = ("q", "k", "v", "gates")
        leaves = {n: inp[n].clone().requires_grad_(True) for n in names}
        # SDPA's layout is [B, heads, N, D]: transposed copies made outside the timed region.
        qt, kt, vt = (inp[n].transpose(1, 2).contiguous().requires_grad_(True)
                      for n in ("q", "k", "v"))
        dout_t = inp["dout"].transpose(1, 2).contiguous()

        def run_blossomrec():
            out = blossomrec_cuda.blossom_attention(leaves["q"], leaves["k"], leaves["v"], inp["kc"],
                                                    leaves["gates"], **HPARAMS)
            return torch.autograd.grad(out, [leaves[n] for n in names], inp["dout"])

        def run_sdpa():
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(out, (qt, kt, vt), dout_t)

        results = []
        for fn in (run_blossomrec, run_sdpa):
            try:
                peak = _peak_mib(fn, device)
                results.append((_median_ms(fn, device, reps), peak))
            except torch.cuda.OutOfMemoryError:
                results.append((None, None))
                torch.cuda.empty_cache()
        (b_ms, b_mem), (s_ms, s_mem) = results

        def fmt(x, spec):
            return "oom" if x is None else format(x, spec)

        ratio = f"{b_ms / s_ms:.2f}x" if b_ms and s_ms else "-"
        line = f"{name:<7}{B:>6}{N:>7}{fmt(b_ms, '.3f'):>15}{fmt(s_ms, '.3f'):>15}{ratio:>8}"
        if device.type == "cuda":
            line += f"{fmt(b_mem, '.1f'):>16}{fmt(s_mem, '.1f'):>10}"
        print(line, flush=True)
        del inp, leaves, qt, kt, vt, dout_t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("ratio = blossomrec / sdpa_dense time (below 1: faster). Full sweeps: "
          "benchmarks/bench_attention.py")


# --------------------------------------------------------------------------------------------------
def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        if not blossomrec_cuda.WITH_CUDA:
            if requested == "cuda":
                raise SystemExit("--device cuda: blossomrec_cuda was built without CUDA kernels; "
                                 "rebuild it where nvcc is found (see README, 'Building for a GPU')")
            print("note: a GPU is visible but blossomrec_cuda was built without CUDA kernels; "
                  "running on the CPU")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--check-only", action="store_true", help="skip the timing table")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"blossomrec_cuda demo: torch {torch.__version__}, extension built with CUDA: "
          f"{blossomrec_cuda.WITH_CUDA}, running on {device}")
    t0 = time.perf_counter()
    ok = check(device, dtype, args.seed)
    if not args.check_only:
        timing_table(device, dtype, args.seed)
    print(f"\n{'all checks passed' if ok else 'CHECKS FAILED'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
