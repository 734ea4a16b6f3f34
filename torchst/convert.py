"""Convert ``torch.save`` checkpoints (``.bin``/``.pt``/``.pth``/``.ckpt``) to safetensors, safely.

Every legacy file is read with ``torch.load(weights_only=True)``: only tensors and plain
containers are unpickled and no code from the file runs.  What a file is gets decided by its
first bytes (zip archive, legacy pickle or safetensors), never by its extension.

Accepted sources: one file; a directory holding ``pytorch_model.bin``, or the shards
``pytorch_model-0000i-of-0000N.bin`` with ``pytorch_model.bin.index.json`` (transformers'
layout); or any safetensors checkpoint (re-written, e.g. to re-shard it).

>>> torch.save(model.state_dict(), "pytorch_model.bin")
>>> sd = torchst.convert.load_legacy("pytorch_model.bin")
>>> result = torchst.convert.convert_checkpoint("pytorch_model.bin", "new_model/", max_shard_size="2GB")
>>> result.tensors, result.files
(2, ('new_model/model.safetensors',))
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ._progress import progress as _progress
from .errors import CheckpointNotFoundError, FormatError, SerializationError, ShardIndexError
from .resolve import sniff
from .sharding import load_state_dict, save_state_dict

__all__ = ["LEGACY_INDEX", "LEGACY_SINGLE", "NESTED_KEYS", "ConvertResult", "convert_checkpoint", "load_legacy"]

logger = logging.getLogger(__name__)

LEGACY_SINGLE = "pytorch_model.bin"
LEGACY_INDEX = "pytorch_model.bin.index.json"
# Keys under which training scripts commonly nest the model's state_dict, tried in this order.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
WEIGHTS_ONLY_NOTE = "torch.load(weights_only=True): only tensors and plain containers are unpickled, no code runs"


class ConvertResult(NamedTuple):
    """What ``convert_checkpoint`` did: source kind, tensors stored, aliases recorded, files written."""

    source_kind: str
    tensors: int
    aliases: dict[str, str]
    files: tuple[str, ...]


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _select(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The state_dict inside what torch.load returned: the object itself or one nested key."""
    if _is_state_dict(obj):
        assert isinstance(obj, dict)
        return obj
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _is_state_dict(inner):
                others = sorted(str(k) for k in obj if k != key)
                logger.info("%s: using the tensors under key %r (ignored keys: %s)", path, key, others[:10])
                return inner
        found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:6])
        raise SerializationError(
            f"{path}: expected a dict of str -> Tensor (a state_dict), found a dict with {{{found}}}; "
            f"nested state_dicts are looked for under {list(NESTED_KEYS)}. Re-save model.state_dict()"
        )
    raise SerializationError(
        f"{path}: expected a dict of str -> Tensor (a state_dict), found {type(obj).__name__}; "
        "save model.state_dict() rather than the model itself"
    )


def _load_file(path: str) -> dict[str, torch.Tensor]:
    kind = sniff(path)
    if kind not in ("torch-zip", "torch-pickle"):
        raise FormatError(
            f"{path}: not a torch.save checkpoint (the first bytes are neither a zip archive nor a pickle; "
            f"found {kind}); pass a .bin/.pt file written by torch.save"
        )
    logger.info("%s: loading with %s", path, WEIGHTS_ONLY_NOTE)
    try:
        if path.endswith(".safetensors"):
            # torch.load picks safetensors by this extension; the content says torch.save, so
            # hand it the open file (content decides, not the name).
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            # mmap (no copy into memory until written out) only exists for the zip format.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
    except pickle.UnpicklingError as e:
        why = [
            ln.split("error:", 1)[1].split(". ")[0].strip() for ln in str(e).splitlines() if "Unpickler error:" in ln
        ]
        raise SerializationError(
            f"{path}: refused: the file pickles objects other than tensors and plain containers "
            f"({why[0] if why else type(e).__name__}); torchst never executes code from a checkpoint - "
            "re-save it as a state_dict of tensors"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise FormatError(
            f"{path}: torch.load cannot read this file ({str(e).splitlines()[0][:200]}); is it truncated?"
        ) from None
    return _select(obj, path)


def _legacy_files(directory: str) -> list[str]:
    index = os.path.join(directory, LEGACY_INDEX)
    if os.path.isfile(index):
        with open(index, "rb") as f:
            try:
                weight_map = json.loads(f.read())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ShardIndexError(
                    f"{index}: not a valid index ({e!r}); expected {{'weight_map': {{...}}}}"
                ) from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ShardIndexError(f"{index}: 'weight_map' must map tensor names to shard file names")
        names = list(dict.fromkeys(weight_map[k] for k in sorted(weight_map)))
        for fn in names:
            if os.path.basename(fn) != fn or fn in ("", ".", ".."):
                raise ShardIndexError(f"{index}: shard name {fn!r} must be a plain file name inside {directory}")
            if not os.path.isfile(os.path.join(directory, fn)):
                raise ShardIndexError(f"{index}: shard {fn!r} is missing from {directory}; the download is incomplete")
        return [os.path.join(directory, fn) for fn in names]
    single = os.path.join(directory, LEGACY_SINGLE)
    if os.path.isfile(single):
        return [single]
    raise CheckpointNotFoundError(
        f"{directory}: no torch.save checkpoint found (expected {LEGACY_SINGLE} or {LEGACY_INDEX} with its shards)"
    )


def load_legacy(path: str | os.PathLike[str], *, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The state_dict of a ``torch.save`` file or directory, read with ``weights_only=True``.

    A file's content decides (zip or legacy pickle); a directory must hold ``pytorch_model.bin``
    or ``pytorch_model.bin.index.json`` and its shards, which are merged.  A dict that nests the
    state_dict under one of ``NESTED_KEYS`` is unwrapped (and logged); anything that is not
    tensors and plain containers is refused without running any of its code.

    >>> torch.save({"state_dict": model.state_dict(), "epoch": 3}, "last.ckpt")
    >>> sorted(load_legacy("last.ckpt"))  # the nested state_dict
    ['fc.bias', 'fc.weight']
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointNotFoundError(f"{p}: no such file or directory")
    files = _legacy_files(p) if os.path.isdir(p) else [p]
    out: dict[str, torch.Tensor] = {}
    with _progress(total=sum(os.path.getsize(f) for f in files), desc="Loading", enabled=progress) as bar:
        for f in files:
            part = _load_file(f)
            clash = sorted(out.keys() & part.keys())
            if clash:
                raise ShardIndexError(f"{f}: tensors {clash[:5]} are also in an earlier shard; the shards disagree")
            out.update(part)
            bar.update(os.path.getsize(f))
    return out


def _is_safetensors_source(path: str) -> bool:
    if os.path.isfile(path):
        return sniff(path) == "safetensors" or path.endswith(".index.json")
    entries = os.listdir(path)
    return any(e.endswith((".safetensors", ".safetensors.index.json")) for e in entries)


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = "5GB",
    metadata: Mapping[str, str] | None = None,
    progress: bool | None = None,
) -> ConvertResult:
    """Write ``src`` (torch.save file or directory, or safetensors) as safetensors at ``dst``.

    ``dst`` ending in ``.safetensors`` is one file; anything else a directory, sharded by
    ``max_shard_size``.  Tied (shared) tensors are stored once and recorded as aliases.
    ``metadata`` defaults to ``{"format": "pt"}``, what transformers writes.

    >>> torch.save(model.state_dict(), "pytorch_model.bin")
    >>> convert_checkpoint("pytorch_model.bin", "converted.safetensors").source_kind
    'torch-zip'
    """
    s, d = os.fspath(src), os.fspath(dst)
    if not os.path.exists(s):
        raise CheckpointNotFoundError(f"{s}: no such file or directory")
    if os.path.abspath(s) == os.path.abspath(d):
        raise SerializationError(f"{d}: the destination is the source; write the conversion somewhere else")
    tensors: dict[str, Any]
    if _is_safetensors_source(s):
        kind = "safetensors"
        tensors = load_state_dict(s)
    else:
        files = _legacy_files(s) if os.path.isdir(s) else [s]
        kind = sniff(files[0])
        tensors = load_legacy(s, progress=progress)
    # One step: the bar shows the size being written from the start and completes when it is saved.
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors.values()}.values())
    with _progress(total=size, desc="Saving", enabled=progress) as bar:
        saved = save_state_dict(tensors, d, max_shard_size=max_shard_size, metadata=metadata or {"format": "pt"})
        bar.update(size)
    written = saved.files + ((saved.index_file,) if saved.index_file else ())
    files_written = tuple(os.path.join(saved.directory, f) for f in written)
    return ConvertResult(kind, len(tensors) - len(saved.aliases), dict(saved.aliases), files_written)
