"""``safe_open`` / ``load_file`` / ``save_file`` for URLs (``s3://``, ``memory://``, any fsspec URL).

A remote file is read like the ``"pread"`` backend reads a local one: the header by one ranged
GET (``HEADER_GUESS`` bytes, a second GET only when the header is larger), then only the byte
ranges a call needs (a tensor, the rows of a slice), fetched in parallel straight into the
memory of the tensors returned.  Writes stream into a multipart upload that becomes visible
only when complete, so no reader ever sees a partial file.

>>> torchst.save_file({"embed.weight": torch.arange(12.0).view(6, 2)}, "memory://bucket/m.safetensors")
>>> with torchst.safe_open("memory://bucket/m.safetensors") as f:  # s3://, gs://, ... alike
...     f.get_slice("embed.weight")[1:3]      # fetches 2 rows, not the file
tensor([[2., 3.],
        [4., 5.]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..storage.buffers import tensor_bytes
from ..storage.remote import RemoteObject, open_writer
from .checksum import Verifier, warn_unverified
from .header import Header, TensorInfo, parse_header, read_header_length
from .reader import DeviceLike, SafeFile, _gc_paused, check_device, torch_view
from .writer import plan_write, write_tensors

__all__ = ["HEADER_GUESS", "RemoteSafeFile", "open_header", "save_file_remote"]

# First GET: big enough for the header of a model with thousands of tensors, small enough that
# `inspect` of a remote file stays far below 1 MB on the wire.
HEADER_GUESS = 256 << 10


def open_header(obj: RemoteObject) -> Header:
    """Fetch and validate the header of ``obj`` (one GET, two when it exceeds ``HEADER_GUESS``)."""
    first = obj.head(HEADER_GUESS)
    assert obj.size is not None
    n = read_header_length(first[:8], source=obj.url, file_size=obj.size)
    raw = first[8 : 8 + n] if 8 + n <= len(first) else first[8:] + obj.read(len(first), 8 + n)
    with _gc_paused():
        return parse_header(raw, source=obj.url, data_size=obj.size - 8 - n)


class RemoteSafeFile(SafeFile):
    """An open remote .safetensors file: header fetched, tensors fetched by ranges on demand.

    >>> torchst.save_file({"w": torch.ones(2)}, "memory://bucket/one.safetensors")
    >>> with RemoteSafeFile("memory://bucket/one.safetensors") as f:
    ...     f.get_tensor("w")
    tensor([1., 1.])
    """

    def __init__(self, path: str, *, device: DeviceLike = "cpu", verify: bool = False, **_: Any) -> None:
        self.path = path
        self.device = check_device(device)
        self.backend = "pread"  # range reads: slices fetch only their rows
        self._source = path
        self._fd = None
        self._obj = RemoteObject(path)
        self._header = open_header(self._obj)
        assert self._obj.size is not None
        self.file_size = self._obj.size
        self._verifier = Verifier(self._header, source=self._source) if verify else None
        self._buf = None
        self._base = 0
        self._address = 0
        self._on_cpu = self.device.type == "cpu"
        self._checked: set[str] = set()
        self._closed = False
        if self._verifier is not None and not self._verifier.active:
            warn_unverified([self._source])
            self._verifier = None

    def close(self) -> None:
        self._closed = True

    def _require_open(self) -> int:
        from ..errors import FormatError

        if self._closed:
            raise FormatError(f"{self._source}: file is closed")
        return -1

    def _cpu_tensor(self, info: TensorInfo) -> torch.Tensor:
        return self._pread_tensor(info, self._header.data_start + info.begin)

    def _pread_many(self, infos: Any) -> list[torch.Tensor]:
        self._require_open()
        start = self._header.data_start
        out: list[torch.Tensor] = []
        targets = []
        for info in infos:
            dtype, shape, _ = torch_view(info, self._source)
            t = torch.empty(shape, dtype=dtype)
            out.append(t)
            if info.nbytes:
                targets.append((start + info.begin, tensor_bytes(t)))
        self._obj.read_into(targets)  # parallel ranged GETs straight into the tensors
        return out

    def _pread_tensor(self, info: TensorInfo, offset: int) -> torch.Tensor:
        self._require_open()
        dtype, shape, _ = torch_view(info, self._source)
        out = torch.empty(shape, dtype=dtype)
        if info.nbytes:
            self._obj.read_into([(offset, tensor_bytes(out))])
        return out


def save_file_remote(
    tensors: Mapping[str, torch.Tensor],
    url: str,
    metadata: Mapping[str, str] | None = None,
    *,
    checksums: bool = False,
) -> None:
    """``save_file`` to a URL: one streamed upload, visible only once complete."""
    plan = plan_write(tensors, metadata, checksums=checksums)
    with open_writer(url) as w:
        write_tensors(w, plan)  # type: ignore[arg-type]
        w.commit()
