"""The alias record in safetensors metadata: which dropped names share a stored tensor.

Torch-free, so header-only tools can show and compare aliases without importing torch;
``torchst.dedup`` builds the record and re-exports what is here.

>>> aliases_from_metadata({"torchst.aliases": '{"lm_head.weight":"embed.weight"}'})
{'lm_head.weight': 'embed.weight'}
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from .errors import FormatError, ShardIndexError

__all__ = ["ALIASES_KEY", "aliases_from_metadata", "check_aliases", "checkpoint_aliases"]

# The authoritative alias record.  The plain ``{alias: kept}`` entries written beside it are
# what safetensors.torch.save_model writes, but in a file written by someone else they cannot
# be told apart from ordinary metadata such as ``{"format": "pt"}``; this key can.
ALIASES_KEY = "torchst.aliases"


def check_aliases(aliases: Mapping[Any, Any], where: str) -> dict[str, str]:
    """``aliases`` as ``{str: str}``, or FormatError (self-aliases, chains of aliases)."""
    out: dict[str, str] = {}
    for alias, kept in aliases.items():
        if not isinstance(alias, str) or not isinstance(kept, str):
            raise FormatError(f"{where}: alias entries must map str -> str, found {alias!r}: {kept!r}")
        if alias == kept:
            raise FormatError(f"{where}: {alias!r} is recorded as an alias of itself")
        out[alias] = kept
    for alias, kept in out.items():
        if kept in out:
            raise FormatError(
                f"{where}: {alias!r} is an alias of {kept!r}, which is itself an alias of {out[kept]!r}; "
                "aliases must name a stored tensor"
            )
    return out


def aliases_from_metadata(
    metadata: Mapping[str, str] | None, *, names: Collection[str] | None = None
) -> dict[str, str]:
    """The ``{alias: kept}`` mapping recorded in a file's metadata (empty when none).

    Files written by torchst carry an explicit record.  For files written by
    ``safetensors.torch.save_model`` pass the file's tensor ``names``: entries whose value is a
    stored tensor and whose key is not are then read as aliases.

    >>> aliases_from_metadata({"format": "pt", "lm_head.weight": "embed.weight"}, names=["embed.weight"])
    {'lm_head.weight': 'embed.weight'}
    """
    if not metadata:
        return {}
    raw = metadata.get(ALIASES_KEY)
    if raw is not None:
        try:
            parsed = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as e:
            raise FormatError(f"metadata {ALIASES_KEY!r} is not valid JSON ({e}): {str(raw)[:80]!r}") from None
        if not isinstance(parsed, dict):
            raise FormatError(f"metadata {ALIASES_KEY!r} must be a JSON object, found {type(parsed).__name__}")
        return check_aliases(parsed, f"metadata {ALIASES_KEY!r}")
    if names is None:
        return {}
    stored = set(names)
    return {k: v for k, v in sorted(metadata.items()) if k not in stored and v in stored}


def checkpoint_aliases(
    metadatas: Collection[Mapping[str, str]], names: Collection[str], where: str | None = None
) -> dict[str, str]:
    """The aliases recorded across a checkpoint's metadata, sorted; each must name a stored tensor.

    >>> checkpoint_aliases([{"torchst.aliases": '{"b":"a"}'}], {"a"})
    {'b': 'a'}
    """
    prefix = f"{where}: " if where else ""
    out: dict[str, str] = {}
    for md in metadatas:
        out.update(aliases_from_metadata(md, names=names))
    for alias, kept in out.items():
        if kept not in names:
            raise ShardIndexError(f"{prefix}alias {alias!r} refers to {kept!r}, which no file of the checkpoint stores")
        if alias in names:
            raise ShardIndexError(f"{prefix}{alias!r} is recorded as an alias of {kept!r} but is also stored itself")
    return dict(sorted(out.items()))
