"""Atomic file writes: temporary file in the target directory, flush, fsync, os.replace.

Readers never observe a half-written file, and a file that is still memory-mapped by a
reader keeps its old contents (the old inode lives until the mapping goes away).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir", "temp_path"]

WRITE_BUFFER = 8 << 20  # coalesces many small tensors into few syscalls; large writes bypass it


def temp_path(path: str | os.PathLike[str]) -> str:
    """A unique hidden sibling of ``path``, on the same filesystem so os.replace is atomic."""
    path = os.fspath(path)
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without error.

    >>> with atomic_write("out.bin", fsync=True) as f:
    ...     f.write(b"payload")
    """
    path = os.fspath(path)
    tmp = temp_path(path)
    # Not a with-block: the file must be closed *before* os.replace, and unlinked on failure.
    f = open(tmp, "xb", buffering=WRITE_BUFFER)  # noqa: SIM115
    try:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)  # commit point: before it the old file, after it the new one
    except BaseException:
        f.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(os.path.dirname(path) or ".")
