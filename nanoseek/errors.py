"""The errors the CLI prints as one line: unreadable checkpoints (a ValueError), and which rank prints under
torchrun."""

from __future__ import annotations

import os
import sys
import time

RANK0_GRACE_S = 10.0  # how long another rank waits for rank 0 to report an error they share (see report_error)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: bad path, malformed config, missing / unexpected / mis-shaped tensors."""


def on_rank0() -> bool:
    """True in one process and on rank 0 of a torchrun job."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def defer_to_rank0() -> None:
    """Under a torchrun agent, a rank other than 0 that stops on an error rank 0 shares first gives rank 0 the
    time to say it and end the job (torchrun stops every rank once one has exited)."""
    if not on_rank0() and "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(RANK0_GRACE_S)


def report_error(command: str, error: BaseException) -> None:
    """``nanoseek COMMAND: error: ...`` on stderr, once per job where it can tell.

    Under torchrun every rank usually stops for the same reason (the same flags and files, rank 0's broadcast
    error, a NaN streak): rank 0 says it, and another rank first waits for rank 0 to end the job (torchrun stops
    every rank once one has exited). An error one rank hit on its own (``error.rank``: a collective that failed as
    seen from there, a file only it could not read), or one that rank 0 did not end the job with, is said by that
    rank, with its number: never lost, at worst said twice."""
    rank = getattr(error, "rank", None)
    if rank is None and not on_rank0():
        defer_to_rank0()  # if rank 0 stops for the same reason, torchrun ends this process here
        rank = int(os.environ["RANK"])
    print(f"nanoseek {command}: error: " + (f"rank {rank}: " if rank is not None else "") + str(error),
          file=sys.stderr)
