"""CLI benchmarks: start-up of header-only commands and the cost of ``torchst diff``.

Two scenarios, each against a baseline measured in the same run, rounds alternating between
implementations (≥ 7 by default), one JSON line per implementation with median/min/max:

- ``startup``: ``torchst inspect`` of a 10,000-tensor file in a fresh process, against
  ``python -c "import torch"`` (target: ≤ 0.2× — header-only commands never import torch).
- ``diff_identical``: ``torchst diff A B`` of two equal checkpoints (page-cache regime: both
  files were just written), against reading every byte of both files (target: ≤ 2×, since
  bytes are compared first).  ``diff_changed`` (every float tensor differs, so every chunk is
  widened) is reported for context, without a target.

    python benchmarks/bench_cli.py                  # 7 rounds, 1 GiB checkpoints
    python benchmarks/bench_cli.py --quick          # smoke test: tiny files, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import MIB, emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_files(tmp: str, tensors: int, diff_mib: int) -> dict[str, str]:
    import torch

    import torchst

    paths = {k: os.path.join(tmp, f"{k}.safetensors") for k in ("many", "a", "b", "c")}
    torchst.save_file({f"layers.{i}.weight": torch.zeros(4) for i in range(tensors)}, paths["many"])
    # diff_mib of float32 in tensors of 16 MiB at most (a realistic mix of shapes).
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {}
    left, i = diff_mib * MIB // 4, 0
    while left > 0:
        n = min(left, 4 * MIB)
        sd[f"w{i}"] = torch.randn(n, generator=gen)
        left -= n
        i += 1
    torchst.save_file(sd, paths["a"])
    torchst.save_file(sd, paths["b"])
    torchst.save_file({k: v + 1e-3 for k, v in sd.items()}, paths["c"])
    return paths


def _subprocess_seconds(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def _read_both(a: str, b: str) -> None:
    buf = memoryview(bytearray(8 * MIB))
    for path in (a, b):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _diff(a: str, b: str, expect: int) -> Callable[[], None]:
    from torchst.cli import main

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["diff", a, b, "-q"])
        assert code == expect, f"torchst diff exited {code}, expected {expect}"

    return run


def _rounds(impls: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Alternate implementations, rotating which goes first in each round."""
    names = list(impls)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(impls[name]())
    return out


def _report(
    bench: str, baseline: str, runs: dict[str, list[float]], target: float | None, extra: dict[str, Any]
) -> None:
    base = statistics.median(runs[baseline])
    for impl, xs in runs.items():
        med = statistics.median(xs)
        record: dict[str, Any] = {
            "bench": bench,
            "impl": impl,
            "baseline": baseline,
            "median_s": round(med, 4),
            "min_s": round(min(xs), 4),
            "max_s": round(max(xs), 4),
            "runs": [round(x, 4) for x in xs],
            "ratio_vs_baseline": round(med / base, 3),
            **extra,
        }
        if impl != baseline and target is not None:
            record["target"] = target
            record["met"] = med / base <= target
        emit(record)


def _timer(fn: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny files, one round: a smoke test")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 7, quick 1)")
    p.add_argument("--diff-mib", type=int, default=None, help="size of each diffed checkpoint (default 1024)")
    p.add_argument("--tensors", type=int, default=10_000, help="tensors in the start-up file (default 10,000)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 7)
    diff_mib = args.diff_mib or (4 if args.quick else 1024)
    tmp = tempfile.mkdtemp(prefix="bench_cli-", dir=args.dir)
    try:
        paths = _make_files(tmp, args.tensors, diff_mib)
        py = sys.executable
        startup = _rounds(
            {
                "python -c 'import torch'": lambda: _subprocess_seconds([py, "-c", "import torch"]),
                "torchst inspect": lambda: _subprocess_seconds([py, "-m", "torchst", "inspect", paths["many"], "-q"]),
            },
            rounds,
        )
        _report("startup", "python -c 'import torch'", startup, 0.2, {"tensors": args.tensors})
        a, b, c = paths["a"], paths["b"], paths["c"]
        _diff(a, b, 0)()  # warm-up: imports, page cache
        runs = _rounds(
            {
                "read both": _timer(lambda: _read_both(a, b)),
                "torchst diff": _timer(_diff(a, b, 0)),
            },
            rounds,
        )
        extra = {"mib_each": diff_mib, "regime": "page cache"}
        _report("diff_identical", "read both", runs, 2.0, extra)
        changed = _rounds(
            {"read both": _timer(lambda: _read_both(a, c)), "torchst diff": _timer(_diff(a, c, 1))}, rounds
        )
        _report("diff_changed", "read both", changed, None, extra)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
