"""The recommender as a library and a command: --help with a default on every flag, the --out JSON
and the stdout summary, checkpoints that load with weights_only=True and carry the item ids and the
model config, BlossomRec.from_checkpoint, model.recommend on raw ids, padding and id-range errors,
RecBole .inter files. Everything on the CPU, on a tiny model (a few seconds of training in all)."""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blossomrec_cuda import BlossomAttention
from blossomrec_cuda.attention import SPARSE_NAMES
from blossomrec_cuda.rec import data as D
from blossomrec_cuda.rec.model import BlossomRec, SASRec, build_model
from blossomrec_cuda.rec.train import (Runtime, TrainConfig, _model_scorer, build_parser, evaluate,
                                       load_data, main, parse_args, run)

SPARSE = dict(compress_block_size=8, compress_stride=4, select_block=4, num_select=2, window=4)
TINY = TrainConfig(max_users=120, hidden=32, heads=2, kv_heads=1, layers=1, inner=64, max_len=20,
                   epochs=2, batch_size=128, eval_batch_size=256, progress=False, device="cpu",
                   sparse=SPARSE)
TINY_ARGV = ["--max-users", "120", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--layers",
             "1", "--inner", "64", "--max-len", "20", "--epochs", "2", "--batch-size", "128",
             "--eval-batch-size", "256", "--device", "cpu", "--no-progress",
             "--compress-block-size", "8", "--compress-stride", "4", "--select-block", "4",
             "--num-select", "2", "--window", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of the command with --out and --checkpoint-dir; its stdout, files and config."""
    root = tmp_path_factory.mktemp("trained")
    out, ckpt_dir = root / "result.json", root / "ckpt"
    argv = TINY_ARGV + ["--out", str(out), "--checkpoint-dir", str(ckpt_dir)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return SimpleNamespace(stdout=stdout.getvalue(), out=out, ckpt=ckpt_dir / "checkpoint.pt",
                           cfg=parse_args(argv), result=json.loads(out.read_text()))


# --------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------
def _help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help entry in ``--help`` output, whitespace collapsed."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = [line]
        elif current is not None and line.startswith("    "):
            entries[current].append(line)
        else:
            current = None
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}


def test_every_flag_has_help_a_default_and_a_group():
    parser = build_parser()
    entries = _help_entries(parser.format_help())
    actions = [a for a in parser._actions if a.dest != "help"]
    assert len(actions) >= 34
    grouped = {a.dest for g in parser._action_groups if g.title not in ("options", "positional "
               "arguments") for a in g._group_actions}
    config_defaults = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    module_defaults = inspect.signature(BlossomAttention.__init__).parameters
    for action in actions:
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 10, flag
        assert action.dest in grouped, f"{flag} is not in a named group"
        entry = entries[flag]
        assert "default" in entry, f"{flag}: {entry}"
        if action.dest in SPARSE_NAMES:
            assert f"(default: {module_defaults[action.dest].default})" in entry, entry
        elif config_defaults.get(action.dest) not in (None, False):
            assert f"(default: {config_defaults[action.dest]})" in entry, entry
    # one flag per TrainConfig field (progress is --no-progress, sparse the BlossomAttention group)
    dests = {a.dest for a in actions}
    assert set(config_defaults) - {"progress", "sparse"} <= dests
    assert set(SPARSE_NAMES) <= dests and "no_progress" in dests
    assert parse_args([]) == TrainConfig()  # the flags' defaults are the config's


@pytest.mark.parametrize("argv,message", [
    (["--heads", "3"], "error: hidden (128) must be a multiple of heads (3)"),
    (["--select-block", "5"], "error: select_block (5) must be a positive multiple of "
                              "compress_stride (16)"),
    (["--format", "parquet"], "error: argument --format: invalid choice: 'parquet'"),
])
def test_model_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# --out and the summary
# --------------------------------------------------------------------------------------------------
def test_stdout_is_a_summary_and_out_has_the_full_result(trained):
    lines = trained.stdout.splitlines()
    for line in lines:  # no JSON on stdout any more, and nothing a terminal would wrap much
        assert not line.lstrip().startswith(("{", "[")) and len(line) < 200, line
    result = trained.result
    assert result["model"] == "BlossomRec" and result["config"]["out"] == str(trained.out)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for name, metrics in (("BlossomRec", result["test"]), ("Popularity", result["popularity"])):
        for protocol, label in (("sampled", "sampled (100 neg)"), ("full", "full ranking")):
            m = metrics[protocol]
            row = (f"| {name} | {label} | {m['recall@10']:.4f} | {m['mrr@10']:.4f} | "
                   f"{m['ndcg@10']:.4f} |")
            assert row in lines, (row, trained.stdout)
    assert f"result: {trained.out}" in lines
    assert f"checkpoint: {trained.ckpt} (BlossomRec.from_checkpoint)" in lines
    assert lines[0].startswith(f"synthetic: {result['users']} users, {result['items']} items")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def test_checkpoint_loads_weights_only_with_item_ids_and_config(trained):
    ckpt = torch.load(trained.ckpt, weights_only=True)
    data = load_data(trained.cfg)
    assert ckpt["item_ids"] == data.raw_item_ids and len(ckpt["item_ids"]) == data.num_items
    assert ckpt["max_len"] == 20 and ckpt["dataset"] == "synthetic"
    assert ckpt["model_config"] == dict(
        num_items=data.num_items, attention="blossom", backend="ops", hidden=32, heads=2,
        kv_heads=1, layers=1, inner=64, dropout=0.2, sparse_kwargs={**SPARSE, "power_block": 1})
    numpy_state = ckpt["rng"]["numpy"]
    assert isinstance(numpy_state["keys"], torch.Tensor) and numpy_state["keys"].numel() == 624
    assert ckpt["config"]["checkpoint_dir"] == str(trained.ckpt.parent)


def test_a_checkpoint_with_numpy_objects_is_refused_clearly(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"config": {}, "rng": {"numpy": np.random.get_state()}}, old / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"does not load with torch.load\(weights_only=True\)"):
        run(replace(TINY, epochs=1, checkpoint_dir=str(old), resume=True))
    with pytest.raises(ValueError, match=r"weights_only=True"):
        BlossomRec.from_checkpoint(old)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of the training command"):
        BlossomRec.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no checkpoint at"):
        BlossomRec.from_checkpoint(tmp_path / "absent.pt")


def test_from_checkpoint_gives_the_trained_model(trained):
    model = BlossomRec.from_checkpoint(trained.ckpt)
    assert type(model) is BlossomRec and not model.training
    assert model.item_embedding.weight.device.type == "cpu" and model.max_len == 20
    # the same numbers as the run's own test evaluation of its best model
    cfg = trained.cfg
    data = load_data(cfg)
    split = D.leave_one_out(data)
    negatives = D.sample_negatives(data, [u for u, _, _ in split.test], 100, seed=cfg.seed + 1)
    test = evaluate(_model_scorer(model, contextlib.nullcontext), split.test, negatives,
                    data.num_items, cfg.max_len, 256, Runtime(torch.device("cpu")))
    for protocol in ("sampled", "full"):
        for name, value in trained.result["test"][protocol].items():
            assert test[protocol][name] == pytest.approx(value, abs=1e-6), (protocol, name)
    # and the same scores as the architecture rebuilt by hand with the best weights
    ckpt = torch.load(trained.ckpt, weights_only=True)
    by_hand = build_model(data.num_items, hidden=32, heads=2, kv_heads=1, layers=1, inner=64,
                          sparse_kwargs=SPARSE).eval()
    by_hand.load_state_dict(ckpt["best_model"])
    items, lengths = D.pad_batch([h for _, h, _ in split.test[:16]], 20)
    with torch.no_grad():
        expected = by_hand(items, lengths)
        torch.testing.assert_close(model(items, lengths), expected, rtol=0, atol=0)
        reference = BlossomRec.from_checkpoint(trained.ckpt.parent, backend="reference")
        torch.testing.assert_close(reference(items, lengths), expected, rtol=1e-4, atol=1e-4)
    last = BlossomRec.from_checkpoint(trained.ckpt, weights="last")
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in last.state_dict().items())
    with pytest.raises(ValueError, match="holds a BlossomRec"):
        SASRec.from_checkpoint(trained.ckpt)


def test_from_checkpoint_builds_sasrec_for_a_dense_run(tmp_path):
    result = run(replace(TINY, attention="dense", epochs=1, checkpoint_dir=str(tmp_path)))
    for loader in (BlossomRec.from_checkpoint, SASRec.from_checkpoint):
        model = loader(tmp_path / "checkpoint.pt")
        assert type(model) is SASRec and model.attention_kind == "dense"
        assert not any(isinstance(m, BlossomAttention) for m in model.modules())
        assert model.num_items == result["items"]


# --------------------------------------------------------------------------------------------------
# recommend
# --------------------------------------------------------------------------------------------------
def test_recommend_takes_and_returns_raw_ids(trained):
    model = BlossomRec.from_checkpoint(trained.ckpt)
    data = load_data(trained.cfg)
    raw = [[data.raw_item_ids[i - 1] for i in seq] for seq in data.sequences[:5]]
    top = model.recommend(raw, k=10)
    assert len(top) == 5
    for history, row in zip(raw, top):
        assert len(row) == 10 and len(set(row)) == 10
        assert set(row) <= set(data.raw_item_ids) and not set(row) & set(history)
    # the same as ranking the model's scores by hand, seen items masked
    indices = [[model.index_of(r) for r in h] for h in raw]
    items, lengths = D.pad_batch(indices, 20)
    with torch.no_grad():
        scores = model(items, lengths)
    for b, h in enumerate(indices):
        scores[b, torch.tensor(h) - 1] = -torch.inf
    assert top == [[data.raw_item_ids[c] for c in row] for row in scores.topk(10).indices.tolist()]
    # without exclusion the history's items compete; ints find the same string ids
    plain = model.recommend(raw, k=10, exclude_seen=False)
    with torch.no_grad():
        order = model(items, lengths).topk(10).indices.tolist()
    assert plain == [[data.raw_item_ids[c] for c in row] for row in order]
    assert model.recommend([[int(r) for r in raw[0]]], k=10) == top[:1]
    # all items asked for: every item not in the history, once
    everything = model.recommend(raw[:1], k=model.num_items)[0]
    assert sorted(everything) == sorted(set(data.raw_item_ids) - set(raw[0]))
    # only the last max_len items are read
    long_history = raw[0] + raw[1] + raw[2]
    assert len(long_history) > 20
    assert model.recommend([long_history], k=5, exclude_seen=False) == \
        model.recommend([long_history[-20:]], k=5, exclude_seen=False)


def test_recommend_errors_and_a_model_without_item_ids():
    model = BlossomRec(30, hidden=32, heads=2, kv_heads=1, layers=1, inner=64, **SPARSE).train()
    top = model.recommend([[3, 1, 2], [30]], k=4)
    assert model.training  # the caller's mode is kept
    assert [len(r) for r in top] == [4, 4] and not set(top[0]) & {1, 2, 3} and 30 not in top[1]
    assert all(isinstance(i, int) and 1 <= i <= 30 for r in top for i in r)
    with pytest.raises(ValueError, match=r"histories\[1\]: this model has no item_ids, so raw ids "
                                         r"are its indices 1\.\.30; got 31"):
        model.recommend([[1], [31]], k=3)
    model.set_item_ids([f"i{n}" for n in range(30)])
    assert model.recommend([["i2", "i0", "i1"]], k=4) == [[f"i{c - 1}" for c in top[0]]]
    with pytest.raises(ValueError, match=r"histories\[0\]: unknown item id 'nope'"):
        model.recommend([["nope"]], k=3)
    with pytest.raises(ValueError, match=r"histories\[0\] is empty"):
        model.recommend([[]], k=3)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.30"):
        model.recommend([["i1"]], k=31)
    for k in (2.5, "10", None):  # were torch's topk() or a comparison error
        with pytest.raises(TypeError, match=r"k must be an int, got "):
            model.recommend([["i1"]], k=k)
    with pytest.raises(ValueError, match="names 2 items, the model has 30"):
        model.set_item_ids(["a", "b"])


# --------------------------------------------------------------------------------------------------
# Padding and item id range
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention,backend", [("blossom", "ops"), ("blossom", "reference"),
                                               ("dense", "ops")])
def test_left_padded_batches_are_supported_and_never_silently_misread(attention, backend):
    model = build_model(50, attention, backend, hidden=32, heads=2, kv_heads=1, layers=2,
                        inner=64, dropout=0.0, sparse_kwargs=SPARSE).eval()
    histories = [list(torch.randint(1, 51, (n,)).tolist()) for n in (19, 7, 1)]
    right, lengths = D.pad_batch(histories, 20)
    left = torch.zeros_like(right)
    for b, h in enumerate(histories):
        left[b, right.shape[1] - len(h):] = torch.tensor(h)
    with torch.no_grad():
        torch.testing.assert_close(model(left, lengths, padding_side="left"),
                                   model(right, lengths), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"items row 1 is left-padded .* but padding_side is "
                                         r"'right'; pass padding_side='left'"):
        model(left, lengths)
    with pytest.raises(ValueError, match=r"items row 1 is right-padded .* pass "
                                         r"padding_side='right'"):
        model(right, lengths, padding_side="left")
    short = lengths.clone()
    short[0] = 5
    with pytest.raises(ValueError, match=r"items row 0 .* disagrees with lengths\[0\] = 5: with "
                                         r"padding_side='right' its first 5 positions"):
        model(right, short)
    with pytest.raises(ValueError, match="padding_side must be one of"):
        model(right, lengths, padding_side="middle")


def test_out_of_range_item_ids_say_the_valid_range():
    model = BlossomRec(50, hidden=32, heads=2, kv_heads=1, layers=1, inner=64, **SPARSE)
    items = torch.tensor([[1, 2, 51], [4, 0, 0]])
    lengths = torch.tensor([3, 1])
    with pytest.raises(ValueError, match=r"item ids must be in 0\.\.50 \(1\.\.50: the model's "
                                         r"items, 0: padding\), got 51;"):
        model(items, lengths)
    items[0, 2] = -3
    with pytest.raises(ValueError, match=r"item ids must be in 0\.\.50 .*got -3"):
        model.encode(items, lengths)
    items[0, 2] = 3
    with pytest.raises(ValueError, match=r"targets must be item ids in 1\.\.50, got values from "
                                         r"0 to 50"):
        model.loss(items, lengths, torch.tensor([0, 50]))
    with pytest.raises(TypeError, match=r"items must be a \[B, N\] int64"):
        model(items.float(), lengths)
    assert model.loss(items, lengths, torch.tensor([1, 50])).isfinite()


# --------------------------------------------------------------------------------------------------
# RecBole .inter files
# --------------------------------------------------------------------------------------------------
def _write_inter(path: Path, rows: list[tuple[str, str, float]]) -> None:
    with open(path, "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t4.0\t{t}\n" for u, i, t in rows)


def test_read_recbole_inter_groups_by_user_and_orders_by_time(tmp_path):
    path = tmp_path / "tiny.inter"
    # users interleave; u1 has two rows at t=5 (file order kept) and one earlier at t=1.5
    _write_inter(path, [("u1", "a", 5), ("u2", "b", 3), ("u1", "c", 1.5), ("u1", "d", 5),
                        ("u2", "a", 1), ("u3", "e", 7)])
    data = D.load_dataset(str(path))  # auto: the .inter extension
    assert D.detect_format(str(path)) == "recbole" and data.name == "tiny"
    assert [[data.raw_item_ids[i - 1] for i in s] for s in data.sequences] == [
        ["c", "a", "d"], ["a", "b"], ["e"]]
    assert data.num_items == 5 and data.num_interactions == 6
    assert D.load_dataset(str(path), max_users=2).num_users == 2
    # a RecBole dataset folder NAME/NAME.inter, and --format recbole for any file name
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "tiny.inter").write_text(path.read_text())
    assert D.load_dataset(str(folder)).sequences == data.sequences
    (tmp_path / "tiny.txt").write_text(path.read_text())
    assert D.load_dataset(str(tmp_path / "tiny.txt"), "recbole").sequences == data.sequences
    # without a timestamp column: file order
    (tmp_path / "notime.inter").write_text("item_id:token\tuser_id:token\nx\t1\ny\t2\nz\t1\n")
    plain = D.load_dataset(str(tmp_path / "notime.inter"))
    assert [[plain.raw_item_ids[i - 1] for i in s] for s in plain.sequences] == [["x", "z"], ["y"]]


def test_read_recbole_inter_errors(tmp_path):
    bad = tmp_path / "bad.inter"
    bad.write_text("user:token\titem:token\n1\t2\n")
    with pytest.raises(ValueError, match=r"bad.inter: a RecBole .inter file starts with .*user_id "
                                         r"and item_id"):
        D.load_dataset(str(bad))
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n")
    with pytest.raises(ValueError, match=r"bad.inter:3: expected 3 tab-separated fields"):
        D.load_dataset(str(bad))
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tlater\n")
    with pytest.raises(ValueError, match=r"bad.inter:2: timestamp must be a number, got 'later'"):
        D.load_dataset(str(bad))


def test_training_command_reads_an_inter_file(tmp_path):
    synthetic = D.synthetic_dataset(num_users=60, num_items=40, seed=2)
    rows = [(f"user{u}", f"item{i}", float(t)) for u, seq in enumerate(synthetic.sequences)
            for t, i in enumerate(seq)]
    rows = [rows[j] for j in np.random.default_rng(0).permutation(len(rows))]  # time sorts them
    path = tmp_path / "syn.inter"
    _write_inter(path, rows)
    out = tmp_path / "r.json"
    argv = ["--data", str(path), "--max-len", "20", "--epochs", "1", "--num-negatives", "5",
            "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--layers", "1", "--inner", "64",
            "--device", "cpu", "--no-progress", "--out", str(out), "--checkpoint-dir",
            str(tmp_path / "ckpt")] + TINY_ARGV[-10:]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "syn" and result["users"] == 60
    assert result["interactions"] == synthetic.num_interactions
    model = BlossomRec.from_checkpoint(tmp_path / "ckpt")
    assert set(model.item_ids) == {f"item{i}" for i in range(1, 41)} & {r[1] for r in rows}
    assert all(r.startswith("item") for r in model.recommend([["item1", "item2"]], k=3)[0])
