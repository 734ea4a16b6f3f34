"""CheckpointManager: numbered steps, async saves, atomic commits, retention policies, resume.

``layout`` (the on-disk names and the commit protocol) needs no torch; the manager itself is
imported on first use, so header-only tools can read a step's layout without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .retention import AnyOf, KeepBest, KeepEvery, KeepLast, RetentionPolicy, StepInfo

if TYPE_CHECKING:
    from .manager import CheckpointManager

__all__ = ["AnyOf", "CheckpointManager", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "StepInfo"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), {"CheckpointManager": ".manager"}, __all__)
