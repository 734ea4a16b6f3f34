"""Save state dicts as one file or a sharded directory, crash-safely and under live readers.

Saving a directory (a crash after any step leaves the old or the new checkpoint loadable):

1. every shard is written to a hidden temporary name (``.tmp-<token>-<shard>``);
2. shards whose final names the checkpoint being replaced does not use are renamed into place.
   If the old checkpoint does use a final name, an index naming the temporary files is committed
   first (the new checkpoint is now complete) and the final names are then hard-linked over;
3. **commit point**: the index is written atomically.  A single-file checkpoint instead commits
   with the atomic rename of ``model.safetensors``, then unlinks an older index (an index takes
   precedence over ``model.safetensors`` when both exist);
4. files of the old checkpoint and stale temporaries are removed.

A save killed before step 4 leaves its hidden temporaries behind (as large as the shards); the
next successful save removes them.

Live readers (the reader's half is in ``torchst.sharding.checkpoint``): the writer changes the
identity of the index before it touches any name a reader of the current index may open.  New
names are created freely (no reader of the current index opens them); a name the current
checkpoint uses is only overwritten after a transitional index, naming the temporaries, replaced
the current one (step 2), and old files are only deleted after the commit (step 4).  The index
is always replaced by rename, never rewritten in place, so its inode changes with every commit.
Switching between one file and shards keeps one of the two anchors present at every moment
(an index is committed before ``model.safetensors`` is deleted, and the reverse).  A reader
opens everything it needs, then checks that the anchor it started from is still the one in
place; if not it starts again.  Files stay valid for whoever holds them open or mapped.

One writer per directory at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from .._progress import Bar
from .._progress import progress as show_progress
from ..dedup import ALIASES_KEY, TiedKeys, alias_metadata, deduplicate
from ..errors import SerializationError, ShardIndexError, TorchstError
from ..format.writer import WritePlan, plan_write, write_tensors
from ..storage.atomic import atomic_write, fsync_dir, open_output, temp_path, write_error
from ..storage.remote import is_url
from .checkpoint import Checkpoint, load_state_dict, open_checkpoint
from .debris import ATOMIC_TEMP, SHARD_TEMP, save_lock
from .index import ShardIndex, index_filename, read_index
from .plan import SINGLE_FILE, ShardPlan, plan_shards

# Checkpoint, open_checkpoint and load_state_dict live in .checkpoint; re-exported for old imports.
__all__ = ["Checkpoint", "SaveResult", "load_state_dict", "open_checkpoint", "save_state_dict"]

PathLike = str | os.PathLike[str]
# Shards written concurrently: enough to use every core for page-cache copies, few enough to keep
# accelerator staging buffers (one per writer) bounded.
SHARD_WRITERS = 4
_TEMP = SHARD_TEMP
_ATOMIC_TEMP = ATOMIC_TEMP
_OURS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


class SaveResult(NamedTuple):
    """What a save wrote: file names (relative to the directory), the index name, the aliases."""

    directory: str
    files: tuple[str, ...]
    index_file: str | None
    aliases: dict[str, str]
    total_size: int


def _file_metadata(metadata: Mapping[str, str] | None, aliases: Mapping[str, str]) -> dict[str, str]:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise SerializationError(f"metadata must be a dict of str -> str, found {type(metadata).__name__}")
    user = dict(metadata or {})
    for k, v in user.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SerializationError(f"metadata must map str -> str, found {k!r}: {v!r} ({type(v).__name__})")
    if ALIASES_KEY in user:
        raise SerializationError(f"metadata key {ALIASES_KEY!r} is reserved for the alias record torchst writes")
    recorded = alias_metadata(aliases)
    out = {"format": "pt"}
    out.update({k: v for k, v in recorded.items() if k != ALIASES_KEY})
    out.update(user)  # like safetensors.torch.save_model, user entries win over informational ones
    if recorded:
        out[ALIASES_KEY] = recorded[ALIASES_KEY]
    return out


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path_or_directory: PathLike,
    *,
    max_shard_size: int | str | None = "5GB",
    metadata: Mapping[str, str] | None = None,
    tied_keys: TiedKeys | None = None,
    fsync: bool = False,
    checksums: bool = True,
    progress: bool | None = None,
) -> SaveResult:
    """Save ``state_dict``: a path ending in ``.safetensors`` is one file, anything else a directory.

    Shared tensors are stored once (see ``torchst.dedup``) and recorded as aliases.  A directory
    is split into ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` when
    it exceeds ``max_shard_size`` (one shard = ``model.safetensors``, ``None`` = never split).
    ``fsync=True`` also makes the save survive power loss, not just a crashed process.
    ``checksums`` (on by default) records each tensor's CRC32C in its file's ``__metadata__``,
    computed as the bytes are written, for ``load_state_dict(..., verify=True)`` and
    ``torchst verify``; ``checksums=False`` writes exactly what ``safetensors`` would.
    ``progress=True`` (or ``TORCHST_PROGRESS=1``) shows a bar of the bytes written.

    >>> torchst.save_state_dict(model.state_dict(), "my-ckpt", max_shard_size="500MB").files
    ('model.safetensors',)
    >>> sorted(torchst.load_state_dict("my-ckpt"))
    ['fc.bias', 'fc.weight']
    """
    dedup = deduplicate(state_dict, tied_keys=tied_keys)
    # safetensors stores dense row-major bytes; copy only the tensors that are not (copy #1).
    tensors = {n: t if t.is_contiguous() else t.contiguous() for n, t in dedup.tensors.items()}
    path = os.fspath(path_or_directory)
    if is_url(path):
        from .remote import save_remote

        def file_metadata(names: Collection[str]) -> dict[str, str]:
            kept = set(names)
            return _file_metadata(metadata, {a: k for a, k in dedup.aliases.items() if k in kept})

        _file_metadata(metadata, {})  # validate before anything is uploaded
        files, idx, size = save_remote(
            tensors, path, file_metadata=file_metadata, max_shard_size=max_shard_size, checksums=checksums
        )
        base = path.rsplit("/", 1)[0] if path.endswith(".safetensors") else path
        return SaveResult(base, files, idx, dedup.aliases, size)
    if path.endswith(".safetensors"):
        md = _file_metadata(metadata, dedup.aliases)
        plan = plan_write(tensors, md, checksums=checksums)
        with (
            _progress(plan.total_size, path, progress) as bar,
            open_output(path, size=plan.total_size, fsync=fsync) as f,
        ):
            write_tensors(f, plan, on_bytes=bar.update)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        return SaveResult(os.path.dirname(path), (os.path.basename(path),), None, dedup.aliases, size)
    return _save_directory(tensors, dedup.aliases, path, max_shard_size, metadata, fsync, checksums, progress)


def _progress(total: int, path: str, enabled: bool | None) -> AbstractContextManager[Bar]:
    return show_progress(total=total, desc=f"Saving {os.path.basename(path.rstrip(os.sep)) or path}", enabled=enabled)


def _save_directory(
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    directory: str,
    max_shard_size: int | str | None,
    metadata: Mapping[str, str] | None,
    fsync: bool,
    checksums: bool,
    progress: bool | None,
) -> SaveResult:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SerializationError(
            f"{directory} exists and is not a directory; to save one file give a path ending in '.safetensors'"
        )
    plan = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_size)
    _file_metadata(metadata, {})  # validate before creating anything
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise write_error(e, directory) from e
    with save_lock(directory):  # shared: tells cleanup() a save is running here
        return _write_and_commit(tensors, aliases, directory, plan, metadata, fsync, checksums, progress)


def _write_and_commit(
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    directory: str,
    plan: ShardPlan,
    metadata: Mapping[str, str] | None,
    fsync: bool,
    checksums: bool,
    progress: bool | None,
) -> SaveResult:
    old = _committed_files(directory)
    token = uuid.uuid4().hex[:12]
    temps = {fn: f".tmp-{token}-{fn}" for fn in plan.filenames}
    written: list[str] = []
    lock = threading.Lock()

    def plan_shard(names: Sequence[str]) -> WritePlan:
        kept = set(names)
        md = _file_metadata(metadata, {a: k for a, k in aliases.items() if k in kept})
        return plan_write({n: tensors[n] for n in names}, md, checksums=checksums)

    wplans = [plan_shard(names) for names in plan.shards]

    def write_shard(fn: str, wplan: WritePlan, bar: Bar) -> None:
        tmp = os.path.join(directory, temps[fn])
        written.append(tmp)  # list.append is atomic; cleanup below sees every temp file
        # The shard is committed later under its final name, which is what errors report.
        with open_output(
            tmp, size=wplan.total_size, fsync=fsync, replace=False, shown_as=os.path.join(directory, fn)
        ) as f:
            write_tensors(f, wplan, on_bytes=lambda n: _locked_update(lock, bar, n))

    try:
        # Shards are independent files: writing several at once lets the kernel copy into the
        # page cache (and the disk queue fsyncs) on more than one core.  The pool is joined
        # before anything is committed or cleaned up.
        with (
            _progress(sum(w.total_size for w in wplans), directory, progress) as bar,
            ThreadPoolExecutor(max_workers=min(SHARD_WRITERS, len(plan.filenames))) as pool,
        ):
            futures = [pool.submit(write_shard, fn, wplan, bar) for fn, wplan in zip(plan.filenames, wplans)]
        for fut in futures:
            fut.result()  # re-raises the first failure
        _commit(directory, plan.filenames, temps, plan.weight_map, plan.total_size, old, fsync)
    except BaseException as e:
        for tmp in written:
            if os.path.exists(tmp) and not _referenced(directory, os.path.basename(tmp)):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, TorchstError):
            raise write_error(e, directory) from e  # a rename or link of the commit: name the directory
        raise
    keep = set(plan.filenames) | ({index_filename()} if plan.is_sharded else set())
    _cleanup(directory, keep, old)
    idx = index_filename() if plan.is_sharded else None
    return SaveResult(directory, plan.filenames, idx, dict(aliases), plan.total_size)


def _locked_update(lock: threading.Lock, bar: Bar, n: int) -> None:
    with lock:  # shard writers report from several threads
        bar.update(n)


def _commit(
    directory: str,
    filenames: tuple[str, ...],
    temps: Mapping[str, str],
    weight_map: Mapping[str, str],
    total_size: int,
    old: Collection[str],
    fsync: bool,
) -> None:
    join = os.path.join
    index_path = join(directory, index_filename())
    if len(filenames) == 1 and filenames[0] == SINGLE_FILE:
        single, tmp = join(directory, SINGLE_FILE), join(directory, temps[SINGLE_FILE])
        if index_filename() in old and SINGLE_FILE in old:
            # The committed index reads shards from model.safetensors: retarget it to the
            # temporary file before that name is overwritten (the temporary is cleaned up later).
            _write_index(index_path, ShardIndex.build(dict.fromkeys(weight_map, temps[SINGLE_FILE]), total_size), fsync)
            _link_over(tmp, single)
        else:
            os.replace(tmp, single)
        if fsync:
            fsync_dir(directory)
        if os.path.exists(index_path):
            os.unlink(index_path)  # commit point: model.safetensors is what loaders find now
        return
    if any(fn in old for fn in filenames):
        # The old checkpoint uses these names: make the new one live under its temporary names
        # first, so overwriting the final names can never leave a mix of old and new shards.
        transitional = {n: temps[fn] for n, fn in weight_map.items()}
        _write_index(index_path, ShardIndex.build(transitional, total_size), fsync)
        for fn in filenames:
            _link_over(join(directory, temps[fn]), join(directory, fn))
    else:
        for fn in filenames:
            os.replace(join(directory, temps[fn]), join(directory, fn))
    if fsync:
        fsync_dir(directory)
    _write_index(index_path, ShardIndex.build(weight_map, total_size), fsync)  # commit point


def _write_index(path: str, index: ShardIndex, fsync: bool) -> None:
    with atomic_write(path, fsync=fsync) as f:
        f.write(index.to_json().encode("utf-8"))


def _link_over(src: str, dst: str) -> None:
    tmp = temp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links: one extra copy of the shard
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _committed_files(directory: str) -> set[str]:
    """Names the checkpoint currently in ``directory`` needs (empty when there is none)."""
    index_path = os.path.join(directory, index_filename())
    if os.path.exists(index_path):
        try:
            return {index_filename(), *read_index(index_path).weight_map.values()}
        except (ShardIndexError, OSError):
            return {index_filename()}
    return {SINGLE_FILE} if os.path.exists(os.path.join(directory, SINGLE_FILE)) else set()


def _referenced(directory: str, name: str) -> bool:
    return name in _committed_files(directory)


def _cleanup(directory: str, keep: set[str], old: set[str]) -> None:
    for name in sorted(old | set(os.listdir(directory))):
        if name in keep:
            continue
        if name in old or _TEMP.match(name) or _ATOMIC_TEMP.match(name) or _OURS.match(name):
            try:
                os.unlink(os.path.join(directory, name))
            except (FileNotFoundError, IsADirectoryError):
                pass
