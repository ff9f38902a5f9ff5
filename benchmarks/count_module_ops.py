"""The host work of one eager module fwd+bwd on the CPU: how many operators BlossomAttention and the
fair dense module dispatch, and their wall time.

The eager module is host-bound on the GPU at short sequences (docs/PERF_NOTES.md, "Module level"):
its time there follows the number of operators Python dispatches, not the kernels' work. This script
counts them where no GPU is needed, on the CPU under bf16 autocast over float32 parameters with the
lengths on the host (the training path; bench_module.py's inputs, dim 128, 8 heads, 2 kv heads):

- ``dispatched``: the operators that reach the kernels (a ``TorchDispatchMode``, below autograd and
  autocast: autocast's casts are counted, composite operators such as ``linear`` are counted as
  what they decompose into), forward and backward apart;
- ``profiler``: every operator call torch.profiler records in the forward, composite ones and their
  parts alike (the figure docs/PERF_NOTES.md quotes: "~90 operators per forward");
- the wall time of fwd+bwd (and of the forward alone): ``--iters`` calls after a warm-up, in five
  rounds, the lowest round median. At the tiny shape it approximates the host time, bf16 GEMMs
  aside (on the CPU each costs tens of microseconds even there); at N = 50 it includes the CPU
  kernels.

Gradients are set to None before each call (as a training step's ``zero_grad`` does), so the
counts hold the module's backward, not the accumulation into old ``.grad`` tensors. The input is
a leaf by default, as in bench_module.py; ``--activation-input`` feeds a view of it instead, as a
layer inside a model sees its input (autocast then casts it once per projection, not once per
forward).

    python benchmarks/count_module_ops.py                       # B x N = 2 x 50 and 1 x 16
    python benchmarks/count_module_ops.py --shapes 2x50 --list  # and the operators, in order
    python benchmarks/count_module_ops.py --wrapper             # also the op wrapper's host time
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
if (REPO / "blossomrec_cuda" / "_build_info.py").is_file():  # this checkout's in-place build
    sys.path.insert(0, str(REPO))
import blossomrec_cuda  # noqa: E402
from blossomrec_cuda import BlossomAttention, DenseAttention  # noqa: E402

DIM, HEADS, KV_HEADS, DIM_HEAD = 128, 8, 2, 16
MODULES = {"blossom": BlossomAttention, "dense": DenseAttention}


class _Recorder(TorchDispatchMode):
    """Records the name of every operator that reaches the kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def make_call(name: str, B: int, N: int, autocast: Optional[torch.dtype], activation_input: bool,
              seed: int = 0) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]:
    """``(forward, backward)`` of one module call on bench_module.py's inputs: x ``[B, N, dim]``,
    right-padded host lengths uniform in N/4..N."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = MODULES[name](DIM, HEADS, KV_HEADS, DIM_HEAD)
    x = torch.randn(B, N, DIM, generator=g).requires_grad_()
    lengths = torch.randint(max(N // 4, 1), N + 1, (B,), generator=g)
    dout = torch.randn(B, N, DIM, generator=g)

    def forward() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        x.grad = None
        inp = x.view_as(x) if activation_input else x
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return module(inp, lengths=lengths)

    douts: dict[torch.dtype, torch.Tensor] = {}

    def backward(y: torch.Tensor) -> None:
        # the output gradient in y's dtype, cast once: its cast is the caller's, not the module's
        if y.dtype not in douts:
            douts[y.dtype] = dout.to(y.dtype)
        y.backward(douts[y.dtype])

    return forward, backward


def count_dispatched(forward, backward) -> tuple[list[str], list[str]]:
    """The operators dispatched by one forward and by its backward."""
    with _Recorder() as rec:
        y = forward()
    fwd = rec.names
    with _Recorder() as rec:
        backward(y)
    return fwd, rec.names


def count_profiled(forward) -> int:
    """Operator calls torch.profiler records in one forward (every level of nesting)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    return sum(1 for e in prof.events() if e.name.startswith(("aten::", "blossomrec::")))


def median_us(fn: Callable[[], object], iters: int, warmup: int, rounds: int = 5) -> float:
    """The lowest of ``rounds`` medians of ``iters / rounds`` timed calls each, in microseconds (a
    shared or virtual host slows whole stretches of calls down: the best round is the steady
    figure)."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(max(iters // rounds, 1)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def wrapper_overhead(iters: int, warmup: int) -> tuple[float, float]:
    """Median host time (us) of ``blossomrec_cuda.blossom_attention``'s forward at a tiny size, with
    a SeqLayout as the module passes it, against its two raw ops (select_blocks, then
    sparse_attention_fwd) with the same arguments: the cost of the wrapper's eager input checks."""
    B, N, H, KVH, D = 1, 16, 2, 1, 16
    q = torch.randn(B, N, H, D)
    k, v = torch.randn(B, N, KVH, D), torch.randn(B, N, KVH, D)
    kc = torch.randn(B, N // 16, KVH, D)
    gates = torch.rand(B, N, H, 2)
    start = torch.zeros(B, dtype=torch.int32)
    length = torch.full((B,), N, dtype=torch.int32)
    layout = blossomrec_cuda.SeqLayout(start, length, packed=False)
    hp = dict(select_block=16, window=8, power_block=1, use_power=True, use_sink=False,
              causal=True)
    scale = D ** -0.5

    def wrapped():
        return blossomrec_cuda.blossom_attention(q, k, v, kc, gates, layout=layout,
                                                 compress_stride=16, num_select=4, scale=scale,
                                                 **hp)

    def raw():
        idx, cnt = torch.ops.blossomrec.select_blocks(q, kc, start, length, 16, 16, 4, True, scale)
        return torch.ops.blossomrec.sparse_attention_fwd(q, k, v, gates, idx, cnt, start, length,
                                                         16, 8, 1, True, False, True, scale)

    with torch.no_grad():
        return median_us(wrapped, iters, warmup), median_us(raw, iters, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2x50,1x16", help="comma-separated BxN")
    p.add_argument("--modules", default="blossom,dense", help=f"any of {','.join(MODULES)}")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="autocast dtype (fp32: no autocast)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1: steadier times on a busy host)")
    p.add_argument("--activation-input", action="store_true",
                   help="feed a view of x (a non-leaf, as inside a model) instead of the leaf")
    p.add_argument("--list", action="store_true", help="print the dispatched operators in order")
    p.add_argument("--wrapper", action="store_true",
                   help="also time blossom_attention's wrapper against its raw ops (tiny size)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]

    print(f"CPU, autocast {args.dtype}, dim {DIM}, heads {HEADS}, kv_heads {KV_HEADS}, dim_head "
          f"{DIM_HEAD}, host lengths, {'activation' if args.activation_input else 'leaf'} input, "
          f"{args.threads} thread(s), best of 5 medians of {args.iters // 5} calls")
    print(f"{'module':>8} {'BxN':>7} {'fwd ops':>8} {'bwd ops':>8} {'total':>6} {'profiler fwd':>13} "
          f"{'fwd+bwd us':>11} {'fwd us':>8}")
    for shape in args.shapes.split(","):
        B, N = (int(s) for s in shape.lower().split("x"))
        for name in args.modules.split(","):
            forward, backward = make_call(name, B, N, autocast, args.activation_input)
            for _ in range(3):  # first calls: lazy initialisation, the compressor's cast cache
                backward(forward())
            fwd, bwd = count_dispatched(forward, backward)
            prof = count_profiled(forward)
            step = median_us(lambda: backward(forward()), args.iters, args.warmup)
            fwd_only = median_us(forward, args.iters, args.warmup)
            print(f"{name:>8} {B}x{N:<5} {len(fwd):>8} {len(bwd):>8} {len(fwd) + len(bwd):>6} "
                  f"{prof:>13} {step:>11.0f} {fwd_only:>8.0f}")
            if args.list:
                for phase, names in (("forward", fwd), ("backward", bwd)):
                    print(f"  {phase}: " + ", ".join(n.removeprefix("aten.") for n in names))
                    counts = Counter(names).most_common(6)
                    print(f"  {phase} most frequent: " +
                          ", ".join(f"{n.removeprefix('aten.')} x{c}" for n, c in counts))
    if args.wrapper:
        wrapped, raw = wrapper_overhead(args.iters * 5, args.warmup)
        print(f"blossom_attention forward, 1x16, 2 heads (no grad): wrapper {wrapped:.1f} us, raw "
              f"ops {raw:.1f} us, checks ~{wrapped - raw:.1f} us")


if __name__ == "__main__":
    main()
