"""On-disk layout of a checkpoint directory, and the commit / delete protocol.

::

    directory/
      .lock                    writer lock (see lock.py)
      step_100/                a committed step: exists only after its commit point
        manifest.json          written last: format, step, metrics, file sizes, the state tree
        state.safetensors      optimizer state, RNG, plain tensors
        model/model.safetensors
      .tmp-step_110-<id>/      being written (invisible; removed on the next start)
      .trash-step_90-<id>/     being deleted (invisible; removed on the next start)
      .replaced-step_80-<id>/  an older copy of a step saved again; restored if the new one
                               never got committed

Commit of a step: every file fsynced, manifest fsynced, the temporary directory fsynced,
then ``rename(.tmp-step_<n>-<id>, step_<n>)`` (the commit point), then the parent fsynced.
Deleting a step renames it to ``.trash-...`` first, so a crash mid-delete never leaves a
half-deleted step that looks committed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError
from ..storage.atomic import fsync_dir
from ..storage.buffers import write_all

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "cleanup",
    "commit",
    "committed_steps",
    "new_temp_dir",
    "read_manifest",
    "remove_step",
    "step_dir",
    "write_json",
]

MANIFEST = "manifest.json"
FORMAT = "torchst.checkpoint"
VERSION = 1
logger = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|trash|replaced)-step_(\d+)-[0-9a-f]+$")


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step}")


def new_temp_dir(directory: str, step: int) -> str:
    path = os.path.join(directory, f".tmp-step_{step}-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    return path


def committed_steps(directory: str) -> list[int]:
    """Sorted steps whose commit happened (``step_<n>/manifest.json`` exists)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(directory, name, MANIFEST)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def write_json(path: str, obj: Any) -> int:
    """Write ``obj`` as JSON to a new file and fsync it; returns the size in bytes."""
    data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def read_manifest(directory: str, step: int) -> dict[str, Any]:
    """The parsed, checked manifest of a committed step."""
    path = os.path.join(step_dir(directory, step), MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{directory}: step {step} is not a committed checkpoint (no {MANIFEST}); "
            f"committed steps: {committed_steps(directory)}"
        ) from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e}); the step is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a torchst checkpoint manifest (expected format {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{path}: manifest version {version!r} is newer than this torchst understands ({VERSION}); upgrade torchst"
        )
    if manifest.get("step") != step or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: manifest does not describe step {step} (step {manifest.get('step')!r})")
    return manifest


def commit(temp: str, directory: str, step: int) -> str | None:
    """Rename the finished ``temp`` directory to ``step_<n>``; the commit point of a save.

    A step that already exists is moved aside first and returned (the caller deletes it
    once the new one is durable); ``cleanup`` puts it back if the crash came in between.
    """
    fsync_dir(temp)
    final = step_dir(directory, step)
    aside = None
    if os.path.lexists(final):
        aside = os.path.join(directory, f".replaced-step_{step}-{uuid.uuid4().hex[:12]}")
        os.rename(final, aside)
    os.rename(temp, final)  # commit point: before it the step does not exist, after it it is whole
    fsync_dir(directory)
    return aside


def remove_step(directory: str, step: int) -> None:
    """Delete a committed step: atomically hide it, make that durable, then delete its files."""
    trash = os.path.join(directory, f".trash-step_{step}-{uuid.uuid4().hex[:12]}")
    os.rename(step_dir(directory, step), trash)
    fsync_dir(directory)
    shutil.rmtree(trash, ignore_errors=True)


def cleanup(directory: str) -> list[str]:
    """Remove what interrupted saves and deletes left behind; returns the names removed.

    Only the lock holder may call this (another writer's temporary directory would vanish).
    """
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for name in names:
        m = _LEFTOVER.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        final = step_dir(directory, int(m.group(2)))
        if m.group(1) == "replaced" and not os.path.lexists(final) and os.path.isfile(os.path.join(path, MANIFEST)):
            os.rename(path, final)  # the new copy never committed: the old one is still the step
            logger.warning(
                "%s: step %s was being re-saved when a writer stopped; kept its previous copy", directory, m.group(2)
            )
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
        what = {"tmp": "an interrupted save", "trash": "an interrupted delete", "replaced": "a replaced copy"}
        logger.info("%s: removed %s left by a stopped writer: %s", directory, what[m.group(1)], name)
    # Step directories without a manifest cannot be produced by commit(); leave them alone
    # (they are not ours to delete) but they stay invisible to steps().
    fsync_dir(directory)
    return removed
