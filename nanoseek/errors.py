"""The errors the CLI prints as one line: unreadable checkpoints (a ValueError), and which rank prints under
torchrun."""

from __future__ import annotations

import os
import sys
import time

RANK0_GRACE_S = 10.0  # how long a silent rank waits for rank 0 to report the error they share (see report_error)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: bad path, malformed config, missing / unexpected / mis-shaped tensors."""


def on_rank0() -> bool:
    """True in one process and on rank 0 of a torchrun job."""
    return int(os.environ.get("RANK", "0")) == 0


def report_error(command: str, error: BaseException) -> None:
    """``nanoseek COMMAND: error: ...`` on stderr, once per job.

    Under torchrun every rank usually stops for the same reason (the same flags and files, rank 0's broadcast
    error, a NaN streak): rank 0 alone says it. An error one rank hit on its own (``error.rank``, e.g. a
    collective that failed as seen from there) is said by that rank, with its number."""
    rank = getattr(error, "rank", None)
    if rank is not None:
        print(f"nanoseek {command}: error: rank {rank}: {error}", file=sys.stderr)
    elif on_rank0():
        print(f"nanoseek {command}: error: {error}", file=sys.stderr)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun stops every rank as soon as one exits: leave rank 0 the time to say it (it ends this wait)
        time.sleep(RANK0_GRACE_S)
