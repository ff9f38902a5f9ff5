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
