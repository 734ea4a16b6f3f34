"""Open a checkpoint (one file, or shards + index) as one consistent snapshot: ``open_checkpoint``.

Reader protocol (the writer's half, and the crash protocol, are in ``torchst.sharding.io``):

1. **anchor**: resolve what defines the checkpoint (the index, or the single file of a directory
   without one), open it and keep the descriptor.  While we hold it its inode cannot be freed,
   so no later file can reuse the inode number: (device, inode) names this exact file.
2. read the index through that descriptor, open every shard it names and parse each header,
   keeping every descriptor.
3. **check**: the path still resolves to the same anchor (same device and inode as the held
   descriptor, same ctime, size and, for an index, the same bytes).  The writer changes the
   index's identity before it touches any name a reader may be opening, so an unchanged anchor
   means every shard we opened belongs to it.  A changed anchor (or an error in step 2 that
   coincides with one: a shard gone, a shard that lacks tensors) means a writer committed in
   between: close everything, back off briefly and start again, ``OPEN_ATTEMPTS`` times at most,
   then raise ``CheckpointChangedError``.  Errors with an unchanged anchor are reported as they are.
4. the ``Checkpoint`` reads only through the descriptors it holds (``pread``, or a fresh private
   mapping per load), so it returns the bytes it advertised even after the files were replaced
   or deleted.  ``close()`` (or ``with``) releases them; until then replaced files keep their
   disk space.

Symlinks follow the policy of ``torchst.sharding.links``: the path the user gives is followed;
files found inside a checkpoint directory must stay in it, lead into a Hugging Face cache's
``blobs/``, or lie under a trusted root.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .._aliases import checkpoint_aliases
from .._progress import progress as progress_bar
from ..dedup import ALIASES_KEY, aliases_from_metadata, expand_aliases
from ..devices import DeviceMap, stream_tensors
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ShardIndexError,
    TorchstError,
)
from ..format.checksum import CHECKSUM_KEY, Verifier, check_from_file, check_tensors, warn_unverified
from ..format.header import Header, TensorInfo
from ..format.reader import DeviceLike, SafeFile, read_file_header, tensor_from_window
from ..storage.buffers import tensor_bytes
from ..storage.remote import is_url
from .anchor import OPEN_ATTEMPTS, backoff, changed_error
from .index import INDEX_SUFFIX, MAX_INDEX_SIZE, ShardIndex, index_filename
from .links import TRUSTED_ROOTS_ENV, check_link, trusted_roots_from
from .load_plan import LoadPlan, StoredTensor, plan_load
from .plan import SINGLE_FILE

__all__ = ["OPEN_ATTEMPTS", "TRUSTED_ROOTS_ENV", "Checkpoint", "load_state_dict", "open_checkpoint"]

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


class _Handles:
    """The descriptors a Checkpoint reads through, one per file, closed together."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.index_fd: int | None = None  # held while opening only: it pins the anchor's inode
        self.closed = False

    def open(self, path: str, real: str | None = None) -> int:
        fd = os.open(real or path, _O_READ)
        self.fds[path] = fd
        self.sizes[path] = os.fstat(fd).st_size
        return fd

    def release_index(self) -> None:
        fd, self.index_fd = self.index_fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self.closed = True
        self.release_index()
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


@dataclass(frozen=True)
class _Anchor:
    path: str
    fd: int
    dev: int
    ino: int
    ctime_ns: int
    size: int
    content: bytes | None  # the index's bytes; None for a single file


@dataclass(frozen=True)
class Checkpoint:
    """An open checkpoint (one file or shards + index): validated headers, descriptors held.

    Loads read the files this object opened, even if a writer replaced them since; close it (or
    use ``with``) to release them.

    >>> with torchst.sharding.open_checkpoint("ckpt") as ckpt:
    ...     sorted(ckpt.keys())[:2], ckpt.aliases
    (['embed.weight', 'layers.0.weight'], {'lm_head.weight': 'embed.weight'})
    """

    source: str
    files: tuple[str, ...]
    tensors: dict[str, StoredTensor]
    aliases: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    index: ShardIndex | None = None
    # shard path -> tensors stored there that the index does not read from it (never loaded)
    unindexed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _handles: _Handles = field(default_factory=_Handles, repr=False, compare=False)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the files; tensors already loaded stay valid."""
        self._handles.close()

    @property
    def closed(self) -> bool:
        return self._handles.closed

    def __enter__(self) -> Checkpoint:  # noqa: PYI034 - subclasses are not part of the API
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A Checkpoint dropped without close() must not leak descriptors (interpreter shutdown
        # may have torn os down already; nothing useful to report then).
        try:
            self._handles.close()
        except (OSError, AttributeError, TypeError):
            pass

    def _fd(self, path: str) -> int:
        fd = self._handles.fds.get(path)
        if fd is None:
            if self._handles.closed:
                raise CheckpointError(f"{self.source}: the checkpoint is closed; open it again with open_checkpoint()")
            raise CheckpointError(f"{self.source}: {path} is not a file this checkpoint opened")
        return fd

    # -- reading --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every name the checkpoint answers to: stored tensors, then aliases."""
        return list(self.tensors) + list(self.aliases)

    def open_file(self, path: str, *, device: DeviceLike = "cpu", backend: str = "mmap") -> SafeFile:
        """A ``SafeFile`` over one of ``files``, reading the bytes this checkpoint opened.

        >>> with torchst.sharding.open_checkpoint("ckpt") as ckpt, ckpt.open_file(ckpt.files[0]) as f:
        ...     f.keys()
        ['embed.weight']
        """
        return SafeFile(path, device=device, backend=backend, fd=self._fd(path))

    def plan(
        self,
        names: Collection[str] | None = None,
        *,
        device: DeviceLike = "cpu",
        device_map: DeviceMap | None = None,
        dtype: torch.dtype | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
        backend: str = "mmap",
        known: Collection[str] | None = None,
    ) -> LoadPlan:
        """What ``load`` would read, validated, nothing read yet; see ``torchst.sharding.plan_load``."""
        return plan_load(
            self, names, device=device, device_map=device_map, dtype=dtype, dtypes=dtypes, backend=backend, known=known
        )

    def load(
        self,
        names: Collection[str] | None = None,
        *,
        device: DeviceLike = "cpu",
        device_map: DeviceMap | None = None,
        dtype: torch.dtype | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
        backend: str = "mmap",
        verify: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Read ``names`` (default: all) with aliases expanded; see ``load_state_dict``.

        ``dtypes`` overrides the target dtype per stored name (``dtype`` casts floating tensors).
        ``verify`` checks every tensor read against its file's recorded checksum.
        """
        plan = self.plan(names, device=device, device_map=device_map, dtype=dtype, dtypes=dtypes, backend=backend)
        return self.read(plan, verify=verify)

    def read(
        self,
        plan: LoadPlan,
        *,
        on_bytes: Callable[[int], object] | None = None,
        verify: bool = False,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Execute ``plan``: ``{name: tensor}`` in file order, then its aliases (same tensor objects).

        ``on_bytes(n)`` is called as bytes arrive (a progress bar's ``update``); ``verify`` checks
        every tensor read against its file's recorded checksum; names in ``into`` are read straight
        into those existing tensors (see ``torchst.devices.stream_tensors``).
        """
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        if plan.backend == "mmap":
            for r in plan.reads:
                if r.zero_copy and (into is None or r.name not in into):
                    by_file.setdefault(r.stored.path, []).append(r.name)
        checks = _Checks(self) if verify else None
        for path, group in by_file.items():
            out.update(self._mapped(path, group))
            if checks is not None:
                checks.in_memory(path, [(self.tensors[n].info, out[n]) for n in group])
            if on_bytes is not None:
                on_bytes(sum(self.tensors[n].info.nbytes for n in group))
        rest = [r for r in plan.reads if r.name not in out]
        direct = {r.name for r in rest if r.device.type == "cpu" and r.dtype is None}
        if checks is not None:
            # Targets that never hold the stored bytes in CPU memory (accelerators, casts) are
            # checked from the file first; CPU reads are hashed where they land.
            checks.from_files(self._by_file([r.name for r in rest if r.name not in direct]))
        requests = (r.request(None if r.device.type == "meta" else self._fd(r.stored.path)) for r in rest)
        out.update(stream_tensors(requests, on_bytes=on_bytes, into=into))
        if checks is not None:
            for path, infos in self._by_file([r.name for r in rest if r.name in direct]).items():
                checks.in_memory(path, [(info, out[info.name]) for info in infos])
            checks.done()
        ordered = {r.name: out[r.name] for r in plan.reads}
        return expand_aliases(ordered, dict(plan.aliases))

    def _mapped(self, path: str, names: list[str]) -> dict[str, torch.Tensor]:
        # Zero-copy: each tensor is a window of one copy-on-write mapping of the descriptor we
        # hold.  A fresh mapping per load, so writes into one load's tensors never reach another's.
        size = self._handles.sizes[path]
        buf = memoryview(mmap.mmap(self._fd(path), size, access=mmap.ACCESS_COPY))
        address = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() if size else 0
        return {n: tensor_from_window(buf, self.tensors[n].info, self.tensors[n].data_start, address, path) for n in names}

    def _by_file(self, names: Collection[str]) -> dict[str, list[TensorInfo]]:
        out: dict[str, list[TensorInfo]] = {}
        for n in names:
            path, _, info = self.tensors[n]
            out.setdefault(path, []).append(info)
        for infos in out.values():
            infos.sort(key=lambda i: i.begin)
        return out


class _Checks:
    """Checksum verification for one load: a Verifier per file, one warning for unverifiable files."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.verifiers: dict[str, tuple[Verifier, Header]] = {}
        self.unverified: list[str] = []

    def _verifier(self, path: str) -> tuple[Verifier, Header]:
        got = self.verifiers.get(path)
        if got is None:
            header = _header(self.ckpt._fd(path), self.ckpt._handles.sizes[path], path)
            got = self.verifiers[path] = (Verifier(header, source=path), header)
            if not got[0].active:
                self.unverified.append(path)
        return got

    def in_memory(self, path: str, items: list[tuple[TensorInfo, torch.Tensor]]) -> None:
        check_tensors(self._verifier(path)[0], [(info, tensor_bytes(t)) for info, t in items])

    def from_files(self, by_file: Mapping[str, list[TensorInfo]]) -> None:
        for path, infos in by_file.items():
            verifier, header = self._verifier(path)
            check_from_file(self.ckpt._fd(path), header, verifier, infos, source=path)

    def done(self) -> None:
        warn_unverified(self.unverified)


# -- opening -----------------------------------------------------------------------------


def _resolve(path: str) -> tuple[str, str | None]:
    """(file or directory, index path or None); a directory without an index gives its single file."""
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


def _read_fd(fd: int, size: int) -> bytes:
    chunks, done = [], 0
    while done < size:
        got = os.pread(fd, size - done, done)
        if not got:
            break
        chunks.append(got)
        done += len(got)
    return b"".join(chunks)


def _open_anchor(source: str, handles: _Handles, roots: tuple[str, ...]) -> _Anchor:
    target, index_path = _resolve(source)
    path = index_path or target
    real = None
    if path != source:  # found inside the directory the user named: the link policy applies
        real = check_link(os.path.dirname(path), os.path.basename(path), roots, source)
    content = None
    if index_path is None:
        fd = handles.open(path, real)
        st = os.fstat(fd)
    else:
        fd = handles.index_fd = os.open(real or path, _O_READ)
        st = os.fstat(fd)
        if st.st_size > MAX_INDEX_SIZE:
            raise ShardIndexError(
                f"{path}: the index is {st.st_size:,} bytes, more than the {MAX_INDEX_SIZE:,} an index can reasonably be"
            )
        content = _read_fd(fd, st.st_size)
    return _Anchor(path, fd, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, content)


def _unchanged(source: str, anchor: _Anchor) -> bool:
    try:
        target, index_path = _resolve(source)
        if (index_path or target) != anchor.path:
            return False
        st = os.stat(anchor.path)
    except (OSError, TorchstError):
        return False
    if (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size) != (anchor.dev, anchor.ino, anchor.ctime_ns, anchor.size):
        return False
    return anchor.content is None or _read_fd(anchor.fd, anchor.size + 1) == anchor.content


def _header(fd: int, size: int, source: str) -> Header:
    return read_file_header(fd, size, source)


def _build(source: str, anchor: _Anchor, handles: _Handles, roots: tuple[str, ...]) -> Checkpoint:
    if anchor.content is None:
        header = _header(anchor.fd, anchor.size, anchor.path)
        tensors = {n: StoredTensor(anchor.path, header.data_start, info) for n, info in header.tensors.items()}
        md = header.metadata or {}
        return Checkpoint(
            source, (anchor.path,), tensors, checkpoint_aliases([md], tensors), _user_metadata(md), _handles=handles
        )
    index_path = anchor.path
    directory = os.path.dirname(index_path)
    index = ShardIndex.parse(anchor.content, source=index_path)
    tensors = {}
    metadatas: list[dict[str, str]] = []
    files: list[str] = []
    unindexed: dict[str, tuple[str, ...]] = {}
    for fn in index.filenames:
        shard = os.path.join(directory, fn)
        expected = [n for n, f in index.weight_map.items() if f == fn]
        real = check_link(directory, fn, roots, index_path)
        try:
            fd = handles.open(shard, real)
        except (FileNotFoundError, IsADirectoryError):
            raise ShardIndexError(
                f"{index_path}: shard {fn!r} (holding {len(expected)} tensor(s), e.g. {expected[0]!r}) is missing "
                f"from {directory or '.'}; the download or copy is incomplete"
            ) from None
        header = _header(fd, handles.sizes[shard], shard)
        absent = [n for n in expected if n not in header.tensors]
        if absent:
            raise ShardIndexError(
                f"{index_path}: the index puts {absent[:5]} in {fn!r}, but that shard does not contain "
                f"{'them' if len(absent) > 1 else 'it'}; the index and the shards come from different saves"
            )
        extra = tuple(n for n in header.tensors if index.weight_map.get(n) != fn)
        if extra:
            unindexed[shard] = extra
        files.append(shard)
        metadatas.append(header.metadata or {})
        for n in expected:
            tensors[n] = StoredTensor(shard, header.data_start, header.tensors[n])
    position = {f: i for i, f in enumerate(files)}
    ordered = {n: tensors[n] for n in sorted(tensors, key=lambda n: (position[tensors[n].path], tensors[n].info.begin))}
    md = _user_metadata(metadatas[0]) if metadatas else {}
    # huggingface_hub records the names it dropped in the index metadata rather than the shards
    from_index = {k: v for k, v in index.metadata.items() if isinstance(v, str)}
    aliases = checkpoint_aliases([from_index, *metadatas], ordered)
    if unindexed:
        count = sum(map(len, unindexed.values()))
        shard, names = next(iter(unindexed.items()))
        log.warning(
            "%s: %d tensor(s) stored in shards are not read from there by the index (e.g. %r in %s); "
            "they are not loaded",
            index_path,
            count,
            names[0],
            os.path.basename(shard),
        )
    return Checkpoint(source, tuple(files), ordered, aliases, md, index, unindexed, handles)


def open_checkpoint(path_or_directory: PathLike, *, trusted_roots: Iterable[PathLike] | None = None) -> Checkpoint:
    """Open a checkpoint (a file, a directory, or an ``*.index.json`` path) as one snapshot.

    Every header is parsed; every shard named by the index must exist inside the directory (see
    the symlink policy above; ``trusted_roots`` lists more directories links may lead into) and
    hold the tensors the index assigns to it.  If a writer re-saves the checkpoint meanwhile the
    open starts again (``OPEN_ATTEMPTS`` times), so the result is always one whole checkpoint.

    >>> with open_checkpoint("ckpt") as ckpt:
    ...     len(ckpt.files), ckpt.keys()
    (3, ['embed.weight', 'layers.0.weight', 'layers.1.weight', 'lm_head.weight'])
    """
    source = os.fspath(path_or_directory)
    if is_url(source):
        from .remote import open_remote_checkpoint

        return open_remote_checkpoint(source)
    roots = trusted_roots_from(trusted_roots)
    for attempt in range(OPEN_ATTEMPTS):
        handles = _Handles()
        try:
            try:
                anchor: _Anchor | None = _open_anchor(source, handles, roots)
            except CheckpointNotFoundError:
                raise
            except FileNotFoundError:
                # Resolved, then gone before we opened it: a writer switched the checkpoint
                # between one file and shards.  A checkpoint that does not exist fails in _resolve.
                anchor = None
            if anchor is not None:
                try:
                    ckpt = _build(source, anchor, handles, roots)
                except (OSError, TorchstError):
                    if _unchanged(source, anchor):
                        raise  # a real problem of the checkpoint, not a race with a writer
                else:
                    if _unchanged(source, anchor):
                        handles.release_index()
                        return ckpt
        except BaseException:
            handles.close()
            raise
        handles.close()
        if attempt + 1 < OPEN_ATTEMPTS:
            backoff(attempt)
    raise changed_error(source)


def _user_metadata(md: Mapping[str, str]) -> dict[str, str]:
    recorded = aliases_from_metadata(md)
    return {k: v for k, v in md.items() if k not in (ALIASES_KEY, CHECKSUM_KEY) and recorded.get(k) != v}


def load_state_dict(
    path_or_directory: PathLike,
    *,
    device: DeviceLike = "cpu",
    device_map: DeviceMap | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "mmap",
    trusted_roots: Iterable[PathLike] | None = None,
    verify: bool = False,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a file, directory or index; aliases map to the same tensor object.

    CPU loads in the stored dtype with ``backend="mmap"`` (the default) are zero-copy windows of
    the mapped files; everything else is read into new memory on the target device (``device``,
    or per name with ``device_map={prefix: device}``).  ``dtype`` casts floating tensors.  The
    result is one whole checkpoint even while a writer re-saves it (see ``open_checkpoint``).
    ``verify=True`` checks every tensor against its recorded checksum and raises
    ``IntegrityError`` naming file, tensor and byte range on a mismatch.
    ``progress=True`` (or ``TORCHST_PROGRESS=1``) shows a bar.

    >>> sd = torchst.load_state_dict("ckpt", device="cpu", dtype=torch.bfloat16)
    >>> sd["lm_head.weight"] is sd["embed.weight"]
    True
    """
    with open_checkpoint(path_or_directory, trusted_roots=trusted_roots) as ckpt:
        plan = ckpt.plan(device=device, device_map=device_map, dtype=dtype, backend=backend)
        with progress_bar(total=plan.nbytes, desc="Loading", enabled=progress) as bar:
            return ckpt.read(plan, on_bytes=bar.update, verify=verify)
