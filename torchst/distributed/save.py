"""Collective saves: every rank writes its own bytes, in place, into one Hugging Face checkpoint.

1. every rank describes what it holds (names, dtypes, global shapes, the box of the full tensor
   its local piece covers) and the descriptions are all-gathered as JSON;
2. every rank derives the same plan from them: shard files, headers, offsets, and which rank
   writes which bytes (replicated pieces are split between their holders, balanced by bytes);
3. each rank ``os.pwrite``s its pieces at their final offsets into the shards' temporary files
   and flushes (and fsyncs) them;
4. the ranks vote; when every rank succeeded, rank 0 commits with the single-process commit
   (renames, then the index last), else every rank raises ``CheckpointError`` and the previous
   checkpoint stays as it was.

The result is byte for byte what ``torchst.save_state_dict`` writes for the full tensors.  Ranks
on several hosts need a filesystem they all see (NFS, Lustre, GPFS...), as DCP's
``FileSystemWriter`` does.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .._dtypes import DTYPES, from_torch
from ..dedup import TiedKeys, deduplicate
from ..errors import SerializationError
from ..format.checksum import checksum_metadata, combine_pieces, crc32c
from ..format.header import build_header, encode_prefix
from ..sharding.index import index_filename
from ..sharding.io import SaveResult, _cleanup, _commit, _committed_files, _file_metadata, _referenced
from ..sharding.plan import plan_shards
from ..storage._hints import delays_allocation, preallocate
from ..storage.buffers import pread_into, tensor_bytes
from ._layout import Box, Piece, box_numel, contains, is_dtensor, local_box, overlaps, run_count, runs, split_box
from .comm import Group

__all__ = ["is_dtensor", "save_state_dict", "write_file"]

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
# Replicated pieces above this size are split between the ranks that hold them.
SPLIT_BYTES = 1 << 20
# Checksums of tensors written in more runs than this are computed by reading them back.
MAX_PIECES = 256
READ_BACK_CHUNK = 16 << 20


@dataclass(frozen=True)
class _Write:
    name: str
    box: Box  # the bytes to write, in full-tensor coordinates
    source: Box  # the writer's local piece that contains them
    rank: int


@dataclass(frozen=True)
class _Plan:
    filenames: tuple[str, ...]
    weight_map: dict[str, str]
    total_size: int
    headers: dict[str, bytes]  # file name -> length prefix + header
    data_start: dict[str, int]  # tensor name -> absolute file offset of its first byte
    file_of: dict[str, str]
    writes: tuple[_Write, ...]
    shapes: dict[str, tuple[int, ...]]
    itemsize: dict[str, int]
    aliases: dict[str, str]
    token: str
    # with checksums: per file, the header entries and the metadata the final record is built from
    entries: dict[str, list[tuple[str, str, list[int], int]]]
    user_metadata: dict[str, dict[str, str]]
    checksums: bool

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.itemsize[name]


def _describe(
    state_dict: Mapping[str, torch.Tensor | Piece], tied_keys: TiedKeys | None
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, Box]]]:
    if not isinstance(state_dict, Mapping):
        raise SerializationError(f"expected a dict of str -> torch.Tensor, found {type(state_dict).__name__}")
    pieces: dict[str, tuple[torch.Tensor, Box]] = {}
    entries = []
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise SerializationError(f"tensor names must be str, found {type(name).__name__}: {name!r}")
        if not isinstance(value, (torch.Tensor, Piece)):
            raise SerializationError(f"state dict entry {name!r} is a {type(value).__name__}, not a torch.Tensor")
        local, box = local_box(value, name)
        if local.device.type == "meta":
            raise SerializationError(f"tensor {name!r} is on the meta device and has no data to save")
        if local.layout != torch.strided:
            raise SerializationError(f"tensor {name!r} is {local.layout}; safetensors stores dense tensors only")
        row = from_torch(value.dtype, f"tensor {name!r}")
        pieces[name] = (local, box)
        entries.append([name, row.code, list(value.shape), list(box[0]), list(box[1])])
    # Shared storage (tied weights) is detected on the local pieces; a rank whose piece is empty
    # cannot see it, so the ranks' findings are merged.
    aliases = deduplicate({n: p[0] for n, p in pieces.items()}, tied_keys=tied_keys).aliases
    return {"tensors": entries, "aliases": aliases}, pieces


def _merge(records: list[dict[str, Any]], where: str) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    order: list[str] = []
    spec: dict[str, Any] = {}  # name -> (code, shape, {box: [ranks]})
    for rank, rec in enumerate(records):
        for name, code, shape, offs, sizes in rec["tensors"]:
            if name not in spec:
                order.append(name)
                spec[name] = (code, tuple(shape), {})
            code0, shape0, boxes = spec[name]
            if (code0, shape0) != (code, tuple(shape)):
                raise SerializationError(
                    f"{where}: tensor {name!r} is {code0} {list(shape0)} on one rank but {code} {shape} on rank "
                    f"{rank}; every rank must describe the same full tensor"
                )
            boxes.setdefault((tuple(offs), tuple(sizes)), []).append(rank)
    aliases: dict[str, str] = {}
    for rec in records:
        for alias, kept in rec["aliases"].items():
            if aliases.setdefault(alias, kept) != kept:
                raise SerializationError(
                    f"{where}: {alias!r} shares memory with {aliases[alias]!r} on one rank and {kept!r} on another"
                )
    for alias, kept in aliases.items():
        if kept in aliases or spec[alias][:2] != spec[kept][:2]:
            raise SerializationError(f"{where}: tied tensors {alias!r} and {kept!r} disagree between ranks")
    return order, spec, aliases


def _assign(
    name: str, shape: tuple[int, ...], boxes: dict[Box, list[int]], itemsize: int, load: list[int]
) -> list[_Write]:
    numel = 1
    for d in shape:
        numel *= d
    kept = [b for b in boxes if not any(o != b and contains(o, b) for o in boxes)]
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            if overlaps(a, b):
                raise SerializationError(
                    f"tensor {name!r}: ranks hold overlapping but different pieces {a} and {b} (offsets, sizes); "
                    "pieces must be disjoint, identical or nested"
                )
    covered = sum(box_numel(b) for b in kept)
    if covered != numel:
        raise SerializationError(
            f"tensor {name!r} of shape {list(shape)}: the ranks together hold {covered:,} of its {numel:,} "
            "elements; every element must be held by some rank"
        )
    holders = {b: sorted({r for o, rs in boxes.items() if contains(o, b) for r in rs}) for b in kept}
    out = []
    for b in sorted(kept, key=lambda b: (-box_numel(b), b)):
        cands = holders[b]
        parts = split_box(b, len(cands)) if len(cands) > 1 and box_numel(b) * itemsize >= SPLIT_BYTES else [b]
        for part in parts:
            rank = min(cands, key=lambda r: (load[r], r))
            load[rank] += box_numel(part) * itemsize
            source = next(o for o, rs in sorted(boxes.items()) if rank in rs and contains(o, part))
            out.append(_Write(name, part, source, rank))
    return out


def _plan(
    records: list[dict[str, Any]],
    max_shard_size: int | str | None,
    metadata: Mapping[str, str] | None,
    token: str,
    where: str,
    checksums: bool = False,
) -> _Plan:
    order, spec, aliases = _merge(records, where)
    stored = [n for n in order if n not in aliases]
    itemsize = {n: DTYPES[spec[n][0]].itemsize for n in order}
    shapes = {n: spec[n][1] for n in order}

    def nbytes(n: str) -> int:
        k = itemsize[n]
        for d in shapes[n]:
            k *= d
        return k

    shards = plan_shards([(n, nbytes(n)) for n in stored], max_shard_size)
    headers: dict[str, bytes] = {}
    data_start: dict[str, int] = {}
    file_of: dict[str, str] = {}
    all_entries: dict[str, list[tuple[str, str, list[int], int]]] = {}
    user_md: dict[str, dict[str, str]] = {}
    for fn, names in zip(shards.filenames, shards.shards):
        kept = set(names)
        md = _file_metadata(metadata, {a: k for a, k in aliases.items() if k in kept})
        # the reference order: dtype rank descending, then name (see format.writer.plan_write)
        ordered = sorted(names, key=lambda n: (-DTYPES[spec[n][0]].rank, n))
        entries = []
        for n in ordered:
            row = DTYPES[spec[n][0]]
            shape = list(shapes[n])
            if row.pack != 1:
                shape[-1] *= row.pack  # header stores logical values
            entries.append((n, row.code, shape, nbytes(n)))
        if checksums:
            # zero placeholders of the final width: the header is patched in place at commit
            header = build_header(entries, checksum_metadata(md, entries))
            all_entries[fn], user_md[fn] = entries, md
        else:
            header = build_header(entries, md)
        headers[fn] = encode_prefix(header) + header
        pos = len(headers[fn])
        for n in ordered:
            data_start[n] = pos
            file_of[n] = fn
            pos += nbytes(n)
    load = [0] * len(records)
    writes: list[_Write] = []
    for n in sorted(stored, key=lambda n: -nbytes(n)):  # large tensors first balance better
        writes.extend(_assign(n, shapes[n], spec[n][2], itemsize[n], load))
    return _Plan(
        shards.filenames, shards.weight_map, shards.total_size, headers, data_start, file_of,
        tuple(writes), shapes, itemsize, aliases, token, all_entries, user_md, checksums,
    )  # fmt: skip


def _slab(local: torch.Tensor, source: Box, box: Box) -> torch.Tensor:
    """The part of ``local`` (covering ``source``) that covers ``box``, contiguous on the CPU."""
    index = tuple(slice(o - so, o - so + s) for o, s, so in zip(box[0], box[1], source[0]))
    part = local[index] if index else local
    if part.device.type != "cpu":
        part = part.cpu()  # copy #1 for accelerator pieces: device -> host
    # safetensors bytes are row-major; a strided piece is copied once
    return part if part.is_contiguous() else part.contiguous()


Pieces = dict[str, list[list[int]]]  # tensor name -> [offset in the tensor, length, crc32c]


def _combined(plan: _Plan) -> set[str]:
    """Tensors whose checksum is combined from the writers' pieces; the others are read back."""
    count: dict[str, int] = {}
    for w in plan.writes:
        count[w.name] = count.get(w.name, 0) + run_count(plan.shapes[w.name], w.box)
    # combining costs a few microseconds of Python per piece: strided layouts with many runs
    # (a column-sharded matrix: one per row) are hashed by reading the written bytes back once
    return {n for n, c in count.items() if c <= MAX_PIECES}


def _write(
    plan: _Plan, directory: str, rank: int, pieces: Mapping[str, tuple[torch.Tensor, Box]], fsync: bool
) -> Pieces:
    mine = [w for w in plan.writes if w.rank == rank]
    combined = _combined(plan) if plan.checksums else set()
    crcs: Pieces = {}
    # file creation and headers are spread over the ranks that write; rank 0 when nobody does
    writers = sorted({w.rank for w in plan.writes}) or [0]
    headed = [fn for i, fn in enumerate(plan.filenames) if writers[i % len(writers)] == rank]
    files = set(headed) | {plan.file_of[w.name] for w in mine}
    fds: dict[str, int] = {}
    try:
        for fn in sorted(files):
            path = os.path.join(directory, f".tmp-{plan.token}-{fn}")
            fds[fn] = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        for fn in headed:
            size = len(plan.headers[fn]) + sum(plan.nbytes(n) for n, f in plan.file_of.items() if f == fn)
            # the final length up front (other ranks fill in their bytes); reserving the blocks
            # reports a full disk before any byte is written
            if delays_allocation(fds[fn]):
                preallocate(fds[fn], size)
            os.ftruncate(fds[fn], size)
            _pwrite(fds[fn], memoryview(plan.headers[fn]), 0)
        for w in mine:
            local, _ = pieces[w.name]
            part = _slab(local, w.source, w.box)
            view = tensor_bytes(part)
            fd, base = fds[plan.file_of[w.name]], plan.data_start[w.name]
            hashed = crcs.setdefault(w.name, []) if w.name in combined else None
            for goff, loff, length in runs(plan.shapes[w.name], w.box, plan.itemsize[w.name]):
                _pwrite(fd, view[loff : loff + length], base + goff)
                if hashed is not None:
                    hashed.append([goff, length, crc32c(view[loff : loff + length])])
        if fsync:
            for fd in fds.values():
                os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return crcs


def _read_back(plan: _Plan, directory: str, rank: int) -> dict[str, int]:
    """CRC32C of the strided tensors this rank is assigned, from the bytes every rank wrote."""
    combined = _combined(plan)
    load = [0] * (max((w.rank for w in plan.writes), default=0) + 1)
    out: dict[str, int] = {}
    names = sorted((n for n in plan.file_of if n not in combined), key=lambda n: (-plan.nbytes(n), n))
    buf = memoryview(bytearray(min(READ_BACK_CHUNK, max((plan.nbytes(n) for n in names), default=0))))
    for name in names:
        owner = min(range(len(load)), key=lambda r: (load[r], r))
        load[owner] += plan.nbytes(name)
        if owner != rank:
            continue
        path = os.path.join(directory, f".tmp-{plan.token}-{plan.file_of[name]}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            crc, pos, end = 0, plan.data_start[name], plan.data_start[name] + plan.nbytes(name)
            while pos < end:
                k = min(len(buf), end - pos)
                pread_into(fd, buf[:k], pos, source=path)
                crc = crc32c(buf[:k], crc)
                pos += k
        finally:
            os.close(fd)
        out[name] = crc
    return out


def _final_headers(plan: _Plan, gathered: list[dict[str, Any]]) -> dict[str, bytes]:
    pieces: dict[str, list[tuple[int, int, int]]] = {}
    crcs: dict[str, int] = {}
    for rec in gathered:
        for name, ps in rec["pieces"].items():
            pieces.setdefault(name, []).extend((a, b, c) for a, b, c in ps)
        crcs.update(rec["crcs"])
    out = {}
    for fn, entries in plan.entries.items():
        values = []
        for name, _, _, nbytes in entries:
            if name not in crcs:
                crcs[name] = combine_pieces(pieces.get(name, []), nbytes, name=name)
            values.append(crcs[name])
        header = build_header(entries, checksum_metadata(plan.user_metadata[fn], entries, values))
        out[fn] = encode_prefix(header) + header
        assert len(out[fn]) == len(plan.headers[fn]), "checksum values are fixed-width"
    return out


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes at offset {offset + done}")
        done += n


def _remove_temps(directory: str, plan: _Plan) -> None:
    for fn in plan.filenames:
        name = f".tmp-{plan.token}-{fn}"
        try:
            if not _referenced(directory, name):
                os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def _patch_headers(directory: str, plan: _Plan, fsync: bool, headers: Mapping[str, bytes]) -> None:
    for fn, header in headers.items():  # the checksum record replaces its placeholders, same length
        fd = os.open(os.path.join(directory, f".tmp-{plan.token}-{fn}"), os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            _pwrite(fd, memoryview(header), 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _commit_directory(directory: str, plan: _Plan, fsync: bool, headers: Mapping[str, bytes]) -> None:
    _patch_headers(directory, plan, fsync, headers)
    old = _committed_files(directory)
    temps = {fn: f".tmp-{plan.token}-{fn}" for fn in plan.filenames}
    _commit(directory, plan.filenames, temps, plan.weight_map, plan.total_size, old, fsync)
    keep = set(plan.filenames) | ({index_filename()} if len(plan.filenames) > 1 else set())
    _cleanup(directory, keep, old)


def _prepare(
    group: Group,
    state_dict: Mapping[str, torch.Tensor | Piece],
    directory: str,
    max_shard_size: int | str | None,
    metadata: Mapping[str, str] | None,
    tied_keys: TiedKeys | None,
    checksums: bool = False,
) -> tuple[_Plan, dict[str, tuple[torch.Tensor, Box]]]:
    """Describe, exchange and plan (three agreed steps); creates ``directory``."""
    pieces: dict[str, tuple[torch.Tensor, Box]] = {}

    def describe() -> dict[str, Any]:
        _file_metadata(metadata, {})  # validate before anything is created
        os.makedirs(directory, exist_ok=True)
        record, local = _describe(state_dict, tied_keys)
        pieces.update(local)
        if group.rank == 0:
            record["metadata"] = dict(metadata or {})
            record["token"] = uuid.uuid4().hex[:12]
        return record

    record = group.run(describe, "describing the local tensors")
    records = group.all_gather_json(record, "exchanging tensor metadata")
    plan = group.run(
        lambda: _plan(records, max_shard_size, records[0]["metadata"], records[0]["token"], directory, checksums),
        "planning",
    )
    return plan, pieces


def _write_and_hash(
    group: Group, plan: _Plan, directory: str, pieces: Mapping[str, tuple[torch.Tensor, Box]], fsync: bool
) -> dict[str, bytes]:
    """Every rank writes its bytes; with checksums, rank 0 gets the final headers (others: {})."""
    written = group.run(lambda: _write(plan, directory, group.rank, pieces, fsync), "writing the shards")
    if not plan.checksums:
        return {}
    mine = group.run(lambda: {"pieces": written, "crcs": _read_back(plan, directory, group.rank)}, "checksums")
    gathered = group.all_gather_json(mine, "exchanging checksums")
    return _final_headers(plan, gathered) if group.rank == 0 else {}


def write_file(
    state_dict: Mapping[str, torch.Tensor | Piece],
    path: str,
    group: Group,
    *,
    metadata: Mapping[str, str] | None = None,
    checksums: bool = False,
) -> int:
    """Collectively write one ``.safetensors`` file of full tensors at ``path``; returns its size.

    For files inside a directory that is committed as a whole later (a training step): the file
    is written under a temporary name, fsynced, and renamed to ``path`` by rank 0.
    """
    directory = os.path.dirname(path)
    plan, pieces = _prepare(group, state_dict, directory, None, metadata, None, checksums)
    (fn,) = plan.filenames
    tmp = os.path.join(directory, f".tmp-{plan.token}-{fn}")

    def finish(headers: Mapping[str, bytes]) -> None:
        if group.rank == 0:
            _patch_headers(directory, plan, True, headers)
            os.replace(tmp, path)

    try:
        headers = _write_and_hash(group, plan, directory, pieces, True)
        group.run(lambda: finish(headers), f"renaming {path}")
    except BaseException:
        _remove_temps(directory, plan)
        raise
    return len(plan.headers[fn]) + plan.total_size


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: PathLike,
    *,
    process_group: Any | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    tied_keys: TiedKeys | None = None,
    fsync: bool = True,
    checksums: bool = True,
    timeout: timedelta | float | None = None,
) -> SaveResult:
    """Collectively save DTensors and plain tensors as one checkpoint of full tensors.

    Every rank of ``process_group`` (default: the world) calls this with its state dict: values
    may be DTensors with any ``Shard``/``Replicate`` placements on 1-D or 2-D meshes (FSDP2,
    tensor parallel, uneven shards), tensors several ranks hold under one name (written once),
    or tensors only some ranks hold (the union is saved).  ``metadata`` is taken from rank 0.
    Each rank writes its own bytes in place; rank 0 commits once every rank has flushed.  A
    failure on any rank raises ``CheckpointError`` on every rank within ``timeout`` (default 10
    minutes per collective) and leaves the previous checkpoint in ``directory`` loadable.
    Ranks on several hosts need a shared filesystem.  ``checksums`` (on, as in
    ``torchst.save_state_dict``) records each tensor's CRC32C, combined from what each rank wrote.

    >>> import torchst.distributed as tsd
    >>> tsd.save_state_dict(fsdp_model.state_dict(), "ckpt", max_shard_size="5GB")  # doctest: +SKIP
    >>> torchst.load_state_dict("ckpt")  # full tensors, in any process  # doctest: +SKIP
    """
    group = Group(process_group, timeout, "torchst.distributed.save_state_dict")
    path = os.fspath(directory)

    def check() -> None:
        if path.endswith(".safetensors"):
            raise SerializationError(
                f"{path}: a collective save writes a directory (shards + index); give a directory name"
            )
        if os.path.exists(path) and not os.path.isdir(path):
            raise SerializationError(f"{path} exists and is not a directory")

    group.run(check, "checking the directory")
    plan, pieces = _prepare(group, state_dict, path, max_shard_size, metadata, tied_keys, checksums)
    try:
        headers = _write_and_hash(group, plan, path, pieces, fsync)
        group.run(lambda: _commit_directory(path, plan, fsync, headers) if group.rank == 0 else None, "committing")
    except BaseException:
        _remove_temps(path, plan)
        raise
    logger.info(
        "saved %d tensors (%d bytes) from %d ranks to %s", len(plan.weight_map), plan.total_size, group.size, path
    )
    idx = index_filename() if len(plan.filenames) > 1 else None
    return SaveResult(path, plan.filenames, idx, dict(plan.aliases), plan.total_size)
