"""Save and load state dicts as one file or a sharded directory, crash-safely.

Saving a directory (a crash after any step leaves the old or the new checkpoint loadable):

1. every shard is written to a hidden temporary name (``.tmp-<token>-<shard>``);
2. shards whose final names the checkpoint being replaced does not use are renamed into place.
   If the old checkpoint does use a final name, an index naming the temporary files is committed
   first (the new checkpoint is now complete) and the final names are then hard-linked over;
3. **commit point**: the index is written atomically.  A single-file checkpoint instead commits
   with the atomic rename of ``model.safetensors``, then unlinks an older index (an index takes
   precedence over ``model.safetensors`` when both exist);
4. files of the old checkpoint and stale temporaries are removed.

One writer per directory at a time; readers may load concurrently (replaced files stay valid
for whoever has them open or mapped).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .._dtypes import from_code
from ..dedup import ALIASES_KEY, TiedKeys, alias_metadata, aliases_from_metadata, deduplicate, expand_aliases
from ..devices import DeviceMap, ReadRequest, check_device, resolve_device_map, stream_tensors
from ..errors import (
    CheckpointNotFoundError,
    DeviceMapError,
    SerializationError,
    ShardIndexError,
    TensorNotFoundError,
)
from ..format.header import TensorInfo
from ..format.reader import BACKENDS, DeviceLike, SafeFile, _torch_shape
from ..format.writer import plan_write, write_tensors
from ..storage.atomic import WRITE_BUFFER, atomic_write, fsync_dir, temp_path
from .index import INDEX_SUFFIX, ShardIndex, index_filename, read_index
from .plan import SINGLE_FILE, plan_shards

__all__ = ["Checkpoint", "SaveResult", "load_state_dict", "open_checkpoint", "save_state_dict"]

PathLike = str | os.PathLike[str]
# Shards written concurrently: enough to use every core for page-cache copies, few enough to keep
# accelerator staging buffers (one per writer) bounded.
SHARD_WRITERS = 4
_TEMP = re.compile(r"^\.tmp-[0-9a-f]{12}-.+\.safetensors$")
_ATOMIC_TEMP = re.compile(r"^\.model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?\.tmp-[0-9a-f]{12}$")
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
) -> SaveResult:
    """Save ``state_dict``: a path ending in ``.safetensors`` is one file, anything else a directory.

    Shared tensors are stored once (see ``torchst.dedup``) and recorded as aliases.  A directory
    is split into ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` when
    it exceeds ``max_shard_size`` (one shard = ``model.safetensors``, ``None`` = never split).
    ``fsync=True`` also makes the save survive power loss, not just a crashed process.

    >>> torchst.save_state_dict(model.state_dict(), "ckpt", max_shard_size="500MB")
    >>> sd = torchst.load_state_dict("ckpt")
    """
    dedup = deduplicate(state_dict, tied_keys=tied_keys)
    # safetensors stores dense row-major bytes; copy only the tensors that are not (copy #1).
    tensors = {n: t if t.is_contiguous() else t.contiguous() for n, t in dedup.tensors.items()}
    path = os.fspath(path_or_directory)
    if path.endswith(".safetensors"):
        md = _file_metadata(metadata, dedup.aliases)
        plan = plan_write(tensors, md)
        with atomic_write(path, fsync=fsync) as f:
            write_tensors(f, plan)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        return SaveResult(os.path.dirname(path), (os.path.basename(path),), None, dedup.aliases, size)
    return _save_directory(tensors, dedup.aliases, path, max_shard_size, metadata, fsync)


def _save_directory(
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    directory: str,
    max_shard_size: int | str | None,
    metadata: Mapping[str, str] | None,
    fsync: bool,
) -> SaveResult:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SerializationError(
            f"{directory} exists and is not a directory; to save one file give a path ending in '.safetensors'"
        )
    plan = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_size)
    _file_metadata(metadata, {})  # validate before creating anything
    os.makedirs(directory, exist_ok=True)
    old = _committed_files(directory)
    token = uuid.uuid4().hex[:12]
    temps = {fn: f".tmp-{token}-{fn}" for fn in plan.filenames}
    written: list[str] = []

    def write_shard(fn: str, names: Sequence[str]) -> None:
        kept = set(names)
        md = _file_metadata(metadata, {a: k for a, k in aliases.items() if k in kept})
        wplan = plan_write({n: tensors[n] for n in names}, md)
        tmp = os.path.join(directory, temps[fn])
        with open(tmp, "xb", buffering=WRITE_BUFFER) as f:
            written.append(tmp)  # list.append is atomic; cleanup below sees every temp file
            write_tensors(f, wplan)
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    try:
        # Shards are independent files: writing several at once lets the kernel copy into the
        # page cache (and the disk queue fsyncs) on more than one core.  The pool is joined
        # before anything is committed or cleaned up.
        with ThreadPoolExecutor(max_workers=min(SHARD_WRITERS, len(plan.filenames))) as pool:
            futures = [pool.submit(write_shard, fn, names) for fn, names in zip(plan.filenames, plan.shards)]
        for fut in futures:
            fut.result()  # re-raises the first failure
        _commit(directory, plan.filenames, temps, plan.weight_map, plan.total_size, old, fsync)
    except BaseException:
        for tmp in written:
            if os.path.exists(tmp) and not _referenced(directory, os.path.basename(tmp)):
                os.unlink(tmp)
        raise
    keep = set(plan.filenames) | ({index_filename()} if plan.is_sharded else set())
    _cleanup(directory, keep, old)
    idx = index_filename() if plan.is_sharded else None
    return SaveResult(directory, plan.filenames, idx, dict(aliases), plan.total_size)


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
        os.replace(join(directory, temps[SINGLE_FILE]), join(directory, SINGLE_FILE))
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


@dataclass(frozen=True)
class Checkpoint:
    """The validated layout of a checkpoint (one file or shards + index); no tensor read yet.

    >>> ckpt = torchst.sharding.open_checkpoint("ckpt")
    >>> sorted(ckpt.keys())[:2], ckpt.aliases
    (['embed.weight', 'layers.0.w'], {'lm_head.weight': 'embed.weight'})
    """

    source: str
    files: tuple[str, ...]
    tensors: dict[str, tuple[str, int, TensorInfo]]  # name -> (file path, data start, info)
    aliases: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    index: ShardIndex | None = None

    def keys(self) -> list[str]:
        """Every name the checkpoint answers to: stored tensors, then aliases."""
        return list(self.tensors) + list(self.aliases)

    def load(
        self,
        names: Collection[str] | None = None,
        *,
        device: DeviceLike = "cpu",
        device_map: DeviceMap | None = None,
        dtype: torch.dtype | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
        backend: str = "mmap",
    ) -> dict[str, torch.Tensor]:
        """Read ``names`` (default: all) with aliases expanded; see ``load_state_dict``.

        ``dtypes`` overrides the target dtype per stored name (``dtype`` casts floating tensors).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is invalid (expected one of: {', '.join(map(repr, BACKENDS))})")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, found {dtype!r}")
        wanted = self._select(names)
        devices = self._devices(wanted, device, device_map)
        targets = self._dtypes(wanted, dtype, dtypes)
        out: dict[str, torch.Tensor] = {}
        mapped = [n for n in wanted if devices[n].type == "cpu" and targets[n] is None and backend == "mmap"]
        by_file: dict[str, list[str]] = {}
        for n in mapped:
            by_file.setdefault(self.tensors[n][0], []).append(n)
        for path, group in by_file.items():
            # Zero-copy: each tensor is a window of one copy-on-write mapping of the file.
            with SafeFile(path, backend="mmap") as f:
                out.update((n, f.get_tensor(n)) for n in group)
        requests = [self._request(n, devices[n], targets[n]) for n in wanted if n not in out]
        out.update(stream_tensors(requests))
        ordered = {n: out[n] for n in wanted}
        return expand_aliases(ordered, {a: k for a, k in self.aliases.items() if k in ordered})

    def _select(self, names: Collection[str] | None) -> list[str]:
        if names is None:
            return list(self.tensors)
        stored = {self.aliases.get(n, n) for n in names}
        missing = sorted(n for n in stored if n not in self.tensors)
        if missing:
            raise TensorNotFoundError(
                f"{self.source}: checkpoint does not contain {missing[:5]} ({len(self.tensors)} tensors stored)"
            )
        return [n for n in self.tensors if n in stored]

    def _devices(self, names: list[str], device: DeviceLike, device_map: DeviceMap | None) -> dict[str, torch.device]:
        if device_map is None:
            dev = check_device(device)
            return dict.fromkeys(names, dev)
        if isinstance(device_map, str):
            raise DeviceMapError(
                f"device_map={device_map!r} needs the model's structure; use torchst.load_model(model, ...) "
                "or pass a dict {module prefix: device}"
            )
        return resolve_device_map(names, device_map)

    def _dtypes(
        self, names: list[str], dtype: torch.dtype | None, dtypes: Mapping[str, torch.dtype] | None
    ) -> dict[str, torch.dtype | None]:
        out: dict[str, torch.dtype | None] = {}
        for n in names:
            src = self._torch_dtype(n)
            want = dtypes.get(n) if dtypes else None
            if want is None and dtype is not None and src.is_floating_point:
                want = dtype
            out[n] = None if want == src else want
        return out

    def _torch_dtype(self, name: str) -> torch.dtype:
        path, _, info = self.tensors[name]
        return from_code(info.dtype).require_torch(f"{path}: tensor {name!r}")

    def _request(self, name: str, device: torch.device, out_dtype: torch.dtype | None) -> ReadRequest:
        path, start, info = self.tensors[name]
        where = f"{path}: tensor {name!r}"
        row = from_code(info.dtype, where)
        shape = _torch_shape(info, row, where)
        return ReadRequest(
            name, path, start + info.begin, info.nbytes, row.require_torch(where), shape, device, out_dtype
        )


def _resolve(path: str) -> tuple[str, str | None]:
    """(directory, index path or None) plus the single file when there is no index."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return path, path if path.endswith(".index.json") else None
    index = os.path.join(path, index_filename())
    if os.path.isfile(index):
        return path, index
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return single, None
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    files = [e for e in entries if e.endswith(".safetensors")]
    if len(indexes) == 1:
        return path, os.path.join(path, indexes[0])
    if not indexes and len(files) == 1:
        return os.path.join(path, files[0]), None
    raise CheckpointNotFoundError(
        f"{path}: found no checkpoint to load (expected {index_filename()} or {SINGLE_FILE}; "
        f"found {len(indexes)} index file(s) and {len(files)} .safetensors file(s): {(indexes + files)[:6]}); "
        "pass the path of the file or index to load"
    )


def open_checkpoint(path_or_directory: PathLike) -> Checkpoint:
    """Validate a checkpoint's layout: a file, a directory, or an ``*.index.json`` path.

    Every header is parsed, every shard named by the index must exist inside the directory and
    hold the tensors the index assigns to it.

    >>> ckpt = open_checkpoint("ckpt")
    >>> len(ckpt.files), len(ckpt.keys())
    (3, 291)
    """
    source = os.fspath(path_or_directory)
    target, index_path = _resolve(source)
    if index_path is None:
        with SafeFile(target, backend="pread") as f:
            header = f.header
        tensors = {n: (target, header.data_start, info) for n, info in header.tensors.items()}
        md = header.metadata or {}
        return Checkpoint(source, (target,), tensors, _aliases([md], tensors), _user_metadata(md))
    directory = os.path.dirname(index_path)
    index = read_index(index_path)
    tensors = {}
    metadatas: list[dict[str, str]] = []
    files: list[str] = []
    for fn in index.filenames:
        shard = os.path.join(directory, fn)
        expected = [n for n, f in index.weight_map.items() if f == fn]
        if not os.path.isfile(shard):
            raise ShardIndexError(
                f"{index_path}: shard {fn!r} (holding {len(expected)} tensor(s), e.g. {expected[0]!r}) is missing "
                f"from {directory or '.'}; the download or copy is incomplete"
            )
        with SafeFile(shard, backend="pread") as f:
            header = f.header
        absent = [n for n in expected if n not in header.tensors]
        if absent:
            raise ShardIndexError(
                f"{index_path}: the index puts {absent[:5]} in {fn!r}, but that shard does not contain "
                f"{'them' if len(absent) > 1 else 'it'}; the index and the shards come from different saves"
            )
        files.append(shard)
        metadatas.append(header.metadata or {})
        for n in expected:
            tensors[n] = (shard, header.data_start, header.tensors[n])
    ordered = {n: tensors[n] for n in sorted(tensors, key=lambda n: (files.index(tensors[n][0]), tensors[n][2].begin))}
    md = _user_metadata(metadatas[0]) if metadatas else {}
    # huggingface_hub records the names it dropped in the index metadata rather than the shards
    from_index = {k: v for k, v in index.metadata.items() if isinstance(v, str)}
    return Checkpoint(source, tuple(files), ordered, _aliases([from_index, *metadatas], ordered), md, index)


def _aliases(metadatas: list[dict[str, str]], tensors: Mapping[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for md in metadatas:
        out.update(aliases_from_metadata(md, names=tensors))
    for alias, kept in out.items():
        if kept not in tensors:
            raise ShardIndexError(f"alias {alias!r} refers to {kept!r}, which no file of the checkpoint stores")
        if alias in tensors:
            raise ShardIndexError(f"{alias!r} is recorded as an alias of {kept!r} but is also stored itself")
    return dict(sorted(out.items()))


def _user_metadata(md: Mapping[str, str]) -> dict[str, str]:
    recorded = aliases_from_metadata(md)
    return {k: v for k, v in md.items() if k != ALIASES_KEY and recorded.get(k) != v}


def load_state_dict(
    path_or_directory: PathLike,
    *,
    device: DeviceLike = "cpu",
    device_map: DeviceMap | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "mmap",
) -> dict[str, torch.Tensor]:
    """Every tensor of a file, directory or index; aliases map to the same tensor object.

    CPU loads in the stored dtype with ``backend="mmap"`` (the default) are zero-copy windows of
    the mapped files; everything else is read into new memory on the target device (``device``,
    or per name with ``device_map={prefix: device}``).  ``dtype`` casts floating tensors.

    >>> sd = torchst.load_state_dict("ckpt", device="cpu", dtype=torch.bfloat16)
    >>> sd["lm_head.weight"] is sd["embed.weight"]
    True
    """
    return open_checkpoint(path_or_directory).load(device=device, device_map=device_map, dtype=dtype, backend=backend)
