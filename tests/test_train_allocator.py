"""The malloc settings that keep a training step's freed memory for the next step (nanoseek/train/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from nanoseek.train.allocator import keep_freed_memory

def faults_per_step():
    x = torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        x = torch.ones(16 << 20)
        del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

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
    assert plain > 10_000  # 64 MiB = 16,384 pages of 4 KiB, faulted in on every allocation
    assert kept < 100  # the same heap memory, already mapped


def test_environment_variable_turns_it_off():
    env = {**os.environ, "NANOSEEK_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env).stdout
    applied, _, plain, kept = out.split()
    assert applied == "False" and float(kept) > 0.5 * float(plain)
