"""Where nanoseek keeps what it caches: tokenizers and token arrays (nanoseek.train.data) and compiled kernels
(nanoseek.cpu_kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(configured: str | None = None) -> Path:
    """``configured`` (e.g. --cache-dir), else $NANOSEEK_CACHE, else $XDG_CACHE_HOME/nanoseek or ~/.cache/nanoseek.
    Not created here."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("NANOSEEK_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoseek"
