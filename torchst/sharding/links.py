"""Which symbolic links a checkpoint may contain (torch-free, shared by loaders and the CLI).

The path the user gives is followed wherever it leads: naming it is trusting it.  Files found
*inside* a checkpoint directory (the index, its shards, a ``model.safetensors``) must resolve

- inside that directory (links between its own files are fine), or
- into the ``blobs/`` folder of a Hugging Face cache, when the directory is (inside) a
  ``snapshots/<rev>`` folder of one: ``snapshots/<rev>/… -> ../../blobs/<hash>`` is how
  ``huggingface_hub`` stores every downloaded file, or
- under a trusted root: ``trusted_roots=[...]`` of the loading call, or the
  ``TORCHST_TRUSTED_ROOTS`` environment variable (paths separated by ``os.pathsep``).

Anything else is refused with a ``ShardIndexError``: a downloaded or unpacked checkpoint must
not make a loader read files elsewhere on the machine (``/etc``, another user's data).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import ShardIndexError

__all__ = ["TRUSTED_ROOTS_ENV", "check_link", "trusted_roots_from"]

TRUSTED_ROOTS_ENV = "TORCHST_TRUSTED_ROOTS"
PathLike = str | os.PathLike[str]
_HF_KINDS = ("models", "datasets", "spaces")  # huggingface_hub names repo folders <kind>--<org>--<name>


def trusted_roots_from(trusted_roots: Iterable[PathLike] | None) -> tuple[str, ...]:
    """Real paths of ``trusted_roots`` plus those in ``$TORCHST_TRUSTED_ROOTS``.

    >>> trusted_roots_from(["/"])
    ('/',)
    """
    roots = [os.fspath(r) for r in trusted_roots or ()]
    roots += [r for r in os.environ.get(TRUSTED_ROOTS_ENV, "").split(os.pathsep) if r]
    return tuple(os.path.realpath(r) for r in roots)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _hf_blobs(base: str) -> str | None:
    """``<repo>/blobs`` when ``base`` is (inside) a ``<repo>/snapshots/<rev>`` folder of a Hugging Face cache."""
    d = base
    while True:
        parent = os.path.dirname(d)
        if parent == d:
            return None
        repo = os.path.dirname(parent)
        if os.path.basename(parent) == "snapshots" and os.path.basename(repo).split("--")[0] in _HF_KINDS:
            return os.path.join(repo, "blobs")
        d = parent


def check_link(directory: str, name: str, roots: tuple[str, ...], where: str) -> str:
    """The real path of ``directory/name`` if the symlink policy allows it (see the module docstring).

    >>> os.symlink("/etc/hostname", "ckpt/evil.safetensors")
    >>> check_link("ckpt", "evil.safetensors", (), "ckpt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    torchst.errors.ShardIndexError: ckpt: 'evil.safetensors' in ckpt is a symbolic link leading to /etc/hostname, ...
    """
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    base = os.path.realpath(directory)
    if _within(real, base) or any(_within(real, r) for r in roots):
        return real
    blobs = _hf_blobs(base)
    if blobs is not None and os.path.dirname(real) == blobs:
        return real
    raise ShardIndexError(
        f"{where}: {name!r} in {directory or '.'} is a symbolic link leading to {real}, outside the checkpoint "
        "directory; torchst follows links inside a checkpoint only when they stay in it or lead into a Hugging Face "
        f"cache (snapshots/<rev>/… -> ../../blobs/…).  If you trust {os.path.dirname(real)}, pass "
        f"trusted_roots=[{os.path.dirname(real)!r}] (or set {TRUSTED_ROOTS_ENV}), or open the file itself"
    )
