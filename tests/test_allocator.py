"""The malloc settings that keep a training step's freed memory for the next step (nanoseek/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from nanoseek.allocator import keep_freed_memory
def faults_per_step():
    f = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():  # a training step's pattern: several large buffers alive together, then all freed
        xs = [torch.ones(n << 18) for n in (64, 16, 40, 8, 64, 24)]  # MiB
        del xs
    for _ in range(3):
        step()
    before = f()
    for _ in range(6):
        step()
    return (f() - before) / 6
plain = faults_per_step()
applied = keep_freed_memory()
print(applied, keep_freed_memory(), plain, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    applied, again, plain, kept = out[0] == "True", out[1] == "True", float(out[2]), float(out[3])
    if not applied:
        pytest.skip("not glibc")
    assert again  # idempotent
    assert plain > 10_000  # each buffer above the mmap threshold is faulted in again, 4 KiB at a time
    assert kept < 0.2 * plain  # the same heap memory, already mapped (0 to 6% of the faults here)


def test_environment_variable_turns_it_off():
    env = {**os.environ, "NANOSEEK_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env).stdout
    applied, _, plain, kept = out.split()
    # glibc's own threshold rises as blocks are freed, but blocks above 32 MiB (the 64 MiB ones) always come
    # from a fresh mmap: still faulted in every step
    assert applied == "False" and float(kept) > 10_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_other_devices_are_left_alone():
    code = "from nanoseek.allocator import keep_freed_memory as k; print(k('meta'), k('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"  # a device with its own allocator: nothing applied
    assert out[1] in ("True", "False")  # False only without glibc
