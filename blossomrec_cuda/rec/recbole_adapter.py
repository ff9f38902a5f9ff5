"""BlossomRec (and SASRec) as a RecBole ``SequentialRecommender``; RecBole is an optional dependency.

RecBole's custom-model flow (``run_recbole`` looks models up by name among RecBole's own, so a model
class goes through :func:`run_blossomrec`, the same steps with the class)::

    from blossomrec_cuda.rec.recbole_adapter import BlossomRec, run_blossomrec
    result = run_blossomrec(dataset="ml-100k", config_file_list=["examples/recbole/blossomrec.yaml"])
    result["test_result"]  # {"recall@10": ..., "ndcg@10": ...}

or by hand: ``config = Config(model=BlossomRec, dataset=..., config_dict=...)``, ``create_dataset``,
``data_preparation``, ``BlossomRec(config, train_data.dataset)``, ``Trainer(config, model).fit(...)``.

Configuration keys (RecBole's names where RecBole has one; defaults = the paper's, SPEC 5):
``hidden_size`` 128, ``n_heads`` 8, ``n_kv_heads`` 2, ``n_layers`` 2, ``inner_size`` 256,
``hidden_dropout_prob`` 0.2, ``attention`` "blossom" | "dense", ``attention_backend`` "ops" |
"reference", and BlossomAttention's ``compress_block_size``, ``compress_stride``, ``select_block``,
``num_select``, ``window``, ``power_block``. The loss is cross-entropy over all items: ``loss_type``
must be "CE" or absent, and ``train_neg_sample_args`` must be None (no negative sampling).

Importing this module applies :func:`apply_compat_shims` (RecBole 1.2.1 under NumPy 2, pandas 3 and
torch >= 2.6; docs/RECBOLE.md lists what each shim does and why).
"""
from __future__ import annotations

import re
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Compatibility shims for RecBole 1.2.1 (the current release)
# --------------------------------------------------------------------------------------------------
# RecBole's Config.__init__ runs `np.float = np.float_`, `np.complex = np.complex_` and
# `np.unicode = np.unicode_`: NumPy 2 removed those three right-hand sides, so every Config() raises
# AttributeError. The aliases get back the NumPy 1 meanings; names NumPy still has are left alone.
_NUMPY_REMOVED_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}

# RecBole <= 1.2.1 fills missing values with `df[col].fillna(..., inplace=True)`, which pandas 3's
# copy-on-write turns into a no-op: a missing float (a rating, a timestamp) stays NaN without an error.
# Its Trainer saves checkpoints holding the whole Config with pickle protocol 4 and reads them back with
# a bare torch.load, which torch >= 2.6 runs with weights_only=True: that unpickler rejects both.
_LAST_RECBOLE_SHIMMED = (1, 2, 1)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _restore_numpy_aliases() -> list[str]:
    restored = []
    for name, value in _NUMPY_REMOVED_ALIASES.items():
        if not hasattr(np, name):
            setattr(np, name, value)
            restored.append(f"numpy.{name}")
    return restored


def _fill_nan_with_assignment(self: Any) -> None:
    """RecBole 1.2.1's ``Dataset._fill_nan`` (missing token -> 0, missing float -> the column mean,
    missing sequence -> empty array) with assignments in place of ``inplace=True``."""
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x, dtype=dtype: np.array([], dtype=dtype) if isinstance(x, float) else x)


_fill_nan_with_assignment._blossomrec_shim = True  # marks the patch, so that applying it is idempotent


def _patch_fill_nan_for_pandas3() -> list[str]:
    import pandas as pd
    import recbole
    from recbole.data.dataset import Dataset

    if (_version_tuple(pd.__version__) < (3,)
            or _version_tuple(recbole.__version__) > _LAST_RECBOLE_SHIMMED
            or getattr(Dataset._fill_nan, "_blossomrec_shim", False)):
        return []
    Dataset._fill_nan = _fill_nan_with_assignment
    return ["recbole.data.dataset.Dataset._fill_nan"]


class _TorchReadingRecBoleCheckpoints:
    """``torch`` as RecBole's trainer module sees it: the same module, except that ``load`` defaults
    to ``weights_only=False``. The trainer loads only checkpoints in RecBole's own format (its
    best-model file and ``resume_checkpoint``'s file), which the weights-only unpickler cannot read;
    torch < 2.6 read them the same way."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def _let_trainer_read_its_checkpoints() -> list[str]:
    import recbole
    from recbole.trainer import trainer as trainer_module

    if (_version_tuple(torch.__version__) < (2, 6)
            or _version_tuple(recbole.__version__) > _LAST_RECBOLE_SHIMMED
            or isinstance(trainer_module.torch, _TorchReadingRecBoleCheckpoints)):
        return []
    trainer_module.torch = _TorchReadingRecBoleCheckpoints()
    return ["recbole.trainer.trainer.torch.load"]


def apply_compat_shims() -> list[str]:
    """Make RecBole 1.2.1 work under NumPy 2, pandas 3 and torch >= 2.6; returns the names it patched
    this call.

    Idempotent (a second call patches nothing and returns ``[]``), and each patch applies only where
    its problem exists: the NumPy aliases only where NumPy lacks them, the ``_fill_nan`` replacement
    only with pandas >= 3, the trainer's checkpoint loading only with torch >= 2.6, the last two only
    for RecBole <= 1.2.1. RecBole needs no ``pkg_resources`` (setuptools >= 81 dropped it), so no
    stand-in is installed: a fake one would mislead other packages probing for it.
    """
    restored = _restore_numpy_aliases()  # first: RecBole's Config needs them
    return restored + _patch_fill_nan_for_pandas3() + _let_trainer_read_its_checkpoints()


try:
    apply_compat_shims()
    from recbole.model.abstract_recommender import SequentialRecommender
    from recbole.utils import InputType
except ImportError as e:  # pragma: no cover - exercised only without RecBole
    raise ImportError("blossomrec_cuda.rec.recbole_adapter needs RecBole: `pip install recbole` "
                      f"(importing it failed with: {e})") from e

from ..attention import LEGACY_SPARSE_NAMES, SPARSE_NAMES
from .model import build_model


def _get(config: Any, key: str, default: Any) -> Any:
    """RecBole's Config answers None for a missing key, a plain dict raises KeyError: accept both."""
    try:
        value = config[key]
    except KeyError:
        value = None
    return default if value is None else value


class BlossomRec(SequentialRecommender):
    """RecBole model around :class:`blossomrec_cuda.rec.model.BlossomRec` (``attention: dense``
    gives SASRec). RecBole's item ids already use 0 for padding and right-pad ``item_seq``, the layout
    the model expects; RecBole's ``n_items`` counts the padding id, so the model holds
    ``n_items - 1`` items and every score tensor here has RecBole's ``n_items`` columns."""

    input_type = InputType.POINTWISE  # one positive target per sequence, no negatives

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        loss_type = _get(config, "loss_type", "CE")
        if loss_type != "CE":
            raise ValueError(f"BlossomRec trains with cross-entropy over all items; set "
                             f"loss_type: CE (got {loss_type!r})")
        neg_sampling = _get(config, "train_neg_sample_args", {}).get("distribution", "none")
        if neg_sampling != "none":
            raise ValueError("BlossomRec's cross-entropy over all items uses no negative samples; "
                             "set train_neg_sample_args: None (RecBole samples "
                             f"{neg_sampling!r} negatives by default)")
        # The op's names, or (deprecated) the names before 0.2.0.
        sparse = {k: _get(config, k, None) for k in SPARSE_NAMES + tuple(LEGACY_SPARSE_NAMES)}
        self.model = build_model(
            num_items=self.n_items - 1,
            attention=_get(config, "attention", "blossom"),
            backend=_get(config, "attention_backend", "ops"),
            hidden=_get(config, "hidden_size", 128), heads=_get(config, "n_heads", 8),
            kv_heads=_get(config, "n_kv_heads", 2), layers=_get(config, "n_layers", 2),
            inner=_get(config, "inner_size", 256), dropout=_get(config, "hidden_dropout_prob", 0.2),
            sparse_kwargs={k: v for k, v in sparse.items() if v is not None})

    def forward(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """``item_seq [B, N]`` right-padded, ``item_seq_len [B]`` -> ``[B, hidden]``."""
        return self.model.encode(item_seq, item_seq_len)

    def calculate_loss(self, interaction: Any) -> Tensor:
        """Cross-entropy over all items of the next item ``interaction[POS_ITEM_ID] [B]``: ``[]``."""
        return self.model.loss(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                               interaction[self.POS_ITEM_ID])

    def predict(self, interaction: Any) -> Tensor:
        """Scores of the candidates ``interaction[ITEM_ID] [B]`` only (sampled evaluation): ``[B]``."""
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = self.model.item_embedding(interaction[self.ITEM_ID])
        return (hidden * items).sum(dim=-1)

    def full_sort_predict(self, interaction: Any) -> Tensor:
        """Scores of every item: ``[B, n_items]``, column ``i`` = item id ``i``; column 0 (padding)
        holds the dtype's minimum, so it is never recommended."""
        scores = self.model(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pad = torch.full_like(scores[:, :1], torch.finfo(scores.dtype).min)
        return torch.cat([pad, scores], dim=1)


BlossomRecRecBole = BlossomRec  # the name up to 0.2.0; old scripts and imports keep working


def run_blossomrec(dataset: Optional[str] = None,
                   config_file_list: Optional[Sequence[str]] = None,
                   config_dict: Optional[dict] = None, saved: bool = True,
                   model: type = BlossomRec) -> dict:
    """Train and test ``model`` the way ``recbole.quick_start.run_recbole`` does for a built-in model
    (RecBole's custom-model flow): Config, seed, logger, ``create_dataset``, ``data_preparation``,
    ``Trainer.fit`` with validation-based early stopping, ``Trainer.evaluate`` on the test split.

    ``dataset`` is a RecBole dataset name (downloaded on first use, e.g. "ml-100k") or the name of a
    folder ``<data_path>/<dataset>/`` holding ``<dataset>.inter``; later config sources override
    earlier ones (RecBole's rule: files, then ``config_dict``, then the command line). Returns
    run_recbole's dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result`` (metric name -> value in [0, 1]).
    """
    from logging import getLogger

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_logger, init_seed

    config = Config(model=model, dataset=dataset, config_file_list=list(config_file_list or []),
                    config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    data = create_dataset(config)
    logger.info(data)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    recommender = model(config, train_data.dataset).to(config["device"])
    logger.info(recommender)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, recommender)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    test_result = trainer.evaluate(test_data, load_best_model=saved,
                                   show_progress=config["show_progress"])
    logger.info(f"best valid: {best_valid_result}")
    logger.info(f"test result: {test_result}")
    return {"best_valid_score": best_valid_score,
            "valid_score_bigger": config["valid_metric_bigger"],
            "best_valid_result": best_valid_result, "test_result": test_result}
