"""Progress bars for long operations, through ``tqdm`` when it is installed.

One switch for the whole library: an API call shows a bar when it is passed
``progress=True``, or when ``progress`` is left at ``None`` and the environment variable
``TORCHST_PROGRESS`` is ``1`` (``0`` or unset keeps it quiet). The CLI passes
``progress=True`` on a TTY unless ``-q`` was given. ``tqdm`` is optional (the ``cli``
extra installs it); asking for a bar without it logs one warning and carries on quietly.
This module imports nothing from torch.

>>> from torchst._progress import progress
>>> with progress(total=3, desc="Saving", unit="tensor", enabled=False) as bar:
...     for _ in range(3):
...         bar.update(1)
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["ENV_VAR", "Bar", "progress", "progress_enabled"]

ENV_VAR = "TORCHST_PROGRESS"
logger = logging.getLogger("torchst")
_warned_missing = False


class Bar(Protocol):
    """What callers use of a bar: ``update(n)`` and ``set_postfix_str(s)``."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...


class _NullBar:
    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass


def progress_enabled(progress: bool | None) -> bool:
    """Resolve an API's ``progress=`` argument: explicit wins, ``None`` reads ``TORCHST_PROGRESS``."""
    if progress is not None:
        return bool(progress)
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def progress(
    *,
    total: float | None,
    desc: str,
    unit: str = "B",
    enabled: bool | None = None,
    file: Any = None,
) -> Iterator[Bar]:
    """A bar over ``total`` units (bytes by default: scaled to kB/MB/GB), or a do-nothing one.

    The bar is drawn from the first moment (no delay threshold) and closed on exit, error or not.
    """
    global _warned_missing
    if not progress_enabled(enabled):
        yield _NullBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            logger.warning("progress bars need tqdm: pip install 'torchst[cli]' (or tqdm)")
        yield _NullBar()
        return
    bytes_unit = unit == "B"
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=bytes_unit,
        unit_divisor=1000,
        file=file if file is not None else sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1,
        delay=0,
        leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()
