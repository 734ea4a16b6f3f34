"""File-system hints through libc on Linux: preallocation, early writeback, filesystem type.

Everything here is an optimisation: on other systems, or when a call is not supported, the
functions report that and callers carry on with plain writes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any

__all__ = ["delays_allocation", "preallocate", "start_writeback"]

_SYNC_FILE_RANGE_WRITE = 2
# statfs f_type of filesystems with delayed allocation: blocks are chosen at writeback, and a
# rename over an existing file (or a truncate) forces that writeback synchronously.
_EXT4_MAGIC = 0xEF53  # ext2/3/4
_XFS_MAGIC = 0x58465342
_DELALLOC = frozenset({_EXT4_MAGIC, _XFS_MAGIC})
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP})


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        lib.fallocate.restype = ctypes.c_int
        lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        lib.sync_file_range.restype = ctypes.c_int
        lib.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.fstatfs.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


_LIBC = _libc()


def delays_allocation(fd: int) -> bool:
    """Whether ``fd`` lives on a filesystem with delayed block allocation (ext4, xfs)."""
    if _LIBC is None:
        return False
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _LIBC.fstatfs(fd, buf) != 0:
        return False
    f_type = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return f_type in _DELALLOC


def preallocate(fd: int, nbytes: int) -> bool:
    """Reserve ``nbytes`` of disk for ``fd`` now; False where the filesystem cannot.

    A full disk or quota raises ``OSError`` (ENOSPC/EDQUOT) here, before any byte is written.
    """
    if _LIBC is None or nbytes <= 0:
        return False
    if _LIBC.fallocate(fd, 0, 0, nbytes) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` to disk without waiting."""
    if _LIBC is None:
        return False
    return bool(_LIBC.sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0)
