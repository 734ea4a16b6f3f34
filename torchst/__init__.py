"""torchst: fast, safe, complete PyTorch checkpoints on the safetensors format.

>>> import torch, torchst
>>> torchst.save_file({"w": torch.ones(2)}, "m.safetensors")
>>> torchst.load_file("m.safetensors")["w"]
tensor([1., 1.])

``import torchst`` does not import torch: every name below is imported on first use, so
header-only tools (``torchst inspect``) start in a fraction of torch's import time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
    ArgumentError,
    CheckpointChangedError,
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    DeviceMapError,
    FormatError,
    IntegrityError,
    RemoteError,
    SerializationError,
    ShardIndexError,
    SharedTensorError,
    TensorNotFoundError,
    TorchstError,
    UnsupportedDtypeError,
    WriteError,
)

if TYPE_CHECKING:
    from .format import SafeFile, SafeSlice, load, load_file, safe_open, save, save_file
    from .manager import CheckpointManager, KeepBest, KeepEvery, KeepLast
    from .nn import PretrainedMixin, init_empty_weights, load_model, save_model
    from .sharding import load_state_dict, save_state_dict

__version__ = "0.1.0"

# name -> submodule that defines it; imported (with torch) when the name is first used.
_LAZY = {
    "SafeFile": ".format",
    "SafeSlice": ".format",
    "load": ".format",
    "load_file": ".format",
    "safe_open": ".format",
    "save": ".format",
    "save_file": ".format",
    "CheckpointManager": ".manager",
    "KeepBest": ".manager",
    "KeepEvery": ".manager",
    "KeepLast": ".manager",
    "PretrainedMixin": ".nn",
    "init_empty_weights": ".nn",
    "load_model": ".nn",
    "save_model": ".nn",
    "load_state_dict": ".sharding",
    "save_state_dict": ".sharding",
}
# Subpackages reachable as attributes after a plain ``import torchst`` (as before the lazy façade).
_SUBMODULES = frozenset(
    {
        "compat",
        "convert",
        "dedup",
        "devices",
        "distributed",
        "format",
        "integrations",
        "manager",
        "nn",
        "resolve",
        "sharding",
        "state",
        "storage",
    }
)

__all__ = [
    "ArgumentError",
    "CheckpointChangedError",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "DeviceMapError",
    "FormatError",
    "IntegrityError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "PretrainedMixin",
    "RemoteError",
    "SafeFile",
    "SafeSlice",
    "SerializationError",
    "ShardIndexError",
    "SharedTensorError",
    "TensorNotFoundError",
    "TorchstError",
    "UnsupportedDtypeError",
    "WriteError",
    "__version__",
    "errors",
    "init_empty_weights",
    "load",
    "load_file",
    "load_model",
    "load_state_dict",
    "safe_open",
    "save",
    "save_file",
    "save_model",
    "save_state_dict",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
