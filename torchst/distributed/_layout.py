"""Where each rank's piece of a tensor sits in the full tensor, and in the file's bytes.

A piece is a box: per-dimension global offsets and sizes.  A DTensor's local tensor is one box
(``Shard``/``Replicate`` on any mesh, including uneven shards); a plain tensor is the whole box.
In a row-major file a box is a set of runs: one contiguous run for a ``Shard(0)`` piece, one run
per leading index when a later dimension is split (``Shard(1)`` of a matrix: one run per row).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import SerializationError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


class Piece:
    """A copy of one rank's piece of a full tensor, taken while training goes on (async saves).

    Written like the tensor it was taken from without touching its ``DeviceMesh``: the box is
    resolved (and ``Partial`` placements reduced) when the copy is taken, on the training thread.

    >>> piece = Piece(torch.zeros(2, 4), ((2, 0), (2, 4)), (4, 4))
    """

    def __init__(self, local: torch.Tensor, box: Box, shape: tuple[int, ...]) -> None:
        self.local = local
        self.box = box
        self.shape = torch.Size(shape)
        self.dtype = local.dtype


def local_box(t: torch.Tensor | Piece, name: str) -> tuple[torch.Tensor, Box]:
    """This rank's tensor and its box in the full tensor.

    ``Partial`` placements are reduced first (a collective on the DTensor's mesh, which every
    rank of the mesh reaches in the same order because state dicts are walked in the same order).
    """
    if isinstance(t, Piece):
        return t.local, t.box
    if not is_dtensor(t):
        return t, ((0,) * t.dim(), tuple(t.shape))
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dt: Any = t
    if any(p.is_partial() for p in dt.placements):
        dt = dt.redistribute(dt.device_mesh, [Replicate() if p.is_partial() else p for p in dt.placements])
    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    local = dt.to_local()
    if tuple(local.shape) != tuple(shape):
        raise SerializationError(
            f"tensor {name!r}: the local shard has shape {list(local.shape)} but its placements "
            f"{list(dt.placements)} on mesh {dt.device_mesh} give {list(shape)}; this layout is not supported"
        )
    return local, (tuple(offset), tuple(shape))


def box_numel(box: Box) -> int:
    return math.prod(box[1])


def contains(outer: Box, inner: Box) -> bool:
    return all(oo <= io and io + isz <= oo + osz for oo, osz, io, isz in zip(outer[0], outer[1], inner[0], inner[1]))


def overlaps(a: Box, b: Box) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]))


def intersect(a: Box, b: Box) -> Box | None:
    offs, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    return tuple(offs), tuple(sizes)


def split_box(box: Box, parts: int) -> list[Box]:
    """Split along the first dimension with at least ``parts`` entries into near-equal slabs."""
    offs, sizes = box
    for d, n in enumerate(sizes):
        if n >= parts:
            out = []
            base, extra = divmod(n, parts)
            start = offs[d]
            for i in range(parts):
                k = base + (1 if i < extra else 0)
                out.append((offs[:d] + (start,) + offs[d + 1 :], sizes[:d] + (k,) + sizes[d + 1 :]))
                start += k
            return out
    return [box]


def run_count(global_shape: Sequence[int], box: Box) -> int:
    """How many runs ``runs`` yields for ``box`` (without producing them)."""
    sizes = box[1]
    ndim = len(global_shape)
    if ndim == 0:
        return 1
    if 0 in sizes:
        return 0
    k = ndim - 1
    while k > 0 and sizes[k] == global_shape[k]:
        k -= 1
    return math.prod(sizes[:k])


def runs(global_shape: Sequence[int], box: Box, itemsize: int) -> Iterator[tuple[int, int, int]]:
    """``(byte offset in the full tensor, byte offset in the box's row-major copy, length)`` runs."""
    offs, sizes = box
    ndim = len(global_shape)
    if ndim == 0:
        yield 0, 0, itemsize
        return
    if 0 in sizes:
        return
    gstride = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        gstride[d] = gstride[d + 1] * global_shape[d + 1]
    # k: the outermost dimension from which the box is one contiguous run of the full tensor
    k = ndim - 1
    while k > 0 and sizes[k] == global_shape[k]:
        k -= 1
    run = sizes[k] * gstride[k] * itemsize
    lstride = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        lstride[d] = lstride[d + 1] * sizes[d + 1]
    base = sum(o * g for o, g in zip(offs, gstride))
    for idx in itertools.product(*(range(s) for s in sizes[:k])):
        g = base + sum(i * gs for i, gs in zip(idx, gstride))
        loc = sum(i * ls for i, ls in zip(idx, lstride))
        yield g * itemsize, loc * itemsize, run
