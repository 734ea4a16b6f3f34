"""L0: one .safetensors file. Knows bytes and tensors, never nn.Module or shards.

The header parser is imported eagerly and needs no torch; the reader and writer (which do)
are imported on first use, so ``torchst.format.header`` stays usable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .header import MAX_HEADER_SIZE, Header, TensorInfo, build_header, parse_bytes, parse_header

if TYPE_CHECKING:
    from .reader import BACKENDS, SafeFile, SafeSlice, load, load_file, normalize_device, safe_open
    from .writer import find_shared_tensors, plan_write, save, save_file, write_tensors

_LAZY = {
    **dict.fromkeys(
        ("BACKENDS", "SafeFile", "SafeSlice", "load", "load_file", "normalize_device", "safe_open"), ".reader"
    ),
    **dict.fromkeys(("find_shared_tensors", "plan_write", "save", "save_file", "write_tensors"), ".writer"),
}

__all__ = [
    "BACKENDS",
    "MAX_HEADER_SIZE",
    "Header",
    "SafeFile",
    "SafeSlice",
    "TensorInfo",
    "build_header",
    "find_shared_tensors",
    "load",
    "load_file",
    "normalize_device",
    "parse_bytes",
    "parse_header",
    "plan_write",
    "safe_open",
    "save",
    "save_file",
    "write_tensors",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
