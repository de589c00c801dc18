"""Building and checking the engine's own C++ CPU kernels (``csrc/``): one loader for all of them.

Each kernel is a torch C++ extension built on first use with torch's extension loader (a C++ compiler
is needed; ~20 s once, cached by torch under ``~/.cache/torch_extensions``) and used only where its
module's ``available()`` says so: an x86 CPU listing ``avx2`` and ``fma``, the build succeeded, and a
small product matches float64.  ``MINIMIND_NO_CPP_EXTENSIONS=1`` keeps torch's own kernels everywhere.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from minimind.train.device import cpu_flags

__all__ = ["avx2_cpu", "build_and_check", "load_extension"]

CSRC = Path(__file__).with_name("csrc")


def avx2_cpu() -> bool:
    """An x86 CPU with AVX2 and FMA, and C++ extensions not switched off."""
    if os.environ.get("MINIMIND_NO_CPP_EXTENSIONS", "") not in ("", "0"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_flags()


def load_extension(load: Callable[..., object], name: str, source: str) -> None:
    """Build and load ``csrc/<source>`` as extension ``name`` with ``load`` (torch's C++ loader).

    -fopenmp: the kernels split their output rows with at::parallel_for, whose OpenMP pragma is
    dropped without it (every product then ran on one thread: 1.5x slower at one row on 2 cores,
    1.9x at eight).  Not linked: the OpenMP calls resolve to the runtime torch has already loaded, so
    the kernels share torch's thread pool and torch.set_num_threads.  A compiler without OpenMP gets
    the one-thread build rather than no kernel."""
    flags = ["-O3", "-mavx2", "-mfma"]
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    path = str(CSRC / source)
    try:
        load(name=name, sources=[path], extra_cflags=flags + openmp, is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.SubprocessError):
        if not openmp:
            raise
        load(name=name, sources=[path], extra_cflags=flags, is_python_module=False, verbose=False)


def build_and_check(what: str, build: Callable[[], None], check: Callable[[], bool]) -> bool:
    """Run ``build`` then ``check`` (a small product against float64) where :func:`avx2_cpu`; a
    failed build (no compiler, an old toolchain) warns once and returns False."""
    if not avx2_cpu():
        return False
    try:
        print(f"minimind: loading the AVX2 {what} kernel (built on first use, ~20 s) ...", file=sys.stderr,
              flush=True)
        build()
        return bool(check())
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        warnings.warn(f"the AVX2 {what} kernel is unavailable ({type(err).__name__}: {err}); "
                      "using torch's kernels", stacklevel=3)
        return False
