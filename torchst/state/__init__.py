"""Pickle-free nested training state: tensors -> safetensors, everything else -> a typed JSON tree."""

from __future__ import annotations

from .codec import STATE_FILE, EncodedState, FileSpec, decode_state, encode_state, is_stateful
from .optim import load_named_optimizer_state, named_optimizer_state, parameter_names, prepare_named_optimizer_state
from .restore import restore_state
from .rng import capture_rng, check_rng, restore_rng
from .tree import TensorTable, TreeDecoder, TreeEncoder

__all__ = [
    "STATE_FILE",
    "EncodedState",
    "FileSpec",
    "TensorTable",
    "TreeDecoder",
    "TreeEncoder",
    "capture_rng",
    "check_rng",
    "decode_state",
    "encode_state",
    "is_stateful",
    "load_named_optimizer_state",
    "named_optimizer_state",
    "parameter_names",
    "prepare_named_optimizer_state",
    "restore_rng",
    "restore_state",
]
