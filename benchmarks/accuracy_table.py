"""The accuracy tables of the README and docs/RESULTS.md from the sweep's JSON lines, with the seed statistics that say
whether a difference between two methods is resolved by the seeds run so far.

Reads the rows that ``python -m blossomrec_cuda.rec.train --jsonl`` appends (through
``benchmarks/accuracy_sweep.sh``), groups them by data set, max length and method (``ops``:
BlossomRec on the CUDA/CPU ops, ``reference``: the same model on reference.py's ops, ``dense``:
SASRec), and prints

1. per-seed test NDCG@10 (sampled / full ranking), the table of docs/RESULTS.md;
2. for each pair (ops vs reference, ops vs dense) the paired differences over the seeds both have:
   mean, sample standard deviation, and whether a two-sided paired t-test at 5% separates them.
   With two seeds nothing short of a huge gap is separated; that is the point of printing it.

    python benchmarks/accuracy_table.py                       # benchmarks/results/accuracy-*.jsonl
    python benchmarks/accuracy_table.py --metric recall@10 --protocol full path/to/rows.jsonl

Rows of the same (data set, length, method, seed) from several files: the last one read wins (files
are read in name order, which is date order for the sweep's names) and the table says so. Rows
whose training settings differ from the rest of their group (epochs, patience, model size, ...) are
reported instead of silently mixed.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ops", "reference", "dense")
PAIRS = (("ops", "reference"), ("ops", "dense"))
# Settings that must agree within a group (everything in the row's config that is not the seed,
# the method, or where the run put its files).
IGNORED_CONFIG = {"seed", "attention", "backend", "checkpoint_dir", "resume", "out", "jsonl",
                  "progress", "data", "device"}
# Two-sided 97.5% quantiles of Student's t, by degrees of freedom (1..30); normal beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
        2.056, 2.052, 2.048, 2.045, 2.042)


def method_of(row: dict) -> str:
    if row.get("attention") == "dense":
        return "dense"
    return "reference" if row.get("backend") == "reference" else "ops"


def settings_of(row: dict) -> tuple:
    cfg = row.get("config", {})
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in cfg.items()
                        if k not in IGNORED_CONFIG))


@dataclass
class Group:
    dataset: str
    max_len: int
    runs: dict = field(default_factory=dict)       # (method, seed) -> row
    replaced: list = field(default_factory=list)   # (method, seed, file) overridden by a later row
    settings: dict = field(default_factory=dict)   # settings -> count

    @property
    def label(self) -> str:
        return f"{self.dataset} ({self.max_len})"


def load(paths: list[Path]) -> dict[tuple, Group]:
    groups: dict[tuple, Group] = {}
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (row["dataset"], int(row["config"]["max_len"]))
                seed = int(row["config"]["seed"])
                row["test"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: not a training result row ({e})") from None
            g = groups.setdefault(key, Group(*key))
            m = method_of(row)
            if (m, seed) in g.runs:
                g.replaced.append((m, seed, g.runs[(m, seed)]["_file"]))
            row["_file"] = path.name
            g.runs[(m, seed)] = row
            s = settings_of(row)
            g.settings[s] = g.settings.get(s, 0) + 1
    return groups


def metric(row: dict, protocol: str, name: str) -> float:
    return float(row["test"][protocol][name])


def paired(a: list[float], b: list[float]) -> dict:
    """Paired differences a - b: n, mean, sample sd, t-test verdict at 5% (two-sided)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    out = {"n": n, "mean": statistics.fmean(d) if d else math.nan,
           "sd": statistics.stdev(d) if n > 1 else math.nan, "separated": False}
    if n > 1:
        se = out["sd"] / math.sqrt(n)
        t = T975[n - 2] if n - 1 <= len(T975) else 1.96
        out["half_width"] = t * se
        out["separated"] = abs(out["mean"]) > t * se
    return out


def format_tables(groups: dict[tuple, Group], protocol: str, name: str) -> str:
    lines = [f"Test {name}, sampled / full ranking, by seed:", "",
             "| data set (max length) | " + " | ".join(METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    for key in sorted(groups):
        g = groups[key]
        cells = []
        for m in METHODS:
            seeds = sorted(s for (mm, s) in g.runs if mm == m)
            cells.append(", ".join(
                f"s{s}: {metric(g.runs[(m, s)], 'sampled', name):.4f} / "
                f"{metric(g.runs[(m, s)], 'full', name):.4f}" for s in seeds) or "-")
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences of test {name} ({protocol}) over common seeds "
              "(mean +- 95% half-width, sample sd):", "",
              "| data set (max length) | pair | seeds | mean | sd | separated at 5% |",
              "|---|---|---|---|---|---|"]
    for key in sorted(groups):
        g = groups[key]
        for a, b in PAIRS:
            seeds = sorted(s for (m, s) in g.runs if m == a and (b, s) in g.runs)
            if not seeds:
                continue
            r = paired([metric(g.runs[(a, s)], protocol, name) for s in seeds],
                       [metric(g.runs[(b, s)], protocol, name) for s in seeds])
            hw = f" +- {r['half_width']:.4f}" if "half_width" in r else ""
            sd = f"{r['sd']:.4f}" if r["n"] > 1 else "-"
            verdict = "yes" if r["separated"] else f"no (n = {r['n']})"
            lines.append(f"| {g.label} | {a} - {b} | {', '.join(map(str, seeds))} | "
                         f"{r['mean']:+.4f}{hw} | {sd} | {verdict} |")
    notes = []
    for key in sorted(groups):
        g = groups[key]
        for m, s, f in g.replaced:
            notes.append(f"{g.label}: {m} seed {s} from {f} replaced by {g.runs[(m, s)]['_file']}")
        if len(g.settings) > 1:
            notes.append(f"{g.label}: rows with {len(g.settings)} different training settings "
                         "are mixed in this group")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="JSON-lines files (default: "
                                            "benchmarks/results/accuracy-*.jsonl)")
    p.add_argument("--metric", default="ndcg@10", choices=["ndcg@10", "recall@10", "mrr@10"])
    p.add_argument("--protocol", default="sampled", choices=["sampled", "full"],
                   help="protocol of the paired differences (the per-seed table shows both)")
    a = p.parse_args(argv)
    paths = [Path(f) for f in a.files] or [
        Path(f) for f in sorted(glob.glob(str(REPO / "benchmarks/results/accuracy-*.jsonl")))]
    missing = [str(f) for f in paths if not f.is_file()]
    if missing or not paths:
        print(f"no such results file: {', '.join(missing) or '(none found)'}", file=sys.stderr)
        return 2
    print(format_tables(load(paths), a.protocol, a.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
