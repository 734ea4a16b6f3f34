"""``CheckpointManager``: numbered steps in a directory, atomic commits, retention, async saves."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .._progress import progress as progress_bar
from .._progress import progress_enabled
from ..errors import (
    ArgumentError,
    CheckpointChangedError,
    CheckpointError,
    CheckpointNotFoundError,
    FormatError,
    SerializationError,
)
from ..format.checksum import warn_unverified
from ..format.reader import check_device
from ..format.writer import WritePlan
from ..state import decode_state, encode_state, restore_state
from ..state.codec import FileReader
from ..state.tree import Json, TensorTable, TreeDecoder, TreeEncoder
from .layout import cleanup, committed_steps, read_manifest, remove_step, step_location
from .lock import DirectoryLock
from .reading import OpenStep, open_step
from .retention import DEFAULT_KEEP_LAST, RetentionPolicy, StepInfo, check_metrics, resolve_retention
from .snapshot import HostArena
from .verify import StepReport, damaged, is_damage, verify_step
from .writer import describe_os_error, plan_files, write_step

__all__ = ["CheckpointManager"]

_LIVE: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()
logger = logging.getLogger(__name__)


def _caller() -> str:
    """Where user code created the manager, for the message a second manager gets."""
    try:
        frame = sys._getframe(2)
    except ValueError:
        return ""
    return f"opened at {frame.f_code.co_filename}:{frame.f_lineno}"


class _DefaultKeepLast(int):
    """The default ``keep_last``: an int that ``keep=`` may override (an explicit 3 adds to it)."""

    def __repr__(self) -> str:
        return str(int(self))


_DEFAULT_KEEP_LAST = _DefaultKeepLast(DEFAULT_KEEP_LAST)


@dataclass(frozen=True)
class _Job:
    tree: dict[str, Json]
    plans: dict[str, WritePlan]
    progress: bool  # show a bar while the files are written


@atexit.register
def _finish_pending_saves() -> None:
    # Worker threads are non-daemon, so the interpreter has already joined them; what is left
    # is a failure nobody collected.  atexit cannot change the exit status, so the process
    # ends here with status 1: a scheduler must not see success when the last checkpoint is
    # missing.  Scripts that end with close() (or a with-block) get the error raised instead.
    failed = False
    for mgr in list(_LIVE):
        try:
            mgr.wait()
        except CheckpointError as e:
            failed = True
            logger.error("an asynchronous checkpoint save failed and was never collected: %s", e)
    if failed:
        logger.error("exiting with status 1; end training scripts with mgr.close() to get this error raised")
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(1)


class CheckpointManager:
    """Save and restore numbered training checkpoints in ``directory``.

    Each ``save(step, state)`` becomes ``directory/step_<n>/``, committed atomically (a crash
    leaves the previous steps intact and no partial step visible).  ``state`` maps names to
    modules, optimizers, schedulers, any object with ``state_dict()``/``load_state_dict()``,
    and plain values nested freely; nothing is pickled.  RNG state is saved and restored too.

    Retention: ``keep_last`` keeps the newest N steps (default 3; None: all).  ``keep`` takes a
    policy such as ``KeepLast(2)`` or ``KeepEvery(1000) | KeepBest(3, "val_loss")`` and then
    replaces the default; ``keep_last=N`` passed explicitly next to it adds ``KeepLast(N)``
    (a step survives if any policy keeps it; the newest always survives).  ``KeepBest`` ranks
    the ``metrics`` given to ``save()``: metrics lacking its metric are refused there.
    ``async_save`` makes ``save()`` return after a host snapshot.  A writer holds
    ``directory/.lock``; ``read_only=True`` only lists and restores, lock-free, and reads one
    whole copy of a step even while a writer re-saves it.
    ``progress=True`` shows bars for saves and restores (None: the ``TORCHST_PROGRESS``
    environment variable decides; each call may override it).  Every step file records its
    tensors' CRC32C (``checksums=False`` turns that off); ``restore`` verifies them, and
    ``verify(step)`` checks a step without loading it.
    ``process_group=pg`` makes ``save``/``restore`` collective for FSDP2 / tensor-parallel
    training (every rank calls them; see ``torchst.distributed``): each rank writes its own
    shards in place, rank 0 commits; restores reshard, and a plain process restores the step too.
    With ``async_save`` the writing runs in the background over a gloo group of the manager's own.
    ``timeout`` (seconds or ``timedelta``, default 10 minutes) bounds each of their collectives: a
    rank that died or hangs fails the step on the others within it.

    ``restore`` checks every key, shape and dtype before it writes anything: on a mismatch it
    raises ``CheckpointError`` and every object is left as it was.  Close the manager (or use
    ``with``) so that a failed final async save is raised, not lost.

    >>> with torchst.CheckpointManager("my-run", keep_last=3, async_save=True) as mgr:
    ...     mgr.save(100, {"model": model, "optim": opt, "sched": sched, "epoch": 2})
    ...     step = mgr.restore({"model": model, "optim": opt, "sched": sched})  # latest step
    >>> step
    100
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = _DEFAULT_KEEP_LAST,
        keep: RetentionPolicy | None = None,
        async_save: bool = False,
        save_rng: bool = True,
        read_only: bool = False,
        progress: bool | None = None,
        checksums: bool = True,
        process_group: Any | None = None,
        timeout: float | timedelta | None = None,
    ) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.checksums = checksums
        self.retention = resolve_retention(keep_last, keep, keep_last_given=keep_last is not _DEFAULT_KEEP_LAST)
        self.async_save = async_save
        self.save_rng = save_rng
        self.read_only = read_only
        self.progress = progress
        self._lock: DirectoryLock | None = None
        self._arena = HostArena()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._metrics: dict[int, Mapping[str, Any]] = {}
        self._unranked: set[str] = set()
        self._group: Any = None
        self._bg_group: Any = None  # async collective saves: the manager's own gloo group
        if timeout is not None and process_group is None:
            raise ArgumentError(
                f"{self.directory}: timeout={timeout!r} bounds the collectives of a manager with process_group=...; "
                "a single-process manager has none. Pass process_group= or drop timeout="
            )
        if process_group is not None:
            from .collective import join_group

            self._group, self._bg_group = join_group(process_group, async_save, timeout)
            if self._group.rank != 0:
                _LIVE.add(self)  # a failed final async save still ends the process with status 1
                return  # rank 0 owns the directory (lock, cleanup, commit); the others write their shards
        if read_only:
            if not os.path.isdir(self.directory):
                raise CheckpointNotFoundError(f"{self.directory}: checkpoint directory does not exist")
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{self.directory}: cannot create the checkpoint directory: {describe_os_error(e)}")
        self._lock = DirectoryLock(self.directory)
        self._lock.owner = _caller()
        cleanup(self.directory)  # leftovers of a crashed writer; safe now that we hold the lock
        _LIVE.add(self)

    # -- listing ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending; in-progress and interrupted saves are never listed.

        >>> mgr.steps()
        [800, 900, 1000]
        """
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        """The highest committed step, or None when there is none yet."""
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> str:
        """Directory of a committed step (its model files are ordinary safetensors files)."""
        self._manifest(step)
        location = step_location(self.directory, step)
        if location is None:
            raise CheckpointNotFoundError(f"{self.directory}: step {step} is not a committed checkpoint")
        return location

    def metrics(self, step: int) -> dict[str, Any]:
        """The ``metrics`` passed to ``save()`` for ``step``."""
        value = TreeDecoder(lambda n, d: torch.empty(0)).decode(self._manifest(step).get("metrics"))
        return dict(value) if isinstance(value, dict) else {}

    # -- saving -------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        progress: bool | None = None,
    ) -> None:
        """Checkpoint ``state`` as ``step``; with ``async_save`` return once it is snapshotted.

        ``metrics`` (e.g. ``{"val_loss": 0.31}``) are stored in the manifest for ``KeepBest``.
        A failed background save is raised here (or by ``wait()``), never swallowed.
        ``progress=True`` (default: the manager's ``progress``, else ``TORCHST_PROGRESS``)
        shows a bar while the files are written.

        >>> mgr.save(step, {"model": model, "optim": opt}, metrics={"val_loss": loss})
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SerializationError(f"step must be an int >= 0, found {step!r}")
        if self._group is not None and not self.read_only:
            from .collective import save_step  # collective: every rank of the group calls save()

            if self._bg_group is not None:
                from .collective_async import save_step_async

                save_step_async(self, self._bg_group, step, state, self._encode_metrics(metrics), dict(metrics or {}))
                return
            save_step(self, self._group, step, state, self._encode_metrics(metrics), dict(metrics or {}))
            return
        if self.read_only or self._lock is None or not self._lock.held:
            raise CheckpointError(f"{self.directory}: this manager is read-only or closed; it cannot save")
        self.wait()  # one save in flight: the previous one must be durable before the next starts
        if not os.path.isdir(self.directory):
            raise CheckpointError(
                f"{self.directory}: the checkpoint directory no longer exists (deleted or unmounted?); "
                f"nothing was saved for step {step}. Recreate it or point the manager elsewhere"
            )
        metrics_tree = self._encode_metrics(metrics)
        for name in check_metrics(self.retention, step, metrics):
            if name not in self._unranked:
                self._unranked.add(name)
                logger.warning(
                    "%s: step %d was saved without metrics, so KeepBest cannot rank it by %r; such steps are "
                    "kept only by the other retention policies (this is said once per metric)",
                    self.directory,
                    step,
                    name,
                )
        enc = encode_state(state, rng=self.save_rng)
        plans = plan_files(enc.files, checksums=self.checksums)  # bad dtypes, meta tensors... raise here
        if self.async_save:
            plans = plan_files(self._arena.snapshot(enc.files), checksums=self.checksums)
        job = _Job(enc.tree, plans, self._progress(progress))
        if not self.async_save:
            self._write(step, job, metrics_tree, dict(metrics or {}))
            return
        self._thread = threading.Thread(
            target=self._background,
            args=(step, job, metrics_tree, dict(metrics or {})),
            name=f"torchst-save-step_{step}",
            daemon=False,  # non-daemon: the interpreter finishes it at exit
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable; raise its failure if it failed.

        >>> mgr.save(step, state); mgr.wait()  # step is now committed on disk
        """
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"{self.directory}: the background save failed: {error!r}") from error

    def _background(self, step: int, job: _Job, metrics_tree: Json, metrics: dict[str, Any]) -> None:
        try:
            self._write(step, job, metrics_tree, metrics)
        except BaseException as e:  # noqa: BLE001 - handed to the next save()/wait()/close(), which raise it
            self._error = e
            logger.error(
                "%s: the asynchronous save of step %d failed (raised by the next save(), wait() or close()): %s",
                self.directory,
                step,
                e,
            )

    def _write(self, step: int, job: _Job, metrics_tree: Json, metrics: dict[str, Any]) -> None:
        earlier = self.steps()
        total = sum(plan.total_size for plan in job.plans.values())
        with progress_bar(total=total, desc=f"Saving step {step}", enabled=job.progress) as bar:
            aside = write_step(
                self.directory, step, job.plans, job.tree, metrics_tree, earlier=earlier, on_bytes=bar.update
            )
        self._metrics[step] = metrics
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # the step's previous copy, replaced and now unused
        self._apply_retention()

    def _encode_metrics(self, metrics: Mapping[str, Any] | None) -> Json:
        if metrics is None:
            return {}
        if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
            raise SerializationError(f"metrics must be a dict with str keys, found {metrics!r}")
        table = TensorTable()
        tree = TreeEncoder(table).encode(dict(metrics), ("<metrics>",))
        if table.tensors:
            raise SerializationError("metrics must be plain numbers or strings, not tensors (use .item())")
        return tree

    def _apply_retention(self) -> None:
        if self.retention is None:
            return
        steps = self.steps()
        if len(steps) < 2:
            return
        infos = [StepInfo(s, self._step_metrics(s)) for s in steps]
        keep = self.retention.keep(infos) | {steps[-1]}  # never the newest
        for s in steps:
            if s not in keep:
                try:
                    remove_step(self.directory, s)
                    logger.info("%s: deleted step %d (retention: %r)", self.directory, s, self.retention)
                except OSError as e:
                    raise CheckpointError(
                        f"{self.directory}: step {s} could not be deleted by the retention policy: "
                        f"{describe_os_error(e)}; the new step is committed"
                    ) from e
                self._metrics.pop(s, None)

    def _step_metrics(self, step: int) -> Mapping[str, Any]:
        if step not in self._metrics:
            try:
                self._metrics[step] = self.metrics(step)
            except CheckpointError:
                self._metrics[step] = {}
        return self._metrics[step]

    # -- restoring ----------------------------------------------------------------------
    def _manifest(self, step: int) -> dict[str, Any]:
        return read_manifest(self.directory, step)

    def _open(self, step: int | None) -> OpenStep:
        if self._lock is not None:
            self.wait()
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None (the latest), found {step!r}")
        return open_step(self.directory, step)

    def restore(
        self,
        state: MutableMapping[str, Any],
        step: int | None = None,
        *,
        restore_rng: bool = True,
        device: str | torch.device | None = None,
        progress: bool | None = None,
        verify: bool = True,
        fallback: bool = False,
    ) -> int:
        """Load ``step`` (default: the latest committed) into ``state`` in place; return the step.

        Stateful objects are loaded with their own ``load_state_dict``; plain values in
        ``state`` are replaced by the saved ones.  Keys of the checkpoint that ``state`` does
        not name are skipped.  Everything is checked before anything is written: on a
        mismatch (another architecture, say) ``CheckpointError`` names the key and both
        shapes and every object is unchanged.  Waits for a save in flight first.  The step
        is read whole even while a writer re-saves it.  ``progress=True`` (or
        ``TORCHST_PROGRESS=1``) shows a bar.

        ``verify`` (on by default) checks every tensor against its recorded checksum: a damaged
        step (corrupted bytes, a truncated or missing file, a broken manifest) raises an error
        naming the step, file and tensor, and nothing is loaded.  ``fallback=True`` restores the
        newest intact step at or below ``step`` instead and logs a warning naming each step skipped.

        >>> start = mgr.restore({"model": model, "optim": opt, "sched": sched}) + 1
        >>> start = mgr.restore({"model": model}, fallback=True) + 1   # skip a corrupted newest step
        """
        if not isinstance(state, MutableMapping):
            raise TypeError(f"restore() takes the dict of objects to load into, found {type(state).__name__}")
        if device is not None:
            device = check_device(device)  # a device that does not exist fails here, before any read
        if self._group is not None:
            from .collective import restore_step  # collective, resharding

            return restore_step(self, self._group, state, step, device, restore_rng)
        if not fallback:
            return self._restore(state, step, restore_rng, device, progress, verify)
        if self._lock is not None:
            self.wait()
        candidates = [s for s in reversed(self.steps()) if step is None or s <= step]
        if not candidates:
            return self._restore(state, step, restore_rng, device, progress, verify)  # raises not found
        skipped: list[str] = []
        for i, s in enumerate(candidates):
            try:
                restored = self._restore(state, s, restore_rng, device, progress, verify)
            except (CheckpointError, FormatError) as e:
                if not is_damage(e):
                    raise
                if i + 1 == len(candidates):
                    raise CheckpointError(
                        f"{self.directory}: no intact step to restore: steps {candidates} are all damaged; "
                        f"the oldest: {e}"
                    ) from e
                skipped.append(f"step {s} ({type(e).__name__}: {getattr(e, 'tensor', None) or e})")
                continue
            if skipped:
                logger.warning("%s: restored step %d after skipping damaged steps: %s", self.directory, restored,
                               "; ".join(skipped))  # fmt: skip
            return restored
        raise AssertionError("unreachable")

    def _restore(
        self,
        state: MutableMapping[str, Any],
        step: int | None,
        restore_rng: bool,
        device: torch.device | None,
        progress: bool | None,
        verify: bool,
    ) -> int:
        try:
            opened = self._open(step)
        except (CheckpointNotFoundError, CheckpointChangedError):
            raise
        except (CheckpointError, FormatError) as e:
            marked = damaged(self.directory, step, e)
            if marked is e:
                raise
            raise marked from e
        with opened, self._bar(opened, progress, "Restoring") as plain_read:
            opened.verify = verify

            def read(rel: str) -> tuple[Mapping[str, torch.Tensor], Mapping[str, str]]:
                try:
                    return plain_read(rel)
                except (CheckpointError, FormatError) as e:  # the bytes on disk, not the caller's objects
                    marked = damaged(self.directory, opened.step, e)
                    if marked is e:
                        raise
                    raise marked from e

            if restore_rng:
                from .collective import warn_rank_rng

                warn_rank_rng(opened.manifest["tree"], 1, opened.path)
            try:
                restore_state(
                    state,
                    opened.manifest["tree"],
                    read,
                    rng=restore_rng,
                    device=device,
                    where=opened.path,
                    step=opened.step,
                )
            except RecursionError:
                raise CheckpointError(f"{opened.path}: the state tree nests too deeply to restore") from None
            warn_unverified(opened.unverified)
            return opened.step

    def verify(self, step: int | None = None, *, progress: bool | None = None) -> StepReport:
        """Read every file of ``step`` (default: the latest) once and check every recorded checksum.

        Returns a report instead of raising, so every damaged tensor is listed (``problems``:
        errors naming file, tensor and byte range); ``ok`` is True when all checksums match.

        >>> report = mgr.verify(1000)
        >>> report.ok, report.problems
        (True, [])
        """
        if self._lock is not None:
            self.wait()
        target = self.latest_step() if step is None else step
        if target is None:
            raise CheckpointNotFoundError(f"{self.directory}: no committed checkpoint to verify")
        manifest = self._manifest(target)
        total = sum(int(e.get("size", 0)) for e in manifest["files"].values() if isinstance(e, dict))
        with progress_bar(total=total, desc=f"Verifying step {target}", enabled=self._progress(progress)) as bar:
            return verify_step(self.directory, target, on_bytes=bar.update)

    def read(self, step: int | None = None, *, progress: bool | None = None) -> dict[str, Any]:
        """The saved state of ``step`` as plain values (modules and optimizers as state dicts).

        >>> mgr.read()["model"]["fc.weight"].shape
        torch.Size([4, 4])
        """
        with self._open(step) as opened, self._bar(opened, progress, "Reading") as read:
            try:
                return decode_state(opened.manifest["tree"], read, where=opened.path)
            except RecursionError:
                raise CheckpointError(f"{opened.path}: the state tree nests too deeply to read") from None

    def _progress(self, asked: bool | None) -> bool:
        return progress_enabled(asked if asked is not None else self.progress)

    @contextmanager
    def _bar(self, opened: OpenStep, enabled: bool | None, verb: str) -> Iterator[FileReader]:
        with progress_bar(
            total=opened.nbytes, desc=f"{verb} step {opened.step}", enabled=self._progress(enabled)
        ) as bar:

            def read(rel: str) -> tuple[Mapping[str, torch.Tensor], Mapping[str, str]]:
                first = rel not in opened._cache
                out = opened.read(rel)
                if first:
                    bar.update(int(opened.manifest["files"][rel]["size"]))
                return out

            yield read

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Finish the save in flight, raise its failure if it failed, and release the directory lock.

        End every training script with ``close()`` (or use the manager as a context manager):
        a failed final async save is then raised where the script can see it.  A script that
        exits without it still ends with status 1 and the error in the ``torchst`` log.

        >>> with torchst.CheckpointManager("ckpt", async_save=True) as mgr:
        ...     mgr.save(100, state)   # the with-block waits for it and raises if it failed
        """
        try:
            if self._lock is not None or self._group is not None:
                self.wait()
        finally:
            if self._lock is not None:
                self._lock.release()
            _LIVE.discard(self)

    def __enter__(self) -> CheckpointManager:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, retention={self.retention!r}, async_save={self.async_save})"
