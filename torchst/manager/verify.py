"""Check committed steps against their recorded checksums, and name damaged steps in errors.

Imports no torch: ``torchst verify`` checks a run directory without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError, FormatError, IntegrityError
from ..format.checksum import FileReport, crc32c, verify_file
from ..format.header import read_header_length
from .layout import MANIFEST, committed_steps, parse_manifest, step_location

# manifest file entry: CRC32C of the file's header bytes (prefix included); written by writer.py
HEADER_CRC_KEY = "header_crc32c"

__all__ = ["HEADER_CRC_KEY", "StepReport", "check_binding", "damaged", "is_damage", "verify_step"]


@dataclass(frozen=True)
class StepReport:
    """What ``verify_step`` found in one step: a report per file, or why the step could not be read.

    >>> report = mgr.verify(1000)
    >>> report.ok, [str(p) for p in report.problems]
    (True, [])
    """

    step: int
    path: str
    files: tuple[FileReport, ...] = ()
    error: CheckpointError | FormatError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(f.ok for f in self.files)

    @property
    def problems(self) -> list[CheckpointError | FormatError]:
        """Every problem found: the step-level error, then each file's, in file order."""
        out: list[CheckpointError | FormatError] = [self.error] if self.error is not None else []
        for f in self.files:
            out.extend(f.problems)
        return out

    @property
    def unchecked(self) -> list[str]:
        """Files that record no checksums (saved with ``checksums=False`` or by an older torchst)."""
        return [f.path for f in self.files if not f.has_checksums and f.ok]


def verify_step(directory: str, step: int, *, on_bytes: Callable[[int], object] | None = None) -> StepReport:
    """Read every file of committed ``step`` once and check every recorded checksum.

    The manifest is checked first (every file present, with the recorded size, and holding the
    header the manifest recorded for it); a step whose manifest cannot be read is reported
    through ``error``.  Raises only when the step does not exist (``CheckpointNotFoundError``).
    Needs no torch.
    """
    path = step_location(directory, step)
    if path is None:
        raise CheckpointNotFoundError(
            f"{directory}: step {step} is not a committed checkpoint; committed steps: {committed_steps(directory)}"
        )
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, "rb") as f:
            manifest = parse_manifest(f.read(), manifest_path, step)
    except CheckpointError as e:
        return StepReport(step, path, (), e)
    except OSError as e:
        return StepReport(step, path, (), CheckpointError(f"{manifest_path}: cannot read the manifest: {e}"))
    files: list[FileReport] = []
    for rel, entry in manifest["files"].items():
        file = os.path.join(path, rel)
        if not isinstance(rel, str) or os.path.isabs(rel) or os.path.normpath(rel) != rel or rel.startswith(".."):
            bad = CheckpointError(f"{path}: manifest lists an invalid file {rel!r}")
            return StepReport(step, path, tuple(files), bad)
        try:
            report = verify_file(file, on_bytes=on_bytes)
            problems: list[FormatError] = []
            size = os.path.getsize(file)
            want = entry.get("size") if isinstance(entry, dict) else None
            if size != want:
                msg = f"{file}: {size:,} bytes but the manifest says {want!r}; the step is damaged"
                problems.append(IntegrityError(msg, path=file))
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                check_binding(fd, entry if isinstance(entry, dict) else {}, file, step)
            except FormatError as e:
                problems.append(e)
            finally:
                os.close(fd)
        except OSError as e:
            return StepReport(step, path, tuple(files), CheckpointError(f"{file}: cannot read: {e}"))
        if problems:
            report = replace(report, problems=(*problems, *report.problems))
        files.append(report)
    return StepReport(step, path, tuple(files))


def check_binding(fd: int, entry: Mapping[str, Any], path: str, step: int) -> None:
    """Raise IntegrityError unless the file's header is the one the manifest recorded for it.

    Each file checks its own tensors; this binds the file to the step, so a whole file swapped
    in from another step or run (consistent in itself) is caught.  Entries without the key
    (saved with checksums off) check nothing.
    """
    expected = entry.get(HEADER_CRC_KEY)
    if not isinstance(expected, str):
        return
    size = os.fstat(fd).st_size
    n = read_header_length(os.pread(fd, 8, 0), source=path, file_size=size)
    got = crc32c(os.pread(fd, 8 + n, 0))
    if f"{got:08x}" != expected:
        raise IntegrityError(
            f"{path}: the file does not belong to step {step}: its header checksum is {got:08x} but the manifest "
            f"records {expected} (a file copied or swapped in from another step or run?)",
            path=path,
            byte_range=(0, 8 + n),
        )


def damaged(directory: str, step: int | None, e: CheckpointError | FormatError) -> CheckpointError | FormatError:
    """Mark ``e`` as damage of ``step`` (``is_damage`` tells it apart from a mismatch of the caller's objects).

    Errors about files already name them (inside ``step_<n>/``); a checksum mismatch is restated
    to name the step and what to do, keeping its path, tensor and byte range.
    """
    if is_damage(e):
        return e
    out = e
    if isinstance(e, IntegrityError):
        which = f"step {step}" if step is not None else "the latest step"
        out = IntegrityError(
            f"{directory}: {which} is damaged and was not restored: {e}. Nothing was loaded; restore another step "
            "(restore(..., fallback=True) picks the newest intact one) and check the others with `torchst verify`",
            path=e.path,
            tensor=e.tensor,
            byte_range=e.byte_range,
        )
    out.damaged_step = step  # type: ignore[union-attr]
    return out


def is_damage(e: BaseException) -> bool:
    """Whether ``e`` came from ``damaged`` (the step's bytes, not the caller's objects, are at fault)."""
    return hasattr(e, "damaged_step")
