"""Checkpoints at URLs: open (one file, or shards + index) and save, with the index as the commit.

Object stores have no atomic rename, so the commit protocol is by order of writes:

- **save**: every shard is uploaded as a multipart upload, and every part of every shard is
  sent and acknowledged before any upload is completed; then the uploads are completed (each
  is atomic: an object is either the old one or the whole new one) and the index is written
  last.  A save that fails or is killed before that point leaves no new object visible, so the
  previous checkpoint stays loadable.  A single-file checkpoint (``model.safetensors``) is its
  own commit; an index left from an earlier sharded save is deleted after it, and files no
  committed index names any more are deleted last.
- **open**: the index (or the single file) is read first and defines the checkpoint; anything
  it does not name is ignored.  Every shard's header is read with one ranged GET, and on S3
  every later read is pinned to the ETag seen then: a shard replaced by a writer mid-load raises
  ``CheckpointChangedError`` instead of mixing two saves.

>>> saved = torchst.save_model(model, "memory://bucket/run/ckpt", max_shard_size=64)
>>> saved.files, saved.index_file
(('model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'), 'model.safetensors.index.json')
>>> missing, unexpected = torchst.load_model(fresh_model, "memory://bucket/run/ckpt")
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .._aliases import checkpoint_aliases
from ..dedup import expand_aliases
from ..errors import CheckpointError, CheckpointNotFoundError, ShardIndexError, TorchstError
from ..format.checksum import Verifier, check_tensors, warn_unverified
from ..format.header import Header
from ..format.reader import DeviceLike, SafeFile
from ..format.remote import RemoteSafeFile, open_header
from ..format.writer import plan_write, write_tensors
from ..storage.buffers import tensor_bytes
from ..storage.remote import RemoteObject, RemoteWriter, delete, exists, join, open_writer, read_bytes, write_bytes
from .checkpoint import Checkpoint, _user_metadata
from .index import INDEX_SUFFIX, MAX_INDEX_SIZE, ShardIndex, index_filename
from .load_plan import LoadPlan, PlannedRead, StoredTensor
from .plan import SINGLE_FILE, plan_shards

__all__ = ["RemoteCheckpoint", "open_remote_checkpoint", "save_remote"]

log = logging.getLogger(__name__)

SHARD_WRITERS = 4  # shards uploading at once (each with its own bounded set of parts in flight)
# Tensors bound for an accelerator are fetched into host memory this much at a time.
STAGING_BYTES = 256 << 20


@dataclass(frozen=True)
class RemoteCheckpoint(Checkpoint):
    """A checkpoint at a URL: headers fetched, tensors fetched by ranged GETs on ``load``."""

    _objects: dict[str, RemoteObject] = field(default_factory=dict, repr=False, compare=False)
    _headers: dict[str, Header] = field(default_factory=dict, repr=False, compare=False)

    def close(self) -> None:
        """Nothing is held open remotely; kept for the ``Checkpoint`` interface."""

    @property
    def closed(self) -> bool:
        return False

    def __del__(self) -> None:
        pass

    def open_file(self, path: str, *, device: DeviceLike = "cpu", backend: str = "mmap") -> SafeFile:
        if path not in self._objects:
            raise CheckpointError(f"{self.source}: {path} is not a file of this checkpoint")
        return RemoteSafeFile(path, device=device)

    def read(
        self,
        plan: LoadPlan,
        *,
        on_bytes: Callable[[int], object] | None = None,
        verify: bool = False,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Execute ``plan`` with ranged GETs straight into new tensors (or ``into``'s); see ``Checkpoint.read``."""
        verifiers = {p: Verifier(h, source=p) for p, h in self._headers.items()} if verify else {}
        out: dict[str, torch.Tensor] = {}
        batch: list[PlannedRead] = []
        staged = 0
        for r in plan.reads:
            if r.device.type == "meta":
                out[r.name] = torch.empty(r.shape, dtype=r.dtype or r.stored_dtype, device="meta")
                continue
            pin = r.device.type == "cuda" and torch.cuda.is_available()
            given = into.get(r.name) if into is not None and r.zero_copy else None
            # fetched straight here (a built model's own CPU tensor when ``into`` names it)
            out[r.name] = given if given is not None else torch.empty(r.shape, dtype=r.stored_dtype, pin_memory=pin)
            batch.append(r)
            if not r.zero_copy:
                staged += r.stored.info.nbytes
            if staged >= STAGING_BYTES:  # host memory for accelerator-bound tensors stays bounded
                self._fetch(batch, out, verifiers, on_bytes)
                batch, staged = [], 0
        self._fetch(batch, out, verifiers, on_bytes)
        warn_unverified([p for p, v in verifiers.items() if not v.active])
        ordered = {r.name: out[r.name] for r in plan.reads}
        return expand_aliases(ordered, dict(plan.aliases))

    def _fetch(
        self,
        reads: Sequence[PlannedRead],
        out: dict[str, torch.Tensor],
        verifiers: Mapping[str, Verifier],
        on_bytes: Callable[[int], object] | None,
    ) -> None:
        by_file: dict[str, list[PlannedRead]] = {}
        for r in reads:
            by_file.setdefault(r.stored.path, []).append(r)

        def one(path: str, group: list[PlannedRead]) -> None:
            self._objects[path].read_into(
                [(r.stored.offset, tensor_bytes(out[r.name])) for r in group if r.stored.info.nbytes]
            )
            verifier = verifiers.get(path)
            if verifier is not None and verifier.active:
                check_tensors(verifier, [(r.stored.info, tensor_bytes(out[r.name])) for r in group])
            if on_bytes is not None:
                on_bytes(sum(r.stored.info.nbytes for r in group))

        with ThreadPoolExecutor(max_workers=max(1, min(4, len(by_file)))) as pool:
            futures = [pool.submit(one, p, g) for p, g in by_file.items()]
        for f in futures:
            f.result()
        for r in reads:
            t = out[r.name]
            if r.device.type != "cpu":
                t = t.to(r.device, non_blocking=t.is_pinned())
            out[r.name] = t if r.dtype is None else t.to(r.dtype)


def _resolve(url: str) -> tuple[str, bytes | None]:
    """(what defines the checkpoint, the index bytes or None for a single file)."""
    if url.endswith(".safetensors"):
        return url, None
    if url.endswith(".json"):
        return url, _index_bytes(url)
    index = join(url, index_filename())
    try:
        return index, _index_bytes(index)
    except CheckpointNotFoundError:
        pass
    single = join(url, SINGLE_FILE)
    return single, None


def _index_bytes(url: str) -> bytes:
    raw = read_bytes(url)
    if len(raw) > MAX_INDEX_SIZE:
        raise ShardIndexError(f"{url}: the index is {len(raw):,} bytes, more than the {MAX_INDEX_SIZE:,} allowed")
    return raw


def open_remote_checkpoint(url: str) -> RemoteCheckpoint:
    """Open the checkpoint at ``url`` (a file, a prefix, or an index): headers only, in parallel.

    >>> _ = torchst.save_state_dict({"w": torch.ones(2)}, "memory://bucket/sd")
    >>> open_remote_checkpoint("memory://bucket/sd").load(device="cpu")
    {'w': tensor([1., 1.])}
    """
    anchor, content = _resolve(url)
    if content is None:
        obj = RemoteObject(anchor)
        try:
            header = open_header(obj)
        except CheckpointNotFoundError:
            if anchor != url:
                raise CheckpointNotFoundError(
                    f"{url}: no checkpoint here: neither {index_filename()} nor {SINGLE_FILE} exists under this prefix"
                ) from None
            raise
        single = {n: StoredTensor(anchor, header.data_start, info) for n, info in header.tensors.items()}
        md = header.metadata or {}
        return RemoteCheckpoint(
            url,
            (anchor,),
            single,
            checkpoint_aliases([md], single),
            _user_metadata(md),
            _objects={anchor: obj},
            _headers={anchor: header},
        )
    index = ShardIndex.parse(content, source=anchor)
    base = anchor.rsplit("/", 1)[0]
    shards = [join(base, fn) for fn in index.filenames]
    objects = {s: RemoteObject(s) for s in shards}

    def header_of(shard: str) -> Header:
        try:
            return open_header(objects[shard])
        except CheckpointNotFoundError:
            fn = shard.rsplit("/", 1)[1]
            raise ShardIndexError(
                f"{anchor}: shard {fn!r} named by the index is missing from {base}; the upload or copy is incomplete"
            ) from None

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(shards)))) as pool:
        headers = dict(zip(shards, pool.map(header_of, shards)))
    tensors: dict[str, Any] = {}
    metadatas = []
    for shard, fn in zip(shards, index.filenames):
        header = headers[shard]
        expected = [n for n, f in index.weight_map.items() if f == fn]
        absent = [n for n in expected if n not in header.tensors]
        if absent:
            raise ShardIndexError(
                f"{anchor}: the index puts {absent[:5]} in {fn!r}, but that shard does not contain "
                f"{'them' if len(absent) > 1 else 'it'}; the index and the shards come from different saves"
            )
        metadatas.append(header.metadata or {})
        for n in expected:
            tensors[n] = StoredTensor(shard, header.data_start, header.tensors[n])
    position = {s: i for i, s in enumerate(shards)}
    ordered = {n: tensors[n] for n in sorted(tensors, key=lambda n: (position[tensors[n][0]], tensors[n][2].begin))}
    md = _user_metadata(metadatas[0]) if metadatas else {}
    from_index = {k: v for k, v in index.metadata.items() if isinstance(v, str)}
    return RemoteCheckpoint(
        url,
        tuple(shards),
        ordered,
        checkpoint_aliases([from_index, *metadatas], ordered),
        md,
        index,
        _objects=objects,
        _headers=headers,
    )


# -- saving ------------------------------------------------------------------------------------


def _committed(url: str) -> set[str]:
    """File names the checkpoint at ``url`` commits to now (to delete after a new save)."""
    try:
        raw = read_bytes(join(url, index_filename()))
    except CheckpointNotFoundError:
        return {SINGLE_FILE} if exists(join(url, SINGLE_FILE)) else set()
    try:
        return set(ShardIndex.parse(raw, source=url).filenames) | {index_filename()}
    except TorchstError:
        return {index_filename()}


def save_remote(
    tensors: Mapping[str, torch.Tensor],
    url: str,
    *,
    file_metadata: Any,
    max_shard_size: int | str | None,
    checksums: bool,
) -> tuple[tuple[str, ...], str | None, int]:
    """Upload a checkpoint to ``url``; returns (file names, index name or None, total tensor bytes).

    ``file_metadata(names)`` gives the ``__metadata__`` of a file holding ``names``.
    """
    if url.endswith(".safetensors"):
        plan = plan_write(tensors, file_metadata(list(tensors)), checksums=checksums)
        with open_writer(url) as w:
            write_tensors(w, plan)  # type: ignore[arg-type]
            w.commit()
        name = url.rsplit("/", 1)[1]
        return (name,), None, sum(t.numel() * t.element_size() for t in tensors.values())
    if url.endswith(INDEX_SUFFIX):
        raise CheckpointError(f"{url}: save to the checkpoint's prefix, not to its index")
    splan = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_size)
    old = _committed(url)
    writers: list[RemoteWriter] = []

    def upload(fn: str, names: Sequence[str]) -> None:
        wplan = plan_write({n: tensors[n] for n in names}, file_metadata(names), checksums=checksums)
        w = open_writer(join(url, fn))
        writers.append(w)
        write_tensors(w, wplan)  # type: ignore[arg-type]
        w.prepare()  # every byte sent and acknowledged; nothing visible yet

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(SHARD_WRITERS, len(splan.filenames)))) as pool:
            futures = [pool.submit(upload, fn, names) for fn, names in zip(splan.filenames, splan.shards)]
        for f in futures:
            f.result()
        for w in writers:
            w.commit()  # each completes atomically; all bytes are already on the store
    except BaseException:
        for w in writers:
            w.abort()
        raise
    index_name = None
    if splan.is_sharded:
        index_name = index_filename()
        index = ShardIndex.build(splan.weight_map, splan.total_size)
        write_bytes(join(url, index_name), index.to_json().encode())  # the commit point
    keep = set(splan.filenames) | ({index_name} if index_name else set())
    if not splan.is_sharded and index_filename() in old:
        delete(join(url, index_filename()))  # the single file is the checkpoint now
    for fn in sorted(old - keep - {index_filename()}):
        delete(join(url, fn))
    return splan.filenames, index_name, splan.total_size
