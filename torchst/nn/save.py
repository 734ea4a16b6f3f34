"""``save_model``: a module's state dict with tied weights stored once and JSON extra state."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..dedup import TiedKeys
from ..errors import SerializationError
from ..sharding.io import SaveResult, save_state_dict
from ._checks import require_module

__all__ = ["EXTRA_STATE_KEY", "save_model", "tied_weights_keys"]

# JSON-able ``get_extra_state()`` values live in the file metadata under this key (no pickle).
EXTRA_STATE_KEY = "torchst.extra_state"
EXTRA = "_extra_state"
PathLike = str | os.PathLike[str]


def tied_weights_keys(model: nn.Module) -> TiedKeys | None:
    """The model's transformers ``_tied_weights_keys`` (v4 list or v5 dict), prefixed per submodule.

    >>> class LM(nn.Module):
    ...     _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    >>> tied_weights_keys(nn.ModuleDict({"lm": LM()}))
    {'lm.lm_head.weight': 'lm.embed.weight'}
    """
    as_list: list[str] = []
    as_dict: dict[str, str] = {}
    for name, sub in model.named_modules():
        tied = getattr(sub, "_tied_weights_keys", None)
        pre = f"{name}." if name else ""
        if isinstance(tied, Mapping):
            as_dict.update({pre + str(k): pre + str(v) for k, v in tied.items()})
        elif isinstance(tied, (list, tuple, set)):
            as_list.extend(pre + str(k) for k in tied)
    return as_dict or as_list or None


def save_model(
    model: nn.Module,
    path_or_directory: PathLike,
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    fsync: bool = False,
    checksums: bool = True,
    progress: bool | None = None,
) -> SaveResult:
    """Save ``model.state_dict()``: tied weights once, user hooks and extra state honoured.

    A path ending in ``.safetensors`` is one file; anything else is a directory (one
    ``model.safetensors`` unless ``max_shard_size`` asks for shards).  Each tensor's CRC32C is
    recorded in its file's metadata (``checksums=False`` turns that off), so
    ``load_model(..., verify=True)`` and ``torchst verify`` can detect corruption.
    ``progress=True`` (or ``TORCHST_PROGRESS=1``) shows a bar of the bytes written.

    >>> result = torchst.save_model(model, "my-ckpt", max_shard_size="2GB")
    >>> result.files
    ('model.safetensors',)
    >>> missing, unexpected = torchst.load_model(model, "my-ckpt")
    """
    require_module(model, "save_model")
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif key == EXTRA or key.endswith("." + EXTRA):
            extra[key] = value
        else:
            raise SerializationError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; a state_dict hook must "
                "return tensors"
            )
    md = dict(metadata or {})
    if extra:
        try:
            md[EXTRA_STATE_KEY] = json.dumps(extra, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SerializationError(
                f"get_extra_state() of {sorted(extra)} returned a value that is not JSON ({e}); return a tensor, "
                "or dicts/lists of str, int, float, bool and None (torchst never pickles)"
            ) from None
    return save_state_dict(
        tensors,
        path_or_directory,
        max_shard_size=max_shard_size,
        metadata=md,
        tied_keys=tied_weights_keys(model),
        fsync=fsync,
        checksums=checksums,
        progress=progress,
    )
