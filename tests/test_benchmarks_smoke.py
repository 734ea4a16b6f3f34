"""The format benchmark script runs end to end in --quick mode and prints well-formed lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_format.py"


@pytest.mark.multiprocess
def test_bench_format_quick_prints_one_json_line_per_measurement(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    tmpfs = tmp_path / "tmpfs"
    disk.mkdir()
    tmpfs.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(disk), "--tmpfs", str(tmpfs)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    benches = {r["bench"] for r in records}
    assert benches == {
        "lazy_10k",
        "load_file_10k",
        "load_touch",
        "save_tmpfs",
        "save_disk",
        "save_disk_durable",
        "read_tmpfs_warm",
        "read_disk_cold",
    }
    for r in records:
        assert r["median_s"] > 0 and len(r["runs"]) == 1 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["peak_rss_mib"] > 0
        assert r["ratio_vs_baseline"] > 0
    # Every bench has its baseline measured in the same run, at ratio 1.
    for bench in benches:
        lines = [r for r in records if r["bench"] == bench]
        base = [r for r in lines if r["impl"] == r["baseline"] and r["backend"] in (None, "mmap")]
        assert len(base) == 1 and base[0]["ratio_vs_baseline"] == 1.0
        assert any(r["impl"] == "torchst" and isinstance(r.get("met"), bool) for r in lines)
    # Scratch files are cleaned up.
    assert list(disk.iterdir()) == [] and list(tmpfs.iterdir()) == []
