"""Build blossomrec_cuda._C: a CUDAExtension when torch has CUDA and nvcc is found (or
BLOSSOMREC_FORCE_CUDA=1), else a CPU-only CppExtension. Environment knobs:

- BLOSSOMREC_FORCE_CUDA=1 / BLOSSOMREC_CPU_ONLY=1: force either build;
- TORCH_CUDA_ARCH_LIST: GPU archs (default "8.0;9.0" when no GPU is visible);
- MAX_JOBS: parallel compile jobs (ninja);
- CUDA_HOME: the toolkit; when unset we resolve nvcc's real path (a wrapper in /usr/local/bin would
  otherwise make torch guess CUDA_HOME=/usr/local and fail to link -lcudart).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    real = os.path.realpath(nvcc)
    # A shell wrapper (exec /path/to/cuda/bin/nvcc "$@") hides the toolkit: read the path from it.
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    real = os.path.realpath(token)
                    break
    except OSError:
        pass
    home = os.path.dirname(os.path.dirname(real))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        os.environ["CUDA_HOME"] = home


_resolve_cuda_home()

import torch  # noqa: E402  (CUDA_HOME must be set before torch.utils.cpp_extension reads it)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402


def _want_cuda():
    if os.environ.get("BLOSSOMREC_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("BLOSSOMREC_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extra_cuda_includes():
    """Torch's CUDA headers include cusparse.h / cublas_v2.h; a bare toolkit may lack them, but
    torch's pip dependencies ship them under site-packages/nvidia/*/include."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/*/include"):
            for d in glob.glob(os.path.join(site, pattern)):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def _write_build_info(with_cuda):
    with open(os.path.join(ROOT, "blossomrec_cuda", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


def _extension():
    with_cuda = _want_cuda()
    _write_build_info(with_cuda)
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -ffp-contract=off: products and sums rounded one by one, as the reference's eager ops round
    # them (GCC fuses them into FMAs by default where the target has FMA, e.g. aarch64)
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    if not with_cuda:
        return CppExtension("blossomrec_cuda._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                            py_limited_api=False)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DBLOSSOMREC_WITH_CUDA"]
    return CUDAExtension("blossomrec_cuda._C", sources,
                         include_dirs=include_dirs + _extra_cuda_includes(),
                         extra_compile_args={"cxx": cxx + ["-DBLOSSOMREC_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


def _version():
    """__version__ from blossomrec_cuda/_version.py (one place for the package and its metadata)."""
    scope = {}
    with open(os.path.join(ROOT, "blossomrec_cuda", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


setup(
    name="blossomrec_cuda",
    version=_version(),
    description="Fast BlossomRec block-sparse attention for sequential recommenders (CUDA + CPU)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    url="https://github.com/blossomrec/blossomrec_cuda",
    packages=["blossomrec_cuda", "blossomrec_cuda.rec"],
    package_data={"blossomrec_cuda": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    # The ops and modules need torch alone (>= 2.5 for SDPA's enable_gqa in DenseAttention); the
    # recommender (blossomrec_cuda.rec) also reads data with numpy and shows progress with tqdm.
    install_requires=["torch>=2.5"],
    extras_require={"rec": ["numpy", "tqdm"]},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
