"""Collective, resharding loads: each rank reads only the bytes of its own local pieces.

Any checkpoint torchst reads (one written by any number of ranks, by the single-process API, or
by ``transformers``) loads into any placement on any world size: each rank works out the box of
the full tensor its local piece covers and reads it with positional reads (one per contiguous
run), straight into the target's memory when the dtype and device allow it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from .._dtypes import from_code
from ..errors import CheckpointError, SerializationError
from ..nn import EXTRA_STATE_KEY, LoadResult
from ..sharding.checkpoint import Checkpoint, open_checkpoint
from ..storage.buffers import pread_into, tensor_bytes
from ._layout import Box, is_dtensor, runs
from .comm import Group

__all__ = ["load_model", "load_state_dict", "read_into"]

PathLike = str | os.PathLike[str]


def _target_box(t: torch.Tensor, name: str) -> tuple[torch.Tensor, Box]:
    if not is_dtensor(t):
        return t, ((0,) * t.dim(), tuple(t.shape))
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dt: Any = t
    if any(p.is_partial() for p in dt.placements):
        raise CheckpointError(
            f"tensor {name!r} has a Partial placement {list(dt.placements)}; load into Shard/Replicate placements"
        )
    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    local = dt.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name!r}: the local shard has shape {list(local.shape)} but its placements "
            f"{list(dt.placements)} give {list(shape)}; this layout is not supported"
        )
    return local, (tuple(offset), tuple(shape))


def _check(
    ckpt: Checkpoint, state_dict: Mapping[str, torch.Tensor], strict: bool, tied: Mapping[str, list[str]] | None = None
) -> tuple[list[str], list[str], dict[str, str]]:
    source: dict[str, str] = {}  # target name -> stored name
    missing = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise SerializationError(f"state dict entry {name!r} is a {type(t).__name__}, not a torch.Tensor")
        stored = ckpt.aliases.get(name, name)
        if stored in ckpt.tensors:
            source[name] = stored
        else:
            missing.append(name)
    unexpected = [k for k in ckpt.tensors if k not in state_dict]
    if tied:  # a tied name the file leaves out (transformers drops lm_head.weight) is loaded through its twin
        missing = [k for k in missing if not any(o in source for o in tied.get(k, ()))]
    wrong = []
    for name, stored in source.items():
        info = ckpt.tensors[stored][2]
        row = from_code(info.dtype)
        shape = list(info.shape)
        if row.pack != 1 and shape:
            shape[-1] //= row.pack
        if list(state_dict[name].shape) != shape:
            wrong.append(f"{name!r}: checkpoint has shape {shape}, the target has {list(state_dict[name].shape)}")
    if wrong:
        raise CheckpointError(
            f"{ckpt.source}: size mismatch for {len(wrong)} tensor(s) (nothing was loaded): " + "; ".join(wrong[:10])
        )
    if strict and (missing or unexpected):
        msg = f"{ckpt.source}: the checkpoint and the state dict do not match (nothing was loaded):"
        if missing:
            msg += "\n    Missing key(s): " + ", ".join(f'"{k}"' for k in sorted(missing)[:20])
        if unexpected:
            msg += "\n    Unexpected key(s): " + ", ".join(f'"{k}"' for k in sorted(unexpected)[:20])
        raise CheckpointError(msg + "\n  pass strict=False to load the matching keys and get the lists back")
    return missing, unexpected, source


def _read(ckpt: Checkpoint, state_dict: Mapping[str, torch.Tensor], source: Mapping[str, str]) -> None:
    for name, stored in source.items():
        path, start, info = ckpt.tensors[stored]
        where = f"{path}: tensor {stored!r}"
        src_dtype = from_code(info.dtype, where).require_torch(where)
        local, box = _target_box(state_dict[name], name)
        if 0 in box[1]:
            continue
        # the descriptors the checkpoint opened: every rank reads the snapshot it validated
        fd = ckpt._fd(path)
        direct = local.device.type == "cpu" and local.dtype == src_dtype and local.is_contiguous()
        # Straight into the target's memory when possible; otherwise one buffer, then one
        # copy_ that casts and moves it (copy #1).
        buf = local if direct else torch.empty(box[1], dtype=src_dtype)
        view = tensor_bytes(buf)
        for goff, loff, length in runs(tuple(state_dict[name].shape), box, buf.element_size()):
            pread_into(fd, view[loff : loff + length], start + info.begin + goff, source=where)
        if not direct:
            with torch.no_grad():
                local.copy_(buf)


def read_into(ckpt: Checkpoint, targets: Mapping[str, torch.Tensor]) -> None:
    """Fill ``targets`` (stored name -> DTensor or plain tensor of the stored global shape) from ``ckpt``.

    Each rank reads only its local pieces' byte ranges; no checks beyond the shapes.
    """
    _check(ckpt, targets, strict=False)
    _read(ckpt, targets, {n: n for n in targets})


def load_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: PathLike,
    *,
    process_group: Any | None = None,
    strict: bool = True,
    timeout: timedelta | float | None = None,
) -> LoadResult:
    """Collectively fill ``state_dict``'s tensors (DTensors or plain) in place from a checkpoint.

    Each rank reads only the byte ranges its local pieces cover, whatever the world size and
    placements the checkpoint was saved with (or a single-process / ``transformers`` one).  Values
    are cast to the target's dtype.  ``strict`` raises ``CheckpointError`` (on every rank, before
    anything is loaded) on missing or unexpected keys; shape mismatches always raise, naming
    both shapes.  Returns ``(missing_keys, unexpected_keys)``.

    >>> sd = fsdp_model.state_dict()  # doctest: +SKIP
    >>> tsd.load_state_dict(sd, "ckpt")  # every rank; DTensor shards are filled in place  # doctest: +SKIP
    """
    group = Group(process_group, timeout, "torchst.distributed.load_state_dict")
    path = os.fspath(directory)

    def load() -> LoadResult:
        with open_checkpoint(path) as ckpt:
            missing, unexpected, source = _check(ckpt, state_dict, strict)
            _read(ckpt, state_dict, source)
        return LoadResult(missing, unexpected)

    return group.run(load, "loading")


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: g for g in groups.values() if len(g) > 1 for n in g}


def load_model(
    model: nn.Module,
    directory: PathLike,
    *,
    process_group: Any | None = None,
    strict: bool = True,
    timeout: timedelta | float | None = None,
) -> LoadResult:
    """Collectively load a checkpoint into an FSDP2 / tensor-parallel (or plain) model, resharding.

    >>> tsd.load_model(fsdp_model, "ckpt")  # every rank; saved by any number of ranks  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_model expects a torch.nn.Module, found {type(model).__name__}")
    group = Group(process_group, timeout, "torchst.distributed.load_model")
    path = os.fspath(directory)

    def load() -> LoadResult:
        with open_checkpoint(path) as ckpt:
            return _load_model(ckpt, model, strict)

    return group.run(load, "loading")


def _load_model(ckpt: Checkpoint, model: nn.Module, strict: bool) -> LoadResult:
    state: dict[str, Any] = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing, unexpected, source = _check(ckpt, state, strict, _tied_groups(model))
    _read(ckpt, state, source)
    extra = ckpt.metadata.get(EXTRA_STATE_KEY)
    if extra is not None:
        state.update(json.loads(extra))
    # state_dict() values usually share the parameters' memory; loading them back covers
    # state_dict hooks that hand out copies, and extra state.
    model.load_state_dict({k: v for k, v in state.items() if k not in missing}, strict=False)
    return LoadResult(missing, unexpected)
