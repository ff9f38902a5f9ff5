"""Train and evaluate BlossomRec (or SASRec) with the paper's protocol.

    python -m blossomrec_cuda.rec.train                       # synthetic data, CPU or one GPU
    python -m blossomrec_cuda.rec.train --data ../shared/data/amazon-beauty.txt --epochs 200
    python -m blossomrec_cuda.rec.train --out r.json --checkpoint-dir ckpt   # result JSON + model
    torchrun --nproc_per_node 4 -m blossomrec_cuda.rec.train --data ...   # DistributedDataParallel

Leave-one-out split by time, early stopping on validation NDCG@10 (sampled protocol by default), then
Recall/MRR/NDCG@10 on test under the sampled protocol (100 uniform negatives the user never
interacted with, 'uni100') and under full ranking over all items (items already in the history do not
compete). A popularity baseline is evaluated on the same candidates.

Standard output gets a short summary (the metrics table); the full result record goes to --out (JSON)
and/or is appended to --jsonl. The checkpoint in --checkpoint-dir loads with
BlossomRec.from_checkpoint(path) and recommends with model.recommend(histories, k).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..attention import SPARSE_NAMES, BlossomAttention, normalize_sparse_names
from .data import (FORMATS, InteractionData, dataset_path, leave_one_out, load_dataset, pad_batch,
                   sample_negatives, synthetic_dataset, training_examples)
from .metrics import metric_sums, rank_of_target
from .model import ATTENTIONS, CHECKPOINT_NAME, BlossomRec, build_model

K = 10
# Bumped when the checkpoint's layout changes; version 2 loads with torch.load(weights_only=True)
# and carries model_config, item_ids and max_len (what BlossomRec.from_checkpoint needs).
CHECKPOINT_VERSION = 2
# Arguments that shape the data or the model: a checkpoint resumes only under the same values.
_RESUME_KEYS = ("data", "format", "max_users", "attention", "backend", "hidden", "heads", "kv_heads",
                "layers", "inner", "max_len", "seed")


@dataclass
class TrainConfig:
    data: Optional[str] = None  # None: the built-in synthetic dataset
    format: str = "auto"
    max_users: Optional[int] = None
    attention: str = "blossom"
    backend: str = "ops"
    hidden: int = 128
    heads: int = 8
    kv_heads: int = 2
    layers: int = 2
    inner: int = 256
    dropout: float = 0.2
    max_len: int = 50
    epochs: int = 30
    patience: int = 15
    batch_size: int = 2048
    eval_batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 42
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    eval_every: int = 1
    valid_protocol: str = "sampled"
    num_negatives: int = 100
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    out: Optional[str] = None
    jsonl: Optional[str] = None
    progress: bool = True
    sparse: dict = field(default_factory=dict)  # BlossomAttention block sizes, window, ...


# --------------------------------------------------------------------------------------------------
# Processes, devices, seeds
# --------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_runtime(device: str) -> Runtime:
    """One process, or one of ``WORLD_SIZE`` processes started by ``torchrun`` (NCCL on CUDA, gloo
    on CPU), each on its own GPU ``LOCAL_RANK`` when CUDA is used."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but no GPU is visible; use --device cpu")
    if world <= 1:
        return Runtime(torch.device(device))
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Runtime(dev, rank, world)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so that the checkpoint loads with
    ``torch.load(weights_only=True)`` (NumPy's own state tuple holds an ndarray, which does not)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": int(version), "state": list(internal),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _log(rt: Runtime, *msg: object) -> None:
    if rt.main:
        print(*msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
class _Examples(Dataset):
    def __init__(self, histories: list[list[int]], targets: list[int]) -> None:
        self.histories, self.targets = histories, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.histories[i], self.targets[i]


def _collate(max_len: int, fixed_len: bool) -> Callable:
    def collate(batch: Sequence[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
        items, lengths = pad_batch([h for h, _ in batch], max_len)
        if fixed_len and items.shape[1] < max_len:
            # one shape for every batch, so a compiled model is not re-traced per length
            items = torch.nn.functional.pad(items, (0, max_len - items.shape[1]))
        return items, lengths, torch.tensor([t for _, t in batch], dtype=torch.long)
    return collate


def popularity_scorer(data: InteractionData, histories: Sequence[Sequence[int]],
                      seed: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Score items by how often they occur in ``histories``; ties are broken by a fixed random
    jitter below 1, so equal counts are ranked fairly rather than all against the target."""
    counts = torch.zeros(data.num_items, dtype=torch.float64)
    for h in histories:
        counts.index_add_(0, torch.tensor(h, dtype=torch.long) - 1,
                          torch.ones(len(h), dtype=torch.float64))
    jitter = torch.rand(data.num_items, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64) * 0.5
    scores = counts + jitter

    def score(items: Tensor, lengths: Tensor) -> Tensor:
        return scores[None, :].expand(items.shape[0], -1).to(items.device)
    return score


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(scorer: Callable[[Tensor, Tensor], Tensor], examples: Sequence[tuple[int, list[int], int]],
             negatives: Tensor, num_items: int, max_len: int, batch_size: int, rt: Runtime,
             k: int = K) -> dict[str, dict[str, float]]:
    """Mean Recall/MRR/NDCG@k under the sampled protocol (target vs. its row of ``negatives [U, n]``)
    and under full ranking (target vs. every item not in the history). With several processes each
    takes every ``world``-th user and the sums are all-reduced."""
    sums = torch.zeros(2, 3, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    mine = list(range(rt.rank, len(examples), rt.world))
    for lo in range(0, len(mine), batch_size):
        rows = mine[lo:lo + batch_size]
        histories = [examples[r][1] for r in rows]
        items, lengths = pad_batch(histories, max_len)
        targets = torch.tensor([examples[r][2] for r in rows], dtype=torch.long) - 1  # columns
        scores = scorer(items.to(rt.device), lengths.to(rt.device)).float().cpu()
        in_history = torch.zeros(len(rows), num_items, dtype=torch.bool)
        for b, h in enumerate(histories):
            in_history[b, torch.tensor(h, dtype=torch.long) - 1] = True
        full = rank_of_target(scores, targets, exclude=in_history)
        cand = torch.cat([targets[:, None], negatives[rows] - 1], dim=1)
        sampled = rank_of_target(scores.gather(1, cand), torch.zeros(len(rows), dtype=torch.long))
        for p, ranks in enumerate((sampled, full)):
            sums[p] += torch.tensor(list(metric_sums(ranks, k).values()), dtype=torch.float64)
        count += len(rows)
    if rt.distributed:
        packed = torch.cat([sums.flatten(), count[None]]).to(rt.device)
        dist.all_reduce(packed)
        sums, count = packed[:-1].cpu().view(2, 3), packed[-1].cpu()
    names = (f"recall@{k}", f"mrr@{k}", f"ndcg@{k}")
    n = max(float(count), 1.0)
    return {protocol: {name: float(sums[p, i]) / n for i, name in enumerate(names)}
            for p, protocol in enumerate(("sampled", "full"))}


def _model_scorer(model: BlossomRec, amp: Callable) -> Callable[[Tensor, Tensor], Tensor]:
    def score(items: Tensor, lengths: Tensor) -> Tensor:
        with amp():
            hidden = model.encode(items, lengths)
        # rank in float32: bf16 scores over thousands of items tie often, and ties count against
        # the target (metrics.py)
        return model.scores(hidden.float())
    return score


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def _amp_context(cfg: TrainConfig, device: torch.device) -> Callable:
    if cfg.amp == "off":
        return nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


def _device_name(device: torch.device) -> str:
    """The card's name for the result rows ("NVIDIA H200"), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _commit() -> str:
    """The code's commit: $BLOSSOMREC_COMMIT (a device copy of the tree has no git history), else
    ``git rev-parse`` of the checkout this package sits in, else "unknown". (benchmarks/
    bench_attention.py has its own copy: it must record rows even when this package fails to
    import.)"""
    if os.environ.get("BLOSSOMREC_COMMIT"):
        return os.environ["BLOSSOMREC_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                              "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _checkpoint_path(cfg: TrainConfig) -> Optional[str]:
    return os.path.join(cfg.checkpoint_dir, CHECKPOINT_NAME) if cfg.checkpoint_dir else None


def _save_checkpoint(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def _model_record(model: BlossomRec, data: InteractionData, cfg: TrainConfig) -> dict:
    """What BlossomRec.from_checkpoint needs besides the weights: the architecture, the raw item id
    of every model index (``item_ids[i - 1]`` names index ``i``) and the training history length."""
    return {"checkpoint_version": CHECKPOINT_VERSION, "model_config": model.config(),
            "item_ids": list(data.raw_item_ids) or None, "max_len": cfg.max_len,
            "dataset": data.name}


def load_data(cfg: TrainConfig) -> InteractionData:
    if cfg.data is None:
        # users are drawn one after another, so a smaller count gives the first users of the
        # full synthetic dataset
        return synthetic_dataset(**({} if cfg.max_users is None else {"num_users": cfg.max_users}),
                                 seed=0)
    return load_dataset(cfg.data, cfg.format, cfg.max_users)


def run(cfg: TrainConfig) -> dict:
    """Train with early stopping, evaluate on test, return the result record (also written to
    ``cfg.out`` / appended to ``cfg.jsonl`` by the main process)."""
    _check_config(cfg)
    rt = setup_runtime(cfg.device)
    try:
        return _run(cfg, rt)
    finally:
        if rt.distributed:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, rt: Runtime) -> dict:
    t_start = time.time()
    seed_everything(cfg.seed)
    data = load_data(cfg)
    split = leave_one_out(data)
    histories, targets = training_examples(split.train, cfg.max_len)
    if not histories or not split.test:
        raise ValueError(f"dataset {data.name} has no users with 3+ items: nothing to train or test")
    valid_users = [u for u, _, _ in split.valid]
    valid_neg = sample_negatives(data, valid_users, cfg.num_negatives, seed=cfg.seed)
    test_neg = sample_negatives(data, [u for u, _, _ in split.test], cfg.num_negatives,
                                seed=cfg.seed + 1)
    _log(rt, f"data {data.name}: {data.num_users} users, {data.num_items} items, "
             f"{data.num_interactions} interactions, {len(histories)} training examples")

    model = build_model(data.num_items, cfg.attention, cfg.backend, cfg.hidden, cfg.heads,
                        cfg.kv_heads, cfg.layers, cfg.inner, cfg.dropout, cfg.sparse).to(rt.device)
    # The compressor gets no gradient by the spec (discrete selection); freezing it keeps the
    # optimizer and DDP from waiting on gradients that never come.
    for p in model.no_grad_parameters():
        p.requires_grad_(False)
    # The batches below come from the data's own id map (ids and lengths agree by construction):
    # the model's per-call checks would only add host reads of device values to every step.
    model.check_inputs = False
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.amp == "fp16")
    amp = _amp_context(cfg, rt.device)

    state = {"epoch": 0, "best_metric": -math.inf, "best_epoch": 0, "history": [],
             "best_model": copy.deepcopy(model.state_dict())}
    ckpt = _checkpoint_path(cfg)
    if cfg.resume:
        if ckpt is None:
            raise ValueError("--resume needs --checkpoint-dir (where the checkpoint is)")
        if os.path.exists(ckpt):
            state = _restore(ckpt, cfg, model, optimizer, scaler, rt)
            _log(rt, f"resumed from {ckpt} after epoch {state['epoch']}")
        else:
            _log(rt, f"no checkpoint at {ckpt}; starting from scratch")

    net: nn.Module = model
    if rt.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    dataset = _Examples(histories, targets)
    per_process = max(1, cfg.batch_size // rt.world)  # --batch-size is the global batch
    collate = _collate(cfg.max_len, fixed_len=cfg.compile)

    first_epoch = state["epoch"] + 1  # of this run (a resumed one continues a history)
    for epoch in range(first_epoch, cfg.epochs + 1):
        if rt.distributed:
            sampler = DistributedSampler(dataset, rt.world, rt.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        else:
            # the order depends on (seed, epoch) only, so a resumed run replays the same batches
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        loader = DataLoader(dataset, per_process, sampler=sampler, collate_fn=collate)
        t_epoch = time.time()
        loss = _train_epoch(net, loader, optimizer, scaler, amp, rt, epoch, cfg)  # ends synced
        seconds = time.time() - t_epoch
        # examples of all processes (DistributedSampler pads each rank to the same count)
        record = {"epoch": epoch, "train_loss": loss, "train_seconds": seconds,
                  "examples_per_s": len(loader.sampler) * rt.world / max(seconds, 1e-9)}
        if rt.distributed:
            # DDP keeps the replicas equal only if every gradient was all-reduced: check it, bitwise
            record["ranks_in_sync"] = _check_ranks_in_sync(model, rt, epoch)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            # the plain model, not DDP: ranks may run different numbers of evaluation batches
            model.eval()
            valid = evaluate(_model_scorer(model, amp), split.valid, valid_neg, data.num_items,
                             cfg.max_len, cfg.eval_batch_size, rt)
            metric = valid[cfg.valid_protocol][f"ndcg@{K}"]
            record["valid"] = valid
            if metric > state["best_metric"]:
                state.update(best_metric=metric, best_epoch=epoch,
                             best_model=copy.deepcopy(model.state_dict()))
            _log(rt, f"epoch {epoch}: loss {loss:.4f}, valid NDCG@{K} ({cfg.valid_protocol}) "
                     f"{metric:.4f}, best {state['best_metric']:.4f} at epoch {state['best_epoch']}")
        state["history"].append(record)
        state["epoch"] = epoch
        if ckpt is not None and rt.main:
            _save_checkpoint(ckpt, {**state, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "scaler": scaler.state_dict(), "rng": _rng_state(),
                                    "config": asdict(cfg), **_model_record(model, data, cfg)})
        if epoch - state["best_epoch"] >= cfg.patience:
            _log(rt, f"early stop: no validation gain for {cfg.patience} epochs")
            break

    model.load_state_dict(state["best_model"])
    model.eval()
    test = evaluate(_model_scorer(model, amp), split.test, test_neg, data.num_items, cfg.max_len,
                    cfg.eval_batch_size, rt)
    popularity = evaluate(popularity_scorer(data, [h for _, h, _ in split.test], cfg.seed),
                          split.test, test_neg, data.num_items, cfg.max_len, cfg.eval_batch_size, rt)
    result = {
        "dataset": data.name, "users": data.num_users, "items": data.num_items,
        "interactions": data.num_interactions,
        "model": "BlossomRec" if cfg.attention == "blossom" else "SASRec",
        "attention": cfg.attention, "backend": cfg.backend, "device": str(rt.device),
        "device_name": _device_name(rt.device), "torch": torch.__version__, "commit": _commit(),
        "world_size": rt.world, "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
        "valid_best_ndcg@10": state["best_metric"], "history": state["history"],
        "test": test, "popularity": popularity, "seconds": time.time() - t_start,
        "train_seconds_per_epoch": (sum(r.get("train_seconds", 0.0) for r in state["history"])
                                    / max(len(state["history"]), 1)),
        # training throughput over all processes in this run's epochs, its first epoch (warm-up,
        # compilation) left out when there are more
        "examples_per_s": _steady_throughput(state["history"], first_epoch),
        # Runs sharing the device at the same time (set by benchmarks/accuracy_sweep.sh), which
        # the per-epoch times depend on.
        "concurrent_runs": int(os.environ.get("BLOSSOMREC_CONCURRENT_RUNS", "1")),
    }
    if rt.main:
        _report(result, cfg)
    return result


def _train_epoch(net: nn.Module, loader: DataLoader,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp: Callable,
                 rt: Runtime, epoch: int, cfg: TrainConfig) -> float:
    """One pass over the training examples; returns the mean loss over all processes."""
    net.train()
    # No host read of a device value inside the loop: the loss is summed on the device (read at the
    # end, and every BAR_EVERY steps for the progress bar), and the lengths stay on the host, where
    # the attention checks their range and copies them asynchronously (lengths on the GPU would be
    # read back for that check). Compiled, the lengths go to the device with the batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    bar = _progress(rt, cfg, len(loader.sampler), epoch)
    for step, (items, lengths, targets) in enumerate(loader):
        items, targets = (t.to(rt.device, non_blocking=True) for t in (items, targets))
        if cfg.compile:
            lengths = lengths.to(rt.device, non_blocking=True)
        with amp():
            loss = nn.functional.cross_entropy(net(items, lengths).float(), targets - 1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(targets)
        count += len(targets)
        if bar is not None:
            bar.update(len(targets) * rt.world)  # the bar's rate is the throughput, in seq/s
            if step % BAR_EVERY == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / count:.4f}")
    if bar is not None:
        bar.close()
    total = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64,
                                                device=rt.device)])
    if rt.distributed:
        dist.all_reduce(total)
    total = total.cpu()
    return float(total[0] / max(float(total[1]), 1.0))


BAR_EVERY = 50  # steps between progress-bar readings of the running loss (a host sync each)


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in ``named_parameters`` order: equal digests on two
    processes mean bitwise equal models."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _check_ranks_in_sync(model: nn.Module, rt: Runtime, epoch: int) -> bool:
    """All processes' parameters are bitwise equal after ``epoch`` (DistributedDataParallel
    all-reduces the gradients and the backward is deterministic, so every replica takes the same
    step); raises RuntimeError naming the ranks that differ otherwise."""
    digests: list = [None] * rt.world
    dist.all_gather_object(digests, parameter_digest(model))
    if len(set(digests)) != 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"after epoch {epoch} the parameters of ranks {differ} differ from rank "
                           "0's: the replicas diverged (a gradient that DDP did not all-reduce?)")
    return True


def _steady_throughput(history: list, first_epoch: int) -> Optional[float]:
    rates = [r["examples_per_s"] for r in history
             if "examples_per_s" in r and r["epoch"] >= first_epoch]
    if not rates:
        return None
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates)


def _progress(rt: Runtime, cfg: TrainConfig, per_process: int, epoch: int):
    if not (rt.main and cfg.progress):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=per_process * rt.world, desc=f"epoch {epoch}", unit="seq", leave=False,
                dynamic_ncols=True)


def _restore(path: str, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, rt: Runtime) -> dict:
    try:
        ckpt = torch.load(path, map_location=rt.device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} does not load with torch.load(weights_only=True): it was written "
                         "by an older version (with NumPy RNG state inside), which cannot resume; "
                         "point --checkpoint-dir elsewhere to start afresh") from None
    saved = ckpt["config"]
    changed = [key for key in _RESUME_KEYS if saved.get(key) != getattr(cfg, key)]
    if changed or normalize_sparse_names(saved.get("sparse", {})) != cfg.sparse:
        raise ValueError(f"{path} was written with different {changed or ['sparse']} "
                         f"({[saved.get(k) for k in changed]}); resume with the same arguments "
                         "or point --checkpoint-dir elsewhere")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    return {key: ckpt[key] for key in ("epoch", "best_metric", "best_epoch", "history", "best_model")}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """The test metrics of the model and of the popularity baseline as a Markdown table."""
    rows = [(result["model"], result["test"]), ("Popularity", result["popularity"])]
    head = f"| model | protocol | Recall@{K} | MRR@{K} | NDCG@{K} |"
    lines = [head, "|---|---|---|---|---|"]
    for name, metrics in rows:
        for protocol, label in (("sampled", f"sampled ({result['config']['num_negatives']} neg)"),
                                ("full", "full ranking")):
            m = metrics[protocol]
            lines.append(f"| {name} | {label} | {m[f'recall@{K}']:.4f} | {m[f'mrr@{K}']:.4f} | "
                         f"{m[f'ndcg@{K}']:.4f} |")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """What the command prints: the data, the run, the metrics table and where the files went."""
    cfg = result["config"]
    kind = ("dense attention" if result["attention"] == "dense"
            else f"BlossomAttention, {result['backend']} backend")
    lines = [
        f"{result['dataset']}: {result['users']} users, {result['items']} items, "
        f"{result['interactions']} interactions",
        f"{result['model']} ({kind}, {result['parameters']} parameters) on {result['device']} "
        f"x{result['world_size']}: "
        f"{result['epochs_run']} epoch{'' if result['epochs_run'] == 1 else 's'} in "
        f"{result['seconds']:.0f} s, best validation "
        f"NDCG@{K} ({cfg['valid_protocol']}) {result[f'valid_best_ndcg@{K}']:.4f} at epoch "
        f"{result['best_epoch']}"
        + (f", {result['examples_per_s']:.0f} training examples/s"
           if result.get("examples_per_s") else ""),
        "",
        format_table(result),
        "",
    ]
    if cfg["out"]:
        lines.append(f"result: {cfg['out']}")
    if cfg["jsonl"]:
        lines.append(f"result appended to: {cfg['jsonl']}")
    if not (cfg["out"] or cfg["jsonl"]):
        lines.append("full result not saved (pass --out result.json)")
    if cfg["checkpoint_dir"]:
        lines.append(f"checkpoint: {os.path.join(cfg['checkpoint_dir'], CHECKPOINT_NAME)} "
                     "(BlossomRec.from_checkpoint)")
    return "\n".join(lines)


def _report(result: dict, cfg: TrainConfig) -> None:
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if cfg.jsonl:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.jsonl)), exist_ok=True)
        with open(cfg.jsonl, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(format_summary(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _check_config(cfg: TrainConfig) -> None:
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp must be off, bf16 or fp16, got {cfg.amp!r}")
    if cfg.valid_protocol not in ("sampled", "full"):
        raise ValueError(f"valid_protocol must be 'sampled' or 'full', got {cfg.valid_protocol!r}")
    for name in ("epochs", "eval_every", "patience", "max_len", "batch_size", "eval_batch_size",
                 "num_negatives"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {cfg.lr}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir (where the checkpoint is)")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but no GPU is visible; use --device cpu")
    if cfg.max_users is not None and cfg.max_users < 1:
        raise ValueError(f"max_users must be >= 1 (or left out for all users), got {cfg.max_users}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    # Fail before training rather than when the first checkpoint or the result is written.
    if cfg.checkpoint_dir and os.path.exists(cfg.checkpoint_dir) \
            and not os.path.isdir(cfg.checkpoint_dir):
        raise ValueError(f"checkpoint_dir {cfg.checkpoint_dir!r} exists and is not a directory")
    for name in ("out", "jsonl"):
        path = getattr(cfg, name)
        if path is None:
            continue
        if os.path.isdir(path):
            raise ValueError(f"{name} {path!r} is a directory; give a file name")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{name} {path!r}: {parent!r} is not a directory")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and ``(default: X)`` after every flag with a value default;
    the help of a flag whose default is None (or an off switch) says itself what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


# BlossomAttention's hyper-parameters: the flag's help, and the module's default (shown in --help;
# the flag's own default stays None, so that a run records only what it changed).
_SPARSE_HELP = {
    "compress_block_size": "l: keys per compressed block (LTIS block scores)",
    "compress_stride": "s: stride between compressed blocks",
    "select_block": "b: keys per selection block, a multiple of --compress-stride",
    "num_select": "n: blocks each query selects (LTIS)",
    "window": "w: the STIS window (keys at distance < w, then powers of two)",
    "power_block": "p: the STIS power mask's block size",
}
_SPARSE_DEFAULTS = {name: inspect.signature(BlossomAttention.__init__).parameters[name].default
                    for name in SPARSE_NAMES}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m blossomrec_cuda.rec.train``: one flag per
    :class:`TrainConfig` field (``--no-progress`` for ``progress``, BlossomAttention's
    hyper-parameters for ``sparse``), in groups."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m blossomrec_cuda.rec.train", description=__doc__,
                                formatter_class=HelpFormatter)

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="dataset: a file in one of the --format layouts, a MovieLens folder (its "
                        "ratings.csv) or a RecBole dataset folder (NAME/NAME.inter); default: the "
                        "built-in synthetic dataset")
    g.add_argument("--format", default=d.format, choices=FORMATS,
                   help="layout of --data: user-items ('user item item ...' per line), "
                        "user-item-pairs ('user item' per line, in time order), movielens "
                        "(userId,movieId,rating,timestamp CSV), recbole (atomic .inter file); auto "
                        "picks by extension (.csv, .inter) and content")
    g.add_argument("--max-users", metavar="N", type=int, default=None,
                   help="keep the first N users of the file (a quick slice); default: all users")

    g = p.add_argument_group("model")
    g.add_argument("--attention", default=d.attention, choices=ATTENTIONS,
                   help="blossom = BlossomRec (sparse attention), dense = SASRec")
    g.add_argument("--backend", default=d.backend, choices=("ops", "reference"),
                   help="BlossomAttention's implementation: ops (the compiled CPU/CUDA kernels) or "
                        "reference (reference.py in plain PyTorch, the same math)")
    g.add_argument("--hidden", type=int, default=d.hidden,
                   help="model width (item embedding size), a multiple of --heads")
    g.add_argument("--heads", type=int, default=d.heads, help="query heads per layer")
    g.add_argument("--kv-heads", type=int, default=d.kv_heads,
                   help="key/value heads (grouped-query attention); divides --heads")
    g.add_argument("--layers", type=int, default=d.layers, help="Transformer blocks")
    g.add_argument("--inner", type=int, default=d.inner, help="feed-forward inner size")
    g.add_argument("--dropout", type=float, default=d.dropout,
                   help="dropout probability, in [0, 1)")
    g.add_argument("--max-len", type=int, default=d.max_len,
                   help="longest history the model reads: older items are cut")

    g = p.add_argument_group("BlossomAttention (defaults: the paper's values)")
    for name in SPARSE_NAMES:
        g.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{_SPARSE_HELP[name]} (default: {_SPARSE_DEFAULTS[name]})")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs, help="most epochs to train")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without a better validation NDCG@10")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="training examples per step, over all processes together")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the model init, the batch order and the sampled negatives")
    g.add_argument("--device", default=d.device,
                   help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--amp", default=d.amp, choices=("off", "bf16", "fp16"),
                   help="autocast dtype for training and evaluation (scores are ranked in float32)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (batches padded to --max-len); default: eager")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validate every N epochs (and after the last)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="users per evaluation batch")
    g.add_argument("--valid-protocol", default=d.valid_protocol, choices=("sampled", "full"),
                   help="the validation NDCG@10 that early stopping watches: sampled negatives or "
                        "full ranking")
    g.add_argument("--num-negatives", type=int, default=d.num_negatives,
                   help="negatives per user in the sampled protocol (uniform, never interacted "
                        "with)")

    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help=f"write DIR/{CHECKPOINT_NAME} after every epoch (loads with "
                        "BlossomRec.from_checkpoint); default: no checkpoint")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint-dir (same data and model arguments); "
                        "default: start afresh")
    g.add_argument("--out", metavar="PATH", default=None,
                   help="write the full result record here as JSON (metrics, config, history); "
                        "default: not written, standard output gets the summary only")
    g.add_argument("--jsonl", metavar="PATH", default=None,
                   help="append the result record as one JSON line (sweeps); default: none")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar on standard error; default: a bar per epoch")
    for action in p._actions:  # short placeholders in the usage line: N for counts, X for numbers
        if action.metavar is None and action.type in (int, float):
            action.metavar = "N" if action.type is int else "X"
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Command-line arguments -> :class:`TrainConfig`. Bad values and paths are argument errors:
    one ``error:`` line and exit status 2, no traceback."""
    p = build_parser()
    a = p.parse_args(argv)
    sparse_kwargs = {name: getattr(a, name) for name in SPARSE_NAMES if getattr(a, name) is not None}
    cfg = TrainConfig(
        data=a.data, format=a.format, max_users=a.max_users, attention=a.attention,
        backend=a.backend, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, layers=a.layers,
        inner=a.inner, dropout=a.dropout, max_len=a.max_len, epochs=a.epochs, patience=a.patience,
        batch_size=a.batch_size, eval_batch_size=a.eval_batch_size, lr=a.lr, seed=a.seed,
        device=a.device, amp=a.amp, compile=a.compile, eval_every=a.eval_every,
        valid_protocol=a.valid_protocol, num_negatives=a.num_negatives,
        checkpoint_dir=a.checkpoint_dir, resume=a.resume, out=a.out, jsonl=a.jsonl,
        progress=not a.no_progress, sparse=sparse_kwargs)
    try:
        _check_config(cfg)
        if cfg.data is not None:
            dataset_path(cfg.data)
        # the model's own checks of its sizes and BlossomAttention's hyper-parameters, on the meta
        # device: nothing allocated, nothing read
        with torch.device("meta"):
            build_model(1, cfg.attention, cfg.backend, cfg.hidden, cfg.heads, cfg.kv_heads,
                        cfg.layers, cfg.inner, cfg.dropout, cfg.sparse)
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command: 0 on success; 2 and one ``error:`` line for bad arguments (parse_args) and for
    bad inputs found once the data is read (a malformed file, too few users, more negatives than
    items): ValueError is the project's bad-input error (docs/ERRORS.md)."""
    cfg = parse_args(argv)
    try:
        run(cfg)
    except ValueError as e:
        print(f"{os.path.basename(sys.argv[0]) or 'train'}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
