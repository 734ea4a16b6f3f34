"""L0: one .safetensors file. Knows bytes and tensors, never nn.Module or shards."""

from __future__ import annotations

from .header import MAX_HEADER_SIZE, Header, TensorInfo, build_header, parse_bytes, parse_header
from .reader import BACKENDS, SafeFile, SafeSlice, load, load_file, normalize_device, safe_open
from .writer import find_shared_tensors, plan_write, save, save_file, write_tensors

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
