"""Per-tensor checksums: what they cost on save, and how fast ``verify`` checks a checkpoint.

Two measurements, one JSON line per implementation (median, min and max of alternating rounds
in one interpreter, so both sides see the same machine state):

- ``save_checksums``: ``torchst.save_model`` of a ~2 GB fp32 model (page cache, 500 MB shards)
  with checksums (the default) against ``checksums=False``.  Target: at most 10% slower.
- ``verify_throughput``: ``torchst.format.checksum.verify_file`` over every shard against a plain
  sequential read of the same files (warm page cache both).  Target: at least 0.8x its speed.

    python benchmarks/bench_integrity.py              # ~2 GB, 7 rounds
    python benchmarks/bench_integrity.py --quick      # 64 MB, 1 round (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MIB, emit

import torchst
from torchst.format.checksum import verify_file

SAVE_TARGET = 1.10  # checksummed save time / plain save time
VERIFY_TARGET = 0.8  # verify throughput / plain read throughput


def make_model(total_bytes: int, width: int) -> nn.Module:
    layers = max(1, total_bytes // (width * width * 4))
    with torch.no_grad():
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
        for p in model.parameters():
            p.uniform_(-1, 1)  # real data: untouched pages would hash as zeros from the zero page
    return model


def plain_read(paths: list[str], chunk: int = 16 * MIB) -> int:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def verify_all(paths: list[str]) -> int:
    total = 0
    for path in paths:
        report = verify_file(path)
        assert report.ok and report.has_checksums, report.problems
        total += report.nbytes
    return total


def rounds(fns: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Run each function once per round, rotating which goes first."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(n):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def line(bench: str, impl: str, runs: list[float], baseline: str, base_runs: list[float], **extra: object) -> None:
    med, base = statistics.median(runs), statistics.median(base_runs)
    emit(
        {
            "bench": bench,
            "impl": impl,
            "baseline": baseline,
            "median_s": round(med, 4),
            "min_s": round(min(runs), 4),
            "max_s": round(max(runs), 4),
            "runs": [round(x, 4) for x in runs],
            "ratio_vs_baseline": round(med / base, 3),
            **extra,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=2048, help="model size in MB (default 2048)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="64 MB, 1 round: checks that the script runs")
    args = ap.parse_args()
    size_mb, n = (64, 1) if args.quick else (args.size_mb, args.rounds)
    width = 1024 if args.quick else 4096
    scratch = tempfile.mkdtemp(prefix="bench-integrity-", dir=args.dir)
    try:
        model = make_model(size_mb * 1000 * 1000, width)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        shard = max(nbytes // 4, 1)
        on, off = os.path.join(scratch, "on"), os.path.join(scratch, "off")
        times = rounds(
            {
                "checksums": lambda: torchst.save_model(model, on, max_shard_size=shard),
                "no_checksums": lambda: torchst.save_model(model, off, max_shard_size=shard, checksums=False),
            },
            n,
        )
        ratio = statistics.median(times["checksums"]) / statistics.median(times["no_checksums"])
        common = {"bytes": nbytes, "rounds": n}
        line("save_checksums", "no_checksums", times["no_checksums"], "no_checksums", times["no_checksums"], **common)
        line(
            "save_checksums", "checksums", times["checksums"], "no_checksums", times["no_checksums"],
            target=f"<= {SAVE_TARGET}", met=ratio <= SAVE_TARGET, **common,
        )  # fmt: skip
        paths = sorted(os.path.join(on, f) for f in os.listdir(on) if f.endswith(".safetensors"))
        plain_read(paths)  # warm the page cache: both sides read from memory
        times = rounds({"plain_read": lambda: plain_read(paths), "verify": lambda: verify_all(paths)}, n)
        size = sum(os.path.getsize(p) for p in paths)
        speed = {k: size / statistics.median(v) / 1e9 for k, v in times.items()}
        line("verify_throughput", "plain_read", times["plain_read"], "plain_read", times["plain_read"],
             gb_per_s=round(speed["plain_read"], 2), bytes=size, rounds=n)  # fmt: skip
        line(
            "verify_throughput", "verify", times["verify"], "plain_read", times["plain_read"],
            gb_per_s=round(speed["verify"], 2), throughput_vs_read=round(speed["verify"] / speed["plain_read"], 3),
            target=f">= {VERIFY_TARGET}", met=speed["verify"] / speed["plain_read"] >= VERIFY_TARGET,
            bytes=size, rounds=n,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
