"""What a load will read, decided before any byte is read: ``plan_load`` -> ``LoadPlan``.

A plan goes names -> placements -> reads: which stored tensors are wanted (aliases resolved),
which device and dtype each one gets, and where its bytes are.  ``Checkpoint.load`` builds one
and executes it; ``torchst.load_model`` builds one from the model (its names, its dtypes, its
device map) and checks shapes against it before anything is read; a distributed loader can build
one per rank.  This module knows nothing about ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from .._dtypes import from_code
from ..devices import DeviceLike, DeviceMap, ReadRequest, check_device, check_dtype, resolve_device_map
from ..errors import DeviceMapError, TensorNotFoundError
from ..format.header import TensorInfo
from ..format.reader import check_backend, torch_view

__all__ = ["LoadPlan", "PlannedRead", "StoredTensor", "plan_load"]


class StoredTensor(NamedTuple):
    """Where one tensor of a checkpoint lives: its file, where that file's data starts, its header entry."""

    path: str
    data_start: int
    info: TensorInfo

    @property
    def offset(self) -> int:
        """Absolute file offset of the tensor's first byte."""
        return self.data_start + self.info.begin


class _Layout(Protocol):
    """What a plan needs of an opened checkpoint (``Checkpoint`` or a distributed reader's own)."""

    @property
    def source(self) -> str: ...

    @property
    def tensors(self) -> Mapping[str, StoredTensor]: ...

    @property
    def aliases(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class PlannedRead:
    """One stored tensor to materialise: on ``device``, as ``dtype`` (None keeps the stored dtype)."""

    name: str
    stored: StoredTensor
    device: torch.device
    dtype: torch.dtype | None = None

    @property
    def stored_dtype(self) -> torch.dtype:
        return torch_view(self.stored.info, self.stored.path)[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch shape (packed sub-byte dtypes have fewer elements on the last dimension)."""
        return torch_view(self.stored.info, self.stored.path)[1]

    @property
    def zero_copy(self) -> bool:
        """A CPU read in the stored dtype: can be a window of a mapping of the file."""
        return self.device.type == "cpu" and self.dtype is None

    def request(self, fd: int | None = None) -> ReadRequest:
        """The ``ReadRequest`` that ``torchst.devices.stream_tensors`` executes (through ``fd`` when given)."""
        st = self.stored
        src, shape = torch_view(st.info, st.path)[:2]
        return ReadRequest(self.name, st.path, st.offset, st.info.nbytes, src, shape, self.device, self.dtype, fd)


@dataclass(frozen=True)
class LoadPlan:
    """Every read of one load, in file order, plus the aliases to expand afterwards.

    >>> plan = torchst.sharding.open_checkpoint("ckpt").plan(["lm_head.weight"], dtype=torch.bfloat16)
    >>> [(r.name, r.device.type, r.dtype) for r in plan.reads], plan.aliases
    ([('embed.weight', 'cpu', torch.bfloat16)], {'lm_head.weight': 'embed.weight'})
    """

    source: str
    reads: tuple[PlannedRead, ...]
    aliases: Mapping[str, str]  # alias -> stored name, for the aliases whose stored tensor is read
    backend: str = "mmap"

    @property
    def names(self) -> list[str]:
        """The stored names read, in file order."""
        return [r.name for r in self.reads]

    @property
    def nbytes(self) -> int:
        return sum(r.stored.info.nbytes for r in self.reads)


def plan_load(
    layout: _Layout,
    names: Collection[str] | None = None,
    *,
    device: DeviceLike = "cpu",
    device_map: DeviceMap | None = None,
    dtype: torch.dtype | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    backend: str = "mmap",
    known: Collection[str] | None = None,
) -> LoadPlan:
    """Plan the reads of ``names`` (default: every stored tensor) of an opened checkpoint.

    ``device_map={prefix: device}`` places names by their longest prefix (``device`` is then
    ignored); ``dtype`` casts floating tensors and ``dtypes`` sets the target per stored name.
    ``known`` are the names a ``device_map`` key may refer to besides the stored ones (e.g. every
    module of a model): a key that is a prefix of none of them is a typo, reported with close
    matches.  Every argument is validated here, before anything is read.

    >>> ckpt = torchst.sharding.open_checkpoint("ckpt")
    >>> plan = plan_load(ckpt, device_map={"layers": "cpu", "": "cpu"}, dtypes={"layers.0.weight": torch.float16})
    >>> [(r.name, r.dtype) for r in plan.reads]
    [('embed.weight', None), ('layers.0.weight', torch.float16), ('layers.1.weight', None)]
    >>> plan_load(ckpt, device_map={"layer": "cpu", "": "cpu"})
    Traceback (most recent call last):
    torchst.errors.DeviceMapError: device_map key(s) 'layer' (did you mean 'layers' or 'layers.1' or 'layers.0'?) match no module or tensor name; keys are module prefixes such as 'model.layers.0' (or "" for everything else)
    """
    check_backend(backend)
    check_dtype(dtype)
    wanted = _select(layout, names)
    if device_map is None:
        dev = check_device(device)
        devices = dict.fromkeys(wanted, dev)
    else:
        if isinstance(device_map, str):
            raise DeviceMapError(
                f"device_map={device_map!r} needs the model's structure; use torchst.load_model(model, ...) "
                "or pass a dict {module prefix: device}"
            )
        devices = resolve_device_map(wanted, device_map, known=[*layout.tensors, *layout.aliases, *(known or ())])
    reads = []
    for n in wanted:
        st = layout.tensors[n]
        src = from_code(st.info.dtype).require_torch(f"{st.path}: tensor {n!r}")
        want = dtypes.get(n) if dtypes else None
        if want is None and dtype is not None and src.is_floating_point:
            want = dtype
        reads.append(PlannedRead(n, st, devices[n], None if want == src else want))
    kept = set(wanted)
    wanted_aliases = {a: k for a, k in layout.aliases.items() if k in kept}
    return LoadPlan(layout.source, tuple(reads), wanted_aliases, backend)


def _select(layout: _Layout, names: Collection[str] | None) -> list[str]:
    if names is None:
        return list(layout.tensors)
    stored = {layout.aliases.get(n, n) for n in names}
    missing = sorted(n for n in stored if n not in layout.tensors)
    if missing:
        raise TensorNotFoundError(
            f"{layout.source}: checkpoint does not contain {missing[:5]} ({len(layout.tensors)} tensors stored)"
        )
    return [n for n in layout.tensors if n in stored]
