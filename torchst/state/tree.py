"""A typed JSON encoding of nested Python values; tensors are replaced by references.

JSON alone cannot tell a tuple from a list, keeps no NaN/inf, and only has string keys.
The encoding below restores each of those exactly, without pickle:

=======================  ==============================================================
Python value             JSON
=======================  ==============================================================
None, bool, str, int     itself (ints of any size)
finite float             a JSON number written with ``repr`` (round-trips bit-exactly)
NaN / inf / -inf         ``{"$float": "nan" | "-nan" | "inf" | "-inf"}``
list                     a JSON array
tuple / torch.Size       ``{"$tuple": [...]}`` / ``{"$size": [...]}``
dict, str keys, no "$"   a JSON object
any other dict           ``{"$dict": [[key, value], ...]}`` (int, float, tuple... keys)
set / frozenset          ``{"$set": [...]}`` / ``{"$frozenset": [...]}``
bytes                    ``{"$bytes": "<base64>"}``
torch.Tensor             ``{"$tensor": "<name in the step's tensor file>"}`` (+ "device")
numpy.ndarray            ``{"$ndarray": "<tensor name>"}``
torch.dtype / device     ``{"$dtype": "float32"}`` / ``{"$device": "cuda:0"}``
=======================  ==============================================================

A JSON object with exactly one key that starts with ``$`` is always a tag, which is why
dicts with such keys use the ``$dict`` form.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch

from ..errors import CheckpointError, SerializationError
from ..format.writer import find_shared_tensors

__all__ = ["Json", "TensorTable", "TreeDecoder", "TreeEncoder", "format_path"]

Json = Union[None, bool, int, float, str, list["Json"], dict[str, "Json"]]  # noqa: UP007 (recursive alias)
PathItem = object  # a dict key or list index along the path to a value

_NONFINITE = {"nan": math.nan, "-nan": -math.nan, "inf": math.inf, "-inf": -math.inf}


def format_path(path: tuple[PathItem, ...]) -> str:
    """``("optim", "state", 0)`` -> ``state['optim']['state'][0]``, for error messages."""
    return "state" + "".join(f"[{p!r}]" for p in path)


class TensorTable:
    """Tensors collected while encoding: one entry per tensor object, unique names.

    >>> table = TensorTable(); name = table.add(torch.ones(2), ("extra", "w"))
    >>> table.tensors[name]
    tensor([1., 1.])
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.devices: dict[str, str] = {}
        self._by_id: dict[int, str] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids stable while encoding

    def add(self, t: torch.Tensor, path: tuple[PathItem, ...]) -> str:
        known = self._by_id.get(id(t))
        if known is not None:
            return known  # the same tensor object twice is stored once and restored as one
        base = "/".join(str(p) for p in path) or "tensor"
        name, i = base, 1
        while name in self.tensors:
            i += 1
            name = f"{base}#{i}"
        self._by_id[id(t)] = name
        self._keep.append(t)
        if t.layout != torch.strided:
            raise SerializationError(
                f"{format_path(path)} is a {t.layout} tensor; checkpoints store dense tensors: call .to_dense()"
            )
        data = t.detach()
        if not data.is_contiguous():
            data = data.contiguous()  # copy #1 for strided views only; the writer needs dense bytes
        self.tensors[name] = data
        return name

    def finish(self) -> dict[str, torch.Tensor]:
        """The table, with distinct tensors that overlap in memory made independent."""
        out = dict(self.tensors)
        for group in find_shared_tensors(out):
            for name in sorted(group)[1:]:
                # Overlapping views of one storage would be written twice anyway; a clone
                # keeps each value exact (sharing between plain values is not preserved).
                out[name] = out[name].clone()
        return out


class TreeEncoder:
    """Encode nested values into typed JSON; subclasses extend ``encode_object``."""

    def __init__(self, table: TensorTable) -> None:
        self.table = table
        self._active: set[int] = set()

    def encode(self, value: Any, path: tuple[PathItem, ...] = ()) -> Json:
        if value is None or isinstance(value, (bool, str)):
            return str(value) if isinstance(value, str) else value
        if isinstance(value, int):
            return int(value)  # IntEnum and friends keep their value
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            key = "inf" if value > 0 else "-inf" if value < 0 else "-nan" if math.copysign(1, value) < 0 else "nan"
            return {"$float": key}
        if isinstance(value, torch.Tensor):
            ref: dict[str, Json] = {"$tensor": self.table.add(value, path)}
            if value.device.type != "cpu":
                ref["device"] = str(value.device)
            return ref
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        special = self.encode_object(value, path)
        if special is not None:
            return special
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            return self._container(value, path)
        if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
            return {"$ndarray": self.table.add(torch.from_numpy(value), path)}
        raise SerializationError(
            f"{format_path(path)} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
            "cannot store without pickle; supported: None, bool, int, float, str, bytes, list, tuple, dict, "
            "set, tensors, numpy arrays and objects with state_dict()/load_state_dict(). Convert it "
            "(e.g. .item(), .tolist(), dataclasses.asdict()) or give it state_dict()/load_state_dict()"
        )

    def encode_object(self, value: Any, path: tuple[PathItem, ...]) -> Json | None:
        """Hook for values that are not plain data (Stateful objects); None = not handled."""
        return None

    def _container(self, value: Any, path: tuple[PathItem, ...]) -> Json:
        if id(value) in self._active:
            raise SerializationError(
                f"{format_path(path)} contains itself (a reference cycle); checkpoints store trees"
            )
        self._active.add(id(value))
        try:
            if isinstance(value, dict):
                return self._dict(value, path)
            if isinstance(value, list):
                return [self.encode(v, path + (i,)) for i, v in enumerate(value)]
            if isinstance(value, torch.Size):
                return {"$size": [int(v) for v in value]}
            if isinstance(value, tuple):
                if hasattr(value, "_fields"):
                    raise SerializationError(
                        f"{format_path(path)} is a namedtuple ({type(value).__qualname__}), which cannot be "
                        "restored without pickle; store value._asdict() or tuple(value) instead"
                    )
                return {"$tuple": [self.encode(v, path + (i,)) for i, v in enumerate(value)]}
            items = [self.encode(v, path + ("<set item>",)) for v in value]
            items.sort(key=repr)  # set order is arbitrary; sorting keeps manifests reproducible
            return {"$frozenset" if isinstance(value, frozenset) else "$set": items}
        finally:
            self._active.discard(id(value))

    def _dict(self, value: dict[Any, Any], path: tuple[PathItem, ...]) -> Json:
        if all(isinstance(k, str) and type(k) is str and not k.startswith("$") for k in value):
            return {k: self.encode(v, path + (k,)) for k, v in value.items()}
        pairs: list[Json] = []
        for k, v in value.items():
            if isinstance(k, torch.Tensor):
                raise SerializationError(f"{format_path(path)} has a tensor as a dict key; use str or int keys")
            pairs.append([self.encode(k, path + ("<key>",)), self.encode(v, path + (k,))])
        return {"$dict": pairs}


TensorSource = Callable[[str, "str | None"], torch.Tensor]


class TreeDecoder:
    """Decode typed JSON back to Python values, fetching tensors by name from ``tensor``."""

    def __init__(self, tensor: TensorSource, *, where: str = "checkpoint") -> None:
        self.tensor = tensor
        self.where = where

    def decode(self, node: Json, path: tuple[PathItem, ...] = ()) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, path + (i,)) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self._bad(node, path)
        tag = next(iter(node), None) if node else None
        if tag is None or not tag.startswith("$"):
            return {k: self.decode(v, path + (k,)) for k, v in node.items()}
        return self.decode_tag(tag, node, path)

    def decode_tag(self, tag: str, node: dict[str, Json], path: tuple[PathItem, ...]) -> Any:
        body = node[tag]
        if tag == "$float" and isinstance(body, str) and body in _NONFINITE:
            return _NONFINITE[body]
        if tag == "$tuple" and isinstance(body, list):
            return tuple(self.decode(v, path + (i,)) for i, v in enumerate(body))
        if tag == "$size" and isinstance(body, list):
            return torch.Size([int(v) for v in body if isinstance(v, int)])
        if tag == "$dict" and isinstance(body, list):
            out: dict[Any, Any] = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise self._bad(pair, path)
                key = self.decode(pair[0], path + ("<key>",))
                out[key] = self.decode(pair[1], path + (key,))
            return out
        if tag in ("$set", "$frozenset") and isinstance(body, list):
            items = [self.decode(v, path + ("<set item>",)) for v in body]
            return set(items) if tag == "$set" else frozenset(items)
        if tag == "$bytes" and isinstance(body, str):
            return base64.b64decode(body)
        if tag == "$tensor" and isinstance(body, str):
            device = node.get("device")
            return self.tensor(body, device if isinstance(device, str) else None)
        if tag == "$ndarray" and isinstance(body, str):
            return self.tensor(body, None).numpy()
        if tag == "$dtype" and isinstance(body, str):
            dt = getattr(torch, body, None)
            if not isinstance(dt, torch.dtype):
                raise CheckpointError(f"{self.where}: {format_path(path)} names dtype {body!r}, unknown to torch")
            return dt
        if tag == "$device" and isinstance(body, str):
            return torch.device(body)
        raise self._bad(node, path)

    def _bad(self, node: object, path: tuple[PathItem, ...]) -> CheckpointError:
        text = repr(node)
        text = text if len(text) < 80 else text[:77] + "..."
        return CheckpointError(
            f"{self.where}: {format_path(path)} has an unknown or malformed entry {text} "
            "(written by a newer torchst, or the manifest was edited?)"
        )


def plain_table(tensors: Mapping[str, torch.Tensor]) -> TensorSource:
    """A tensor source over an in-memory dict (used by tests and round-trip helpers)."""

    def get(name: str, device: str | None) -> torch.Tensor:
        t = tensors[name]
        return t if device is None else t.to(device)

    return get
