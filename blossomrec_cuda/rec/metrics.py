"""Top-K ranking metrics for one held-out target per user.

A rank is 0-based: the number of candidates placed before the target. Ties count against the target
(a candidate scoring exactly the target's score is placed before it), so a model that gives every item
the same score ranks last, not first.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor



def rank_of_target(scores: Tensor, target_col: Tensor, exclude: Optional[Tensor] = None) -> Tensor:
    """``scores [U, M]``, ``target_col [U]`` (column of each user's target) -> ranks ``[U]`` int64.

    ``exclude [U, M]`` bool marks candidates that do not compete (e.g. items already in the history
    in full ranking); the target itself is never excluded.
    """
    target = scores.gather(1, target_col[:, None])
    ahead = scores >= target
    ahead.scatter_(1, target_col[:, None], False)
    if exclude is not None:
        ahead &= ~exclude
    return ahead.sum(dim=1)


def metrics_from_ranks(ranks: Tensor, k: int = 10) -> dict[str, float]:
    """Mean Recall@k (hit rate: one target per user), MRR@k and NDCG@k over users."""
    sums = metric_sums(ranks, k)
    n = max(int(ranks.numel()), 1)
    return {name: value / n for name, value in sums.items()}


def metric_sums(ranks: Tensor, k: int = 10) -> dict[str, float]:
    """Per-metric sums over users (for averaging across batches or processes)."""
    r = ranks.double()
    hit = r < k
    return {
        f"recall@{k}": float(hit.sum()),
        f"mrr@{k}": float(torch.where(hit, 1.0 / (r + 1.0), torch.zeros_like(r)).sum()),
        f"ndcg@{k}": float(torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).sum()),
    }

