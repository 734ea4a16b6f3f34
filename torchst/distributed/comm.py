"""Bounded collectives on a torch.distributed process group: JSON bytes and status votes.

Metadata travels as UTF-8 JSON in uint8 tensors (two all-gathers: lengths, then padded bytes),
never through ``all_gather_object`` (which pickles).  Every collective waits with a timeout, so
a rank that died or hangs turns into a ``CheckpointError`` on the others instead of a hang.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)
T = TypeVar("T")


class Group:
    """A process group with this rank's coordinates and a timeout applied to every collective."""

    def __init__(self, process_group: Any | None, timeout: timedelta | float | None, what: str) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise CheckpointError(
                f"{what} is collective and needs torch.distributed: call "
                "torch.distributed.init_process_group(...) on every rank first, or use the single-process "
                "torchst API"
            )
        self.pg = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.pg)
        if self.rank < 0:
            raise CheckpointError(f"{what}: this process (global rank {dist.get_rank()}) is not in the process group")
        self.size = dist.get_world_size(self.pg)
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        self.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        backend = str(dist.get_backend(self.pg))
        # NCCL only moves accelerator memory; gloo (and mixed "cpu:gloo,cuda:nccl") take CPU tensors.
        if "nccl" in backend and "gloo" not in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.what = what

    def _wait(self, work: Any, step: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:  # timeouts and lost peers (DistBackendError is a RuntimeError)
            raise CheckpointError(
                f"{self.what}: rank {self.rank} lost contact with the other ranks during {step} ({e}); "
                f"another rank failed, was killed or did not reach this point within {self.timeout}. "
                "Nothing was committed; the previous checkpoint is intact. Restart the process group "
                "before further collectives"
            ) from None

    def all_gather_bytes(self, data: bytes, step: str) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        self._wait(dist.all_gather(sizes, n, group=self.pg, async_op=True), step)
        lengths = [int(s.item()) for s in sizes]
        width = max(lengths)
        buf = torch.zeros(width, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        out = [torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.size)]
        self._wait(dist.all_gather(out, buf, group=self.pg, async_op=True), step)
        return [bytes(o[:k].cpu().numpy().tobytes()) for o, k in zip(out, lengths)]

    def all_gather_json(self, obj: Any, step: str) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order."""
        raw = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
        return [json.loads(b.decode("utf-8")) for b in self.all_gather_bytes(raw, step)]

    def vote(self, error: BaseException | None, step: str) -> None:
        """Raise ``CheckpointError`` on every rank when ``error`` is set on any rank."""
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports = self.all_gather_json(report, step)
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if failed:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed[:4])
            raise CheckpointError(f"{self.what} failed during {step} on {len(failed)} of {self.size} rank(s): {detail}")

    def run(self, fn: Callable[[], T], step: str) -> T:
        """Run ``fn`` on every rank, then agree: every rank raises if any rank's ``fn`` raised."""
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as e:
            logger.debug("%s: rank %d failed during %s", self.what, self.rank, step, exc_info=True)
            error = e
        try:
            self.vote(error, step)
        except CheckpointError as agreed:
            raise agreed from error
        return result  # type: ignore[return-value]
