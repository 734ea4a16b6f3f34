"""Write one step: files into a temporary directory, fsync everything, commit by rename."""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Mapping

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


def _write_file(path: str, plan: WritePlan) -> int:
    with open(path, "xb", buffering=WRITE_BUFFER) as f:
        write_tensors(f, plan)
        f.flush()
        os.fsync(f.fileno())
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
