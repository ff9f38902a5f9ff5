"""benchmarks/accuracy_table.py: the README's accuracy table and the paired seed statistics."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("accuracy_table", REPO / "benchmarks/accuracy_table.py")
at = importlib.util.module_from_spec(_spec)
sys.modules["accuracy_table"] = at  # dataclasses look their module up while the class is built
_spec.loader.exec_module(at)


def _row(method: str, seed: int, ndcg: float, full: float = 0.05, epochs: int = 12,
         dataset: str = "toy", max_len: int = 50) -> dict:
    attention, backend = ("dense", "ops") if method == "dense" else ("blossom", method)
    return {"dataset": dataset, "attention": attention, "backend": backend,
            "config": {"max_len": max_len, "seed": seed, "epochs": epochs, "hidden": 128,
                       "attention": attention, "backend": backend, "jsonl": "x"},
            "test": {"sampled": {"ndcg@10": ndcg, "recall@10": 0.5, "mrr@10": 0.3},
                     "full": {"ndcg@10": full, "recall@10": 0.1, "mrr@10": 0.02}}}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paired_statistics_match_a_hand_computation():
    a, b = [0.50, 0.52, 0.47], [0.48, 0.49, 0.46]
    r = at.paired(a, b)
    d = [0.02, 0.03, 0.01]
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(statistics.fmean(d))
    assert r["sd"] == pytest.approx(statistics.stdev(d))
    # t(0.975, 2) = 4.303: half-width 4.303 * 0.01 / sqrt(3) = 0.0248 > mean 0.02: not separated.
    assert r["half_width"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert not r["separated"]
    # The same mean with a tighter spread is separated.
    assert at.paired([0.50, 0.51, 0.52], [0.48, 0.49, 0.50])["separated"]
    # One seed: no spread, never separated.
    one = at.paired([0.6], [0.5])
    assert one["n"] == 1 and math.isnan(one["sd"]) and not one["separated"]


def test_table_groups_methods_and_seeds(tmp_path):
    f = _write(tmp_path / "a.jsonl", [
        _row("ops", 0, 0.40), _row("ops", 1, 0.42), _row("ops", 2, 0.41),
        _row("reference", 0, 0.40), _row("reference", 1, 0.42),
        _row("dense", 0, 0.45), _row("dense", 1, 0.46), _row("dense", 2, 0.47),
        _row("ops", 0, 0.30, max_len=200)])
    text = at.format_tables(at.load([f]), "sampled", "ndcg@10")
    assert "| toy (50) | s0: 0.4000 / 0.0500, s1: 0.4200 / 0.0500, s2: 0.4100 / 0.0500 |" in text
    assert "| toy (200) | s0: 0.3000 / 0.0500 | - | - |" in text
    # ops - reference over the two common seeds: identical -> mean 0, not separated.
    assert "| toy (50) | ops - reference | 0, 1 | +0.0000 +- 0.0000 | 0.0000 | no (n = 2) |" in text
    # ops - dense: -0.05, -0.04, -0.06 -> mean -0.05, sd 0.01, half-width 0.0248: separated.
    assert "| toy (50) | ops - dense | 0, 1, 2 | -0.0500 +- 0.0248 | 0.0100 | yes |" in text
    assert "Notes:" not in text


def test_later_rows_replace_earlier_ones_and_mixed_settings_are_reported(tmp_path):
    first = _write(tmp_path / "1.jsonl", [_row("ops", 0, 0.40), _row("dense", 0, 0.45)])
    second = _write(tmp_path / "2.jsonl", [_row("ops", 0, 0.41, epochs=20)])
    groups = at.load([first, second])
    g = groups[("toy", 50)]
    assert at.metric(g.runs[("ops", 0)], "sampled", "ndcg@10") == 0.41
    text = at.format_tables(groups, "sampled", "ndcg@10")
    assert "toy (50): ops seed 0 from 1.jsonl replaced by 2.jsonl" in text
    assert "toy (50): rows with 2 different training settings are mixed in this group" in text


def test_not_a_result_row_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dataset": "x"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: not a training result row"):
        at.load([bad])
    assert at.main([str(tmp_path / "missing.jsonl")]) == 2


def test_recorded_sweep_gives_the_readme_numbers(capsys):
    """The H200 sweep files in benchmarks/results reproduce the published MovieLens-200 numbers:
    the seed-0/1 table row (docs/RESULTS.md) and the five-seed paired differences (README and
    docs/RESULTS.md), sampled and full ranking."""
    assert at.main([]) == 0
    out = capsys.readouterr().out
    assert ("| ml-latest-small (200) | s0: 0.5147 / 0.0566, s1: 0.5121 / 0.0532, s2: 0.5257 / 0.0578, "
            "s3: 0.5238 / 0.0619, s4: 0.5162 / 0.0611 | s0: 0.5124 / 0.0570, s1: 0.5209 / 0.0568, "
            "s2: 0.5266 / 0.0580, s3: 0.5225 / 0.0630, s4: 0.5145 / 0.0631 |") in out
    assert "| ml-latest-small (200) | ops - reference | 0, 1, 2, 3, 4 | -0.0009 +- 0.0057 |" in out
    assert "| ml-latest-small (200) | ops - dense | 0, 1, 2, 3, 4 | -0.0069 +- 0.0158 |" in out
    assert "| amazon-video-games (50) | ops - dense | 0, 1, 2, 3, 4 | -0.0064 +- 0.0035 | 0.0028 | yes |" in out
    assert at.main(["--protocol", "full"]) == 0
    full = capsys.readouterr().out
    assert "| ml-latest-small (200) | ops - reference | 0, 1, 2, 3, 4 | -0.0015 +- 0.0018 |" in full
    assert "| ml-latest-small (200) | ops - dense | 0, 1, 2, 3, 4 | +0.0005 +- 0.0098 |" in full
    readme = (REPO / "README.md").read_text()
    results = (REPO / "docs" / "RESULTS.md").read_text()  # the per-seed table and its provenance
    assert "| MovieLens latest-small (200) | 0.5147 / 0.0566, 0.5121 / 0.0532 | 0.5124 / 0.0570, 0.5209 / 0.0568 |" in results
    for doc in (readme, results):
        assert ("| MovieLens latest-small (200) | -0.0009 +- 0.0057 / -0.0015 +- 0.0018 | "
                "-0.0069 +- 0.0158 / +0.0005 +- 0.0098 |") in doc
