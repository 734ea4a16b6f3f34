"""benchmarks/bench_cli.py runs end to end in --quick mode and prints well-formed lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cli.py"


@pytest.mark.slow  # several fresh interpreters that import torch: ~20 s on a busy 2-core machine
@pytest.mark.multiprocess
def test_bench_cli_quick_reports_every_scenario_against_its_baseline(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--tensors", "200", "--dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["bench"], r["impl"]) for r in records] == [
        ("startup", "python -c 'import torch'"),
        ("startup", "torchst inspect"),
        ("diff_identical", "read both"),
        ("diff_identical", "torchst diff"),
        ("diff_changed", "read both"),
        ("diff_changed", "torchst diff"),
    ]
    for r in records:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and len(r["runs"]) == 1
        assert (r["ratio_vs_baseline"] == 1.0) == (r["impl"] == r["baseline"])
    assert [r["target"] for r in records if "target" in r] == [0.2, 2.0]
    assert list(tmp_path.iterdir()) == []  # scratch files removed
