"""Where bytes live: the one write path (create, write, fsync, commit) and raw file I/O."""

from __future__ import annotations

from .atomic import OutputFile, atomic_write, describe_os_error, fsync_dir, open_output, temp_path, write_error

__all__ = ["OutputFile", "atomic_write", "describe_os_error", "fsync_dir", "open_output", "temp_path", "write_error"]
