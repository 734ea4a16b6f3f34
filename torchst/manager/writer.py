"""Write one step: files into a temporary directory, fsync everything, commit by rename."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping

from ..errors import CheckpointError
from ..format.checksum import crc32c
from ..format.writer import WritePlan, plan_write, write_tensors
from ..state import FileSpec
from ..state.tree import Json
from ..storage.atomic import describe_os_error, fsync_dir, open_output
from .layout import FORMAT, MANIFEST, VERSION, commit, new_temp_dir, write_json
from .verify import HEADER_CRC_KEY

__all__ = ["describe_os_error", "plan_files", "write_step"]


def plan_files(files: Mapping[str, FileSpec], *, checksums: bool = True) -> dict[str, WritePlan]:
    """Validate and lay out every file of a step (raises SerializationError before any I/O)."""
    return {rel: plan_write(spec.tensors, spec.metadata, checksums=checksums) for rel, spec in files.items()}


def _write_file(path: str, plan: WritePlan, on_bytes: Callable[[int], object] | None = None) -> dict[str, Json]:
    # Durable before the step commits; writeback overlaps the page-cache copy with the disk write,
    # and the durable pages are dropped so a multi-GB checkpoint does not push the training
    # process's working set out of memory.
    with open_output(path, size=plan.total_size, fsync=True, replace=False, writeback=True, drop_cache=True) as f:
        crcs = write_tensors(f, plan, on_bytes=on_bytes)
    entry: dict[str, Json] = {"size": plan.total_size}
    if crcs is not None:
        # The header holds every tensor's checksum: its own checksum in the manifest binds the
        # file to this step, so a file swapped in from another step (or run) is caught too.
        entry[HEADER_CRC_KEY] = f"{crc32c(plan.final_header(crcs)):08x}"
    return entry


def write_step(
    directory: str,
    step: int,
    files: Mapping[str, WritePlan],
    tree: Mapping[str, Json],
    metrics: Json,
    *,
    earlier: list[int],
    on_bytes: Callable[[int], object] | None = None,
) -> str | None:
    """Write and commit ``step``; returns an older copy moved aside (see ``layout.commit``).

    ``on_bytes(n)`` is called as the files' bytes go out (progress bars).

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
            sizes[rel] = _write_file(path, plan, on_bytes)
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
