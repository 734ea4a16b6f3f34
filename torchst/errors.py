"""The one error tree of torchst.

Every class also subclasses the builtin it refines, so ``except ValueError`` and
``except FileNotFoundError`` keep working for callers that do not know torchst.
This module imports nothing from torchst.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CheckpointChangedError",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "DeviceMapError",
    "DtypeError",
    "FileSizeError",
    "FormatError",
    "HeaderError",
    "IntegrityError",
    "OffsetError",
    "RemoteError",
    "SerializationError",
    "ShardIndexError",
    "SharedTensorError",
    "TensorNotFoundError",
    "TorchstError",
    "UnsupportedDtypeError",
    "WriteError",
]


class TorchstError(Exception):
    """Base class of every error torchst raises on purpose."""


class ArgumentError(TorchstError, ValueError, TypeError):
    """An argument torchst cannot use: a non-Module model, a non-floating dtype, an unknown backend.

    Both a ``ValueError`` and a ``TypeError``, so either ``except`` clause a caller wrote keeps working.
    """


class FormatError(TorchstError, ValueError):
    """A .safetensors file (or byte string) is malformed: bad header, offsets, dtype, size."""


class HeaderError(FormatError):
    """The header length prefix or the JSON header itself is invalid."""


class DtypeError(FormatError):
    """The header names a dtype code that does not exist in the safetensors format."""


class OffsetError(FormatError):
    """``data_offsets`` do not tile the data section, or disagree with shape x dtype."""


class FileSizeError(FormatError):
    """The file is shorter or longer than its header says (truncated download?)."""


class IntegrityError(FormatError):
    """Stored bytes do not match the checksum recorded when they were written (corruption).

    ``path``, ``tensor`` and ``byte_range`` (absolute file offsets, end exclusive) say where;
    each is None when the problem is not tied to one tensor (e.g. the header itself).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        tensor: str | None = None,
        byte_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.byte_range = byte_range


class UnsupportedDtypeError(FormatError):
    """A valid dtype code that the installed torch cannot represent as a tensor."""


class TensorNotFoundError(TorchstError, KeyError):
    """A tensor name that the file or checkpoint does not contain."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SerializationError(TorchstError, ValueError):
    """Tensors or metadata handed to a save function cannot be written as asked."""


class ShardIndexError(TorchstError, ValueError):
    """A sharded checkpoint's index is invalid, unsafe, or names a missing shard."""


class SharedTensorError(TorchstError, ValueError):
    """Tensors share memory in a way that cannot be saved without deduplication."""


class DeviceMapError(TorchstError, ValueError):
    """A ``device`` or ``device_map`` argument is invalid or does not cover every tensor."""


class CheckpointError(TorchstError, RuntimeError):
    """A checkpoint cannot be saved, opened or restored as asked."""


class CheckpointChangedError(CheckpointError):
    """A writer kept re-saving the checkpoint while it was being opened (retried, then gave up)."""


class CheckpointLockedError(CheckpointError):
    """Another live process holds the checkpoint directory's writer lock."""


class CheckpointNotFoundError(TorchstError, FileNotFoundError):
    """The requested checkpoint, step or file does not exist."""


class WriteError(TorchstError, OSError):
    """Writing a file failed (disk full, permission denied, read-only filesystem, I/O error).

    ``errno`` is the operating system's code and ``filename`` the path the caller asked for
    (never a hidden temporary name); the message says what to do about it.

    >>> import errno
    >>> e = WriteError(errno.ENOSPC, "m.safetensors: no space left on device", "m.safetensors")
    >>> isinstance(e, OSError), e.errno == errno.ENOSPC, e.filename, str(e)
    (True, True, 'm.safetensors', 'm.safetensors: no space left on device')
    """

    def __str__(self) -> str:  # OSError would prefix "[Errno N]" and append the filename again
        return str(self.strerror) if self.strerror is not None else super().__str__()


class RemoteError(TorchstError, OSError):
    """Object storage refused or failed a request (access denied, an upload or read that failed).

    ``errno`` says what kind (``EACCES`` for refused access, ``EIO`` otherwise); the message names
    the URL.  A missing bucket or object is a ``CheckpointNotFoundError`` instead.

    >>> import errno
    >>> str(RemoteError(errno.EACCES, "s3://b/m.safetensors: cannot read: access denied"))
    's3://b/m.safetensors: cannot read: access denied'
    """

    def __str__(self) -> str:  # OSError would prefix "[Errno N]"
        return str(self.strerror) if self.strerror is not None else super().__str__()
