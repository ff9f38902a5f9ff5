"""The FlexAttention methods of benchmarks/bench_attention.py compute BlossomRec's function.

``flex_blossomrec`` (the whole op: the project's selection, two FlexAttention calls, the gated
combine) and ``flex_stis`` (padded to one BlockMask tile below 128 tokens) against
``blossomrec_cuda.reference``, given the op's own selection (near-ties in the block scores may pick
another block in another precision: the attention is what is checked here). The forward runs on the
CPU (compiled flex_attention); FlexAttention has no CPU backward, so the gradients are a CUDA test.
The LTIS BlockMask built from the selection is checked against ``create_block_mask`` of the same
mask_mod: it must hold every tile in which the mask has a key.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

blossomrec_cuda = pytest.importorskip("blossomrec_cuda", reason="blossomrec_cuda does not import")
flex_api = pytest.importorskip("torch.nn.attention.flex_attention",
                               reason="this torch has no FlexAttention")
if not hasattr(flex_api.BlockMask, "from_kv_blocks"):
    pytest.skip("this torch's BlockMask has no from_kv_blocks", allow_module_level=True)

from blossomrec_cuda import reference  # noqa: E402


def _load_bench():
    path = REPO / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

H, KVH, D = 4, 2, 16
HP = dict(compress_stride=16, select_block=16, num_select=4, window=8, power_block=1,
          use_power=True)


def _flex_compiles_here() -> bool:
    """Compiled flex_attention needs inductor's code generation (a C++ compiler on the CPU)."""
    try:
        q = torch.randn(1, 1, 128, 16)
        bench._compiled_flex()(q, q, q)
        return True
    except Exception:  # noqa: BLE001 - any failure means the environment cannot run the check
        return False


@pytest.fixture(scope="module")
def cpu_flex():
    if not _flex_compiles_here():
        pytest.skip("compiled flex_attention does not run on this CPU (inductor needs a compiler)")


def _inputs(B, N, device, dtype, lengths):
    g = torch.Generator().manual_seed(B * 1000 + N)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(q=randn(B, N, H, D), k=randn(B, N, KVH, D), v=randn(B, N, KVH, D),
                kc=randn(B, N // 16, KVH, D),
                gates=torch.sigmoid(randn(B, N, H, 2).float()).to(dtype),
                lengths=torch.tensor(lengths, dtype=torch.int32))


def _run_flex(x, causal, ragged):
    """flex_blossomrec on the op's layout ([B, N, heads, D] in, out)."""
    bhnd = {n: x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")}
    dev_lengths = x["lengths"].to(x["q"].device)
    out = bench.flex_blossomrec(bhnd["q"], bhnd["k"], bhnd["v"], x["kc"], x["gates"],
                                lengths_host=x["lengths"] if ragged else None,
                                lengths=dev_lengths if ragged else None, causal=causal, **HP)
    return out.transpose(1, 2), bhnd


def _reference(x, causal, upcast, sel):
    """The reference op per sequence, given the selection ``sel = (idx, cnt)`` (row buffers);
    padding rows 0."""
    out = torch.zeros_like(x["q"], dtype=torch.float32 if upcast else x["q"].dtype)
    for b, L in enumerate(x["lengths"].tolist()):
        if L == 0:
            continue
        r = reference.blossom_attention_seq(
            x["q"][b, :L], x["k"][b, :L], x["v"][b, :L], x["kc"][b], x["gates"][b, :L],
            causal=causal, upcast=upcast, sel=(sel[0][b, :L], sel[1][b, :L]), **HP)
        out[b, :L] = r.out.to(out.dtype)
    return out


def _op_selection(x, causal):
    return blossomrec_cuda.select_blocks(
        x["q"], x["kc"], lengths=x["lengths"], causal=causal,
        **{k: HP[k] for k in ("compress_stride", "select_block", "num_select")})


def _assert_close(out, ref, low, atol):
    """FlashAttention's criterion: |out - ref| <= 2 |low - ref| + atol (low: the reference in the
    test dtype)."""
    err = (out.float() - ref).abs().max().item()
    bound = 2 * (low.float() - ref).abs().max().item() + atol
    assert err <= bound, f"max error {err:.3g} above {bound:.3g}"


# (B, N, lengths, causal, dtype): N = 50 runs padded to one tile; N = 200 spans two tiles and a
# partial one; 144 non-causal exercises the sink and the own block reaching past the query.
CASES = [
    (2, 50, [50, 50], True, torch.float32),
    (3, 200, [200, 37, 150], True, torch.bfloat16),
    (3, 144, [144, 1, 97], False, torch.float32),
]


@pytest.mark.parametrize("B,N,lengths,causal,dtype", CASES)
def test_flex_blossomrec_forward_matches_reference(cpu_flex, B, N, lengths, causal, dtype):
    x = _inputs(B, N, "cpu", dtype, lengths)
    ragged = min(lengths) < N
    with torch.no_grad():
        out, _ = _run_flex(x, causal, ragged)
        sel = _op_selection(x, causal)
        ref = _reference(x, causal, True, sel)
        low = ref if dtype == torch.float32 else _reference(x, causal, False, sel)
    assert not torch.isnan(out).any()
    valid = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    assert (out[~valid] == 0).all(), "padding rows must be 0"
    _assert_close(out, ref, low, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_flex_stis_padded_short_ragged_matches_reference(cpu_flex):
    """flex_stis at N = 50 < 128 (padded per call) with ragged lengths: STIS attention alone."""
    B, N = 3, 50
    lengths = [50, 9, 23]
    case = bench.Case("t", B, N, H, KVH, D, torch.float32, lengths)
    s = bench.make_inputs(case, torch.device("cpu"), seed=0)
    with torch.no_grad():
        out = bench.build_flex_stis([s], case, "fwd")(0).transpose(1, 2)
    for b, L in enumerate(lengths):
        rows = torch.arange(L)
        mask = reference.stis_mask(rows, L, window=HP["window"], causal=True)
        ref, _ = reference.masked_attention(s["q"][b, :L], s["k"][b, :L], s["v"][b, :L],
                                            mask[None], D ** -0.5)
        torch.testing.assert_close(out[b, :L], ref, atol=1e-5, rtol=1e-5)
        assert (out[b, L:] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("select_block", [16, 48])
def test_ltis_block_mask_holds_every_tile_with_a_key(causal, select_block):
    """The tiles derived from the selection cover create_block_mask's tiles of the same mask_mod
    (48: blocks that straddle two tiles). Random selections, -1 past a random count."""
    B, N, n = 2, 300, 4
    blocks = N // select_block
    sel = torch.randint(0, blocks, (B, N, KVH, n), dtype=torch.int32)
    cnt = torch.randint(0, n + 1, (B, N, KVH))
    sel[torch.arange(n)[None, None, None, :] >= cnt[..., None]] = -1
    lengths = torch.tensor([N, 131], dtype=torch.int32)
    ours, padded_sel = bench.ltis_block_mask(sel, H, N, select_block, causal, lengths)
    Nf = bench.flex_len(N)
    mask_mod = bench.ltis_mask_mod(padded_sel, H // KVH, select_block, causal, lengths, N=N,
                                   padded=Nf > N)
    exact = flex_api.create_block_mask(mask_mod, B, H, Nf, Nf, device="cpu",
                                       BLOCK_SIZE=bench.FLEX_BLOCK)
    have = ours.to_dense().bool()
    need = exact.to_dense().bool()
    assert need.any()
    missing = need & ~have
    assert not missing.any(), f"{int(missing.sum())} tiles with keys are missing"


@pytest.mark.cuda
@pytest.mark.parametrize("B,N,lengths,causal", [(4, 50, [50, 9, 1, 33], True),
                                                (2, 1024, [1024, 700], True),
                                                (2, 200, [200, 131], False)])
def test_flex_blossomrec_grads_match_reference_cuda(B, N, lengths, causal):
    """Forward and gradients w.r.t. q, k, v, gates (FlexAttention's autograd), bf16, against the
    reference given the op's selection."""
    dev = torch.device("cuda")
    x = _inputs(B, N, dev, torch.bfloat16, lengths)
    ragged = min(lengths) < N
    names = ("q", "k", "v", "gates")
    # flex_blossomrec takes q, k, v as [B, heads, N, D]: the leaves are those copies
    leaves = [x[n].transpose(1, 2).contiguous().requires_grad_(True) for n in ("q", "k", "v")]
    leaves.append(x["gates"].clone().requires_grad_(True))
    out = bench.flex_blossomrec(*leaves[:3], x["kc"], leaves[3],
                                lengths_host=x["lengths"] if ragged else None,
                                lengths=x["lengths"].to(dev) if ragged else None, causal=causal,
                                **HP)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    got = [out.transpose(1, 2)] + [g.transpose(1, 2) for g in grads[:3]] + [grads[3]]
    sel = _op_selection(x, causal)
    expected = {}
    for upcast in (True, False):
        ref_leaves = {n: x[n].detach().clone().requires_grad_(True) for n in names}
        ref_out = _reference(dict(x, **ref_leaves), causal, upcast, sel)
        ref_grads = torch.autograd.grad(ref_out, [ref_leaves[n] for n in names],
                                        dout.transpose(1, 2).to(ref_out.dtype))
        expected[upcast] = [ref_out] + [g.float() for g in ref_grads]
    for name, g, ref, low in zip(("out", "dq", "dk", "dv", "dgates"), got, expected[True],
                                 expected[False]):
        assert not torch.isnan(g).any(), name
        _assert_close(g, ref, low, atol=1e-2)
