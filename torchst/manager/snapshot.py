"""Host snapshots for async saves: one reusable arena, pinned when the source is on CUDA.

``save()`` copies every tensor of the step into the arena and returns; the background
writer reads only the arena, so the caller may update its parameters right away.  The arena
is sized to one checkpoint and reused by the next save (at most one save is in flight), so
host memory stays bounded at one checkpoint however long training runs.
"""

from __future__ import annotations

import torch

from ..state import FileSpec

__all__ = ["HostArena"]

_ALIGN = 64  # every snapshot starts on a cache line; all dtypes are aligned for kernels


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class HostArena:
    """A growable, reusable host buffer that snapshots the tensors of ``FileSpec``s.

    >>> arena = HostArena()
    >>> files = arena.snapshot({"state.safetensors": FileSpec({"w": torch.ones(4)})})
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._pinned = False

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def _reserve(self, nbytes: int, pin: bool) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < nbytes or (pin and not self._pinned):
            self._buf = None  # drop the old arena before allocating the new one (peak = one arena)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
            self._buf, self._pinned = buf, pin
        return buf

    def snapshot(self, files: dict[str, FileSpec]) -> dict[str, FileSpec]:
        """The same files with every tensor copied into the arena (copy #1 of an async save)."""
        total = 0
        pin = False
        for spec in files.values():
            for t in spec.tensors.values():
                total += _aligned(t.numel() * t.element_size())
                pin = pin or t.device.type == "cuda"
        buf = self._reserve(total, pin and torch.cuda.is_available())
        out: dict[str, FileSpec] = {}
        offset = 0
        cuda_used: set[torch.device] = set()
        for rel, spec in files.items():
            copies: dict[str, torch.Tensor] = {}
            for name, t in spec.tensors.items():
                n = t.numel() * t.element_size()
                dst = buf[offset : offset + n].view(t.dtype).view(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
                if n:
                    on_cuda = t.device.type == "cuda"
                    if on_cuda:
                        cuda_used.add(t.device)
                    dst.copy_(t.detach(), non_blocking=on_cuda)
                copies[name] = dst
                offset += _aligned(n)
            out[rel] = FileSpec(copies, dict(spec.metadata))
        for dev in cuda_used:  # non_blocking copies run on each source device's stream: all must land
            torch.cuda.synchronize(dev)
        return out
