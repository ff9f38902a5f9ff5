"""Per-kernel GPU time of the whole op (selection, forward, backward) on PERF.md shapes, from
torch.profiler.

Complements benchmarks/bench_attention.py (whole-op medians against the baselines): this says which
kernel the time goes to. Under Nsight Compute (``NCU=1 bash benchmarks/device_run.sh``) run it with
``--iters 1`` so that each kernel is captured once.

    python benchmarks/profile_kernels.py --shapes S2,S4 --dims 16,64
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import blossomrec_cuda

SHAPES = {"S1": (2048, 50), "S2": (512, 200), "S3": (64, 1024), "S4": (16, 4096),
          "S5": (4, 16384), "S6": (1, 65536), "R1": (2048, 50)}
# R1 here: right-padded lengths uniform in 1..17 (mean 9, like the Amazon Beauty histories of
# bench_attention.py's R1), on the host as a data loader yields them.
RAGGED = {"R1": 17}
H, KVH = 8, 2


def inputs(B: int, N: int, D: int, max_len: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, grad=False):
        t = torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)
        return t.requires_grad_(grad)

    return dict(q=rnd(B, N, H, D, grad=True), k=rnd(B, N, KVH, D, grad=True),
                v=rnd(B, N, KVH, D, grad=True), kc=rnd(B, N // 16, KVH, D),
                gates=torch.sigmoid(rnd(B, N, H, 2)).detach().requires_grad_(True),
                dout=rnd(B, N, H, D),
                lengths=ragged_lengths(B, max_len) if max_len else None)


def ragged_lengths(B: int, max_len: int) -> torch.Tensor:
    return torch.randint(1, max_len + 1, (B,), generator=torch.Generator().manual_seed(0))


def step(x: dict[str, torch.Tensor], backward: bool) -> None:
    out = blossomrec_cuda.blossom_attention(x["q"], x["k"], x["v"], x["kc"], x["gates"],
                                            lengths=x["lengths"])
    if backward:
        # autograd.grad, as bench_attention.py: .backward() would add each gradient into the
        # inputs' .grad, four elementwise kernels per call that are not the op's
        torch.autograd.grad(out, (x["q"], x["k"], x["v"], x["gates"]), x["dout"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="S1,S2,S4,S6")
    p.add_argument("--dims", default="16,64")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--host", action="store_true",
                   help="also profile the host: operators by self CPU time, and the eager wall "
                        "time per call against the kernels' GPU time")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py needs a CUDA GPU")
    for name in a.shapes.split(","):
        B, N = SHAPES[name]
        for D in (int(d) for d in a.dims.split(",")):
            x = inputs(B, N, D, RAGGED.get(name, 0))
            for _ in range(2):  # warm-up
                step(x, not a.fwd_only)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(a.iters):
                    step(x, not a.fwd_only)
                torch.cuda.synchronize()
            print(f"===== {name} (B={B}, N={N}), D={D}, {a.iters} iterations, "
                  f"{torch.cuda.get_device_name(0)}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                            max_name_column_width=70))
            if a.host:
                host_profile(x, not a.fwd_only, a.iters)


def host_profile(x: dict[str, torch.Tensor], backward: bool, iters: int) -> None:
    """Wall time per eager call (back to back, one sync at the end) against the GPU time of its
    kernels (the sum over the CUDA profile), and the operators that spend the host's time."""
    import time
    n = 50
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, backward)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(x, backward)
        torch.cuda.synchronize()
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / n
    print(f"host: eager wall {wall_ms:.3f} ms per call, kernels {gpu_ms:.3f} ms per call")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step(x, backward)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
