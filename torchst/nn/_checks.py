"""Argument checks shared by every nn entry point (one message per misuse)."""

from __future__ import annotations

from torch import nn

from ..errors import ArgumentError


def require_module(obj: object, fn: str) -> nn.Module:
    """``obj`` itself when it is an ``nn.Module``; ``ArgumentError`` naming ``fn`` otherwise."""
    if not isinstance(obj, nn.Module):
        raise ArgumentError(
            f"{fn} expects a torch.nn.Module, found {type(obj).__name__}; for a dict of tensors use "
            f"torchst.{'save_state_dict' if fn.startswith('save') else 'load_state_dict'}"
        )
    return obj
