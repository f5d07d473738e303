"""The device a command runs on, from its ``--device`` option: one check for train, generate, chat, eval-long."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device | None, what: str = "--device") -> torch.device:
    """``name`` as a torch.device (None: cuda if available, else cpu); a ValueError (one line, naming ``what``)
    for a name torch does not know, the data-less meta device, or cuda on a machine without it."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid {what} {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "meta":
        raise ValueError(f"{what} meta holds no data: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: CUDA is not available on this machine")
    return dev
