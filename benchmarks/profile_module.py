"""Where a module fwd+bwd spends its time: torch.profiler over BlossomAttention and the fair dense
module (benchmarks/bench_module.py's inputs), per call: GPU time, kernel launches, the host's wall
time, and the kernels grouped by what they belong to.

    python benchmarks/profile_module.py --sizes 50,200 --methods module_blossom,module_dense_fair
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_module import MODULE_METHODS, batch_size, build_module  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50,200,1024")
    p.add_argument("--methods", default="module_blossom,module_dense_fair")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--host-lengths", action="store_true",
                   help="lengths on the host (as a data loader yields them) instead of the GPU")
    p.add_argument("--cpu-ops", type=int, default=0, metavar="K",
                   help="also list the K host operators with the most self CPU time per call "
                        "(where the eager module's host time goes)")
    args = p.parse_args()
    device = torch.device("cuda")
    for N in (int(s) for s in args.sizes.split(",")):
        B = batch_size(N)
        for method in args.methods.split(","):
            assert method in MODULE_METHODS, method
            run = build_module(method, B, N, device, torch.bfloat16, seed=0,
                               host_lengths=args.host_lengths)
            for i in range(3):
                run(i)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.iters):
                run(i)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.iters * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(args.iters):
                    run(i)
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_name: dict[str, list[float]] = defaultdict(list)
            for e in kernels:
                by_name[e.name].append(e.device_time_total if hasattr(e, "device_time_total")
                                       else e.cuda_time_total)
            gpu_us = sum(sum(v) for v in by_name.values()) / args.iters
            print(f"\n== {method} B={B} N={N} ({'host' if args.host_lengths else 'gpu'} lengths): "
                  f"wall {wall:.3f} ms/call, GPU busy {gpu_us / 1e3:.3f} ms/call, "
                  f"{len(kernels) / args.iters:.0f} kernels/call")
            rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
            for name, times in rows[: args.top]:
                print(f"  {sum(times) / args.iters:9.1f} us  {len(times) / args.iters:5.1f}x  "
                      f"{name[:110]}")
            if args.cpu_ops:
                host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
                host.sort(key=lambda e: -e.self_cpu_time_total)
                total = sum(e.self_cpu_time_total for e in host) / args.iters
                print(f"  host: {total / 1e3:.3f} ms self CPU per call (under the profiler); top "
                      f"{args.cpu_ops} operators, self us per call, calls per call:")
                for e in host[: args.cpu_ops]:
                    print(f"  {e.self_cpu_time_total / args.iters:9.1f} us  "
                          f"{e.count / args.iters:5.1f}x  {e.key[:100]}")
            del run
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
