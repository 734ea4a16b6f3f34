"""Open a committed step for reading: one step, whole, even while a writer replaces it.

The reader protocol, next to the writer's in ``layout.py``:

1. Resolve the step's directory (``step_location``) and open it: from here on the
   directory object is fixed, whatever names it gets later.  A committed directory's files
   never change; writers only rename whole directories and delete them after a rename.
2. Read the manifest and open every file it lists through the directory descriptor, and
   keep the descriptors: what a restore reads later is exactly what was opened here.
3. If a listed file is missing, find out why: when the directory no longer has its name,
   a writer replaced or deleted the step while it was being opened, so start again at 1
   (a few times, with a short backoff, then ``CheckpointChangedError``); when it still has
   its name, the step is damaged.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointChangedError, CheckpointError, CheckpointNotFoundError
from ..format.checksum import Verifier, check_tensors
from ..format.reader import SafeFile
from ..state import STATE_FILE
from ..storage.buffers import tensor_bytes
from .layout import MANIFEST, committed_steps, parse_manifest, step_location
from .verify import check_binding

__all__ = ["ATTEMPTS", "OpenStep", "describe_read_error", "open_step"]

ATTEMPTS = 8
_BACKOFF_S = 0.01
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_O_FILE = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)

_READ_HINTS = {
    errno.ENOENT: "the file is gone (deleted by hand, or the step was removed while being read)",
    errno.EACCES: "permission denied: make the checkpoint directory readable by this user",
    errno.EPERM: "operation not permitted: make the checkpoint directory readable by this user",
    errno.EIO: "the storage reported an I/O error: check the disk or network mount",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "the system ran out of file descriptors: close other programs or raise fs.file-max",
}


def describe_read_error(e: OSError) -> str:
    """``strerror`` plus what to do about it, for failures while reading a checkpoint."""
    hint = _READ_HINTS.get(e.errno or -1)
    what = e.strerror or str(e)
    return f"{what} ({errno.errorcode.get(e.errno or -1, e.errno)}): {hint}" if hint else what


class _Moved(Exception):
    """The step directory lost its name while being opened: a writer replaced or deleted it."""


class OpenStep:
    """A committed step opened whole: its manifest and a descriptor per file, held until ``close()``.

    >>> with open_step("run", None) as opened:   # the latest step
    ...     tensors, metadata = opened.read("model/model.safetensors")
    >>> opened.step, sorted(tensors)
    (1000, ['fc.bias', 'fc.weight'])
    """

    def __init__(self, path: str, step: int, manifest: dict[str, Any], fds: dict[str, int]) -> None:
        self.path = path
        self.step = step
        self.manifest = manifest
        self._fds = fds
        self._cache: dict[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]] = {}
        self.verify = False  # check every tensor read against its file's recorded checksum
        self.unverified: list[str] = []  # files read with verify on that record no checksums

    @property
    def fds(self) -> Mapping[str, int]:
        """The descriptor held for each file the manifest lists."""
        return self._fds

    @property
    def nbytes(self) -> int:
        """Total size of the step's files, as the manifest records it."""
        return sum(int(e["size"]) for e in self.manifest["files"].values())

    def read(self, rel: str) -> tuple[Mapping[str, torch.Tensor], Mapping[str, str]]:
        """Tensors and metadata of one file of the step, read through the descriptor held."""
        if rel in self._cache:
            return self._cache[rel]
        fd = self._fds.get(rel)
        if fd is None:
            raise CheckpointError(f"{self.path}: the state tree names {rel!r}, which the manifest does not list")
        # Modules copy out in load_state_dict, so a zero-copy mapping is enough; other state
        # (optimizer moments) is kept by its owner, so it gets memory of its own.
        backend = "pread" if rel == STATE_FILE else "mmap"
        path = os.path.join(self.path, rel)
        try:
            if self.verify:
                check_binding(fd, self.manifest["files"][rel], path, self.step)
            with SafeFile(path, backend=backend, fd=fd) as f:
                tensors = f.get_tensors()
                if self.verify:
                    verifier = Verifier(f.header, source=path)
                    if not verifier.active:
                        self.unverified.append(path)
                    infos = f.header.tensors
                    check_tensors(verifier, [(infos[n], tensor_bytes(t)) for n, t in tensors.items()])
                self._cache[rel] = (tensors, f.metadata() or {})
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read checkpoint file: {describe_read_error(e)}") from e
        return self._cache[rel]

    def close(self) -> None:
        """Release the descriptors; tensors already read stay valid."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> OpenStep:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_rel(base: str, rel: object) -> str:
    if (
        not isinstance(rel, str)
        or not rel
        or os.path.isabs(rel)
        or os.path.normpath(rel) != rel
        or rel.startswith("..")
    ):
        raise CheckpointError(f"{base}: manifest lists an invalid file name {rel!r}; the step is damaged")
    return rel


def _has_link(base: str, parts: list[str]) -> bool:
    return any(os.path.islink(os.path.join(base, *parts[: i + 1])) for i in range(len(parts)))


def _open_in(dfd: int, rel: str, base: str) -> int:
    """Open ``rel`` below the step directory ``dfd`` without following symbolic links.

    torchst writes regular files only; a link inside a step (to a file outside it, say) is
    refused rather than read.
    """
    parts = rel.split("/")
    fd = dfd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _O_DIR | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
            if fd != dfd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], _O_FILE, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and _has_link(base, parts):
            raise CheckpointError(
                f"{os.path.join(base, rel)}: is (or lies under) a symbolic link; checkpoint steps hold regular "
                "files only, so it is not read. Copy the run directory with its links resolved (cp -rL)"
            ) from None
        e.filename = rel
        raise
    finally:
        if fd != dfd:
            os.close(fd)


def _open_once(directory: str, step: int) -> OpenStep:
    path = step_location(directory, step)
    if path is None:
        raise CheckpointNotFoundError(
            f"{directory}: step {step} is not a committed checkpoint; committed steps: {committed_steps(directory)}"
        )
    try:
        dfd = os.open(path, _O_DIR)
    except FileNotFoundError:
        raise _Moved from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the step for reading: {describe_read_error(e)}") from e
    fds: dict[str, int] = {}
    try:
        try:
            with os.fdopen(_open_in(dfd, MANIFEST, path), "rb") as f:
                raw = f.read()
            manifest = parse_manifest(raw, os.path.join(path, MANIFEST), step)
            for rel, entry in manifest["files"].items():
                _safe_rel(path, rel)
                fds[rel] = _open_in(dfd, rel, path)
                size = os.fstat(fds[rel]).st_size
                if not isinstance(entry, dict) or size != entry.get("size"):
                    want = entry.get("size") if isinstance(entry, dict) else entry
                    raise CheckpointError(
                        f"{os.path.join(path, rel)}: {size:,} bytes but the manifest says {want!r}; the step is damaged"
                    )
        except FileNotFoundError as e:
            if _still_named(path, dfd):
                what = os.path.join(path, e.filename if isinstance(e.filename, str) else MANIFEST)
                raise CheckpointError(
                    f"{what}: a file of committed step {step} is missing, so the step cannot be read "
                    "(deleted by hand?); restore another step"
                ) from None
            raise _Moved from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read step {step}: {describe_read_error(e)}") from e
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        os.close(dfd)
    return OpenStep(path, step, manifest, fds)


def _still_named(path: str, dfd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    held = os.fstat(dfd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def open_step(directory: str, step: int | None) -> OpenStep:
    """Open ``step`` (None: the latest committed) whole; see the module docstring.

    Raises ``CheckpointNotFoundError`` when the step is not committed and
    ``CheckpointChangedError`` when writers kept replacing it for every attempt.

    >>> with open_step("run", 900) as opened:
    ...     opened.step
    900
    """
    for attempt in range(ATTEMPTS):
        target = step
        if target is None:
            steps = committed_steps(directory)
            if not steps:
                raise CheckpointNotFoundError(f"{directory}: no committed checkpoint to restore")
            target = steps[-1]
        try:
            return _open_once(directory, target)
        except _Moved:
            time.sleep(_BACKOFF_S * (2**attempt))
    raise CheckpointChangedError(
        f"{directory}: step {step if step is not None else '(latest)'} was replaced or deleted while being opened, "
        f"{ATTEMPTS} times in a row; a writer is re-saving it continuously. Retry later, or restore another step"
    )
