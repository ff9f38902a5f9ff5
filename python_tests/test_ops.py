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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [0, 1])
def test_invalid_selection_entries_are_skipped(device, causal, d):
    """A hand-made selection with entries that are not visible whole blocks of the sequence (a
    negative index, one past the last whole block (the partial last block), far out of range, the
    query's own block, causal: the next block) gives bitwise what the selection without them gives,
    forward and every gradient, on every backend (CPU; CUDA's fused and row kernels), and the
    reference skips them too."""
    from helpers import make_batch, reference_given_selection

    import blossomrec_cuda

    dtype = DTYPES[device][d]
    lengths, N, b = [45, 30, 0], 45, 8
    batch = make_batch(lengths, H=4, KVH=2, D=16, N=N, dtype=dtype, device=device,
                       compress_stride=4, seed=5)
    kw = dict(lengths=batch.seq_len, select_block=b, causal=causal, use_sink=not causal)
    idx, cnt = blossomrec_cuda.select_blocks(batch.q, batch.kc, compress_stride=4, num_select=3,
                                             **{k_: kw[k_] for k_ in ("lengths", "select_block",
                                                                       "causal")})
    i = torch.arange(N, device=device)[None, :, None]
    L = batch.seq_len.to(device).long()[:, None, None]
    junk = [torch.full_like(cnt, -5), (L // b).expand_as(cnt), torch.full_like(cnt, 10 ** 6),
            (i // b).expand_as(cnt)]
    if causal:  # the next block (visible, hence no junk, when not causal)
        junk.append((i // b + 1).expand_as(cnt))
    junk = torch.stack([j.to(torch.int32) for j in junk], dim=-1)  # [B, N, KVH, 4 or 5]
    # the valid entries first, then the junk; counts cover both (padding rows keep 0)
    width = idx.shape[-1] + junk.shape[-1]
    wide = torch.full((*cnt.shape, width), -1, dtype=torch.int32, device=device)
    for c in range(idx.shape[-1]):
        wide[..., c] = torch.where(c < cnt, idx[..., c], wide[..., c])
    for c in range(junk.shape[-1]):
        wide.scatter_(-1, (cnt + c).long()[..., None], junk[..., c:c + 1])
    valid_row = i < L  # [B, N, 1]: padding rows keep their count 0
    wide_cnt = torch.where(valid_row, cnt + junk.shape[-1], cnt)
    names = ("q", "k", "v", "gates")
    results = []
    for sel_idx, sel_cnt in ((idx, cnt), (wide, wide_cnt)):
        t = {n: getattr(batch, n).detach().clone().requires_grad_(True) for n in names}
        out = blossomrec_cuda.sparse_attention(t["q"], t["k"], t["v"], t["gates"], sel_idx,
                                               sel_cnt, **kw)
        dout = torch.ones_like(out)
        results.append([out.detach(), *torch.autograd.grad(out, [t[n] for n in names], dout)])
    for name, a, b_ in zip(("out",) + names, *results):
        assert torch.equal(a, b_), f"{name}: invalid entries changed the result"
    hp = dict(select_block=b, window=8, power_block=1, use_power=True, use_sink=not causal,
              causal=causal)
    t = {n: getattr(batch, n).detach() for n in (*names, "kc")}
    ref_clean = reference_given_selection(t, batch.seq_start, batch.seq_len, idx, cnt, hp)
    ref_junk = reference_given_selection(t, batch.seq_start, batch.seq_len, wide, wide_cnt, hp)
    assert torch.equal(ref_clean["out"], ref_junk["out"]), "the reference attends an invalid entry"
