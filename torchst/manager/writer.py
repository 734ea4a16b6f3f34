"""Write one step: files into a temporary directory, fsync everything, commit by rename."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import BinaryIO, cast

from ..errors import CheckpointError
from ..format.writer import WritePlan, plan_write, write_tensors
from ..state import FileSpec
from ..state.tree import Json
from ..storage.atomic import WRITE_BUFFER, fsync_dir
from .layout import FORMAT, MANIFEST, VERSION, commit, new_temp_dir, write_json

__all__ = ["describe_os_error", "plan_files", "write_step"]

_HINTS = {
    errno.ENOSPC: "the disk is full: free space, lower keep_last, or save to a larger volume",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
    errno.EACCES: "permission denied: make the checkpoint directory writable by this user",
    errno.EPERM: "operation not permitted: make the checkpoint directory writable by this user",
    errno.EROFS: "the filesystem is read-only: save to a writable location",
    errno.ENOENT: "the checkpoint directory disappeared while saving (deleted or unmounted?)",
    errno.EIO: "the storage reported an I/O error: check the disk or network mount",
}


def describe_os_error(e: OSError) -> str:
    """``strerror`` plus what to do about it, for the common checkpointing failures."""
    hint = _HINTS.get(e.errno or -1)
    what = e.strerror or str(e)
    return f"{what} ({errno.errorcode.get(e.errno or -1, e.errno)}): {hint}" if hint else what


def plan_files(files: Mapping[str, FileSpec]) -> dict[str, WritePlan]:
    """Validate and lay out every file of a step (raises SerializationError before any I/O)."""
    return {rel: plan_write(spec.tensors, spec.metadata) for rel, spec in files.items()}


_WRITEBACK_CHUNK = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


_sync_file_range = _load_sync_file_range()


class _EarlyWriteback:
    """A file wrapper that starts the disk write of every 64 MiB as soon as it is in the page cache.

    Without it the kernel starts writeback late and the final fsync waits for most of the file;
    with it, copying into the page cache and writing to disk overlap.  Linux only; elsewhere
    (or if the call fails) it is a plain pass-through.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.fd = f.fileno()
        self.pos = 0
        self.started = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, max(len(view), 1), _WRITEBACK_CHUNK):
            self.pos += self.f.write(view[i : i + _WRITEBACK_CHUNK])
            if _sync_file_range is not None and self.pos - self.started >= _WRITEBACK_CHUNK:
                self.f.flush()
                if _sync_file_range(self.fd, self.started, self.pos - self.started, _SYNC_FILE_RANGE_WRITE) == 0:
                    self.started = self.pos
        return len(view)


def _write_file(path: str, plan: WritePlan) -> int:
    with open(path, "xb", buffering=WRITE_BUFFER) as f:
        write_tensors(_EarlyWriteback(f), plan)  # type: ignore[arg-type]  # only .write is used
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            # The bytes are durable; drop them from the page cache so a multi-GB checkpoint does
            # not push the training process's working set out of memory.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return plan.total_size


def write_step(
    directory: str,
    step: int,
    files: Mapping[str, WritePlan],
    tree: Mapping[str, Json],
    metrics: Json,
    *,
    earlier: list[int],
) -> str | None:
    """Write and commit ``step``; returns an older copy moved aside (see ``layout.commit``).

    On any failure the temporary directory is removed and earlier steps are untouched.
    """
    temp: str | None = None
    try:
        temp = new_temp_dir(directory, step)
        sizes: dict[str, Json] = {}
        subdirs = set()
        for rel, plan in files.items():
            path = os.path.join(temp, rel)
            parent = os.path.dirname(path)
            if parent != temp and parent not in subdirs:
                os.makedirs(parent)
                subdirs.add(parent)
            sizes[rel] = {"size": _write_file(path, plan)}
        for sub in subdirs:
            fsync_dir(sub)
        manifest: dict[str, Json] = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": metrics,
            "files": sizes,
            "tree": dict(tree),
        }
        write_json(os.path.join(temp, MANIFEST), manifest)  # last file: a step with a manifest is whole
        aside = commit(temp, directory, step)
        temp = None
        return aside
    except OSError as e:
        raise CheckpointError(
            f"{directory}: saving step {step} failed: {describe_os_error(e)}"
            f"{f' [{e.filename}]' if e.filename else ''}. Nothing was committed for step {step}; "
            f"earlier checkpoints are intact (steps {earlier[-5:]}{' ...' if len(earlier) > 5 else ''})"
        ) from e
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
