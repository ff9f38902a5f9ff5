"""The ops against the reference on every device: one case table (``helpers.CASES``), one check
(``helpers.check_against_reference``: selection, forward outputs, padding and gradients under
FlashAttention's criterion), parametrized over the device as extension-cpp and FlashAttention do.
The CUDA parametrizations are marked ``cuda`` and skip without a GPU; the kernel-specific grids
(fused dispatch, staged path, long selections) are in test_ops_cuda.py, the CPU-only checks
(gradcheck, poisoning, opcheck of the CPU kernels, selection order) in test_ops_cpu.py.
"""
from __future__ import annotations

import pytest
import torch

from helpers import CASES, STIS, check_against_reference, stis_hp

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = {"cpu": (torch.float64, torch.float32, torch.bfloat16),
          "cuda": (torch.bfloat16, torch.float32, torch.float16)}
# Every case x STIS switch x causality x dtype in the right-padded layout; the left-padded and packed
# layouts with two STIS switches in every dtype.
GRID = [(case, stis, causal, "right", d)
        for case in range(len(CASES)) for stis in range(len(STIS)) for causal in (True, False)
        for d in range(3)]
GRID += [(case, stis, causal, layout, d)
         for case in range(len(CASES)) for stis in (0, 1) for causal in (True, False)
         for layout in ("left", "packed") for d in range(3)]
# The CPU kernels are slow on the 1025-token case (CI has 2 cores): there it runs in float32,
# right-padded, with the default STIS switches only.
SLOW_ON_CPU = {5}


def _on(device: str, p: tuple) -> bool:
    case, stis, causal, layout, d = p
    return not (device == "cpu" and case in SLOW_ON_CPU
                and (DTYPES["cpu"][d] != torch.float32 or layout != "right" or stis != 0))


def _id(p) -> str:
    case, stis, causal, layout, d = p
    return f"case{case}-stis{stis}-{'causal' if causal else 'noncausal'}-{layout}-d{d}"


PARAMS = [pytest.param(dev.values[0], *p, id=f"{_id(p)}-{dev.id}", marks=dev.marks)
          for dev in DEVICES for p in GRID if _on(dev.values[0], p)]


@pytest.mark.parametrize("device,case,stis,causal,layout,d", PARAMS)
def test_forward_backward_matches_reference(device, case, stis, causal, layout, d):
    dtype = DTYPES[device][d]
    lengths, N, H, KVH, D, case_hp = CASES[case]
    hp = stis_hp(case_hp, STIS[stis], causal)
    check_against_reference(lengths, N, H, KVH, D, hp, layout, dtype, device=device,
                            seed=case * 7 + stis)


# Gates in float32 with bfloat16 q (the op takes gates in q's dtype or float32), and float16, on a
# padded and a packed case.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,gates_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)],
                         ids=["bf16-gates-f32", "f16"])
@pytest.mark.parametrize("case,layout,stis,causal", [(2, "right", 0, True), (3, "packed", 1, False),
                                                     (1, "left", 0, False)],
                         ids=["case2-causal", "case3-packed", "case1-left-sink"])
def test_gate_dtypes_and_float16(device, case, layout, stis, causal, dtype, gates_dtype):
    lengths, N, H, KVH, D, case_hp = CASES[case]
    hp = stis_hp(case_hp, STIS[stis], causal)
    check_against_reference(lengths, N, H, KVH, D, hp, layout, dtype, device=device, seed=90 + case,
                            gates_dtype=gates_dtype)
