"""``load_model``: one plan (names -> placements -> reads) built from the model, then executed.

1. **names**: the model's state-dict tensors by name, and which names are tied to one object;
2. **placements**: the device and dtype each name gets (``device_map`` prefixes, ``"auto"``, the
   model's own dtypes or ``dtype``), validated against the model, typos included;
3. **plan**: ``Checkpoint.plan`` turns them into reads; shapes are checked against the model
   before any byte is read, so a wrong checkpoint leaves the model untouched;
4. **execute**: read, hand the state to ``model.load_state_dict`` (hooks run), tie again what
   the model ties, give buffers the checkpoint does not hold a real value and a device.

A model whose tensors are on the ``meta`` device (``torchst.init_empty_weights()``,
``with torch.device("meta")``), a model given a ``device_map``, or a built model given a
``dtype`` get new tensors assigned; otherwise the checkpoint is copied into the existing
tensors in place.  For CPU targets assigned tensors are read into memory the model owns (one
copy, file -> parameter), not left as windows of the mapped files: tools that rewrite a
checkpoint in place would otherwise make the next access to a mapped parameter crash the
process with SIGBUS, and first-touch page faults would land in the first forward pass instead
of the load.  Pass ``backend="mmap"`` for zero-copy, page-cache-backed parameters when the files
are known to stay put.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .._progress import progress as progress_bar
from ..devices import DeviceLike, DeviceMap, check_device, check_dtype, infer_device_map, resolve_device_map
from ..errors import CheckpointError, DeviceMapError
from ..format.reader import check_backend
from ..sharding.io import Checkpoint, open_checkpoint
from ..sharding.load_plan import LoadPlan
from ._checks import require_module
from .meta import materialize_meta_buffers
from .save import EXTRA_STATE_KEY

__all__ = ["LoadResult", "load_model"]

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


class LoadResult(NamedTuple):
    """Keys the model has but the checkpoint lacked, and keys the checkpoint has but the model lacks."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(frozen=True)
class _Target:
    """The model side of a load: its state-dict tensors by name and the names tied together."""

    named: dict[str, torch.Tensor]
    groups: list[list[str]]

    @classmethod
    def of(cls, model: nn.Module) -> _Target:
        named: dict[str, torch.Tensor] = {}
        by_id: dict[int, list[str]] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            pre = f"{mod_name}." if mod_name else ""
            for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is None or attr in mod._non_persistent_buffers_set:
                    continue
                named[pre + attr] = t
                by_id.setdefault(id(t), []).append(pre + attr)
        return cls(named, [g for g in by_id.values() if len(g) > 1])

    @property
    def tied_to(self) -> dict[str, list[str]]:
        return {n: g for g in self.groups for n in g}


def load_model(
    model: nn.Module,
    path_or_directory: PathLike,
    *,
    strict: bool = True,
    device: DeviceLike = "cpu",
    device_map: DeviceMap | str | None = None,
    dtype: torch.dtype | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    backend: str | None = None,
    progress: bool | None = None,
    verify: bool = False,
    trusted_roots: Iterable[PathLike] | None = None,
) -> LoadResult:
    """Load a file, directory or index into ``model`` through ``model.load_state_dict``.

    A model built with ``torchst.init_empty_weights()`` (or on the meta device), or any model
    given a ``device_map``, gets new tensors on ``device`` or on ``device_map={prefix: device}`` /
    ``"auto"`` (accelerate's planner, with ``max_memory``), in the model's dtypes or ``dtype``
    for floating tensors.  A built model is copied into in place; given ``dtype`` it gets new
    floating tensors in that dtype instead, on the devices it is on.  ``strict`` raises
    ``CheckpointError`` on missing/unexpected keys; with ``strict=False`` parameters the
    checkpoint lacks and that are left on meta are named in a warning.  ``progress=True`` (or
    ``TORCHST_PROGRESS=1``) shows a bar.  ``verify=True`` checks every tensor against its recorded
    checksum before the model is touched (``IntegrityError`` names file, tensor and byte range).
    The weights come from one committed checkpoint even while a writer re-saves it, and
    ``trusted_roots`` lists directories the checkpoint's symlinks may lead into (see
    ``torchst.sharding.open_checkpoint``).

    >>> with torchst.init_empty_weights():
    ...     net = MyNet()
    >>> torchst.load_model(net, "model.safetensors", device_map={"": "cpu"}, dtype=torch.bfloat16)
    LoadResult(missing_keys=[], unexpected_keys=[])
    >>> net.fc.weight.dtype, net.fc.weight.device
    (torch.bfloat16, device(type='cpu'))
    """
    require_module(model, "load_model")
    check_dtype(dtype)
    if backend is not None:
        check_backend(backend)
    dev = check_device(device)
    ckpt = open_checkpoint(path_or_directory, trusted_roots=trusted_roots)
    try:  # the descriptors are needed until the read; mapped tensors keep their own mappings
        target = _Target.of(model)
        meta = any(t.is_meta for t in target.named.values())
        assign = device_map is not None or meta or dtype is not None
        prefixes = _prefix_map(model, device_map, max_memory, dtype)
        plan = _plan(model, ckpt, target, dev, prefixes, dtype, assign, meta, backend)
        _check_shapes(ckpt, plan, target)
        # verify: every tensor is checked before the model is touched, so nothing is read in place
        into = None if assign or verify else _in_place_targets(model, plan, target)
        with progress_bar(total=plan.nbytes, desc="Loading weights", enabled=progress) as bar:
            state = ckpt.read(plan, on_bytes=bar.update, verify=verify, into=into)
    finally:
        ckpt.close()
    tied_to = target.tied_to
    if assign:
        for alias, kept in ckpt.aliases.items():
            if alias in state and kept not in tied_to.get(alias, ()):
                state[alias] = state[alias].clone()  # the model does not tie them: keep them independent
    extra = ckpt.metadata.get(EXTRA_STATE_KEY)
    if extra is not None:
        state.update(json.loads(extra))
    result = model.load_state_dict(state, strict=False, assign=assign)
    loaded = {k for k in state if k not in result.unexpected_keys}
    missing = [k for k in result.missing_keys if not any(o in loaded for o in tied_to.get(k, ()))]
    unexpected = [k for k in result.unexpected_keys if k not in ckpt.aliases]
    if assign:
        _retie(model, target.groups, loaded)
    tie_weights = getattr(model, "tie_weights", None)
    if missing and callable(tie_weights):
        # transformers models declare ties (``_tied_weights_keys`` + config) that a model built
        # on meta may not have applied yet; the file then lacks the tied name.
        tie_weights()
        tied_now = _Target.of(model).tied_to
        missing = [k for k in missing if not any(o in loaded for o in tied_now.get(k, ()))]
    if assign:
        _place_leftovers(model, loaded, dev, prefixes)
    unindexed = sorted(n for names in ckpt.unindexed.values() for n in names)
    if strict and (missing or unexpected or unindexed):
        raise CheckpointError(_mismatch_message(model, ckpt.source, missing, unexpected, unindexed))
    _warn_meta_left(model, ckpt.source)
    return LoadResult(missing, unexpected)


def _prefix_map(
    model: nn.Module,
    device_map: DeviceMap | str | None,
    max_memory: Mapping[int | str, int | str] | None,
    dtype: torch.dtype | None,
) -> DeviceMap | None:
    if isinstance(device_map, str):
        if device_map != "auto":
            raise DeviceMapError(f'device_map must be "auto" or a dict {{prefix: device}}, found {device_map!r}')
        return infer_device_map(model, max_memory=max_memory, dtype=dtype)
    if max_memory is not None:
        raise DeviceMapError('max_memory only applies to device_map="auto"')
    return device_map


def _plan(
    model: nn.Module,
    ckpt: Checkpoint,
    target: _Target,
    dev: torch.device,
    prefixes: DeviceMap | None,
    dtype: torch.dtype | None,
    assign: bool,
    meta: bool,
    backend: str | None,
) -> LoadPlan:
    """Placements of every stored tensor: device and dtype per name, from the model and the arguments."""
    named = target.named
    in_model = [n for n in ckpt.tensors if n in named]
    devices: dict[str, torch.device] = {}
    if prefixes is not None:
        known = [n for n, _ in model.named_modules()] + list(named)
        devices = resolve_device_map(in_model, prefixes, known=known)
    elif assign and not meta:
        devices = {n: named[n].device for n in in_model}  # a built model keeps its devices
    for g in target.groups:
        placed = {str(devices[n]) for n in g if n in devices}
        if len(placed) > 1:
            raise DeviceMapError(
                f"tied tensors {g} are mapped to different devices {sorted(placed)}; they are one tensor, "
                "so map their modules to the same device"
            )
    dtypes: dict[str, torch.dtype] = {}
    if assign:  # new tensors take the model's declared dtype (or ``dtype``), as copying in would
        for n in in_model:
            if not (dtype is not None and named[n].dtype.is_floating_point):
                dtypes[n] = named[n].dtype
    # Names the model lacks (renamed by load hooks, or unexpected) go to ``device``.
    device_map = {"": dev, **devices}
    return ckpt.plan(
        device_map=device_map, dtype=dtype, dtypes=dtypes, backend=backend or ("pread" if assign else "mmap")
    )


def _in_place_targets(model: nn.Module, plan: LoadPlan, target: _Target) -> dict[str, torch.Tensor] | None:
    """Tensors of a built model that the checkpoint can be read straight into (file -> parameter).

    Reading into the model's own memory with positional reads in flight across tensors and shards
    is one copy instead of two (mapping + ``copy_``) and overlaps cold reads; ``load_state_dict``
    then sees each tensor being copied onto itself, which torch skips.  Only when no module has a
    load pre-hook: a hook may rename or exchange entries, which needs the checkpoint's own tensors.
    """
    if any(m._load_state_dict_pre_hooks for m in model.modules()):
        return None
    into: dict[str, torch.Tensor] = {}
    for r in plan.reads:
        t = target.named.get(r.name)
        if (
            t is not None
            and r.dtype is None
            and t.device.type == "cpu"
            and r.device.type == "cpu"
            and t.dtype == r.stored_dtype
            and tuple(t.shape) == r.shape
            and t.is_contiguous()
        ):
            into[r.name] = t.detach()  # the same memory, written without autograd
    return into or None


def _check_shapes(ckpt: Checkpoint, plan: LoadPlan, target: _Target) -> None:
    shapes = {r.name: r.shape for r in plan.reads}
    wrong = []
    for name, kept in [(n, n) for n in shapes] + list(ckpt.aliases.items()):
        t = target.named.get(name)
        if t is not None and kept in shapes and tuple(t.shape) != shapes[kept]:
            wrong.append(f"{name!r}: checkpoint has shape {list(shapes[kept])}, the model has {list(t.shape)}")
    if wrong:
        raise CheckpointError(
            f"{ckpt.source}: size mismatch for {len(wrong)} tensor(s) (nothing was loaded): " + "; ".join(wrong[:10])
        )


def _retie(model: nn.Module, groups: list[list[str]], loaded: set[str]) -> None:
    for g in groups:
        src = next((n for n in g if n in loaded), None)
        if src is None:
            continue
        owner, _, attr = src.rpartition(".")
        mod = model.get_submodule(owner)
        obj: Any = mod._parameters[attr] if attr in mod._parameters else mod._buffers[attr]
        for n in g:
            owner, _, attr = n.rpartition(".")
            mod = model.get_submodule(owner)
            (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = obj


def _place_leftovers(model: nn.Module, loaded: set[str], dev: torch.device, prefixes: DeviceMap | None) -> None:
    """Buffers the checkpoint does not hold (e.g. non-persistent ones) get a value and their module's device."""
    stuck = materialize_meta_buffers(model, skip=loaded)
    leftovers: dict[str, tuple[nn.Module, str]] = {}
    for mod_name, mod in model.named_modules():
        pre = f"{mod_name}." if mod_name else ""
        for attr, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta and pre + attr not in loaded:
                leftovers[pre + attr] = (mod, attr)
    if leftovers:
        if prefixes is None:
            targets = dict.fromkeys(leftovers, dev)
        else:
            targets = resolve_device_map(
                list(leftovers), {"": dev, **prefixes}, known=[n for n, _ in model.named_modules()]
            )
        for name, (mod, attr) in leftovers.items():
            buf = mod._buffers[attr]
            if buf is not None and buf.device != targets[name]:
                mod._buffers[attr] = buf.to(targets[name])
    if stuck:
        warnings.warn(
            f"buffers {stuck[:5]} are still on the meta device: the checkpoint does not hold them and torchst cannot "
            "compute them (their module records no config to rebuild it from); build the model under "
            "torchst.init_empty_weights(), which keeps buffers real, instead of torch.device('meta')",
            stacklevel=3,
        )


def _warn_meta_left(model: nn.Module, source: str) -> None:
    left = [n for n, t in _Target.of(model).named.items() if t.is_meta]  # non-persistent ones were reported
    if left:
        shown = ", ".join(repr(n) for n in left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
        warnings.warn(
            f"{source} does not hold {len(left)} tensor(s) of {type(model).__name__}, which stay on the meta device "
            f"with no data: {shown}; initialise them before use (forward() fails on meta tensors) or load a "
            "checkpoint that has them",
            stacklevel=3,
        )


def _mismatch_message(
    model: nn.Module, source: str, missing: list[str], unexpected: list[str], unindexed: Sequence[str] = ()
) -> str:
    msg = f"Error(s) in loading {source} into {type(model).__name__}:"
    if missing:
        msg += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
    if unexpected:
        msg += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
    if unindexed:
        msg += (
            "\n    Stored in shards but not listed by the index (not loaded): "
            + ", ".join(f'"{k}"' for k in unindexed[:20])
            + (f" and {len(unindexed) - 20} more" if len(unindexed) > 20 else "")
        )
    return msg + "\n  pass strict=False to load the matching keys and get the lists back"
