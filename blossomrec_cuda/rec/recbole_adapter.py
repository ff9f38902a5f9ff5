"""BlossomRec (and SASRec) as a RecBole ``SequentialRecommender``; RecBole is an optional dependency.

    from recbole.quick_start import run_recbole
    from blossomrec_cuda.rec.recbole_adapter import BlossomRecRecBole
    run_recbole(model=BlossomRecRecBole, dataset="ml-1m", config_dict={"loss_type": "CE", ...})

Configuration keys (RecBole's names where RecBole has one; defaults = the paper's, SPEC 5):
``hidden_size`` 128, ``n_heads`` 8, ``n_kv_heads`` 2, ``n_layers`` 2, ``inner_size`` 256,
``hidden_dropout_prob`` 0.2, ``attention`` "blossom" | "dense", ``attention_backend`` "ops" |
"reference", and BlossomAttention's ``compress_block_size``, ``compress_stride``, ``select_block``,
``num_select``, ``window``, ``power_block``. The loss is cross-entropy over all items
(``loss_type`` must be "CE" or absent).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from recbole.model.abstract_recommender import SequentialRecommender
except ImportError as e:  # pragma: no cover - exercised only without RecBole
    raise ImportError("blossomrec_cuda.rec.recbole_adapter needs RecBole: `pip install recbole`") from e

from ..attention import LEGACY_SPARSE_NAMES, SPARSE_NAMES
from .model import build_model

_SPARSE_KEYS = SPARSE_NAMES


def _get(config: Any, key: str, default: Any) -> Any:
    """RecBole's Config answers None for a missing key, a plain dict raises KeyError: accept both."""
    try:
        value = config[key]
    except KeyError:
        value = None
    return default if value is None else value


class BlossomRecRecBole(SequentialRecommender):
    """RecBole wrapper around :class:`~blossomrec_cuda.rec.model.BlossomRec`. RecBole's item ids
    already use 0 for padding and right-pad ``item_seq``, the layout the model expects."""

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        loss_type = _get(config, "loss_type", "CE")
        if loss_type != "CE":
            raise ValueError(f"BlossomRec trains with cross-entropy over all items; set "
                             f"loss_type: CE (got {loss_type!r})")
        # The op's names, or (deprecated) the names before 0.2.0.
        sparse = {k: _get(config, k, None) for k in _SPARSE_KEYS + tuple(LEGACY_SPARSE_NAMES)}
        self.model = build_model(
            num_items=self.n_items - 1,  # RecBole counts the padding id 0 in n_items
            attention=_get(config, "attention", "blossom"),
            backend=_get(config, "attention_backend", "ops"),
            hidden=_get(config, "hidden_size", 128), heads=_get(config, "n_heads", 8),
            kv_heads=_get(config, "n_kv_heads", 2), layers=_get(config, "n_layers", 2),
            inner=_get(config, "inner_size", 256), dropout=_get(config, "hidden_dropout_prob", 0.2),
            sparse_kwargs={k: v for k, v in sparse.items() if v is not None})

    def forward(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """``item_seq [B, N]`` right-padded, ``item_seq_len [B]`` -> ``[B, hidden]``."""
        return self.model.encode(item_seq, item_seq_len)

    def _all_scores(self, interaction: Any) -> Tensor:
        """``[B, n_items]`` with RecBole's columns (column 0 = the padding id, never recommended)."""
        scores = self.model(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pad = torch.full_like(scores[:, :1], torch.finfo(scores.dtype).min)
        return torch.cat([pad, scores], dim=1)

    def calculate_loss(self, interaction: Any) -> Tensor:
        return self.model.loss(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                               interaction[self.POS_ITEM_ID])

    def predict(self, interaction: Any) -> Tensor:
        """Scores of ``interaction[ITEM_ID]`` only (RecBole's sampled evaluation): ``[B]``."""
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = self.model.item_embedding(interaction[self.ITEM_ID])
        return (hidden * items).sum(dim=-1)

    def full_sort_predict(self, interaction: Any) -> Tensor:
        return self._all_scores(interaction)
