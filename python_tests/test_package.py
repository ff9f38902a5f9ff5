"""The package as users meet it: version, license and type information."""
from __future__ import annotations

from pathlib import Path

import blossomrec_cuda

ROOT = Path(__file__).resolve().parents[1]


def test_version_license_and_py_typed():
    version = blossomrec_cuda.__version__
    assert isinstance(version, str) and version.count(".") == 2
    assert all(part.isdigit() for part in version.split("."))
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (Path(blossomrec_cuda.__file__).parent / "py.typed").is_file()
    # setup.py reads the same file, so the metadata's version is this one
    assert f'"{version}"' in (ROOT / "blossomrec_cuda" / "_version.py").read_text()


def _readme_python(marker: str) -> str:
    """The README's python example that contains ``marker``."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"one README example with {marker!r}, found {len(found)}"
    return found[0]


def test_readme_examples_run():
    """The README's op and module examples run as written (where no GPU is, on the CPU: "cuda" read
    as "cpu") and give what they say: shapes, gradients, zero rows for an empty sequence."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def run(marker: str) -> dict:
        code = _readme_python(marker)
        if dev == "cpu":
            code = (code.replace('device="cuda"', 'device="cpu"').replace(".cuda()", "")
                    .replace('torch.autocast("cuda"', 'torch.autocast("cpu"'))
        ns: dict = {}
        exec(compile(code, f"README.md example ({marker})", "exec"), ns)
        return ns

    op = run("blossom_attention(")
    out, q = op["out"], op["q"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert q.grad is not None and op["gates"].grad is not None
    assert (out[3] == 0).all(), "the empty sequence (length 0) gives zero rows"
    module = run("BlossomAttention(")
    assert tuple(module["y"].shape) == (32, 50, 128) and module["y"].dtype == torch.bfloat16
