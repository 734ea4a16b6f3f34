"""Collective checkpoints on torch.distributed: DTensor / FSDP2 / tensor-parallel state.

Every rank of the process group calls these functions; nothing becomes collective implicitly
(``if rank == 0: torchst.save_model(...)`` stays valid).  Saves write one ordinary Hugging Face
checkpoint of full tensors, each rank writing its own bytes in place; loads read only the byte
ranges each rank's local shards need, for any world size and placement.  Ranks on several hosts
need a filesystem they all see.

>>> import torchst.distributed as tsd
>>> tsd.save_model(fsdp_model, "ckpt", max_shard_size="5GB")  # every rank  # doctest: +SKIP
>>> missing, unexpected = tsd.load_model(fsdp_model, "ckpt")  # every rank, any world size  # doctest: +SKIP
"""

from __future__ import annotations

from .load import load_model, load_state_dict
from .model import save_model
from .save import save_state_dict

__all__ = ["load_model", "load_state_dict", "save_model", "save_state_dict"]
