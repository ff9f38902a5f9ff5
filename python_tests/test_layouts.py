"""Padding invariance through the ops (SPEC notation; layouts in docs/DESIGN.md).

The same sequences, carried right-padded, left-padded and packed, must give the same rows of
``out`` and of every gradient; padding rows must be exactly 0 and nothing may be NaN. The CPU
kernels compute each sequence on its own in a fixed order, so the rows are compared with
``torch.equal``, not a tolerance. q, k, v as strided views of one fused qkv tensor must give what
contiguous copies give.
"""
from __future__ import annotations

import pytest
import torch

import blossomrec_cuda as br
from blossomrec_cuda import reference
from helpers import LAYOUTS, assert_fa_close, make_batch

H, KVH, D = 4, 2, 32
HPARAMS = dict(compress_stride=4, select_block=8, num_select=2, window=3, power_block=2,
               use_power=True, use_sink=True)


def forward_backward(batch, causal, cotangents):
    """out and the gradients of sum_b <out_b, cotangents[b]> w.r.t. q, k, v, gates (row buffers).

    The padding rows of ``out`` get a large random cotangent as well: it must not reach any
    gradient."""
    w = batch.to_wrapper
    out = batch.from_wrapper(br.blossom_attention(
        w(batch.q), w(batch.k), w(batch.v), batch.kc, w(batch.gates), causal=causal,
        **HPARAMS, **batch.layout_kwargs()))
    pad = ~batch.valid_rows()
    loss = (out[pad] * 1e3 * torch.randn_like(out[pad])).sum()
    for b, dout in enumerate(cotangents):
        loss = loss + (batch.seq(out, b) * dout).sum()
    leaves = [batch.qkv] if batch.qkv is not None else [batch.q, batch.k, batch.v]
    grads = torch.autograd.grad(loss, leaves + [batch.gates])
    if batch.qkv is not None:  # back to per-tensor gradients
        dqkv = grads[0].view(*batch.qkv.shape[:2], H + 2 * KVH, D)
        grads = (*dqkv.split([H, KVH, KVH], dim=2), grads[1])
    return out, dict(zip(("dq", "dk", "dv", "dgates"), grads))


def random_cotangents(lengths, dtype):
    return [torch.randn(L, H, D, dtype=torch.float64).to(dtype) for L in lengths]


def assert_padding_clean(batch, out, grads):
    pad = ~batch.valid_rows()
    for name, t in [("out", out), *grads.items()]:
        assert not bool(t.isnan().any()), f"{batch.layout}: NaN in {name}"
        assert bool((t[pad] == 0).all()), f"{batch.layout}: {name} is not 0 on padding rows"


def assert_same_rows(a, out_a, grads_a, b, out_b, grads_b):
    for s in range(len(a.lengths)):
        for name, x, y in [("out", out_a, out_b)] + [(n, grads_a[n], grads_b[n]) for n in grads_a]:
            assert torch.equal(a.seq(x, s), b.seq(y, s)), (
                f"{name} of sequence {s} differs between {a.layout} and {b.layout}: max diff "
                f"{(a.seq(x, s) - b.seq(y, s)).abs().max():.3e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[13, 0, 17, 1, 5], [0, 0, 0], [17]],
                         ids=["ragged", "all-empty", "one-full"])
def test_layouts_give_identical_rows(lengths, causal, dtype):
    cotangents = random_cotangents(lengths, dtype)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    results = []
    for layout in LAYOUTS:
        batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=17, layout=layout, dtype=dtype,
                           compress_stride=HPARAMS["compress_stride"], requires_grad=True,
                           seed=seed)
        out, grads = forward_backward(batch, causal, cotangents)
        assert_padding_clean(batch, out, grads)
        results.append((batch, out, grads))
    for other in results[1:]:
        assert_same_rows(*results[0], *other)
    if any(lengths):  # the rows compared are the op's real output, not zeros on both sides
        batch, out, _ = results[0]
        assert bool((out[batch.valid_rows()] != 0).any())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_match_the_reference(layout):
    """Guards the invariance test against comparing equally wrong outputs."""
    lengths, causal = [13, 0, 17, 1, 5], True
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=17, layout=layout,
                       compress_stride=HPARAMS["compress_stride"])
    w = batch.to_wrapper
    out = batch.from_wrapper(br.blossom_attention(
        w(batch.q), w(batch.k), w(batch.v), batch.kc, w(batch.gates), causal=causal, **HPARAMS,
        **batch.layout_kwargs()))
    args = (batch.q, batch.k, batch.v, batch.kc, batch.gates, batch.seq_start, batch.seq_len)
    ref = reference.blossom_attention(*(t.double() for t in args[:5]), *args[5:], causal=causal,
                                      **HPARAMS).out
    lowprec = reference.blossom_attention(*args, causal=causal, upcast=False, **HPARAMS).out
    assert_fa_close(out, ref, lowprec, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_contents_never_read(causal):
    """NaN in every padding row of q, k, v and gates changes nothing: the kernels never read
    padding (left padding and the packed trailing rows put it before and after sequences)."""
    lengths = [13, 0, 17, 1, 5]
    cotangents = random_cotangents(lengths, torch.float32)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    for layout in ("left", "packed"):
        runs = []
        for fill in ("garbage", "nan"):
            batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=17, layout=layout, pad_fill=fill,
                               compress_stride=HPARAMS["compress_stride"], requires_grad=True,
                               seed=seed)
            out, grads = forward_backward(batch, causal, cotangents)
            assert_padding_clean(batch, out, grads)
            runs.append((batch, out, grads))
        assert_same_rows(*runs[0], *runs[1])


def test_empty_packed_buffer():
    """A packed batch of empty sequences and no rows at all."""
    batch = make_batch([0, 0], H=H, KVH=KVH, D=D, layout="packed", packed_extra_rows=0,
                       compress_stride=HPARAMS["compress_stride"], requires_grad=True)
    w = batch.to_wrapper
    out = br.blossom_attention(w(batch.q), w(batch.k), w(batch.v), batch.kc, w(batch.gates),
                               **HPARAMS, **batch.layout_kwargs())
    assert out.shape == (0, H, D)
    dq, dgates = torch.autograd.grad(out.sum(), [batch.q, batch.gates])
    assert dq.shape == batch.q.shape and dgates.shape == batch.gates.shape


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_fused_qkv_views_match_contiguous_copies(layout, causal):
    """q, k, v as strided views of one [Bq, N, (H + 2*KVH) * D] tensor (stride(-1) == 1, row stride
    (H + 2*KVH) * D) must give exactly what contiguous q, k, v give, forward and backward."""
    lengths = [13, 0, 17, 1, 5]
    cotangents = random_cotangents(lengths, torch.float32)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    runs = []
    for fused in (True, False):
        batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=17, layout=layout, fused_qkv=fused,
                           compress_stride=HPARAMS["compress_stride"], requires_grad=True,
                           seed=seed)
        if fused:
            assert not batch.q.is_contiguous() and batch.q.stride(-1) == 1
        out, grads = forward_backward(batch, causal, cotangents)
        assert_padding_clean(batch, out, grads)
        runs.append((batch, out, grads))
    fused_batch, out_f, grads_f = runs[0]
    plain_batch, out_p, grads_p = runs[1]
    assert torch.equal(out_f, out_p), "out differs between fused views and contiguous copies"
    for name in grads_f:
        assert torch.equal(grads_f[name], grads_p[name]), f"{name} differs (fused vs contiguous)"


def test_full_length_layout_of_an_inference_call_does_not_leak_into_training():
    """Full-length layouts are cached per (B, N, device, stream); one made under inference_mode must
    not be the one a later training call saves for its backward (inference tensors cannot be)."""
    b = make_batch([20, 20], seed=0)
    hp = dict(compress_stride=4, select_block=4)
    with torch.inference_mode():
        expected = br.blossom_attention(b.q, b.k, b.v, b.kc, b.gates, **hp)
    qg = b.q.clone().requires_grad_(True)
    out = br.blossom_attention(qg, b.k, b.v, b.kc, b.gates, **hp)
    out.sum().backward()
    assert torch.equal(out.detach(), expected)
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_blossom_attention_takes_a_layout_as_the_modules_pass_it():
    """``layout=`` (the modules' path: their own bounds) gives what ``lengths`` gives, and it is
    either one or the other."""
    b = make_batch([20, 7, 0], H=4, KVH=2, layout="left", seed=1)
    q, k, v, kc, gates = b.q, b.k, b.v, b.kc, b.gates
    lengths = torch.tensor(b.lengths)
    hp = dict(compress_stride=4, select_block=4, num_select=2, padding_side="left")
    want = br.blossom_attention(q, k, v, kc, gates, lengths=lengths, **hp)
    layout = br.seq_layout(q, lengths=lengths, padding_side="left")
    got = br.blossom_attention(q, k, v, kc, gates, layout=layout, **hp)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="layout must be a SeqLayout, got tuple"):
        br.blossom_attention(q, k, v, kc, gates, layout=(layout.seq_start, layout.seq_len))
    with pytest.raises(ValueError, match="pass either layout or lengths / cu_seqlens, not both"):
        br.blossom_attention(q, k, v, kc, gates, layout=layout, lengths=lengths)
