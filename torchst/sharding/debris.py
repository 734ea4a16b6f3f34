"""Leftovers of interrupted saves: find them, remove them safely (``find_debris`` / ``cleanup``).

A sharded save writes every shard to a hidden temporary (``.tmp-<token>-<shard>``) and renames
or links it into place at the end.  A save killed midway (SIGKILL, out of memory, power loss)
leaves those temporaries behind, as large as the shards; the next successful save into the
same directory removes them.  ``cleanup`` does it on demand, and never removes:

- a file the committed index names (a save stopped after its transitional index was committed
  is complete under the temporary names; the next save or cleanup keeps it loadable);
- a temporary of a save in progress: every sharded save holds a shared ``flock`` on the
  directory while it runs, and ``cleanup`` takes it exclusively (``CheckpointLockedError`` when
  a save holds it).  Single-file temporaries (``.model.safetensors.tmp-…``) come from
  ``save_file``, which takes no lock: they are removed only once unmodified for ``stale_after``
  seconds (an hour by default), which is also the rule for every temporary on filesystems
  without ``flock``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from typing import NamedTuple

from ..errors import CheckpointLockedError, CheckpointNotFoundError, ShardIndexError
from .index import index_filename, read_index

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, the age rule applies
    fcntl = None  # type: ignore[assignment]

__all__ = ["STALE_AFTER", "Debris", "cleanup", "find_debris", "save_lock"]

# Temporaries of sharded saves (written under the directory lock) and of atomic single-file writes.
SHARD_TEMP = re.compile(r"^\.tmp-[0-9a-f]{12}-.+\.safetensors$")
ATOMIC_TEMP = re.compile(r"^\.model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?\.tmp-[0-9a-f]{12}$")
# A live writer keeps touching its temporary; one untouched for an hour belongs to no live save.
STALE_AFTER = 3600.0
_HELD: set[int] = set()


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) must not keep a save's lock alive after the save;
    # closing its copy (never LOCK_UN, which would release the parent's too) does that.
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class Debris(NamedTuple):
    """One leftover file: its path, size, seconds since last modified, and what left it."""

    path: str
    nbytes: int
    age: float
    kind: str  # "shard temporary" | "atomic-write temporary"


def _open_dir(directory: str) -> int | None:
    try:
        return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


@contextlib.contextmanager
def save_lock(directory: str) -> Iterator[None]:
    """Held (shared) by every sharded save into ``directory``, so ``cleanup`` can tell it is running.

    >>> with save_lock("ckpt"):
    ...     torchst.sharding.cleanup("ckpt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    torchst.errors.CheckpointLockedError: ckpt: a save into this directory is in progress ...
    """
    fd = _open_dir(directory) if fcntl is not None else None
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # no flock here: cleanup falls back to the age rule
            fcntl.flock(fd, fcntl.LOCK_SH)
        _HELD.add(fd)
        yield
    finally:
        if fd in _HELD:
            _HELD.discard(fd)
            os.close(fd)


def _referenced(directory: str) -> set[str] | None:
    """Names the committed index reads from (None when an index exists but cannot be read)."""
    path = os.path.join(directory, index_filename())
    if not os.path.exists(path):
        return set()
    try:
        return set(read_index(path).weight_map.values())
    except (ShardIndexError, OSError):
        return None


def find_debris(directory: str | os.PathLike[str]) -> list[Debris]:
    """Leftover temporaries of interrupted saves in ``directory`` (nothing is removed).

    >>> torchst.sharding.find_debris("ckpt")  # a checkpoint whose saves all finished
    []
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"{directory}: no such directory")
    referenced = _referenced(directory)
    now = time.time()
    out = []
    for name in sorted(os.listdir(directory)):
        if SHARD_TEMP.match(name):
            kind = "shard temporary"
            if referenced is None or name in referenced:
                continue  # the committed index reads from it (or we cannot tell): not debris
        elif ATOMIC_TEMP.match(name):
            kind = "atomic-write temporary"
        else:
            continue
        try:
            st = os.lstat(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # removed meanwhile
        out.append(Debris(os.path.join(directory, name), st.st_size, max(0.0, now - st.st_mtime), kind))
    return out


def cleanup(
    directory: str | os.PathLike[str], *, dry_run: bool = False, stale_after: float = STALE_AFTER
) -> list[Debris]:
    """Remove leftover temporaries of interrupted saves; returns what was (or would be) removed.

    Raises ``CheckpointLockedError`` while a save into ``directory`` is running.

    >>> removed = torchst.sharding.cleanup("ckpt")
    >>> sum(d.nbytes for d in removed)  # bytes freed
    0
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"{directory}: no such directory")
    fd = _open_dir(directory) if fcntl is not None else None
    locked = False
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointLockedError(
                        f"{directory}: a save into this directory is in progress (it holds the directory lock); "
                        "its temporaries are not debris.  Run cleanup again when it has finished"
                    ) from None
        # Under the lock no sharded save runs; unlocked (no flock), only stale files go.
        removable = [
            d for d in find_debris(directory) if d.age >= stale_after or (locked and d.kind == "shard temporary")
        ]
        if not dry_run:
            for d in removable:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d.path)
        return removable
    finally:
        if fd is not None:
            os.close(fd)
