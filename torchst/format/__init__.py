"""L0: one .safetensors file. Knows bytes and tensors, never nn.Module or shards.

The header parser is imported eagerly and needs no torch; the reader and writer (which do)
are imported on first use, so ``torchst.format.header`` stays usable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
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


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
