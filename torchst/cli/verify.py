"""``torchst verify PATH [--full]``: validate every header, index and manifest; ``--full`` reads every byte."""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

from .._progress import progress
from ..errors import CheckpointNotFoundError, TorchstError
from ..resolve import Layout, committed_steps, resolve, step_layout
from ._common import add_path, emit_json, human, show_progress

_CHUNK = 8 << 20


def register(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="validate headers, shard index and manifests; --full also reads every byte (exit 1 if corrupt)",
        description="Check that a checkpoint is whole: every header valid, every shard the index names present "
        "and holding its tensors, every file a manager step lists present with its recorded size. A run "
        "directory checks each committed step and reports each one. Exit 1 when anything is damaged.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path(p, "path", "what to verify")
    p.add_argument("--full", action="store_true", help="also read every tensor byte from disk (finds I/O errors)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    p.set_defaults(run=run)


class FullCheck(NamedTuple):
    """What ``--full`` found: bytes read, files whose checksums were checked, corruption found."""

    bytes_read: int
    checksummed: int
    problems: list[str]


def read_all(layout: Layout, enabled: bool) -> FullCheck:
    """Read every byte of ``layout``, checking the per-tensor checksums of files that record them."""
    from ..format.checksum import verify_file  # imports torch; only --full gets here

    files = {f: os.path.getsize(f) for f in layout.files}
    view = memoryview(bytearray(_CHUNK))
    done, checksummed, problems = 0, 0, []
    with progress(total=sum(files.values()), desc="Reading", enabled=enabled) as bar:
        for path, size in files.items():
            seen = [0]

            def counted(n: int, seen: list[int] = seen) -> None:
                seen[0] += n
                bar.update(n)

            report = verify_file(path, on_bytes=counted)  # reads the file only if it records checksums
            if report.has_checksums:
                checksummed += 1
                problems += [str(e) for e in report.problems]
                done += size
                bar.update(max(0, size - seen[0]))  # the header
                continue
            got = 0
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    got += n
                    bar.update(n)
            if got != size:  # the file changed while we read it
                raise OSError(f"{path}: read {got:,} bytes, expected {size:,}; is something writing it?")
            done += got
    return FullCheck(done, checksummed, problems)


def _check(make: Any, full: bool, enabled: bool) -> dict[str, Any]:
    try:
        layout = make()
        found = read_all(layout, enabled) if full else FullCheck(0, 0, [])
    except CheckpointNotFoundError:
        raise
    except TorchstError as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e)}
    if found.problems:
        return {
            "ok": False,
            "error": "IntegrityError",
            "message": "; ".join(found.problems),
            "problems": found.problems,
        }
    unindexed = {f: list(names) for p in layout.parts for f, names in p.unindexed.items()}
    if unindexed:
        count = sum(map(len, unindexed.values()))
        path, names = next(iter(unindexed.items()))
        return {
            "ok": False,
            "error": "UnindexedTensors",
            "message": f"{count} tensor(s) stored in shards are not listed by the index, so loaders never read them "
            f"(e.g. {names[0]!r} in {path}); the index and the shards come from different saves",
            "unindexed": unindexed,
        }
    return {
        "ok": True,
        "tensors": sum(len(p.tensors) for p in layout.parts),
        "files": len(layout.files),
        "bytes_read": found.bytes_read,
        "checksummed_files": found.checksummed,
        "layout": layout,
    }


def _debris(path: str) -> list[Any]:
    from ..sharding.debris import find_debris

    return find_debris(path) if os.path.isdir(path) else []


def run(args: argparse.Namespace) -> int:
    bars = show_progress(args)
    path = args.path
    what = "headers, index and manifests validated" + (", every byte read" if args.full else "")
    results: dict[int | None, dict[str, Any]]
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "manifest.json")) and committed_steps(path):
        results = {
            s: _check(lambda s=s: step_layout(path, s, progress=bars), args.full, bars) for s in committed_steps(path)
        }
        kind = "run"
    else:
        results = {None: _check(lambda: resolve(path, progress=bars), args.full, bars)}
        kind = results[None]["layout"].kind if results[None]["ok"] else "unknown"
    ok = all(r["ok"] for r in results.values())
    debris = _debris(path)  # leftovers of interrupted saves: worth knowing, not damage
    if args.json:
        checks = []
        for step, r in results.items():
            entry = {k: v for k, v in r.items() if k != "layout"}
            if step is not None:
                entry["step"] = step
            checks.append(entry)
        leftovers = [{"path": d.path, "bytes": d.nbytes, "age_s": round(d.age, 1), "kind": d.kind} for d in debris]
        emit_json({"path": path, "kind": kind, "ok": ok, "full": args.full, "checks": checks, "debris": leftovers})
        return 0 if ok else 1
    for step, r in results.items():
        where = f"step_{step}: " if step is not None else ""
        if r["ok"]:
            read = ""
            if args.full:
                sums = f", checksums verified in {r['checksummed_files']} of {r['files']} file(s)"
                read = f" ({human(r['bytes_read'])} read{sums if r['checksummed_files'] else ''})"
            print(f"{where}OK: {r['tensors']:,} tensors in {r['files']} file(s), {what}{read}")
        else:
            print(f"{where}CORRUPT: {r['message']}")
    if debris:
        print(
            f"note: {len(debris)} temporary file(s) left by interrupted saves ({human(sum(d.nbytes for d in debris))}),"
            f" e.g. {os.path.basename(debris[0].path)}; remove them with `torchst cleanup {path}`"
        )
    if kind == "run":
        bad = [s for s, r in results.items() if not r["ok"]]
        print(
            f"{len(results) - len(bad)} of {len(results)} committed step(s) OK" + (f"; damaged: {bad}" if bad else "")
        )
    return 0 if ok else 1
