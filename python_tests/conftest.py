"""Fixtures shared by every test: NaN-poisoned op outputs, per-test seeds, the ``cuda`` marker and
the shared data directory. Helpers that tests import live in ``helpers.py`` next to this file."""
from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch

# Make `import helpers` work from any test file without a python_tests package (pytest's rootdir
# conftest inserts this directory only under the default "prepend" import mode).
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Outputs the C++ ops allocate with at::empty come back filled with NaN (floating) or -777777
    (integer) (csrc/common/alloc.h), so an element a kernel forgets to write fails a test instead of
    passing by luck. The ops read the variable at every call, so setting it per test is enough."""
    monkeypatch.setenv("BLOSSOMREC_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """A seed per test, derived from its node id: reproducible run to run and independent of which
    other tests ran first, yet different between tests (and between parametrizations)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip with a reason where no GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def shared_data_dir() -> Path:
    """``$BLOSSOMREC_DATA`` if set, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get("BLOSSOMREC_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


@pytest.fixture
def shared_data() -> Path:
    """The shared data directory; the test skips with the path it looked in when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set BLOSSOMREC_DATA to its location)")
    return path
