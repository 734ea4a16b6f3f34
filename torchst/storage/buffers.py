"""Raw file I/O: zero-copy byte views of tensor memory, positional reads, vectored writes, one I/O pool.

The format, device and checkpoint layers all do their reads and writes through these few
functions, so short reads, short writes and the kernel's per-call limits are handled once.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotations: raw I/O (verify, header tools) never imports torch
    import torch

from ..errors import FileSizeError

# Linux caps one read/write call at 0x7ffff000 bytes; larger requests are looped.
_MAX_IO = 1 << 30
PARALLEL_CHUNK = 16 << 20
# Linux accepts at most 1024 buffers per preadv call.
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_in_child() -> None:
    # A forked child (a DataLoader worker, a multiprocessing reader) inherits the pool object but
    # none of its threads: work submitted to it would wait forever.  The child starts its own.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def io_pool() -> ThreadPoolExecutor:
    """A process-wide thread pool for parallel reads and writes (os.preadv/os.writev release the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1) * 2, thread_name_prefix="torchst-io")
        return _pool


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes; the caller keeps ``t`` alive."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def pread_into(fd: int, mv: memoryview, offset: int, *, source: str = "<file>") -> None:
    """Fill ``mv`` from ``fd`` at ``offset``; a short file is a FileSizeError, not zeros."""
    done, total = 0, len(mv)
    while done < total:
        got = os.preadv(fd, [mv[done : done + _MAX_IO]], offset + done)
        if got == 0:
            raise FileSizeError(
                f"{source}: expected {total:,} bytes at offset {offset:,} but the file ended after "
                f"{done:,} (was it truncated while open?)"
            )
        done += got


def pread_parallel(fd: int, mv: memoryview, offset: int, *, source: str = "<file>") -> None:
    """Like pread_into, splitting large reads across the I/O pool (helps NFS and NVMe queues)."""
    if len(mv) <= PARALLEL_CHUNK:
        pread_into(fd, mv, offset, source=source)
        return
    read_scatter(fd, [(offset, mv)], source=source)


def anon_buffer(nbytes: int) -> memoryview:
    """Writable, uninitialised-looking memory of our own: an anonymous private mapping.

    Unlike ``bytearray(n)`` (malloc + memset), nothing is written here: the kernel supplies
    zero pages on first touch, which the read that fills the buffer does anyway, so the
    buffer costs one pass over memory instead of two.  Tensors made with ``torch.frombuffer``
    keep the mapping alive; it is unmapped when the last one goes away.
    """
    if nbytes == 0:
        return memoryview(bytearray())
    # Private: plain anonymous memory, not shmem.  No MADV_HUGEPAGE: with the common THP
    # "defrag=madvise" setting it makes page faults stall on memory compaction.
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    return memoryview(m)


def _preadv_all(fd: int, views: list[memoryview], offset: int, source: str) -> None:
    # One preadv per batch of consecutive buffers; loops on short reads.
    total = sum(len(v) for v in views)
    done, i = 0, 0
    while i < len(views):
        got = os.preadv(fd, views[i : i + _IOV_MAX], offset + done)
        if got == 0:
            raise FileSizeError(
                f"{source}: expected {total:,} bytes at offset {offset:,} but the file ended after "
                f"{done:,} (was it truncated while open?)"
            )
        done += got
        while i < len(views) and got >= len(views[i]):
            got -= len(views[i])
            i += 1
        if got:
            views[i] = views[i][got:]


def read_scatter(
    fd: int, targets: Sequence[tuple[int, memoryview]], *, source: str = "<file>", chunk: int = PARALLEL_CHUNK
) -> None:
    """Fill every ``(file offset, view)`` in ``targets`` (sorted by offset) from ``fd``.

    File-adjacent views are coalesced into one ``preadv`` of up to ``chunk`` bytes (10,000
    small tensors cost a few dozen syscalls, not 10,000), large views are split into
    ``chunk``-sized pieces, and the pieces run on the I/O pool when there is more than one.
    """
    batches: list[tuple[int, list[memoryview]]] = []
    cur: list[memoryview] = []
    cur_off = cur_end = cur_bytes = 0
    for off, mv in targets:
        pos, n = 0, len(mv)
        while pos < n:
            if cur and (off + pos != cur_end or cur_bytes >= chunk or len(cur) >= _IOV_MAX):
                batches.append((cur_off, cur))
                cur, cur_bytes = [], 0
            if not cur:
                cur_off = cur_end = off + pos
            take = min(n - pos, chunk - cur_bytes)
            cur.append(mv[pos : pos + take])
            pos += take
            cur_bytes += take
            cur_end += take
    if cur:
        batches.append((cur_off, cur))
    if len(batches) == 1 or (os.cpu_count() or 1) < 2:
        for off, views in batches:
            _preadv_all(fd, views, off, source)
        return
    futures = [io_pool().submit(_preadv_all, fd, views, off, source) for off, views in batches]
    for f in futures:
        f.result()


def writev_all(fd: int, views: list[memoryview]) -> None:
    """Write every view, in order, with as few ``writev`` calls as possible (loops on short writes)."""
    i = 0
    views = [v for v in views if len(v)]
    while i < len(views):
        batch: list[memoryview] = []
        size = 0
        for v in views[i : i + _IOV_MAX]:
            if size + len(v) > _MAX_IO and batch:
                break
            batch.append(v)
            size += len(v)
        got = os.writev(fd, batch)
        while i < len(views) and got >= len(views[i]):
            got -= len(views[i])
            i += 1
        if got:
            views[i] = views[i][got:]


def write_all(fd: int, mv: memoryview) -> None:
    """os.write until every byte of ``mv`` is on its way to the file."""
    done, total = 0, len(mv)
    while done < total:
        done += os.write(fd, mv[done : done + _MAX_IO])


def pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    """os.pwrite until every byte of ``mv`` is at ``offset`` (the file position does not move)."""
    done, total = 0, len(mv)
    while done < total:
        done += os.pwrite(fd, mv[done : done + _MAX_IO], offset + done)
