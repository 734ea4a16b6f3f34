"""torchst: fast, safe, complete PyTorch checkpoints on the safetensors format.

>>> import torch, torchst
>>> torchst.save_file({"w": torch.ones(2)}, "m.safetensors")
>>> torchst.load_file("m.safetensors")["w"]
tensor([1., 1.])
"""

from __future__ import annotations

from . import errors
from .errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    DeviceMapError,
    FormatError,
    SerializationError,
    ShardIndexError,
    SharedTensorError,
    TensorNotFoundError,
    TorchstError,
    UnsupportedDtypeError,
)
from .format import SafeFile, SafeSlice, load, load_file, safe_open, save, save_file
from .manager import CheckpointManager, KeepBest, KeepEvery, KeepLast
from .nn import PretrainedMixin, load_model, save_model
from .sharding import load_state_dict, save_state_dict

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "DeviceMapError",
    "FormatError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "PretrainedMixin",
    "SafeFile",
    "SafeSlice",
    "SerializationError",
    "ShardIndexError",
    "SharedTensorError",
    "TensorNotFoundError",
    "TorchstError",
    "UnsupportedDtypeError",
    "__version__",
    "errors",
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
