"""The GPU benchmark and check script, dry-run on CPU: bit-exact checks, JSON lines, missing baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        import bench_gpu

        yield bench_gpu
    finally:
        sys.path.remove(str(BENCH))


def test_check_exact_catches_one_flipped_bit_a_wrong_dtype_and_a_missing_tensor(bench: Any) -> None:
    from _gpu_jobs import check_exact, expected

    names = {"a.weight", "b.weight", "model.embed_tokens.weight", "lm_head.weight"}
    good = {n: expected(n, (3, 5), "cpu") for n in names}
    assert check_exact(good, names, "cpu") == {"exact": True, "checked": 4, "mismatched": [], "missing": []}
    stored_only = {n: t for n, t in good.items() if n != "lm_head.weight"}  # file loaders skip tied aliases
    assert check_exact(stored_only, names, "cpu")["exact"]
    flipped = dict(good)
    bits = flipped["a.weight"].clone().view(torch.int16)
    bits[1, 2] ^= 1  # the lowest mantissa bit of one value
    flipped["a.weight"] = bits.view(torch.bfloat16)
    assert check_exact(flipped, names, "cpu")["mismatched"] == ["a.weight"]
    cast = {**good, "b.weight": good["b.weight"].float()}
    res = check_exact(cast, names, "cpu")
    assert not res["exact"] and res["mismatched"] == ["b.weight (torch.float32 on cpu)"]
    res = check_exact({"a.weight": good["a.weight"]}, names, "cpu")
    assert not res["exact"] and res["missing"] == ["b.weight", "model.embed_tokens.weight"]
    fp16 = {n: t.half() for n, t in good.items()}
    assert check_exact(fp16, names, "cpu", cast=torch.float16)["exact"]


def test_report_fails_on_an_inexact_torchst_load_and_computes_targets(bench: Any, capsys: Any) -> None:
    by = {
        ("prepare", None): {"bytes": 8 * 10**9, "tensors": 3, "shards": 2},
        ("load", "torchst.load_state_dict"): {
            "runs": [0.5, 0.4, 0.45],
            "exact": False,
            "checked": 2,
            "mismatched": ["w"],
            "missing": [],
        },
        ("load", "safetensors.load_file"): {
            "runs": [2.0],
            "exact": True,
            "checked": 3,
            "mismatched": [],
            "missing": [],
        },
        ("load", "transformers"): {"error": "RuntimeError: boom"},
        ("save", "torchst-sync"): {
            "blocked": [2.0],
            "durable": [2.0],
            "bytes": 10,
            "exact": True,
            "checked": 4,
            "mismatched": [],
        },
        ("save", "torchst-async"): {
            "blocked": [0.1],
            "durable": [2.1],
            "bytes": 10,
            "exact": True,
            "checked": 4,
            "mismatched": [],
        },
    }
    loads = ["torchst.load_state_dict", "safetensors.load_file", "fastsafetensors", "transformers"]
    missing = {"fastsafetensors": "not importable here", "torchst.load_state_dict": None}
    failed = bench._report(
        by, by[("prepare", None)], missing, loads, ["torchst-sync", "torchst-async"], "cuda:0", False, "ext4"
    )
    assert failed
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    loaded = {r["impl"]: r for r in lines if r["bench"] == "gpu_load"}
    assert loaded["torchst.load_state_dict"]["gb_per_s"] == 17.778  # 8 GB / 0.45 s
    assert loaded["torchst.load_state_dict"]["speedup_vs_safetensors.load_file"] == 4.444
    assert loaded["torchst.load_state_dict"]["mismatched"] == ["w"]
    assert loaded["fastsafetensors"]["status"] == "missing"
    assert loaded["transformers"] == {**loaded["transformers"], "status": "error", "reason": "RuntimeError: boom"}
    targets = {r["target"]: r for r in lines if r["bench"] == "gpu_target"}
    assert targets["GB/s page cache -> device"]["met"] is False
    assert targets["speedup vs safetensors.load_file"]["met"] is True
    assert (
        targets["speedup vs fastsafetensors"]["met"] is None
        and "fastsafetensors" in targets["speedup vs fastsafetensors"]["reason"]
    )
    assert targets["async blocked / sync blocked"] == {
        **targets["async blocked / sync blocked"],
        "value": 0.05,
        "met": True,
    }
    assert targets["every torchst tensor bit-exact on the device"]["met"] is False


@pytest.mark.multiprocess
def test_bench_gpu_tiny_dry_run_on_cpu(tmp_path: Path) -> None:
    impls = (
        "torchst.load_state_dict,torchst.load_model,safetensors.load_file,fastsafetensors,torchst-sync,torchst-async"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_gpu.py"),
            "--device",
            "cpu",
            "--tiny",
            "--dir",
            str(tmp_path),
            "--impls",
            impls,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines[0]["bench"] == "gpu_env" and lines[0]["device"] == "cpu"
    by = {(r["bench"], r.get("impl"), r.get("target")): r for r in lines}
    copy = by[("gpu_copy", "pageable_h2d", None)]
    assert copy["gb_per_s"] > 0 and copy["exact"] is True
    for impl in ("torchst.load_state_dict", "torchst.load_model", "safetensors.load_file"):
        r = by[("gpu_load", impl, None)]
        assert r["exact"] is True and r["tensors_checked"] >= 20 and r["gb_per_s"] > 0, r
    fast = by[("gpu_load", "fastsafetensors", None)]
    if fast.get("status") == "missing":
        assert "gpu_wheels.sh" in fast["reason"]
        assert by[("gpu_target", "torchst.load_model", "speedup vs fastsafetensors")]["met"] is None
    else:
        assert fast["exact"] is True
    for impl in ("torchst-sync", "torchst-async"):
        r = by[("gpu_save", impl, None)]
        assert r["exact"] is True and r["blocked_s"] > 0 and r["durable_s"] >= r["blocked_s"], r
    assert by[("gpu_target", "torchst", "every torchst tensor bit-exact on the device")]["met"] is True
    assert isinstance(by[("gpu_target", "torchst-async", "async blocked / sync blocked")]["met"], bool)
    assert list(tmp_path.iterdir()) == []  # scratch checkpoints are removed


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_gpu_check_fails_fast_and_clearly_without_cuda(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "OUT": str(tmp_path)},
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()  # one line says why
    assert line.startswith(f"gpu_check: FAIL no CUDA device: torch {torch.__version__} (")
    assert line.endswith("sees no GPU; run this on a machine with an NVIDIA GPU")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.txt"]  # nothing ran
    assert "FAIL no CUDA device" in (tmp_path / "summary.txt").read_text()
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gpu_check_dry_run_on_cpu_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        check=False,
        capture_output=True,
        text=True,
        timeout=400,
        env={**ENV, "OUT": str(out), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_DIR": str(tmp_path / "scratch")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench_gpu.jsonl", "bench_gpu.log", "env.txt", "pytest-gpu.log", "pytest-gpu.xml", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN on CPU" in summary and "PASS in" in summary and "target every torchst tensor" in summary
    records = [json.loads(x) for x in (out / "bench_gpu.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in records} >= {"gpu_env", "gpu_copy", "gpu_load", "gpu_save", "gpu_target"}
