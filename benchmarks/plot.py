"""Plot benchmark results: time and peak memory against N, one line per method.

Reads a results file of bench_attention.py (JSON lines) and writes one PNG per (head dim, pass, dtype)
with two log-log panels, median time and peak extra memory against the sequence length N, for the
full-length shapes (the standard S1..S6 and --custom ones). Ragged shapes (R1) share N with S1, so
they get a figure of their own per (head dim, pass, dtype): bars of time and peak memory per method
and shape (``...-ragged.png``). Rows whose status is not "ok" are skipped and listed.

    python benchmarks/plot.py benchmarks/results/bench-h100-80gb-hbm3-20260101.jsonl --out-dir plots/
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RAGGED_PREFIX = "R"
METHOD_STYLE = {  # a fixed look per method, so that figures of different runs compare at a glance
    "blossomrec": ("tab:red", "o", "-"),
    "blossomrec_rows": ("tab:gray", "o", "-."),
    "blossomrec_gather": ("tab:purple", "o", ":"),
    "blossomrec_select": ("tab:orange", "v", "--"),
    "blossomrec_attn": ("tab:pink", "^", "--"),
    "blossomrec_graph": ("tab:red", "o", ":"),
    "sdpa_dense": ("tab:blue", "s", "-"),
    "sdpa_dense_graph": ("tab:blue", "s", ":"),
    "flex_stis": ("tab:green", "D", "-"),
    "flex_blossomrec": ("tab:olive", "P", "-"),
    "reference": ("tab:gray", "x", ":"),
}


def load_rows(path: Path, run: str | None) -> list[dict]:
    """Rows of ``run`` (default: the file's last run; "all": every run, later rows win)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} holds no rows")
    if run != "all":
        run = run or rows[-1]["run"]
        rows = [r for r in rows if r.get("run") == run]
        if not rows:
            raise SystemExit(f"{path} holds no rows of run {run!r}")
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """Writes the figures; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    usable = [r for r in rows if r.get("method") != "copy_bandwidth"
              and not str(r.get("shape", "")).startswith(RAGGED_PREFIX)]
    ragged = [r for r in rows if str(r.get("shape", "")).startswith(RAGGED_PREFIX)
              and r.get("status") == "ok"]
    skipped = [r for r in usable if r.get("status") != "ok"]
    for r in skipped:
        print(f"skipped {r['method']} {r['shape']} D={r['D']} {r['pass']}: {r['status'][:100]}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in usable:
        if r.get("status") == "ok":
            groups[(r["D"], r["pass"], r["dtype"])].append(r)
    written = []
    for (D, pass_, dtype), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        device = group[0].get("device", "")
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
        series: dict[str, dict[int, dict]] = defaultdict(dict)
        for r in group:
            series[r["method"]][r["N"]] = r  # a later row for the same N replaces an earlier one
        for method in sorted(series, key=lambda m: (m not in METHOD_STYLE, m)):
            points = [series[method][n] for n in sorted(series[method])]
            color, marker, style = METHOD_STYLE.get(method, (None, ".", "-"))
            ns = [p["N"] for p in points]
            ax_t.plot(ns, [p["ms"] for p in points], marker=marker, linestyle=style, color=color,
                      label=method)
            mem = [(p["N"], p["peak_mib"]) for p in points if p.get("peak_mib")]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker=marker, linestyle=style,
                          color=color, label=method)
        batches = sorted({(r["N"], r["B"]) for r in group})
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            batch_note = ", ".join(f"{b}@{n}" for n, b in batches)
            ax.set_xlabel(f"sequence length N  (B: {batch_note})", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        H, KVH = group[0]["H"], group[0]["KVH"]
        fig.suptitle(f"{pass_}, D={D}, H={H}, KVH={KVH}, {dtype} on {device} "
                     f"(run {group[0]['run']})", fontsize=10)
        written.append(_save(fig, out_dir / f"{_slug(pass_)}-d{D}-{_slug(dtype)}.png"))
    written += plot_ragged(ragged, out_dir)
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot_ragged(rows: list[dict], out_dir: Path) -> list[Path]:
    """One figure per (head dim, pass, dtype) of the ragged shapes: time and peak memory per method
    (bars), one group of bars per shape; the memory panel only for methods that record it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["D"], r["pass"], r["dtype"])].append(r)
    written = []
    for (D, pass_, dtype), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        latest = {(r["shape"], r["method"]): r for r in group}  # later rows replace earlier ones
        shape_row = {s: r for (s, _), r in latest.items()}
        shapes = sorted(shape_row)
        methods = sorted({m for _, m in latest}, key=lambda m: (m not in METHOD_STYLE, m))
        with_mem = [m for m in methods if any(latest.get((s, m), {}).get("peak_mib")
                                              for s in shapes)]
        panels = [("median time (ms)", "ms", methods)] + (
            [("peak extra memory (MiB)", "peak_mib", with_mem)] if with_mem else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
        for ax, (ylabel, key, ms) in zip(axes[0], panels):
            width = 0.8 / max(len(ms), 1)
            for i, method in enumerate(ms):
                color, _, style = METHOD_STYLE.get(method, (None, ".", "-"))
                xs = [j + i * width for j in range(len(shapes))]
                ys = [latest.get((s, method), {}).get(key) or 0 for s in shapes]
                ax.bar(xs, ys, width=width, color=color, label=method,
                       hatch=None if style == "-" else "//", edgecolor="white")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels([f"{s} (B={shape_row[s]['B']}, N={shape_row[s]['N']})"
                                for s in shapes], fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        first = group[0]
        fig.suptitle(f"ragged batches, {pass_}, D={D}, H={first['H']}, KVH={first['KVH']}, {dtype} "
                     f"on {first.get('device', '')} (run {first['run']})", fontsize=10)
        written.append(_save(fig, out_dir / f"{_slug(pass_)}-d{D}-{_slug(dtype)}-ragged.png"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results file (JSON lines) of bench_attention.py")
    p.add_argument("--out-dir", default="benchmarks/plots", help="where the PNGs go")
    p.add_argument("--run", help="run id to plot (default: the file's last run; 'all' for every run)")
    args = p.parse_args(argv)
    written = plot(load_rows(Path(args.results), args.run), Path(args.out_dir))
    if not written:
        print("no successful rows of full-length shapes to plot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
