"""Where loaded tensors go: ``device`` / ``device_map`` resolution and the streaming reader.

``stream_tensors`` materialises tensors straight from checkpoint files onto their target
device.  CPU targets in their stored dtype are read directly into the memory of the new
tensor (one copy: file -> tensor, large reads split across the I/O thread pool).  Every other
target (an accelerator, or a dtype cast) goes through a small ring of reusable host buffers,
pinned for CUDA: while one buffer is being copied to the device the next ones are being
filled by the thread pool, so reads overlap with host-to-device copies and host memory stays
bounded by ``num_buffers * buffer_bytes`` whatever the model size.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ArgumentError, DeviceMapError
from .format.reader import DeviceLike, check_device, normalize_device
from .storage.buffers import io_pool, pread_into, tensor_bytes

__all__ = [
    "BUFFER_BYTES",
    "DeviceLike",
    "DeviceMap",
    "ReadRequest",
    "check_device",
    "check_dtype",
    "infer_device_map",
    "normalize_device",
    "resolve_device_map",
    "stream_tensors",
]

BUFFER_BYTES = 32 << 20
NUM_BUFFERS = 3
_DIRECT_CHUNK = 16 << 20
DeviceMap = Mapping[str, DeviceLike]


def check_dtype(dtype: object) -> torch.dtype | None:
    """``dtype`` itself when it is ``None`` or a floating ``torch.dtype`` (a load/save cast target).

    Integer and bool tensors are never cast, so only floating targets make sense.

    >>> check_dtype(torch.bfloat16)
    torch.bfloat16
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ArgumentError(f"dtype must be a floating torch.dtype such as torch.bfloat16, found {dtype!r}")
    return dtype


def _map_value(prefix: str, value: object) -> torch.device:
    if value == "disk":
        raise DeviceMapError(
            f"device_map sends {prefix or '<root>'!r} to 'disk'; torchst does not offload to disk. "
            "Give it more CPU memory (max_memory={'cpu': ...}) or map it to 'cpu'"
        )
    if isinstance(value, torch.device):
        dev = value
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        dev = normalize_device(value)
    else:
        raise DeviceMapError(
            f"device_map[{prefix!r}] must be a device (str, int or torch.device), found {type(value).__name__}"
        )
    if dev.type == "meta":
        raise DeviceMapError(f"device_map sends {prefix or '<root>'!r} to 'meta', which would hold no data")
    return check_device(dev)


def resolve_device_map(
    names: Iterable[str], device_map: DeviceMap, *, known: Iterable[str] | None = None
) -> dict[str, torch.device]:
    """The device of each tensor name: the longest ``device_map`` prefix (whole dotted parts) wins.

    ``""`` matches every name.  Names no prefix covers raise ``DeviceMapError``.  A key that
    is no prefix of ``names`` (nor of ``known``, e.g. every module name of a model) is a typo:
    ``DeviceMapError`` naming it and its closest matches.

    >>> resolve_device_map(["a.w", "a.b.w", "c"], {"a": "cpu", "": "cpu"})["a.b.w"]
    device(type='cpu')
    """
    if not isinstance(device_map, Mapping):
        raise DeviceMapError(f"device_map must be a dict {{module prefix: device}}, found {type(device_map).__name__}")
    prefixes: dict[str, torch.device] = {}
    for prefix, value in device_map.items():
        if not isinstance(prefix, str):
            raise DeviceMapError(f"device_map keys must be module name prefixes (str), found {prefix!r}")
        prefixes[prefix] = _map_value(prefix, value)
    names = list(names)
    _check_keys(prefixes, [*names, *(known or ())])
    out: dict[str, torch.device] = {}
    unmapped: list[str] = []
    for name in names:
        dev = _lookup(name, prefixes)
        if dev is None:
            unmapped.append(name)
        else:
            out[name] = dev
    if unmapped:
        shown = ", ".join(repr(n) for n in unmapped[:5]) + (
            f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        )
        raise DeviceMapError(
            f"device_map does not place {len(unmapped)} tensor(s): {shown}; add their module prefix "
            '(or "" for everything else) to the map'
        )
    return out


def _check_keys(prefixes: Mapping[str, torch.device], names: Iterable[str]) -> None:
    valid: set[str] = {""}
    for name in names:
        parts = name.split(".")
        valid.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    unknown = [p for p in prefixes if p not in valid]
    if not unknown:
        return
    hints = []
    for p in unknown[:5]:
        close = difflib.get_close_matches(p, valid, n=3, cutoff=0.6)
        hints.append(f"{p!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    raise DeviceMapError(
        f"device_map key(s) {', '.join(hints)} match no module or tensor name; keys are module prefixes "
        "such as 'model.layers.0' (or \"\" for everything else)"
    )


def _lookup(name: str, prefixes: Mapping[str, torch.device]) -> torch.device | None:
    probe = name
    while True:
        if probe in prefixes:
            return prefixes[probe]
        if not probe:
            return None
        probe = probe.rpartition(".")[0]


def infer_device_map(
    model: torch.nn.Module,
    *,
    max_memory: Mapping[int | str, int | str] | None = None,
    dtype: torch.dtype | None = None,
    no_split_module_classes: Sequence[str] | None = None,
) -> dict[str, torch.device]:
    """``device_map="auto"``: accelerate's ``infer_auto_device_map`` (GPUs first, then CPU).

    Uses the model's ``_no_split_modules`` when present.  Disk offload is refused.

    >>> with torch.device("meta"):
    ...     net = torch.nn.Linear(4, 4)
    >>> infer_device_map(net, max_memory={"cpu": "1GB"})
    {'': device(type='cpu')}
    """
    try:
        from accelerate import infer_auto_device_map
    except ImportError:
        raise DeviceMapError('device_map="auto" needs the accelerate package: pip install accelerate') from None
    if no_split_module_classes is None:
        no_split_module_classes = list(getattr(model, "_no_split_modules", None) or [])
    kwargs: dict[str, Any] = {"no_split_module_classes": list(no_split_module_classes)}
    if max_memory is not None:
        kwargs["max_memory"] = dict(max_memory)
    if dtype is not None:
        kwargs["dtype"] = dtype
    raw = infer_auto_device_map(model, **kwargs)
    return {prefix: _map_value(prefix, value) for prefix, value in raw.items()}


@dataclass(frozen=True)
class ReadRequest:
    """One tensor to materialise: bytes ``[offset, offset+nbytes)`` of ``path`` as ``dtype``/``shape``."""

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    out_dtype: torch.dtype | None = None
    fd: int | None = None  # an open descriptor of ``path`` to read through (the caller keeps it open)


@dataclass
class _Chunk:
    out: torch.Tensor  # flat element view of the destination
    fd: int
    offset: int
    nbytes: int
    first: int  # first element of ``out`` this chunk fills
    src_dtype: torch.dtype
    source: str


def _chunks(req: ReadRequest, out: torch.Tensor, fd: int, chunk_bytes: int) -> Iterator[_Chunk]:
    item = torch.empty((), dtype=req.dtype).element_size()
    step = max(item, chunk_bytes // item * item)
    flat = out.view(-1)
    for off in range(0, req.nbytes, step):
        n = min(step, req.nbytes - off)
        yield _Chunk(flat, fd, req.offset + off, n, off // item, req.dtype, req.path)


def _read_ahead(fd: int) -> None:
    # Every byte of the file will be read, mostly in order: tell the kernel, so cold reads of the
    # next tensors (and shards) are already under way while this one is copied.
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


class _Files:
    """Open file descriptors, one per path, closed together."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.hinted: set[str] = set()

    def fd(self, path: str, held: int | None = None) -> int:
        if held is not None:
            fd = held
        elif path in self.fds:
            return self.fds[path]
        else:
            fd = self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if path not in self.hinted:
            self.hinted.add(path)
            _read_ahead(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def stream_tensors(
    requests: Iterable[ReadRequest],
    *,
    buffer_bytes: int = BUFFER_BYTES,
    num_buffers: int = NUM_BUFFERS,
    force_staging: bool = False,
    on_bytes: Callable[[int], object] | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read every request into a new tensor on its device; returns ``{name: tensor}`` in request order.

    ``force_staging`` sends CPU targets through the host-buffer ring too (tests the accelerator
    path on machines without one).  ``on_bytes(n)`` is called as each piece lands (progress).
    ``into`` gives existing contiguous tensors (of the request's shape and target dtype) to fill
    instead of new ones: a model's parameters, read in place with no copy in between.

    >>> req = ReadRequest("w", "m.safetensors", 128, 16, torch.float32, (4,), torch.device("cpu"))
    >>> stream_tensors([req])["w"].shape
    torch.Size([4])
    """
    if buffer_bytes <= 0 or num_buffers <= 0:
        raise ValueError(f"buffer_bytes and num_buffers must be positive, found {buffer_bytes}, {num_buffers}")
    files = _Files()
    out: dict[str, torch.Tensor] = {}
    direct: list[_Chunk] = []
    staged: list[_Chunk] = []
    try:
        for req in requests:
            dst_dtype = req.out_dtype or req.dtype
            t = into.get(req.name) if into is not None else None
            if t is None:
                t = torch.empty(req.shape, dtype=dst_dtype, device=req.device)
            elif t.dtype != dst_dtype or tuple(t.shape) != req.shape or not t.is_contiguous() or t.device != req.device:
                raise ValueError(f"{req.name!r}: the tensor to read into does not match the request {req}")
            out[req.name] = t
            if req.nbytes == 0 or req.device.type == "meta":
                continue  # meta tensors have a shape and a dtype but no data to read
            if req.device.type == "cpu" and dst_dtype == req.dtype and not force_staging:
                direct.extend(_chunks(req, t, files.fd(req.path, req.fd), _DIRECT_CHUNK))
            else:
                staged.extend(_chunks(req, t, files.fd(req.path, req.fd), buffer_bytes))
        if direct:
            _read_direct(direct, on_bytes)
        if staged:
            _read_staged(staged, min(buffer_bytes, max(c.nbytes for c in staged)), num_buffers, on_bytes)
    finally:
        files.close()
    return out


def _read_direct(chunks: list[_Chunk], on_bytes: Callable[[int], object] | None) -> None:
    # Copy #1 (the only one): file -> the new tensor's own memory, several reads in flight.
    pool = io_pool()
    limit = 2 * getattr(pool, "_max_workers", 4)
    pending: deque[Future[int]] = deque()
    try:
        for c in chunks:
            item = c.out.element_size()
            view = tensor_bytes(c.out)[c.first * item : c.first * item + c.nbytes]
            pending.append(pool.submit(_pread_counted, c.fd, view, c.offset, c.source))
            if len(pending) >= limit:
                _done(pending.popleft(), on_bytes)
        while pending:
            _done(pending.popleft(), on_bytes)
    finally:
        _drain(f for f in pending)


def _pread_counted(fd: int, view: memoryview, offset: int, source: str) -> int:
    pread_into(fd, view, offset, source=source)
    return len(view)


def _done(fut: Future[int], on_bytes: Callable[[int], object] | None) -> None:
    n = fut.result()
    if on_bytes is not None:
        on_bytes(n)


def _drain(futures: Iterable[Future[Any]]) -> None:
    """Wait for reads still in flight after an error: the caller closes their descriptors next."""
    for f in futures:
        f.cancel()
        with contextlib.suppress(Exception):  # the first error is already propagating
            f.result()


class _Slot:
    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.view = tensor_bytes(self.buf)
        self.event: Any = None  # torch.cuda.Event of the last copy out of this buffer


def _fill(slot: _Slot, c: _Chunk) -> None:
    if slot.event is not None:
        slot.event.synchronize()  # the previous device copy out of this buffer must be done
    pread_into(c.fd, slot.view[: c.nbytes], c.offset, source=c.source)


def _read_staged(
    chunks: list[_Chunk], nbytes: int, num_buffers: int, on_bytes: Callable[[int], object] | None
) -> None:
    pin = torch.cuda.is_available() and any(c.out.device.type == "cuda" for c in chunks)
    slots = [_Slot(nbytes, pin) for _ in range(min(num_buffers, len(chunks)))]
    pool = io_pool()
    pending: deque[tuple[_Chunk, _Slot, Future[None]]] = deque()
    todo = iter(chunks)
    for slot in slots:
        c = next(todo, None)
        if c is None:
            break
        pending.append((c, slot, pool.submit(_fill, slot, c)))
    try:
        _copy_out(pending, todo, pool, pin, on_bytes)
    finally:
        _drain(fut for _, _, fut in pending)
        if pin:  # the pinned buffers are freed on return; every device's copies must be done
            for dev in {c.out.device for c in chunks if c.out.device.type == "cuda"}:
                torch.cuda.synchronize(dev)


def _copy_out(
    pending: deque[tuple[_Chunk, _Slot, Future[None]]],
    todo: Iterator[_Chunk],
    pool: Any,
    pin: bool,
    on_bytes: Callable[[int], object] | None,
) -> None:
    while pending:
        c, slot, fut = pending.popleft()
        fut.result()
        item = torch.empty((), dtype=c.src_dtype).element_size()
        src = slot.buf[: c.nbytes].view(c.src_dtype)
        dst = c.out[c.first : c.first + c.nbytes // item]
        cuda = dst.device.type == "cuda"
        # Copy #2 (copy #1 was file -> buffer): buffer -> device memory, casting if asked.
        dst.copy_(src, non_blocking=cuda and pin)
        if cuda:  # the copy runs on the destination device's stream, which is not the current one for cuda:1
            slot.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            slot.event.record()
        if on_bytes is not None:
            on_bytes(c.nbytes)
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, slot, pool.submit(_fill, slot, nxt)))
