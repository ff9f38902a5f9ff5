"""DEV experiment (2026-11-30): time select_blocks' kernel variants (BLOSSOMREC_SELECT_VARIANT, bf16
only: a temporary switch in an uncommitted patch on e2dee46, removed again in 3fe0df9; this script
does nothing useful on other builds; the variant kernel carried __launch_bounds__(128, 1 or 5), so
variant 3 had v7's source but 96 registers at D = 16 against 72 in v7's own build) on PERF.md shapes, in one process, and check that
they select the same blocks. Variants: 3 = e2dee46 (64-bit mask per block, insertion test
`s > thresh || (count < n && s > -inf)`), 0 = that mask with the new insertion test (`s > thresh`,
skipped for a tile whose maximum does not beat thresh), 1 = new test and a 32-bit mask with the
dot computed unconditionally, 2 = 1 with __launch_bounds__(128, 5).

    python benchmarks/results/dev/select_variants.py
"""
import os
import statistics

import torch

import blossomrec_cuda  # noqa: F401

SHAPES = {"S1": (2048, 50), "S2": (512, 200), "S4": (16, 4096), "S5": (4, 16384), "S6": (1, 65536)}
H, KVH = 8, 2
print(torch.cuda.get_device_name(0))
for D in (16, 64):
    for name, (B, N) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, N, H, D, device="cuda", generator=g).to(torch.bfloat16)
        kc = torch.randn(B, N // 16, KVH, D, device="cuda", generator=g).to(torch.bfloat16)
        st = torch.zeros(B, dtype=torch.int32, device="cuda")
        ln = torch.full((B,), N, dtype=torch.int32, device="cuda")
        res, outs = {}, {}
        for v in ("3", "0", "1", "2"):
            os.environ["BLOSSOMREC_SELECT_VARIANT"] = v
            f = lambda: torch.ops.blossomrec.select_blocks(q, kc, st, ln, 16, 16, 4, True, D ** -0.5)  # noqa: E731
            for _ in range(3):
                outs[v] = f()
            ts = []
            for _ in range(15):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            res[v] = statistics.median(ts)
        same = all(torch.equal(outs[v][0], outs["3"][0]) and torch.equal(outs[v][1], outs["3"][1])
                   for v in outs)
        print(f"D={D} {name}: " + "  ".join(f"v{v} {ms:.3f} ms" for v, ms in res.items())
              + f"  same selection: {same}", flush=True)
