"""Torch-free shard planning: which tensor goes into which file of a sharded checkpoint.

Works on plain ``(name, nbytes)`` pairs so it can be unit-tested with ints.  The layout is
the Hugging Face one: tensors are packed in the order given (so a decoder layer stays
together), a new shard starts when the next tensor would cross ``max_shard_size``, and a
tensor larger than the limit gets a shard of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import SerializationError, ShardIndexError

__all__ = [
    "SINGLE_FILE",
    "ShardPlan",
    "check_shard_name",
    "parse_size",
    "plan_shards",
    "shard_filename",
]

SINGLE_FILE = "model.safetensors"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"500MB"`` (5·10^8) or ``"2GiB"`` (2·2^30).

    >>> parse_size("500MB"), parse_size("2GiB"), parse_size(1024)
    (500000000, 2147483648, 1024)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise SerializationError(f"max_shard_size must be an int or a string like '5GB', found {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE_RE.match(size)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise SerializationError(
                f"max_shard_size {size!r} is not a size; use an int (bytes) or a number with one of the units "
                "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. '5GB'"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise SerializationError(f"max_shard_size must be positive, found {size!r}")
    return n


def shard_filename(i: int, n: int, prefix: str = "model") -> str:
    """The Hugging Face name of shard ``i`` (1-based) of ``n``: ``model-00001-of-00003.safetensors``."""
    return f"{prefix}-{i:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class ShardPlan:
    """Files of a checkpoint: ``shards[i]`` lists the names written to ``filenames[i]``."""

    filenames: tuple[str, ...]
    shards: tuple[tuple[str, ...], ...]
    total_size: int

    @property
    def is_sharded(self) -> bool:
        return len(self.filenames) > 1

    @property
    def weight_map(self) -> dict[str, str]:
        """``{tensor name: file name}``, sorted by tensor name."""
        return dict(sorted((n, f) for f, names in zip(self.filenames, self.shards) for n in names))


def plan_shards(
    sizes: Mapping[str, int] | Iterable[tuple[str, int]],
    max_shard_size: int | str | None,
    *,
    prefix: str = "model",
) -> ShardPlan:
    """Split tensors (name -> byte size, in write order) into shards of at most ``max_shard_size``.

    ``None`` means one file.  One shard is named ``{prefix}.safetensors`` (no index needed).

    >>> plan_shards({"a": 60, "b": 60, "c": 10}, 100).shards
    (('a',), ('b', 'c'))
    """
    items = list(sizes.items()) if isinstance(sizes, Mapping) else list(sizes)
    seen: set[str] = set()
    for name, nbytes in items:
        if name in seen:
            raise SerializationError(f"tensor {name!r} appears twice in the shard plan")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise SerializationError(f"tensor {name!r}: byte size must be an int >= 0, found {nbytes!r}")
        seen.add(name)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    current = 0
    for name, nbytes in items:
        if limit is not None and groups[-1] and current + nbytes > limit:
            groups.append([])
            current = 0
        groups[-1].append(name)
        current += nbytes
    if len(groups) == 1:
        filenames: tuple[str, ...] = (f"{prefix}.safetensors",)
    else:
        filenames = tuple(shard_filename(i + 1, len(groups), prefix) for i in range(len(groups)))
    return ShardPlan(filenames, tuple(tuple(g) for g in groups), sum(n for _, n in items))


def check_shard_name(name: object, where: str) -> str:
    """Reject shard names that could leave the checkpoint directory or are not safetensors files."""
    if not isinstance(name, str) or not name:
        raise ShardIndexError(f"{where}: shard file names must be non-empty strings, found {name!r}")
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or re.match(r"^[A-Za-z]:", name)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ShardIndexError(
            f"{where}: shard file name {name!r} is unsafe: it must be a relative path inside the checkpoint "
            "directory (no absolute path, no '..', no backslash)"
        )
    if not name.endswith(".safetensors"):
        raise ShardIndexError(f"{where}: shard file name {name!r} must end with '.safetensors'")
    return name
