"""BlossomAttention / DenseAttention (SPEC 4): the module against a reference module built from
reference.py, padding invariance, state_dict, autocast, torch.compile and which parameters train."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blossomrec_cuda
from blossomrec_cuda import BlossomAttention, DenseAttention, reference

DIM = 32
# small blocks so that N = 45 has several compression windows and selection blocks (m = b / s = 2)
SMALL = dict(compress_block_size=8, compress_stride=4, select_block=8, num_select=2,
             window=3)
CONFIGS = [
    pytest.param(dict(heads=4, kv_heads=2, dim_head=16, causal=True, **SMALL), id="causal-G2"),
    pytest.param(dict(heads=4, kv_heads=1, dim_head=16, causal=False, **SMALL), id="noncausal-G4"),
    pytest.param(dict(heads=2, kv_heads=2, dim_head=32, causal=True, power_block=2, **SMALL),
                 id="causal-G1-p2"),
    pytest.param(dict(heads=4, kv_heads=2, dim_head=16, causal=True), id="paper-defaults"),
]


def make_module(seed: int = 0, cls=BlossomAttention, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = cls(DIM, **kwargs)
    if isinstance(module, BlossomAttention):
        # the compressor starts at PyTorch's init and its position table at 0; perturb the table so
        # that a wrong slot order in the batched compression would change the selection
        with torch.no_grad():
            module.compress_pos.normal_(std=0.5)
    return module


def left_pad(x: Tensor, lengths: Tensor) -> Tensor:
    """Move the first ``lengths[b]`` rows of each right-padded ``x[b]`` to the end."""
    out = torch.zeros_like(x)
    N = x.shape[1]
    for b, L in enumerate(lengths.tolist()):
        if L:
            out[b, N - L:] = x[b, :L]
    return out


def reference_module(m: BlossomAttention, x: Tensor, starts: list[int], lens: list[int]) -> Tensor:
    """SPEC 4 one sequence at a time with reference.py: projection, RoPE at 0..L-1,
    reference.compress_keys, the gate, reference.blossom_attention_seq, the output projection."""
    B, N, _ = x.shape
    H, KVH, D = m.heads, m.kv_heads, m.dim_head
    out = torch.zeros(B, N, DIM, dtype=x.dtype)
    for b, (st, L) in enumerate(zip(starts, lens)):
        if L == 0:
            continue
        xs = x[b, st:st + L]
        qkv = (xs @ m.to_qkv.weight.t()).view(L, H + 2 * KVH, D)
        q, k, v = qkv[:, :H], qkv[:, H:H + KVH], qkv[:, H + KVH:]
        pos = torch.arange(L)
        q = reference.apply_rope(q, pos, m.rope_theta)
        k = reference.apply_rope(k, pos, m.rope_theta)
        kc = reference.compress_keys(k, m.compress_pos, m.compress_mlp, m.compress_block_size,
                                     m.compress_stride)
        gates = torch.sigmoid(xs @ m.to_gates.weight.t() + m.to_gates.bias).view(L, H, 2)
        r = reference.blossom_attention_seq(
            q, k, v, kc, gates, compress_stride=m.compress_stride, select_block=m.select_block,
            num_select=m.num_select, window=m.window, power_block=m.power_block,
            use_power=m.use_power, use_sink=m.use_sink, causal=m.causal)
        out = out.index_put((torch.full((L,), b), torch.arange(st, st + L)),
                            r.out.reshape(L, H * D) @ m.to_out.weight.t())
    return out


def trainable_grads(m: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("padding", ["right", "left", "mask-left"])
def test_module_matches_reference_module(cfg, padding):
    m = make_module(**cfg)
    N = 70 if "compress_block_size" not in cfg else 45
    lengths = torch.tensor([N, N - 13, 5, 0])
    torch.manual_seed(1)
    x = torch.randn(4, N, DIM)
    if padding == "right":
        starts = [0] * 4
        out = m(x, lengths=lengths)
    else:
        x = left_pad(x, lengths)
        starts = (N - lengths).tolist()
        if padding == "left":
            out = m(x, lengths=lengths, padding_side="left")
        else:
            mask = torch.arange(N)[None, :] >= (N - lengths)[:, None]
            out = m(x, attention_mask=mask)
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    got_grads = trainable_grads(m)
    m.zero_grad(set_to_none=True)

    ref = reference_module(m, x, starts, lengths.tolist())
    (ref * dout).sum().backward()
    want_grads = trainable_grads(m)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert set(got_grads) == set(want_grads) == {"to_qkv.weight", "to_out.weight",
                                                 "to_gates.weight", "to_gates.bias"}
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-3,
                                   msg=lambda msg: f"{name}: {msg}")


def test_reference_backend_matches_ops_backend():
    m_ops = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    m_ref = BlossomAttention(DIM, 4, 2, 16, **SMALL, backend="reference")
    m_ref.load_state_dict(m_ops.state_dict())
    x = torch.randn(3, 37, DIM)
    lengths = torch.tensor([37, 20, 1])
    torch.testing.assert_close(m_ops(x, lengths=lengths), m_ref(x, lengths=lengths), atol=2e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("cls", [BlossomAttention, DenseAttention])
def test_padding_invariance(cls):
    """A sequence gives the same output alone, right-padded, left-padded, in a mask, next to other
    sequences of any length; padding rows are exactly 0 and gradients stay finite."""
    kwargs = dict(heads=4, kv_heads=2, dim_head=16)
    if cls is BlossomAttention:
        kwargs.update(SMALL)
    m = make_module(cls=cls, **kwargs)
    torch.manual_seed(2)
    seqs = [torch.randn(L, DIM) for L in (33, 12, 0, 40)]
    alone = [m(s[None]) [0] if len(s) else s for s in seqs]
    for N in (40, 53):
        lengths = torch.tensor([len(s) for s in seqs])
        right = torch.zeros(len(seqs), N, DIM)
        for b, s in enumerate(seqs):
            right[b, : len(s)] = s
        left = left_pad(right, lengths)
        x = right.clone().requires_grad_()
        out_right = m(x, lengths=lengths)
        out_left = m(left, lengths=lengths, padding_side="left")
        out_mask = m(left, attention_mask=torch.arange(N)[None, :] >= (N - lengths)[:, None])
        for b, s in enumerate(seqs):
            L = len(s)
            torch.testing.assert_close(out_right[b, :L], alone[b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out_left[b, N - L:], alone[b], atol=1e-5, rtol=1e-5)
            assert torch.equal(out_right[b, L:], torch.zeros_like(out_right[b, L:]))
            assert torch.equal(out_left[b, : N - L], torch.zeros_like(out_left[b, : N - L]))
        torch.testing.assert_close(out_mask, out_left)
        out_right.square().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        m.zero_grad(set_to_none=True)


def test_mask_errors_say_how_to_fix():
    m = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    x = torch.randn(2, 10, DIM)
    holes = torch.ones(2, 10, dtype=torch.bool)
    holes[1, 4] = False
    with pytest.raises(ValueError, match="row 1 has holes"):
        m(x, attention_mask=holes)
    with pytest.raises(TypeError, match="bool"):
        m(x, attention_mask=holes.long())
    with pytest.raises(ValueError, match="either attention_mask or lengths"):
        m(x, attention_mask=holes, lengths=torch.tensor([10, 10]))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        m(x, attention_mask=holes[:, :5])
    with pytest.raises(ValueError, match="padding_side"):
        m(x, lengths=torch.tensor([3, 4]), padding_side="middle")
    with pytest.raises(ValueError, match="multiple of compress_stride"):
        BlossomAttention(DIM, 4, 2, 16, compress_stride=16, select_block=24)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        BlossomAttention(DIM, 4, 3, 16)


def test_gate_init_and_which_parameters_train():
    """SPEC 3 gate init; gradients reach qkv, gates and output projection; the compressor (which by
    SPEC 1b only feeds the discrete selection) gets none."""
    m = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    assert torch.equal(m.to_gates.weight, torch.zeros_like(m.to_gates.weight))
    assert m.to_gates.bias.tolist() == [-2.0, 2.0] * 4
    x = torch.randn(2, 45, DIM)
    gates = torch.sigmoid(m.to_gates(x)).view(2, 45, 4, 2)
    torch.testing.assert_close(gates[..., 0], torch.full((2, 45, 4), 0.1192), atol=1e-4, rtol=0)
    m(x, lengths=torch.tensor([45, 30])).square().sum().backward()
    no_grad = {id(p) for p in m.no_grad_parameters()}
    assert len(no_grad) == 5  # position table + two Linear layers' weights and biases
    for name, p in m.named_parameters():
        if id(p) in no_grad:
            assert p.grad is None, f"{name} should get no gradient (discrete selection)"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def _fwd_bwd(m: BlossomAttention, x: Tensor, lengths: Tensor, dout: Tensor, autocast=None):
    """Output, x's gradient and the trainable parameters' gradients of one fwd+bwd."""
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = m(x, lengths=lengths)
    (out.float() * dout).sum().backward()
    return out.detach(), x.grad, trainable_grads(m)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_gemms_per_call(autocast):
    """The eager module's GEMMs per fwd+bwd (it is host-bound at short sequences, each GEMM a
    cuBLAS launch): forward one each for qkv, the gates and the output projection and two for the
    compressor's MLP; backward two (x's gradient and the weight's) for each of the three layers
    that train (the compressor runs without grad)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountGemms(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    m = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    x = torch.randn(2, 45, DIM, requires_grad=True)
    with CountGemms() as fwd:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = m(x, lengths=torch.tensor([45, 20]))
    with CountGemms() as bwd:
        out.float().sum().backward()
    assert (fwd.n, bwd.n) == (5, 6)


def test_state_dict_round_trip():
    m = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = BlossomAttention(DIM, 4, 2, 16, **SMALL)
    x = torch.randn(2, 45, DIM)
    lengths = torch.tensor([45, 17])
    assert not torch.allclose(fresh(x, lengths=lengths), m(x, lengths=lengths))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x, lengths=lengths), m(x, lengths=lengths))
    assert set(m.state_dict()) == {
        "to_qkv.weight", "to_out.weight", "compress_pos", "compress_mlp.0.weight",
        "compress_mlp.0.bias", "compress_mlp.2.weight", "compress_mlp.2.bias", "to_gates.weight",
        "to_gates.bias"}
    # the dense baseline shares the projections under the same names
    dense = DenseAttention(DIM, 4, 2, 16)
    missing, unexpected = dense.load_state_dict(m.state_dict(), strict=False)
    assert not missing and set(unexpected) == set(m.state_dict()) - set(dense.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [BlossomAttention, DenseAttention])
def test_autocast(cls, dtype):
    """Under autocast the module runs the op in the low precision and stays within the error that
    the same low precision causes in the reference module (FlashAttention's criterion)."""
    kwargs = dict(heads=4, kv_heads=2, dim_head=16, **(SMALL if cls is BlossomAttention else {}))
    m = make_module(cls=cls, **kwargs)
    x = torch.randn(3, 45, DIM)
    lengths = torch.tensor([45, 30, 2])
    ref = m(x, lengths=lengths)
    with torch.autocast("cpu", dtype=dtype):
        out = m(x, lengths=lengths)
    assert out.dtype == dtype
    # the low-precision error of the inputs alone: round x and the weights, compute in float32
    low = make_module(cls=cls, **kwargs)
    low.load_state_dict({k: v.to(dtype).float() for k, v in m.state_dict().items()})
    ref_low = low(x.to(dtype).float(), lengths=lengths)
    err, base = (out.float() - ref).abs().max(), (ref_low - ref).abs().max()
    assert err <= 4 * base + 1e-2, f"autocast error {err} vs input-rounding error {base}"
    out.float().square().sum().backward()
    assert m.to_qkv.weight.grad is not None and torch.isfinite(m.to_qkv.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_compressor_cache(dtype, monkeypatch):
    """Under autocast the compressor's parameters are cast once and kept (eager): the compressed
    keys equal autocast's own per-call casts bitwise, and a change to a parameter (in place, by
    reassignment, or by load_state_dict) is seen at the next call."""
    m = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    x = torch.randn(3, 45, DIM)
    k = torch.randn(3, 45, 2, 16).to(dtype)
    seq_start = torch.tensor([0, 0, 5])

    def keys(module, plain):
        if plain:  # autocast's casts per call (the path without the cache)
            monkeypatch.setattr(module, "_compressor_cast", lambda k_: None)
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            out = module.compress_keys(k, seq_start)
        if plain:
            monkeypatch.delattr(module, "_compressor_cast")
        return out

    def check(step):
        a, b = keys(m, plain=False), keys(m, plain=True)
        assert a.dtype == dtype and torch.equal(a, b), f"cached compressor differs ({step})"
        return a

    first = check("first call")
    assert torch.equal(check("second call"), first)
    assert m.__dict__["_compressor_cache"][1][1].dtype == dtype
    with torch.no_grad():
        m.compress_mlp[0].weight.mul_(1.5)  # in place: a new version
    assert not torch.equal(check("in-place change"), first)
    m.compress_mlp[2].bias = nn.Parameter(torch.randn_like(m.compress_mlp[2].bias))
    check("reassigned parameter")
    other = make_module(seed=3, **SMALL, heads=4, kv_heads=2, dim_head=16)
    m.load_state_dict(other.state_dict())
    assert torch.equal(check("load_state_dict"), keys(other, plain=True))
    # not under autocast, nor while tracing: the plain path
    assert m._compressor_cast(k) is None
    with torch.autocast("cpu", dtype=dtype):
        y = m(x, lengths=torch.tensor([45, 30, 2]))
    assert y.dtype == dtype and "_compressor_cache" not in m.state_dict()


def _left_padded_case() -> tuple[nn.Module, Tensor, Tensor]:
    """A small module and a left-padded batch (lengths 45, 20, 0) with its bool mask."""
    m = make_module(**SMALL, heads=4, kv_heads=2, dim_head=16)
    N = 45
    lengths = torch.tensor([45, 20, 0])
    x = left_pad(torch.randn(3, N, DIM), lengths)
    mask = torch.arange(N)[None, :] >= (N - lengths)[:, None]
    return m, x, mask


def test_torch_compile_fullgraph():
    m, x, mask = _left_padded_case()
    eager = m(x, attention_mask=mask)
    eager.square().sum().backward()
    want = trainable_grads(m)
    m.zero_grad(set_to_none=True)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x, attention_mask=mask)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    got = trainable_grads(m)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)


def test_dense_attention_matches_naive_causal_attention():
    m = make_module(cls=DenseAttention, heads=4, kv_heads=2, dim_head=16)
    x = torch.randn(2, 9, DIM)
    lengths = torch.tensor([9, 6])
    out = m(x, lengths=lengths)
    for b, L in enumerate(lengths.tolist()):
        xs = x[b, :L]
        qkv = (xs @ m.to_qkv.weight.t()).view(L, 8, 16)
        pos = torch.arange(L)
        q = reference.apply_rope(qkv[:, :4], pos)
        k = reference.apply_rope(qkv[:, 4:6], pos).repeat_interleave(2, dim=1)
        v = qkv[:, 6:].repeat_interleave(2, dim=1)
        logits = torch.einsum("ihd,jhd->hij", q, k) / 4.0
        logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        o = torch.einsum("hij,jhd->ihd", F.softmax(logits, dim=-1), v).reshape(L, 64)
        torch.testing.assert_close(out[b, :L], o @ m.to_out.weight.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    m, x, mask = _left_padded_case()
    cpu = m(x, attention_mask=mask)
    gpu = m.cuda()(x.cuda(), attention_mask=mask.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = torch.compile(m, fullgraph=True)(x.cuda(), attention_mask=mask.cuda())
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float().cpu(), cpu, atol=5e-2, rtol=5e-2)


def _module_on_device_vs_reference(device: str, cfg: dict, padding: str):
    """The module on ``device`` (the rope op, the compressor-window op, the attention op, every
    parameter's gradient) against the unfused reference math of :func:`reference_module` on the CPU
    in float32; returns (out, reference, grads, reference grads)."""
    m = make_module(**cfg)
    N = 45
    lengths = torch.tensor([N, N - 13, 5, 0])
    torch.manual_seed(1)
    x = torch.randn(4, N, DIM)
    dout = torch.randn(4, N, DIM)
    starts = [0] * 4
    if padding == "left":
        x = left_pad(x, lengths)
        starts = (N - lengths).tolist()
    m_dev = copy.deepcopy(m).to(device)
    out = m_dev(x.to(device), lengths=lengths, padding_side=padding)
    (out * dout.to(device)).sum().backward()
    got = {n: g.cpu() for n, g in trainable_grads(m_dev).items()}
    ref = reference_module(m, x, starts, lengths.tolist())
    (ref * dout).sum().backward()
    return out.cpu(), ref, got, trainable_grads(m)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", CONFIGS[:2])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_cuda_module_matches_reference_module(cfg, padding):
    """Issue 14's check on CUDA: the fused RoPE and compressor windows plus the ops equal the
    unfused PyTorch math, forward and every trainable parameter's gradient, in float32 (in bfloat16
    a selection near a tie may flip against the float32 reference: the op-level tests check the
    16-bit kernels against the float64 reference with the selection given)."""
    out, ref, got, want = _module_on_device_vs_reference("cuda", cfg, padding)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    assert set(got) == set(want) == {"to_qkv.weight", "to_out.weight", "to_gates.weight",
                                     "to_gates.bias"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-3, rtol=1e-2,
                                   msg=lambda msg: f"{name}: {msg}")


def _dense_reference(m: DenseAttention, x: Tensor, valid: Tensor) -> Tensor:
    """Dense attention of each sequence's valid tokens alone, with explicit masks (float64 when x
    is): what DenseAttention must equal for any padding."""
    B, N, _ = x.shape
    H, KVH, D = m.heads, m.kv_heads, m.dim_head
    G = H // KVH
    rows = []
    for b in range(B):
        idx = valid[b].nonzero().flatten()
        L = len(idx)
        out_b = x.new_zeros(N, H * D)
        if L > 0:
            qkv = (x[b, idx] @ m.to_qkv.weight.t()).view(L, H + 2 * KVH, D)
            pos = torch.arange(L)
            q = reference.apply_rope(qkv[:, :H], pos)
            k = reference.apply_rope(qkv[:, H:H + KVH], pos).repeat_interleave(G, dim=1)
            v = qkv[:, H + KVH:].repeat_interleave(G, dim=1)
            logits = torch.einsum("ihd,jhd->hij", q, k) * D ** -0.5
            if m.causal:
                logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            o = torch.einsum("hij,jhd->ihd", F.softmax(logits, dim=-1), v).reshape(L, H * D)
            out_b = out_b.index_put((idx,), o)
        rows.append(out_b)
    return torch.stack(rows) @ m.to_out.weight.t()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (8, 1)])
@pytest.mark.parametrize("layout", ["right", "left", "mask"])
def test_dense_attention_matches_reference_for_every_padding(layout, heads, kv_heads, causal):
    """DenseAttention (SDPA with is_causal / a key mask and enable_gqa, no N x N mask) equals dense
    attention over each sequence's valid tokens alone, in float64, forward and every parameter
    gradient, for right padding, left padding and a valid run in the middle of the row (empty rows
    included); padding rows are exactly 0."""
    torch.manual_seed(3)
    m = DenseAttention(DIM, heads, kv_heads, 16, causal=causal).double()
    N = 11
    x = torch.randn(4, N, DIM, dtype=torch.float64)
    lens = torch.tensor([11, 5, 0, 1])
    j = torch.arange(N)[None, :]
    if layout == "right":
        valid = j < lens[:, None]
        kwargs = dict(lengths=lens)
    elif layout == "left":
        valid = j >= (N - lens)[:, None]
        kwargs = dict(lengths=lens, padding_side="left")
    else:
        start = torch.tensor([0, 3, 5, 7])
        valid = (j >= start[:, None]) & (j < (start + lens)[:, None])
        kwargs = dict(attention_mask=valid)
    out = m(x, **kwargs)
    want = _dense_reference(m, x, valid)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    dout = torch.randn_like(out)
    params = [m.to_qkv.weight, m.to_out.weight]
    got = torch.autograd.grad(out, params, dout)
    ref = torch.autograd.grad(want, params, dout)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_module_takes_the_op_hyper_parameter_names():
    """BlossomAttention's hyper-parameters carry the op functions' names; the recommender's builder
    still takes the names before 0.2.0 with a DeprecationWarning, and refuses unknown or doubled
    names."""
    from blossomrec_cuda.attention import SPARSE_NAMES, normalize_sparse_names
    from blossomrec_cuda.rec.model import build_model

    m = BlossomAttention(DIM, 4, 2, 16, compress_block_size=8, compress_stride=4, select_block=8,
                         num_select=3, window=5, power_block=2)
    assert (m.compress_stride, m.select_block, m.num_select, m.window, m.power_block) == (4, 8, 3, 5, 2)
    import inspect
    ops_names = set(inspect.signature(blossomrec_cuda.blossom_attention).parameters)
    assert set(SPARSE_NAMES) - {"compress_block_size"} <= ops_names
    with pytest.warns(DeprecationWarning) as record:
        model = build_model(10, sparse_kwargs=dict(stride=4, compress_block_size=8,
                                                    selection_block_size=8))
    messages = {str(w.message) for w in record}
    assert any("'stride' is now 'compress_stride'" in m_ for m_ in messages), messages
    assert any("'selection_block_size' is now 'select_block'" in m_ for m_ in messages), messages
    attn = model.blocks[0].attention
    assert (attn.compress_stride, attn.select_block) == (4, 8)
    with pytest.raises(ValueError, match="unknown BlossomAttention hyper-parameter 'strides'"):
        normalize_sparse_names(dict(strides=4))
    with pytest.raises(ValueError, match="given twice"):
        with pytest.warns(DeprecationWarning):
            normalize_sparse_names(dict(stride=4, compress_stride=4))
