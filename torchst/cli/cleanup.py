"""``torchst cleanup DIR [--dry-run]``: remove temporaries that interrupted saves left behind."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..sharding.debris import STALE_AFTER, cleanup, find_debris
from ._common import emit_json, human


def register(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "cleanup",
        parents=[common],
        help="remove hidden temporary files left by interrupted saves (never a committed file)",
        description="A sharded save killed midway leaves hidden .tmp-* shards (as large as the shards) until the "
        "next successful save. This removes them: never a file the committed index names, never while a save into "
        "the directory runs (it holds the directory lock), and single-file temporaries only once untouched for "
        f"--stale-after seconds (default {STALE_AFTER:.0f}).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="the checkpoint directory")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--stale-after", type=float, default=STALE_AFTER, metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    removed = cleanup(args.path, dry_run=args.dry_run, stale_after=args.stale_after)
    gone = {d.path for d in removed}
    kept = [] if args.dry_run else [d for d in find_debris(args.path) if d.path not in gone]
    if args.json:
        emit_json(
            {
                "path": args.path,
                "dry_run": args.dry_run,
                "removed": [{"path": d.path, "bytes": d.nbytes, "kind": d.kind} for d in removed],
                "kept": [{"path": d.path, "bytes": d.nbytes, "age_s": round(d.age, 1)} for d in kept],
            }
        )
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for d in removed:
        print(f"{verb} {os.path.basename(d.path)} ({human(d.nbytes)}, {d.kind})")
    for d in kept:
        print(f"kept {os.path.basename(d.path)}: modified {d.age:.0f} s ago, a save may still own it")
    total = human(sum(d.nbytes for d in removed))
    print(f"{args.path}: {verb} {len(removed)} leftover file(s), {total}" if removed else f"{args.path}: nothing to clean")
    return 0
