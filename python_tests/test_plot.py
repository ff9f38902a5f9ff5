"""benchmarks/plot.py: full-length shapes against N, ragged shapes in figures of their own."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _plot_module():
    spec = importlib.util.spec_from_file_location("plot", REPO / "benchmarks" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, shape, B, N, ms, peak=None, status="ok"):
    return dict(method=method, shape=shape, B=B, N=N, H=8, KVH=2, D=16, dtype="bfloat16",
                **{"pass": "fwd+bwd"}, ms=ms, peak_mib=peak, device="test", run="r", status=status)


def test_ragged_shapes_get_their_own_figure(tmp_path):
    rows = [_row("blossomrec", "S1", 2048, 50, 0.5, 162.0), _row("sdpa_dense", "S1", 2048, 50, 0.9, 172.0),
            _row("blossomrec", "S2", 512, 200, 0.7, 169.0), _row("sdpa_dense", "S2", 512, 200, 0.76, 172.0),
            _row("blossomrec", "R1", 2048, 50, 0.45, 162.0), _row("blossomrec_graph", "R1", 2048, 50, 0.24),
            _row("sdpa_dense", "R1", 2048, 50, 0.9, 172.0),
            _row("flex_stis", "R1", 2048, 50, 0.0, status="failed: something")]
    results = tmp_path / "bench.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _plot_module().main([str(results), "--out-dir", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["fwd-bwd-d16-bfloat16-ragged.png", "fwd-bwd-d16-bfloat16.png"], names
    for p in (tmp_path / "plots").iterdir():
        assert p.stat().st_size > 10_000, f"{p.name} looks empty"
