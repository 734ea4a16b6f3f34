"""``torchst inspect PATH``: tensors, dtypes, shapes, sizes, aliases and metadata of any layout."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from ..format.checksum import CHECKSUM_KEY
from ..resolve import Layout, Part, resolve, user_metadata
from ._common import add_path, emit_json, human, numel, part_title, rel, show_progress


def register(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="list tensors, dtypes, shapes, sizes, aliases and metadata (reads headers only)",
        description="List what a checkpoint holds without reading tensor data. A manager step shows its model "
        "weights and training state separately; a run directory summarises every committed step.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path(p, "path", "what to inspect")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of the table")
    p.add_argument(
        "--tensors",
        action="store_true",
        help="for a run directory, list every tensor of every step (default: one summary line per part)",
    )
    p.set_defaults(run=run)


def part_doc(layout: Layout, part: Part) -> dict[str, Any]:
    """The JSON description of one part (also the top level of a one-part layout)."""
    infos = [t.info for t in part.tensors.values()]
    metadata: dict[str, str] = {}
    for md in part.metadata.values():
        metadata.update(user_metadata(md))
    names = {f: rel(layout, f) for f in part.files}  # once per file, not per tensor
    return {
        "label": part.label,
        "role": part.role,
        "files": list(names.values()),
        "tensors": {
            n: {
                "dtype": t.info.dtype,
                "shape": list(t.info.shape),
                "nbytes": t.info.nbytes,
                "file": names[t.file],
            }
            for n, t in sorted(part.tensors.items())
        },
        "total_bytes": sum(i.nbytes for i in infos),
        "parameters": sum(numel(i.shape) for i in infos),
        "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
        "metadata": metadata,
        "aliases": part.aliases,
        "checksums": sum(CHECKSUM_KEY in md for md in part.metadata.values()),
    }


def _summary(doc: dict[str, Any]) -> str:
    dtypes = ", ".join(f"{k} x{v}" for k, v in doc["dtypes"].items())
    n, sums = len(doc["files"]), doc["checksums"]
    checks = "no checksums"
    if sums:
        checks = "crc32c checksums " + ("in every file" if sums == n else f"in {sums} of {n} file(s)")
    return (
        f"{len(doc['tensors']):,} tensors, {doc['parameters']:,} parameters, {human(doc['total_bytes'])} "
        f"in {n} file(s); dtypes: {dtypes or 'none'}; {checks}"
    )


def _table(doc: dict[str, Any]) -> None:
    tensors = doc["tensors"]
    width = max((len(n) for n in tensors), default=4)
    many = len(doc["files"]) > 1
    for name, t in tensors.items():
        shard = f"  {t['file']}" if many else ""
        print(f"{name:<{width}}  {t['dtype']:>11}  {t['shape']!s:<20} {human(t['nbytes']):>10}{shard}")
    print(_summary(doc))
    for alias, kept in doc["aliases"].items():
        print(f"alias: {alias} -> {kept} (stored once)")
    if doc["metadata"]:
        print(f"metadata: {json.dumps(doc['metadata'], sort_keys=True)}")


def run(args: argparse.Namespace) -> int:
    layout = resolve(args.path, progress=show_progress(args))
    docs = [part_doc(layout, p) for p in layout.parts]
    if args.json:
        out: dict[str, Any] = {"path": layout.path, "kind": layout.kind}
        if layout.kind == "run":
            out["steps"] = list(layout.steps)
        if len(docs) == 1 and layout.kind in ("file", "sharded"):
            out.update(docs[0])  # one checkpoint: its fields at the top level
        out["parts"] = docs
        emit_json(out)
        return 0
    if layout.kind in ("file", "sharded"):
        _table(docs[0])
        return 0
    if layout.kind == "step":
        print(f"{layout.path}: CheckpointManager step with {len(docs)} part(s)")
    else:
        print(f"{layout.path}: CheckpointManager run, {len(layout.steps)} committed step(s): {list(layout.steps)}")
    for part, doc in zip(layout.parts, docs):
        if layout.kind == "run" and not args.tensors:
            print(f"{part_title(part)}: {_summary(doc)}")
            continue
        print(f"\n== {part_title(part)}: {', '.join(doc['files'])}")
        _table(doc)
    return 0
