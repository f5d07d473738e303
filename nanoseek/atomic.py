"""Atomic file writes: whoever reads a file back (a resume, a rerun, a report) finds the previous version or the
new one, never a torn one.

Each writer here writes under a hidden temporary name in the target's directory, fsyncs it and renames it over
the target (``rename(2)`` is atomic within a file system). An error before the rename removes the temporary
file; a kill leaves at most a hidden temporary file, and the target as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in directory ``path`` durable (best effort: not every system can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under directory ``path`` (symbolic links are left alone), then each directory, ``path``
    last: before a staged directory is renamed into place."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error it is fsynced and
    renamed over ``path``, otherwise removed. ``suffix`` ends the temporary name (for writers that pick the
    format by it)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, renamed over ``path`` when the block ends without an error."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kwargs: Any) -> None:
    """``json.dumps(obj, indent=indent, **kwargs)`` and a newline."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``shutil.copyfile(src, dst)``; also a ``copy_function`` for ``shutil.copytree``."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_savefig(fig, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)``; the temporary name ends in ``path``'s suffix, which gives the format."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, **kwargs)
