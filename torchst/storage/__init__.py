"""Where bytes live: crash-safe file and directory commits."""

from __future__ import annotations

from .atomic import atomic_write, fsync_dir, temp_path

__all__ = ["atomic_write", "fsync_dir", "temp_path"]
