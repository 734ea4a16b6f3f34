"""Whole training state <-> (typed JSON tree, safetensors files), without pickle.

``encode_state`` walks a dict of Stateful objects and plain values:

- ``nn.Module``: its tensors go to a file of their own, ``<name>/model.safetensors``, an
  ordinary safetensors file (tied weights stored once, aliases in the metadata) that
  ``safetensors`` and ``transformers`` read directly; non-tensor extra state goes to the tree.
- ``torch.optim.Optimizer``: state keyed by parameter name (see ``optim.py``).
- ``torch.Generator``: its state tensor.
- anything else with ``state_dict()``/``load_state_dict()``: its state dict, as a tree.
- plain values: the tree; their tensors go to one shared ``state.safetensors``.

``restore_state`` (``restore.py``) walks the caller's objects next to the tree and loads each
in place, after checking all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..dedup import alias_metadata, aliases_from_metadata, deduplicate, expand_aliases
from ..errors import CheckpointError, SerializationError
from .optim import named_optimizer_state, parameter_names
from .rng import capture_rng
from .tree import Json, PathItem, TensorTable, TreeDecoder, TreeEncoder

__all__ = [
    "MODEL_FILE",
    "RESERVED_NAMES",
    "STATE_FILE",
    "EncodedState",
    "FileReader",
    "FileSpec",
    "decode_state",
    "encode_state",
    "is_stateful",
]

STATE_FILE = "state.safetensors"
MODEL_FILE = "model.safetensors"
# Names a module's directory must not take: the step's own files (the manifest is the
# manager's, named here so that a state key "manifest.json" cannot collide with it either).
RESERVED_NAMES = frozenset({STATE_FILE, "manifest.json"})

# Opens a file of the step by its relative path: returns its tensors and metadata.
FileReader = Callable[[str], tuple[Mapping[str, torch.Tensor], Mapping[str, str]]]


@dataclass
class FileSpec:
    """One safetensors file of a step: tensors to write and the metadata of its header."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class EncodedState:
    """A training state taken apart: the JSON tree and the files its tensors go to."""

    tree: dict[str, Json]
    files: dict[str, FileSpec]


def is_stateful(value: object) -> bool:
    """Has ``state_dict()`` and ``load_state_dict()`` (modules, optimizers, schedulers, scalers...)."""
    cls = type(value)
    return (
        not isinstance(value, type)
        and callable(getattr(cls, "state_dict", None))
        and callable(getattr(cls, "load_state_dict", None))
    )


def _modules(value: Any, path: tuple[PathItem, ...] = ()) -> list[tuple[str, torch.nn.Module]]:
    """Every nn.Module in the state, in traversal order, with its dotted path."""
    if isinstance(value, torch.nn.Module):
        return [(".".join(str(p) for p in path), value)]
    if is_stateful(value):
        return []
    items: list[tuple[Any, Any]] = []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    found = []
    for k, v in items:
        found.extend(_modules(v, path + (k,)))
    return found


def _qualname(value: object) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


class _StateEncoder(TreeEncoder):
    def __init__(self, table: TensorTable, names: Mapping[int, str]) -> None:
        super().__init__(table)
        self.names = names
        self.files: dict[str, FileSpec] = {}

    def encode_object(self, value: Any, path: tuple[PathItem, ...]) -> Json | None:
        if isinstance(value, torch.nn.Module):
            return self._module(value, path)
        if isinstance(value, torch.optim.Optimizer):
            sd = named_optimizer_state(value, self.names)
            return {"$optimizer": self.encode(sd, path), "type": _qualname(value)}
        if isinstance(value, torch.Generator):
            return {"$generator": self.encode(value.get_state(), path), "device": str(value.device)}
        if is_stateful(value):
            return {"$stateful": self.encode(value.state_dict(), path), "type": _qualname(value)}
        return None

    def _module(self, module: torch.nn.Module, path: tuple[PathItem, ...]) -> Json:
        sd = module.state_dict()
        tensors = {k: v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        extra = {k: self.encode(v, path + (k,)) for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        dedup = deduplicate(tensors)
        kept = {k: (t if t.is_contiguous() else t.contiguous()) for k, t in dedup.tensors.items()}
        rel = f"{self._dirname(path)}/{MODEL_FILE}"
        self.files[rel] = FileSpec(kept, {"format": "pt", **alias_metadata(dedup.aliases)})
        return {"$module": rel, "keys": list(sd), "extra": extra, "type": _qualname(module)}

    def _dirname(self, path: tuple[PathItem, ...]) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join(str(p) for p in path)) or "model"
        base = "_" + base if base.startswith(".") else base
        name, i = base, 1
        if base in RESERVED_NAMES:
            name, i = f"{base}-2", 2  # a state key such as "state.safetensors" gets an escaped directory
        while any(f.startswith(name + "/") for f in self.files):
            i += 1
            name = f"{base}-{i}"
        return name


def encode_state(state: Mapping[str, Any], *, rng: bool = True) -> EncodedState:
    """Take a training state apart into a JSON tree and safetensors files (no I/O here).

    >>> enc = encode_state({"model": model, "optim": opt, "step": 10})
    >>> sorted(enc.files)
    ['model/model.safetensors', 'state.safetensors']
    """
    if not isinstance(state, Mapping):
        raise SerializationError(
            f"the state to save must be a dict such as {{'model': model, 'optim': optimizer}}, "
            f"found {type(state).__name__}"
        )
    for key in state:
        if not isinstance(key, str):
            raise SerializationError(f"top-level state keys must be str, found {type(key).__name__}: {key!r}")
    table = TensorTable()
    enc = _StateEncoder(table, parameter_names(_modules(state)))
    tree: dict[str, Json] = {"state": enc.encode(dict(state)), "rng": None}
    if rng:
        tree["rng"] = enc.encode(capture_rng(), ("<rng>",))
    files = dict(enc.files)
    files[STATE_FILE] = FileSpec(table.finish())
    return EncodedState(tree, files)


class _StateDecoder(TreeDecoder):
    def __init__(
        self, files: FileReader, device: str | torch.device | None, where: str, names: Mapping[int, str] | None = None
    ) -> None:
        self.files = files
        self.device = device
        self.names: Mapping[int, str] = names or {}
        state_tensors: Mapping[str, torch.Tensor] | None = None

        def tensor(name: str, recorded: str | None) -> torch.Tensor:
            nonlocal state_tensors
            if state_tensors is None:
                state_tensors = files(STATE_FILE)[0]
            if name not in state_tensors:
                raise CheckpointError(f"{where}: {STATE_FILE} has no tensor {name!r} (the step is damaged)")
            target = self.device if self.device is not None else recorded
            t = state_tensors[name]
            if target is None:
                return t
            try:
                return t.to(target)
            except (RuntimeError, AssertionError) as e:
                raise CheckpointError(
                    f"{where}: tensor {name!r} was saved on {target} and cannot be restored there ({e}); "
                    "pass device='cpu' to restore()"
                ) from None

        super().__init__(tensor, where=where)

    def module_state(self, node: Mapping[str, Json], path: tuple[PathItem, ...]) -> dict[str, Any]:
        rel = node["$module"]
        keys = node.get("keys")
        extra = node.get("extra")
        if not isinstance(rel, str) or not isinstance(keys, list) or not isinstance(extra, dict):
            raise self._bad(node, path)
        tensors, metadata = self.files(rel)
        full = expand_aliases(tensors, aliases_from_metadata(metadata))
        out: dict[str, Any] = {}
        for k in keys:
            if not isinstance(k, str):
                raise self._bad(node, path)
            if k in extra:
                out[k] = self.decode(extra[k], path + (k,))
            elif k in full:
                out[k] = full[k]
            else:
                raise CheckpointError(f"{self.where}: {rel} has no tensor {k!r} (the step is damaged)")
        return out

    def decode_tag(self, tag: str, node: dict[str, Json], path: tuple[PathItem, ...]) -> Any:
        if tag == "$module":
            return self.module_state(node, path)
        if tag in ("$optimizer", "$stateful", "$generator"):
            return self.decode(node[tag], path)
        return super().decode_tag(tag, node, path)


def decode_state(tree: Mapping[str, Json], files: FileReader, *, where: str = "checkpoint") -> dict[str, Any]:
    """The saved state as plain values: modules and other objects become their state dicts.

    >>> enc = encode_state({"model": model, "step": 10})
    >>> plain = decode_state(enc.tree, lambda rel: (enc.files[rel].tensors, enc.files[rel].metadata))
    >>> plain["model"]["fc.weight"].shape, plain["step"]
    (torch.Size([4, 4]), 10)
    """
    saved = tree.get("state")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: the manifest has no 'state' tree")
    out = _StateDecoder(files, None, where).decode(saved)
    assert isinstance(out, dict)
    return out
