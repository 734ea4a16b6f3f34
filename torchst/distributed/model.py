"""``save_model`` for FSDP2 / tensor-parallel models: ``model.state_dict()`` saved collectively."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from ..errors import SerializationError
from ..nn import EXTRA_STATE_KEY, tied_weights_keys
from ..sharding.io import SaveResult
from .save import save_state_dict

__all__ = ["save_model"]

_EXTRA = "_extra_state"


def save_model(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    process_group: Any | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    fsync: bool = True,
    timeout: timedelta | float | None = None,
) -> SaveResult:
    """Collectively save ``model.state_dict()`` (DTensor parameters of FSDP2 / TP models) as full tensors.

    Tied weights are stored once (transformers' ``_tied_weights_keys`` decide which name is
    kept), JSON-able extra state goes to the file metadata, as with ``torchst.save_model``.  The
    directory is an ordinary checkpoint: ``from_pretrained`` and ``torchst.load_model`` read it.

    >>> for layer in model.model.layers: fully_shard(layer)  # doctest: +SKIP
    >>> fully_shard(model)  # doctest: +SKIP
    >>> tsd.save_model(model, "ckpt")  # every rank  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise SerializationError(f"save_model expects a torch.nn.Module, found {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif key == _EXTRA or key.endswith("." + _EXTRA):
            extra[key] = value
        else:
            raise SerializationError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    md = dict(metadata or {})
    if extra:
        try:
            md[EXTRA_STATE_KEY] = json.dumps(extra, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SerializationError(f"get_extra_state() of {sorted(extra)} is not JSON ({e})") from None
    return save_state_dict(
        tensors,
        directory,
        process_group=process_group,
        max_shard_size=max_shard_size,
        metadata=md,
        tied_keys=tied_weights_keys(model),
        fsync=fsync,
        timeout=timeout,
    )
