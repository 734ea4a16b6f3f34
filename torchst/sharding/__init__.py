"""Sharded checkpoints: a torch-free planner, the Hugging Face index, crash-safe directory I/O."""

from __future__ import annotations

from .index import INDEX_SUFFIX, ShardIndex, index_filename, read_index
from .io import Checkpoint, SaveResult, load_state_dict, open_checkpoint, save_state_dict
from .plan import SINGLE_FILE, ShardPlan, check_shard_name, parse_size, plan_shards, shard_filename

__all__ = [
    "INDEX_SUFFIX",
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
