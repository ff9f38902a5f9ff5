"""blossomrec_cuda: BlossomRec block-sparse attention as torch ops (CPU and CUDA kernels)."""
from __future__ import annotations

import torch

from ._version import __version__

def _load_extension() -> None:
    try:
        from . import _build_info
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "blossomrec_cuda's compiled extension is missing. Build it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)."
        ) from e
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if built != running:
        raise ImportError(
            f"blossomrec_cuda was built against torch {built} but torch {running} is installed. "
            "Rebuild it against this torch: `pip install --no-build-isolation --force-reinstall "
            "--no-deps .` (or `python setup.py build_ext --inplace` for a checkout).")
    try:
        from . import _C  # noqa: F401  (registers torch.ops.blossomrec.*)
    except ImportError as e:
        raise ImportError(
            f"blossomrec_cuda._C failed to load ({e}). Rebuild it against the installed torch: "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`") from e


_load_extension()

from . import reference  # noqa: E402
from .ops import (  # noqa: E402
    SeqLayout,
    blossom_attention,
    rope,
    select_blocks,
    seq_layout,
    sparse_attention,
)

WITH_CUDA: bool
from ._build_info import WITH_CUDA  # noqa: E402
from .attention import BlossomAttention, DenseAttention  # noqa: E402

__all__ = [
    "__version__",
    "BlossomAttention",
    "DenseAttention",
    "SeqLayout",
    "WITH_CUDA",
    "blossom_attention",
    "reference",
    "rope",
    "select_blocks",
    "seq_layout",
    "sparse_attention",
]
