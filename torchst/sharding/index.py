"""The Hugging Face ``*.safetensors.index.json`` file of a sharded checkpoint.

Layout (what transformers and huggingface_hub write and read)::

    {
      "metadata": {"total_size": 123},
      "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ...}
    }

Written with sorted keys, indent 2 and a trailing newline, so bytes are reproducible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointNotFoundError, ShardIndexError
from ..format.header import _no_duplicates, _reject_constant
from .plan import check_shard_name

__all__ = ["INDEX_SUFFIX", "MAX_INDEX_SIZE", "ShardIndex", "index_filename", "read_index"]

INDEX_SUFFIX = ".safetensors.index.json"
# The index is metadata; a multi-megabyte one is hostile or broken, and parsing it would cost memory.
MAX_INDEX_SIZE = 64 << 20


def index_filename(prefix: str = "model") -> str:
    """``model.safetensors.index.json`` for ``prefix="model"``."""
    return prefix + INDEX_SUFFIX


@dataclass(frozen=True)
class ShardIndex:
    """A parsed (or to-be-written) index: tensor name -> shard file, plus its metadata.

    >>> idx = ShardIndex({"w": "model-00001-of-00001.safetensors"}, {"total_size": 8})
    >>> idx.filenames
    ('model-00001-of-00001.safetensors',)
    """

    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def filenames(self) -> tuple[str, ...]:
        """Shard files in first-use order (sorted by the first tensor name that lives there)."""
        return tuple(dict.fromkeys(self.weight_map[k] for k in sorted(self.weight_map)))

    def to_json(self) -> str:
        """The file's text: sorted keys, indent 2, trailing newline (transformers' layout)."""
        return json.dumps({"metadata": self.metadata, "weight_map": self.weight_map}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def build(cls, weight_map: Mapping[str, str], total_size: int, **extra: Any) -> ShardIndex:
        """An index for ``weight_map`` whose metadata records ``total_size`` (bytes of tensor data)."""
        for name, filename in weight_map.items():
            check_shard_name(filename, f"tensor {name!r}")
        return cls(dict(sorted(weight_map.items())), {"total_size": int(total_size), **extra})

    @classmethod
    def parse(cls, text: str | bytes, *, source: str = "<index>") -> ShardIndex:
        """Validate an index: JSON object, ``weight_map`` of str -> safe ``.safetensors`` names."""
        try:
            # The header parser's rules: a duplicated key (two shards for one tensor) or NaN is an error.
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        except RecursionError:
            raise ShardIndexError(
                f"{source}: the index nests JSON too deeply to parse; an index is a flat "
                "{'metadata': {...}, 'weight_map': {tensor name: shard file}}"
            ) from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys, NaN
            if str(e).startswith("duplicate key"):
                raise ShardIndexError(
                    f"{source}: the index has a {e}; each tensor lives in exactly one shard, so a name may appear "
                    "once in 'weight_map' (rewrite the index, e.g. by saving the checkpoint again)"
                ) from None
            raise ShardIndexError(f"{source}: the index is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ShardIndexError(f"{source}: the index must be a JSON object, found {type(data).__name__}")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ShardIndexError(
                f"{source}: the index has no 'weight_map' object (found {type(weight_map).__name__}); "
                "expected {'metadata': {...}, 'weight_map': {tensor name: shard file}}"
            )
        if not weight_map:
            raise ShardIndexError(f"{source}: 'weight_map' is empty; the checkpoint names no tensors")
        for name, filename in weight_map.items():
            check_shard_name(filename, f"{source}: tensor {name!r}")
        metadata = data.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise ShardIndexError(f"{source}: 'metadata' must be a JSON object, found {type(metadata).__name__}")
        total = metadata.get("total_size")
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or total < 0):
            raise ShardIndexError(f"{source}: metadata 'total_size' must be a non-negative number, found {total!r}")
        return cls(dict(weight_map), dict(metadata))


def read_index(path: str | os.PathLike[str]) -> ShardIndex:
    """Read and validate an index file.

    >>> idx = read_index("ckpt/model.safetensors.index.json")
    >>> sorted(set(idx.weight_map.values()))
    ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors']
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_SIZE:
            raise ShardIndexError(
                f"{path}: the index is {size:,} bytes, more than the {MAX_INDEX_SIZE:,} an index can reasonably be"
            )
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: index file not found") from None
    return ShardIndex.parse(raw, source=path)
