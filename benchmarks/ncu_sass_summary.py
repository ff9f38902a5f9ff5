"""Summarise Nsight Compute's SASS source page per kernel: instructions grouped by how often a warp
executes them (x1.00: once per warp, the prologue and epilogue; x2.5: per key or query tile), their
share of the executed instructions and of the warp-stall samples, the stall reasons, and the
instructions with the most samples (a stall is charged to the instruction that waits).

    ncu --section SourceCounters --section WarpStateStats -k regex:fused -o prof python ...
    ncu --import prof.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/ncu_sass_summary.py sass.csv [--top 12] [--context 3]

(``benchmarks/device_run.sh`` does not run this; the results under ``benchmarks/results/ncu-*`` name
the command that made them.)
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import re
import sys


def blocks(path: str):
    """(kernel name, header, rows) per kernel block of the CSV (the first of repeated ones)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        name, header, rows, seen = None, None, [], set()
        for rec in csv.reader(f):
            if not rec:
                continue
            if rec[0] == "Kernel Name":
                if name is not None and name not in seen:
                    seen.add(name)
                    yield name, header, rows
                name, header, rows = rec[1], None, []
            elif rec[0] == "Address":
                header = rec
            elif header is not None:
                rows.append(dict(zip(header, rec)))
        if name is not None and name not in seen:
            yield name, header, rows


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def short(name: str) -> str:
    m = re.search(r"::(\w+)(<[^(]*>)?\(", name)
    return (m.group(1) + (m.group(2) or "")) if m else name[:80]


def summarise(name: str, header: list[str], rows: list[dict], top: int, context: int) -> None:
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    first = rows[0]
    warps = num(first["Instructions Executed"])  # the first instruction runs once per warp
    total_inst = sum(num(r["Instructions Executed"]) for r in rows)
    total_samp = sum(num(r["Warp Stall Sampling (All Samples)"]) for r in rows)
    print(f"== {short(name)}: {total_inst:.4g} warp instructions ({total_inst / warps:.0f} per warp "
          f"of {warps:.0f}), {total_samp:.0f} stall samples")
    groups: dict[float, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[round(num(r["Instructions Executed"]) / warps, 2)].append(r)
    order = sorted(groups, key=lambda k: -sum(num(r["Instructions Executed"]) for r in groups[k]))
    for k in order[:8]:
        g = groups[k]
        inst = sum(num(r["Instructions Executed"]) for r in g)
        samp = sum(num(r["Warp Stall Sampling (All Samples)"]) for r in g)
        reasons = collections.Counter()
        for r in g:
            for s in stalls:
                reasons[s[6:]] += num(r[s])
        why = ", ".join(f"{s} {100 * v / max(samp, 1):.0f}%" for s, v in reasons.most_common(3) if v)
        print(f"  executed x {k:5.2f} per warp: {len(g):4d} instructions, "
              f"{100 * inst / total_inst:5.1f}% of instructions, "
              f"{100 * samp / max(total_samp, 1):5.1f}% of samples ({why})")
    reasons = collections.Counter()
    for r in rows:
        for s in stalls:
            reasons[s[6:]] += num(r[s])
    print("  stall reasons: " + ", ".join(f"{s} {100 * v / max(total_samp, 1):.1f}%"
                                          for s, v in reasons.most_common(8) if v))
    print("  most stall samples:")
    ranked = sorted(range(len(rows)), key=lambda i: -num(rows[i]["Warp Stall Sampling (All Samples)"]))
    for i in ranked[:top]:
        r = rows[i]
        samp = num(r["Warp Stall Sampling (All Samples)"])
        main = max(stalls, key=lambda s: num(r[s]))[6:]
        print(f"    {100 * samp / max(total_samp, 1):5.1f}%  x{num(r['Instructions Executed']) / warps:5.2f}"
              f"  [{main}]  {r['Source'].strip()}")
        for j in range(max(0, i - context), i):
            print(f"             before: x{num(rows[j]['Instructions Executed']) / warps:5.2f}  "
                  f"{rows[j]['Source'].strip()}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --page source --csv --print-source sass output (.gz ok)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--context", type=int, default=0,
                   help="instructions shown before each top one (what it waits for)")
    p.add_argument("--kernel", default="", help="only kernels whose name contains this")
    a = p.parse_args()
    found = False
    for name, header, rows in blocks(a.csv):
        if a.kernel in name and rows:
            found = True
            summarise(name, header, rows, a.top, a.context)
    if not found:
        sys.exit(f"no kernel matching {a.kernel!r} in {a.csv}")


if __name__ == "__main__":
    main()
