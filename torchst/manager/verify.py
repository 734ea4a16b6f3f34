"""Check committed steps against their recorded checksums, and name damaged steps in errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import CheckpointChangedError, CheckpointError, CheckpointNotFoundError, FormatError, IntegrityError
from ..format.checksum import FileReport, verify_file
from .reading import check_binding, open_step

__all__ = ["StepReport", "damaged", "is_damage", "verify_step"]


@dataclass(frozen=True)
class StepReport:
    """What ``verify_step`` found in one step: a report per file, or why the step could not be read.

    >>> report = mgr.verify(100)
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

    The manifest is checked first (every file present, with the recorded size); a step that
    cannot be read whole is reported through ``error``.  Raises only when the step does not
    exist (``CheckpointNotFoundError``).
    """
    path = os.path.join(directory, f"step_{step}")
    files: list[FileReport] = []
    try:
        with open_step(directory, step) as opened:
            path = opened.path
            for rel, entry in opened.manifest["files"].items():
                file = os.path.join(path, rel)
                report = verify_file(file, on_bytes=on_bytes)
                try:
                    check_binding(opened.fds[rel], entry, file, step)
                except IntegrityError as e:
                    report = replace(report, problems=(e, *report.problems))
                files.append(report)
    except (CheckpointNotFoundError, CheckpointChangedError):
        raise
    except (CheckpointError, FormatError) as e:
        return StepReport(step, path, tuple(files), e)
    except OSError as e:
        return StepReport(step, path, tuple(files), CheckpointError(f"{path}: cannot read step {step}: {e}"))
    return StepReport(step, path, tuple(files))


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
