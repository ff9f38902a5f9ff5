"""Interaction data: readers for the formats of ``../shared/data``, a synthetic dataset, the
leave-one-out split and the batches the recommender trains and evaluates on.

A dataset is a list of per-user item sequences in time order, item ids compacted to ``1..num_items``
(0 is the padding id).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

FORMATS = ("auto", "user-items", "user-item-pairs", "movielens", "recbole")


@dataclass
class InteractionData:
    """``sequences[u]``: user u's items in time order, ids in ``1..num_items``."""

    name: str
    sequences: list[list[int]]
    num_items: int
    raw_item_ids: list[str] = field(default_factory=list)  # raw_item_ids[i - 1] is item i's raw id

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def _compact(name: str, raw: Iterable[list[str]], max_users: Optional[int]) -> InteractionData:
    """Map raw item ids to ``1..num_items`` in order of first appearance; keep the first
    ``max_users`` users (in file order) when given."""
    ids: dict[str, int] = {}
    sequences = []
    for seq in raw:
        if max_users is not None and len(sequences) >= max_users:
            break
        if not seq:
            continue
        sequences.append([ids.setdefault(item, len(ids) + 1) for item in seq])
    return InteractionData(name, sequences, len(ids), list(ids))


def read_user_items(path: str, max_users: Optional[int] = None) -> InteractionData:
    """One line per user: ``user item item ...`` (items in time order)."""
    def lines() -> Iterator[list[str]]:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                tokens = line.split()
                if not tokens:
                    continue
                if len(tokens) < 2:
                    raise ValueError(f"{path}:{lineno}: a 'user item item ...' line needs a user and at "
                                     f"least one item, got {line.strip()!r}")
                yield tokens[1:]
    return _compact(_name(path), lines(), max_users)


def read_user_item_pairs(path: str, max_users: Optional[int] = None) -> InteractionData:
    """One line per interaction: ``user item``, in time order within each user (users may
    interleave; their order is the order of first appearance)."""
    per_user: dict[str, list[str]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'user item', got {line.strip()!r} (for "
                                 "one line per user use --format user-items)")
            user, item = tokens
            if user not in per_user and max_users is not None and len(per_user) >= max_users:
                continue
            per_user.setdefault(user, []).append(item)
    return _compact(_name(path), per_user.values(), None)


def read_movielens(path: str, max_users: Optional[int] = None) -> InteractionData:
    """MovieLens CSV ``userId,movieId,rating,timestamp`` (with header); each user's rows sorted by
    timestamp (stable, so equal timestamps keep file order). Every rating counts as an interaction."""
    per_user: dict[str, list[tuple[int, int, str]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"userId", "movieId", "timestamp"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: a MovieLens CSV needs the columns userId, movieId, timestamp; "
                             f"missing {sorted(missing)}")
        for row_no, row in enumerate(reader):
            user, item, stamp = row["userId"], row["movieId"], row["timestamp"]
            if user in (None, "") or item in (None, ""):
                raise ValueError(f"{path}:{reader.line_num}: a row needs userId and movieId, got "
                                 f"{row!r}")
            try:
                timestamp = int(stamp)
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{reader.line_num}: timestamp must be an integer, got "
                                 f"{stamp!r}") from None
            if user not in per_user and max_users is not None and len(per_user) >= max_users:
                continue
            per_user.setdefault(user, []).append((timestamp, row_no, item))
    ordered = ([item for _, _, item in sorted(rows)] for rows in per_user.values())
    return _compact(_name(path), ordered, None)


def read_recbole(path: str, max_users: Optional[int] = None) -> InteractionData:
    """RecBole atomic file (``.inter``): tab-separated, a header of ``name:type`` fields, e.g.
    ``user_id:token  item_id:token  rating:float  timestamp:float``. Needs ``user_id`` and
    ``item_id`` (RecBole's default field names); each user's rows are sorted by ``timestamp``
    (stable: equal timestamps keep file order; without the column, file order). Users in order of
    first appearance; other columns are ignored, every row counts as an interaction."""
    per_user: dict[str, list[tuple[float, int, str]]] = {}
    with open(path, newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        names = [field.split(":", 1)[0] for field in header]
        types = {name: field.split(":", 1)[1] if ":" in field else "" for name, field in
                 zip(names, header)}
        missing = [name for name in ("user_id", "item_id") if name not in names]
        if missing or not all(types.values()):
            raise ValueError(f"{path}: a RecBole .inter file starts with a tab-separated header of "
                             "name:type fields including user_id and item_id (e.g. "
                             f"'user_id:token\\titem_id:token\\ttimestamp:float'); got {header!r}")
        user_col, item_col = names.index("user_id"), names.index("item_id")
        time_col = names.index("timestamp") if "timestamp" in names else None
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            row = line.split("\t")
            if len(row) != len(names):
                raise ValueError(f"{path}:{lineno}: expected {len(names)} tab-separated fields "
                                 f"({names}), got {len(row)}: {line!r}")
            user, item = row[user_col], row[item_col]
            if not user or not item:
                raise ValueError(f"{path}:{lineno}: a row needs user_id and item_id, got {line!r}")
            timestamp = 0.0
            if time_col is not None:
                try:
                    timestamp = float(row[time_col])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: timestamp must be a number, got "
                                     f"{row[time_col]!r}") from None
            if user not in per_user and max_users is not None and len(per_user) >= max_users:
                continue
            rows = per_user.setdefault(user, [])
            rows.append((timestamp, len(rows), item))
    ordered = ([item for _, _, item in sorted(rows)] for rows in per_user.values())
    return _compact(_name(path), ordered, None)


def detect_format(path: str) -> str:
    """``movielens`` for a ``.csv``, ``recbole`` for a ``.inter``; otherwise ``user-item-pairs`` when
    every line of the head of the file has two tokens and some user repeats, else ``user-items``."""
    if path.endswith(".csv"):
        return "movielens"
    if path.endswith(".inter"):
        return "recbole"
    seen, repeated = set(), False
    with open(path) as f:
        for _, line in zip(range(2000), f):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2:
                return "user-items"
            repeated |= tokens[0] in seen
            seen.add(tokens[0])
    return "user-item-pairs" if repeated else "user-items"


def dataset_path(path: str) -> str:
    """The file :func:`load_dataset` reads for ``path``: a directory means its ``ratings.csv``
    (MovieLens) or, when there is none, its ``<directory name>.inter`` (a RecBole dataset folder);
    ValueError when there is none."""
    if os.path.isdir(path):
        inter = os.path.join(path, os.path.basename(os.path.abspath(path)) + ".inter")
        csv_path = os.path.join(path, "ratings.csv")
        path = inter if os.path.exists(inter) and not os.path.exists(csv_path) else csv_path
    if not os.path.exists(path):
        raise ValueError(f"no dataset at {path!r}; pass --data with a file in one of the formats "
                         f"{FORMATS[1:]} (or leave --data out for the synthetic dataset)")
    return path


def load_dataset(path: str, fmt: str = "auto", max_users: Optional[int] = None) -> InteractionData:
    """Read ``path`` in ``fmt`` (one of :data:`FORMATS`); a directory is searched for
    ``ratings.csv`` (MovieLens) or ``<name>/<name>.inter`` (RecBole)."""
    path = dataset_path(path)
    readers = {"user-items": read_user_items, "user-item-pairs": read_user_item_pairs,
               "movielens": read_movielens, "recbole": read_recbole}
    if fmt != "auto" and fmt not in readers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    try:
        if fmt == "auto":
            fmt = detect_format(path)
        return readers[fmt](path, max_users)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e.reason} at byte {e.start}); expected one of "
                         f"the formats {FORMATS[1:]}") from None


def _name(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    if base == "ratings.csv":
        base = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.path.splitext(base)[0]


# --------------------------------------------------------------------------------------------------
# Synthetic data with learnable sequential structure
# --------------------------------------------------------------------------------------------------
def synthetic_dataset(num_users: int = 1000, num_items: int = 300, min_len: int = 5,
                      max_len: int = 20, follow_prob: float = 0.75, successors: int = 3,
                      seed: int = 0) -> InteractionData:
    """Users walk a sparse Markov chain over items: each item has ``successors`` preferred next
    items; with ``follow_prob`` the walk takes one of them, otherwise it jumps to an item drawn from a
    Zipf-like popularity law. A sequential model can learn the transitions; popularity alone cannot,
    so the gap between the two shows that training works."""
    rng = np.random.default_rng(seed)
    next_items = rng.integers(1, num_items + 1, size=(num_items + 1, successors))
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity /= popularity.sum()
    sequences = []
    for _ in range(num_users):
        length = int(rng.integers(min_len, max_len + 1))
        item = int(rng.choice(num_items, p=popularity)) + 1
        seq = [item]
        for _ in range(length - 1):
            if rng.random() < follow_prob:
                item = int(next_items[item, rng.integers(successors)])
            else:
                item = int(rng.choice(num_items, p=popularity)) + 1
            seq.append(item)
        sequences.append(seq)
    # compact so that items the walk never reached do not count as candidates
    return _compact("synthetic", ([str(i) for i in s] for s in sequences), None)


# --------------------------------------------------------------------------------------------------
# Leave-one-out split
# --------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Leave-one-out by time: for a user with items ``s``, training uses ``s[:-2]``, validation asks
    for ``s[-2]`` given ``s[:-2]`` and test asks for ``s[-1]`` given ``s[:-1]``. Users with fewer
    than 3 items are kept for training only."""

    train: list[list[int]]  # per user: the training part
    valid: list[tuple[int, list[int], int]]  # (user, history, target)
    test: list[tuple[int, list[int], int]]


def leave_one_out(data: InteractionData) -> Split:
    train, valid, test = [], [], []
    for user, seq in enumerate(data.sequences):
        if len(seq) < 3:
            train.append(list(seq))
            continue
        train.append(seq[:-2])
        valid.append((user, seq[:-2], seq[-2]))
        test.append((user, seq[:-1], seq[-1]))
    return Split(train, valid, test)


def training_examples(train: Sequence[Sequence[int]], max_len: int) -> tuple[list[list[int]], list[int]]:
    """Every prefix of every training sequence predicts its next item (RecBole's sequential
    augmentation): ``(histories, targets)``, each history cut to its last ``max_len`` items."""
    histories, targets = [], []
    for seq in train:
        for t in range(1, len(seq)):
            histories.append(list(seq[max(0, t - max_len):t]))
            targets.append(seq[t])
    return histories, targets


def pad_batch(histories: Sequence[Sequence[int]], max_len: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``items [B, n]`` (0 = padding, ``n`` = the longest kept history) and
    ``lengths [B]``; histories longer than ``max_len`` keep their last ``max_len`` items."""
    cut = [list(h[-max_len:]) for h in histories]
    n = max(1, max(len(h) for h in cut))
    items = torch.zeros(len(cut), n, dtype=torch.long)
    for b, h in enumerate(cut):
        items[b, : len(h)] = torch.tensor(h, dtype=torch.long)
    return items, torch.tensor([len(h) for h in cut], dtype=torch.long)


def sample_negatives(data: InteractionData, users: Sequence[int], num_negatives: int = 100,
                     seed: int = 0) -> Tensor:
    """``[U, num_negatives]`` items drawn uniformly without replacement from the items user ``u``
    never interacted with (the paper's 'uni100' protocol). Fixed by ``seed`` so every evaluation of a
    split ranks against the same negatives."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(users), num_negatives), dtype=np.int64)
    for row, user in enumerate(users):
        seen = set(data.sequences[user])
        if data.num_items - len(seen) < num_negatives:
            raise ValueError(f"user {user} has only {data.num_items - len(seen)} unseen items, fewer "
                             f"than the {num_negatives} negatives asked for; use a larger dataset "
                             "or fewer negatives")
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < num_negatives:
            for item in rng.integers(1, data.num_items + 1, size=2 * num_negatives):
                item = int(item)
                if item not in seen and item not in taken:
                    taken.add(item)
                    chosen.append(item)
                    if len(chosen) == num_negatives:
                        break
        out[row] = chosen
    return torch.from_numpy(out)
