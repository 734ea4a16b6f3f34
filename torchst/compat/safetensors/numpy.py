"""Drop-in mirror of ``safetensors.numpy``: save and load dicts of numpy arrays.

numpy is imported here, on use of this module only; the torchst core never needs it.

>>> from torchst.compat.safetensors.numpy import save_file, load_file
>>> save_file({"x": np.zeros((2, 2))}, "a.safetensors")
>>> load_file("a.safetensors")["x"].shape
(2, 2)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import SerializationError
from . import SafetensorError, TensorSpec, deserialize, safe_open, serialize, serialize_file

__all__ = ["load", "load_file", "save", "save_file"]

_TYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64,
    "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "C64": np.complex64,
}  # fmt: skip


def _getdtype(dtype_str: str) -> Any:
    return _TYPES[dtype_str]


def _is_little_endian(array: np.ndarray[Any, Any]) -> bool:
    order = array.dtype.byteorder
    return order in ("<", "|") or (order == "=" and sys.byteorder == "little")


def _flatten(tensor_dict: Mapping[str, Any], keep_alive: list[Any]) -> dict[str, TensorSpec]:
    if not isinstance(tensor_dict, Mapping):
        raise SerializationError(f"Expected a dict of [str, np.ndarray] but received {type(tensor_dict)}")
    specs = {}
    for name, array in tensor_dict.items():
        if not isinstance(array, np.ndarray):
            raise SerializationError(f"Key `{name}` is invalid, expected np.ndarray but received {type(array)}")
        if not array.flags.c_contiguous:
            # The reference would write the wrong bytes here; refuse instead.
            raise SerializationError(f"array {name!r} is not C-contiguous; pass np.ascontiguousarray(array) to save it")
        if not _is_little_endian(array):
            array = array.byteswap().view(array.dtype.newbyteorder("<"))  # one copy, big-endian input only
        keep_alive.append(array)
        specs[name] = TensorSpec(
            dtype=array.dtype.name, shape=array.shape, data_ptr=array.ctypes.data, data_len=array.nbytes
        )
    return specs


def save(tensor_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes for a dict of numpy arrays.

    >>> blob = save({"embedding": np.zeros((512, 1024))})
    """
    keep_alive: list[Any] = []  # byte-swapped copies must outlive serialize()
    return serialize(_flatten(tensor_dict, keep_alive), metadata=metadata)


def save_file(
    tensor_dict: Mapping[str, Any], filename: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a dict of numpy arrays to ``filename``, atomically.

    >>> save_file({"embedding": np.zeros((512, 1024))}, "model.safetensors")
    """
    keep_alive: list[Any] = []
    serialize_file(_flatten(tensor_dict, keep_alive), filename, metadata=metadata)


def _to_array(name: str, dtype: str, shape: list[int], data: Any) -> np.ndarray[Any, Any]:
    try:
        np_dtype = _getdtype(dtype)
    except KeyError:
        raise SafetensorError(f"tensor {name!r}: dtype {dtype} has no numpy equivalent; load it with torch") from None
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def load(data: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """Arrays from safetensors bytes, in file order.

    >>> arrays = load(open("model.safetensors", "rb").read())
    """
    return {name: _to_array(name, v["dtype"], v["shape"], v["data"]) for name, v in deserialize(data)}


def load_file(filename: str | os.PathLike[str], *, backend: str = "mmap") -> dict[str, np.ndarray[Any, Any]]:
    """Every array of ``filename``, in file order (zero-copy views of the mapping by default).

    >>> arrays = load_file("model.safetensors")
    """
    with safe_open(filename, framework="np", backend=backend) as f:
        return f.get_tensors()
