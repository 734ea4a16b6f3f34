"""Pickle-free nested training state: tensors -> safetensors, everything else -> a typed JSON tree."""

from __future__ import annotations

from .codec import STATE_FILE, EncodedState, FileSpec, decode_state, encode_state, is_stateful, restore_state
from .optim import load_named_optimizer_state, named_optimizer_state, parameter_names
from .rng import capture_rng, restore_rng
from .tree import TensorTable, TreeDecoder, TreeEncoder

__all__ = [
    "STATE_FILE",
    "EncodedState",
    "FileSpec",
    "TensorTable",
    "TreeDecoder",
    "TreeEncoder",
    "capture_rng",
    "decode_state",
    "encode_state",
    "is_stateful",
    "load_named_optimizer_state",
    "named_optimizer_state",
    "parameter_names",
    "restore_rng",
    "restore_state",
]
