"""One writer per checkpoint directory: an exclusive ``flock`` on ``directory/.lock``.

The lock dies with its process (a SIGKILLed trainer never leaves a stale lock behind), and
the file records who holds it so the refusal can say so.  The file itself is never deleted:
unlinking a lock file while another process waits on it lets two writers in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
import weakref

from ..errors import CheckpointError, CheckpointLockedError

__all__ = ["LOCK_NAME", "DirectoryLock"]

LOCK_NAME = ".lock"
_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker, say) inherits the descriptor, and with it the lock
    # for as long as it lives.  Closing the child's copy (never LOCK_UN, which would release
    # it for the parent too) leaves the parent the only holder.
    for lock in list(_HELD):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _held_here(fd: int) -> str | None:
    # flock conflicts between two descriptors of one process too, so without this check a
    # second manager would be told that "another process" with our own pid holds the lock.
    st = os.fstat(fd)
    for lock in list(_HELD):
        if lock._fd is not None:
            other = os.fstat(lock._fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return f" ({lock.owner})" if lock.owner else ""
    return None


class DirectoryLock:
    """Hold the writer lock of ``directory`` until ``release()`` (or process exit).

    >>> lock = DirectoryLock("ckpt")   # CheckpointLockedError if another writer holds it
    >>> lock.release()
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot create the writer lock file ({e.strerror})") from e
        mine = _held_here(fd)
        if mine is not None:
            os.close(fd)
            raise CheckpointLockedError(
                f"{directory}: this process (pid {os.getpid()}) already has a CheckpointManager writing to this "
                f"directory{mine}; use that manager, or close() it before opening another one "
                "(`with CheckpointManager(...) as mgr:` closes it at the end of the block), or open this one "
                "with read_only=True to only restore"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointLockedError(
                    f"{directory}: another CheckpointManager is writing to this directory ({holder}); "
                    "two writers would interleave their steps. Stop the other run, close() its manager, "
                    "or open this one with read_only=True to only restore"
                ) from None
            raise CheckpointError(f"{self.path}: cannot lock ({e.strerror})") from e
        self._fd: int | None = fd
        self.directory = directory
        self.owner = ""  # what holds the lock, for the message a second opener gets
        _HELD.add(self)
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up; safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock
