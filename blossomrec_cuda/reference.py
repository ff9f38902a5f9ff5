"""docs/ALGORITHM.md in plain PyTorch: readable first, fast never. The "SPEC 1a" .. "SPEC 5" tags
here and across the code name that page's sections.

Every function here works on ONE sequence of ``L`` valid tokens (positions ``0 .. L-1`` relative to its
first valid token); :func:`blossom_attention` maps a padded or packed batch onto them, one sequence
at a time, and :func:`blossom_attention_batched` does the same for a padded batch in one go. The CPU
and CUDA ops are held to these functions by the tests. Each step optionally takes ``rows``, the query
positions to compute, so that a long sequence (N = 65536) can be checked on sampled rows without an
``L x L`` mask.

Shapes (one sequence): ``q [L, H, D]``, ``k, v [L, KVH, D]``, ``kc [C, KVH, D]``, ``gates [L, H, 2]``.
The steps of 1b-3 also accept leading batch dimensions (``q [B, L, H, D]``, ...), which
:func:`blossom_attention_batched` uses to run a whole padded batch without a Python loop.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

NULL_LOGIT = -1000.0  # SPEC 1b: the extra softmax entry that lets a row keep no block
MIN_PROB = 1e-10  # SPEC 1b: selected blocks need P above this


# --------------------------------------------------------------------------------------------------
# Precision: the reference runs in float64 for float64 inputs; otherwise in float32 ("upcast", the
# default) or in the input dtype for the matmuls with a float32 softmax ("upcast=False": the low
# precision reference of FlashAttention's error criterion).
# --------------------------------------------------------------------------------------------------
def _compute_dtype(t: Tensor, upcast: bool) -> torch.dtype:
    if t.dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else t.dtype


def _softmax_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# 1a. Compressed keys
# --------------------------------------------------------------------------------------------------
def compress_keys(k: Tensor, pos_table: Tensor, mlp: torch.nn.Module, compress_block: int,
                  compress_stride: int) -> Tensor:
    """SPEC 1a for one sequence: ``k [L, KVH, D]`` -> ``kc [floor(L/s), KVH, D]``.

    Window ``c`` covers positions ``c*s - (l - s) .. c*s + s - 1``; positions below 0 are zeros.
    ``pos_table [KVH, l, D]`` is added to every slot, then ``mlp`` maps ``l*D -> D``.
    """
    L, KVH, D = k.shape
    s, l = compress_stride, compress_block
    C = L // s
    if C == 0:
        return k.new_zeros(0, KVH, D)
    pad = l - s
    k_padded = torch.cat([k.new_zeros(pad, KVH, D), k[: C * s]], dim=0)  # [pad + C*s, KVH, D]
    windows = k_padded.unfold(0, l, s)  # [C, KVH, D, l]
    windows = windows.permute(0, 1, 3, 2) + pos_table.to(k.dtype)  # [C, KVH, l, D]
    return mlp(windows.reshape(C, KVH, l * D))


# --------------------------------------------------------------------------------------------------
# 1b. Block scores and selection
# --------------------------------------------------------------------------------------------------
def num_select_blocks(L: int, C_avail: int, compress_stride: int, select_block: int) -> int:
    """``floor(C / m)`` with ``C = min(floor(L / s), C_avail)`` windows and ``m = b / s``."""
    C = min(L // compress_stride, C_avail)
    return C // (select_block // compress_stride)


def block_visible(rows: Tensor, num_blocks: int, select_block: int, causal: bool) -> Tensor:
    """``[R, num_blocks]`` bool: may query ``rows[r]`` select block ``J``?"""
    J = torch.arange(num_blocks, device=rows.device)
    if causal:
        return (J[None, :] + 1) * select_block <= rows[:, None]
    return J[None, :] != (rows[:, None] // select_block)


def block_scores(q: Tensor, kc: Tensor, L: int, rows: Tensor, compress_stride: int,
                 select_block: int, scale: float) -> Tensor:
    """``score[g, r, J]`` of SPEC 1b for queries ``q [R, H, D]`` (already the rows), float32/64.

    Logits per head, the mean over the G heads of a group, then the mean over the ``m`` windows of a
    block. Leading batch dims are allowed: ``q [..., R, H, D]``, ``kc [..., C, KVH, D]`` ->
    ``[..., KVH, R, nb]`` (every step is elementwise or a reduction over G or m, so each entry is
    computed exactly as without them).
    """
    dt = _softmax_dtype(q)
    *lead, R, H, D = q.shape
    KVH = kc.shape[-2]
    G = H // KVH
    m = select_block // compress_stride
    nb = num_select_blocks(L, kc.shape[-3], compress_stride, select_block)
    kc_used = kc[..., : nb * m, :, :].to(dt)  # [..., nb*m, KVH, D]
    qg = q.to(dt).reshape(*lead, R, KVH, G, D).transpose(-4, -3)  # [..., KVH, R, G, D]
    # One feature at a time, in the same order for every (query, window) pair: equal compressed keys
    # then give bit-equal logits and the tie rule (lower block first) applies. A matmul may round
    # equal columns differently (seen: 3e-16 apart in float64) and break ties at random.
    z = torch.zeros(*lead, KVH, R, G, nb * m, dtype=dt, device=q.device)
    for d in range(D):
        z += qg[..., d, None] * kc_used[..., d].transpose(-1, -2)[..., :, None, None, :]
    z = scale * z  # [..., KVH, R, G, nb*m]
    zbar = z.mean(dim=-2)  # mean of logits over the group's heads
    return zbar.reshape(*lead, KVH, R, nb, m).mean(dim=-1)  # [..., KVH, R, nb]


def select_from_scores(scores: Tensor, visible: Tensor, num_select: int) -> tuple[Tensor, Tensor]:
    """Top-``n`` visible blocks by probability, ties to the lower block, threshold ``P > 1e-10``.

    ``scores [KVH, R, NB]``, ``visible [R, NB]`` -> ``idx [R, KVH, max(n,1)]`` int32 (-1 padded),
    ``cnt [R, KVH]`` int32. Leading batch dims are allowed (``scores [..., KVH, R, NB]``,
    ``visible [..., R, NB]`` -> ``idx [..., R, KVH, n]``): every step works along the last dim.
    """
    *lead, KVH, R, NB = scores.shape
    width = max(num_select, 1)
    idx = torch.full((*lead, R, KVH, width), -1, dtype=torch.int32, device=scores.device)
    cnt = torch.zeros((*lead, R, KVH), dtype=torch.int32, device=scores.device)
    if NB == 0 or num_select == 0 or R == 0:
        return idx, cnt
    masked = scores.masked_fill(~visible[..., None, :, :], float("-inf"))
    null = torch.full((*lead, KVH, R, 1), NULL_LOGIT, dtype=scores.dtype, device=scores.device)
    P = torch.softmax(torch.cat([null, masked], dim=-1), dim=-1)[..., 1:]  # drop the -1000 entry
    # A stable descending sort keeps the lower block first among equal probabilities.
    P_sorted, order = torch.sort(P, dim=-1, descending=True, stable=True)
    take = min(num_select, NB)
    keep = P_sorted[..., :take] > MIN_PROB  # invisible blocks have P == 0 and fall out here
    chosen = torch.where(keep, order[..., :take], torch.full_like(order[..., :take], -1))
    idx[..., :take] = chosen.transpose(-3, -2).to(torch.int32)
    cnt[:] = keep.sum(dim=-1).transpose(-2, -1).to(torch.int32)
    return idx, cnt


@torch.no_grad()
def select_blocks(q: Tensor, kc: Tensor, L: int, rows: Optional[Tensor] = None, *,
                  compress_stride: int = 16, select_block: int = 16, num_select: int = 4,
                  causal: bool = True, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """SPEC 1b for one sequence. ``q [L, H, D]`` (all rows), ``kc [C, KVH, D]``; returns
    ``idx [R, KVH, max(n,1)]`` and ``cnt [R, KVH]`` for the query positions ``rows`` (default all)."""
    rows = _rows(L, rows, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = block_scores(q[rows], kc, L, rows, compress_stride, select_block, scale)
    visible = block_visible(rows, scores.shape[-1], select_block, causal)
    return select_from_scores(scores, visible, num_select)


# --------------------------------------------------------------------------------------------------
# 1c + 2. Key sets as boolean masks over the sequence (only R x L, never needed at full size in the
# kernels, which enumerate the keys instead)
# --------------------------------------------------------------------------------------------------
def selected_mask(rows: Tensor, L: int, idx: Tensor, cnt: Tensor, select_block: int,
                  causal: bool) -> Tensor:
    """``[KVH, R, L]`` bool: own block of each query plus its selected blocks (SPEC 1c).

    ``idx``/``cnt`` may carry leading batch dims (``[..., R, KVH, n]`` -> ``[..., KVH, R, L]``);
    ``rows`` and ``L`` are shared by the batch. The selection is a set of blocks: a block listed
    twice counts once, and only visible whole blocks count (:func:`block_visible` over the
    sequence's ``L // select_block`` whole blocks; what :func:`select_blocks` returns always is):
    a hand-made entry that is not one is skipped, by every backend.
    """
    j = torch.arange(L, device=rows.device)
    lo = (rows // select_block) * select_block
    hi = rows + 1 if causal else torch.clamp(lo + select_block, max=L)
    own = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [R, L]
    key_block = j // select_block  # [L]
    # each entry looked up in block_visible's [R, NB] table (entries outside 0 .. NB - 1 are no
    # whole block of the sequence)
    J, NB = idx.long(), L // select_block
    visible = (J >= 0) & (J < NB)
    if NB > 0:
        table = block_visible(rows, NB, select_block, causal)[:, None, :]  # [R, 1, NB]
        visible &= table.expand(*J.shape[:-1], NB).gather(-1, J.clamp(0, NB - 1))
    listed = torch.arange(idx.shape[-1], device=rows.device)[None, None, :] < cnt[..., None]
    valid = listed & visible
    chosen = torch.where(valid, idx, torch.full_like(idx, -2)).long()  # -2 never matches a block
    in_sel = (key_block == chosen[..., None]).any(dim=-2)  # [..., R, KVH, L]
    return (own[:, None, :] | in_sel).transpose(-3, -2)


def stis_mask(rows: Tensor, L: int, window: int = 8, power_block: int = 1, use_power: bool = True,
              use_sink: bool = True, causal: bool = True) -> Tensor:
    """``[R, L]`` bool: the short-term (STIS) key set of SPEC 2."""
    j = torch.arange(L, device=rows.device)
    d = rows[:, None] // power_block - j[None, :] // power_block
    pow2 = (d > 0) & ((d & (d - 1)) == 0)
    if causal:
        return (d >= 0) & ((d < window) | (pow2 & use_power))
    sink = (j == L - 1)[None, :] & use_sink
    return (d.abs() < window) | (pow2 & use_power) | sink


# --------------------------------------------------------------------------------------------------
# Exact softmax attention over a key set
# --------------------------------------------------------------------------------------------------
def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                     upcast: bool = True) -> tuple[Tensor, Tensor]:
    """``q [R, H, D]``, ``k, v [L, KVH, D]``, ``mask [KVH or 1, R, L]`` -> ``o [R, H, D]``,
    ``lse [R, H]`` (float32/64). Every row must see at least one key. Leading batch dims are
    allowed on all four (``q [..., R, H, D]``, ``mask [..., KVH or 1, R, L]``)."""
    *lead, R, H, D = q.shape
    KVH = k.shape[-2]
    G = H // KVH
    cdt = _compute_dtype(q, upcast)
    sdt = _softmax_dtype(q)
    qg = q.to(cdt).reshape(*lead, R, KVH, G, D)
    logits = torch.einsum("...rkgd,...lkd->...kgrl", qg, k.to(cdt)).to(sdt) * scale  # [KVH,G,R,L]
    logits = logits.masked_fill(~mask[..., :, None, :, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [..., KVH, G, R]
    p = torch.exp(logits - lse[..., None]).to(cdt)
    o = torch.einsum("...kgrl,...lkd->...rkgd", p, v.to(cdt)).reshape(*lead, R, H, D)
    return o, lse.movedim(-1, -3).reshape(*lead, R, H)


def gated_combine(o_sel: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    """SPEC 3: ``gates[..., 0] * o_sel + gates[..., 1] * o_win``."""
    return gates[..., 0:1].to(o_sel.dtype) * o_sel + gates[..., 1:2].to(o_win.dtype) * o_win


class SeqResult(NamedTuple):
    out: Tensor  # [R, H, D]
    o_sel: Tensor  # [R, H, D]
    o_win: Tensor  # [R, H, D]
    lse: Tensor  # [R, H, 2]
    sel_idx: Tensor  # [R, KVH, max(n,1)]
    sel_cnt: Tensor  # [R, KVH]


def _rows(L: int, rows: Optional[Tensor], device: torch.device) -> Tensor:
    return torch.arange(L, device=device) if rows is None else rows.to(device=device, dtype=torch.long)


def blossom_attention_seq(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, gates: Tensor,
                          rows: Optional[Tensor] = None, *, compress_stride: int = 16,
                          select_block: int = 16, num_select: int = 4, window: int = 8,
                          power_block: int = 1, use_power: bool = True, use_sink: bool = True,
                          causal: bool = True, scale: Optional[float] = None, upcast: bool = True,
                          sel: Optional[tuple[Tensor, Tensor]] = None) -> SeqResult:
    """The whole op (SPEC 1b-3) on one sequence of ``L = q.shape[0]`` tokens, for query ``rows``.

    ``gates [L, H, 2]`` (all rows). ``sel`` overrides the selection (``(idx, cnt)`` for the rows), so
    that a kernel's attention can be checked given the kernel's own selection.
    """
    L = q.shape[0]
    rows = _rows(L, rows, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if sel is None:
        sel = select_blocks(q, kc, L, rows, compress_stride=compress_stride,
                            select_block=select_block, num_select=num_select, causal=causal,
                            scale=scale)
    idx, cnt = sel
    q_rows = q[rows]
    m_sel = selected_mask(rows, L, idx, cnt, select_block, causal)
    m_win = stis_mask(rows, L, window, power_block, use_power, use_sink and not causal, causal)
    o_sel, lse_sel = masked_attention(q_rows, k, v, m_sel, scale, upcast)
    o_win, lse_win = masked_attention(q_rows, k, v, m_win[None], scale, upcast)
    out = gated_combine(o_sel, o_win, gates[rows])
    return SeqResult(out, o_sel, o_win, torch.stack([lse_sel, lse_win], dim=-1), idx, cnt)


# --------------------------------------------------------------------------------------------------
# Batches: padded ([B, N, ...] + seq_start/seq_len) and packed ([1, T, ...]) row buffers
# --------------------------------------------------------------------------------------------------
def blossom_attention(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, gates: Tensor, seq_start: Tensor,
                      seq_len: Tensor, *, compress_stride: int = 16, select_block: int = 16,
                      num_select: int = 4, window: int = 8, power_block: int = 1,
                      use_power: bool = True, use_sink: bool = True, causal: bool = True,
                      scale: Optional[float] = None, upcast: bool = True) -> SeqResult:
    """The op on a row buffer (docs/DESIGN.md): ``q [Bq, N, H, D]``, ``k, v [Bq, N, KVH, D]``,
    ``kc [B, C, KVH, D]``, ``gates [Bq, N, H, 2]``, ``seq_start``, ``seq_len`` ``[B]``.

    Returns every field in row-buffer layout (``lse [Bq, N, H, 2]``, ``sel_idx [Bq, N, KVH, n]``);
    padding rows hold 0 (indices -1). Differentiable w.r.t. q, k, v and gates.
    """
    Bq, N, H, D = q.shape
    KVH = k.shape[2]
    width = max(num_select, 1)
    odt = q.dtype
    sdt = _softmax_dtype(q)
    out = q.new_zeros(Bq, N, H, D)
    o_sel = q.new_zeros(Bq, N, H, D)
    o_win = q.new_zeros(Bq, N, H, D)
    lse = torch.zeros(Bq, N, H, 2, dtype=sdt, device=q.device)
    sel_idx = torch.full((Bq, N, KVH, width), -1, dtype=torch.int32, device=q.device)
    sel_cnt = torch.zeros(Bq, N, KVH, dtype=torch.int32, device=q.device)
    starts = [int(x) for x in seq_start.tolist()]
    lens = [int(x) for x in seq_len.tolist()]
    for b, (st, L) in enumerate(zip(starts, lens)):
        if L == 0:
            continue
        bq = b if Bq > 1 else 0
        sl = slice(st, st + L)
        r = blossom_attention_seq(
            q[bq, sl], k[bq, sl], v[bq, sl], kc[b], gates[bq, sl], compress_stride=compress_stride,
            select_block=select_block, num_select=num_select, window=window,
            power_block=power_block, use_power=use_power, use_sink=use_sink, causal=causal,
            scale=scale, upcast=upcast)
        # index_put keeps autograd through the out-of-place writes
        out = _put_rows(out, bq, st, r.out.to(odt))
        o_sel = _put_rows(o_sel, bq, st, r.o_sel.to(odt))
        o_win = _put_rows(o_win, bq, st, r.o_win.to(odt))
        lse = _put_rows(lse, bq, st, r.lse.to(sdt))
        sel_idx[bq, sl] = r.sel_idx
        sel_cnt[bq, sl] = r.sel_cnt
    return SeqResult(out, o_sel, o_win, lse, sel_idx, sel_cnt)


def _put_rows(buf: Tensor, bq: int, start: int, rows: Tensor) -> Tensor:
    index = torch.arange(start, start + rows.shape[0], device=buf.device)
    batch = torch.full_like(index, bq)
    return buf.index_put((batch, index), rows)


def blossom_attention_batched(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, gates: Tensor,
                              seq_start: Tensor, seq_len: Tensor, *, compress_stride: int = 16,
                              select_block: int = 16, num_select: int = 4, window: int = 8,
                              power_block: int = 1, use_power: bool = True, use_sink: bool = True,
                              causal: bool = True, scale: Optional[float] = None,
                              upcast: bool = True) -> SeqResult:
    """:func:`blossom_attention` for a padded batch (``Bq == B``) without a Python loop over the
    sequences: same arguments, same result (up to the rounding of batched matmuls), same autograd.

    Causal and non-causal are both computed batched. The packed layout (``Bq == 1`` holding several
    sequences) falls back to the loop of :func:`blossom_attention`.

    Why it equals the loop. Every sequence is first shifted so that its first valid token sits at
    row 0 (``seq_start`` is then irrelevant: positions are relative to that token), and its padding
    rows are set to 0. Then every sequence is computed as if it had ``N`` tokens, with the per-step
    helpers of the one-sequence reference given a leading batch dim, and restricted to its own
    length ``L_b`` where the rules depend on it:

    * keys ``j >= L_b`` are masked out of both key sets. For valid rows this is SPEC 1c's
      "clipped to 0 .. L_b - 1": causal rows never reach past themselves anyway, and non-causal own
      blocks end at ``min(lo + b, N)`` here, so ``& (j < L_b)`` gives the rule's
      ``min(lo + b, L_b)``;
    * blocks ``J >= floor(min(floor(L_b / s), C) / m)`` (``num_select_blocks`` for ``L_b``) are not
      visible; their scores (from compressed keys sequence ``b`` does not own) become -inf, add
      exact zeros to the softmax and get P == 0, so they drop out of the top-n and the threshold
      as if they were absent;
    * the non-causal sink is key ``L_b - 1`` (not ``N - 1``); the rest of SPEC 2 depends only on
      ``i`` and ``j``.

    Rows ``i >= L_b`` select nothing and see only their own (zeroed) key, so they stay finite and
    NaN-free; they are dropped when the result is shifted back into the row buffer (0 / -1 there).
    Largest tensors: the ``[B, KVH, G, N, N]`` logits and probabilities of each branch (both kept
    for backward); masks are ``[B, KVH, N, N]`` bool. No device-to-host sync.
    """
    Bq, N, H, D = q.shape
    B = seq_len.shape[0]
    if Bq != B:  # packed: several sequences share buffer entry 0
        return blossom_attention(
            q, k, v, kc, gates, seq_start, seq_len, compress_stride=compress_stride,
            select_block=select_block, num_select=num_select, window=window,
            power_block=power_block, use_power=use_power, use_sink=use_sink, causal=causal,
            scale=scale, upcast=upcast)
    dev = q.device
    scale = D ** -0.5 if scale is None else scale
    odt, sdt = q.dtype, _softmax_dtype(q)
    start = seq_start.to(device=dev, dtype=torch.long)
    L = seq_len.to(device=dev, dtype=torch.long)
    r = torch.arange(N, device=dev)  # position relative to the first valid token

    # --- shift: token r of sequence b to row r; padding rows (r >= L_b) become 0 ------------------
    row_ok = r[None, :] < L[:, None]  # [B, N]: shifted row r is a token of sequence b
    src = (start[:, None] + r[None, :]).clamp(max=max(N - 1, 0))  # its buffer row

    def shift(x: Tensor) -> Tensor:
        tail = [1] * (x.dim() - 2)
        x = x.gather(1, src.view(B, N, *tail).expand_as(x))
        # torch.where, not a product: padding may hold NaN, and its gradient must be 0, not NaN
        return torch.where(row_ok.view(B, N, *tail), x, x.new_zeros(()))

    q_s, k_s, v_s, g_s = shift(q), shift(k), shift(v), shift(gates)

    # --- 1b: selection, every sequence as if of length N, then only its own blocks visible --------
    with torch.no_grad():
        scores = block_scores(q_s.detach(), kc, N, r, compress_stride, select_block, scale)
        NB = scores.shape[-1]  # [B, KVH, N, NB]
        m = select_block // compress_stride
        nb = (L // compress_stride).clamp(max=kc.shape[1]) // m  # num_select_blocks per sequence
        own_blocks = torch.arange(NB, device=dev)[None, None, :] < nb[:, None, None]  # [B, 1, NB]
        visible = block_visible(r, NB, select_block, causal) & own_blocks & row_ok[:, :, None]
        idx, cnt = select_from_scores(scores, visible, num_select)  # [B, N, KVH, n], [B, N, KVH]
        del scores, visible

        # --- 1c + 2: key sets, then each restricted to its sequence -------------------------------
        m_sel = selected_mask(r, N, idx, cnt, select_block, causal)  # [B, KVH, N, N]
        m_win = stis_mask(r, N, window, power_block, use_power, False, causal)[None, None]
        if use_sink and not causal:
            m_win = m_win | (r == (L - 1)[:, None])[:, None, None, :]  # the sink: key L_b - 1
        pair_ok = row_ok[:, None, :, None] & row_ok[:, None, None, :]  # [B, 1, N, N]
        pad_self = ~row_ok[:, None, :, None] & torch.eye(N, dtype=torch.bool, device=dev)
        m_sel = (m_sel & pair_ok) | pad_self
        m_win = (m_win & pair_ok) | pad_self  # [B, 1, N, N]
        del pair_ok, pad_self

    o_sel, lse_sel = masked_attention(q_s, k_s, v_s, m_sel, scale, upcast)
    o_win, lse_win = masked_attention(q_s, k_s, v_s, m_win, scale, upcast)
    out = gated_combine(o_sel, o_win, g_s)
    lse = torch.stack([lse_sel, lse_win], dim=-1)

    # --- shift back: buffer row n holds token n - seq_start[b]; other rows 0 (indices -1) ---------
    buf_ok = (r[None, :] >= start[:, None]) & (r[None, :] < (start + L)[:, None])  # [B, N]
    dst = (r[None, :] - start[:, None]).clamp(min=0)

    def unshift(x: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
        tail = [1] * (x.dim() - 2)
        x = x.gather(1, dst.view(B, N, *tail).expand_as(x)).to(dtype)
        fill_t = torch.full((), fill, dtype=dtype, device=dev)
        return torch.where(buf_ok.view(B, N, *tail), x, fill_t)

    return SeqResult(unshift(out, 0, odt), unshift(o_sel, 0, odt), unshift(o_win, 0, odt),
                     unshift(lse, 0, sdt), unshift(idx, -1, torch.int32),
                     unshift(cnt, 0, torch.int32))


# --------------------------------------------------------------------------------------------------
# Module-level helper (SPEC 4): interleaved RoPE at positions relative to the first valid token
# --------------------------------------------------------------------------------------------------
def apply_rope(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate ``x [..., N, heads, D]`` pairwise: dims ``(2m, 2m+1)`` by ``pos * theta ** (-2m/D)``.

    ``positions`` broadcasts against ``x.shape[:-2]`` (e.g. ``[B, N]``).
    """
    D = x.shape[-1]
    # float64 inputs stay float64 (the reference's rule); angles in float32 would be off by ~1e-7.
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=cdt) / D)
    angle = positions.to(cdt)[..., None] * inv_freq  # [..., N, D/2]
    cos = torch.cos(angle)[..., None, :]
    sin = torch.sin(angle)[..., None, :]
    xf = x.to(cdt)
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    rot_even = x_even * cos - x_odd * sin
    rot_odd = x_even * sin + x_odd * cos
    return torch.stack([rot_even, rot_odd], dim=-1).flatten(-2).to(x.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
