"""Module and training-step benchmarks: BlossomAttention against the fair dense module, eager and
compiled, and one training step of the default recommender (BlossomRec against SASRec).

What to measure and how: ../shared/PERF.md ("Module level"). The fair dense module is
:class:`blossomrec_cuda.DenseAttention`: the same qkv projection, RoPE and output projection with
``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` and no mask (right padding).

Methods (PERF.md names; one JSON line each, keys of PERF.md plus ``dim``):

- ``module_blossom`` / ``module_blossom_compiled``: BlossomAttention fwd+bwd, eager / under
  ``torch.compile``;
- ``module_dense_fair`` / ``module_dense_fair_compiled``: DenseAttention, the same;
- ``train_step_blossom`` / ``train_step_sasrec``: forward, cross-entropy over all items, backward and
  an Adam step of the default model (hidden 128, 2 layers, 8 heads, 2 kv heads), eager;
- ``*_graph``: the same eager call captured once in a CUDA graph and replayed (no host work per
  call: what the GPU takes; the training step with ``Adam(capturable=True)``).

Inputs: ``x [B, N, dim]`` with right-padded lengths drawn uniformly from N/4..N (the training path),
bf16 autocast over float32 parameters. B x N = 102400 tokens up to N = 4096, then B = 4. The lengths
stay on the host for the eager methods, as the training command keeps them (``--lengths gpu``: on
the GPU, where the range check reads them back: a device sync per call); compiled and captured
calls take them on the GPU. Each row says which (``lengths``).

    python benchmarks/bench_module.py                      # N = 50, 200, 1024, 4096, 16384
    python benchmarks/bench_module.py --sizes 50,200 --methods module_blossom,module_dense_fair
    python benchmarks/bench_module.py --cpu-smoke          # tiny CPU run, no GPU needed
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import (RunInfo, _free, capture, device_name, emit, git_commit,  # noqa: E402
                             import_package, peak_extra_mib, time_ms)

MODULE_METHODS = ("module_blossom", "module_blossom_compiled", "module_blossom_graph",
                  "module_dense_fair", "module_dense_fair_compiled", "module_dense_fair_graph")
STEP_METHODS = ("train_step_blossom", "train_step_sasrec", "train_step_blossom_graph",
                "train_step_sasrec_graph")
ALL_METHODS = MODULE_METHODS + STEP_METHODS
TOKENS = 102400
DIM, HEADS, KV_HEADS = 128, 8, 2
NUM_ITEMS = 12000  # about Amazon Beauty's


def batch_size(N: int) -> int:
    return TOKENS // N if N <= 4096 else 4


def make_module(method: str, device: torch.device) -> torch.nn.Module:
    import blossomrec_cuda

    cls = blossomrec_cuda.BlossomAttention if "blossom" in method else blossomrec_cuda.DenseAttention
    return cls(DIM, HEADS, KV_HEADS, DIM // HEADS).to(device)


def build_module(method: str, B: int, N: int, device: torch.device, autocast: Optional[torch.dtype],
                 seed: int, host_lengths: bool = False) -> Callable[[int], object]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    module = make_module(method, device)
    fn = torch.compile(module) if method.endswith("_compiled") else module
    x = torch.randn(B, N, DIM, generator=g).to(device).requires_grad_()
    lengths = torch.randint(max(N // 4, 1), N + 1, (B,), generator=g)
    lengths = lengths if host_lengths else lengths.to(device)
    dout = torch.randn(B, N, DIM, generator=g).to(device)

    def run(_i: int) -> object:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            y = fn(x, lengths=lengths)
        y.backward(dout.to(y.dtype))
        return y

    return capture(run, 1) if method.endswith("_graph") else run


def build_step(method: str, B: int, N: int, device: torch.device, autocast: Optional[torch.dtype],
               seed: int, host_lengths: bool = False) -> Callable[[int], object]:
    from blossomrec_cuda.rec.model import build_model

    g = torch.Generator(device="cpu").manual_seed(seed)
    attention = "blossom" if method.startswith("train_step_blossom") else "dense"
    graph = method.endswith("_graph")
    model = build_model(NUM_ITEMS, attention=attention, hidden=DIM, heads=HEADS,
                        kv_heads=KV_HEADS).to(device)
    model.check_inputs = False  # as the training command runs it: no host reads of the batch
    for p in model.no_grad_parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                           capturable=graph)
    lengths = torch.randint(max(N // 4, 1), N + 1, (B,), generator=g)
    items = torch.randint(1, NUM_ITEMS + 1, (B, N), generator=g)
    items[torch.arange(N)[None, :] >= lengths[:, None]] = 0
    targets = torch.randint(1, NUM_ITEMS + 1, (B,), generator=g)
    items, targets = items.to(device), targets.to(device)
    lengths = lengths if host_lengths else lengths.to(device)

    def run(_i: int) -> object:
        opt.zero_grad(set_to_none=not graph)  # a graph keeps its gradient buffers
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model.loss(items, lengths, targets)
        loss.backward()
        opt.step()
        return loss

    return capture(run, 1) if graph else run


def row(info: RunInfo, method: str, B: int, N: int, ms: Optional[float], peak: Optional[float],
        status: str, dtype: str, lengths: str) -> dict:
    return dict(method=method, shape=f"M{N}", B=B, N=N, H=HEADS, KVH=KV_HEADS, D=DIM // HEADS,
                dim=DIM, dtype=dtype, **{"pass": "fwd+bwd"}, lengths=lengths, ms=ms, peak_mib=peak,
                device=info.device, torch=info.torch, commit=info.commit, status=status,
                run=info.run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50,200,1024,4096,16384", help="sequence lengths N")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--run-id", default=None)
    p.add_argument("--warmup-ms", type=float, default=100.0)
    p.add_argument("--rep-ms", type=float, default=400.0)
    p.add_argument("--lengths", choices=("host", "gpu"), default="host",
                   help="where the eager methods take the lengths (compiled and graph: the GPU)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, float32")
    a = p.parse_args(argv)
    import_error = import_package()
    if import_error:
        p.error(f"blossomrec_cuda does not import: {import_error}")
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    if a.cpu_smoke:
        device, autocast, dtype, sizes = torch.device("cpu"), None, "fp32", [(4, 40)]
        methods = [m for m in methods if not m.endswith(("_compiled", "_graph"))]
        a.warmup_ms, a.rep_ms = 1.0, 5.0
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --cpu-smoke)")
        device, autocast, dtype = torch.device("cuda"), torch.bfloat16, "bf16"
        sizes = [(batch_size(int(n)), int(n)) for n in a.sizes.split(",")]
    import datetime
    info = RunInfo(run=a.run_id or datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
                   device=device_name(device), torch=torch.__version__, commit=git_commit())
    out = Path(a.out) if a.out else None
    for B, N in sizes:
        for method in methods:
            builder = build_step if method in STEP_METHODS else build_module
            eager = not method.endswith(("_compiled", "_graph"))
            host = eager and (a.lengths == "host" or device.type == "cpu")
            where = "host" if host else "gpu"
            try:
                fn = builder(method, B, N, device, autocast, seed=0, host_lengths=host)
                fn(0)  # compile / load outside the measurements
                peak = peak_extra_mib(fn, device)
                ms, _ = time_ms(fn, 1, device, a.warmup_ms, a.rep_ms, 3)
                r = row(info, method, B, N, ms, peak, "ok", dtype, where)
            except torch.cuda.OutOfMemoryError:
                r = row(info, method, B, N, None, None, "oom", dtype, where)
            except Exception as e:  # a failing method must not end the sweep
                r = row(info, method, B, N, None, None, f"error: {type(e).__name__}: {e}"[:300],
                        dtype, where)
            fn = None
            _free(device)
            emit(info, r, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
