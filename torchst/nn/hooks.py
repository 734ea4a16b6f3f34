"""Ready-made state-dict hooks: rename or strip keys on load, cast floating tensors on save."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..devices import check_dtype

__all__ = ["cast_on_save", "rename_keys_on_load", "strip_prefix_on_load"]


def rename_keys_on_load(module: nn.Module, rename: Mapping[str, str] | Callable[[str], str]) -> RemovableHandle:
    """Rename checkpoint keys before ``module.load_state_dict`` matches them; returns a handle.

    ``rename`` is a ``{old: new}`` dict or a function of the key (relative to ``module``).

    >>> torchst.save_file({"fc.w": torch.ones(4, 4), "fc.bias": torch.zeros(4)}, "old.safetensors")
    >>> h = rename_keys_on_load(model, {"fc.w": "fc.weight"})
    >>> torchst.load_model(model, "old.safetensors"); h.remove()
    LoadResult(missing_keys=[], unexpected_keys=[])
    """
    fn: Callable[[str], str] = rename.get if isinstance(rename, Mapping) else rename  # type: ignore[assignment]
    mapping = rename if isinstance(rename, Mapping) else None

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rel = key[len(prefix) :]
            new = mapping.get(rel, rel) if mapping is not None else fn(rel)
            if new != rel:
                state_dict[prefix + new] = state_dict.pop(key)

    handle: RemovableHandle = module.register_load_state_dict_pre_hook(hook)  # type: ignore[no-untyped-call]
    return handle


def strip_prefix_on_load(module: nn.Module, prefix: str = "module.") -> RemovableHandle:
    """Drop ``prefix`` from checkpoint keys on load, e.g. a DDP/``torch.compile`` checkpoint.

    >>> _ = torchst.save_model(nn.DataParallel(model), "ddp.safetensors")  # keys "module.fc.weight", ...
    >>> h = strip_prefix_on_load(model, "module.")
    >>> torchst.load_model(model, "ddp.safetensors")
    LoadResult(missing_keys=[], unexpected_keys=[])
    """
    if not prefix:
        raise ValueError("prefix must be a non-empty string such as 'module.'")
    return rename_keys_on_load(module, lambda k: k.removeprefix(prefix))


def cast_on_save(module: nn.Module, dtype: torch.dtype) -> RemovableHandle:
    """Cast floating tensors of ``module.state_dict()`` to ``dtype`` (e.g. save fp32 weights as bf16).

    >>> h = cast_on_save(model, torch.bfloat16)
    >>> _ = torchst.save_model(model, "model-bf16.safetensors"); h.remove()
    >>> torchst.load_file("model-bf16.safetensors")["fc.weight"].dtype
    torch.bfloat16
    """
    check_dtype(dtype)
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key, value in state_dict.items():
            if key.startswith(prefix) and isinstance(value, torch.Tensor) and value.is_floating_point():
                # one cast per source memory keeps tied weights tied in the saved state
                ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                state_dict[key] = cache.setdefault(ident, value.to(dtype))
        cache.clear()

    handle: RemovableHandle = module.register_state_dict_post_hook(hook)  # type: ignore[no-untyped-call]
    return handle
