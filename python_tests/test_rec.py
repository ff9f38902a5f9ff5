"""The recommender subpackage: data readers, split, metrics, the model, the training command
(checkpoint/resume, DistributedDataParallel) and a short run on real data."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blossomrec_cuda import BlossomAttention
from blossomrec_cuda.rec import data as D
from blossomrec_cuda.rec.metrics import metrics_from_ranks, rank_of_target
from blossomrec_cuda.rec.model import BlossomRec, SASRec, build_model
from blossomrec_cuda.rec.train import (Runtime, TrainConfig, evaluate, load_data, main, parse_args,
                                       run, _model_scorer)

REPO = Path(__file__).resolve().parents[1]

# a tiny model and slice so that a whole training run takes a few seconds on 2 CPU cores
TINY = TrainConfig(max_users=150, hidden=32, heads=2, kv_heads=1, layers=1, inner=64,
                   max_len=20, epochs=2, batch_size=128, eval_batch_size=256, progress=False,
                   device="cpu", sparse=dict(compress_block_size=8, compress_stride=4,
                                             select_block=4, num_select=2,
                                             window=4))


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def test_read_user_items(tmp_path):
    path = tmp_path / "seqs.txt"
    path.write_text("1 10 20 10\n2 30\n\n3 20 40 50 60\n")
    data = D.load_dataset(str(path))  # auto: a line with more than two tokens
    assert data.sequences == [[1, 2, 1], [3], [2, 4, 5, 6]]
    assert data.num_items == 6 and data.raw_item_ids == ["10", "20", "30", "40", "50", "60"]
    assert D.read_user_items(str(path), max_users=2).sequences == [[1, 2, 1], [3]]


def test_read_user_item_pairs(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("u1 7\nu2 8\nu1 9\nu1 7\nu2 9\n")
    assert D.detect_format(str(path)) == "user-item-pairs"
    data = D.load_dataset(str(path))
    # users in order of first appearance; item ids numbered user by user: 7, 9, then 8
    assert data.sequences == [[1, 2, 1], [3, 2]]
    assert D.load_dataset(str(path), max_users=1).sequences == [[1, 2, 1]]
    bad = tmp_path / "bad.txt"
    bad.write_text("u1 7\nu1 7 8\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        D.read_user_item_pairs(str(bad))


def test_read_movielens_sorts_by_timestamp(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n"
                    "1,100,4.0,30\n1,200,3.0,10\n2,100,5.0,5\n1,300,1.0,10\n2,400,2.0,1\n")
    data = D.load_dataset(str(tmp_path))  # a folder means its ratings.csv
    # user 1: 200 (t=10), 300 (t=10, later in the file), 100 (t=30); user 2: 400, 100
    assert [[data.raw_item_ids[i - 1] for i in s] for s in data.sequences] == [
        ["200", "300", "100"], ["400", "100"]]
    assert data.name == tmp_path.name
    (tmp_path / "broken.csv").write_text("user,item\n1,2\n")
    with pytest.raises(ValueError, match="missing"):
        D.load_dataset(str(tmp_path / "broken.csv"))
    with pytest.raises(ValueError, match="no dataset"):
        D.load_dataset(str(tmp_path / "absent.txt"))


# --------------------------------------------------------------------------------------------------
# Split, batches, negatives
# --------------------------------------------------------------------------------------------------
def test_leave_one_out_and_training_examples():
    data = D.InteractionData("t", [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], num_items=10)
    split = D.leave_one_out(data)
    assert split.train == [[1, 2, 3], [6, 7], [8]]
    assert split.valid == [(0, [1, 2, 3], 4), (2, [8], 9)]
    assert split.test == [(0, [1, 2, 3, 4], 5), (2, [8, 9], 10)]
    histories, targets = D.training_examples(split.train, max_len=2)
    assert histories == [[1], [1, 2], [6]] and targets == [2, 3, 7]
    items, lengths = D.pad_batch([[1, 2, 3], [4]], max_len=2)
    assert items.tolist() == [[2, 3], [4, 0]] and lengths.tolist() == [2, 1]


def test_sample_negatives_are_unseen_distinct_and_seeded():
    data = D.synthetic_dataset(num_users=50, num_items=300, seed=3)
    users = list(range(50))
    neg = D.sample_negatives(data, users, 100, seed=7)
    assert neg.shape == (50, 100)
    assert torch.equal(neg, D.sample_negatives(data, users, 100, seed=7))
    for u in users:
        row = set(neg[u].tolist())
        assert len(row) == 100 and not row & set(data.sequences[u])
        assert min(row) >= 1 and max(row) <= data.num_items
    with pytest.raises(ValueError, match="fewer"):
        D.sample_negatives(data, [0], data.num_items, seed=0)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def test_metrics_by_hand():
    got = metrics_from_ranks(torch.tensor([0, 1, 9, 10]), k=10)
    assert got["recall@10"] == pytest.approx(3 / 4)
    assert got["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 4)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)


def test_rank_of_target_ties_and_exclusion():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1],
                           [0.2, 0.2, 0.2, 0.2]])
    # row 0: target column 0; 0.9 beats it and the tie at column 2 counts against it
    # row 1: all equal -> last place, not first
    assert rank_of_target(scores, torch.tensor([0, 3])).tolist() == [2, 3]
    exclude = torch.tensor([[False, True, False, False], [True, True, True, True]])
    assert rank_of_target(scores, torch.tensor([0, 3]), exclude).tolist() == [1, 0]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def test_model_keeps_gate_init_and_is_padding_invariant():
    torch.manual_seed(0)
    model = BlossomRec(50, hidden=32, heads=2, kv_heads=1, layers=2, inner=64, dropout=0.0,
                       **TINY.sparse).eval()
    gates = [m.to_gates for m in model.modules() if isinstance(m, BlossomAttention)]
    assert len(gates) == 2
    for g in gates:  # the SASRec re-init must not touch the gate
        assert torch.equal(g.weight, torch.zeros_like(g.weight)) and g.bias.tolist() == [-2, 2] * 2
    assert torch.equal(model.item_embedding.weight[0], torch.zeros(32))
    seq = torch.randint(1, 51, (17,))
    alone = model(seq[None], torch.tensor([17]))
    batch = torch.zeros(3, 30, dtype=torch.long)
    batch[0, :30] = torch.randint(1, 51, (30,))
    batch[1, :17] = seq
    batch[2, :4] = seq[:4]
    scores = model(batch, torch.tensor([30, 17, 4]))
    assert scores.shape == (3, 50)
    torch.testing.assert_close(scores[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[2], model(seq[None, :4], torch.tensor([4]))[0], atol=1e-5,
                               rtol=1e-5)


def test_sasrec_is_the_dense_model():
    dense = SASRec(20, hidden=32, heads=2, kv_heads=1, layers=1, inner=64)
    assert dense.attention_kind == "dense"
    assert not any(isinstance(m, BlossomAttention) for m in dense.modules())
    assert isinstance(build_model(20, "dense", hidden=32, heads=2, kv_heads=1), SASRec)
    with pytest.raises(ValueError, match="attention must be one of"):
        BlossomRec(20, attention="sparse")


# --------------------------------------------------------------------------------------------------
# The training command
# --------------------------------------------------------------------------------------------------
def test_command_line_writes_table_json_and_jsonl(tmp_path, capsys):
    out, rows = tmp_path / "r.json", tmp_path / "rows.jsonl"
    argv = ["--max-users", "120", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--layers",
            "1", "--inner", "64", "--max-len", "20", "--epochs", "1", "--batch-size", "128",
            "--device", "cpu", "--no-progress", "--out", str(out), "--jsonl", str(rows),
            "--compress-stride", "4", "--compress-block-size", "8", "--select-block", "4"]
    assert parse_args(argv).sparse == dict(compress_stride=4, compress_block_size=8, select_block=4)
    assert main(argv) == 0
    assert main(argv + ["--attention", "dense"]) == 0
    printed = capsys.readouterr().out
    assert "| BlossomRec | sampled (100 neg) |" in printed and "| SASRec | full ranking |" in printed
    # the result record goes to the files only; stdout is the summary
    assert not any(line.startswith("{") for line in printed.splitlines())
    assert printed.count(f"result: {out}") == 2
    result = json.loads(out.read_text())
    assert result["model"] == "SASRec" and result["dataset"] == "synthetic"
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["model"] for r in lines] == ["BlossomRec", "SASRec"]
    for r in lines:
        for protocol in ("sampled", "full"):
            assert set(r["test"][protocol]) == {"recall@10", "mrr@10", "ndcg@10"}
            assert 0.0 <= r["test"][protocol]["ndcg@10"] <= r["test"][protocol]["recall@10"] <= 1.0


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    straight = run(replace(TINY, checkpoint_dir=str(tmp_path / "a")))
    first = run(replace(TINY, epochs=1, checkpoint_dir=str(tmp_path / "b")))
    assert first["history"][0]["train_loss"] == pytest.approx(
        straight["history"][0]["train_loss"], rel=1e-5)  # seeded: the same first epoch
    resumed = run(replace(TINY, checkpoint_dir=str(tmp_path / "b"), resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for a, b in zip(straight["history"], resumed["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    for protocol in ("sampled", "full"):
        for name, value in straight["test"][protocol].items():
            assert resumed["test"][protocol][name] == pytest.approx(value, abs=1e-3)
    with pytest.raises(ValueError, match="different"):
        run(replace(TINY, hidden=16, heads=1, checkpoint_dir=str(tmp_path / "b"), resume=True))


def test_early_stopping_stops_after_patience():
    # a learning rate of 0 never improves on the first evaluation
    result = run(replace(TINY, epochs=5, patience=2, lr=0.0))
    assert result["best_epoch"] == 1 and result["epochs_run"] == 3


def test_distributed_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes (gloo): trains, and its sharded, all-reduced evaluation equals a
    single-process evaluation of the saved best model."""
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "blossomrec_cuda.rec.train", "--max-users", "150", "--hidden", "32", "--heads",
           "2", "--kv-heads", "1", "--layers", "1", "--inner", "64", "--max-len", "20",
           "--epochs", "2", "--batch-size", "128", "--device", "cpu", "--no-progress",
           "--compress-stride", "4", "--compress-block-size", "8", "--select-block", "4",
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["epochs_run"] == 2
    # every epoch ended with bitwise equal replicas (checked across ranks by the command)
    assert [r["ranks_in_sync"] for r in result["history"]] == [True, True]
    assert all(r["examples_per_s"] > 0 for r in result["history"]) and result["examples_per_s"] > 0

    cfg = replace(TINY, max_users=150, sparse=dict(compress_stride=4, compress_block_size=8,
                                                   select_block=4))
    data = load_data(cfg)
    split = D.leave_one_out(data)
    negatives = D.sample_negatives(data, [u for u, _, _ in split.test], 100, seed=cfg.seed + 1)
    model = build_model(data.num_items, hidden=32, heads=2, kv_heads=1, layers=1, inner=64,
                        sparse_kwargs=cfg.sparse)
    model.load_state_dict(torch.load(tmp_path / "ckpt" / "checkpoint.pt",
                                     weights_only=True)["best_model"])
    model.eval()
    single = evaluate(_model_scorer(model, torch.no_grad), split.test, negatives, data.num_items,
                      cfg.max_len, 256, Runtime(torch.device("cpu")))
    for protocol in ("sampled", "full"):
        for name, value in single[protocol].items():
            assert result["test"][protocol][name] == pytest.approx(value, abs=1e-6)


def _torchrun(args: list, tmp_path, nproc: int, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_diverged_replicas_are_reported(tmp_path):
    """The per-epoch check of the training command raises, naming the rank, when one process's
    parameters differ from rank 0's by one bit."""
    script = tmp_path / "diverge.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from blossomrec_cuda.rec.model import build_model
        from blossomrec_cuda.rec.train import Runtime, _check_ranks_in_sync
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        model = build_model(50, hidden=32, heads=2, kv_heads=1, layers=1, inner=32)
        rt = Runtime(torch.device("cpu"), rank, world)
        assert _check_ranks_in_sync(model, rt, 1)
        if rank == 1:
            with torch.no_grad():
                w = model.item_embedding.weight.view(-1)
                w[3] = torch.nextafter(w[3], torch.tensor(float("inf")))
        try:
            _check_ranks_in_sync(model, rt, 2)
        except RuntimeError as e:
            assert "ranks [1]" in str(e) and "epoch 2" in str(e), e
            print("raised", rank)
        dist.destroy_process_group()
    """))
    proc = _torchrun([str(script)], tmp_path, 2, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("raised") == 2


def test_checkpoint_resumes_across_world_sizes(tmp_path):
    """A checkpoint written by 2 processes resumes in 1 and the other way round (issue 16's check,
    here with gloo on the CPU): the resumed run continues from the saved epoch."""
    common = ["--max-users", "120", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
              "--layers", "1", "--inner", "64", "--max-len", "20", "--batch-size", "128",
              "--device", "cpu", "--no-progress", "--compress-stride", "4",
              "--compress-block-size", "8", "--select-block", "4"]
    for first, second in ((2, 1), (1, 2)):
        ckpt = tmp_path / f"ckpt-{first}-{second}"
        out = tmp_path / f"r-{first}-{second}.json"
        args = ["-m", "blossomrec_cuda.rec.train", *common, "--checkpoint-dir", str(ckpt)]
        proc = _torchrun([*args, "--epochs", "1"], tmp_path, first)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = _torchrun([*args, "--epochs", "2", "--resume", "--out", str(out)], tmp_path, second)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout + proc.stderr
        result = json.loads(out.read_text())
        assert result["world_size"] == second and result["epochs_run"] == 2
        assert [r["epoch"] for r in result["history"]] == [1, 2]
        # the throughput is this run's (its one epoch), not the first run's
        assert result["examples_per_s"] == result["history"][1]["examples_per_s"]


def test_steady_throughput_leaves_out_the_first_epoch_of_this_run():
    from blossomrec_cuda.rec.train import _steady_throughput
    history = [{"epoch": e, "examples_per_s": 10.0 * e} for e in (1, 2, 3)]
    assert _steady_throughput(history, 1) == 25.0  # epochs 2 and 3
    assert _steady_throughput(history, 2) == 30.0  # resumed at 2: its first epoch left out
    assert _steady_throughput(history, 3) == 30.0  # one epoch: that one
    assert _steady_throughput(history, 4) is None


# --------------------------------------------------------------------------------------------------
# Evidence: a short run on real data learns and beats popularity
# --------------------------------------------------------------------------------------------------
def test_short_run_on_real_data_beats_popularity(shared_data):
    path = shared_data / "ml-latest-small" / "ratings.csv"
    # MovieLens latest-small, first 200 users (long histories): small blocks so that max_len 32
    # holds several selection blocks and both LTIS and STIS branches do work
    cfg = TrainConfig(data=str(path), max_users=200, hidden=64, heads=4, kv_heads=2, layers=1,
                      inner=128, max_len=32, epochs=3, batch_size=256, lr=2e-3, progress=False,
                      device="cpu", sparse=dict(compress_block_size=8, compress_stride=4,
                                                select_block=4, num_select=2,
                                                window=4))
    result = run(cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] - 0.5, losses
    model, pop = result["test"]["sampled"]["ndcg@10"], result["popularity"]["sampled"]["ndcg@10"]
    assert model > pop + 0.02, f"BlossomRec NDCG@10 {model:.4f} vs popularity {pop:.4f}"
    # the row names its machine and code (results files must say which card and commit made them)
    assert result["device_name"] == "cpu" and result["torch"] == torch.__version__
    assert result["commit"] and isinstance(result["commit"], str)


@pytest.mark.parametrize("argv,message", [
    (["--data", "missing.txt"], "error: no dataset at 'missing.txt'"),
    (["--epochs", "0"], "error: epochs must be >= 1, got 0"),
    (["--dropout", "1.5"], "error: dropout must be in [0, 1)"),
])
def test_command_line_errors_are_argparse_errors(argv, message, capsys):
    """Bad values and paths end the command with argparse's one `error:` line and exit status 2,
    before any data is read or model built, not with a traceback."""
    from blossomrec_cuda.rec.train import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sum(line.startswith("python -m blossomrec_cuda.rec.train: error:")
               for line in err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# The training step without host synchronisation (issue 14)
# --------------------------------------------------------------------------------------------------
def test_check_inputs_false_skips_the_host_checks():
    """check_inputs (default True) refuses ids that disagree with the lengths; False skips the
    check (it reads device values on the host) and scores the batch as given."""
    torch.manual_seed(0)
    model = BlossomRec(num_items=30, hidden=32, heads=2, kv_heads=1, layers=1, dropout=0.0,
                       compress_stride=4, select_block=8, num_select=2).eval()
    items = torch.tensor([[0, 0, 3, 4, 5]])  # left-padded
    lengths = torch.tensor([3])
    with pytest.raises(ValueError, match="left-padded"):
        model(items, lengths)  # padding_side defaults to right
    model.check_inputs = False
    assert model(items, lengths).shape == (1, 30)
    with pytest.raises(ValueError, match="padding_side"):
        model(items, lengths, padding_side="middle")  # argument checks stay


def _tiny_model(device):
    torch.manual_seed(0)
    return BlossomRec(num_items=40, hidden=32, heads=2, kv_heads=1, layers=2, dropout=0.0,
                      compress_stride=4, select_block=8, num_select=2).to(device)


def _tiny_batch(device, lengths_device):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([24, 9, 1, 17])
    items = torch.zeros(4, 24, dtype=torch.long)
    for b, L in enumerate(lengths.tolist()):
        items[b, :L] = torch.randint(1, 41, (L,), generator=g)
    targets = torch.randint(1, 41, (4,), generator=g)
    return items.to(device), lengths.to(lengths_device), targets.to(device)


@pytest.mark.cuda
def test_eager_training_step_does_not_synchronise():
    """One eager training step (forward, backward, Adam) of the model with host lengths and
    check_inputs off makes no host synchronisation (torch.cuda.set_sync_debug_mode raises on
    one), as the training command runs it."""
    model = _tiny_model("cuda")
    model.check_inputs = False
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    items, lengths, targets = _tiny_batch("cuda", "cpu")
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(items, lengths).float(), targets - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):  # warm-up: first calls allocate, build caches, load kernels
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode does catch a synchronisation
            torch.ones(1, device="cuda").item()
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()


@pytest.mark.cuda
def test_training_step_captured_in_a_cuda_graph_equals_eager():
    """The whole training step (forward, backward, Adam with capturable=True) captured in one CUDA
    graph and replayed on new data gives the parameters one eager step gives from the same state
    (capture fails if anything in the step synchronises with the host)."""
    model = _tiny_model("cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    items, lengths, targets = _tiny_batch("cuda", "cuda")

    def step(m, o, x, n, t):
        o.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x, n).float(), t - 1)
        loss.backward()
        o.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(model, opt, items, lengths, targets)
    torch.cuda.current_stream().wait_stream(s)
    twin = _tiny_model("cuda")
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt, items, lengths, targets)
    # New data into the static inputs (same lengths: the graph's shapes), then one replay.
    new_items, _, new_targets = _tiny_batch("cuda", "cuda")
    new_items = torch.where(new_items > 0, (new_items % 40) + 1, new_items)
    items.copy_(new_items)
    targets.copy_((new_targets % 40) + 1)
    graph.replay()
    step(twin, twin_opt, items.clone(), lengths.clone(), targets.clone())
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
