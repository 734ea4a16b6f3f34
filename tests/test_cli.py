"""The command line: inspect, verify, convert, diff — outputs and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchst
from torchst.cli import main


def _tied_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    m[1].weight = m[0].weight
    return m


def test_inspect_lists_tensors_and_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.safetensors"
    torchst.save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.int8)}, p, metadata={"k": "v"})
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "a" in out and "F32" in out and "[2, 2]" in out
    assert "2 tensors, 7 parameters" in out
    assert '{"k": "v"}' in out


def test_inspect_json_is_machine_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.safetensors"
    torchst.save_file({"w": torch.zeros(4, 2, dtype=torch.bfloat16)}, p)
    assert main(["inspect", str(p), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tensors"]["w"] == {"dtype": "BF16", "shape": [4, 2], "nbytes": 16, "file": "x.safetensors"}
    assert doc["total_bytes"] == 16 and doc["parameters"] == 8


def test_convert_legacy_bin_to_sharded_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _tied_model()
    legacy = tmp_path / "pytorch_model.bin"
    torch.save(m.state_dict(), legacy)
    out_dir = tmp_path / "out"
    assert main(["convert", str(legacy), str(out_dir), "--max-shard-size", "100"]) == 0
    captured = capsys.readouterr()
    assert "weights_only=True" in captured.err
    assert (out_dir / "model.safetensors.index.json").exists()
    fresh = _tied_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    torchst.load_model(fresh, out_dir)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert main(["inspect", str(out_dir)]) == 0
    assert "alias: 1.weight -> 0.weight" in capsys.readouterr().out


def test_convert_refuses_a_pickled_object_that_is_not_a_state_dict(tmp_path: Path) -> None:
    legacy = tmp_path / "whole_model.pt"
    torch.save({"step": 3, "lr": 0.1}, legacy)
    assert main(["convert", str(legacy), str(tmp_path / "o.safetensors")]) == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_never_runs_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (tmp_path / "pwned",))

    legacy = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(1), "x": Evil()}, legacy)
    assert main(["convert", str(legacy), str(tmp_path / "o.safetensors")]) == 2
    assert not (tmp_path / "pwned").exists()


def test_verify_full_and_corrupt_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.safetensors"
    torchst.save_file({"a": torch.arange(100.0)}, p)
    assert main(["verify", str(p), "--full"]) == 0
    assert "OK: 1 tensors in 1 file(s)" in capsys.readouterr().out
    p.write_bytes(p.read_bytes()[:-4])
    assert main(["verify", str(p)]) == 1  # corruption found
    out = capsys.readouterr().out
    assert out.startswith("CORRUPT: ") and "FileSizeError" not in out and "truncated" in out and str(p) in out


def test_verify_reports_a_missing_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = {f"w{i}": torch.full((16,), float(i)) for i in range(4)}
    torchst.save_state_dict(sd, tmp_path / "ck", max_shard_size=64)
    shards = sorted((tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert main(["verify", str(tmp_path / "ck")]) == 1
    assert shards[-1].name in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nothing")]) == 2  # nothing there: unreadable input, not corruption
    assert "no such file or directory" in capsys.readouterr().err


def test_diff_exit_codes_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    torchst.save_file({"x": torch.ones(3), "i": torch.arange(3), "only_a": torch.zeros(1)}, a)
    torchst.save_file({"x": torch.ones(3) + 1e-3, "i": torch.tensor([0, 1, 5]), "only_b": torch.zeros(1)}, b)
    assert main(["diff", str(a), str(a)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "- only_a: only in first" in out and "+ only_b: only in second" in out
    assert "~ x: max abs difference" in out and "~ i: bytes differ" in out
    assert main(["diff", str(a), str(b), "--atol", "0.01"]) == 1
    assert "~ x" not in capsys.readouterr().out


def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    torchst.save_file({"a": torch.ones(1)}, p)
    out = subprocess.run(
        [sys.executable, "-m", "torchst", "verify", str(p)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "OK: 1 tensors" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "torchst", "frobnicate"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_diff_nan_positions_and_complex_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    nan = float("nan")
    torchst.save_file(
        {"c": torch.tensor([1 + 1j, 2j]), "n": torch.tensor([nan, 1.0]), "m": torch.tensor([nan, 2.0])}, a
    )
    torchst.save_file(
        {"c": torch.tensor([1 + 1j, 3j]), "n": torch.tensor([1.0, nan]), "m": torch.tensor([nan, 2.5])}, b
    )
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "~ c: max abs difference 1 (atol 0)",
        "~ m: max abs difference 0.5 (atol 0)",
        "~ n: max abs difference 0 (atol 0), NaN positions differ",
        "3 difference(s): 3 vs 3 tensors",
    ]


def test_verify_full_checks_recorded_checksums(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.safetensors"
    torchst.save_file({"a": torch.arange(100.0), "b": torch.ones(10)}, p, checksums=True)
    assert main(["verify", str(p), "--full"]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit inside a tensor: headers still valid
    p.write_bytes(bytes(raw))
    assert main(["verify", str(p)]) == 1  # recorded checksums are checked without --full too
    assert "CORRUPT" in capsys.readouterr().out
    assert main(["verify", str(p), "--full", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (check,) = doc["checks"]
    assert check["ok"] is False and check["error"] == "IntegrityError" and len(check["problems"]) == 1
