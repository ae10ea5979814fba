"""Build and packaging for lhattn.

    pip install --no-build-isolation -e .      # editable: puts lhattn/_C*.so next to the sources
    python setup.py build_ext --inplace        # just (re)build lhattn/_C*.so in place

`lhattn._C` holds the C++ ops of csrc/*.cpp. The CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp)
are added only when the installed torch has CUDA and nvcc is found; LHATTN_FORCE_CPU=1 skips them.
The Triton kernels in the top-level folder kernels/ ship as the subpackage `lhattn.kernels`.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home_hint() -> None:
    """Set CUDA_HOME to /usr/local/cuda when it is unset and the toolkit torch would guess has no CUDA headers:
    torch.utils.cpp_extension takes the parent of the first `nvcc` on PATH, and a wrapper script such as
    /usr/local/bin/nvcc (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) makes that /usr/local.  Runs before the
    import of torch.utils.cpp_extension, which reads CUDA_HOME once."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or torch.version.cuda is None:
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else "/usr/local/cuda"
    header = os.path.join("include", "cuda_runtime_api.h")
    if not os.path.exists(os.path.join(guess, header)) and os.path.exists(os.path.join("/usr/local/cuda", header)):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


_cuda_home_hint()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _sources(pattern: str) -> list:
    """Files matching `pattern` under the repo root, as sorted paths relative to it."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvcc_found() -> bool:
    if CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None


def _build_cuda() -> bool:
    if os.environ.get("LHATTN_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and _nvcc_found()


def _openmp_flags() -> tuple:
    """(compile, link) flags so at::parallel_for runs in parallel, as torch's own build does."""
    if not torch.backends.openmp.is_available():
        return [], []
    if sys.platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "win32":
        return ["/openmp"], []
    return [], []  # macOS: Apple clang has no -fopenmp; parallel_for then runs serially


def _extension():
    omp_compile, omp_link = _openmp_flags()
    sources = _sources("csrc/*.cpp")
    extra_compile_args = {"cxx": ["-O3", *omp_compile]}
    if _build_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        extra_compile_args["cxx"].append("-DWITH_CUDA")
        extra_compile_args["nvcc"] = ["-O3", "-DWITH_CUDA", "--expt-relaxed-constexpr"]
        ext_class = CUDAExtension
    else:
        ext_class = CppExtension
    return ext_class(
        name="lhattn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=omp_link,
    )


def _packages() -> tuple:
    """`lhattn` and its subpackages, plus kernels/ mapped to `lhattn.kernels` (with its own)."""
    packages = find_packages(where=ROOT, include=["lhattn", "lhattn.*"])
    package_dir = {}
    if os.path.isdir(os.path.join(ROOT, "kernels")):
        package_dir["lhattn.kernels"] = "kernels"
        packages.append("lhattn.kernels")
        packages += ["lhattn.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))]
    return packages, package_dir


_PACKAGES, _PACKAGE_DIR = _packages()

setup(
    name="lhattn",
    version="0.1.0",
    description="Long-sequence attention for PyTorch: sliding window + global, LSG and HAT patterns",
    python_requires=">=3.9",
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIR,
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "numpy"],
    extras_require={
        "triton": ["triton"],
        "hf": ["transformers"],
        "test": ["pytest", "transformers", "lsg-converter"],
    },
    zip_safe=False,
)
