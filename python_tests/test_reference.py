"""reference.py against a brute force written straight from docs/ALGORITHM.md.

The brute force below shares no code with reference.py: selection is plain Python over scalars
(means, visibility, the softmax with its -1000 entry, ranking with ties to the lower block, the
1e-10 threshold), and both key sets are full boolean masks built element by element from the
rules. Only dot products and the final masked softmax use torch, in float64, so that autograd gives
gradients to compare. Everything runs in float64 and must agree to ~1e-10.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from blossomrec_cuda import reference
from helpers import LAYOUTS, make_batch

TOL = dict(rtol=1e-10, atol=1e-10)
NULL_LOGIT = -1000.0  # SPEC 1b
MIN_PROB = 1e-10  # SPEC 1b


@dataclass(frozen=True)
class HP:
    """The op's hyper-parameters (SPEC notation in comments)."""

    compress_stride: int = 4  # s
    select_block: int = 4  # b
    num_select: int = 4  # n
    window: int = 8  # w
    power_block: int = 1  # p
    use_power: bool = True
    use_sink: bool = True
    causal: bool = True

    def kwargs(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------------
# The brute force, from docs/ALGORITHM.md
# --------------------------------------------------------------------------------------------------
def is_power_of_two_or_zero(d: int) -> bool:
    return d >= 0 and (d & (d - 1)) == 0


def stis_visible(i: int, j: int, L: int, hp: HP) -> bool:
    """SPEC 2, with d = i//p - j//p."""
    d = i // hp.power_block - j // hp.power_block
    if hp.causal:
        return d >= 0 and (d < hp.window or (hp.use_power and is_power_of_two_or_zero(d)))
    if abs(d) < hp.window:
        return True
    if hp.use_power and d > 0 and is_power_of_two_or_zero(d):
        return True
    return hp.use_sink and j == L - 1


def block_is_candidate(J: int, i: int, hp: HP) -> bool:
    """SPEC 1b visibility (J already < the number of blocks)."""
    b = hp.select_block
    if hp.causal:
        return (J + 1) * b <= i
    return J != i // b


def in_selected_key_set(i: int, j: int, L: int, chosen: list[int], hp: HP) -> bool:
    """SPEC 1c: own block of i, or inside one of the chosen blocks."""
    b = hp.select_block
    own_lo = (i // b) * b
    own_hi = i if hp.causal else min(own_lo + b, L) - 1
    if own_lo <= j <= own_hi:
        return True
    return any(J * b <= j <= min(J * b + b - 1, L - 1) for J in chosen)


def brute_selection(q, kc, hp: HP, scale: float) -> list[list[list[int]]]:
    """SPEC 1b for one sequence: chosen[g][i] = the blocks selected for group g, query i, in
    order."""
    L, H, _ = q.shape
    KVH = kc.shape[1]
    G = H // KVH
    s, b = hp.compress_stride, hp.select_block
    C = L // s  # windows; tokens from C*s on belong to none, extra kc rows are never used
    m = b // s
    num_blocks = C // m
    # z[h][i][c] = scale * q[i, h] . kc[c, h // G]; each dot product reduced on its own (not a
    # matmul) so that equal kc rows give bit-equal logits and exact ties stay ties.
    z = [(scale * (q[:, h, None, :] * kc[None, :C, h // G, :]).sum(-1)).tolist() for h in range(H)]
    chosen = []
    for g in range(KVH):
        per_query = []
        for i in range(L):
            zbar = [sum(z[g * G + t][i][c] for t in range(G)) / G for c in range(C)]
            score = [sum(zbar[J * m + t] for t in range(m)) / m for J in range(num_blocks)]
            visible = [J for J in range(num_blocks) if block_is_candidate(J, i, hp)]
            logits = [NULL_LOGIT] + [score[J] for J in visible]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            total = sum(e)
            prob = {J: e[1 + t] / total for t, J in enumerate(visible)}  # the -1000 entry dropped
            ranked = sorted(visible, key=lambda J: (-prob[J], J))  # ties: lower block first
            ranked = ranked[: min(hp.num_select, len(visible))]
            per_query.append([J for J in ranked if prob[J] > MIN_PROB])
        chosen.append(per_query)
    return chosen


def masked_softmax_attention(logits, mask, v):
    """Exact softmax over the keys in ``mask``: logits, mask [L, L], v [L, D] -> o [L, D],
    lse [L]."""
    masked = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(masked, dim=-1) @ v, torch.logsumexp(masked, dim=-1)


def brute_sequence(q, k, v, kc, gates, hp: HP):
    """The whole op on one sequence (SPEC 1b-3); q [L, H, D], k, v [L, KVH, D], kc [C, KVH, D],
    gates [L, H, 2], float64. Returns out, o_sel, o_win [L, H, D], lse [L, H, 2], chosen."""
    L, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    scale = D ** -0.5
    with torch.no_grad():
        chosen = brute_selection(q.detach(), kc, hp, scale)
    stis = torch.tensor([[stis_visible(i, j, L, hp) for j in range(L)] for i in range(L)])
    sel = torch.tensor([[[in_selected_key_set(i, j, L, chosen[h // G][i], hp) for j in range(L)]
                         for i in range(L)] for h in range(H)])  # [H, L, L]
    outs, o_sels, o_wins, lses = [], [], [], []
    for h in range(H):
        g = h // G
        logits = scale * (q[:, h] @ k[:, g].T)  # [L, L]
        o_sel, lse_sel = masked_softmax_attention(logits, sel[h], v[:, g])
        o_win, lse_win = masked_softmax_attention(logits, stis, v[:, g])
        outs.append(gates[:, h, 0:1] * o_sel + gates[:, h, 1:2] * o_win)
        o_sels.append(o_sel)
        o_wins.append(o_win)
        lses.append(torch.stack([lse_sel, lse_win], dim=-1))
    stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
    return stack(outs), stack(o_sels), stack(o_wins), stack(lses), chosen


# --------------------------------------------------------------------------------------------------
# Comparing the two on a batch
# --------------------------------------------------------------------------------------------------
def check_against_brute_force(lengths, hp: HP, H: int, KVH: int, D: int, layout: str, N=None):
    batch = make_batch(lengths, H=H, KVH=KVH, D=D, N=N, layout=layout, dtype=torch.float64,
                       compress_stride=hp.compress_stride, extra_kc_rows=2, requires_grad=True)
    leaves = [batch.q, batch.k, batch.v, batch.gates]
    res = reference.blossom_attention(batch.q, batch.k, batch.v, batch.kc, batch.gates,
                                      batch.seq_start, batch.seq_len, **hp.kwargs())
    weight = torch.randn_like(res.out)  # a random cotangent, padding rows included on purpose
    grads_ref = torch.autograd.grad((res.out * weight).sum(), leaves, allow_unused=True)

    width = max(hp.num_select, 1)
    valid = batch.valid_rows()
    loss_brute = torch.zeros((), dtype=torch.float64)
    for b, L in enumerate(lengths):
        if L == 0:
            continue
        out, o_sel, o_win, lse, chosen = brute_sequence(
            batch.seq(batch.q, b), batch.seq(batch.k, b), batch.seq(batch.v, b), batch.kc[b],
            batch.seq(batch.gates, b), hp)
        torch.testing.assert_close(batch.seq(res.out, b), out, **TOL, msg=f"out, sequence {b}")
        torch.testing.assert_close(batch.seq(res.o_sel, b), o_sel, **TOL, msg=f"o_sel, seq {b}")
        torch.testing.assert_close(batch.seq(res.o_win, b), o_win, **TOL, msg=f"o_win, seq {b}")
        torch.testing.assert_close(batch.seq(res.lse, b), lse, **TOL, msg=f"lse, sequence {b}")
        idx = torch.tensor([[row + [-1] * (width - len(row)) for row in per_g]
                            for per_g in chosen], dtype=torch.int32).permute(1, 0, 2)
        cnt = torch.tensor([[len(row) for row in per_g] for per_g in chosen],
                           dtype=torch.int32).T
        assert torch.equal(batch.seq(res.sel_idx, b), idx), f"sel_idx differs in sequence {b}"
        assert torch.equal(batch.seq(res.sel_cnt, b), cnt), f"sel_cnt differs in sequence {b}"
        loss_brute = loss_brute + (out * batch.seq(weight, b)).sum()

    pad = ~valid
    for name, t in [("out", res.out), ("o_sel", res.o_sel), ("o_win", res.o_win),
                    ("lse", res.lse), ("sel_cnt", res.sel_cnt)]:
        assert bool((t[pad] == 0).all()), f"reference {name} is not 0 on padding rows"
    assert bool((res.sel_idx[pad] == -1).all()), "reference sel_idx is not -1 on padding rows"

    if any(lengths):
        grads_brute = torch.autograd.grad(loss_brute, leaves, allow_unused=True)
    else:
        grads_brute = [None] * 4
    for name, leaf, g_ref, g_brute in zip("q k v gates".split(), leaves, grads_ref, grads_brute):
        g_ref = torch.zeros_like(leaf) if g_ref is None else g_ref
        g_brute = torch.zeros_like(leaf) if g_brute is None else g_brute
        torch.testing.assert_close(g_ref, g_brute, **TOL, msg=f"d{name}")
        assert bool((g_ref[pad] == 0).all()), f"reference d{name} is not 0 on padding rows"
    return res


# --------------------------------------------------------------------------------------------------
# Random configurations: every value of every parameter appears, combinations vary
# --------------------------------------------------------------------------------------------------
def _balanced(values, count, rng):
    pool = (list(values) * (count // len(values) + 1))[:count]
    rng.shuffle(pool)
    return pool


def _random_configs(count=24, seed=2024):
    rng = random.Random(seed)
    pools = dict(
        N=_balanced([1, 15, 17, 97, 200], count, rng),
        G=_balanced([1, 2, 4, 8], count, rng),
        D=_balanced([16, 32, 64, 128], count, rng),
        causal=_balanced([True, False], count, rng),
        use_power=_balanced([True, False], count, rng),
        use_sink=_balanced([True, False], count, rng),
        window=_balanced([1, 3, 8], count, rng),
        power_block=_balanced([1, 2, 3], count, rng),
        sb=_balanced([(2, 4), (4, 4), (2, 6)], count, rng),
        num_select=_balanced([0, 1, 4, 50], count, rng),  # 50: more than any sequence has blocks
        layout=_balanced(list(LAYOUTS), count, rng),
    )
    configs = []
    for t in range(count):
        c = {key: pool[t] for key, pool in pools.items()}
        N = c["N"]
        # Two kv heads where the sequences are short; one (and a small group) where the O(H L^2)
        # Python masks of the brute force would cost seconds.
        KVH = 2 if N <= 17 else 1
        G = min(c["G"], 2) if N == 200 else c["G"]
        # The full length, an empty sequence, a single token and one in between, in shuffled order.
        lengths = [N, 0, 1, rng.randint(1, N)]
        rng.shuffle(lengths)
        s, b = c["sb"]
        hp = HP(compress_stride=s, select_block=b, num_select=c["num_select"], window=c["window"],
                power_block=c["power_block"], use_power=c["use_power"], use_sink=c["use_sink"],
                causal=c["causal"])
        cid = (f"N{N}-H{G * KVH}kv{KVH}-D{c['D']}-{'causal' if hp.causal else 'full'}"
               f"-pow{int(hp.use_power)}-sink{int(hp.use_sink)}-w{hp.window}-p{hp.power_block}"
               f"-s{s}b{b}-n{hp.num_select}-{c['layout']}")
        configs.append(pytest.param(lengths, hp, G * KVH, KVH, c["D"], c["layout"], N, id=cid))
    return configs


@pytest.mark.parametrize("lengths, hp, H, KVH, D, layout, N", _random_configs())
def test_reference_matches_brute_force(lengths, hp, H, KVH, D, layout, N):
    check_against_brute_force(lengths, hp, H, KVH, D, layout, N=N)


@pytest.mark.parametrize("causal", [True, False])
def test_authors_defaults_on_a_long_sequence(causal):
    """The authors' configuration (s = b = 16, n = 4, w = 8, p = 1) where blocks and powers of two
    both matter: 100 tokens give 6 blocks and distances up to 64."""
    hp = HP(compress_stride=16, select_block=16, num_select=4, window=8, causal=causal)
    check_against_brute_force([100, 37], hp, H=4, KVH=2, D=16, layout="left")


# --------------------------------------------------------------------------------------------------
# Selection edge cases: ties and the -1000 entry
# --------------------------------------------------------------------------------------------------
def _constant_block_kc(block_vectors, C, m, KVH, D):
    """kc [C, KVH, D] whose m windows of block J all equal block_vectors[J] (so block scores tie
    exactly when the vectors are equal); block_vectors must cover ceil(C / m) blocks."""
    kc = torch.stack([block_vectors[c // m] for c in range(C)])  # [C, D]
    return kc[:, None, :].expand(-1, KVH, D).contiguous()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s, b", [(4, 4), (2, 6)])
def test_ties_go_to_the_lower_block(causal, s, b):
    """Every block scores the same: the selection must be the first n candidates in block order."""
    L, H, KVH, D, n = 40, 4, 2, 16, 3
    hp = HP(compress_stride=s, select_block=b, num_select=n, causal=causal)
    m, num_blocks = b // s, (L // s) // (b // s)
    q = torch.randn(L, H, D, dtype=torch.float64)
    kc = _constant_block_kc([torch.randn(D, dtype=torch.float64)] * (num_blocks + 1), L // s, m,
                            KVH, D)
    idx, cnt = reference.select_blocks(q, kc, L, compress_stride=s, select_block=b, num_select=n,
                                       causal=causal)
    chosen = brute_selection(q, kc, hp, D ** -0.5)
    for i in range(L):
        candidates = [J for J in range(num_blocks) if block_is_candidate(J, i, hp)]
        expected = candidates[:n]
        for g in range(KVH):
            assert chosen[g][i] == expected, f"brute force: query {i}, group {g}"
            assert int(cnt[i, g]) == len(expected), f"reference count: query {i}, group {g}"
            assert idx[i, g, : len(expected)].tolist() == expected, f"query {i}, group {g}"


def test_partial_ties_rank_by_score_then_block():
    """Blocks alternate between two vectors: two groups of exactly equal scores. Within a group the
    lower block comes first, the groups in score order."""
    L, H, KVH, D, s, b, n = 48, 2, 1, 16, 4, 4, 8
    hp = HP(compress_stride=s, select_block=b, num_select=n, causal=True)
    u = [torch.randn(D, dtype=torch.float64) for _ in range(2)]
    num_blocks = L // b
    kc = _constant_block_kc([u[J % 2] for J in range(num_blocks)], L // s, 1, KVH, D)
    q = torch.randn(L, H, D, dtype=torch.float64)
    idx, cnt = reference.select_blocks(q, kc, L, compress_stride=s, select_block=b, num_select=n,
                                       causal=True)
    chosen = brute_selection(q, kc, hp, D ** -0.5)
    for i in range(L):
        candidates = [J for J in range(num_blocks) if (J + 1) * b <= i]
        # the parity with the higher group-mean score ranks first
        scores = [float((q[i] @ u[p]).mean()) for p in range(2)]
        first = 0 if scores[0] > scores[1] else 1
        expected = ([J for J in candidates if J % 2 == first]
                    + [J for J in candidates if J % 2 != first])[:n]
        assert chosen[0][i] == expected, f"brute force, query {i}"
        assert idx[i, 0, : int(cnt[i, 0])].tolist() == expected, f"reference, query {i}"


def test_null_logit_and_probability_threshold():
    """Block scores near -1000 make the extra softmax entry matter: a block keeps P > 1e-10 only if
    its score is within ~23 of -1000 (or of the best block), so a lone block scoring -1030 is not
    selected although it would get P = 1 without the -1000 entry."""
    L, D, s, b = 32, 16, 4, 4
    hp = HP(compress_stride=s, select_block=b, num_select=8, causal=True)
    scale = D ** -0.5
    target = [-1030.0, -1005.0, -1020.0, -1025.0, -1003.0, -1100.0, -1010.0, -1000.0]
    q = torch.ones(L, 1, D, dtype=torch.float64)
    # score = scale * q . kc = scale * D * x for kc = x * ones
    kc = torch.stack([torch.full((D,), t / (scale * D), dtype=torch.float64) for t in target])
    kc = kc[:, None, :]
    idx, cnt = reference.select_blocks(q, kc, L, compress_stride=s, select_block=b, num_select=8,
                                       causal=True, scale=scale)
    chosen = brute_selection(q, kc, hp, scale)
    # query 7 sees block 0 only (-1030): P = e^-30 / (1 + e^-30) < 1e-10
    assert chosen[0][7] == [] and int(cnt[7, 0]) == 0
    # query 31 sees blocks 0..6; -1025 and below fall under the threshold
    assert chosen[0][31] == [4, 1, 6, 2]
    assert idx[31, 0].tolist() == [4, 1, 6, 2, -1, -1, -1, -1] and int(cnt[31, 0]) == 4
    for i in range(L):
        assert idx[i, 0, : int(cnt[i, 0])].tolist() == chosen[0][i], f"query {i}"


@pytest.mark.parametrize("causal", [True, False])
def test_many_queries_select_the_same_block(causal):
    """One block far ahead of the rest: (almost) every query selects it, the usual case in training
    and the one sparse backward passes get wrong; the reference's gradients must still match."""
    L, H, KVH, D, s, b = 64, 2, 1, 16, 4, 8
    hp = HP(compress_stride=s, select_block=b, num_select=2, causal=causal, window=2)
    batch = make_batch([L, 40], H=H, KVH=KVH, D=D, dtype=torch.float64, compress_stride=s)
    # Every query shares a direction c, and block 1 (windows 2 and 3, m = 2) is c scaled up: its
    # score beats the others by far.
    c = torch.randn(D, dtype=torch.float64)
    valid = batch.valid_rows()
    batch.q[valid] += 2 * c
    batch.kc[:, 2:4] = 5 * c
    res = check_against_brute_force_batch(batch, hp)
    first_choice = res.sel_idx[..., 0][res.sel_cnt > 0]
    assert bool((first_choice == 1).float().mean() > 0.5), "the test lost its popular block"


def check_against_brute_force_batch(batch, hp):
    """Like check_against_brute_force for a batch built elsewhere (it only needs the inputs)."""
    kc = batch.kc
    q, k, v, gates = (t.detach().clone().requires_grad_(True)
                      for t in (batch.q, batch.k, batch.v, batch.gates))
    res = reference.blossom_attention(q, k, v, kc, gates, batch.seq_start, batch.seq_len,
                                      **hp.kwargs())
    weight = torch.randn_like(res.out)
    grads_ref = torch.autograd.grad((res.out * weight).sum(), [q, k, v, gates])
    loss = torch.zeros((), dtype=torch.float64)
    for b_, L in enumerate(batch.lengths):
        out, _, _, _, chosen = brute_sequence(batch.seq(q, b_), batch.seq(k, b_), batch.seq(v, b_),
                                              kc[b_], batch.seq(gates, b_), hp)
        torch.testing.assert_close(batch.seq(res.out, b_), out, **TOL)
        got = batch.seq(res.sel_idx, b_)[:, 0]  # group 0 (KVH = 1)
        for i in range(L):
            assert got[i, : len(chosen[0][i])].tolist() == chosen[0][i], f"seq {b_}, query {i}"
        loss = loss + (out * batch.seq(weight, b_)).sum()
    grads_brute = torch.autograd.grad(loss, [q, k, v, gates])
    for name, g_ref, g_brute in zip("q k v gates".split(), grads_ref, grads_brute):
        torch.testing.assert_close(g_ref, g_brute, **TOL, msg=f"d{name}")
    return res


# --------------------------------------------------------------------------------------------------
# Module-level helpers: compressed keys (SPEC 1a) and RoPE (SPEC 4)
# --------------------------------------------------------------------------------------------------
def brute_compress_keys(k, pos_table, mlp, l, s):
    """SPEC 1a by the letter: window c covers positions c*s - (l - s) .. c*s + s - 1, zeros below 0,
    the position table added per slot, flattened, then the shared MLP."""
    L, KVH, D = k.shape
    C = L // s
    rows = []
    for c in range(C):
        per_head = []
        for g in range(KVH):
            slots = []
            for t in range(l):
                pos = c * s - (l - s) + t
                key = k[pos, g] if pos >= 0 else torch.zeros(D, dtype=k.dtype)
                slots.append(key + pos_table[g, t])
            per_head.append(mlp(torch.cat(slots)))
        rows.append(torch.stack(per_head))
    return torch.stack(rows) if rows else k.new_zeros(0, KVH, D)


@pytest.mark.parametrize("L", [0, 3, 4, 17, 33])
@pytest.mark.parametrize("l, s", [(4, 4), (8, 4), (12, 4), (8, 2)])
def test_compress_keys_matches_spec(L, l, s):
    KVH, D = 2, 16
    mlp = torch.nn.Sequential(torch.nn.Linear(l * D, l * D), torch.nn.ReLU(),
                              torch.nn.Linear(l * D, D)).double()
    k = torch.randn(L, KVH, D, dtype=torch.float64)
    pos_table = torch.randn(KVH, l, D, dtype=torch.float64)
    got = reference.compress_keys(k, pos_table, mlp, l, s)
    expected = brute_compress_keys(k, pos_table, mlp, l, s)
    assert got.shape == (L // s, KVH, D)
    torch.testing.assert_close(got, expected, **TOL)
    # tokens at or after C*s belong to no window
    k_tail = k.clone()
    k_tail[(L // s) * s:] = 1e6
    torch.testing.assert_close(reference.compress_keys(k_tail, pos_table, mlp, l, s), got, **TOL)


def brute_rope(x, positions, theta=10000.0):
    """SPEC 4: dims (2m, 2m+1) rotate by pos * theta ** (-2m / D); x [N, heads, D],
    positions [N]."""
    N, heads, D = x.shape
    out = torch.empty_like(x)
    for n in range(N):
        pos = float(positions[n])
        for h in range(heads):
            for m in range(D // 2):
                angle = pos * theta ** (-2 * m / D)
                a, b = float(x[n, h, 2 * m]), float(x[n, h, 2 * m + 1])
                out[n, h, 2 * m] = a * math.cos(angle) - b * math.sin(angle)
                out[n, h, 2 * m + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


@pytest.mark.parametrize("D", [16, 32])
def test_apply_rope_matches_spec(D):
    x = torch.randn(2, 23, 3, D, dtype=torch.float64)
    # relative positions as the module builds them: left padding shifts the first valid token
    positions = torch.stack([torch.arange(23), (torch.arange(23) - 5).clamp(min=0)])
    got = reference.apply_rope(x, positions)
    for b in range(2):
        torch.testing.assert_close(got[b], brute_rope(x[b], positions[b]), rtol=1e-12, atol=1e-12)
    # float32 keeps float32 accuracy for moderate positions
    got32 = reference.apply_rope(x.float(), positions)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, rtol=0, atol=1e-5)


def test_apply_rope_keeps_norms_and_relative_angles():
    """A rotation: norms are kept and q.k after RoPE depends only on the position difference."""
    D = 32
    q, k = torch.randn(2, D, dtype=torch.float64)
    qs = q.expand(4, 1, D)
    ks = k.expand(4, 1, D)
    pos_q = torch.tensor([5, 9, 105, 1000])
    pos_k = pos_q - 3
    rq, rk = reference.apply_rope(qs, pos_q), reference.apply_rope(ks, pos_k)
    torch.testing.assert_close(rq.norm(dim=-1), qs.norm(dim=-1), rtol=1e-12, atol=1e-12)
    dots = (rq * rk).sum(dim=-1).flatten()
    torch.testing.assert_close(dots, dots[:1].expand(4), rtol=1e-10, atol=1e-10)
