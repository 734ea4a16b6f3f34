"""``torchst verify PATH [--full]``: validate every header, index and manifest, check every recorded checksum.

Files that record per-tensor checksums are read whole and every tensor is checked (one line per
corrupted tensor); ``--full`` also reads the files that record none (finds I/O errors).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable
from typing import Any

from .._progress import progress
from ..errors import CheckpointNotFoundError, TorchstError
from ..resolve import Layout, committed_steps, resolve, step_layout
from ._common import add_path, emit_json, human, show_progress

_CHUNK = 8 << 20


def register(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="validate headers, shard index and manifests and check every recorded checksum (exit 1 if corrupt)",
        description="Check that a checkpoint is whole: every header valid, every shard the index names present "
        "and holding its tensors, every file a manager step lists present with its recorded size, and every "
        "tensor matching the CRC32C checksum recorded when it was saved (files that record checksums are read "
        "whole). A run directory checks each committed step and reports each one. Exit 1 when anything is "
        "damaged, with one line per corrupted tensor.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path(p, "path", "what to verify")
    p.add_argument(
        "--full", action="store_true", help="also read files that record no checksums (finds I/O errors)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    p.set_defaults(run=run)


def read_all(paths: Iterable[str], enabled: bool) -> int:
    """Read every byte of ``paths`` (the I/O check of ``--full``); returns the bytes read."""
    files = {f: os.path.getsize(f) for f in paths}
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    done = 0
    with progress(total=sum(files.values()), desc="Reading", enabled=enabled) as bar:
        for path, size in files.items():
            got = 0
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    got += n
                    bar.update(n)
            if got != size:  # the file changed while we read it
                raise OSError(f"{path}: read {got:,} bytes, expected {size:,}; is something writing it?")
            done += got
    return done


def checksums(layout: Layout, enabled: bool, step: tuple[str, int] | None) -> tuple[dict[str, Any], list[Any]]:
    """Check every recorded checksum of ``layout`` (``step``: run directory and step, to bind files to it)."""
    from ..format.checksum import verify_file

    total = sum(os.path.getsize(f) for f in layout.files)
    with progress(total=total, desc="Verifying", enabled=enabled) as bar:
        if step is not None:
            from ..manager.verify import verify_step

            report = verify_step(step[0], step[1], on_bytes=bar.update)
            files, problems = list(report.files), report.problems
        else:
            files = [verify_file(f, on_bytes=bar.update) for f in layout.files]
            problems = [p for f in files for p in f.problems]
    checked = [f for f in files if f.has_checksums]
    summary = {
        "files": len(files),
        "with_checksums": len(checked),
        "without": [f.path for f in files if not f.has_checksums],
        "bytes_checked": sum(f.nbytes for f in checked),
    }
    return summary, problems


def _problem(e: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"error": type(e).__name__, "message": str(e)}
    for key in ("path", "tensor", "byte_range"):
        if getattr(e, key, None) is not None:
            doc[key] = list(getattr(e, key)) if key == "byte_range" else getattr(e, key)
    return doc


def _check(make: Any, full: bool, enabled: bool, step: tuple[str, int] | None = None) -> dict[str, Any]:
    try:
        layout = make()
        sums, problems = checksums(layout, enabled, step)
        read = read_all(sums["without"], enabled) if full else 0
    except CheckpointNotFoundError:
        raise
    except TorchstError as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e)}
    if problems:
        return {
            "ok": False,
            "error": type(problems[0]).__name__,
            "message": f"{len(problems)} problem(s) found by the checksums",
            "problems": [_problem(p) for p in problems],
            "checksums": sums,
        }
    tensors = sum(len(p.tensors) for p in layout.parts)
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
        "tensors": tensors,
        "files": len(layout.files),
        "bytes_read": read + sums["bytes_checked"],
        "checksums": sums,
        "layout": layout,
    }


def _debris(path: str) -> list[Any]:
    from ..sharding.debris import find_debris

    return find_debris(path) if os.path.isdir(path) else []


def _sums_text(sums: dict[str, Any]) -> str:
    n, with_sums = sums["files"], sums["with_checksums"]
    if n and with_sums == n:
        return "every checksum matches"
    if with_sums:
        return f"checksums match in {with_sums} of {n} file(s); {n - with_sums} record none (headers only)"
    return "no checksums recorded (headers only; --full reads every byte)"


def _step_of(path: str) -> tuple[str, int] | None:
    """(run directory, step) when ``path`` is a committed step directory ``step_<n>``."""
    m = re.match(r"^step_(\d+)$", os.path.basename(os.path.normpath(path)))
    if m and os.path.exists(os.path.join(path, "manifest.json")):
        return os.path.dirname(os.path.normpath(path)) or ".", int(m.group(1))
    return None


def run(args: argparse.Namespace) -> int:
    bars = show_progress(args)
    path = args.path
    what = "headers, index and manifests validated"
    results: dict[int | None, dict[str, Any]]
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "manifest.json")) and committed_steps(path):
        results = {
            s: _check(lambda s=s: step_layout(path, s, progress=bars), args.full, bars, (path, s))
            for s in committed_steps(path)
        }
        kind = "run"
    else:
        results = {None: _check(lambda: resolve(path, progress=bars), args.full, bars, _step_of(path))}
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
            read = f" ({human(r['bytes_read'])} read)" if args.full else ""
            sums = _sums_text(r["checksums"])
            print(f"{where}OK: {r['tensors']:,} tensors in {r['files']} file(s), {what}, {sums}{read}")
        elif "problems" in r:
            for problem in r["problems"]:
                print(f"{where}CORRUPT: {problem['message']}")
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
