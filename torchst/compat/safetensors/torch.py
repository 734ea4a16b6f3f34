"""Drop-in mirror of ``safetensors.torch`` (0.8), built on torchst's streaming, atomic core.

Same functions, semantics and exception types as the reference, including the private
helpers other libraries import (``_find_shared_tensors``, ``_remove_duplicate_names``, ...).

>>> from torchst.compat.safetensors.torch import save_file, load_file
>>> save_file({"w": torch.ones(2)}, "m.safetensors")
>>> load_file("m.safetensors")["w"]
tensor([1., 1.])
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from ..._dtypes import DTYPES
from ...errors import FormatError, SerializationError, SharedTensorError
from ...format import load as _load
from ...format import load_file as _load_file
from ...format import save as _save
from ...format import save_file as _save_file
from ...format.writer import find_shared_tensors, split_overlapping
from . import (
    SafetensorError,
    TensorSpec,
    _check_metadata,
    _check_names,
    _CompatRuntimeError,
    deserialize,
    safe_open,
    serialize,
    serialize_file,
)

__all__ = [
    "TensorSpec",
    "deserialize",
    "load",
    "load_file",
    "load_model",
    "safe_open",
    "save",
    "save_file",
    "save_model",
    "serialize",
    "serialize_file",
    "storage_ptr",
    "storage_size",
]

# Bytes per torch element / torch dtype per format code, for every dtype this torch has.
_SIZE: dict[torch.dtype, int] = {row.torch_dtype: row.itemsize for row in DTYPES.values() if row.torch_dtype}
_TYPES: dict[str, torch.dtype] = {code: row.torch_dtype for code, row in DTYPES.items() if row.torch_dtype}


class _MetaTensorError(SerializationError, NotImplementedError):
    """A meta tensor has no data; the reference fails with NotImplementedError."""


class _UnknownDtypeError(SerializationError, KeyError):
    """A torch dtype without a format code; the reference fails with KeyError."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _getdtype(dtype_str: str) -> torch.dtype:
    """The torch dtype of a format code (KeyError if unknown), like the reference."""
    return _TYPES[dtype_str]


def storage_ptr(tensor: torch.Tensor) -> int:
    """Address of the start of ``tensor``'s storage (0 for meta tensors).

    >>> w = torch.zeros(4)
    >>> storage_ptr(w[1:]) == storage_ptr(w)
    True
    """
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (NotImplementedError, RuntimeError):
        return 0


def storage_size(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s whole storage (the tensor's own size for meta tensors).

    >>> storage_size(torch.zeros(4)[:1])
    16
    """
    try:
        return int(tensor.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError):
        return tensor.nelement() * _SIZE[tensor.dtype]


def _end_ptr(tensor: torch.Tensor) -> int:
    if tensor.nelement():
        return int(tensor.view(-1)[-1].data_ptr()) + _SIZE[tensor.dtype]
    return int(tensor.data_ptr())


def _filter_shared_not_shared(tensors: list[set[str]], state_dict: Mapping[str, torch.Tensor]) -> list[set[str]]:
    # Split storage groups into runs of overlapping byte ranges.  Unlike safetensors 0.8 we keep
    # the furthest end seen, so a small view nested inside a large one stays in its group.
    return split_overlapping(tensors, state_dict)


def _find_shared_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Groups of names whose memory overlaps; singletons included, like the reference."""
    return find_shared_tensors(state_dict)


def _is_complete(tensor: torch.Tensor) -> bool:
    return bool(
        tensor.data_ptr() == storage_ptr(tensor) and tensor.nelement() * _SIZE[tensor.dtype] == storage_size(tensor)
    )


def _remove_duplicate_names(
    state_dict: Mapping[str, torch.Tensor],
    *,
    preferred_names: Iterable[str] | None = None,
    discard_names: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """``{kept_name: [names to drop]}`` for every group of tensors sharing memory.

    Keeps the alphabetically first name covering the whole storage, preferring
    ``preferred_names`` and avoiding ``discard_names``, exactly as the reference.

    >>> w = torch.zeros(4)
    >>> _remove_duplicate_names({"a": w, "b": w})
    defaultdict(<class 'list'>, {'a': ['b']})
    """
    preferred = set(preferred_names or ())
    discard = set(discard_names or ())
    to_remove: defaultdict[str, list[str]] = defaultdict(list)
    for shared in _find_shared_tensors(state_dict):
        complete = {name for name in shared if _is_complete(state_dict[name])}
        if not complete:
            raise _CompatRuntimeError(
                "Error while trying to find names to remove to save state dict, but found no suitable name to keep"
                f" for saving amongst: {shared}. None is covering the entire storage. Refusing to save/load the"
                " model since you could be storing much more memory than needed. Save the tensors with"
                " torchst.save_model, or .clone() the views you want to keep."
            )
        keep = min(complete)
        if complete - discard:
            keep = min(complete - discard)
        if preferred & complete:
            keep = min(preferred & complete)
        for name in sorted(shared):
            if name != keep:
                to_remove[keep].append(name)
    return to_remove


def _shared_error(tensors: Mapping[str, torch.Tensor]) -> _CompatRuntimeError:
    failing = [names for names in _find_shared_tensors(tensors) if len(names) > 1]
    return _CompatRuntimeError(
        "Some tensors share memory, this will lead to duplicate memory on disk and potential differences when"
        f" loading them again: {failing}. A potential way to correctly save your model is to use `save_model`"
        " (or torchst.save_model, which also records the aliases)."
    )


def _evaluate_tensors_for_save(tensors: object) -> None:
    # The reference's checks with its exception types and messages.  Shared memory is left to the
    # core writer (one scan instead of two) and translated by the callers.
    if not isinstance(tensors, dict):
        raise SerializationError(f"Expected a dict of [str, torch.Tensor] but received {type(tensors)}")
    sparse = []
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise SerializationError(f"Key `{k}` is invalid, expected torch.Tensor but received {type(v)}")
        if v.layout != torch.strided:
            sparse.append(k)
    if sparse:
        raise SerializationError(
            f"You are trying to save a sparse tensors: `{sparse}` which this library does not support."
            " You can make it a dense tensor before saving with `.to_dense()` but be aware this might"
            " make a much larger file than needed."
        )
    try:
        _check_each(tensors)
    except SerializationError:
        # The reference reports shared memory first; on this (rare) error path the extra scan is free.
        if any(len(names) > 1 for names in _find_shared_tensors(tensors)):
            raise _shared_error(tensors) from None
        raise
    _check_names(tensors)


def _check_each(tensors: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        if not v.is_contiguous():
            raise SerializationError(
                f"You are trying to save a non contiguous tensor: `{k}` which is not allowed. It either means you"
                " are trying to save tensors which are reference of each other in which case it's recommended to"
                " save only the full tensors, and reslice at load time, or simply call `.contiguous()` on your"
                " tensor to pack it before saving."
            )
        if v.device.type == "meta":
            raise _MetaTensorError(f"Cannot copy out of meta tensor `{k}`; no data! Materialize it before saving.")
        if v.dtype not in _SIZE:
            raise _UnknownDtypeError(f"{v.dtype} (tensor `{k}`) has no safetensors dtype; cast it before saving")


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes for ``tensors``, byte-identical to the reference.

    >>> blob = save({"embedding": torch.zeros(512, 1024)})
    """
    _evaluate_tensors_for_save(tensors)
    _check_metadata(metadata)
    try:
        return _save(tensors, metadata)
    except SharedTensorError as e:
        raise _shared_error(tensors) from e


def save_file(
    tensors: dict[str, torch.Tensor],
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    checksums: bool = False,
) -> None:
    """Write ``tensors`` to ``filename`` (atomically: a crash never leaves a half-written file).

    Byte-identical to the reference; ``checksums=True`` (a torchst extension) also records each
    tensor's CRC32C in the metadata, for ``torchst verify`` and ``load_file(..., verify=True)``.

    >>> save_file({"embedding": torch.zeros(512, 1024)}, "model.safetensors")
    """
    _evaluate_tensors_for_save(tensors)
    _check_metadata(metadata)
    try:
        _save_file(tensors, filename, metadata, checksums=checksums)
    except SharedTensorError as e:
        raise _shared_error(tensors) from e


def load_file(
    filename: str | os.PathLike[str],
    device: str | int | torch.device = "cpu",
    *,
    backend: str = "mmap",
    verify: bool = False,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``filename`` on ``device``, in file order.

    ``verify=True`` (a torchst extension) checks each tensor against its recorded checksum.

    >>> loaded = load_file("model.safetensors", device="cpu")
    """
    if verify:
        return _load_file(filename, device=device, backend=backend, verify=True)
    with safe_open(filename, framework="pt", device=device, backend=backend) as f:
        return f.get_tensors()


def load(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes; works for every dtype, F8_E8M0 and F4 included.

    >>> loaded = load(open("model.safetensors", "rb").read())
    """
    try:
        return _load(data)
    except FormatError as e:
        raise SafetensorError(f"Error while deserializing: {e}") from e


def save_model(
    model: torch.nn.Module,
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    force_contiguous: bool = True,
    *,
    checksums: bool = False,
) -> None:
    """Save ``model``'s state dict, dropping tied duplicates and noting them in the metadata.

    Unlike the reference, the caller's ``metadata`` dict is not modified.

    >>> save_model(model, "model.safetensors")
    """
    state_dict = dict(model.state_dict())
    metadata = dict(metadata) if metadata is not None else None
    for kept, removed in _remove_duplicate_names(state_dict).items():
        for name in removed:
            metadata = {} if metadata is None else metadata
            metadata.setdefault(name, kept)  # never override user data
            del state_dict[name]
    if force_contiguous:
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    try:
        save_file(state_dict, filename, metadata=metadata, checksums=checksums)
    except SerializationError as e:
        hint = " Or use save_model(..., force_contiguous=True), read the docs for potential caveats."
        raise type(e)(str(e) + hint) from e


def load_model(
    model: torch.nn.Module,
    filename: str | os.PathLike[str],
    strict: bool = True,
    device: str | int | torch.device = "cpu",
    *,
    backend: str = "mmap",
) -> tuple[set[str], list[str]]:
    """Load ``filename`` into ``model``, re-tying names that ``save_model`` dropped.

    Returns ``(missing, unexpected)`` exactly like the reference (a set and a list).

    >>> missing, unexpected = load_model(model, "model.safetensors")
    """
    state_dict = load_file(filename, device=device, backend=backend)
    to_removes = _remove_duplicate_names(model.state_dict(), preferred_names=state_dict.keys())
    result = model.load_state_dict(state_dict, strict=False)
    missing, unexpected = set(result.missing_keys), list(result.unexpected_keys)
    for removed in to_removes.values():
        for name in removed:
            if name not in missing:
                unexpected.append(name)
            else:
                missing.remove(name)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        raise RuntimeError(error)
    return missing, unexpected
