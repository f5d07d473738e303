"""nanoseek's C++ kernels for x86-64 CPUs with AVX-512 bf16 (AMD Zen 4 / 5, Intel since Cooper Lake): how they are
built and loaded.

Each kernel is one C++ source next to its Python caller (model/csrc/causal_attention_bf16.cpp, used by
model/cpu_attention.py; model/csrc/grouped_mm_bf16.cpp, used by model/cpu_grouped_mm.py; train/csrc/master_adamw.cpp,
used by train/precision.py). It is compiled with the system's
C++ compiler (``$CXX``, else g++ / c++) at first use, a few seconds, and cached under $NANOSEEK_CACHE (else
~/.cache/nanoseek) / kernels, keyed by the source, the flags and the compiler. It needs no torch headers and runs
through ctypes; OpenMP comes from libgomp.so.1, which a torch process already holds, so a kernel shares torch's
threads. Where a kernel cannot run (not Linux on x86-64, a CPU without avx512_bf16, no compiler, a failed build,
``NANOSEEK_CPU_KERNELS=0``), :func:`library` returns None and the caller keeps its other path; a failed build says
why once. Each kernel can be switched off for a block (:func:`disabled`), e.g. to compare with PyTorch's path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .atomic import atomic_path
from .paths import cache_root

FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16", "-mfma"]


def library(source: Path, what: str, fallback: str) -> ctypes.CDLL | None:
    """The compiled ``source`` loaded, or None where it cannot run. ``what`` names the kernel and ``fallback``
    what runs instead, in the warning of a failed build. Callers cache the result (one build attempt per
    process)."""
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    if "avx512_bf16" not in flags or "avx512bw" not in flags:
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        return None
    try:
        lib = ctypes.CDLL(str(build(source, compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"nanoseek: {what} was not built ({e}); {fallback}", RuntimeWarning, stacklevel=3)
        return None
    return lib if lib.nanoseek_cpu_supported() else None


def build(source: Path, compiler: str) -> Path:
    """The compiled library of ``source``, built once per source, flags and compiler, under cache_root() / kernels;
    written under a temporary name and renamed (nanoseek.atomic), so concurrent builds (the ranks of a torchrun
    job) each leave a whole file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS + [compiler, version]).encode()).hexdigest()[:16]
    directory = cache_root() / "kernels"
    target = directory / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".so") as partial:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial)], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise OSError(f"{compiler} failed: {last}")
    return target


# > 0 inside disabled(kernel). A dict of module globals: torch.compile guards on the value it reads, so a graph traced
# inside disabled() is not reused outside it
_disabled = {"attention": 0, "grouped_mm": 0}


@contextlib.contextmanager
def disabled(kernel: str) -> Iterator[None]:
    """Inside this block ``kernel`` ("attention", "grouped_mm") is not taken (compiled models: those traced inside
    it); its callers take PyTorch's path."""
    _disabled[kernel] += 1
    try:
        yield
    finally:
        _disabled[kernel] -= 1


def enabled(kernel: str) -> bool:
    """Not inside :func:`disabled` for ``kernel``."""
    return not _disabled[kernel]


def threads() -> int:
    """Threads of a kernel call: torch's intra-op threads (the kernels run on the same OpenMP team)."""
    return max(1, torch.get_num_threads())
