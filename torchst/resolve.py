"""What is at this path: one answer for every layout torchst writes or reads, without torch.

A path is one of four layouts, each made of labelled *parts* (one safetensors checkpoint each:
a file, or shards plus an index):

- ``file``: one ``.safetensors`` file (one unlabelled part);
- ``sharded``: a checkpoint directory or an ``*.index.json`` (one unlabelled part);
- ``step``: a ``CheckpointManager`` step (``manifest.json``): one part per file of the manifest,
  labelled ``model`` (weights of the module saved under that key) or ``state`` (optimizer, RNG
  and other training state);
- ``run``: a ``CheckpointManager`` directory: the parts of every committed step, labelled
  ``step_20/model``, ``step_20/state``, ...

Every header is parsed and validated, shard indexes and manifests are checked against the files,
and no tensor byte is read.  Nothing here imports torch, so header-only tools start fast.

>>> layout = resolve("run")
>>> layout.kind, [p.label for p in layout.parts][:4]
('run', ['step_800/model', 'step_800/state', 'step_900/model', 'step_900/state'])
>>> layout.parts[0].tensors["fc.weight"].info.shape
(4, 4)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from ._aliases import ALIASES_KEY, aliases_from_metadata, checkpoint_aliases
from ._progress import progress as _progress
from .errors import CheckpointError, CheckpointNotFoundError, FormatError, ShardIndexError, TorchstError
from .format.checksum import CHECKSUM_KEY
from .format.header import Header, TensorInfo, parse_header, read_header_length
from .manager.layout import MANIFEST, committed_steps, parse_manifest, step_location
from .sharding.anchor import OPEN_ATTEMPTS, HeldAnchor, backoff, changed_error
from .sharding.index import INDEX_SUFFIX, ShardIndex, index_filename, read_index
from .sharding.links import check_link, trusted_roots_from
from .sharding.plan import SINGLE_FILE

__all__ = [
    "Layout",
    "Part",
    "StoredTensor",
    "committed_steps",
    "read_header",
    "resolve",
    "sniff",
    "step_layout",
    "user_metadata",
]

_STEP = re.compile(r"^step_(\d+)$")
_STATE_FILE = "state.safetensors"  # torchst.state.STATE_FILE (that package imports torch)
_LEGACY_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

Kind = Literal["file", "sharded", "step", "run"]


class StoredTensor(NamedTuple):
    """Where a tensor's bytes are: its file, the file offset of the data section, its header entry."""

    file: str
    data_start: int
    info: TensorInfo

    @property
    def offset(self) -> int:
        """Absolute file offset of the tensor's first byte."""
        return self.data_start + self.info.begin


@dataclass(frozen=True)
class Part:
    """One safetensors checkpoint inside a layout (a file, or shards plus an index).

    ``label`` is ``""`` for a lone checkpoint, ``"model"``/``"state"`` inside a manager step and
    ``"step_20/model"`` inside a run; ``role`` says what it holds (``"weights"`` or ``"state"``).
    """

    label: str
    role: str
    source: str
    files: tuple[str, ...]
    tensors: dict[str, StoredTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> its __metadata__
    # shard -> tensors stored there that the index does not read from it (loaders never see them)
    unindexed: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors.values())

    def lookup(self, name: str) -> StoredTensor | None:
        """The stored tensor behind ``name``, following an alias; None when the part has neither."""
        return self.tensors.get(self.aliases.get(name, name))


@dataclass(frozen=True)
class Layout:
    """What a path holds: its kind, its labelled parts, and for runs the committed steps."""

    kind: Kind
    path: str
    parts: tuple[Part, ...]
    steps: tuple[int, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for p in self.parts for f in p.files)


def sniff(path: str) -> str:
    """``"safetensors"``, ``"torch-zip"`` (torch.save), ``"torch-pickle"`` (legacy torch.save) or ``"unknown"``.

    Decided by the first bytes, never by the extension.

    >>> torch.save(model.state_dict(), "pytorch_model.bin")
    >>> sniff("pytorch_model.bin")
    'torch-zip'
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "torch-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if n <= os.path.getsize(path) - 8:
            return "safetensors"
    return "unknown"


def _not_safetensors(path: str) -> FormatError | None:
    kind = sniff(path)
    if kind.startswith("torch"):
        return FormatError(
            f"{path}: this is a torch.save checkpoint ({kind}), not safetensors; convert it with "
            f"`torchst convert {path} OUT` (loads with torch.load(weights_only=True), no pickled code runs)"
        )
    return None


def read_header(path: str) -> Header:
    """The validated header of one ``.safetensors`` file (reads the header bytes only, no torch).

    >>> read_header("m.safetensors").tensors["embed.weight"].dtype
    'F32'
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        try:
            n = read_header_length(os.pread(fd, 8, 0), source=path, file_size=size)
            return parse_header(os.pread(fd, n, 8), source=path, data_size=size - 8 - n)
        except FormatError as e:
            legacy = _not_safetensors(path)
            if legacy is None:
                raise
            raise legacy from e
    finally:
        os.close(fd)


# -- planning: which files make up which part (cheap: directory listings, indexes, manifests) --


@dataclass
class _Plan:
    label: str
    role: str
    source: str
    files: list[str]
    index: ShardIndex | None = None
    index_path: str | None = None


def _checkpoint_plan(path: str, label: str = "", role: str = "weights") -> _Plan:
    """The files of a checkpoint: a file, an ``*.index.json``, or a directory holding either."""
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _index_plan(path, label, role)
        return _Plan(label, role, path, [path])
    index = os.path.join(path, index_filename())
    if os.path.isfile(index):
        return _index_plan(index, label, role, source=path)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        check_link(path, SINGLE_FILE, trusted_roots_from(None), path)
        return _Plan(label, role, path, [single])
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    files = [e for e in entries if e.endswith(".safetensors")]
    if len(indexes) == 1:
        return _index_plan(os.path.join(path, indexes[0]), label, role, source=path)
    if not indexes and len(files) == 1:
        check_link(path, files[0], trusted_roots_from(None), path)
        return _Plan(label, role, path, [os.path.join(path, files[0])])
    legacy = [e for e in entries if e in _LEGACY_NAMES or re.match(r"^pytorch_model-\d+-of-\d+\.bin$", e)]
    if legacy and not indexes and not files:
        raise CheckpointNotFoundError(
            f"{path}: holds a torch.save checkpoint ({legacy[0]}), not safetensors; convert it with "
            f"`torchst convert {path} OUT` (torch.load(weights_only=True), no pickled code runs)"
        )
    raise CheckpointNotFoundError(
        f"{path}: found no checkpoint (expected {index_filename()}, {SINGLE_FILE}, a CheckpointManager "
        f"step with {MANIFEST} or a directory of step_<n> folders; found {len(indexes)} index file(s) and "
        f"{len(files)} .safetensors file(s): {(indexes + files)[:6]}); pass the path of the file or index"
    )


def _index_plan(index_path: str, label: str, role: str, source: str | None = None) -> _Plan:
    directory = os.path.dirname(index_path)
    roots = trusted_roots_from(None)
    if source is not None:  # found inside the directory the user named: the link policy applies
        check_link(directory, os.path.basename(index_path), roots, source)
    index = read_index(index_path)
    files = []
    for fn in index.filenames:
        check_link(directory, fn, roots, index_path)
        shard = os.path.join(directory, fn)
        if not os.path.isfile(shard):
            expected = [n for n, f in index.weight_map.items() if f == fn]
            raise ShardIndexError(
                f"{index_path}: shard {fn!r} (holding {len(expected)} tensor(s), e.g. {expected[0]!r}) is missing "
                f"from {directory or '.'}; the download or copy is incomplete"
            )
        files.append(shard)
    return _Plan(label, role, source or index_path, files, index, index_path)


def _read_manifest(step_path: str) -> dict[str, Any]:
    path = os.path.join(step_path, MANIFEST)
    with open(path, "rb") as f:
        raw = f.read()
    m = _STEP.match(os.path.basename(os.path.normpath(step_path)))
    if m:
        step = int(m.group(1))
    else:  # a step directory copied under another name (or a replaced copy): trust its manifest's number
        try:
            found = json.loads(raw).get("step")
        except (ValueError, AttributeError, RecursionError):
            found = None
        step = found if isinstance(found, int) else -1
    return parse_manifest(raw, path, step)


def _step_plans(step_path: str, prefix: str = "") -> list[_Plan]:
    """One plan per file the manifest lists, after checking that each exists with its recorded size."""
    manifest = _read_manifest(step_path)
    base = os.path.normpath(step_path)
    plans = []
    for rel, entry in sorted(manifest["files"].items(), key=lambda kv: (kv[0] == _STATE_FILE, kv[0])):
        path = os.path.normpath(os.path.join(base, rel))
        if not isinstance(entry, dict) or not path.startswith(base + os.sep):
            raise CheckpointError(f"{base}: manifest lists an invalid file {rel!r}; the step is damaged")
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: listed in the manifest but missing; the step is damaged") from None
        if size != entry.get("size"):
            raise CheckpointError(
                f"{path}: {size:,} bytes but the manifest says {entry.get('size')!r}; the step is damaged"
            )
        if rel == _STATE_FILE:
            label, role = "state", "state"
        else:
            label, role = (os.path.dirname(rel) or rel.removesuffix(".safetensors")), "weights"
        plans.append(_Plan(prefix + label, role, path, [path]))
    return plans


# -- reading headers --------------------------------------------------------------------------


def _part(plan: _Plan, headers: dict[str, Header]) -> Part:
    unindexed: dict[str, tuple[str, ...]] = {}
    tensors: dict[str, StoredTensor] = {}
    metadata: dict[str, dict[str, str]] = {}
    if plan.index is None:
        (path,) = plan.files
        h = headers[path]
        start = h.data_start
        tensors = {n: StoredTensor(path, start, info) for n, info in h.tensors.items()}
        metadata[path] = dict(h.metadata or {})
        records = [metadata[path]]
    else:
        assert plan.index_path is not None
        records = [{k: v for k, v in plan.index.metadata.items() if isinstance(v, str)}]
        directory = os.path.dirname(plan.index_path)
        for path in plan.files:
            h = headers[path]
            fn = os.path.relpath(path, directory) if directory else path
            expected = [n for n, f in plan.index.weight_map.items() if f == fn]
            extra = tuple(n for n in h.tensors if plan.index.weight_map.get(n) != fn)
            if extra:
                unindexed[path] = extra
            absent = [n for n in expected if n not in h.tensors]
            if absent:
                raise ShardIndexError(
                    f"{plan.index_path}: the index puts {absent[:5]} in {fn!r}, but that shard does not contain "
                    f"{'them' if len(absent) > 1 else 'it'}; the index and the shards come from different saves"
                )
            metadata[path] = dict(h.metadata or {})
            records.append(metadata[path])
            start = h.data_start
            tensors.update((n, StoredTensor(path, start, h.tensors[n])) for n in expected)
    aliases = checkpoint_aliases(records, tensors, plan.source)
    return Part(
        plan.label,
        plan.role,
        plan.source,
        tuple(plan.files),
        tensors,
        dict(sorted(aliases.items())),
        metadata,
        unindexed,
    )


def user_metadata(md: dict[str, str]) -> dict[str, str]:
    """A file's metadata without the alias and checksum records (what the user wrote)."""
    recorded = aliases_from_metadata(md)
    return {k: v for k, v in md.items() if k not in (ALIASES_KEY, CHECKSUM_KEY) and recorded.get(k) != v}


def _read_parts(plans: list[_Plan], progress: bool | None) -> Iterator[Part]:
    files = [f for p in plans for f in p.files]
    headers: dict[str, Header] = {}
    with _progress(total=len(files), desc="Reading headers", unit="file", enabled=progress) as bar:
        for plan in plans:
            for f in plan.files:
                headers[f] = read_header(f)
                bar.update(1)
            yield _part(plan, headers)


def resolve(path: str | os.PathLike[str], *, progress: bool | None = None) -> Layout:
    """Find and validate what ``path`` holds (see the module docstring); reads headers only.

    Raises ``CheckpointNotFoundError`` when nothing torchst can read is there, ``FormatError`` /
    ``ShardIndexError`` / ``CheckpointError`` for a damaged checkpoint, ``OSError`` as the OS reports it.

    >>> resolve("run/step_1000").kind
    'step'
    """
    p = os.fspath(path)
    if _URL.match(p):  # torchst.storage.remote.is_url, without importing torch for local paths
        return _remote_layout(p)
    if not os.path.exists(p):
        raise CheckpointNotFoundError(f"{p}: no such file or directory")
    if os.path.isdir(p) and os.path.isfile(os.path.join(p, MANIFEST)):
        return Layout("step", p, tuple(_read_parts(_step_plans(p), progress)))
    if os.path.isdir(p):
        steps = committed_steps(p)
        if steps:
            plans = [pl for s in steps for pl in _step_plans(_located(p, s), f"step_{s}/")]
            return Layout("run", p, tuple(_read_parts(plans, progress)), tuple(steps))
    # A lone checkpoint may be re-saved while we read it: read it whole from one anchor, or retry.
    for attempt in range(OPEN_ATTEMPTS):
        try:
            held = HeldAnchor.of(p)
        except FileNotFoundError:
            held = None  # resolved, then replaced before we opened it
            if attempt + 1 < OPEN_ATTEMPTS:
                backoff(attempt)
                continue
        try:
            try:
                plan = _checkpoint_plan(p)
                parts = tuple(_read_parts([plan], progress))
            except (OSError, TorchstError):
                if held is None or held.unchanged(p):
                    raise  # the checkpoint's own problem, not a race with a writer
            else:
                if held is None or held.unchanged(p):
                    return Layout("file" if plan.index is None else "sharded", p, parts)
        finally:
            if held is not None:
                held.close()
        backoff(attempt)
    raise changed_error(p)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _remote_layout(url: str) -> Layout:
    """A file or sharded checkpoint at a URL: headers only (one ranged GET per file, in parallel)."""
    from .sharding.remote import open_remote_checkpoint

    ckpt = open_remote_checkpoint(url)
    tensors = {n: StoredTensor(t.path, t.data_start, t.info) for n, t in ckpt.tensors.items()}
    metadata = {f: dict(h.metadata or {}) for f, h in ckpt._headers.items()}
    part = Part("", "weights", url, ckpt.files, tensors, dict(ckpt.aliases), metadata)
    return Layout("file" if ckpt.index is None else "sharded", url, (part,))


def step_layout(directory: str, step: int, *, progress: bool | None = None) -> Layout:
    """The layout of one committed step of a manager directory (for per-step checks of a run)."""
    path = _located(directory, step)
    return Layout("step", path, tuple(_read_parts(_step_plans(path, f"step_{step}/"), progress)))


def _located(directory: str, step: int) -> str:
    # step_<n>, or the previous copy while step <n> is being re-saved (see manager/layout.py)
    location = step_location(directory, step)
    if location is None:
        raise CheckpointNotFoundError(f"{directory}: step {step} is not a committed checkpoint")
    return location
