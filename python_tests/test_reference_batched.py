"""reference.blossom_attention_batched (no Python loop over sequences) against
reference.blossom_attention (one blossom_attention_seq per sequence), which test_reference.py holds
to the brute force of docs/ALGORITHM.md.

Both layouts of padded batches (right and left padding), lengths 0, 1, around a block boundary and
the full buffer, causal and non-causal, the default block sizes and another configuration; every
field of the result, and the gradients w.r.t. q, k, v and gates. Then the packed fallback, exact
ties in the selection, NaN padding, and the module's reference backend.
"""
from __future__ import annotations

import pytest
import torch

from blossomrec_cuda import BlossomAttention, reference
from helpers import make_batch

# The op's default block sizes, and one with m = b / s = 2, fewer blocks, a smaller window, p = 2.
CONFIGS = {
    "default": dict(compress_stride=16, select_block=16, num_select=4, window=8, power_block=1),
    "b32n2w4p2": dict(compress_stride=16, select_block=32, num_select=2, window=4, power_block=2),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}
FIELDS = ("out", "o_sel", "o_win", "lse")


def _lengths(N: int) -> list[int]:
    """0, 1, 15, 16, 17 and N (those that fit), plus one in between."""
    lengths = [L for L in (0, 1, 15, 16, 17, N) if L <= N]
    return lengths + [min(N // 2 + 3, N)]


def _run_both(batch, **kw):
    """Both functions on the same leaves; returns [(result, grads)] for loop and batched."""
    leaves = [batch.q, batch.k, batch.v, batch.gates]
    weight = torch.randn(batch.q.shape, dtype=torch.float64).to(batch.q.dtype)  # padding included
    results = []
    for fn in (reference.blossom_attention, reference.blossom_attention_batched):
        res = fn(batch.q, batch.k, batch.v, batch.kc, batch.gates, batch.seq_start, batch.seq_len,
                 **kw)
        grads = torch.autograd.grad((res.out * weight).sum(), leaves)
        results.append((res, grads))
    return results


def _assert_same(results, dtype):
    (loop, g_loop), (bat, g_bat) = results
    for name in FIELDS:
        a, b = getattr(loop, name), getattr(bat, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert not bool(b.isnan().any()), f"NaN in batched {name}"
        torch.testing.assert_close(b, a, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert loop.sel_idx.dtype == bat.sel_idx.dtype == torch.int32
    assert torch.equal(bat.sel_idx, loop.sel_idx), "sel_idx differs"
    assert torch.equal(bat.sel_cnt, loop.sel_cnt), "sel_cnt differs"
    for name, a, b in zip(("dq", "dk", "dv", "dgates"), g_loop, g_bat):
        assert not bool(b.isnan().any()), f"NaN in batched {name}"
        torch.testing.assert_close(b, a, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("N", [1, 17, 50, 67])
@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_batched_matches_loop(dtype, causal, layout, N, config):
    hp = CONFIGS[config]
    batch = make_batch(_lengths(N), N=N, H=8, KVH=2, D=16, layout=layout, dtype=dtype,
                       compress_stride=hp["compress_stride"], extra_kc_rows=2, requires_grad=True)
    results = _run_both(batch, causal=causal, **hp)
    _assert_same(results, dtype)
    # the selection is exercised: some row keeps a block where blocks exist
    if N >= 2 * hp["select_block"] + 1:
        assert bool((results[1][0].sel_cnt > 0).any())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("use_power, use_sink", [(False, True), (True, False)])
def test_batched_matches_loop_switches(causal, use_power, use_sink):
    """The STIS switches, mixed block sizes (s = 4, b = 8), n larger than any sequence has blocks,
    a group of 4 heads, and a kc with many rows no sequence may read."""
    batch = make_batch([70, 0, 9, 33, 64, 1], N=70, H=8, KVH=2, D=16, layout="left",
                       dtype=torch.float64, compress_stride=4, extra_kc_rows=5, requires_grad=True)
    hp = dict(compress_stride=4, select_block=8, num_select=50, window=3, power_block=3,
              use_power=use_power, use_sink=use_sink, causal=causal)
    _assert_same(_run_both(batch, **hp), torch.float64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_nan_padding(causal):
    """NaN in every padding row (q, k, v, gates): the batched path reads them only through
    torch.where, so neither the result nor the gradients see them."""
    batch = make_batch([0, 50, 23, 1], N=50, H=8, KVH=2, D=16, layout="left", dtype=torch.float64,
                       compress_stride=16, pad_fill="nan", requires_grad=True)
    _assert_same(_run_both(batch, causal=causal), torch.float64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_exact_ties_keep_the_lower_block(causal):
    """All compressed keys equal: every block ties and both paths must pick the lowest visible
    blocks (the batched softmax runs over more, invisible, entries than each sequence has)."""
    batch = make_batch([67, 40, 20], N=67, H=4, KVH=2, D=16, layout="right", dtype=torch.float64,
                       compress_stride=4, requires_grad=True)
    batch.kc[:] = torch.randn(16, dtype=torch.float64)
    hp = dict(compress_stride=4, select_block=4, num_select=3, causal=causal)
    results = _run_both(batch, **hp)
    _assert_same(results, torch.float64)
    idx, cnt = results[1][0].sel_idx, results[1][0].sel_cnt
    assert int(cnt[0, 40, 0]) == 3
    assert idx[0, 40, 0].tolist() == [0, 1, 2]  # row 40 of sequence 0 (own block 10)
    if not causal:
        assert idx[0, 0, 0].tolist() == [1, 2, 3]  # own block 0 is never a candidate


def test_packed_layout_falls_back_to_the_loop():
    batch = make_batch([17, 0, 1, 40], H=8, KVH=2, D=16, layout="packed", dtype=torch.float64,
                       compress_stride=16, requires_grad=True)
    _assert_same(_run_both(batch), torch.float64)


def test_single_sequence_buffer():
    """Bq == B == 1 is a padded batch of one (not the packed fallback)."""
    batch = make_batch([30], N=45, H=8, KVH=2, D=16, layout="left", dtype=torch.float64,
                       compress_stride=16, requires_grad=True)
    _assert_same(_run_both(batch, num_select=1, window=2), torch.float64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_module_reference_backend_unchanged(monkeypatch, causal, padding_side):
    """BlossomAttention(backend="reference") now runs the batched function; its output and every
    parameter gradient equal those of the old loop path."""
    torch.manual_seed(0)
    m = BlossomAttention(64, 8, 2, 16, causal=causal, backend="reference").double()
    x = torch.randn(5, 50, 64, dtype=torch.float64)
    lengths = torch.tensor([50, 0, 1, 17, 33])

    def run():
        m.zero_grad(set_to_none=True)
        y = m(x, lengths=lengths, padding_side=padding_side)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                            if p.grad is not None}

    calls = []
    batched = reference.blossom_attention_batched

    def spy(*args, **kwargs):
        calls.append(1)
        return batched(*args, **kwargs)

    monkeypatch.setattr(reference, "blossom_attention_batched", spy)
    y_new, g_new = run()
    assert calls, "the reference backend did not call blossom_attention_batched"
    monkeypatch.setattr(reference, "blossom_attention_batched", reference.blossom_attention)
    y_old, g_old = run()
    torch.testing.assert_close(y_new, y_old, rtol=1e-10, atol=1e-10)
    assert set(g_new) == set(g_old) and "to_qkv.weight" in g_new
    for name in g_old:
        torch.testing.assert_close(g_new[name], g_old[name], rtol=1e-10, atol=1e-10, msg=name)
