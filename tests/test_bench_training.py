"""The training benchmark runs end to end in --quick mode and prints one JSON line per implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


@pytest.mark.multiprocess
def test_bench_training_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    records = {r["impl"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert list(records) == ["torchst-async", "torchst-sync", "torch.save", "dcp.save", "dcp.async_save"]
    for r in records.values():
        assert r["bench"] == "training_save" and r["checkpoint_bytes"] > 3_000_000
        assert len(r["runs"]) == 1 and r["blocked_s"] > 0 and r["durable_s"] >= r["blocked_s"]
    assert records["torch.save"]["ratio_vs_baseline"] == 1.0
    assert isinstance(records["torchst-async"]["met"], bool) and "torchst-sync" in records["torchst-async"]["target"]
    assert isinstance(records["torchst-sync"]["met_vs_dcp"], bool)
    assert list(tmp_path.iterdir()) == []  # scratch checkpoints are removed
