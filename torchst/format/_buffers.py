"""Zero-copy byte views of tensor memory and positional reads into them."""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import FileSizeError

# Linux caps one read/write call at 0x7ffff000 bytes; larger requests are looped.
_MAX_IO = 1 << 30
PARALLEL_CHUNK = 16 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    """A process-wide thread pool for parallel reads (os.preadv releases the GIL)."""
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
    total = len(mv)
    if total <= 2 * PARALLEL_CHUNK or (os.cpu_count() or 1) < 2:
        pread_into(fd, mv, offset, source=source)
        return
    futures = [
        io_pool().submit(pread_into, fd, mv[i : i + PARALLEL_CHUNK], offset + i, source=source)
        for i in range(0, total, PARALLEL_CHUNK)
    ]
    for f in futures:
        f.result()


def write_all(fd: int, mv: memoryview) -> None:
    """os.write until every byte of ``mv`` is on its way to the file."""
    done, total = 0, len(mv)
    while done < total:
        done += os.write(fd, mv[done : done + _MAX_IO])
