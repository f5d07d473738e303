"""Run a function in N local gloo processes and collect what each returns (tests and benchmarks).

``torchrun`` is the launcher for real jobs; this is the same environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE)
set up in-process so a test can start 2-4 CPU ranks and compare their results with a single-process run.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..atomic import atomic_open


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, timeout_s: float,
            threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    result: Any
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world_size, *args))
        dist.barrier()  # gloo may abort at exit if a peer is still using the group
    except BaseException as e:  # report, do not hang the parent
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    with atomic_open(Path(out_dir, f"rank{rank}.pkl"), "wb") as f:  # before teardown, which may abort
        f.write(pickle.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_spawned(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; return the results by rank.

    ``fn`` must be importable (a module-level function). A rank's exception is re-raised here as a
    RuntimeError carrying its traceback; collectives time out after ``timeout_s``.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args, timeout_s, threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        for proc in ctx.processes:  # every rank runs to its end: none is killed because a peer failed first
            proc.join()
        outcomes = []
        for rank, proc in enumerate(ctx.processes):
            path = Path(out_dir, f"rank{rank}.pkl")
            if path.is_file():
                outcomes.append(pickle.loads(path.read_bytes()))  # our own files
            else:
                outcomes.append(("error", f"rank {rank}: the process exited with code {proc.exitcode} "
                                          "before reporting a result"))
    errors = [value for status, value in outcomes if status == "error"]
    if errors:  # the root cause first: the other ranks usually only saw their peer disappear
        errors.sort(key=lambda text: "Connection closed by peer" in text or "timed out" in text.lower())
        raise RuntimeError("\n".join(errors))
    return [value for _, value in outcomes]
