"""Shared-storage detection, canonical names and alias metadata (no nn.Module here).

safetensors stores every tensor's bytes once per name, so tensors that share memory (tied
embeddings, views) must be reduced to one stored name per storage before saving.  The rule
matches ``safetensors.torch.save_model`` and huggingface_hub: among the names that cover
the whole storage keep the alphabetically first one, unless the caller prefers or discards
names (e.g. a transformers model's ``_tied_weights_keys``).  The dropped names are recorded
as ``{alias: kept}`` so loading can hand out the same tensor under every name again.

>>> emb = torch.zeros(4, 2)
>>> d = deduplicate({"embed.weight": emb, "lm_head.weight": emb})
>>> d.aliases
{'lm_head.weight': 'embed.weight'}
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

import torch

from ._aliases import ALIASES_KEY, aliases_from_metadata
from ._aliases import check_aliases as _check_aliases
from .errors import FormatError, SerializationError, SharedTensorError, TensorNotFoundError
from .format.writer import find_shared_tensors

__all__ = [
    "ALIASES_KEY",
    "Deduplicated",
    "alias_metadata",
    "aliases_from_metadata",
    "deduplicate",
    "expand_aliases",
    "is_complete",
]

TiedKeys = Mapping[str, str] | Iterable[str]


class Deduplicated(NamedTuple):
    """A state dict with one entry per storage, plus the names that were dropped."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]


def is_complete(t: torch.Tensor) -> bool:
    """True when ``t`` starts at its storage's first byte and covers all of it."""
    st = t.untyped_storage()
    return t.data_ptr() == st.data_ptr() and t.numel() * t.element_size() == st.nbytes()


def _matches(name: str, patterns: Collection[str], *, anchored: bool) -> bool:
    for pat in patterns:
        if name == pat:
            return True
        try:
            # transformers v4 uses re.search on list entries, v5 anchors dict keys with "^".
            found = re.match(pat, name) if anchored else re.search(pat, name)
        except re.error:
            continue
        if found:
            return True
    return False


def _tied_sets(tied_keys: TiedKeys | None) -> tuple[list[str], list[str], bool]:
    """(patterns to drop, patterns to keep, anchored) from either transformers form."""
    if tied_keys is None:
        return [], [], False
    if isinstance(tied_keys, str):
        raise SerializationError(
            f"tied_keys must be a list of names/patterns or a {{tied: source}} dict, found the str {tied_keys!r}; "
            "wrap it in a list"
        )
    if isinstance(tied_keys, Mapping):  # transformers v5: {target: source}
        return [str(k) for k in tied_keys], [str(v) for v in tied_keys.values()], True
    return [str(k) for k in tied_keys], [], False  # transformers v4: names to drop


def deduplicate(
    state_dict: Mapping[str, torch.Tensor],
    *,
    preferred_names: Iterable[str] | None = None,
    discard_names: Iterable[str] | None = None,
    tied_keys: TiedKeys | None = None,
) -> Deduplicated:
    """Keep one name per shared storage; return the kept tensors and ``{alias: kept}``.

    Among names covering the whole storage the kept one is, in order of precedence: the first
    of ``preferred_names``; the first tied-weight *source* of ``tied_keys``; the first name not
    in ``discard_names`` and not a tied target; the alphabetically first.  ``tied_keys`` takes a
    transformers ``_tied_weights_keys``: a v4 list of names/patterns to drop or a v5
    ``{tied: source}`` dict.  Tensors that are disjoint windows of one storage are all kept.
    The caller's mapping is not modified.

    >>> w = torch.zeros(3, 2)
    >>> d = deduplicate({"lm_head.weight": w, "model.embed.weight": w}, tied_keys=["lm_head.weight"])
    >>> d.tensors.keys(), d.aliases
    (dict_keys(['model.embed.weight']), {'lm_head.weight': 'model.embed.weight'})
    """
    if not isinstance(state_dict, Mapping):
        raise SerializationError(f"expected a dict of str -> torch.Tensor, found {type(state_dict).__name__}")
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise SerializationError(
                f"state dict entry {name!r} is a {type(t).__name__}, not a torch.Tensor; "
                "safetensors files hold tensors only"
            )
    preferred = set(preferred_names or ())
    discard = set(discard_names or ())
    drop_pats, keep_pats, anchored = _tied_sets(tied_keys)

    aliases: dict[str, str] = {}
    for group in find_shared_tensors(state_dict):
        if len(group) < 2:
            continue
        complete = sorted(n for n in group if is_complete(state_dict[n]))
        if not complete:
            raise SharedTensorError(
                f"tensors {sorted(group)} share memory but none of them covers the whole storage, so keeping "
                "any single one would lose data or store bytes nobody asked for; save "
                "{name: t.clone() for ...} copies of them instead"
            )
        keep = _choose(complete, preferred, discard, drop_pats, keep_pats, anchored)
        for name in sorted(group):
            if name != keep:
                aliases[name] = keep
    tensors = {n: t for n, t in state_dict.items() if n not in aliases}
    return Deduplicated(tensors, dict(sorted(aliases.items())))


def _choose(
    complete: list[str],
    preferred: set[str],
    discard: set[str],
    drop_pats: list[str],
    keep_pats: list[str],
    anchored: bool,
) -> str:
    for candidates in (
        [n for n in complete if n in preferred],
        [n for n in complete if keep_pats and _matches(n, keep_pats, anchored=anchored)],
        [n for n in complete if n not in discard and not _matches(n, drop_pats, anchored=anchored)],
    ):
        if candidates:
            return candidates[0]
    return complete[0]


def alias_metadata(aliases: Mapping[str, str]) -> dict[str, str]:
    """File metadata recording ``aliases``; merge it into the ``metadata`` of a save.

    Writes ``{alias: kept}`` entries exactly as ``safetensors.torch.save_model`` does, plus one
    ``"torchst.aliases"`` entry holding the whole mapping as JSON (authoritative on load).

    >>> alias_metadata({"lm_head.weight": "embed.weight"})
    {'lm_head.weight': 'embed.weight', 'torchst.aliases': '{"lm_head.weight":"embed.weight"}'}
    """
    if not aliases:
        return {}
    clean = dict(sorted(_check_aliases(aliases, "aliases").items()))
    out = dict(clean)
    out[ALIASES_KEY] = json.dumps(clean, separators=(",", ":"), ensure_ascii=False)
    return out


def expand_aliases(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A new dict where every alias maps to the *same tensor object* as the name it aliases.

    >>> t = {"embed.weight": torch.zeros(2)}
    >>> out = expand_aliases(t, {"lm_head.weight": "embed.weight"})
    >>> out["lm_head.weight"] is out["embed.weight"]
    True
    """
    out = dict(tensors)
    for alias, kept in _check_aliases(aliases, "aliases").items():
        if alias in tensors:
            raise FormatError(
                f"{alias!r} is recorded as an alias of {kept!r} but is also stored as a tensor of its own; "
                "the checkpoint is inconsistent"
            )
        if kept not in tensors:
            raise TensorNotFoundError(
                f"{alias!r} is an alias of {kept!r}, which is not among the loaded tensors "
                f"({len(tensors)} loaded); load the file or shard that stores {kept!r} too"
            )
        out[alias] = out[kept]
    return out
