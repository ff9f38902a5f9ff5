"""Bad inputs fail with a short message of the documented type, through the public wrappers, the
raw torch.ops (CPU kernels, and the fake kernels that meta inputs reach) and the modules.

The convention (docs/ERRORS.md): TypeError for a type (a tensor's dtype, an argument that is not an
int or a list), ValueError for everything else (ranks, shapes, strides, devices including meta,
values, ranges, packed offsets); the wrappers raise theirs before calling an op, the ops raise the
same types from csrc/common/checks.h. Every message names the argument and stays under
MAX_MESSAGE characters, however large the input. Each case changes one thing of a valid call, and
the valid calls themselves are tested first, so an error can only come from that change.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

import pytest
import torch

import blossomrec_cuda as br

MAX_MESSAGE = 500  # characters; the longest message of a bad input of any size


def assert_short(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert len(msg) < MAX_MESSAGE, f"a {len(msg)}-character message: {msg[:200]}..."
    return msg


B, N, H, KVH, D = 2, 17, 4, 2, 16
S, BLK = 4, 8  # compress_stride, select_block
LENGTHS = [17, 9]
C = max(LENGTHS) // S  # compressed rows each sequence needs
OPS = ("select_blocks", "sparse_attention", "blossom_attention")


# --------------------------------------------------------------------------------------------------
# Valid inputs and calls
# --------------------------------------------------------------------------------------------------
def valid_inputs(device: str = "cpu") -> dict:
    """A valid padded batch for every wrapper, as one dict (each wrapper takes what it needs)."""
    n = 4
    return dict(
        q=torch.randn(B, N, H, D, device=device),
        k=torch.randn(B, N, KVH, D, device=device),
        v=torch.randn(B, N, KVH, D, device=device),
        kc=torch.randn(B, C, KVH, D, device=device),
        gates=torch.rand(B, N, H, 2, device=device),
        sel_idx=torch.full((B, N, KVH, n), -1, dtype=torch.int32, device=device),
        sel_cnt=torch.zeros(B, N, KVH, dtype=torch.int32, device=device),
        layout=dict(lengths=list(LENGTHS), padding_side="right"),
        compress_stride=S, select_block=BLK, num_select=n, window=8, power_block=1,
        use_power=True, use_sink=True, causal=True,
    )


def as_packed(x: dict, cu_seqlens: list[int]) -> dict:
    """The first cu_seqlens[-1] rows of sequence 0 as a packed [T, ...] batch (T = N rows)."""
    return dict(q=x["q"][0], k=x["k"][0], v=x["v"][0], gates=x["gates"][0],
                sel_idx=x["sel_idx"][0], sel_cnt=x["sel_cnt"][0],
                kc=x["kc"][:1].expand(len(cu_seqlens) - 1, -1, -1, -1),
                layout=dict(cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32)))


def call(op: str, x: dict):
    attn = dict(window=x["window"], power_block=x["power_block"], use_power=x["use_power"],
                use_sink=x["use_sink"])
    common = dict(select_block=x["select_block"], causal=x["causal"], scale=x.get("scale"),
                  **x["layout"])
    if op == "select_blocks":
        return br.select_blocks(x["q"], x["kc"], compress_stride=x["compress_stride"],
                                num_select=x["num_select"], **common)
    if op == "sparse_attention":
        return br.sparse_attention(x["q"], x["k"], x["v"], x["gates"], x["sel_idx"], x["sel_cnt"],
                                   **attn, **common)
    return br.blossom_attention(x["q"], x["k"], x["v"], x["kc"], x["gates"],
                                compress_stride=x["compress_stride"], num_select=x["num_select"],
                                **attn, **common)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("packed", [False, True])
def test_valid_inputs_pass(op, packed):
    x = valid_inputs()
    if packed:
        x.update(as_packed(x, [0, 9, 17]))
    out = call(op, x)
    if op == "select_blocks":
        idx, cnt = out
        assert idx.shape[:-2] == cnt.shape[:-1] == x["q"].shape[:-2]
    else:
        assert out.shape == x["q"].shape and not bool(out.isnan().any())


# --------------------------------------------------------------------------------------------------
# Through the public wrappers
# --------------------------------------------------------------------------------------------------
class Case(NamedTuple):
    name: str
    ops: tuple  # the wrappers this case applies to
    change: Callable[[dict], dict]  # valid inputs -> the entries to replace
    exc: type
    match: str


def _heads(h: int, kvh: int, d: int = D) -> Callable[[dict], dict]:
    """Inputs with h query heads, kvh kv heads and head dim d."""
    return lambda x: dict(q=torch.randn(B, N, h, d), k=torch.randn(B, N, kvh, d),
                          v=torch.randn(B, N, kvh, d), kc=torch.randn(B, C, kvh, d),
                          gates=torch.rand(B, N, h, 2),
                          sel_idx=torch.full((B, N, kvh, 4), -1, dtype=torch.int32),
                          sel_cnt=torch.zeros(B, N, kvh, dtype=torch.int32))


def _lengths(lengths, padding_side="right") -> Callable[[dict], dict]:
    return lambda x: dict(layout=dict(lengths=lengths, padding_side=padding_side))


ALL = OPS
ATTN = ("sparse_attention", "blossom_attention")
SEL = ("select_blocks", "blossom_attention")

def _packed(cu_seqlens, **change) -> Callable[[dict], dict]:
    """The packed batch of :func:`as_packed` with some of its entries changed (``change`` maps a
    name to a function of the packed entry)."""
    def apply(x):
        packed = as_packed(x, cu_seqlens)
        return {**packed, **{name: f(packed[name]) for name, f in change.items()}}
    return apply


def _on_meta(name: str) -> Callable[[dict], dict]:
    return lambda x: {name: x[name].to("meta")}


WRAPPER_CASES = [
    # dtypes and Python types: TypeError
    Case("int q", ALL, lambda x: dict(q=x["q"].to(torch.int32)), TypeError,
         r"q must be float32, float16, bfloat16 or float64, got int32"),
    Case("float64 k with float32 q", ATTN, lambda x: dict(k=x["k"].double()), TypeError,
         r"k must have q's dtype \(float32\), got float64"),
    Case("float16 v with float32 q", ATTN, lambda x: dict(v=x["v"].half()), TypeError,
         r"v must have q's dtype \(float32\), got float16"),
    Case("float64 kc with float32 q", SEL, lambda x: dict(kc=x["kc"].double()), TypeError,
         r"kc must have q's dtype \(float32\), got float64"),
    Case("int16 gates", ATTN, lambda x: dict(gates=x["gates"].to(torch.int16)), TypeError,
         r"gates must have q's dtype \(float32\) or float32, got int16"),
    Case("int64 sel_idx", ("sparse_attention",), lambda x: dict(sel_idx=x["sel_idx"].long()),
         TypeError, r"sel_idx must be int32, got int64"),
    Case("int64 sel_cnt", ("sparse_attention",), lambda x: dict(sel_cnt=x["sel_cnt"].long()),
         TypeError, r"sel_cnt must be int32, got int64"),
    Case("q as a list", ALL, lambda x: dict(q=x["q"].tolist()), TypeError,
         r"q must be a tensor, got list"),
    Case("k as a list", ATTN, lambda x: dict(k=x["k"].tolist()), TypeError,
         r"k must be a tensor, got list"),
    # ranks and shapes: ValueError
    Case("q of rank 3 without cu_seqlens", ALL, lambda x: dict(q=x["q"][0]), ValueError,
         r"the padded layout takes q as \[B, N, H, D\]; got rank 3"),
    Case("k of rank 3", ATTN, lambda x: dict(k=x["k"][0]), ValueError,
         r"k must have rank 4 \[B, N, KVH, D\], got rank 3"),
    Case("kc of rank 3", SEL, lambda x: dict(kc=x["kc"][0]), ValueError,
         r"kc must have rank 4 \[B, C, KVH, D\], got rank 3"),
    Case("gates of rank 3", ATTN, lambda x: dict(gates=x["gates"][..., 0]), ValueError,
         r"gates must have rank 4 \[B, N, H, 2\], got rank 3"),
    Case("sel_cnt of rank 4", ("sparse_attention",), lambda x: dict(sel_cnt=x["sel_idx"]),
         ValueError, r"sel_cnt must have rank 3 \[B, N, KVH\], got rank 4"),
    Case("head dim 24", ALL, _heads(H, KVH, 24), ValueError,
         r"head dim must be one of 16, 32, 64, 128, got 24"),
    Case("head dim 256", ALL, _heads(H, KVH, 256), ValueError,
         r"head dim must be one of 16, 32, 64, 128, got 256"),
    Case("3 heads over 2 kv heads", ALL, _heads(3, 2), ValueError,
         r"number of query heads \(3\) must be divisible by the number of kv heads \(2\)"),
    Case("group of 9 heads", ALL, _heads(18, 2), ValueError,
         r"group size H / KVH must be 1\.\.8, got 9"),
    Case("k batch differs from q", ATTN, lambda x: dict(k=torch.randn(B + 1, N, KVH, D)),
         ValueError, r"k must have shape \[2, 17, 2, 16\], got \[3, 17, 2, 16\]"),
    Case("v rows differ from q", ATTN, lambda x: dict(v=torch.randn(B, N - 1, KVH, D)),
         ValueError, r"v must have shape \[2, 17, 2, 16\], got \[2, 16, 2, 16\]"),
    Case("kc batch differs from q", SEL, lambda x: dict(kc=torch.randn(B + 1, C, KVH, D)),
         ValueError, r"kc's batch \(3\) must equal the number of sequences \(2\)"),
    Case("kc head dim differs from q", SEL, lambda x: dict(kc=torch.randn(B, C, KVH, 32)),
         ValueError, r"kc's head dim \(32\) must equal q's \(16\)"),
    # (select_block's selection would have kc's kv heads, the attention k's: an error that named
    # sel_idx, an argument blossom_attention does not take)
    Case("kc with other kv heads than k", ("blossom_attention",),
         lambda x: dict(kc=torch.randn(B, C, 1, D)), ValueError,
         r"kc must have k's 2 kv heads, got 1"),
    Case("gates with 3 entries per head", ATTN, lambda x: dict(gates=torch.rand(B, N, H, 3)),
         ValueError, r"gates must have shape \[2, 17, 4, 2\], got \[2, 17, 4, 3\]"),
    Case("gates for the wrong number of heads", ATTN,
         lambda x: dict(gates=torch.rand(B, N, H + 1, 2)), ValueError, r"gates must have shape"),
    Case("sel_idx for other kv heads", ("sparse_attention",),
         lambda x: dict(sel_idx=torch.full((B, N, KVH + 1, 4), -1, dtype=torch.int32)),
         ValueError, r"sel_idx must have shape \[B, N, KVH, n\] = \[2, 17, 2, n>=1\], "
                     r"got \[2, 17, 3, 4\]"),
    Case("sel_cnt for other rows", ("sparse_attention",),
         lambda x: dict(sel_cnt=x["sel_cnt"][:, :3]), ValueError,
         r"sel_cnt must have shape \[2, 17, 2\], got \[2, 3, 2\]"),
    Case("q with a strided last dim", ALL,
         lambda x: dict(q=torch.randn(B, N, H, 2 * D)[..., ::2]), ValueError,
         r"q must have a contiguous last dimension, got stride 2"),
    Case("sel_idx with a strided last dim", ("sparse_attention",),
         lambda x: dict(sel_idx=torch.full((B, N, KVH, 8), -1, dtype=torch.int32)[..., ::2]),
         ValueError, r"sel_idx must have a contiguous last dimension, got stride 2"),
    Case("kc too short for the lengths", SEL, lambda x: dict(kc=x["kc"][:, : C - 2]), ValueError,
         r"kc holds 2 compressed rows per sequence but the longest sequence needs "
         r"floor\(L / compress_stride\) = 4"),
    # the packed layout: shapes in its own terms ([T, ...], not the ops' [1, T, ...])
    Case("packed k of rank 4", ATTN, _packed([0, 9, 17], k=lambda k: k[None]), ValueError,
         r"k must have rank 3 \[T, KVH, D\], got rank 4"),
    Case("packed v with fewer rows", ATTN, _packed([0, 9, 17], v=lambda v: v[:16]), ValueError,
         r"v must have shape \[17, 2, 16\], got \[16, 2, 16\]"),
    Case("packed gates of rank 4", ATTN, _packed([0, 9, 17], gates=lambda g: g[None]), ValueError,
         r"gates must have rank 3 \[T, H, 2\], got rank 4"),
    Case("packed kc for three sequences", SEL,
         _packed([0, 9, 17], kc=lambda kc: kc[:1].expand(3, -1, -1, -1)), ValueError,
         r"kc's batch \(3\) must equal the number of sequences \(2\)"),
    # hyper-parameters: ValueError (a value), TypeError (not an int)
    Case("select_block not a multiple of compress_stride", SEL, lambda x: dict(select_block=6),
         ValueError, r"select_block \(6\) must be a positive multiple of compress_stride \(4\)"),
    Case("compress_stride 0", SEL, lambda x: dict(compress_stride=0), ValueError,
         r"compress_stride must be >= 1, got 0"),
    Case("num_select -1", SEL, lambda x: dict(num_select=-1), ValueError,
         r"num_select must be 0\.\.64, got -1"),
    Case("num_select 65", SEL, lambda x: dict(num_select=65), ValueError,
         r"num_select must be 0\.\.64, got 65"),
    Case("window 0", ATTN, lambda x: dict(window=0), ValueError, r"window must be >= 1, got 0"),
    Case("power_block 0", ATTN, lambda x: dict(power_block=0), ValueError,
         r"power_block must be >= 1, got 0"),
    Case("select_block 0", ("sparse_attention",), lambda x: dict(select_block=0), ValueError,
         r"select_block must be >= 1, got 0"),
    # integer hyper-parameters past int32 (the kernels' position arithmetic would overflow)
    Case("window past int32", ATTN, lambda x: dict(window=2**31), ValueError,
         r"window must be within int32 \(\|window\| <= 2147483647\), got 2147483648"),
    Case("window past int64", ATTN, lambda x: dict(window=2**64), ValueError,
         r"window must be within int32 .*got 18446744073709551616"),
    Case("select_block past int32", ALL, lambda x: dict(select_block=2**62), ValueError,
         r"select_block must be within int32"),
    Case("power_block past int32", ATTN, lambda x: dict(power_block=2**40), ValueError,
         r"power_block must be within int32"),
    Case("compress_stride past int32", SEL,
         lambda x: dict(compress_stride=2**40, select_block=2**40), ValueError,
         r"compress_stride must be within int32"),
    Case("float window", ATTN, lambda x: dict(window=2.5), TypeError,
         r"window must be an int, got float"),
    Case("bool window", ATTN, lambda x: dict(window=True), TypeError,
         r"window must be an int, got bool"),
    Case("num_select None", SEL, lambda x: dict(num_select=None), TypeError,
         r"num_select must be an int, got NoneType"),
    # switches: bools only (causal=None read as False: non-causal, future keys, no error)
    Case("causal None", ALL, lambda x: dict(causal=None), TypeError,
         r"causal must be a bool \(True or False\), got NoneType None"),
    Case("causal 'no'", ALL, lambda x: dict(causal="no"), TypeError,
         r"causal must be a bool \(True or False\), got str 'no'"),
    Case("use_power 1", ATTN, lambda x: dict(use_power=1), TypeError,
         r"use_power must be a bool \(True or False\), got int 1"),
    Case("use_sink None", ATTN, lambda x: dict(use_sink=None), TypeError,
         r"use_sink must be a bool"),
    # the softmax scale: a finite real number
    Case("scale a string", ALL, lambda x: dict(scale="x"), TypeError,
         r"scale must be a real number, got str"),
    Case("scale NaN", ALL, lambda x: dict(scale=float("nan")), ValueError,
         r"scale must be finite, got nan"),
    # padded lengths (ranges: ValueError)
    Case("a length above N", ALL, _lengths([18, 9]), ValueError,
         r"lengths must be <= the sequence dimension N = 17, got lengths\[0\] = 18$"),
    Case("a negative length", ALL, _lengths([9, -1]), ValueError,
         r"lengths must be >= 0, got lengths\[1\] = -1$"),
    Case("a length above N, left padded", ALL, _lengths([17, 18], "left"), ValueError,
         r"lengths must be <= the sequence dimension N = 17, got lengths\[1\] = 18$"),
    Case("three lengths for two sequences", ALL, _lengths([17, 9, 3]), ValueError,
         r"lengths has 3 entries for a batch of 2"),
    Case("lengths as a 2-D tensor", ALL, _lengths(torch.tensor([[17, 9]])), ValueError,
         r"lengths must be a 1-D integer tensor or list \[B\], got rank 2"),
    Case("float lengths", ALL, _lengths([17.0, 9.0]), TypeError,
         r"lengths must be a 1-D integer tensor or list, got torch.float32"),
    Case("padding_side 'middle'", ALL, _lengths([17, 9], "middle"), ValueError,
         r"padding_side must be 'right' or 'left', got 'middle'"),
    Case("lengths and cu_seqlens both", ALL,
         lambda x: dict(layout=dict(lengths=[17, 9], cu_seqlens=torch.tensor([0, 17, 26]))),
         ValueError, r"pass either lengths \(padded layout\) or cu_seqlens \(packed\), not both"),
    # values past int32 used to wrap (2**32 + 3 -> 3) in the cast to the ops' int32: no error
    Case("a length past int32", ALL, _lengths([2**32 + 3, 9]), ValueError,
         r"lengths must be <= the sequence dimension N = 17, got lengths\[0\] = 4294967299$"),
    Case("a length that wraps to -1 in int32", ALL, _lengths(torch.tensor([2**32 - 1, 9])),
         ValueError, r"got lengths\[0\] = 4294967295$"),
    Case("an empty lengths list", ALL, _lengths([]), ValueError,
         r"lengths has 0 entries for a batch of 2"),
    Case("lengths as a string", ALL, _lengths("17 9"), TypeError,
         r"lengths must be a 1-D integer tensor or list, got str"),
    Case("lengths on the meta device", ALL, _lengths(torch.tensor([17, 9], device="meta")),
         ValueError, r"lengths must hold values: it is on the meta device but q is on cpu"),
    # packed offsets (worded as offsets into q's T rows, not as lengths)
    Case("decreasing cu_seqlens", ALL, lambda x: as_packed(x, [0, 12, 5, 17]), ValueError,
         r"cu_seqlens must be non-decreasing \(offsets of the sequences in q's rows\), got "
         r"cu_seqlens\[2\] = 5 < cu_seqlens\[1\] = 12$"),
    Case("cu_seqlens starting below 0", ALL, lambda x: as_packed(x, [-2, 5, 17]), ValueError,
         r"cu_seqlens must start at 0, got cu_seqlens\[0\] = -2"),
    # lengths passed where cumulative lengths are expected: silently one sequence at rows 9..17
    Case("cu_seqlens starting above 0", ALL, lambda x: as_packed(x, [9, 17]), ValueError,
         r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 9 \(offsets \[0, L_0, L_0 \+ L_1"),
    Case("cu_seqlens past the packed rows", ALL, lambda x: as_packed(x, [0, 9, 18]), ValueError,
         r"cu_seqlens\[-1\] = 18 exceeds the T = 17 rows of q"),
    # (past int32: these wrapped to [0, 5, 9] in the cast to the ops' int32)
    Case("cu_seqlens past int32", ALL,
         lambda x: dict(as_packed(x, [0, 9, 17]),
                        layout=dict(cu_seqlens=torch.tensor([0, 2**32 + 5, 2**32 + 9]))),
         ValueError, r"cu_seqlens\[-1\] = 4294967305 exceeds the T = 17 rows of q"),
    Case("cu_seqlens as a string", ALL,
         lambda x: dict(as_packed(x, [0, 9, 17]), layout=dict(cu_seqlens="0 9 17")), TypeError,
         r"cu_seqlens must be a 1-D integer tensor or list, got str"),
    Case("float cu_seqlens", ALL,
         lambda x: dict(as_packed(x, [0, 9, 17]), layout=dict(cu_seqlens=torch.tensor([0., 17.]))),
         TypeError, r"cu_seqlens must be int32 or int64, got torch.float32"),
    Case("2-D cu_seqlens", ALL,
         lambda x: dict(as_packed(x, [0, 9, 17]), layout=dict(cu_seqlens=torch.tensor([[0, 17]]))),
         ValueError, r"cu_seqlens must be a 1-D tensor \[B \+ 1\] of cumulative lengths, got "
                     r"shape \[1, 2\]"),
    Case("empty cu_seqlens", ALL,
         lambda x: dict(as_packed(x, [0, 9, 17]), layout=dict(cu_seqlens=[])), ValueError,
         r"cu_seqlens must be a 1-D tensor \[B \+ 1\] .*got shape \[0\]"),
    Case("cu_seqlens on the meta device", ALL,
         lambda x: dict(as_packed(x, [0, 9, 17]),
                        layout=dict(cu_seqlens=torch.tensor([0, 9, 17], device="meta"))),
         ValueError, r"cu_seqlens must hold values: it is on the meta device but q is on cpu"),
    Case("packed q of rank 4", ALL,
         lambda x: dict(layout=dict(cu_seqlens=torch.tensor([0, 9, 17], dtype=torch.int32))),
         ValueError, r"the packed layout takes q as \[T, H, D\]; got rank 4"),
    # devices: every tensor on q's device; a meta one among CPU ones (which the dispatcher would
    # send to the fake kernels: empty outputs, no error) included
    *[Case(f"{name} on the meta device", ops, _on_meta(name), ValueError,
           rf"{name} must be on the same device as q \(cpu\), got meta")
      for name, ops in (("k", ATTN), ("v", ATTN), ("kc", SEL), ("gates", ATTN),
                        ("sel_idx", ("sparse_attention",)), ("sel_cnt", ("sparse_attention",)))],
    Case("q on the meta device", ALL, _on_meta("q"), ValueError,
         r"must be on the same device as q \(meta\), got cpu"),
]


class _Unreachable:
    """Stands in for torch.ops.blossomrec: a wrapper that reaches an op has not checked first."""

    def __getattr__(self, op):
        raise AssertionError(f"the wrapper called torch.ops.blossomrec.{op} with a bad input")


@pytest.mark.parametrize(
    "op, case", [pytest.param(op, c, id=f"{op}-{c.name}") for c in WRAPPER_CASES for op in c.ops])
def test_wrapper_rejects(op, case, monkeypatch):
    x = valid_inputs()
    x.update(case.change(x))
    monkeypatch.setattr(torch.ops, "blossomrec", _Unreachable())
    with pytest.raises(case.exc, match=case.match) as exc:
        call(op, x)
    assert_short(exc)


def test_the_unreachable_op_is_reached_by_a_valid_call(monkeypatch):
    """(so test_wrapper_rejects shows that its errors come before the op)"""
    monkeypatch.setattr(torch.ops, "blossomrec", _Unreachable())
    with pytest.raises(AssertionError, match="the wrapper called torch.ops.blossomrec"):
        call("blossom_attention", valid_inputs())


def test_wrapper_accepts_cu_seqlens_as_a_list_and_an_empty_lengths_list():
    x = valid_inputs()
    packed = {**x, **as_packed(x, [0, 9, 17])}
    want = call("blossom_attention", packed)
    got = call("blossom_attention", {**packed, "layout": dict(cu_seqlens=[0, 9, 17])})
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    empty = dict(q=torch.randn(0, N, H, D), k=torch.randn(0, N, KVH, D),
                 v=torch.randn(0, N, KVH, D), kc=torch.randn(0, C, KVH, D),
                 gates=torch.rand(0, N, H, 2))
    out = call("blossom_attention", {**x, **empty, "layout": dict(lengths=[])})
    assert out.shape == (0, N, H, D)


def test_host_lengths_are_checked_on_the_host_then_moved():
    """Lengths and offsets given on the host are checked there, before they move to q's device: a
    meta q (no values to read on the device side) still gets the range check, and the bounds come
    back on q's device as the ops' int32."""
    q = torch.empty(B, N, H, D, device="meta")
    layout = br.seq_layout(q, lengths=[17, 9], padding_side="left")
    assert layout.seq_start.device.type == "meta" and layout.seq_len.dtype == torch.int32
    assert layout.max_len == 17
    with pytest.raises(ValueError, match="lengths must be <= the sequence dimension"):
        br.seq_layout(q, lengths=[18, 9])
    packed = torch.empty(17, H, D, device="meta")
    assert br.seq_layout(packed, cu_seqlens=[0, 9, 17]).max_len == 9
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        br.seq_layout(packed, cu_seqlens=[0, 9, 5])


@pytest.mark.parametrize("given", ["list", "int64", "int32", "int32-strided"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_bounds_from_any_lengths(given, padding_side):
    """The bounds of a padded batch, whatever form its lengths take (a list, int64 or int32, a
    strided view): contiguous, in the dtype asked for, equal to the lengths and to their start rows
    (0 for right padding, N - L for left)."""
    from blossomrec_cuda.attention import sequence_bounds

    want_len = torch.tensor([17, 0, 9])
    want_start = torch.zeros(3, dtype=torch.int64) if padding_side == "right" else N - want_len
    lengths = {"list": want_len.tolist(), "int64": want_len.clone(),
               "int32": want_len.to(torch.int32),
               "int32-strided": torch.stack([want_len, want_len], 1).to(torch.int32)[:, 0]}[given]
    q = torch.empty(3, N, H, D)
    layout = br.seq_layout(q, lengths=lengths, padding_side=padding_side)
    results = [(layout.seq_start, layout.seq_len, torch.int32),
               (*br.ops.padded_bounds(lengths, 3, N, padding_side, q.device)[:2], torch.int64),
               (*sequence_bounds(q, lengths=torch.as_tensor(lengths), padding_side=padding_side,
                                 dtype=torch.int32), torch.int32)]
    for start, length, dtype in results:
        assert start.dtype == length.dtype == dtype
        assert start.is_contiguous() and length.is_contiguous()
        assert start.tolist() == want_start.tolist() and length.tolist() == want_len.tolist()


# --------------------------------------------------------------------------------------------------
# Through torch.ops.blossomrec.* directly (the row-buffer layout, no Python checks in between)
# --------------------------------------------------------------------------------------------------
RAW_OPS = ("select_blocks", "sparse_attention_fwd", "sparse_attention_bwd")


def raw_inputs(device: str = "cpu") -> dict:
    x = valid_inputs(device)
    x.update(seq_start=torch.zeros(B, dtype=torch.int32, device=device),
             seq_len=torch.tensor(LENGTHS, dtype=torch.int32, device=device),
             use_sink=False, scale=D ** -0.5)
    # saved forward outputs for the backward; their values do not matter to the checks
    x.update(dout=torch.randn_like(x["q"]), o_sel=torch.randn_like(x["q"]),
             o_win=torch.randn_like(x["q"]),
             lse=torch.zeros(B, N, H, 2, dtype=torch.float32, device=device))
    return x


def call_raw(op: str, x: dict):
    seq = (x["seq_start"], x["seq_len"])
    attn = (x["select_block"], x["window"], x["power_block"], x["use_power"], x["use_sink"],
            x["causal"], x["scale"])
    if op == "select_blocks":
        return torch.ops.blossomrec.select_blocks(
            x["q"], x["kc"], *seq, x["compress_stride"], x["select_block"], x["num_select"],
            x["causal"], x["scale"])
    if op == "sparse_attention_fwd":
        return torch.ops.blossomrec.sparse_attention_fwd(
            x["q"], x["k"], x["v"], x["gates"], x["sel_idx"], x["sel_cnt"], *seq, *attn)
    return torch.ops.blossomrec.sparse_attention_bwd(
        x["dout"], x["q"], x["k"], x["v"], x["gates"], x["o_sel"], x["o_win"], x["lse"],
        x["sel_idx"], x["sel_cnt"], *seq, *attn)


def _packed_rows(seq_start, seq_len) -> Callable[[dict], dict]:
    """Every row tensor of sequence 0 as a [1, N, ...] packed row buffer with these sequences."""
    def change(x):
        rows = {name: x[name][:1] for name in ("q", "k", "v", "gates", "sel_idx", "sel_cnt",
                                              "dout", "o_sel", "o_win", "lse")}
        return dict(rows, seq_start=torch.tensor(seq_start, dtype=torch.int32),
                    seq_len=torch.tensor(seq_len, dtype=torch.int32))
    return change


RAW_ALL = RAW_OPS
RAW_ATTN = ("sparse_attention_fwd", "sparse_attention_bwd")
RAW_SEL = ("select_blocks",)

def _dt(cpp: str, py: str) -> str:
    """A dtype as the C++ checks (c10's name) or the fake kernels (torch's) print it."""
    return f"(?:{cpp}|{py})"


class RawCase(NamedTuple):
    name: str
    ops: tuple
    change: Callable[[dict], dict]
    exc: type
    match: str  # holds for the C++ checks (CPU) and for the fake kernels (meta)
    needs_values: bool = False  # a check of seq_start / seq_len values: none on the meta device


RAW_CASES = [
    # dtypes: TypeError
    RawCase("int q", RAW_ALL, lambda x: dict(q=x["q"].to(torch.int32)), TypeError,
            rf"q must be float32, float16, bfloat16 or float64, got {_dt('Int', 'int32')}"),
    RawCase("float64 v with float32 q", RAW_ATTN, lambda x: dict(v=x["v"].double()), TypeError,
            rf"v must have q's dtype \({_dt('Float', 'float32')}\), got "
            rf"{_dt('Double', 'float64')}"),
    RawCase("float64 kc with float32 q", RAW_SEL, lambda x: dict(kc=x["kc"].double()), TypeError,
            rf"kc must have q's dtype \({_dt('Float', 'float32')}\), got "
            rf"{_dt('Double', 'float64')}"),
    RawCase("int16 gates", RAW_ATTN, lambda x: dict(gates=x["gates"].to(torch.int16)), TypeError,
            rf"gates must have q's dtype \({_dt('Float', 'float32')}\) or float32, got "
            rf"{_dt('Short', 'int16')}"),
    RawCase("int64 seq_len", RAW_ALL, lambda x: dict(seq_len=x["seq_len"].long()), TypeError,
            rf"seq_len must be int32, got {_dt('Long', 'int64')}"),
    RawCase("int64 seq_start", RAW_ALL, lambda x: dict(seq_start=x["seq_start"].long()),
            TypeError, rf"seq_start must be int32, got {_dt('Long', 'int64')}"),
    RawCase("int64 sel_cnt", RAW_ATTN, lambda x: dict(sel_cnt=x["sel_cnt"].long()), TypeError,
            rf"sel_cnt must be int32, got {_dt('Long', 'int64')}"),
    RawCase("o_sel float64", ("sparse_attention_bwd",), lambda x: dict(o_sel=x["o_sel"].double()),
            TypeError, rf"o_sel must have q's dtype \({_dt('Float', 'float32')}\)"),
    RawCase("lse float64", ("sparse_attention_bwd",), lambda x: dict(lse=x["lse"].double()),
            TypeError, rf"lse must be float32, got {_dt('Double', 'float64')}"),
    # ranks and shapes: ValueError
    RawCase("q of rank 3", RAW_ALL, lambda x: dict(q=x["q"][0]), ValueError,
            r"q must have rank 4 \[Bq, N, H, D\], got rank 3"),
    RawCase("2-D seq_len", RAW_ALL, lambda x: dict(seq_len=x["seq_len"][None]), ValueError,
            r"seq_len must have rank 1 \[B\], got rank 2"),
    RawCase("head dim 24", RAW_ALL, _heads(H, KVH, 24), ValueError,
            r"head dim must be one of 16, 32, 64, 128, got 24"),
    RawCase("head dim 256", RAW_ALL, _heads(H, KVH, 256), ValueError,
            r"head dim must be one of 16, 32, 64, 128, got 256"),
    RawCase("4 heads over 3 kv heads", RAW_ALL, _heads(4, 3), ValueError,
            r"number of query heads \(4\) must be divisible by the number of kv heads \(3\)"),
    RawCase("group of 16 heads", RAW_ALL, _heads(16, 1), ValueError,
            r"group size H / KVH must be 1\.\.8, got 16"),
    RawCase("k batch differs from q", RAW_ATTN, lambda x: dict(k=torch.randn(1, N, KVH, D)),
            ValueError, r"k must have shape \[2, 17, 2, 16\], got \[1, 17, 2, 16\]"),
    RawCase("kc batch differs from seq_len", RAW_SEL, lambda x: dict(kc=x["kc"][:1]), ValueError,
            r"kc's batch \(1\) must equal the number of sequences \(2\)"),
    RawCase("gates wrong shape", RAW_ATTN, lambda x: dict(gates=torch.rand(B, N, H, 1)),
            ValueError, r"gates must have shape \[2, 17, 4, 2\], got \[2, 17, 4, 1\]"),
    RawCase("sel_cnt wrong shape", RAW_ATTN, lambda x: dict(sel_cnt=x["sel_cnt"][:, :3]),
            ValueError, r"sel_cnt must have shape \[2, 17, 2\], got \[2, 3, 2\]"),
    RawCase("sel_idx for other kv heads", RAW_ATTN,
            lambda x: dict(sel_idx=torch.full((B, N, KVH + 1, 4), -1, dtype=torch.int32)),
            ValueError, r"sel_idx must have shape \[Bq, N, KVH, n\] = \[2, 17, 2, n>=1\], "
                        r"got \[2, 17, 3, 4\]"),
    RawCase("dout wrong shape", ("sparse_attention_bwd",),
            lambda x: dict(dout=torch.randn(B, N, H, 2 * D)), ValueError,
            r"dout must have shape \[2, 17, 4, 16\], got \[2, 17, 4, 32\]"),
    RawCase("lse wrong shape", ("sparse_attention_bwd",), lambda x: dict(lse=x["lse"][..., :1]),
            ValueError, r"lse must have shape \[2, 17, 4, 2\], got \[2, 17, 4, 1\]"),
    RawCase("seq_start and seq_len of different sizes", RAW_ALL,
            lambda x: dict(seq_start=torch.zeros(3, dtype=torch.int32)), ValueError,
            r"seq_start and seq_len must have the same length, got 3 and 2"),
    RawCase("three sequences for a batch of two", RAW_ATTN,
            lambda x: dict(seq_start=torch.zeros(3, dtype=torch.int32),
                           seq_len=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
            r"q's batch \(2\) must equal the number of sequences \(3\) or be 1 for the packed "
            r"layout"),
    # the CUDA kernels read a selection as a contiguous list; the CPU ops refuse the same input
    RawCase("sel_idx with a strided last dim", RAW_ATTN,
            lambda x: dict(sel_idx=torch.full((B, N, KVH, 8), -1, dtype=torch.int32)[..., ::2]),
            ValueError, r"sel_idx must have a contiguous last dimension, got stride 2"),
    # hyper-parameters: ValueError
    RawCase("select_block not a multiple of compress_stride", RAW_SEL,
            lambda x: dict(select_block=10), ValueError,
            r"select_block \(10\) must be a positive multiple of compress_stride \(4\)"),
    RawCase("compress_stride 0", RAW_SEL, lambda x: dict(compress_stride=0), ValueError,
            r"compress_stride must be >= 1, got 0"),
    RawCase("num_select 65", RAW_SEL, lambda x: dict(num_select=65), ValueError,
            r"num_select must be 0\.\.64, got 65"),
    RawCase("window 0", RAW_ATTN, lambda x: dict(window=0), ValueError,
            r"window must be >= 1, got 0"),
    RawCase("select_block 0", RAW_ATTN, lambda x: dict(select_block=0), ValueError,
            r"select_block must be >= 1, got 0"),
    RawCase("use_sink with causal", RAW_ATTN, lambda x: dict(use_sink=True, causal=True),
            ValueError, r"use_sink applies to non-causal attention only"),
    # Hyper-parameters past int32: select_block = 2**62 made the CPU kernels' J * select_block
    # overflow (a hang, or every key of the sequence for J = 4); a window past 2**62 made the CUDA
    # STIS enumeration loop forever.
    RawCase("select_block past int32", RAW_ATTN, lambda x: dict(select_block=2**62), ValueError,
            r"select_block must be <= 2147483647 \(int32\), got 4611686018427387904"),
    RawCase("select_block past int32", RAW_SEL,
            lambda x: dict(compress_stride=4, select_block=2**62), ValueError,
            r"select_block must be <= 2147483647 \(int32\), got 4611686018427387904"),
    RawCase("compress_stride past int32", RAW_SEL,
            lambda x: dict(compress_stride=2**40, select_block=2**40), ValueError,
            r"compress_stride must be <= 2147483647 \(int32\), got 1099511627776"),
    RawCase("window past int32", RAW_ATTN, lambda x: dict(window=2**62 + 1), ValueError,
            r"window must be <= 2147483647 \(int32\), got 4611686018427387905"),
    RawCase("power_block past int32", RAW_ATTN, lambda x: dict(power_block=2**31), ValueError,
            r"power_block must be <= 2147483647 \(int32\), got 2147483648"),
    # values of seq_start / seq_len (ranges: ValueError; the first offending sequence is named)
    RawCase("a length above N", RAW_ALL,
            lambda x: dict(seq_len=torch.tensor([18, 9], dtype=torch.int32)), ValueError,
            r"sequence 0 \(start 0, length 18\) runs past the 17 rows of q", True),
    RawCase("start + length above N", RAW_ALL,
            lambda x: dict(seq_start=torch.tensor([0, 10], dtype=torch.int32)), ValueError,
            r"sequence 1 \(start 10, length 9\) runs past the 17 rows of q", True),
    RawCase("a negative length", RAW_ALL,
            lambda x: dict(seq_len=torch.tensor([17, -1], dtype=torch.int32)), ValueError,
            r"sequence 1 has a negative start \(0\) or length \(-1\)", True),
    RawCase("a negative start", RAW_ALL,
            lambda x: dict(seq_start=torch.tensor([-1, 0], dtype=torch.int32)), ValueError,
            r"sequence 0 has a negative start \(-1\) or length \(17\)", True),
    RawCase("overlapping packed sequences", RAW_ALL, _packed_rows([0, 5], [10, 5]), ValueError,
            r"packed sequences must be in order and must not overlap: sequence 1 starts at row 5 "
            r"before sequence 0 ends at row 10", True),
    RawCase("packed sequences out of order", RAW_ALL, _packed_rows([9, 0], [8, 9]), ValueError,
            r"packed sequences must be in order and must not overlap", True),
    RawCase("kc too short for the lengths", RAW_SEL, lambda x: dict(kc=x["kc"][:, :3]),
            ValueError, r"kc holds 3 compressed rows but sequence 0 \(length 17\) needs 4", True),
]


def test_raw_op_select_block_that_overflowed_the_block_offsets():
    """select_block = 2**62 and a selected block J = 4: J * select_block wrapped to 0 in the CPU
    kernels, so the block became every key of the sequence (J = 2 looped for ever). Refused now."""
    x = raw_inputs()
    x.update(sel_idx=torch.full((B, N, KVH, 4), 4, dtype=torch.int32),
             sel_cnt=torch.full((B, N, KVH), 4, dtype=torch.int32), select_block=2**62)
    for op in RAW_ATTN:
        with pytest.raises(ValueError, match=r"select_block must be <= 2147483647"):
            call_raw(op, x)


def _to_meta(x: dict) -> dict:
    """Every tensor of ``x`` as a meta tensor with the same strides (``.to`` would make a strided
    view contiguous)."""
    return {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            if isinstance(t, torch.Tensor) else t for name, t in x.items()}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", RAW_OPS)
def test_raw_valid_inputs_pass(op, device):
    x = raw_inputs()
    outs = call_raw(op, _to_meta(x) if device == "meta" else x)
    assert all(t.device.type == device for t in outs)
    if device == "cpu":
        assert all(not t.is_floating_point() or not bool(t.isnan().any()) for t in outs)


@pytest.mark.parametrize(
    "op, case", [pytest.param(op, c, id=f"{op}-{c.name}") for c in RAW_CASES for op in c.ops])
def test_raw_op_rejects(op, case):
    x = raw_inputs()
    x.update(case.change(x))
    with pytest.raises(case.exc, match=case.match) as exc:
        call_raw(op, x)
    assert_short(exc)


@pytest.mark.parametrize(
    "op, case", [pytest.param(op, c, id=f"{op}-{c.name}") for c in RAW_CASES for op in c.ops])
def test_raw_op_on_meta_rejects_what_the_cpu_op_rejects(op, case):
    """Meta inputs reach the fake kernels (ops.py), not checks.h: they raise the same errors,
    except for the values of seq_start / seq_len, which a meta tensor does not hold."""
    x = raw_inputs()
    x.update(case.change(x))
    x = _to_meta(x)
    if case.needs_values:
        assert all(t.device.type == "meta" for t in call_raw(op, x))
        return
    with pytest.raises(case.exc, match=case.match) as exc:
        call_raw(op, x)
    assert_short(exc)


RAW_TENSORS = {
    "select_blocks": ("q", "kc", "seq_start", "seq_len"),
    "sparse_attention_fwd": ("q", "k", "v", "gates", "sel_idx", "sel_cnt", "seq_start", "seq_len"),
    "sparse_attention_bwd": ("dout", "q", "k", "v", "gates", "o_sel", "o_win", "lse", "sel_idx",
                             "sel_cnt", "seq_start", "seq_len"),
}


@pytest.mark.parametrize("op, name", [(op, name) for op, names in RAW_TENSORS.items()
                                      for name in names if name != "q"])
def test_raw_op_rejects_one_input_on_the_meta_device(op, name):
    """One meta input among CPU ones sends the call to the fake kernel (the dispatcher prefers the
    meta kernel), which returned empty CPU tensors shaped like the outputs: no error at all."""
    x = raw_inputs()
    x[name] = x[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name} must be on the same device as q \(cpu\), "
                                         r"got meta$") as exc:
        call_raw(op, x)
    assert_short(exc)


@pytest.mark.parametrize("op", RAW_OPS)
def test_raw_op_rejects_q_on_the_meta_device(op):
    x = raw_inputs()
    x["q"] = x["q"].to("meta")
    with pytest.raises(ValueError, match=r"must be on the same device as q \(meta\), got cpu"):
        call_raw(op, x)


# --------------------------------------------------------------------------------------------------
# Messages stay short however large the input
# --------------------------------------------------------------------------------------------------
BIG = 5000


def test_wrapper_lists_a_few_offending_lengths_and_counts_the_rest():
    q = torch.empty(BIG, 4, H, D, device="meta")
    lengths = torch.full((BIG,), 3)
    lengths[::2] = 4 + torch.arange(0, BIG, 2)  # above N = 4 at the even indices from 2: 2499
    with pytest.raises(ValueError, match=r"^lengths must be <= the sequence dimension N = 4, got "
                                         r"lengths\[2\] = 6, lengths\[4\] = 8, "
                                         r"lengths\[6\] = 10, lengths\[8\] = 12 "
                                         r"\.\.\. and 2495 more$") as exc:
        br.seq_layout(q, lengths=lengths)
    assert_short(exc)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1, .* and 4996 more$") as exc:
        br.seq_layout(q, lengths=torch.full((BIG,), -1))
    assert_short(exc)


def test_wrapper_lists_a_few_decreasing_offsets_and_counts_the_rest():
    q = torch.empty(BIG, H, D, device="meta")
    cu = torch.arange(BIG + 1)
    cu[2::2] = 0  # every second offset drops back to 0
    with pytest.raises(ValueError, match=r"got cu_seqlens\[2\] = 0 < cu_seqlens\[1\] = 1, "
                                         r"cu_seqlens\[4\] = 0 < cu_seqlens\[3\] = 3, .* "
                                         r"\.\.\. and 2496 more$") as exc:
        br.seq_layout(q, cu_seqlens=cu)
    assert_short(exc)


def test_wrapper_quotes_a_long_argument_in_part():
    with pytest.raises(ValueError, match=r"padding_side must be 'right' or 'left', got 'xx") as exc:
        br.seq_layout(torch.empty(2, 4, H, D), lengths=[1, 2], padding_side="x" * 10_000)
    assert_short(exc)
    with pytest.raises(TypeError, match=r"lengths must be a 1-D integer tensor or list") as exc:
        br.seq_layout(torch.empty(2, 4, H, D), lengths=[[1] * 10_000, "x"])
    assert_short(exc)


def test_raw_op_names_the_first_bad_sequence_of_a_large_batch():
    q = torch.randn(BIG, 4, 2, D)
    kc = torch.randn(BIG, 1, 1, D)
    seq_len = torch.full((BIG,), 9, dtype=torch.int32)  # every sequence is too long
    with pytest.raises(ValueError, match=r"^sequence 0 \(start 0, length 9\) runs past the 4 rows "
                                         r"of q$") as exc:
        torch.ops.blossomrec.select_blocks(q, kc, torch.zeros_like(seq_len), seq_len, 4, 4, 1,
                                           True, 0.25)
    assert_short(exc)


# --------------------------------------------------------------------------------------------------
# The modules (BlossomAttention with both backends, DenseAttention)
# --------------------------------------------------------------------------------------------------
DIM, MN = 32, 20
MODULES = ("blossom-ops", "blossom-reference", "dense")


def make_module(kind: str) -> torch.nn.Module:
    if kind == "dense":
        return br.DenseAttention(DIM, 4, 2, 16)
    return br.BlossomAttention(DIM, 4, 2, 16, compress_block_size=8, compress_stride=4,
                               select_block=8, backend=kind.split("-")[1])


class ModuleCase(NamedTuple):
    name: str
    kwargs: Callable[[], dict]  # forward's keyword arguments besides x
    exc: type
    match: str


def _holes() -> torch.Tensor:
    mask = torch.ones(2, MN, dtype=torch.bool)
    mask[1, 4] = False
    return mask


MODULE_CASES = [
    # Lengths out of 0..N were clamped (CUDA kernels, the reference, the dense masks) or wrapped in
    # the int32 the ops take (2**32 + 3 -> 3): a result without an error. Left-padded ones failed
    # deep in torch.gather ("index -5 is out of bounds").
    ModuleCase("length above N", lambda: dict(lengths=torch.tensor([25, 5])), ValueError,
               r"lengths must be <= the sequence dimension N = 20, got lengths\[0\] = 25$"),
    ModuleCase("length above N, left padded",
               lambda: dict(lengths=torch.tensor([5, 25]), padding_side="left"), ValueError,
               r"lengths must be <= the sequence dimension N = 20, got lengths\[1\] = 25$"),
    ModuleCase("negative length", lambda: dict(lengths=torch.tensor([-3, 5])), ValueError,
               r"lengths must be >= 0, got lengths\[0\] = -3$"),
    ModuleCase("length past int32", lambda: dict(lengths=torch.tensor([2**32 + 3, 5])),
               ValueError, r"got lengths\[0\] = 4294967299$"),
    ModuleCase("lengths on the meta device",
               lambda: dict(lengths=torch.tensor([20, 5], device="meta")), ValueError,
               r"lengths must hold values: it is on the meta device but q is on cpu"),
    ModuleCase("padding_side without lengths", lambda: dict(padding_side="top"), ValueError,
               r"padding_side must be 'right' or 'left', got 'top'"),
    ModuleCase("mask with a hole", lambda: dict(attention_mask=_holes()), ValueError,
               r"attention_mask row 1 has holes: its valid tokens run from 0 to 19 but tokens 4 in "
               r"between are padding"),
    ModuleCase("mask and lengths", lambda: dict(attention_mask=_holes(),
                                                lengths=torch.tensor([20, 20])),
               ValueError, r"pass either attention_mask or lengths, not both"),
    ModuleCase("integer mask", lambda: dict(attention_mask=_holes().long()), TypeError,
               r"attention_mask must be a bool tensor .*convert it with `mask.bool\(\)`"),
    ModuleCase("lengths passed as the mask", lambda: dict(attention_mask=torch.tensor([20, 5])),
               TypeError, r"attention_mask must be a bool tensor .*pass them as lengths="),
    ModuleCase("mask of rank 3", lambda: dict(attention_mask=_holes()[..., None]), ValueError,
               r"attention_mask must be \[B, N\] = \[2, 20\], got \[2, 20, 1\]"),
]


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c.name)
def test_module_rejects(kind, case):
    m = make_module(kind)
    x = torch.randn(2, MN, DIM)
    with pytest.raises(case.exc, match=case.match) as exc:
        m(x, **case.kwargs())
    assert_short(exc)


@pytest.mark.parametrize("kind", ["blossom-ops", "dense"])
def test_module_mask_with_a_hole_in_a_long_row_has_a_short_message(kind):
    m = make_module(kind)
    mask = torch.ones(1, 4096, dtype=torch.bool)
    mask[0, 2000] = False
    with pytest.raises(ValueError, match=r"attention_mask row 0 has holes") as exc:
        m(torch.randn(1, 4096, DIM), attention_mask=mask)
    assert_short(exc)


@pytest.mark.parametrize("kind", MODULES)
def test_module_rejects_x_of_the_wrong_width_or_rank(kind):
    m = make_module(kind)
    with pytest.raises(ValueError, match=r"x must be \[B, N, dim\] with dim = 32, got shape "
                                         r"\[2, 20, 33\]"):
        m(torch.randn(2, MN, DIM + 1))
    with pytest.raises(ValueError, match=r"x must be \[B, N, dim\] with dim = 32, got shape "
                                         r"\[20, 32\]"):
        m(torch.randn(MN, DIM))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(compress_stride=2.5), TypeError, r"compress_stride must be an int, got float"),
    (dict(compress_block_size=32.5), TypeError, r"compress_block_size must be an int, got float"),
    (dict(causal=None), TypeError, r"causal must be a bool"),
    (dict(use_power="yes"), TypeError, r"use_power must be a bool"),
    (dict(rope_theta=0.0), ValueError, r"rope_theta \(RoPE's base\) must be > 0, got 0.0"),
    (dict(rope_theta=float("inf")), ValueError, r"rope_theta must be finite"),
])
def test_module_rejects_bad_hyper_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        br.BlossomAttention(DIM, 4, 2, 16, **kwargs)


@pytest.mark.parametrize("cls", ["BlossomAttention", "DenseAttention"])
def test_module_rejects_a_width_of_zero_and_x_of_another_dtype(cls):
    with pytest.raises(ValueError, match=r"dim must be >= 1, got 0"):
        getattr(br, cls)(0, 4, 2, 16)
    m = getattr(br, cls)(DIM, 4, 2, 16)
    for dtype in (torch.float64, torch.float16, torch.int64):
        x = torch.ones(2, MN, DIM, dtype=dtype)
        with pytest.raises(TypeError, match=r"x must have the module's dtype \(float32\), got "):
            m(x)
    with pytest.raises(TypeError, match=r"x must be a tensor, got list"):
        m([[0.0] * DIM])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both: accepted
        assert m(torch.randn(2, MN, DIM).bfloat16()).shape == (2, MN, DIM)


def test_rope_rejects_a_base_that_is_not_positive():
    x = torch.randn(2, 5, 3, 8)
    for theta in (0.0, -10.0):
        with pytest.raises(ValueError, match=r"theta \(RoPE's base\) must be > 0"):
            br.rope(x, theta=theta)
    with pytest.raises(ValueError, match=r"theta must be finite"):
        br.rope(x, theta=float("nan"))


@pytest.mark.parametrize("size", [0, -16])
def test_module_rejects_a_selection_block_that_is_not_positive(size):
    # (0 and -16 are multiples of the stride; the op refused them only at the first forward)
    with pytest.raises(ValueError, match=rf"select_block \({size}\) must be a positive "
                                         r"multiple of compress_stride \(16\)"):
        br.BlossomAttention(DIM, 4, 2, 16, select_block=size)


@pytest.mark.parametrize("heads,kv_heads,dim_head", [(8, 2, 4), (4, 2, 24), (16, 1, 16)])
def test_module_ops_backend_rejects_what_the_ops_cannot_run(heads, kv_heads, dim_head):
    # (the ops refused these only at the first forward, after a training command had loaded its data)
    with pytest.raises(ValueError, match=r"backend='ops' needs dim_head in \(16, 32, 64, 128\) and "
                                         r"heads / kv_heads <= 8"):
        br.BlossomAttention(DIM, heads, kv_heads, dim_head)
    # the reference backend computes any head dim and group size
    m = br.BlossomAttention(DIM, heads, kv_heads, dim_head, compress_block_size=8, compress_stride=4,
                            select_block=8, backend="reference")
    assert m(torch.randn(2, 20, DIM)).shape == (2, 20, DIM)


# --------------------------------------------------------------------------------------------------
# The recommender: model, data files, training configuration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("heads", dict(heads=0)),  # was ZeroDivisionError
    ("hidden", dict(hidden=0)),  # was ZeroDivisionError in RoPE
    ("kv_heads", dict(kv_heads=0)),
    ("layers", dict(layers=0)),  # was a model without attention, silently
    ("inner", dict(inner=0)),
])
def test_rec_model_rejects_empty_sizes(name, kwargs):
    from blossomrec_cuda.rec.model import BlossomRec
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got 0"):
        BlossomRec(20, **{**dict(hidden=32, heads=2, kv_heads=1, layers=1, inner=32), **kwargs})


def test_rec_data_files_with_bad_contents(tmp_path):
    from blossomrec_cuda.rec.data import load_dataset
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\xff\xfe 1 2\n")
    with pytest.raises(ValueError, match=r"binary.txt: not a text file"):
        load_dataset(str(binary))
    csv = tmp_path / "ratings.csv"
    csv.write_text("userId,movieId,rating,timestamp\n1,2,3.0,100\n1,3,4.0,soon\n")
    with pytest.raises(ValueError,
                       match=r"ratings.csv:3: timestamp must be an integer, got 'soon'"):
        load_dataset(str(csv))
    csv.write_text("userId,movieId,rating,timestamp\n1\n")
    with pytest.raises(ValueError, match=r"ratings.csv:2: a row needs userId and movieId"):
        load_dataset(str(csv))


def _config_error(tmp_path) -> list:
    (tmp_path / "file").write_text("")
    return [
        (dict(batch_size=0), r"batch_size must be >= 1, got 0"),  # was batch 1, silently
        (dict(batch_size=-5), r"batch_size must be >= 1, got -5"),
        (dict(eval_batch_size=0), r"eval_batch_size must be >= 1, got 0"),  # was range() error
        (dict(num_negatives=0), r"num_negatives must be >= 1, got 0"),  # was sampled recall 1.0
        (dict(num_negatives=-1), r"num_negatives must be >= 1, got -1"),
        (dict(max_users=-1), r"max_users must be >= 1 \(or left out for all users\), got -1"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
        # these failed with FileExistsError only after the first epoch (or the whole run)
        (dict(checkpoint_dir=str(tmp_path / "file")), r"exists and is not a directory"),
        (dict(out=str(tmp_path / "file" / "r.json")), r"file'? is not a directory"),
        (dict(out=str(tmp_path)), r"is a directory; give a file name"),
        (dict(max_len=-5), r"max_len must be >= 1, got -5"),
        (dict(epochs=0), r"epochs must be >= 1, got 0"),
        (dict(lr=-1.0), r"lr must be a finite number >= 0, got -1.0"),  # was torch's Adam error
        (dict(lr=float("nan")), r"lr must be a finite number >= 0, got nan"),
        (dict(resume=True), r"--resume needs --checkpoint-dir"),
        (dict(device="tpu"), r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ]


def test_rec_training_config_errors(tmp_path):
    from blossomrec_cuda.rec.train import TrainConfig, run
    base = TrainConfig(device="cpu", progress=False, epochs=1)
    for change, match in _config_error(tmp_path):
        with pytest.raises(ValueError, match=match):
            run(TrainConfig(**{**base.__dict__, **change}))


def test_rec_command_line_rejects_a_zero_batch(tmp_path, capsys):
    """On the command line the same check is an argparse error: exit status 2, one error: line."""
    from blossomrec_cuda.rec.train import main
    with pytest.raises(SystemExit) as exc:
        main(["--batch-size", "0", "--device", "cpu", "--no-progress"])
    assert exc.value.code == 2
    assert "error: batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_rec_command_line_bad_data_and_a_new_results_folder(tmp_path, capsys):
    """Errors found once the data is read (here a malformed file) are one error: line and exit
    status 2 too, not a traceback; --jsonl into a folder that does not exist yet creates it (the
    run used to train and then fail writing its result)."""
    from blossomrec_cuda.rec.train import main
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\n")
    assert main(["--data", str(bad), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "bad.inter" in err and "Traceback" not in err
    jsonl = tmp_path / "new" / "dir" / "runs.jsonl"
    assert main(["--max-users", "30", "--epochs", "1", "--max-len", "10", "--device", "cpu",
                 "--no-progress", "--jsonl", str(jsonl)]) == 0
    assert jsonl.is_file() and len(jsonl.read_text().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Devices (need a GPU and the CUDA kernels)
# --------------------------------------------------------------------------------------------------
needs_cuda_build = pytest.mark.skipif(not br.WITH_CUDA, reason="extension built without CUDA")


def _mixed_device_params() -> list:
    return [pytest.param(op, name, other, id=f"{op}-{name}-{other}")
            for op, names in RAW_TENSORS.items() for name in names if name != "q"
            for other in ("cpu", "meta")]


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("op, name, other", _mixed_device_params())
def test_raw_op_rejects_mixed_devices(op, name, other):
    """A CPU input reaches the CUDA kernel's checks.h, a meta one the fake kernel: one message."""
    x = raw_inputs("cuda")
    x[name] = x[name].to(other)
    with pytest.raises(ValueError, match=rf"^{name} must be on the same device as q \(cuda:0\), "
                                         rf"got {other}$") as exc:
        call_raw(op, x)
    assert_short(exc)


# Checks whose messages carry numbers (sizes, head dims, group sizes): on the H200 device's
# toolchain these crashed the process with a segfault in std::ostream's integer inserter until the
# messages were built by blossomrec::msg (csrc/common/message.h); on CUDA tensors the same checks.h
# runs first in every CUDA entry point, so the message is the CPU op's.
NUMBER_CASES = ("q of rank 3", "head dim 24", "head dim 256", "4 heads over 3 kv heads",
                "group of 16 heads", "k batch differs from q", "kc batch differs from seq_len",
                "gates wrong shape")


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize(
    "op, case", [pytest.param(op, c, id=f"{op}-{c.name}") for c in RAW_CASES
                 if c.name in NUMBER_CASES for op in c.ops])
def test_raw_op_on_cuda_raises_messages_with_numbers(op, case):
    x = raw_inputs()
    x.update(case.change(x))
    x = {name: t.to("cuda") if isinstance(t, torch.Tensor) else t for name, t in x.items()}
    with pytest.raises(case.exc, match=case.match) as exc:
        call_raw(op, x)
    assert_short(exc)


def test_number_cases_exist():
    """Every name of NUMBER_CASES is a RAW_CASES entry (a renamed case would drop out silently)."""
    assert set(NUMBER_CASES) <= {c.name for c in RAW_CASES}


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("op", RAW_OPS)
def test_raw_op_rejects_float64_on_cuda(op):
    """A CUDA-only check (csrc/cuda/*.cu): the CUDA kernels take float32, float16, bfloat16."""
    x = {name: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
         and name != "lse" else t for name, t in raw_inputs("cuda").items()}
    with pytest.raises(TypeError, match=r"float64 runs on CPU only") as exc:
        call_raw(op, x)
    assert_short(exc)


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("op", ATTN)
@pytest.mark.parametrize("other", ["cpu", "meta"])
def test_wrapper_rejects_k_on_another_device(op, other):
    x = valid_inputs("cuda")
    x["k"] = x["k"].to(other)
    with pytest.raises(ValueError, match=rf"k must be on the same device as q \(cuda:0\), "
                                         rf"got {other}"):
        call(op, x)
