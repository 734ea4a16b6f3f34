"""Write .safetensors files: header first, then tensor bytes straight from tensor memory.

CPU tensors are written through memoryviews of their own memory (no per-tensor copy).
Tensors on an accelerator pass through one bounded, reusable (pinned) host buffer.
Files are committed atomically, so saving over a file that is still mapped is safe.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .._dtypes import DType, from_torch
from ..errors import SerializationError, SharedTensorError
from ..storage.atomic import OutputFile, open_output
from ..storage.buffers import pwrite_all, tensor_bytes, write_all, writev_all
from ..storage.remote import is_url
from .checksum import CHECKSUM_KEY, checksum_metadata, crc32c, submit
from .header import METADATA_KEY, build_header, encode_prefix

__all__ = [
    "STAGING_BYTES",
    "WritePlan",
    "find_shared_tensors",
    "plan_write",
    "save",
    "save_file",
    "split_overlapping",
    "write_tensors",
]

STAGING_BYTES = 64 << 20
# Bytes of CPU tensors per writev call (views of tensor memory, no copy; large tensors are
# split).  Small enough to stay in the core's cache between being hashed and being copied into
# the page cache by the same thread; the syscall per MiB costs nothing measurable.
WRITEV_BYTES = 1 << 20


@dataclass(frozen=True)
class WritePlan:
    """Header bytes (prefix included) and the tensors in the order their bytes follow.

    With checksums, ``header`` holds zero placeholders of the same width as the final values;
    ``final_header`` builds the header to write over it once the data is hashed.
    """

    header: bytes
    order: tuple[tuple[str, torch.Tensor], ...]
    checksums: bool = False
    _entries: tuple[tuple[str, str, list[int], int], ...] = ()
    _metadata: dict[str, str] | None = None

    @property
    def total_size(self) -> int:
        return len(self.header) + sum(t.numel() * t.element_size() for _, t in self.order)

    def final_header(self, crcs: Sequence[int]) -> bytes:
        """The header with the tensors' CRC32C values (in write order); same length as ``header``."""
        raw = build_header(self._entries, checksum_metadata(self._metadata, self._entries, crcs))
        out = encode_prefix(raw) + raw
        assert len(out) == len(self.header), "checksum values are fixed-width"
        return out


def _storage_key(t: torch.Tensor) -> tuple[str, int | None, int, int] | None:
    dev = t.device
    if dev.type == "meta":
        return None
    st = t.untyped_storage()
    if st.data_ptr() == 0 or st.nbytes() == 0:
        return None
    # (type, index) rather than the torch.device itself: hashing devices dominates for 10k tensors
    return (dev.type, dev.index, st.data_ptr(), st.nbytes())


def find_shared_tensors(tensors: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Groups of names whose bytes overlap in memory (same storage *and* overlapping range).

    Tensors that are disjoint windows of one storage (e.g. loaded from one mapped file) do
    not count as shared.  Singleton groups are included, like the reference helper.

    >>> a = torch.zeros(4); sorted(map(sorted, find_shared_tensors({"a": a, "b": a.view(2, 2)})))
    [['a', 'b']]
    """
    by_storage: dict[tuple[str, int | None, int, int], list[str]] = {}
    for name, t in tensors.items():
        key = _storage_key(t)
        if key is not None:
            by_storage.setdefault(key, []).append(name)
    return split_overlapping(sorted(by_storage.values(), key=sorted), tensors)


def split_overlapping(groups: Iterable[Collection[str]], tensors: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Split each same-storage group of names into runs whose byte ranges overlap.

    The furthest end seen so far is kept, so a small view nested inside a large one stays in
    the large one's run (the reference helper loses track of it and would write it twice).
    """
    out: list[set[str]] = []
    for names in groups:
        if len(names) < 2:
            out.append(set(names))
            continue
        areas = sorted((tensors[n].data_ptr(), _end_ptr(tensors[n]), n) for n in names)
        _, last_stop, first = areas[0]
        out.append({first})
        for start, stop, name in areas[1:]:
            if start >= last_stop:
                out.append({name})
            else:
                out[-1].add(name)
            last_stop = max(last_stop, stop)
    return out


def _end_ptr(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return t.data_ptr()
    return t.view(-1)[-1].data_ptr() + t.element_size()


def _check_tensor(name: object, t: object) -> DType:
    if not isinstance(name, str):
        raise SerializationError(f"tensor names must be str, found {type(name).__name__}: {name!r}")
    if name == METADATA_KEY:
        raise SerializationError(f"a tensor cannot be named {METADATA_KEY!r}: the header reserves that key")
    if not isinstance(t, torch.Tensor):
        raise SerializationError(f"tensor {name!r}: expected a torch.Tensor, found {type(t).__name__}")
    if t.layout != torch.strided:
        raise SerializationError(
            f"tensor {name!r} is {t.layout} (sparse); safetensors stores dense tensors only: "
            "call .to_dense() first (the file may get much larger)"
        )
    if t.device.type == "meta":
        raise SerializationError(f"tensor {name!r} is on the meta device and has no data to save")
    if not t.is_contiguous():
        raise SerializationError(
            f"tensor {name!r} is not contiguous (a strided view such as a transpose or a slice); "
            "call .contiguous() on it, or save the full tensor and slice it after loading"
        )
    row = from_torch(t.dtype, f"tensor {name!r}")
    if row.pack != 1 and t.dim() == 0:
        raise SerializationError(f"tensor {name!r}: a 0-d {t.dtype} cannot be stored; reshape it to (1,)")
    return row


def plan_write(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, checksums: bool = False
) -> WritePlan:
    """Validate ``tensors``/``metadata`` and lay out the file exactly as the reference does.

    ``checksums=True`` adds the per-tensor checksum record (see ``torchst.format.checksum``) to
    ``__metadata__``, with placeholder values that ``write_tensors`` fills in.
    """
    if not isinstance(tensors, Mapping):
        raise SerializationError(f"expected a dict of str -> torch.Tensor, found {type(tensors).__name__}")
    rows = {name: _check_tensor(name, t) for name, t in tensors.items()}
    shared = [sorted(g) for g in find_shared_tensors(tensors) if len(g) > 1]
    if shared:
        raise SharedTensorError(
            f"tensors share memory and would be written twice: {shared}; "
            "use torchst.save_model / save_state_dict, which store each storage once and record aliases"
        )
    names = sorted(tensors, key=lambda n: (-rows[n].rank, n))
    entries = []
    for n in names:
        t, row = tensors[n], rows[n]
        shape = list(t.shape)
        if row.pack != 1:
            shape[-1] *= row.pack  # header stores logical values: two float4 per torch element
        entries.append((n, row.code, shape, t.numel() * t.element_size()))
    order = tuple((n, tensors[n]) for n in names)
    md = metadata
    if isinstance(metadata, Mapping) and CHECKSUM_KEY in metadata:
        # A record copied from another file describes other bytes: never carried over.
        md = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    if not checksums:
        header = build_header(entries, md)
        return WritePlan(encode_prefix(header) + header, order)
    build_header(entries, md)  # validates the user's metadata before it is hashed
    user = dict(md or {})
    header = build_header(entries, checksum_metadata(user, entries))  # zero placeholders
    return WritePlan(encode_prefix(header) + header, order, True, tuple(entries), user)


def write_tensors(
    f: BinaryIO | OutputFile,
    plan: WritePlan,
    *,
    staging_bytes: int = STAGING_BYTES,
    stage_all: bool = False,
    on_bytes: Callable[[int], object] | None = None,
) -> list[int] | None:
    """Stream a planned file into ``f``: CPU memory directly, accelerator memory via one buffer.

    ``f`` is an ``OutputFile`` from ``torchst.storage.open_output`` (the library's own saves), a
    regular binary file, or anything with ``write``.  ``on_bytes(n)`` is called as bytes go out
    (progress bars).  ``stage_all`` sends CPU tensors through the staging buffer too (tests the
    device path on CPU).

    With ``plan.checksums`` each tensor is hashed as its bytes go out (each CPU batch by the
    writing thread right before it is written, staged chunks in the buffer they pass through)
    and the final header is written over the placeholder one at the end: the data is read once, never copied
    for hashing.  A stream that cannot seek back gets the tensors hashed ahead of the write
    instead.  Returns the CRC32C values in write order (None without checksums).
    """
    sink = _Sink(f)
    header_pos = sink.tell() if plan.checksums else None
    ahead = plan.checksums and header_pos is None
    crcs: list[int] = _hash_ahead(plan, staging_bytes) if ahead else [0] * len(plan.order)
    hashing = plan.checksums and not ahead
    header = plan.final_header(crcs) if ahead else plan.header
    sink.write(memoryview(header))
    report = on_bytes if on_bytes is not None else _ignore
    report(len(header))
    # CPU tensors go out as writev batches of views of their own memory.  Through
    # io.BufferedWriter.write, every tensor up to the buffer size would first be memcpy'd into
    # the buffer: an extra copy of most of a model.
    batch: list[memoryview] = []
    batch_index: list[int] = []
    batch_bytes = 0
    # With checksums each batch is hashed by the writing thread right before the kernel copies
    # the same (now cached) bytes.  Hashing on pool threads instead read every byte from memory
    # a second time and added runnable threads to the shard writers on a small machine: sharded
    # page-cache saves became bimodal (up to 6x slower in some rounds).
    partial: dict[int, int] = {}  # tensor index -> CRC of its bytes written so far

    def drain() -> None:
        nonlocal batch_bytes
        if batch:
            if hashing:
                for i, v in zip(batch_index, batch):
                    partial[i] = crc32c(v, partial.get(i, 0))
            sink.writev(batch)
            report(batch_bytes)
            batch.clear()
            batch_index.clear()
            batch_bytes = 0

    try:
        staging: torch.Tensor | None = None
        for i, (_, t) in enumerate(plan.order):
            nbytes = t.numel() * t.element_size()
            if nbytes == 0:
                continue
            if t.device.type == "cpu" and not stage_all:
                view = tensor_bytes(t)  # zero-copy: the file write reads tensor memory directly
                for off in range(0, nbytes, WRITEV_BYTES):
                    piece = view[off : off + WRITEV_BYTES]
                    batch.append(piece)
                    batch_index.append(i)
                    batch_bytes += len(piece)
                    if batch_bytes >= WRITEV_BYTES or len(batch) >= 512:
                        drain()
                continue
            drain()
            if staging is None:
                staging = _staging(plan, t, staging_bytes)
            crc = 0
            for view in _staged_chunks(t, staging):
                if hashing:
                    crc = crc32c(view, crc)  # hashed in the buffer it is written from
                sink.write(view)  # written before the buffer is refilled
                report(len(view))
            crcs[i] = crc if hashing else crcs[i]
        drain()
    finally:
        batch.clear()  # views into the caller's tensors: not kept past the call
    for i, v in partial.items():
        crcs[i] = v
    sink.finish()
    if hashing:
        assert header_pos is not None
        sink.write_at(header_pos, plan.final_header(crcs))
    return crcs if plan.checksums else None


def _crc_views(views: list[memoryview]) -> list[int]:
    return [crc32c(v) for v in views]


def _staging(plan: WritePlan, t: torch.Tensor, staging_bytes: int) -> torch.Tensor:
    size = min(staging_bytes, max(n.numel() * n.element_size() for _, n in plan.order))
    pin = torch.cuda.is_available() and t.device.type == "cuda"
    return torch.empty(size, dtype=torch.uint8, pin_memory=pin)


def _staged_chunks(t: torch.Tensor, staging: torch.Tensor) -> Iterator[memoryview]:
    nbytes = t.numel() * t.element_size()
    src = t.reshape(-1).view(torch.uint8)
    view = tensor_bytes(staging)
    for off in range(0, nbytes, staging.numel()):
        k = min(staging.numel(), nbytes - off)
        staging[:k].copy_(src[off : off + k])  # copy #1: device -> reused host buffer
        yield view[:k]


def _hash_ahead(plan: WritePlan, staging_bytes: int) -> list[int]:
    """CRC32C of every tensor before anything is written (for streams that cannot seek back)."""
    crcs = [0] * len(plan.order)
    futures: list[tuple[int, Future[list[int]]]] = []
    staging: torch.Tensor | None = None
    try:
        for i, (_, t) in enumerate(plan.order):
            if t.numel() == 0:
                continue
            if t.device.type == "cpu":
                futures.append((i, submit(_crc_views, [tensor_bytes(t)])))
                continue
            if staging is None:
                staging = _staging(plan, t, staging_bytes)
            crc = 0
            for view in _staged_chunks(t, staging):  # one extra device -> host pass
                crc = crc32c(view, crc)
            crcs[i] = crc
    finally:
        for _, fut in futures:
            fut.exception()
    for i, fut in futures:
        crcs[i] = fut.result()[0]
    return crcs


def _ignore(n: int) -> None:
    pass


class _Sink:
    """Vectored writes into whatever ``write_tensors`` was given."""

    write: Callable[[memoryview], object]
    writev: Callable[[list[memoryview]], None]

    def __init__(self, f: BinaryIO | OutputFile) -> None:
        self.f = f
        self.fd: int | None = None
        if isinstance(f, OutputFile):
            self.write, self.writev = f.write, f.writev
            return
        self.fd = _direct_fd(f)
        if self.fd is not None:
            self.write = self._write_fd
            self.writev = self._writev_fd
            return
        self.write = f.write
        self.writev = self._writev_plain

    def _write_fd(self, view: memoryview) -> int:
        assert self.fd is not None
        self.f.flush()  # whatever the caller buffered goes first
        write_all(self.fd, view)
        return len(view)

    def _writev_fd(self, views: list[memoryview]) -> None:
        assert self.fd is not None
        self.f.flush()
        writev_all(self.fd, views)

    def _writev_plain(self, views: list[memoryview]) -> None:
        for v in views:
            self.f.write(v)

    def tell(self) -> int | None:
        """Where the next byte goes, if the file can be written there again later (else None)."""
        if isinstance(self.f, OutputFile):
            return self.f.tell()
        try:
            return self.f.tell() if self.f.seekable() else None
        except (AttributeError, OSError, ValueError):  # pipes, write-only wrappers
            return None

    def write_at(self, offset: int, data: bytes) -> None:
        """Overwrite bytes written earlier (the header, once checksums are known)."""
        if isinstance(self.f, OutputFile):
            self.f.write_at(offset, data)
        elif self.fd is not None:
            self.f.flush()
            pwrite_all(self.fd, memoryview(data), offset)
        else:
            end = self.f.tell()
            self.f.seek(offset)
            self.f.write(data)
            self.f.seek(end)

    def finish(self) -> None:
        if self.fd is not None and not isinstance(self.f, OutputFile):
            self.f.seek(os.lseek(self.fd, 0, os.SEEK_CUR))  # resync the BufferedWriter's cached position


def _direct_fd(f: BinaryIO) -> int | None:
    # Only for buffered or raw files we can write around; anything else (BytesIO, sockets
    # wrapped by users) gets plain f.write calls.
    if not isinstance(f, (io.BufferedWriter, io.FileIO)):
        return None
    try:
        return f.fileno() if f.seekable() else None  # pipes keep plain writes (no position to resync)
    except (OSError, ValueError):
        return None


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = False,
    checksums: bool = False,
) -> None:
    """Write ``tensors`` to ``path`` atomically, byte-identical to ``safetensors.torch.save_file``.

    ``checksums=True`` also records each tensor's CRC32C in ``__metadata__`` (still readable by
    every safetensors reader; then no longer byte-identical to the reference).

    >>> torchst.save_file({"w": torch.ones(2, 2)}, "m.safetensors", metadata={"format": "pt"})
    >>> torchst.save_file({"w": torch.ones(2, 2)}, "m.safetensors", checksums=True)
    """
    if is_url(path):
        from .remote import save_file_remote

        save_file_remote(tensors, os.fspath(path), metadata, checksums=checksums)
        return
    plan = plan_write(tensors, metadata, checksums=checksums)
    with open_output(path, size=plan.total_size, fsync=fsync) as f:
        write_tensors(f, plan)


def save(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, checksums: bool = False
) -> bytes:
    """The safetensors bytes for ``tensors`` (one copy: into the returned bytes).

    >>> blob = torchst.save({"w": torch.ones(2)})
    """
    plan = plan_write(tensors, metadata, checksums=checksums)
    parts: list[bytes | memoryview] = [plan.header]
    keep = []
    crcs = []
    for _, t in plan.order:
        host = t if t.device.type == "cpu" else t.cpu()
        keep.append(host)
        view = tensor_bytes(host)
        if checksums:
            crcs.append(crc32c(view) if len(view) else 0)
        if len(view):
            parts.append(view)
    if checksums:
        parts[0] = plan.final_header(crcs)
    return b"".join(parts)
