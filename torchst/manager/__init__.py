"""CheckpointManager: numbered steps, async saves, atomic commits, retention policies, resume."""

from __future__ import annotations

from .manager import CheckpointManager
from .retention import AnyOf, KeepBest, KeepEvery, KeepLast, RetentionPolicy, StepInfo

__all__ = ["AnyOf", "CheckpointManager", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "StepInfo"]
