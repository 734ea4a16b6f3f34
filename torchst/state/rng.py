"""Random number generator state: torch CPU (+ every CUDA device), Python ``random``, numpy.

Captured as plain values and tensors, so it goes through the typed JSON tree like any
other state (no pickle).  numpy is only touched when it is already imported or installed.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["capture_rng", "check_rng", "restore_rng"]


def _numpy() -> Any:
    if "numpy" in sys.modules:
        return sys.modules["numpy"]
    if importlib.util.find_spec("numpy") is None:
        return None
    import numpy

    return numpy


def capture_rng() -> dict[str, Any]:
    """Every global generator's state, ready for the typed tree.

    >>> rng = capture_rng(); a = torch.rand(1); restore_rng(rng)
    >>> torch.equal(torch.rand(1), a)
    True
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    return state


def check_rng(state: Any, *, where: str = "rng") -> None:
    """Raise ``CheckpointError`` if ``restore_rng(state)`` could not restore every generator.

    >>> check_rng(capture_rng())
    """
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor):
        raise CheckpointError(f"{where}: the saved entry is not an RNG state (no 'torch' key)")
    cuda = state.get("cuda")
    if cuda and (not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda)):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise CheckpointError(
            f"{where}: the checkpoint holds RNG state for {len(cuda)} CUDA device(s) but {have} are visible; "
            "restore with restore_rng=False to skip RNG state"
        )
    py = state.get("python")
    if py is not None and not (isinstance(py, tuple) and len(py) == 3):
        raise CheckpointError(f"{where}: the saved Python RNG state is malformed")


def restore_rng(state: Any, *, where: str = "rng") -> None:
    """Set every global generator recorded in ``state`` (from ``capture_rng``).

    >>> restore_rng(capture_rng())
    """
    check_rng(state, where=where)
    torch.set_rng_state(state["torch"].cpu())
    py = state.get("python")
    if py is not None:
        version, internal, gauss = py
        random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda:
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
    np_state = state.get("numpy")
    np = _numpy() if np_state is not None else None
    if np is not None and np_state is not None:
        keys = np.asarray(np_state["keys"], dtype=np.uint32)
        np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
