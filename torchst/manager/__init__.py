"""CheckpointManager: numbered steps, async saves, atomic commits, retention policies, resume.

``layout`` (the on-disk names and the commit protocol) needs no torch; the manager itself is
imported on first use, so header-only tools can read a step's layout without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .retention import AnyOf, KeepBest, KeepEvery, KeepLast, RetentionPolicy, StepInfo

if TYPE_CHECKING:
    from .manager import CheckpointManager

__all__ = ["AnyOf", "CheckpointManager", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "StepInfo"]


def __getattr__(name: str) -> Any:
    if name != "CheckpointManager":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module(".manager", __name__).CheckpointManager
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
