"""Every layout through the CLI and ``torchst.resolve``: files, sharded dirs, manager steps and runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchst
from torchst.cli import diff as cli_diff
from torchst.cli import main
from torchst.convert import ConvertResult, convert_checkpoint, load_legacy
from torchst.resolve import resolve, sniff


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _run(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A manager directory with steps 15 and 20 (model + AdamW state), returns (dir, model at step 20)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    with torchst.CheckpointManager(run, keep_last=5) as mgr:
        for step in (15, 20):
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
            mgr.save(step, {"model": model, "optim": opt, "extra": {"step": step}})
    return run, model


def test_resolve_names_every_layout(tmp_path: Path) -> None:
    run, model = _run(tmp_path)
    torchst.save_state_dict(
        {f"w{i}": torch.full((16,), float(i)) for i in range(4)}, tmp_path / "sh", max_shard_size=64
    )
    torchst.save_file({"a": torch.ones(2)}, tmp_path / "f.safetensors")
    assert resolve(tmp_path / "f.safetensors").kind == "file"
    sharded = resolve(tmp_path / "sh")
    assert sharded.kind == "sharded" and len(sharded.files) > 1 and sharded.parts[0].label == ""
    step = resolve(run / "step_20")
    assert step.kind == "step"
    assert [(p.label, p.role) for p in step.parts] == [("model", "weights"), ("state", "state")]
    assert set(step.parts[0].tensors) == set(model.state_dict())
    whole = resolve(run)
    assert whole.kind == "run" and whole.steps == (15, 20)
    assert list(whole.steps) == torchst.manager.layout.committed_steps(str(run))
    assert [p.label for p in whole.parts] == ["step_15/model", "step_15/state", "step_20/model", "step_20/state"]


def test_resolver_agrees_with_open_checkpoint(tmp_path: Path) -> None:
    emb = torch.randn(6, 3)
    sd = {"embed.weight": emb, "lm_head.weight": emb, "b": torch.arange(5), "c": torch.ones(7, dtype=torch.bfloat16)}
    for name, size in (("one", None), ("many", 40)):
        torchst.save_state_dict(sd, tmp_path / name, max_shard_size=size)
        ours, theirs = resolve(tmp_path / name).parts[0], torchst.sharding.open_checkpoint(tmp_path / name)
        assert ours.files == theirs.files and ours.aliases == theirs.aliases
        assert {n: (t.file, t.data_start, t.info) for n, t in ours.tensors.items()} == {
            n: tuple(v) for n, v in theirs.tensors.items()
        }


def test_state_file_name_matches_the_state_codec() -> None:
    from torchst import resolve as r
    from torchst.state import STATE_FILE

    assert r._STATE_FILE == STATE_FILE


def test_a_step_being_resaved_is_read_from_its_previous_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _run(tmp_path)
    (run / "step_20").rename(run / ".replaced-step_20-0123456789ab")  # a fallback re-save in between its renames
    assert resolve(run).steps == (15, 20)
    assert main(["verify", str(run)]) == 0
    assert "step_20: OK" in capsys.readouterr().out


def test_inspect_step_labels_weights_and_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _run(tmp_path)
    assert main(["inspect", str(run / "step_20")]) == 0
    out = capsys.readouterr().out
    assert "== model (model weights): model/model.safetensors" in out
    assert "== state (training state): state.safetensors" in out
    assert "0.weight" in out and "optim/state/" in out
    assert main(["inspect", str(run)]) == 0  # a run: one summary line per part
    out = capsys.readouterr().out
    assert "step_15/model (model weights): 4 tensors" in out and "0.weight" not in out
    assert main(["inspect", str(run), "--tensors"]) == 0
    assert "== step_20/model (model weights): step_20/model/model.safetensors" in capsys.readouterr().out
    assert main(["inspect", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "run" and doc["steps"] == [15, 20]
    assert [p["label"] for p in doc["parts"]] == ["step_15/model", "step_15/state", "step_20/model", "step_20/state"]
    assert doc["parts"][2]["tensors"]["2.bias"] == {
        "dtype": "F32",
        "shape": [2],
        "nbytes": 8,
        "file": "step_20/model/model.safetensors",
    }


def test_verify_run_checks_each_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _run(tmp_path)
    assert main(["verify", str(run), "--full"]) == 0
    out = capsys.readouterr().out
    assert "step_15: OK" in out and "step_20: OK" in out and "2 of 2 committed step(s) OK" in out
    state = run / "step_15" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-8])
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step_15: CORRUPT: " in out and "the manifest says" in out and "step_20: OK" in out
    assert main(["verify", str(run), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and [(c["step"], c["ok"]) for c in doc["checks"]] == [(15, False), (20, True)]


def test_diff_steps_compares_weights_and_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, model = _run(tmp_path)
    assert main(["diff", str(run / "step_15"), str(run / "step_20")]) == 1
    out = capsys.readouterr().out
    assert "~ model: 0.weight: max abs difference" in out
    assert "~ state: optim/state/" in out
    # A step against a plain checkpoint compares the step's model weights.
    torchst.save_model(model, tmp_path / "m.safetensors")
    assert main(["diff", str(run / "step_20"), str(tmp_path / "m.safetensors")]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", str(run / "step_15"), str(tmp_path / "m.safetensors"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["compared"] == [["model", ""]] and {d["name"] for d in doc["differences"]} >= {"0.weight"}
    # A run against a single checkpoint is ambiguous: a usage error.
    assert main(["diff", str(run), str(tmp_path / "m.safetensors")]) == 2
    assert "name one step directory" in capsys.readouterr().err


def test_diff_tied_transformers_checkpoint_equals_its_conversion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "hf")  # transformers drops the tied lm_head.weight
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")  # both names, one storage
    assert main(["convert", str(legacy), str(tmp_path / "conv")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "hf"), str(tmp_path / "conv")]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "lm_head.weight: tied to transformer.wte.weight" in out


def test_diff_reads_bytes_first_and_widens_only_differing_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_diff, "_CHUNK", 64)  # 16 floats per chunk
    base = {"x": torch.arange(100.0), "y": torch.ones(50), "z": torch.zeros(3, dtype=torch.int64)}
    changed = dict(base, x=base["x"].clone())
    changed["x"][40] += 0.5  # inside the third chunk only
    torchst.save_file(base, tmp_path / "a.safetensors")
    torchst.save_file(changed, tmp_path / "b.safetensors")
    widened: list[int] = []
    real = cli_diff.Comparer._widen

    def spy(self: cli_diff.Comparer, code: str, n: int) -> tuple[float, bool]:
        widened.append(n)
        return real(self, code, n)

    monkeypatch.setattr(cli_diff.Comparer, "_widen", spy)
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 1
    assert "~ x: max abs difference 0.5 (atol 0)" in capsys.readouterr().out
    assert widened == [64]
    widened.clear()
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")]) == 0
    assert widened == []
    # -0.0 and 0.0 differ in bytes, not in value: widened, then equal.
    torchst.save_file(dict(base, y=-torch.zeros(50)), tmp_path / "c.safetensors")
    torchst.save_file(dict(base, y=torch.zeros(50)), tmp_path / "d.safetensors")
    assert main(["diff", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors")]) == 0


def test_convert_decides_by_content_not_extension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "weights.safetensors")  # a zip archive despite its name
    torch.save(sd, tmp_path / "old.dat", _use_new_zipfile_serialization=False)
    torchst.save_file(sd, tmp_path / "real.bin")  # safetensors despite its name
    assert (sniff(str(tmp_path / "weights.safetensors")), sniff(str(tmp_path / "old.dat"))) == (
        "torch-zip",
        "torch-pickle",
    )
    for src in ("weights.safetensors", "old.dat", "real.bin"):
        dst = tmp_path / f"out-{src}.safetensors"
        assert main(["convert", str(tmp_path / src), str(dst)]) == 0, src
        back = torchst.load_file(dst)
        assert all(torch.equal(back[k], v) for k, v in sd.items()) and back.keys() == sd.keys()
    # Inspecting the legacy file explains what it is and how to convert it.
    assert main(["inspect", str(tmp_path / "weights.safetensors")]) == 2
    assert "torch.save checkpoint" in capsys.readouterr().err


def test_convert_sharded_transformers_bin_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    parts = [{"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4)}, {"b.weight": torch.randn(2, 4)}]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save(part, src / name)
        weight_map.update(dict.fromkeys(part, name))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = convert_checkpoint(src, tmp_path / "out", max_shard_size=100)
    assert isinstance(result, ConvertResult) and result.source_kind == "torch-zip" and result.tensors == 3
    back = torchst.load_state_dict(tmp_path / "out")
    assert back.keys() == weight_map.keys()
    assert torch.equal(back["b.weight"], parts[1]["b.weight"])
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(torchst.ShardIndexError, match="pytorch_model-00002-of-00002.bin"):
        load_legacy(src)


def test_convert_unwraps_a_nested_state_dict_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = _model().state_dict()
    torch.save({"epoch": 3, "state_dict": sd, "lr": 0.1}, tmp_path / "last.ckpt")
    with caplog.at_level(logging.INFO, logger="torchst"):
        out = load_legacy(tmp_path / "last.ckpt")
    assert out.keys() == sd.keys()
    assert any("under key 'state_dict'" in r.getMessage() and r.name == "torchst.convert" for r in caplog.records)
    assert any("weights_only=True" in r.getMessage() for r in caplog.records)
