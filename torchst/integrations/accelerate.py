"""accelerate integration: load a torchst (or any safetensors) checkpoint, then dispatch.

``load_checkpoint_and_dispatch`` mirrors ``accelerate.load_checkpoint_and_dispatch``: the
weights are materialised with torchst straight onto the devices of the map, and when the map
spans several devices accelerate's hooks are attached so ``forward`` moves activations between
them.  accelerate is imported on first use only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..devices import DeviceMap, infer_device_map, normalize_device
from ..errors import DeviceMapError
from ..nn import load_model

__all__ = ["load_checkpoint_and_dispatch"]


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    *,
    device_map: DeviceMap | str = "auto",
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load ``checkpoint`` into ``model`` (usually built under ``init_empty_weights``) and dispatch it.

    >>> with torchst.init_empty_weights():
    ...     net = MyNet()
    >>> net = load_checkpoint_and_dispatch(net, "model.safetensors", device_map="auto", max_memory={"cpu": "1GB"})
    >>> net.fc.weight.device
    device(type='cpu')
    """
    try:
        import accelerate
    except ImportError:
        raise DeviceMapError(
            "load_checkpoint_and_dispatch needs the accelerate package: pip install accelerate"
        ) from None
    if isinstance(device_map, str):
        if device_map != "auto":
            raise DeviceMapError(f'device_map must be "auto" or a dict {{prefix: device}}, found {device_map!r}')
        resolved: dict[str, Any] = dict(
            infer_device_map(model, max_memory=max_memory, dtype=dtype, no_split_module_classes=no_split_module_classes)
        )
    else:
        if max_memory is not None:
            raise DeviceMapError('max_memory only applies to device_map="auto"')
        resolved = dict(device_map)
    load_model(model, checkpoint, strict=strict, device_map=resolved, dtype=dtype)
    if len({str(normalize_device(d)) for d in resolved.values()}) > 1:
        # Several devices: accelerate's hooks move activations to each module's device in forward.
        model = accelerate.dispatch_model(model, device_map=resolved)
    return model
