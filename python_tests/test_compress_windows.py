"""blossomrec::compress_windows (BlossomAttention.compress_keys' input windows in one op) against the
module's PyTorch statement (shift_to_start, a cat with l - s zero rows, unfold, transpose, + pos,
reshape), bitwise in every dtype on every device: awkward N / l / s, left padding, clamped rows,
strided keys, subnormals and signed zeros, errors, opcheck, torch.compile and the module's own
compress_keys on both backends."""
from __future__ import annotations

import pytest
import torch

from blossomrec_cuda import BlossomAttention
from blossomrec_cuda import ops as _ops
from blossomrec_cuda.attention import shift_to_start

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def statement(k: torch.Tensor, seq_start: torch.Tensor, pos: torch.Tensor, l: int,
              s: int) -> torch.Tensor:
    """BlossomAttention.compress_keys' windows (backend="reference"), before the MLP."""
    B, N, KVH, D = k.shape
    C = N // s
    if C == 0:
        return k.new_zeros(B, 0, KVH, l * D)
    k = shift_to_start(k, seq_start)
    k = torch.cat([k.new_zeros(B, l - s, KVH, D), k[:, : C * s]], dim=1)
    windows = k.unfold(1, l, s).transpose(-1, -2)  # [B, C, KVH, l, D]
    windows = windows + pos.to(k.dtype)
    return windows.reshape(B, C, KVH, l * D)


def _case(device, dtype, B, N, KVH, D, l, s, starts, extra_heads=0, odd_stride=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a view of a wider projection ([B, N, H + 2*KVH, D], the keys in the middle), as the module
    # passes it; odd_stride: one more column per head too (no 16-byte accesses on CUDA)
    width = D + 1 if odd_stride else D
    base = torch.randn(B, N, KVH + 2 * extra_heads, width, generator=g, dtype=torch.float64)
    k = base.to(device=device, dtype=dtype)[:, :, extra_heads:extra_heads + KVH, :D]
    pos = torch.randn(KVH, l, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    seq_start = torch.tensor(starts, dtype=torch.int32, device=device)
    return k, seq_start, pos


# (B, N, KVH, D, l, s, seq_start, extra heads, odd strides)
CASES = [
    pytest.param(2, 45, 2, 16, 8, 4, [0, 0], 0, False, id="full-rows"),
    pytest.param(3, 37, 3, 16, 8, 4, [0, 5, 20], 2, False, id="N%s-left-pad-strided"),
    pytest.param(2, 50, 1, 32, 16, 16, [3, 0], 1, False, id="l==s"),
    pytest.param(2, 50, 2, 64, 32, 16, [0, 7], 2, False, id="l=2s"),
    pytest.param(1, 61, 1, 16, 12, 4, [9], 0, False, id="l=3s-B1"),
    pytest.param(3, 40, 2, 16, 8, 4, [30, 39, 45], 1, False, id="clamped-rows"),
    pytest.param(2, 33, 3, 128, 6, 2, [0, 11], 2, False, id="D128-s2"),
    pytest.param(2, 3, 2, 16, 8, 4, [0, 1], 0, False, id="N<s-empty"),
    pytest.param(2, 0, 2, 16, 8, 4, [0, 0], 0, False, id="N0-empty"),
    pytest.param(2, 29, 3, 16, 9, 3, [2, 0], 1, True, id="odd-strides"),
    pytest.param(2, 21, 2, 6, 5, 2, [0, 4], 0, False, id="D6"),
    pytest.param(2, 17, 1, 2, 4, 4, [1, 0], 1, False, id="D2"),
    pytest.param(2, 20, 2, 16, 8, 4, [-3, -40], 0, False, id="negative-start"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,KVH,D,l,s,starts,extra,odd", CASES)
def test_compress_windows_matches_statement(device, dtype, B, N, KVH, D, l, s, starts, extra, odd):
    k, st, pos = _case(device, dtype, B, N, KVH, D, l, s, starts, extra, odd)
    got = _ops._compress_windows(k, st, pos, l, s)
    want = statement(k, st.long(), pos, l, s)
    assert got.shape == (B, N // s, KVH, l * D) and got.dtype == dtype
    assert got.is_contiguous() and got.device == k.device
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compress_windows_subnormals_and_signed_zeros(device, dtype):
    """Sums rounded exactly as torch's add rounds them, bit for bit: subnormal inputs and sums kept
    (the CUDA add is not flushed to zero by --use_fast_math), 0 + -0 = +0 in the zero rows."""
    fi = torch.finfo(dtype)
    B, N, KVH, D, l, s = 2, 24, 2, 16, 8, 4
    k, st, pos = _case(device, dtype, B, N, KVH, D, l, s, [0, 3])
    tiny = torch.tensor([fi.smallest_normal / 4, -fi.smallest_normal / 2, fi.smallest_normal,
                         0.0, -0.0, fi.smallest_normal * 3 / 4], dtype=torch.float64)
    idx = torch.arange(k.numel()) % tiny.numel()
    k = tiny[idx].view(k.shape).to(device=device, dtype=dtype)
    pos = torch.flip(tiny, [0])[torch.arange(pos.numel()) % tiny.numel()].view(pos.shape)
    pos = pos.to(device=device, dtype=dtype)
    got = _ops._compress_windows(k, st, pos, l, s)
    want = statement(k, st.long(), pos, l, s)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert (got != 0).any()  # some subnormal sums survive


@pytest.mark.parametrize("device", DEVICES)
def test_compress_windows_opcheck(device):
    k, st, pos = _case(device, torch.float32, 2, 37, 2, 16, 8, 4, [0, 5], 1)
    torch.library.opcheck(torch.ops.blossomrec.compress_windows.default, (k, st, pos, 8, 4))
    k, st, pos = _case(device, torch.bfloat16, 2, 3, 2, 16, 8, 4, [0, 1])
    torch.library.opcheck(torch.ops.blossomrec.compress_windows.default, (k, st, pos, 8, 4))


def test_compress_windows_compiles_fullgraph():
    k, st, pos = _case("cpu", torch.float32, 2, 37, 2, 16, 8, 4, [0, 5], 1)
    fn = torch.compile(lambda k, st, pos: _ops._compress_windows(k, st, pos, 8, 4),
                       fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(k, st, pos), statement(k, st.long(), pos, 8, 4))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda k, st, pos, l, s: (k[0], st, pos, l, s), ValueError, "rank 4"),
    (lambda k, st, pos, l, s: (k.int(), st, pos, l, s), TypeError, "float32"),
    (lambda k, st, pos, l, s: (k.transpose(2, 3), st, pos, l, s), ValueError, "contiguous last"),
    (lambda k, st, pos, l, s: (k, st.long(), pos, l, s), TypeError, "int32"),
    (lambda k, st, pos, l, s: (k, st[:1], pos, l, s), ValueError, r"shape \[B\]"),
    (lambda k, st, pos, l, s: (k, st[:, None], pos, l, s), ValueError, r"shape \[B\]"),
    (lambda k, st, pos, l, s: (k, st, pos[:, :-1], l, s), ValueError, "pos must have shape"),
    (lambda k, st, pos, l, s: (k, st, pos[:1], l, s), ValueError, "pos must have shape"),
    (lambda k, st, pos, l, s: (k, st, pos[..., :8], l, s), ValueError, "pos must have shape"),
    (lambda k, st, pos, l, s: (k, st, pos.double(), l, s), TypeError, "k's dtype"),
    (lambda k, st, pos, l, s: (k, st, pos[:, :3], 3, s), ValueError, "compress_stride <="),
    (lambda k, st, pos, l, s: (k, st, pos, l, 0), ValueError, "compress_stride <="),
    (lambda k, st, pos, l, s: (k, st, pos, l, -2), ValueError, "compress_stride <="),
    (lambda k, st, pos, l, s: (k, st, pos, l, 2.0), TypeError, "must be an int"),
    (lambda k, st, pos, l, s: (k, st.to("meta"), pos, l, s), ValueError, "device"),
    (lambda k, st, pos, l, s: (k, st, pos.to("meta"), l, s), ValueError, "device"),
])
def test_compress_windows_errors(bad, exc, match):
    k = torch.randn(2, 9, 2, 16)
    st = torch.zeros(2, dtype=torch.int32)
    pos = torch.randn(2, 8, 16)
    args = bad(k, st, pos, 8, 4)
    with pytest.raises(exc, match=match):
        _ops._compress_windows(*args)
    if match not in ("device", "must be an int"):  # the raw op refuses it too (its C++ check)
        with pytest.raises(exc, match=match):
            torch.ops.blossomrec.compress_windows(*args)


@pytest.mark.cuda
def test_compress_windows_device_mismatch_cuda():
    k, st, pos = _case("cuda", torch.float32, 2, 9, 2, 16, 8, 4, [0, 0])
    for args in ((k, st.cpu(), pos), (k, st, pos.cpu())):
        with pytest.raises(ValueError, match="device"):
            _ops._compress_windows(*args, 8, 4)
        with pytest.raises(ValueError, match="device"):
            torch.ops.blossomrec.compress_windows(*args, 8, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_module_compress_keys_ops_equals_reference(device, dtype):
    """BlossomAttention(backend="ops").compress_keys (the op, then the MLP) against the same module's
    PyTorch statement (backend="reference"): bitwise, left padding and clamped rows included."""
    torch.manual_seed(0)
    m = BlossomAttention(32, heads=4, kv_heads=2, dim_head=16, compress_block_size=8,
                         compress_stride=4, backend="ops").to(device)
    with torch.no_grad():
        m.compress_pos.normal_(std=0.5)
    if dtype == torch.float64:
        m = m.double()
    k, st, _ = _case(device, dtype, 3, 45, 2, 16, 8, 4, [0, 7, 44], extra_heads=2)
    # bfloat16 keys as under autocast (the module's forward), where the MLP runs in bfloat16
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        got = m.compress_keys(k, st)
        m.backend = "reference"
        want = m.compress_keys(k, st)
        m.backend = "ops"
        windows = _ops._compress_windows(k, st, m.compress_pos.to(dtype), 8, 4)
    assert torch.equal(windows, statement(k, st.long(), m.compress_pos.detach(), 8, 4))
    assert got.shape == (3, 45 // 4, 2, 16)
    assert torch.equal(got, want)
    # N < compress_stride: no windows, on both paths
    with torch.no_grad():
        assert m.compress_keys(k[:, :3], st).shape == (3, 0, 2, 16)
