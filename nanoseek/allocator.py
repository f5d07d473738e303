"""Keep freed memory for reuse in CPU training and inference (glibc's malloc settings, applied to this process).

PyTorch's CPU allocator takes every tensor from malloc and gives it back when the tensor dies. glibc serves
blocks above its mmap threshold (128 KiB at first, rising to at most 32 MiB as such blocks are freed; many
activations, gradients and the logits of a training step are larger) with a fresh ``mmap`` and returns them
with ``munmap``, and it trims the heap's free top back to the kernel. So every step faults the same few GiB
in again, page by page, each page zeroed by the kernel: on the 2-core machine of
benchmarks/results/train_step.md about 300,000 page faults and a second of system time per step of the bench
preset, 20% of the step.

``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap and ``mallopt(M_TRIM_THRESHOLD, ...)`` stops
trimming it, so after the first step the same memory is reused: about 20,000 faults per step, steps 1.2x
faster (bench preset, bf16 and fp32; demo preset 1.24x); a 1900-token prefill of the demo model 1.35x faster.
The price: memory the process frees stays with it until it exits, and heap fragmentation adds some. Peak
resident memory of the bench preset rose 5%; the demo preset with batches alternating between two sequence
lengths held 3.17 GiB after 20 steps (flat to step 40) where it otherwise moved around 2.3 GiB.

Applied by ``nanoseek train`` (and the distributed trainer), ``generate`` / ``chat`` and ``eval-long`` when they
run on the CPU; from Python, call :func:`keep_freed_memory` yourself.

The environment variable ``NANOSEEK_KEEP_FREED_MEMORY=0`` turns this off. Other C libraries: nothing done.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory(device: torch.device | str = "cpu") -> bool:
    """Apply the settings above once per process when ``device`` is the CPU (other devices have their own
    allocators); return whether they are in effect."""
    global _applied
    if _applied:
        return True
    if torch.device(device).type != "cpu" or os.environ.get("NANOSEEK_KEEP_FREED_MEMORY", "1") == "0" \
            or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has no such tuning  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _applied
