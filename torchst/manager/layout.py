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
      .replaced-step_80-<id>/  the previous copy of a step being saved again (fallback commit);
                               it *is* step 80 while no ``step_80`` exists

Commit of a step: every file fsynced, manifest fsynced, the temporary directory fsynced,
then ``rename(.tmp-step_<n>-<id>, step_<n>)`` (the commit point), then the parent fsynced.
Deleting a step renames it to ``.trash-...`` first, so a crash mid-delete never leaves a
half-deleted step that looks committed.

Saving a step that already exists (a re-save) must never hide it.  On Linux the commit is
one ``renameat2(RENAME_EXCHANGE)`` of the temporary directory and ``step_<n>``: the name
holds the old copy before and the new one after, and the old copy (now under the temporary
name) is deleted once the exchange is durable.  Where the filesystem (or the OS) cannot
exchange, the old copy is renamed to ``.replaced-step_<n>-<id>`` first and the new one
renamed into place; in between, and after a crash in between, readers take the replaced
copy as step ``n`` (``step_location``), and the next writer renames it back.

Readers (``reading.py``) open a step's directory once and every file through that
descriptor, so a step replaced or deleted while being read is either read whole or noticed
(a listed file vanishes) and opened again.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from typing import Any, cast

from ..errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "cleanup",
    "commit",
    "committed_steps",
    "new_temp_dir",
    "parse_manifest",
    "read_manifest",
    "remove_step",
    "step_dir",
    "step_location",
    "write_json",
]

MANIFEST = "manifest.json"
FORMAT = "torchst.checkpoint"
VERSION = 1
logger = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|trash|replaced)-step_(\d+)-[0-9a-f]+$")


# The storage helpers import torch; header-only tools (``torchst inspect``) read steps through
# this module without torch, so the write-side helpers import them when a step is written.
def fsync_dir(path: str) -> None:
    from ..storage.atomic import fsync_dir as fsync

    fsync(path)


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step}")


def new_temp_dir(directory: str, step: int) -> str:
    path = os.path.join(directory, f".tmp-step_{step}-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    return path


def _replaced_copies(directory: str, names: list[str]) -> dict[int, list[str]]:
    copies: dict[int, list[str]] = {}
    for name in names:
        m = _LEFTOVER.match(name)
        if m and m.group(1) == "replaced" and os.path.isfile(os.path.join(directory, name, MANIFEST)):
            copies.setdefault(int(m.group(2)), []).append(name)
    return copies


def committed_steps(directory: str) -> list[int]:
    """Sorted steps whose commit happened (``step_<n>/manifest.json`` exists).

    A step in the middle of a fallback re-save (or whose writer died there) is listed too:
    its previous copy still exists under ``.replaced-step_<n>-<id>``.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = set()
    for name in names:
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(directory, name, MANIFEST)):
            steps.add(int(m.group(1)))
    steps.update(_replaced_copies(directory, names))
    return sorted(steps)


def step_location(directory: str, step: int) -> str | None:
    """The directory that holds committed ``step`` now, or None.

    ``step_<n>`` when it is committed; otherwise the previous copy of a step being re-saved
    (see the module docstring).  ``torchst inspect`` and readers resolve steps through this.
    """
    final = step_dir(directory, step)
    if os.path.isfile(os.path.join(final, MANIFEST)):
        return final
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    copies = _replaced_copies(directory, names).get(step)
    if not copies:
        return None
    if os.path.isfile(os.path.join(final, MANIFEST)):
        return final  # the new copy was committed while we looked
    return os.path.join(directory, copies[0])


def write_json(path: str, obj: Any) -> int:
    """Write ``obj`` as JSON to a new file and fsync it; returns the size in bytes."""
    data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        from ..storage.buffers import write_all

        write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def read_manifest(directory: str, step: int) -> dict[str, Any]:
    """The parsed, checked manifest of a committed step."""
    location = step_location(directory, step)
    path = os.path.join(location or step_dir(directory, step), MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{directory}: step {step} is not a committed checkpoint (no {MANIFEST}); "
            f"committed steps: {committed_steps(directory)}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the manifest: {e.strerror or e}") from e
    return parse_manifest(raw, path, step)


def parse_manifest(raw: bytes, path: str, step: int) -> dict[str, Any]:
    """Parse and check the bytes of ``path`` (the manifest of ``step``); hostile input is a CheckpointError."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e}); the step is damaged") from None
    except RecursionError:
        raise CheckpointError(
            f"{path}: manifest nests deeper than Python can parse; torchst never writes such a manifest, "
            "so the step is damaged or was not written by torchst"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a torchst checkpoint manifest (expected format {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{path}: manifest version {version!r} is newer than this torchst understands ({VERSION}); upgrade torchst"
        )
    if manifest.get("step") != step or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: manifest does not describe step {step} (step {manifest.get('step')!r})")
    if not isinstance(manifest.get("tree"), dict):
        raise CheckpointError(f"{path}: manifest has no state tree; the step is damaged")
    return manifest


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV})


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, bytes, int, bytes, int], int]", fn)


_renameat2 = _load_renameat2()
_no_exchange_devices: set[int] = set()  # filesystems that refused RENAME_EXCHANGE once


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing directories; False where the system cannot (then nothing changed)."""
    fn = _renameat2
    if fn is None:
        return False
    dev = os.stat(b).st_dev
    if dev in _no_exchange_devices:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        _no_exchange_devices.add(dev)
        logger.info(
            "%s: the filesystem cannot exchange directories atomically (%s); re-saved steps are committed by "
            "two renames, during which readers see the previous copy",
            os.path.dirname(b),
            errno.errorcode.get(err, err),
        )
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def commit(temp: str, directory: str, step: int) -> str | None:
    """Rename the finished ``temp`` directory to ``step_<n>``; the commit point of a save.

    A step that already exists is replaced without ever disappearing (see the module
    docstring); its previous copy is returned for the caller to delete once the new one is
    durable.
    """
    fsync_dir(temp)
    final = step_dir(directory, step)
    aside = None
    if os.path.lexists(final):
        if exchange(temp, final):  # commit point of a re-save: step_<n> is the new copy from here on
            fsync_dir(directory)
            return temp  # now holds the previous copy, under a name cleanup() removes
        aside = os.path.join(directory, f".replaced-step_{step}-{uuid.uuid4().hex[:12]}")
        os.rename(final, aside)  # step_location() now finds the previous copy here
    try:
        os.rename(temp, final)  # commit point: before it the step does not exist, after it it is whole
    except OSError:
        if aside is not None:
            os.rename(aside, final)  # the new copy failed to commit: the previous one keeps its name
        raise
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
