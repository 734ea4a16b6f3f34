"""Drop-in mirror of the ``safetensors`` package API (0.8), built on torchst's format core.

Change one import and existing code keeps working; errors are ``SafetensorError`` as in the
reference, and also torchst ``FormatError`` subclasses, so either ``except`` style works.

>>> from torchst.compat.safetensors import safe_open
>>> with safe_open("model.safetensors", framework="pt", device="cpu") as f:
...     w = f.get_tensor(f.keys()[0])
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..._dtypes import DTYPES, nbytes_for
from ...errors import (
    DeviceMapError,
    FormatError,
    SerializationError,
    SharedTensorError,
    TensorNotFoundError,
)
from ...format import BACKENDS, SafeFile, build_header, normalize_device, parse_bytes
from ...format.header import METADATA_KEY, encode_prefix
from ...storage.atomic import atomic_write

if TYPE_CHECKING:  # not imported at run time: ``from torchst.compat.safetensors import torch`` is the submodule
    import torch

__all__ = [
    "SafetensorError",
    "TensorSpec",
    "__version__",
    "deserialize",
    "safe_open",
    "serialize",
    "serialize_file",
]

# The safetensors API level this module mirrors (what version checks in user code expect).
__version__ = "0.8.0"


class SafetensorError(FormatError):
    """Mirror of ``safetensors.SafetensorError``; also a torchst ``FormatError`` and ``ValueError``.

    >>> _ = open("broken.safetensors", "wb").write(b"not a safetensors file")
    >>> try: safe_open("broken.safetensors", framework="pt")
    ... except SafetensorError as e: print(type(e).__name__, isinstance(e, ValueError))
    SafetensorError True
    """


class _MissingTensorError(SafetensorError, TensorNotFoundError):
    """A missing tensor: SafetensorError like the reference, and KeyError like torchst."""


class _CompatTypeError(SerializationError, TypeError):
    """Bad names or metadata: the reference raises TypeError from its argument conversion."""


class _CompatRuntimeError(SharedTensorError, RuntimeError):
    """Shared tensors: the reference raises RuntimeError."""


_TORCH_FRAMEWORKS = ("pt", "torch", "pytorch")
_NUMPY_FRAMEWORKS = ("np", "numpy")
_OTHER_FRAMEWORKS = ("tf", "tensorflow", "flax", "jax", "mlx", "paddle", "paddlepaddle")


def _check_names(names: Any) -> None:
    for name in names:
        if not isinstance(name, str):
            raise _CompatTypeError(
                f"argument 'tensor_dict': {type(name).__name__!r} object is not an instance of 'str'"
            )


def _check_metadata(metadata: object) -> None:
    """The reference's argument checks (TypeError); torchst's writer re-checks UTF-8 and order."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise _CompatTypeError(f"argument 'metadata': {type(metadata).__name__!r} object is not an instance of 'dict'")
    for key, value in metadata.items():
        for item in (key, value):
            if not isinstance(item, str):
                raise _CompatTypeError(
                    f"argument 'metadata': {type(item).__name__!r} object is not an instance of 'str' "
                    f"(metadata maps str -> str; found {key!r}: {value!r})"
                )


class PySafeSlice:
    """What ``safe_open.get_slice`` returns: shape and dtype now, data on ``[...]``.

    >>> with safe_open("m.safetensors", framework="pt") as f:
    ...     rows = f.get_slice("embed.weight")[:2]
    """

    def __init__(self, owner: safe_open, name: str) -> None:
        self._owner = owner
        self._name = name
        self._slice = owner._file.get_slice(name)

    def get_shape(self) -> list[int]:
        return self._slice.get_shape()

    def get_dtype(self) -> str:
        return self._slice.get_dtype()

    def __getitem__(self, index: Any) -> Any:
        self._owner._require_open()
        try:
            out = self._slice[index]
        except FormatError as e:
            raise SafetensorError(str(e)) from e
        return self._owner._convert(out, self._name)


class safe_open:  # the reference's (lower-case) class name
    """Open a .safetensors file lazily, exactly like ``safetensors.safe_open``.

    ``framework`` is ``"pt"`` (torch tensors) or ``"numpy"``; ``backend`` is ``"mmap"``
    (default), ``"pread"`` or torchst's ``"eager"``.

    >>> with safe_open("m.safetensors", framework="pt", device="cpu") as f:
    ...     tensors = {k: f.get_tensor(k) for k in f.keys()}
    """

    def __init__(
        self, filename: str | os.PathLike[str], framework: str, device: Any = "cpu", *, backend: str = "mmap"
    ) -> None:
        if framework in _OTHER_FRAMEWORKS:
            raise SafetensorError(f"framework {framework} is not supported by torchst; use 'pt' or 'numpy'")
        if framework not in _TORCH_FRAMEWORKS + _NUMPY_FRAMEWORKS:
            raise SafetensorError(f"framework {framework} is invalid")
        if backend not in BACKENDS:
            expected = ", ".join(f'"{b}"' for b in BACKENDS)
            raise SafetensorError(f'backend "{backend}" is invalid (expected one of: {expected})')
        try:
            dev = normalize_device(device)
        except DeviceMapError as e:
            raise SafetensorError(f"device {device} is invalid") from e
        self._numpy = framework in _NUMPY_FRAMEWORKS
        if self._numpy and dev.type != "cpu":
            raise SafetensorError(f"device {device} is invalid for framework {framework}: numpy arrays live on cpu")
        self._closed = False
        try:
            self._file = SafeFile(filename, device=dev, backend=backend)
        except FormatError as e:
            raise SafetensorError(f"Error while deserializing header: {e}") from e

    def __enter__(self) -> safe_open:  # noqa: PYI034 - no typing_extensions dependency
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._file.close()

    def _require_open(self) -> SafeFile:
        if self._closed:
            raise SafetensorError("File is closed")
        return self._file

    def _convert(self, t: torch.Tensor, name: str) -> Any:
        if not self._numpy:
            return t
        try:
            return t.numpy()
        except TypeError as e:
            code = self._file.info(name).dtype
            raise SafetensorError(f"tensor {name!r}: dtype {code} has no numpy equivalent; open it with 'pt'") from e

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return self._require_open().keys()

    def offset_keys(self) -> list[str]:
        """Tensor names in the order of their bytes in the file."""
        return self._require_open().offset_keys()

    def metadata(self) -> dict[str, str] | None:
        """The free-form ``__metadata__`` strings, or None."""
        return self._require_open().metadata()

    def get_tensor(self, name: str) -> Any:
        """The whole tensor ``name``."""
        f = self._require_open()
        if name not in f:
            raise _MissingTensorError(f"File does not contain tensor {name} ({f.path})")
        try:
            return self._convert(f.get_tensor(name), name)
        except FormatError as e:
            raise SafetensorError(str(e)) from e

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in file order."""
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_slice(self, name: str) -> PySafeSlice:
        """A lazy slice handle on ``name``."""
        f = self._require_open()
        if name not in f:
            raise _MissingTensorError(f"File does not contain tensor {name} ({f.path})")
        return PySafeSlice(self, name)


# -- raw, framework-free API ----------------------------------------------------------------------

# TensorSpec dtype names, as the reference spells them (torch/numpy names), -> format codes.
_SPEC_DTYPES = {
    "bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "float32": "F32", "float64": "F64",
    "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0", "float4_e2m1fn_x2": "F4", "complex64": "C64",
}  # fmt: skip


class TensorSpec:
    """Raw tensor description for ``serialize``: dtype name, shape, and memory the caller keeps alive.

    >>> a = torch.ones(2)
    >>> spec = TensorSpec(dtype="float32", shape=[2], data_ptr=a.data_ptr(), data_len=8)
    """

    def __init__(self, *, dtype: str, shape: Sequence[int], data_ptr: int, data_len: int) -> None:
        code = _SPEC_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if code is None:
            raise SafetensorError(f'Unknown dtype "{dtype}". Supported dtypes: {", ".join(_SPEC_DTYPES)}')
        self._dtype = code
        logical = [int(d) for d in shape]
        if code == "F4" and logical:
            logical[-1] *= 2  # the header counts logical F4 values, two per stored byte
        self._shape = logical
        self._data_ptr = int(data_ptr)
        self._data_len = int(data_len)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def shape(self) -> list[int]:
        return list(self._shape)

    @property
    def data_ptr(self) -> int:
        return self._data_ptr

    @property
    def data_len(self) -> int:
        return self._data_len

    def __repr__(self) -> str:
        return (
            f"TensorSpec(dtype={self._dtype!r}, shape={self._shape}, data_ptr={self._data_ptr}, "
            f"data_len={self._data_len})"
        )


def _plan_specs(
    tensor_dict: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[memoryview]]:
    if not isinstance(tensor_dict, Mapping):
        raise _CompatTypeError(
            f"argument 'tensor_dict': {type(tensor_dict).__name__!r} object is not an instance of 'dict'"
        )
    _check_names(tensor_dict)
    _check_metadata(metadata)
    for name, spec in tensor_dict.items():
        if not isinstance(spec, TensorSpec):
            raise _CompatTypeError(f"tensor {name!r}: expected a TensorSpec, found {type(spec).__name__}")
        if name == METADATA_KEY:
            raise SerializationError(f"a tensor cannot be named {METADATA_KEY!r}: the header reserves that key")
        numel = 1
        for d in spec.shape:
            numel *= d
        if min(spec.shape, default=0) < 0 or nbytes_for(DTYPES[spec.dtype], numel) != spec.data_len:
            raise SafetensorError(
                f"Error while serializing: invalid shape, data type, or offset for tensor {name!r} "
                f"(shape {spec.shape} of {spec.dtype} does not take {spec.data_len:,} bytes)"
            )
    names = sorted(tensor_dict, key=lambda n: (-DTYPES[tensor_dict[n].dtype].rank, n))
    header = build_header(
        ((n, tensor_dict[n].dtype, tensor_dict[n].shape, tensor_dict[n].data_len) for n in names), metadata
    )
    # Views straight onto the caller's memory: no copy until the bytes reach the output.
    views = [
        memoryview((ctypes.c_char * tensor_dict[n].data_len).from_address(tensor_dict[n].data_ptr)).cast("B")
        for n in names
        if tensor_dict[n].data_len
    ]
    return encode_prefix(header) + header, views


def serialize(tensor_dict: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes for raw ``TensorSpec`` memory (the caller keeps that memory alive).

    >>> a = torch.ones(2)
    >>> blob = serialize({"a": TensorSpec(dtype="float32", shape=[2], data_ptr=a.data_ptr(), data_len=8)})
    """
    header, views = _plan_specs(tensor_dict, metadata)
    return b"".join([header, *views])


def serialize_file(
    tensor_dict: Mapping[str, TensorSpec], filename: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Like ``serialize``, streamed into ``filename`` and committed atomically.

    >>> a = torch.ones(2)
    >>> serialize_file({"a": TensorSpec(dtype="float32", shape=[2], data_ptr=a.data_ptr(), data_len=8)}, "a.safetensors")
    """
    header, views = _plan_specs(tensor_dict, metadata)
    with atomic_write(filename) as f:
        f.write(header)
        for view in views:
            f.write(view)


def deserialize(data: bytes | bytearray | memoryview) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, {"shape": [...], "dtype": "F32", "data": bytearray}), ...]`` in file order.

    >>> [(name, spec["dtype"]) for name, spec in deserialize(torchst.save({"a": torch.ones(2)}))]
    [('a', 'F32')]
    """
    try:
        header = parse_bytes(data)
    except FormatError as e:
        raise SafetensorError(f"Error while deserializing: {e}") from e
    mv = memoryview(data)
    out = []
    for name, info in header.tensors.items():
        start = header.data_start + info.begin
        out.append(
            (name, {"shape": list(info.shape), "dtype": info.dtype, "data": bytearray(mv[start : start + info.nbytes])})
        )
    return out
