"""Sharded checkpoints: a torch-free planner, the Hugging Face index, crash-safe directory I/O."""

from __future__ import annotations

from .checkpoint import OPEN_ATTEMPTS, Checkpoint, load_state_dict, open_checkpoint
from .index import INDEX_SUFFIX, ShardIndex, index_filename, read_index
from .io import SaveResult, save_state_dict
from .plan import SINGLE_FILE, ShardPlan, check_shard_name, parse_size, plan_shards, shard_filename

__all__ = [
    "INDEX_SUFFIX",
    "OPEN_ATTEMPTS",
    "SINGLE_FILE",
    "Checkpoint",
    "SaveResult",
    "ShardIndex",
    "ShardPlan",
    "check_shard_name",
    "index_filename",
    "load_state_dict",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "read_index",
    "save_state_dict",
    "shard_filename",
]
