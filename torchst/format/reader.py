"""Open one .safetensors file and hand out tensors: ``safe_open`` / ``SafeFile``.

Three read strategies, chosen per file with ``backend=``:

- ``"mmap"`` (default): the file is mapped once, copy-on-write; each tensor is a zero-copy
  window of that mapping with a storage of its own (writes never reach the file).
- ``"pread"``: positional reads into memory we own, one buffer per tensor, large tensors
  split across threads.  For network filesystems where page faults crawl.
- ``"eager"``: the whole data section is read sequentially into one buffer up front.

The header is validated completely when the file is opened, before any data is read.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .._dtypes import DTYPES, DType, from_code
from ..errors import ArgumentError, DeviceMapError, FormatError, TensorNotFoundError, UnsupportedDtypeError
from ..storage.buffers import anon_buffer, pread_parallel, read_scatter, tensor_bytes
from ..storage.remote import is_url
from .checksum import Verifier, check_tensors, warn_unverified
from .header import Header, TensorInfo, parse_header, read_header_length

__all__ = [
    "BACKENDS",
    "SafeFile",
    "SafeSlice",
    "check_backend",
    "check_device",
    "load",
    "load_file",
    "normalize_device",
    "read_file_header",
    "safe_open",
    "tensor_from_window",
    "torch_view",
]

BACKENDS = ("mmap", "pread", "eager")
logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
DeviceLike = str | int | torch.device


def normalize_device(device: DeviceLike) -> torch.device:
    """``"cpu"``, ``"cuda:1"``, ``1`` (= ``cuda:1``) or a torch.device; never rewritten silently."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise DeviceMapError(f"device must be a str, int or torch.device, found {type(device).__name__}: {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise DeviceMapError(f"device index must be >= 0, found {device}")
        return torch.device("cuda", device)
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise DeviceMapError(f"device {device!r} is invalid: {e}") from None


def check_device(device: DeviceLike) -> torch.device:
    """The one device check of every entry point: normalise ``device`` and make sure it exists here.

    ``"cuda:1"`` is never rewritten to ``"cuda"``, nor ``"meta"`` to ``"cpu"``; an accelerator
    that is absent, or an index past the last device, is a ``DeviceMapError`` saying so.

    >>> check_device("cpu"), check_device(torch.device("meta"))
    (device(type='cpu'), device(type='meta'))
    """
    dev = normalize_device(device)
    if dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise DeviceMapError(
            f"device {str(dev)!r} was requested but {dev.type.upper()} is not available on this machine "
            f"(torch.{dev.type}.is_available() is False); load to 'cpu' instead"
        )
    count = getattr(backend, "device_count", None)
    n = count() if callable(count) else None
    if dev.index is not None and n is not None and dev.index >= n:
        raise DeviceMapError(
            f"device {str(dev)!r} does not exist: this machine has {n} {dev.type.upper()} device(s) "
            f"({dev.type}:0 to {dev.type}:{n - 1})"
        )
    return dev


def check_backend(backend: str) -> str:
    """``backend`` itself when it is one of ``BACKENDS``; ``ArgumentError`` listing them otherwise.

    >>> check_backend("pread")
    'pread'
    """
    if backend not in BACKENDS:
        raise ArgumentError(f"backend {backend!r} is invalid (expected one of: {', '.join(map(repr, BACKENDS))})")
    return backend


# First bytes of what ``torch.save`` writes: a zip archive (torch >= 1.6) or a pickle stream.
_ZIP_MAGIC = b"PK\x03\x04"


def _not_safetensors(path: str, prefix: bytes) -> FormatError | None:
    """A clear error when ``path`` is a ``torch.save`` file rather than a safetensors one."""
    if prefix.startswith(_ZIP_MAGIC):
        kind = "a zip archive, as torch.save writes"
    elif len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        kind = "a pickle stream, as the legacy torch.save format writes"
    else:
        return None
    return FormatError(
        f"{path} is not a safetensors file: it is {kind} (pytorch_model.bin, *.pt, *.pth). "
        f"Convert it once with `torchst convert {path} <output>` (weights_only, no pickle code runs)"
    )


def read_file_header(fd: int, file_size: int, source: str) -> Header:
    """Read and validate the whole header of the open file ``fd`` (``file_size`` bytes long).

    A ``torch.save`` file (zip or pickle) is a ``FormatError`` that says so and names the fix.

    >>> fd = os.open("m.safetensors", os.O_RDONLY)
    >>> sorted(read_file_header(fd, os.fstat(fd).st_size, "m.safetensors").tensors); os.close(fd)
    ['embed.weight', 'lm_head.weight']
    """
    prefix = os.pread(fd, 8, 0)
    try:
        n = read_header_length(prefix, source=source, file_size=file_size)
    except FormatError:
        other = _not_safetensors(source, prefix)
        if other is not None:
            raise other from None
        raise
    raw = os.pread(fd, n, 8)
    with _gc_paused():
        return parse_header(raw, source=source, data_size=file_size - 8 - n)


def _torch_shape(info: TensorInfo, row: DType, where: str) -> tuple[int, ...]:
    if row.pack == 1:
        return info.shape
    if not info.shape or info.shape[-1] % row.pack:
        raise UnsupportedDtypeError(
            f"{where}: {row.code} shape {list(info.shape)} cannot be viewed as torch {row.torch_dtype}, "
            f"which packs {row.pack} values per element along the last dimension"
        )
    return info.shape[:-1] + (info.shape[-1] // row.pack,)


@contextmanager
def _gc_paused() -> Iterator[None]:
    # A 10,000-tensor header or load allocates ~100,000 containers; each allocation burst
    # triggers cyclic GC passes that rescan every live object of the process (torch alone
    # has ~150,000), which cost twice the parse itself.  Nothing made here forms cycles.
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def torch_view(info: TensorInfo, source: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(torch dtype, torch shape, torch element size) of a validated header entry of ``source``.

    Packed sub-byte dtypes (F4) have fewer torch elements on the last dimension; a dtype this
    torch lacks is an ``UnsupportedDtypeError`` naming the file and tensor.

    >>> torch_view(TensorInfo("w", "BF16", (2, 3), 0, 12), "m.safetensors")
    (torch.bfloat16, (2, 3), 2)
    """
    row = DTYPES[info.dtype]  # the code was checked by parse_header
    if row.torch_dtype is not None and row.pack == 1:
        return row.torch_dtype, info.shape, row.itemsize  # the hot path builds no message
    where = f"{source}: tensor {info.name!r}"
    return row.require_torch(where), _torch_shape(info, row, where), row.itemsize


def tensor_from_window(buf: memoryview | bytes, info: TensorInfo, base: int, address: int, source: str) -> torch.Tensor:
    """Tensor over ``buf[base+begin : base+end]`` (``address``: where buf starts in memory).

    Zero-copy when aligned, else one copy.  The tensor gets a storage of its own over
    exactly its bytes, so nothing looks shared to ``find_shared_tensors`` or the reference.

    >>> blob = bytearray(torchst.save({"x": torch.ones(2)})); h = torchst.format.parse_bytes(blob)
    >>> tensor_from_window(blob, h.tensors["x"], h.data_start, 0, "<bytes>")
    tensor([1., 1.])
    """
    dtype, shape, itemsize = torch_view(info, source)
    if info.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    start = base + info.begin
    if (address + start) % itemsize == 0:
        t = torch.frombuffer(buf, dtype=dtype, count=info.nbytes // itemsize, offset=start)
        return t if len(shape) == 1 else t.view(shape)
    # Third-party writers may misalign data; torch kernels need aligned memory (copy #1).
    logger.debug("%s: tensor %r is not aligned in the file; copied into aligned memory", source, info.name)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=start).clone()
    return raw.view(dtype).view(shape)


def _index_items(index: Any) -> tuple[Any, ...]:
    return index if isinstance(index, tuple) else (index,)


class SafeSlice:
    """Lazy handle on one tensor; ``[...]`` reads only the rows the index needs.

    >>> with safe_open("m.safetensors") as f:
    ...     part = f.get_slice("embed.weight")[0:2, :]
    """

    def __init__(self, file: SafeFile, info: TensorInfo) -> None:
        self._file = file
        self._info = info

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    @property
    def shape(self) -> list[int]:
        return self.get_shape()

    @property
    def dtype(self) -> str:
        return self._info.dtype

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._info.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        info, f = self._info, self._file
        items = _index_items(index)
        for it in items:
            if isinstance(it, slice) and it.step is not None and it.step <= 0:
                raise ValueError("step must be greater than zero")
        first = items[0] if items else Ellipsis
        row = from_code(info.dtype)
        if f.backend == "pread" and info.shape and row.pack == 1 and isinstance(first, (int, slice)):
            # Read only rows [lo, hi) of the first dimension, then index that block.
            n0 = info.shape[0]
            if isinstance(first, int):
                i = first + n0 if first < 0 else first
                if not 0 <= i < n0:
                    raise IndexError(f"index {first} is out of bounds for dimension 0 with size {n0}")
                lo, hi, rest = i, i + 1, (0,) + items[1:]
            else:
                lo, hi, step = first.indices(n0)
                hi = max(lo, hi)
                rest = (slice(0, hi - lo, step),) + items[1:]
            row_bytes = info.nbytes // n0 if n0 else 0
            sub = TensorInfo(info.name, info.dtype, (hi - lo,) + info.shape[1:], 0, (hi - lo) * row_bytes)
            block = f._pread_tensor(sub, f._header.data_start + info.begin + lo * row_bytes)
            out = _int_view(block)[rest]
        else:
            out = _int_view(f._cpu_tensor(info))[items]
        # get_slice returns memory of its own, like the reference (one copy of the selection).
        out = out.clone(memory_format=torch.contiguous_format)
        out = out.view(f._dtype_of(info))
        return f._to_device(out)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _int_view(t: torch.Tensor) -> torch.Tensor:
    # Index through a same-width integer view: copies work for every dtype (float4, float8).
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.dim() else t.reshape(1).view(_INT_OF_SIZE[t.element_size()])[0]


class SafeFile:
    """An open .safetensors file; use ``safe_open`` or ``with SafeFile(path) as f``.

    >>> with SafeFile("m.safetensors", backend="pread") as f:
    ...     w = f.get_tensor("lm_head.weight")
    """

    def __init__(
        self,
        path: PathLike,
        *,
        device: DeviceLike = "cpu",
        backend: str = "mmap",
        fd: int | None = None,
        verify: bool = False,
    ) -> None:
        """``fd``: read a duplicate of this open descriptor (the file as opened then) instead of opening ``path``."""
        self.backend = check_backend(backend)
        self.path = os.fspath(path)
        self.device = check_device(device)
        self._source = self.path
        if fd is None:
            if os.path.isdir(self.path):
                raise FormatError(
                    f"{self.path} is a directory, not a .safetensors file; load a checkpoint directory with "
                    f"torchst.load_state_dict({self.path!r}) or torchst.load_model(model, {self.path!r})"
                )
            self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        else:
            self._fd = os.dup(fd)
        try:
            self.file_size = os.fstat(self._fd).st_size
            self._header: Header = read_file_header(self._fd, self.file_size, self._source)
            # verify: the header is checked against its digest here; each tensor as it is read
            self._verifier = Verifier(self._header, source=self._source) if verify else None
        except BaseException:
            self.close()
            raise
        self._buf: memoryview | None = None
        self._base = 0
        self._address = 0
        self._on_cpu = self.device.type == "cpu"
        self._checked: set[str] = set()
        if self._verifier is not None and not self._verifier.active:
            warn_unverified([self._source])
            self._verifier = None

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file descriptor; tensors already handed out stay valid."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = None

    def __enter__(self) -> SafeFile:  # noqa: PYI034 - subclasses are not part of the API
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Interpreter shutdown may have torn down os already; nothing useful to report then.
        with contextlib.suppress(OSError, AttributeError, TypeError):
            self.close()

    # -- header ---------------------------------------------------------------------------
    @property
    def header(self) -> Header:
        return self._header

    def keys(self) -> list[str]:
        """Tensor names, sorted (as the reference)."""
        return sorted(self._header.tensors)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file."""
        return list(self._header.tensors)

    @property
    def verifying(self) -> bool:
        """Whether tensors are checked against recorded checksums as they are read."""
        return self._verifier is not None

    def metadata(self) -> dict[str, str] | None:
        md = self._header.metadata
        return dict(md) if md is not None else None

    def info(self, name: str) -> TensorInfo:
        try:
            return self._header.tensors[name]
        except KeyError:
            raise TensorNotFoundError(f"{self._source}: file does not contain tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._header.tensors)

    # -- tensors --------------------------------------------------------------------------
    def get_tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` on this file's device."""
        info = self._header.tensors.get(name)
        if info is None:
            return self._to_device(self._cpu_tensor(self.info(name)))  # raises TensorNotFoundError
        t = self._cpu_tensor(info)
        if self._verifier is not None:
            self._verifier.check(info, tensor_bytes(t))
            self._checked.add(name)
        return t if self._on_cpu else t.to(self.device)

    def get_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order."""
        infos = self._header.tensors
        with _gc_paused():
            if self.backend == "pread":
                cpu = dict(zip(infos, self._pread_many(infos.values())))
            else:
                cpu = {name: self._cpu_tensor(info) for name, info in infos.items()}
            if self._verifier is not None:
                check_tensors(self._verifier, ((infos[n], tensor_bytes(t)) for n, t in cpu.items()))
                self._checked.update(cpu)
            return {name: self._to_device(t) for name, t in cpu.items()}

    def get_slice(self, name: str) -> SafeSlice:
        """A lazy slice handle; with ``verify=True`` the whole tensor is read and checked once first."""
        info = self.info(name)
        if self._verifier is not None and name not in self._checked:
            self._verifier.check(info, tensor_bytes(self._cpu_tensor(info)))
            self._checked.add(name)
        return SafeSlice(self, info)

    def _where(self, info: TensorInfo) -> str:
        return f"{self._source}: tensor {info.name!r}"

    def _dtype_of(self, info: TensorInfo) -> torch.dtype:
        return from_code(info.dtype).require_torch(self._where(info))

    def _require_open(self) -> int:
        if self._fd is None:
            raise FormatError(f"{self._source}: file is closed")
        return self._fd

    def _cpu_tensor(self, info: TensorInfo) -> torch.Tensor:
        if self.backend == "pread":
            return self._pread_tensor(info, self._header.data_start + info.begin)
        if self._buf is None:
            self._buf = self._map() if self.backend == "mmap" else self._read_all()
            if len(self._buf):
                self._address = torch.frombuffer(self._buf, dtype=torch.uint8, count=1).data_ptr()
        return tensor_from_window(self._buf, info, self._base, self._address, self._source)

    def _map(self) -> memoryview:
        fd = self._require_open()
        self._base = self._header.data_start
        # ACCESS_COPY = MAP_PRIVATE: tensors are writable, writes never reach the file.
        return memoryview(mmap.mmap(fd, self.file_size, access=mmap.ACCESS_COPY))

    def _read_all(self) -> memoryview:
        fd = self._require_open()
        start = self._header.data_start
        self._base = 0
        # An anonymous mapping, not bytearray(n) (whose memset would touch every page before
        # the read does); tensors keep it alive through their buffer references.  One read
        # into memory we own (copy #1), split in chunks across the I/O pool.
        data = anon_buffer(self.file_size - start)
        pread_parallel(fd, data, start, source=self._source)
        return data

    def _pread_many(self, infos: Iterator[TensorInfo] | Any) -> list[torch.Tensor]:
        # One owned tensor per entry, filled by coalesced, parallel preadv calls (copy #1).
        fd, start = self._require_open(), self._header.data_start
        out: list[torch.Tensor] = []
        targets: list[tuple[int, memoryview]] = []
        for info in infos:
            dtype, shape, _ = torch_view(info, self._source)
            t = torch.empty(shape, dtype=dtype)
            out.append(t)
            if info.nbytes:
                targets.append((start + info.begin, tensor_bytes(t)))
        read_scatter(fd, targets, source=self._source)
        return out

    def _pread_tensor(self, info: TensorInfo, offset: int) -> torch.Tensor:
        dtype, shape, _ = torch_view(info, self._source)
        out = torch.empty(shape, dtype=dtype)
        if info.nbytes:
            pread_parallel(self._require_open(), tensor_bytes(out), offset, source=self._source)
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device)


def safe_open(
    path: PathLike, framework: str = "pt", device: DeviceLike = "cpu", *, backend: str = "mmap", verify: bool = False
) -> SafeFile:
    """Open a .safetensors file lazily; the whole header is validated here.

    ``verify=True`` checks the header and then every tensor read against the checksums the
    file records (``IntegrityError`` on a mismatch; a file without checksums logs that once).

    >>> with torchst.safe_open("m.safetensors", device="cpu", verify=True) as f:
    ...     names = f.keys(); w = f.get_tensor(names[0])
    """
    if framework not in ("pt", "torch", "pytorch"):
        raise ValueError(f"framework {framework!r} is not supported by torchst; use 'pt'")
    if is_url(path):
        from .remote import RemoteSafeFile

        return RemoteSafeFile(os.fspath(path), device=device, verify=verify)
    return SafeFile(path, device=device, backend=backend, verify=verify)


def load_file(
    path: PathLike, device: DeviceLike = "cpu", *, backend: str = "mmap", verify: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, in file order.

    ``verify=True`` checks every tensor against its recorded checksum (``IntegrityError`` names
    the tensor and its byte range).

    >>> tensors = torchst.load_file("m.safetensors", device="cpu", verify=True)
    """
    if is_url(path):
        from .remote import RemoteSafeFile

        with RemoteSafeFile(os.fspath(path), device=device, verify=verify) as r:
            return r.get_tensors()
    with SafeFile(path, device=device, backend=backend, verify=verify) as f:
        return f.get_tensors()


def load(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Tensors from an in-memory safetensors blob; each tensor owns its memory.

    Works for every dtype torch has, F8_E8M0 and F4 included.

    >>> tensors = torchst.load(torchst.save({"x": torch.ones(2)}))
    """
    from .header import parse_bytes

    header = parse_bytes(data)
    mv = memoryview(data)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        where = f"<bytes>: tensor {name!r}"
        row = from_code(info.dtype, where)
        t = torch.empty(_torch_shape(info, row, where), dtype=row.require_torch(where))
        if info.nbytes:
            start = header.data_start + info.begin
            tensor_bytes(t)[:] = mv[start : start + info.nbytes]  # copy #1: into memory we own
        out[name] = t
    return out
