"""The retry rule of readers racing a writer, for header-only readers (torch-free).

``torchst.sharding.checkpoint`` describes the protocol: a reader notes the file that defines
the checkpoint (its *anchor*: the index, or the single file of a directory without one), reads
what it needs, and checks that the anchor is still the same file; if not, a writer committed
meanwhile and the reader starts again.  This module holds the shared pieces: the number of
attempts, the backoff, the error, and ``HeldAnchor`` for readers that only parse headers
(``torchst.resolve``, hence ``torchst inspect`` / ``verify``).
"""

from __future__ import annotations

import os
import random
import time

from ..errors import CheckpointChangedError
from .index import INDEX_SUFFIX, index_filename
from .plan import SINGLE_FILE

__all__ = ["OPEN_ATTEMPTS", "HeldAnchor", "anchor_path", "backoff", "changed_error"]

# A writer commits at most a few times a second; a reader that loses this many races in a row
# (about 0.4 s of backoff in all) is facing a writer in a tight loop and should hear about it.
OPEN_ATTEMPTS = 10
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def backoff(attempt: int) -> None:
    """Sleep before attempt ``attempt + 1``: 2 ms doubling up to 100 ms, jittered."""
    time.sleep(min(0.1, 0.002 * 2**attempt) * (0.5 + random.random()))


def changed_error(source: str) -> CheckpointChangedError:
    return CheckpointChangedError(
        f"{source}: the checkpoint changed {OPEN_ATTEMPTS} times while it was being opened; a writer is re-saving "
        "it.  Retry when the writer pauses, or load a checkpoint the writer no longer replaces"
    )


def anchor_path(path: str) -> str | None:
    """The file that defines the checkpoint at ``path`` (None when there is none to find).

    >>> anchor_path("ckpt")
    'ckpt/model.safetensors.index.json'
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        return None
    for name in (index_filename(), SINGLE_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    files = [e for e in entries if e.endswith(".safetensors")]
    if len(indexes) == 1:
        return os.path.join(path, indexes[0])
    if not indexes and len(files) == 1:
        return os.path.join(path, files[0])
    return None


class HeldAnchor:
    """The anchor of ``path``, held open so that its inode cannot be reused while we compare.

    >>> with HeldAnchor.of("ckpt") as anchor:
    ...     anchor.unchanged("ckpt")
    True
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, _O_READ)
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)

    @classmethod
    def of(cls, source: str) -> HeldAnchor | None:
        """Hold the anchor of ``source``; None when there is none (the caller reports why)."""
        path = anchor_path(source)
        return None if path is None else cls(path)

    def unchanged(self, source: str) -> bool:
        """``source`` still resolves to this very file, unmodified."""
        try:
            if anchor_path(source) != self.path:
                return False
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size) == self.identity

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> HeldAnchor:  # noqa: PYI034 - subclasses are not part of the API
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
