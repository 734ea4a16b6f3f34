"""Asynchronous collective saves: ``CheckpointManager(dir, process_group=pg, async_save=True)``.

``save()`` runs on the training thread on every rank: it finishes the previous save (raising its
failure, which every rank agreed on), takes the state apart, copies this rank's local pieces
(a DTensor's local shard, a plain tensor whole) into the manager's reused host arena, agrees
with the other ranks that every copy succeeded, and returns.  A background thread then writes
each rank's bytes in place, votes, and rank 0 commits and applies retention, exactly as a
synchronous collective save does, but every collective of it runs on the manager's own gloo
group (created once, with the manager), so it never interleaves with training collectives.
At most one save is in flight; its last collective is a vote, so every rank ends it with the
same outcome, raised by the next ``save()``/``wait()``/``close()`` on every rank.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..distributed._layout import Piece, local_box
from ..distributed.comm import Group
from ..errors import CheckpointError
from ..state.codec import FileSpec
from ..state.tree import Json
from .collective import encode_step, rng_json, write_step

if TYPE_CHECKING:
    from .manager import CheckpointManager

__all__ = ["save_step_async"]

logger = logging.getLogger(__name__)


def _snapshot(mgr: CheckpointManager, files: Mapping[str, FileSpec]) -> dict[str, FileSpec]:
    """``files`` with every local piece copied into the host arena (shared tensors copied once)."""
    unique: dict[tuple[Any, ...], str] = {}
    plain: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, tuple[str, Any, tuple[int, ...]]]] = {}
    for rel, spec in files.items():
        layout[rel] = {}
        for name, value in spec.tensors.items():
            local, box = local_box(value, name)  # Partial placements are reduced here, on this thread
            key = (local.device, local.dtype, local.data_ptr(), tuple(local.shape), local.stride())
            if local.numel() == 0 or key not in unique:
                unique[key] = str(len(plain))
                plain[unique[key]] = local.detach()
            full = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value.box[1])
            layout[rel][name] = (unique[key], box, full)
    (copies,) = mgr._arena.snapshot({"": FileSpec(plain)}).values()
    out: dict[str, FileSpec] = {}
    for rel, spec in files.items():
        tensors: dict[str, Any] = {
            name: Piece(copies.tensors[k], box, full) for name, (k, box, full) in layout[rel].items()
        }
        out[rel] = FileSpec(tensors, dict(spec.metadata))
    return out


def save_step_async(
    mgr: CheckpointManager,
    background: Group,
    step: int,
    state: Mapping[str, Any],
    metrics_tree: Json,
    metrics: dict[str, Any],
) -> None:
    """Every rank: snapshot ``state`` and start writing it as ``step`` on ``background``'s group."""
    mgr.wait()  # one save in flight; raises the previous one's (agreed) failure on every rank

    def take() -> tuple[dict[str, Json], dict[str, FileSpec], Json]:
        tree, files = encode_step(state)
        return tree, _snapshot(mgr, files), rng_json() if mgr.save_rng else None

    try:
        # Between saves the background group is idle, so this agreement cannot interleave.
        tree, snap, rng = background.run(take, f"snapshotting step {step}")
    except CheckpointError as e:
        raise CheckpointError(f"{mgr.directory}: saving step {step} failed: {e}; nothing was written") from e

    def work() -> None:
        error: BaseException | None = None
        try:
            write_step(mgr, background, step, tree, snap, rng, metrics_tree, metrics)
        except BaseException as e:  # noqa: BLE001 - handed to the next save()/wait()/close()
            error = e
        try:
            # The last collective: a rank that failed outside an agreed step (or saw the others
            # time out) tells the rest, so every rank ends this save with the same outcome.
            background.vote(error, f"finishing step {step}")
        except CheckpointError as agreed:
            error = error if isinstance(error, CheckpointError) else agreed
        if error is not None:
            mgr._error = error
            logger.error(
                "%s: rank %d: the asynchronous save of step %d failed (raised by the next save(), wait() or "
                "close()): %s",
                mgr.directory,
                background.rank,
                step,
                error,
            )

    mgr._thread = threading.Thread(target=work, name=f"torchst-save-step_{step}", daemon=False)
    mgr._thread.start()
