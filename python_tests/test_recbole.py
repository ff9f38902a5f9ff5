"""The RecBole adapter (blossomrec_cuda.rec.recbole_adapter) inside RecBole itself: its compatibility
shims, training and evaluation through RecBole's custom-model flow and through run_blossomrec with the
example config, and the SequentialRecommender scoring API. Runs where RecBole is installed, on CPU,
on a small generated dataset (no downloads); skips elsewhere."""
from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("recbole", reason="RecBole is an optional dependency: pip install recbole")

from recbole.config import Config  # noqa: E402  (after the skip: RecBole may be absent)
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from blossomrec_cuda.rec.recbole_adapter import (BlossomRec, BlossomRecRecBole,  # noqa: E402
                                                  apply_compat_shims, run_blossomrec)

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "recbole" / "blossomrec.yaml"
NUM_ITEMS = 40

# A small model whose blocks fit sequences of 16: compressed blocks of 8 every 4 keys, selection
# blocks of 4, so both the selected-block and the window branches of the op do work.
TINY_MODEL = {"hidden_size": 32, "n_heads": 2, "n_kv_heads": 1, "inner_size": 64, "n_layers": 1,
              "MAX_ITEM_LIST_LENGTH": 16, "compress_block_size": 8, "compress_stride": 4,
              "select_block": 4, "num_select": 2, "window": 4}


def write_cyclic_dataset(root: Path, name: str = "cyclic", users: int = 100) -> None:
    """``root/name/name.inter``: each user walks the item ids in order (40 follows 1) from a random
    start, 8-20 steps. The next item is a function of the last one, so a model that learns anything
    ranks it first, and random ranking gets Recall@10 = 10/40 at best."""
    rng = random.Random(0)
    (root / name).mkdir(parents=True)
    with open(root / name / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user in range(users):
            item = rng.randint(1, NUM_ITEMS)
            for t in range(rng.randint(8, 20)):
                f.write(f"{user}\t{item}\t{t}\n")
                item = item % NUM_ITEMS + 1


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd for RecBole's log/, log_tensorboard/ and saved/ folders, and the state RecBole changes
    for the whole process put back afterwards: Config sets CUDA_VISIBLE_DEVICES (empty = no GPU for
    later tests), init_logger adds handlers to the root logger."""
    monkeypatch.chdir(tmp_path)
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    handlers = list(logging.getLogger().handlers)
    yield tmp_path
    if cuda_visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()


def tiny_config(root: Path, dataset: str = "cyclic", **overrides) -> dict:
    return {"data_path": str(root), "dataset": dataset, "use_gpu": False, "seed": 1,
            "train_neg_sample_args": None, "epochs": 3, "train_batch_size": 64,
            "eval_batch_size": 256, "learning_rate": 3e-3,
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
            "metrics": ["Recall", "MRR", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
            "show_progress": False, "state": "ERROR", "checkpoint_dir": str(root / "saved"),
            **TINY_MODEL, **overrides}


def assert_metrics(result: dict) -> None:
    assert set(result) == {"recall@10", "mrr@10", "ndcg@10"}, result
    for name, value in result.items():
        assert 0.0 <= value <= 1.0, (name, value)
    assert result["mrr@10"] <= result["ndcg@10"] <= result["recall@10"], result


def test_shims_are_idempotent_and_let_recbole_configure(workdir):
    """RecBole 1.2.1's Config reads np.float_, np.complex_ and np.unicode_ (removed in NumPy 2): the
    adapter's import restored them, so a Config builds; applying the shims again changes nothing."""
    for name, value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        assert getattr(np, name) is value
    assert apply_compat_shims() == []
    write_cyclic_dataset(workdir)
    config = Config(model=BlossomRec, config_dict=tiny_config(workdir))
    assert config["model"] == "BlossomRec" and BlossomRecRecBole is BlossomRec


def test_missing_float_is_filled_with_the_column_mean(workdir):
    """Under pandas 3 RecBole's in-place fillna is a no-op; the adapter's _fill_nan fills a missing
    rating with the mean of the others (4, 2, 5, 3 -> 3.5) and a missing timestamp likewise."""
    (workdir / "gaps").mkdir()
    (workdir / "gaps" / "gaps.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t1\t4\t1\n1\t2\t\t2\n1\t3\t2\t\n2\t1\t5\t1\n2\t3\t3\t3\n")
    config = Config(model=BlossomRec, config_dict=tiny_config(
        workdir, dataset="gaps", load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]},
        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)"))
    inter = create_dataset(config).inter_feat
    assert inter["rating"].tolist() == [4.0, 3.5, 2.0, 5.0, 3.0]
    assert inter["timestamp"].tolist() == [1.0, 2.0, 1.75, 1.0, 3.0]


@pytest.mark.parametrize("attention", ["blossom", "dense"])
def test_trains_and_scores_through_recbole_custom_model_flow(workdir, attention):
    """Config(model=BlossomRec) -> create_dataset -> data_preparation -> Trainer: the loss falls every
    epoch, the test metrics beat random ranking by far, and the three scoring methods agree:
    full_sort_predict is [B, n_items] with the padding column at the minimum, predict(item) equals
    full_sort_predict at that item."""
    write_cyclic_dataset(workdir)
    config = Config(model=BlossomRec, config_dict=tiny_config(workdir, attention=attention))
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    model = BlossomRec(config, train.dataset)
    assert model.n_items == NUM_ITEMS + 1 and model.model.num_items == NUM_ITEMS
    trainer = Trainer(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    losses = [trainer.train_loss_dict[epoch] for epoch in range(config["epochs"])]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert_metrics(result)
    assert result["recall@10"] > 0.6, result  # random ranking: at most 0.25

    interaction = next(iter(test))[0]
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        batch = interaction[model.ITEM_SEQ].shape[0]
        assert scores.shape == (batch, model.n_items)
        assert torch.isfinite(scores[:, 1:]).all()
        assert (scores[:, 0] == torch.finfo(scores.dtype).min).all()
        for candidates in (interaction[model.POS_ITEM_ID], torch.randint(1, model.n_items, (batch,))):
            sampled = Interaction({model.ITEM_SEQ: interaction[model.ITEM_SEQ],
                                   model.ITEM_SEQ_LEN: interaction[model.ITEM_SEQ_LEN],
                                   model.ITEM_ID: candidates})
            expected = scores.gather(1, candidates[:, None]).squeeze(1)
            torch.testing.assert_close(model.predict(sampled), expected, rtol=1e-5, atol=1e-5)


def test_run_blossomrec_with_the_example_config(workdir):
    """run_blossomrec, the example yaml, and the paper's sampled evaluation (uni100, which scores
    through predict), shrunk to the tiny model and three epochs. saved=True: the test split is scored
    by the best checkpoint, which RecBole writes and reads back (under torch >= 2.6 only through the
    adapter's shim)."""
    write_cyclic_dataset(workdir)
    overrides = tiny_config(workdir)
    del overrides["eval_args"]  # the example's: leave-one-out by time, 100 negatives
    result = run_blossomrec(config_file_list=[str(EXAMPLE_CONFIG)], config_dict=overrides)
    assert len(list((workdir / "saved").glob("BlossomRec-*.pth"))) == 1
    assert set(result) == {"best_valid_score", "valid_score_bigger", "best_valid_result",
                           "test_result"}
    assert_metrics(result["test_result"])
    assert result["best_valid_score"] == result["best_valid_result"]["ndcg@10"]
    assert result["test_result"]["recall@10"] > 0.6, result  # random ranking: 10/101 in uni100


@pytest.mark.parametrize("overrides,message", [
    ({"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
     "set train_neg_sample_args: None"),
    ({"loss_type": "BPR"}, "set loss_type: CE"),
])
def test_rejects_configs_that_do_not_train_with_cross_entropy(workdir, overrides, message):
    write_cyclic_dataset(workdir)
    config = Config(model=BlossomRec, config_dict=tiny_config(workdir, **overrides))
    dataset = create_dataset(config)
    with pytest.raises(ValueError, match=message):
        BlossomRec(config, dataset)
