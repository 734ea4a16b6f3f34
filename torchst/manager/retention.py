"""Retention policies: which committed steps to keep.  Small objects, combinable with ``|``.

A step survives when *any* policy keeps it; the newest step always survives, and only
committed steps are ever considered.

>>> policy = KeepLast(3) | KeepEvery(1000) | KeepBest(2, "val_loss")
>>> sorted(policy.keep([StepInfo(s, {"val_loss": 1 / s}) for s in range(1, 2001)]))
[1000, 1998, 1999, 2000]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SerializationError

__all__ = [
    "DEFAULT_KEEP_LAST",
    "AnyOf",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "RetentionPolicy",
    "StepInfo",
    "check_metrics",
    "resolve_retention",
]

logger = logging.getLogger(__name__)
DEFAULT_KEEP_LAST = 3


@dataclass(frozen=True)
class StepInfo:
    """A committed step and the metrics saved with it."""

    step: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


class RetentionPolicy:
    """Base class: ``keep(steps)`` returns the step numbers this policy wants kept."""

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        raise NotImplementedError

    def __or__(self, other: RetentionPolicy) -> AnyOf:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return AnyOf(*_parts(self), *_parts(other))


def _parts(p: RetentionPolicy) -> tuple[RetentionPolicy, ...]:
    return p.policies if isinstance(p, AnyOf) else (p,)


def _positive(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, found {n!r}")
    return n


@dataclass(frozen=True)
class KeepLast(RetentionPolicy):
    """Keep the ``n`` highest steps.

    >>> KeepLast(2).keep([StepInfo(1), StepInfo(2), StepInfo(3)])
    {2, 3}
    """

    n: int

    def __post_init__(self) -> None:
        _positive("KeepLast(n)", self.n)

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return set(sorted(s.step for s in steps)[-self.n :])


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Keep every step that is a multiple of ``k`` (long-term snapshots).

    >>> KeepEvery(10).keep([StepInfo(5), StepInfo(10), StepInfo(20)])
    {10, 20}
    """

    k: int

    def __post_init__(self) -> None:
        _positive("KeepEvery(k)", self.k)

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {s.step for s in steps if s.step % self.k == 0}


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """Keep the ``n`` steps with the best value of ``metric`` (``mode="min"`` or ``"max"``).

    Steps saved without the metric, or with NaN, are never "best".  ``CheckpointManager.save``
    refuses ``metrics`` that lack it (a typo would silently rank nothing) and logs a warning
    for steps saved with no metrics at all; those are kept only by the other policies.

    >>> KeepBest(1, "loss").keep([StepInfo(1, {"loss": 0.5}), StepInfo(2, {"loss": 0.7})])
    {1}
    """

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        _positive("KeepBest(n)", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest mode must be 'min' or 'max', found {self.mode!r}")

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        scored = []
        for s in steps:
            v = s.metrics.get(self.metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                scored.append((v if self.mode == "min" else -v, -s.step, s.step))  # ties: newer wins
        return {step for _, _, step in sorted(scored)[: self.n]}


class AnyOf(RetentionPolicy):
    """Keep a step when any of ``policies`` keeps it; what ``a | b`` builds.

    >>> AnyOf(KeepLast(1), KeepEvery(10)).keep([StepInfo(10), StepInfo(11), StepInfo(12)])
    {10, 12}
    """

    def __init__(self, *policies: RetentionPolicy) -> None:
        for p in policies:
            if not isinstance(p, RetentionPolicy):
                raise TypeError(f"AnyOf takes retention policies, found {type(p).__name__}: {p!r}")
        self.policies: tuple[RetentionPolicy, ...] = policies

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(steps)
        return out

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies)) or "AnyOf()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnyOf) and self.policies == other.policies

    def __hash__(self) -> int:
        return hash(self.policies)


def resolve_retention(
    keep_last: int | None, keep: RetentionPolicy | None, *, keep_last_given: bool
) -> RetentionPolicy | None:
    """The policy a manager applies: ``keep`` alone, ``KeepLast(keep_last)``, or both.

    The default ``keep_last`` only applies when no ``keep`` policy is given; an explicit
    ``keep_last=N`` next to ``keep=P`` means ``KeepLast(N) | P`` (as Orbax combines
    ``max_to_keep`` with ``keep_period``).  None means no deletion at all.

    >>> resolve_retention(3, KeepLast(2), keep_last_given=False)
    KeepLast(n=2)
    """
    if keep is not None and not isinstance(keep, RetentionPolicy):
        raise TypeError(f"keep must be a retention policy such as KeepEvery(1000), found {keep!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)):
        raise TypeError(f"keep_last must be an int >= 1 or None, found {keep_last!r}")
    if keep is not None and not keep_last_given:
        return keep
    last = None if keep_last is None else KeepLast(keep_last)
    if last is None:
        return keep
    return last if keep is None else AnyOf(last, *_parts(keep))


def _ranked(policy: RetentionPolicy | None) -> list[KeepBest]:
    if isinstance(policy, KeepBest):
        return [policy]
    if isinstance(policy, AnyOf):
        return [p for part in policy.policies for p in _ranked(part)]
    return []


def check_metrics(policy: RetentionPolicy | None, step: int, metrics: Mapping[str, Any] | None) -> list[str]:
    """Refuse metrics that a ``KeepBest`` of ``policy`` cannot rank; return the metrics absent.

    A step saved with ``metrics`` that lack a ranked metric is a mistake (a typo such as
    ``"val loss"``), and raises before anything is written.  A step saved without any
    metrics cannot be ranked: the caller logs that it is kept only by the other policies.

    >>> check_metrics(KeepBest(2, "val_loss"), 10, {"val_loss": 0.3})
    []
    """
    absent = []
    for best in _ranked(policy):
        if not metrics:
            absent.append(best.metric)
            continue
        if best.metric not in metrics:
            raise SerializationError(
                f"step {step}: metrics {sorted(metrics)} have no {best.metric!r}, which {best!r} ranks steps by; "
                f"report it (metrics={{{best.metric!r}: value, ...}}), fix the name, or pass metrics=None on "
                "steps that were not evaluated (they are then kept only by the other policies)"
            )
        v = metrics[best.metric]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SerializationError(
                f"step {step}: metric {best.metric!r} is {v!r} ({type(v).__name__}); {best!r} needs a number "
                "(use .item() for a tensor)"
            )
    return absent
