"""BlossomRec and its dense baseline SASRec: a SASRec-style post-LN Transformer over item sequences.

``item embedding (padding id 0) -> LayerNorm -> dropout -> N x [attention -> Linear -> dropout ->
LayerNorm(. + x) -> GELU feed-forward -> dropout -> LayerNorm(. + h)]``, the hidden state at the last
valid position scored against every item embedding (tied weights), trained with cross-entropy over all
items. Positions enter only through the attention's RoPE (no absolute position embedding, SPEC 4).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import BACKENDS, BlossomAttention, DenseAttention, normalize_sparse_names

ATTENTIONS = ("blossom", "dense")


class TransformerBlock(nn.Module):
    """One post-LN block (SPEC 4's wrapper around the attention and the feed-forward)."""

    def __init__(self, hidden: int, inner: int, dropout: float, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.attn_dense = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.ff_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x [B, N, hidden]`` right-padded with ``lengths [B]`` -> ``[B, N, hidden]``."""
        h = self.attn_norm(x + self.dropout(self.attn_dense(self.attention(x, lengths=lengths))))
        return self.ff_norm(h + self.dropout(self.ff(h)))


class BlossomRec(nn.Module):
    """Next-item recommender over right-padded item sequences.

    ``attention="blossom"`` uses :class:`~blossomrec_cuda.BlossomAttention` (with ``backend`` "ops" or
    "reference"), ``"dense"`` the dense causal :class:`~blossomrec_cuda.DenseAttention` (SASRec).
    Defaults are the paper's configuration (SPEC 5): hidden 128, 8 heads, 2 kv heads (head dim 16),
    2 layers, inner size 256, dropout 0.2. ``sparse_kwargs`` go to BlossomAttention (block sizes,
    window, ...).
    """

    def __init__(self, num_items: int, hidden: int = 128, heads: int = 8, kv_heads: int = 2,
                 layers: int = 2, inner: int = 256, dropout: float = 0.2,
                 attention: str = "blossom", backend: str = "ops", **sparse_kwargs) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads),
                            ("layers", layers), ("inner", inner)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.attention_kind = attention
        dim_head = hidden // heads

        def make_attention() -> nn.Module:
            if attention == "dense":
                return DenseAttention(hidden, heads, kv_heads, dim_head, causal=True)
            return BlossomAttention(hidden, heads, kv_heads, dim_head, causal=True, backend=backend,
                                    **sparse_kwargs)

        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.emb_norm = nn.LayerNorm(hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden, inner, dropout, make_attention()) for _ in range(layers))
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()  # the init above also drew the padding row
        # SPEC 3: the SASRec init above must not overwrite the gate's [-2, +2] start
        for module in self.modules():
            if isinstance(module, BlossomAttention):
                module.reset_gate()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """SASRec/RecBole init: normal(0, 0.02) for Linear and Embedding weights, zero biases,
        LayerNorm at identity."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def no_grad_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that get no gradient by the spec (BlossomAttention's compressors)."""
        for module in self.modules():
            if isinstance(module, BlossomAttention):
                yield from module.no_grad_parameters()

    def encode(self, items: Tensor, lengths: Tensor) -> Tensor:
        """``items [B, N]`` right-padded item ids (0 = padding), ``lengths [B]`` ->
        ``[B, hidden]``, the hidden state at each sequence's last valid position."""
        x = self.emb_dropout(self.emb_norm(self.item_embedding(items)))
        for block in self.blocks:
            x = block(x, lengths)
        last = (lengths - 1).clamp(min=0)
        return x[torch.arange(x.shape[0], device=x.device), last]

    def scores(self, hidden: Tensor) -> Tensor:
        """``hidden [B, hidden]`` -> ``[B, num_items]``; column ``c`` scores item id ``c + 1``."""
        return hidden @ self.item_embedding.weight[1:].t()

    def forward(self, items: Tensor, lengths: Tensor) -> Tensor:
        """``items [B, N]``, ``lengths [B]`` -> next-item scores ``[B, num_items]`` (column ``c`` is
        item id ``c + 1``). One call does the whole model, so DistributedDataParallel sees every
        parameter used inside its forward."""
        return self.scores(self.encode(items, lengths))

    def loss(self, items: Tensor, lengths: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy over all items of the next item ``targets [B]`` (ids ``1..num_items``)."""
        return F.cross_entropy(self(items, lengths).float(), targets - 1)


class SASRec(BlossomRec):
    """The same model with dense causal attention: the baseline."""

    def __init__(self, num_items: int, hidden: int = 128, heads: int = 8, kv_heads: int = 2,
                 layers: int = 2, inner: int = 256, dropout: float = 0.2) -> None:
        super().__init__(num_items, hidden, heads, kv_heads, layers, inner, dropout,
                         attention="dense")


def build_model(num_items: int, attention: str = "blossom", backend: str = "ops",
                hidden: int = 128, heads: int = 8, kv_heads: int = 2, layers: int = 2,
                inner: int = 256, dropout: float = 0.2,
                sparse_kwargs: Optional[dict] = None) -> BlossomRec:
    """BlossomRec (``attention="blossom"``) or SASRec (``"dense"``) with one signature."""
    if attention == "dense":
        return SASRec(num_items, hidden, heads, kv_heads, layers, inner, dropout)
    return BlossomRec(num_items, hidden, heads, kv_heads, layers, inner, dropout,
                      attention=attention, backend=backend,
                      **normalize_sparse_names(sparse_kwargs or {}))
