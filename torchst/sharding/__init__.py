"""Sharded checkpoints: a torch-free planner, the Hugging Face index, crash-safe directory I/O.

The planner and the index need no torch; the directory I/O (which does) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .debris import Debris, cleanup, find_debris
from .index import INDEX_SUFFIX, ShardIndex, index_filename, read_index
from .plan import SINGLE_FILE, ShardPlan, check_shard_name, parse_size, plan_shards, shard_filename

if TYPE_CHECKING:
    from .checkpoint import OPEN_ATTEMPTS, Checkpoint, load_state_dict, open_checkpoint
    from .io import SaveResult, save_state_dict
    from .load_plan import LoadPlan, PlannedRead, StoredTensor, plan_load

_LAZY = {
    **dict.fromkeys(("OPEN_ATTEMPTS", "Checkpoint", "load_state_dict", "open_checkpoint"), ".checkpoint"),
    **dict.fromkeys(("SaveResult", "save_state_dict"), ".io"),
    **dict.fromkeys(("LoadPlan", "PlannedRead", "StoredTensor", "plan_load"), ".load_plan"),
}

__all__ = [
    "INDEX_SUFFIX",
    "OPEN_ATTEMPTS",
    "SINGLE_FILE",
    "Checkpoint",
    "Debris",
    "LoadPlan",
    "PlannedRead",
    "SaveResult",
    "ShardIndex",
    "ShardPlan",
    "StoredTensor",
    "check_shard_name",
    "cleanup",
    "find_debris",
    "index_filename",
    "load_state_dict",
    "open_checkpoint",
    "parse_size",
    "plan_load",
    "plan_shards",
    "read_index",
    "save_state_dict",
    "shard_filename",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
