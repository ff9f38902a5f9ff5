"""BlossomRec and its dense baseline SASRec: a SASRec-style post-LN Transformer over item sequences.

``item embedding (padding id 0) -> LayerNorm -> dropout -> N x [attention -> Linear -> dropout ->
LayerNorm(. + x) -> GELU feed-forward -> dropout -> LayerNorm(. + h)]``, the hidden state at the last
valid position scored against every item embedding (tied weights), trained with cross-entropy over all
items. Positions enter only through the attention's RoPE (no absolute position embedding, SPEC 4).

Item ids: the model sees indices ``1..num_items`` (0 = padding). A model loaded with
:meth:`BlossomRec.from_checkpoint` also carries the dataset's raw item ids (``item_ids``), and
:meth:`BlossomRec.recommend` speaks raw ids on both ends.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops as _ops
from ..attention import (BACKENDS, SPARSE_NAMES, BlossomAttention, DenseAttention,
                         normalize_sparse_names, sequence_bounds, valid_mask)

ATTENTIONS = ("blossom", "dense")
PADDING_SIDES = ("right", "left")
# The file the training command writes into --checkpoint-dir; from_checkpoint finds it in a folder.
CHECKPOINT_NAME = "checkpoint.pt"


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

    def forward(self, x: Tensor, lengths: Tensor, padding_side: str = "right") -> Tensor:
        """``x [B, N, hidden]`` padded on ``padding_side`` with ``lengths [B]`` -> ``[B, N, hidden]``."""
        h = self.attn_norm(x + self.dropout(self.attn_dense(
            self.attention(x, lengths=lengths, padding_side=padding_side))))
        return self.ff_norm(h + self.dropout(self.ff(h)))


class BlossomRec(nn.Module):
    """Next-item recommender over padded item sequences.

    ``attention="blossom"`` uses :class:`~blossomrec_cuda.BlossomAttention` (with ``backend`` "ops" or
    "reference"), ``"dense"`` the dense causal :class:`~blossomrec_cuda.DenseAttention` (SASRec).
    Defaults are the paper's configuration (SPEC 5): hidden 128, 8 heads, 2 kv heads (head dim 16),
    2 layers, inner size 256, dropout 0.2. ``sparse_kwargs`` go to BlossomAttention (block sizes,
    window, ...).

    Batches are ``items [B, N]`` of indices ``0..num_items`` (0 = padding) with ``lengths [B]``,
    right-padded by default or left-padded with ``padding_side="left"``; the ids and the lengths must
    agree (every valid position holds an item, every other one the padding id), which is checked in
    eager mode (a left-padded batch passed as right-padded is refused, not scored wrongly).
    ``check_inputs = False`` skips those checks (and the targets' range check of :meth:`loss`): they
    read device values on the host, a synchronisation per call; the training command turns them off
    for its own batches, which it builds from its own id map.
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
        self.backend = backend
        self._sizes = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers,
                           inner=inner, dropout=dropout)
        # Set by from_checkpoint (or set_item_ids / by hand): the dataset's raw ids and the history
        # length the model was trained on, which recommend() uses.
        self.item_ids: Optional[list[str]] = None
        self._index_of: dict[str, int] = {}
        self.max_len: Optional[int] = None
        self.check_inputs = True  # see the class docstring
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

    # ----------------------------------------------------------------------------------------------
    # Configuration and raw item ids
    # ----------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The arguments of :func:`build_model` that rebuild this architecture (plain Python values,
        as stored in checkpoints): ``num_items``, ``attention``, ``backend``, the sizes and, for
        BlossomRec, every BlossomAttention hyper-parameter in ``sparse_kwargs`` (defaults resolved)."""
        sparse = {}
        for module in self.modules():
            if isinstance(module, BlossomAttention):
                sparse = {name: getattr(module, name) for name in SPARSE_NAMES}
                break
        return dict(num_items=self.num_items, attention=self.attention_kind, backend=self.backend,
                    **self._sizes, sparse_kwargs=sparse)

    def set_item_ids(self, item_ids: Optional[Sequence[str]]) -> None:
        """Name the items: ``item_ids[i - 1]`` is the raw (dataset) id of model index ``i``, so
        ``len(item_ids) == num_items`` and no id repeats. None: raw ids are the model indices."""
        if item_ids is None:
            self.item_ids, self._index_of = None, {}
            return
        ids = [str(i) for i in item_ids]
        if len(ids) != self.num_items:
            raise ValueError(f"item_ids names {len(ids)} items, the model has {self.num_items}")
        index_of = {raw: i for i, raw in enumerate(ids, 1)}
        if len(index_of) != len(ids):
            raise ValueError("item_ids holds the same raw id twice")
        self.item_ids, self._index_of = ids, index_of

    def index_of(self, raw_id: Union[str, int]) -> int:
        """The model index (``1..num_items``) of a raw item id (compared as a string, so the int 42
        finds the token "42"); without ``item_ids``, the raw id is the index."""
        if self.item_ids is None:
            if isinstance(raw_id, bool) or not isinstance(raw_id, int) \
                    or not 1 <= raw_id <= self.num_items:
                raise ValueError(f"this model has no item_ids, so raw ids are its indices "
                                 f"1..{self.num_items}; got {raw_id!r}")
            return raw_id
        index = self._index_of.get(str(raw_id))
        if index is None:
            raise ValueError(f"unknown item id {raw_id!r}: the model knows the {self.num_items} "
                             "items of its training data (model.item_ids)")
        return index

    def raw_id(self, index: int) -> Union[str, int]:
        """The raw item id of model index ``index`` (``1..num_items``)."""
        return index if self.item_ids is None else self.item_ids[index - 1]

    # ----------------------------------------------------------------------------------------------
    # Loading and recommending
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike],
                        map_location: Union[str, torch.device] = "cpu", *,
                        backend: Optional[str] = None, weights: str = "best") -> "BlossomRec":
        """The model saved by ``python -m blossomrec_cuda.rec.train --checkpoint-dir DIR`` (``path``
        is ``DIR/checkpoint.pt`` or ``DIR``), in eval mode, on the device ``map_location``.

        The checkpoint says which model it is: BlossomRec, or :class:`SASRec` for
        ``--attention dense`` (``SASRec.from_checkpoint`` refuses a BlossomRec checkpoint).
        ``weights="best"`` loads the epoch with the best validation NDCG@10 (the weights the test
        metrics were computed with), ``"last"`` those of the last epoch run. ``backend`` overrides
        the saved BlossomAttention backend ("ops" or "reference"; the math is the same). The
        checkpoint is read with ``torch.load(weights_only=True)``; it carries ``item_ids`` (raw ids)
        and the training ``max_len``, which :meth:`recommend` uses.
        """
        if weights not in ("best", "last"):
            raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"no checkpoint at {path!r}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path} does not load with torch.load(weights_only=True): it holds "
                             "pickled Python objects (checkpoints of earlier versions held NumPy "
                             "RNG state); train again to get one that loads safely") from None
        if not isinstance(ckpt, dict) or "model_config" not in ckpt:
            raise ValueError(f"{path} is not a checkpoint of the training command (no model_config)")
        config = dict(ckpt["model_config"])
        if backend is not None:
            config["backend"] = backend
        if cls is SASRec and config["attention"] != "dense":
            raise ValueError(f"{path} holds a BlossomRec ({config['attention']!r} attention), not "
                             "a SASRec; load it with BlossomRec.from_checkpoint")
        model = build_model(**config)
        model.load_state_dict(ckpt["best_model" if weights == "best" else "model"])
        model.set_item_ids(ckpt.get("item_ids"))
        model.max_len = ckpt.get("max_len")
        return model.to(map_location).eval()

    @torch.no_grad()
    def recommend(self, histories: Sequence[Sequence[Union[str, int]]], k: int = 10,
                  exclude_seen: bool = True, batch_size: int = 1024) -> list[list[Union[str, int]]]:
        """The top-``k`` next items for each history, best first.

        ``histories``: one list of raw item ids per user, oldest first and most recent last (only
        the last ``max_len`` are used when the model knows its training length). Returns a list
        (one per history) of raw item ids: the strings of ``item_ids``, or model indices when the
        model has none. ``exclude_seen`` leaves out items already in the history (a row then
        holds fewer than ``k`` ids only if fewer than ``k`` items remain). Runs in eval mode on the
        model's device, without gradients; the model's train/eval mode is restored afterwards.
        """
        _ops._check_int_args(k=k, batch_size=batch_size)
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k must be in 1..{self.num_items} (the number of items), got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        indexed = []
        for row, history in enumerate(histories):
            if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
                raise TypeError(f"histories[{row}] must be a list of item ids, got "
                                f"{type(history).__name__}")
            if len(history) == 0:
                raise ValueError(f"histories[{row}] is empty: a recommendation needs at least one "
                                 "item")
            try:
                indexed.append([self.index_of(raw) for raw in history])
            except ValueError as e:
                raise ValueError(f"histories[{row}]: {e}") from None
        device = self.item_embedding.weight.device
        was_training = self.training
        self.eval()
        out: list[list[Union[str, int]]] = []
        try:
            for lo in range(0, len(indexed), batch_size):
                chunk = [h[-self.max_len:] if self.max_len else h
                         for h in indexed[lo:lo + batch_size]]
                n = max(len(h) for h in chunk)
                items = torch.zeros(len(chunk), n, dtype=torch.long)
                for b, h in enumerate(chunk):
                    items[b, :len(h)] = torch.tensor(h, dtype=torch.long)
                lengths = torch.tensor([len(h) for h in chunk], dtype=torch.long)
                scores = self(items.to(device), lengths.to(device)).float()
                if exclude_seen:
                    seen = torch.zeros_like(scores, dtype=torch.bool)
                    for b, h in enumerate(indexed[lo:lo + batch_size]):  # the whole history
                        seen[b, torch.tensor(h, dtype=torch.long, device=device) - 1] = True
                    scores = scores.masked_fill(seen, -torch.inf)
                top, cols = scores.topk(k, dim=1)
                for values, row_cols in zip(top.tolist(), cols.tolist()):
                    out.append([self.raw_id(c + 1) for v, c in zip(values, row_cols)
                                if v != -torch.inf])
        finally:
            self.train(was_training)
        return out

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    def _check_items(self, items: Tensor, seq_start: Tensor, seq_len: Tensor,
                     padding_side: str) -> None:
        """Item ids in range, and ids and lengths that agree (eager only: needs the values)."""
        if items.numel() == 0:
            return
        valid = valid_mask(seq_start, seq_len, items.shape[1])
        out_of_range = (items < 0) | (items > self.num_items)
        disagree = (items != 0) != valid
        flags = torch.stack([out_of_range.any(), disagree.any()]).tolist()
        if flags[0]:
            bad = items[out_of_range]
            raise ValueError(f"item ids must be in 0..{self.num_items} (1..{self.num_items}: the "
                             f"model's items, 0: padding), got {int(bad.min())}"
                             + ("" if bad.numel() == 1 else f" .. {int(bad.max())}")
                             + "; map raw ids to model indices first (model.recommend and "
                             "model.index_of take raw ids)")
        if flags[1]:
            row = int(disagree.any(dim=1).nonzero()[0, 0])
            ids = items[row].tolist()
            count, length, N = sum(i != 0 for i in ids), int(seq_len[row]), len(ids)
            other = "left" if padding_side == "right" else "right"
            ids_other = ids[N - count:] if other == "left" else ids[:count]
            pad_other = ids[:N - count] if other == "left" else ids[count:]
            shown = ids if N <= 12 else ids[:6] + ["..."] + ids[-6:]
            if count == length and 0 < count < N and 0 not in ids_other \
                    and not any(pad_other):
                raise ValueError(f"items row {row} is {other}-padded ({shown}) but padding_side is "
                                 f"{padding_side!r}; pass padding_side={other!r} or "
                                 f"{padding_side}-pad the batch")
            where = "first" if padding_side == "right" else "last"
            raise ValueError(f"items row {row} ({shown}) disagrees with lengths[{row}] = {length}: "
                             f"with padding_side={padding_side!r} its {where} {length} positions "
                             f"must hold item ids (1..{self.num_items}) and every other position "
                             "the padding id 0")

    def encode(self, items: Tensor, lengths: Tensor, padding_side: str = "right") -> Tensor:
        """``items [B, N]`` item ids (0 = padding) padded on ``padding_side`` ("right" or "left"),
        ``lengths [B]`` -> ``[B, hidden]``, the hidden state at each sequence's last valid position.
        Ids outside ``0..num_items``, or ids that disagree with the lengths, raise ValueError
        (checked in eager mode; skipped while compiling or capturing a CUDA graph)."""
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if items.dim() != 2 or items.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"items must be a [B, N] int64 (or int32) tensor of item ids, got "
                            f"{items.dtype} of shape {list(items.shape)}")
        # the attention's own statement of the padding rule (and its check of the lengths' range)
        seq_start, seq_len = sequence_bounds(items[:, :, None], lengths=lengths,
                                             padding_side=padding_side)
        if self.check_inputs and not _ops._is_tracing():  # compiling or capturing: no host reads
            self._check_items(items, seq_start, seq_len, padding_side)
        x = self.emb_dropout(self.emb_norm(self.item_embedding(items)))
        for block in self.blocks:
            x = block(x, lengths, padding_side)
        last = (seq_start + seq_len - 1).clamp(min=0)
        return x[torch.arange(x.shape[0], device=x.device), last]

    def scores(self, hidden: Tensor) -> Tensor:
        """``hidden [B, hidden]`` -> ``[B, num_items]``; column ``c`` scores item id ``c + 1``."""
        return hidden @ self.item_embedding.weight[1:].t()

    def forward(self, items: Tensor, lengths: Tensor, padding_side: str = "right") -> Tensor:
        """``items [B, N]``, ``lengths [B]`` (as in :meth:`encode`) -> next-item scores
        ``[B, num_items]`` (column ``c`` is item id ``c + 1``). One call does the whole model, so
        DistributedDataParallel sees every parameter used inside its forward."""
        return self.scores(self.encode(items, lengths, padding_side))

    def loss(self, items: Tensor, lengths: Tensor, targets: Tensor,
             padding_side: str = "right") -> Tensor:
        """Cross-entropy over all items of the next item ``targets [B]`` (ids ``1..num_items``)."""
        if self.check_inputs and not _ops._is_tracing() and targets.numel() \
                and bool(((targets < 1) | (targets > self.num_items)).any()):
            raise ValueError(f"targets must be item ids in 1..{self.num_items}, got values from "
                             f"{int(targets.min())} to {int(targets.max())}")
        return F.cross_entropy(self(items, lengths, padding_side).float(), targets - 1)


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
