"""The one write path: create a file, write it, flush, fsync, commit by rename.

Every file torchst writes goes through ``open_output``: single files (``save_file``), the
shards of a sharded save (written under temporary names that the shard commit renames) and the
files of a training step (inside a temporary step directory that the manager renames).

- ``replace=True`` writes a hidden sibling and ``os.replace``-s it over ``path`` (commit point);
  readers never observe a half-written file, and a file still memory-mapped by a reader keeps
  its old contents (the old inode lives until the mapping goes away).
- With ``size`` known, the file is preallocated on ext4/xfs.  Their delayed allocation otherwise
  turns a rename over an existing file into a synchronous flush of the new one (ext4's
  ``auto_da_alloc``), which made re-saving a checkpoint 4x slower than saving a fresh one; it
  also reports a full disk before any byte is written.
- ``fsync=True`` makes the bytes durable; ``writeback`` then starts the disk write of every
  ``WRITEBACK_CHUNK`` as soon as it is in the page cache, so copying and writing overlap instead
  of the fsync waiting for the whole file.  ``drop_cache`` evicts the durable pages afterwards.
- Any ``OSError`` becomes a ``WriteError`` naming the caller's path (never the temporary name),
  with ``errno`` kept and a hint for the common causes.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import TorchstError, WriteError
from ._hints import delays_allocation, preallocate, start_writeback
from .buffers import pwrite_all, write_all, writev_all

__all__ = [
    "OutputFile",
    "atomic_write",
    "describe_os_error",
    "fsync_dir",
    "open_output",
    "temp_path",
    "write_error",
]

# Writes smaller than this are gathered in memory (many small tensors, JSON pieces); larger ones
# go to the kernel straight from the caller's memory.
SMALL_WRITE = 256 << 10
GATHER_BYTES = 1 << 20
WRITEBACK_CHUNK = 64 << 20
# Below this, preallocation costs a syscall for nothing measurable.
PREALLOCATE_MIN = 1 << 20

_HINTS = {
    errno.ENOSPC: "the disk is full: free space or save to a larger volume",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
    errno.EACCES: "permission denied: make the checkpoint directory writable by this user",
    errno.EPERM: "operation not permitted: make the checkpoint directory writable by this user",
    errno.EROFS: "the filesystem is read-only: save to a writable location",
    errno.ENOENT: "the directory does not exist or disappeared while writing (deleted or unmounted?)",
    errno.EIO: "the storage reported an I/O error: check the disk or network mount",
}


def describe_os_error(e: OSError) -> str:
    """``strerror`` plus what to do about it, for the common failures of writes.

    >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device"))
    'No space left on device (ENOSPC): the disk is full: free space or save to a larger volume'
    """
    if isinstance(e, WriteError):  # already says where; describe the underlying failure
        return describe_os_error(e.__cause__) if isinstance(e.__cause__, OSError) else str(e)
    hint = _HINTS.get(e.errno or -1)
    what = e.strerror or str(e)
    return f"{what} ({errno.errorcode.get(e.errno or -1, e.errno)}): {hint}" if hint else what


def write_error(e: OSError, path: str) -> WriteError:
    """``e`` as a ``WriteError`` about ``path`` (the name the caller knows), errno preserved."""
    if isinstance(e, WriteError):
        return e
    return WriteError(e.errno, f"{path}: cannot write: {describe_os_error(e)}", path)


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


class OutputFile:
    """A file being written by ``open_output``: ``write`` for bytes, ``writev`` for views of memory.

    Small writes are gathered (one copy, into a 1 MiB buffer); large writes and ``writev`` go
    to the kernel straight from the caller's memory (no copy).

    >>> with open_output("out.bin") as f:
    ...     _ = f.write(b"header")
    ...     f.writev([memoryview(b"a" * 10), memoryview(b"b" * 10)])
    >>> os.path.getsize("out.bin")
    26
    """

    def __init__(self, fd: int, name: str, *, writeback: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.position = 0
        self._gather = bytearray()
        self._writeback = writeback
        self._flushed = 0  # bytes handed to the kernel
        self._started = 0  # bytes whose writeback has been started

    def fileno(self) -> int:
        return self.fd

    def tell(self) -> int:
        """Bytes written so far (gathered bytes included)."""
        return self.position

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` (copied only when it is small); returns its length."""
        view = memoryview(data).cast("B")
        n = len(view)
        if n < SMALL_WRITE:
            self._gather += view
            if len(self._gather) >= GATHER_BYTES:
                self.flush()
        else:
            self.flush()
            write_all(self.fd, view)
            self._advance(n)
        self.position += n
        return n

    def writev(self, views: Sequence[memoryview]) -> None:
        """Write ``views`` in order with as few ``writev`` calls as possible (no copy)."""
        self.flush()
        n = sum(len(v) for v in views)
        writev_all(self.fd, list(views))
        self.position += n
        self._advance(n)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Overwrite bytes already written at ``offset`` (a header finished last); never extends the file."""
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.position:
            raise ValueError(f"{self.name}: write_at [{offset}, {offset + len(view)}) outside the {self.position} bytes written")
        self.flush()
        pwrite_all(self.fd, view, offset)

    def flush(self) -> None:
        """Hand gathered small writes to the kernel."""
        if self._gather:
            write_all(self.fd, memoryview(self._gather))
            self._advance(len(self._gather))
            self._gather = bytearray()

    def _advance(self, n: int) -> None:
        self._flushed += n
        pending = self._flushed - self._started
        if self._writeback and pending >= WRITEBACK_CHUNK and start_writeback(self.fd, self._started, pending):
            self._started = self._flushed


@contextmanager
def open_output(
    path: str | os.PathLike[str],
    *,
    size: int | None = None,
    fsync: bool = False,
    replace: bool = True,
    shown_as: str | None = None,
    writeback: bool | None = None,
    drop_cache: bool = False,
) -> Iterator[OutputFile]:
    """Create ``path`` and yield it for writing; committed only if the block finishes.

    ``replace=True``: write a temporary sibling, ``os.replace`` it over ``path`` at the end.
    ``replace=False``: create ``path`` itself (it must not exist); the caller commits it later
    (a shard under its temporary name, a file inside a temporary step directory).  On failure
    the file is removed either way.  ``size`` is the exact final size when known (preallocation);
    ``shown_as`` is the name errors use (default ``path``); ``writeback`` defaults to ``fsync``.

    >>> blob = torchst.save({"w": torch.ones(2)})
    >>> with open_output("w.safetensors", size=len(blob), fsync=True) as f:
    ...     _ = f.write(blob)
    """
    path = os.fspath(path)
    shown = shown_as if shown_as is not None else path
    target = temp_path(path) if replace else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise write_error(e, shown) from e
    out = OutputFile(fd, shown, writeback=fsync if writeback is None else writeback and fsync)
    closed = False
    try:
        if size is not None and size >= PREALLOCATE_MIN and delays_allocation(fd):
            try:
                preallocate(fd, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = _free_bytes(target)
                    raise WriteError(
                        e.errno,
                        f"{shown}: cannot write {size:,} bytes: {describe_os_error(e)}"
                        f"{f' ({free:,} bytes free)' if free is not None else ''}",
                        shown,
                    ) from e
                raise
        yield out
        out.flush()
        if size is not None and out.position != size:
            raise AssertionError(f"{shown}: wrote {out.position:,} bytes, planned {size:,}")
        if fsync:
            os.fsync(fd)
            if drop_cache and hasattr(os, "posix_fadvise"):
                # Durable now: evicting the pages keeps a multi-GB checkpoint from pushing the
                # caller's working set (a training process) out of memory.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        closed = True
        os.close(fd)
        if replace:
            os.replace(target, path)  # commit point: before it the old file, after it the new one
    except BaseException as exc:
        if not closed:
            os.close(fd)
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, TorchstError):
            raise write_error(exc, shown) from exc
        raise
    if replace and fsync:
        try:
            fsync_dir(os.path.dirname(path) or ".")
        except OSError as e:
            raise write_error(e, shown) from e


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[OutputFile]:
    """Yield a file that replaces ``path`` only if the block finishes without error.

    >>> with atomic_write("out.bin", fsync=True) as f:
    ...     _ = f.write(b"payload")
    """
    with open_output(path, fsync=fsync) as f:
        yield f
