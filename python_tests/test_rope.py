"""blossomrec::rope (the modules' RoPE, one kernel forward and one backward) against the PyTorch
statement, reference.apply_rope at positions relative to each sequence's first valid row, on every
device: values, gradients, strided views, clamped positions, long positions, errors, opcheck."""
from __future__ import annotations

import pytest
import torch

import blossomrec_cuda
from blossomrec_cuda import reference
from blossomrec_cuda.attention import relative_positions

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# The op evaluates cos / sin (and theta ** (-2m / D)) in float64, the reference in its compute type
# (float32 for the 16- and 32-bit inputs: torch's float32 pow on CUDA is a few ulps off, which
# moves the angle by pos times that): FlashAttention's criterion against the float64 statement
# of the same inputs, the op's error at most twice the reference's plus a few ulps of the compute
# type; in the 16-bit types at most 1% of the elements may round differently from the reference.
ULP = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -23,
       torch.float16: 2.0 ** -23}


def _close(got: torch.Tensor, want: torch.Tensor, truth: torch.Tensor, ulps: float = 4) -> None:
    err = (got.double() - truth).abs().max().item()
    ref_err = (want.double() - truth).abs().max().item()
    eps = ulps * ULP[got.dtype] * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + eps, (
        f"max |op - float64| = {err:.3g}, reference's {ref_err:.3g} ({got.dtype})")
    if got.dtype in (torch.bfloat16, torch.float16):
        assert (got != want).double().mean().item() < 0.01


def _case(device: str, dtype: torch.dtype, B: int, N: int, heads: int, D: int, extra_heads: int,
          seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # a view of a wider projection, as the modules pass it: strided over rows and heads
    base = torch.randn(B, N, heads + extra_heads, D, generator=g, dtype=torch.float64)
    x = base.to(device=device, dtype=dtype)[:, :, :heads]
    seq_start = torch.randint(0, max(N // 2, 1), (B,), generator=g)
    seq_start[0] = 0
    if B > 2:
        seq_start[-1] = N + 3  # past the rows: every position clamps to 0
    return x, seq_start.to(device=device, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,heads,D,extra", [(3, 37, 5, 16, 2), (2, 130, 10, 64, 2),
                                               (1, 9, 1, 2, 0), (4, 64, 3, 128, 1)])
def test_rope_matches_reference(device, dtype, B, N, heads, D, extra):
    x, st = _case(device, dtype, B, N, heads, D, extra)
    pos = relative_positions(st.long(), N)
    want = reference.apply_rope(x, pos)
    xg = x.detach().clone().requires_grad_()
    got = blossomrec_cuda.rope(xg, st)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    x64 = x.double().requires_grad_()
    truth = reference.apply_rope(x64, pos)
    _close(got, want, truth.detach())
    # the backward (one more rotation, the other way) against autograd through the reference
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(device=device, dtype=dtype)
    got.backward(dout)
    xr = x.detach().clone().requires_grad_()
    reference.apply_rope(xr, pos).backward(dout)
    truth.backward(dout.double())
    _close(xg.grad, xr.grad, x64.grad)
    # rows whose position clamps to 0 are returned unchanged
    if B > 2:
        assert torch.equal(got[-1].detach(), x[-1])


@pytest.mark.parametrize("device", DEVICES)
def test_rope_long_positions(device):
    """Angles of tens of thousands of radians: the op's float64 cos / sin stay within a few float32
    ulps of the float64 reference (single-precision sin / cos under --use_fast_math would not)."""
    N = 70000
    x = torch.randn(1, N, 1, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = torch.zeros(1, dtype=torch.int32)
    want = reference.apply_rope(x, relative_positions(st.long(), N))
    got = blossomrec_cuda.rope(x.float().to(device), st.to(device)).cpu()
    # float32 inputs: the angle pos * inv_freq is rounded to float32 as in the reference, so the
    # difference to the float64 statement is the float32 reference's own (compare with it)
    want32 = reference.apply_rope(x.float(), relative_positions(st.long(), N))
    assert (got.double() - want32.double()).abs().max().item() < 1e-5
    assert (got.double() - want).abs().max().item() < 0.05  # the float32 angle's own rounding
    got64 = blossomrec_cuda.rope(x.to(device), st.to(device)).cpu()
    assert (got64 - want).abs().max().item() < 1e-9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [48, 6])
def test_rope_long_positions_other_head_dims(device, D):
    """Head dims that are not powers of two: -2m / D is inexact in float32 and the reference's float32
    frequencies may sit an ulp off the op's (float64, rounded once), which moves the angle by pos
    times that ulp. The op is as accurate as the reference against the float64 statement."""
    N = 70000
    x = torch.randn(1, N, 1, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = torch.zeros(1, dtype=torch.int32)
    pos = relative_positions(st.long(), N)
    truth = reference.apply_rope(x.float().double(), pos)  # float64 statement of the float32 input
    want = reference.apply_rope(x.float(), pos)
    got = blossomrec_cuda.rope(x.float().to(device), st.to(device)).cpu()
    _close(got, want, truth)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_int64_start_past_int32_is_refused(device):
    x = torch.randn(1, 4, 1, 16, device=device)
    with pytest.raises(ValueError, match="fit in int32"):
        blossomrec_cuda.rope(x, torch.tensor([2 ** 32], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_inverse_undoes_the_rotation(device):
    x, st = _case(device, torch.float64, 3, 50, 4, 32, 0)
    y = torch.ops.blossomrec.rope(x, st, 500.0, False)
    back = torch.ops.blossomrec.rope(y, st, 500.0, True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    assert not torch.allclose(y, x)


def test_rope_gradcheck():
    x, st = _case("cpu", torch.float64, 2, 11, 2, 8, 1)
    x = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: blossomrec_cuda.rope(t, st, 77.0), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_opcheck(device):
    x, st = _case(device, torch.float32, 2, 20, 3, 16, 1)
    x = x.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.blossomrec.rope.default, (x, st, 10000.0, False))


def test_rope_default_positions_and_int64_start():
    x, _ = _case("cpu", torch.float32, 2, 12, 2, 16, 0)
    pos = torch.arange(12)[None, :].expand(2, 12)
    _close(blossomrec_cuda.rope(x), reference.apply_rope(x, pos),
           reference.apply_rope(x.double(), pos))
    st = torch.tensor([1, 5])
    pos = relative_positions(st, 12)
    _close(blossomrec_cuda.rope(x, st), reference.apply_rope(x, pos),
           reference.apply_rope(x.double(), pos))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, st: (x[..., :15], st), ValueError, "positive and even"),
    (lambda x, st: (x[0], st), ValueError, "rank 4"),
    (lambda x, st: (x.int(), st), TypeError, "float32"),
    (lambda x, st: (x, st.float()), TypeError, "int32"),
    (lambda x, st: (x, st[:1]), ValueError, r"shape \[B\]"),
    (lambda x, st: (x.transpose(2, 3), st), ValueError, "contiguous last"),
    (lambda x, st: (x, st.to("meta")), ValueError, "device"),
])
def test_rope_errors(bad, exc, match):
    x = torch.randn(2, 5, 4, 16)
    st = torch.zeros(2, dtype=torch.int32)
    args = bad(x, st)
    with pytest.raises(exc, match=match):
        blossomrec_cuda.rope(*args)
    if exc is ValueError and match != "device":  # the raw op refuses it too (its C++ check)
        with pytest.raises(exc, match=match):
            torch.ops.blossomrec.rope(*args, 10000.0, False)
