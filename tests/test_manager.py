"""CheckpointManager (synchronous): layout, commits, retention, locking, faults, restore."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import torchst
from torchst import CheckpointManager, KeepBest, KeepEvery, KeepLast
from torchst.errors import CheckpointError, CheckpointLockedError, CheckpointNotFoundError, SerializationError
from torchst.manager import AnyOf, StepInfo
from torchst.manager import writer as step_writer


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def fill(model: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_writes_the_documented_layout(tmp_path: Path) -> None:
    model = make_model()
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(7, {"model": model, "epoch": 2}, metrics={"loss": 0.25})
        assert mgr.steps() == [7] and mgr.latest_step() == 7
        step = tmp_path / "ckpt" / "step_7"
        assert sorted(os.listdir(tmp_path / "ckpt")) == [".lock", "step_7"]
        assert sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()) == [
            "manifest.json",
            "model/model.safetensors",
            "state.safetensors",
        ]
        manifest = json.loads((step / "manifest.json").read_text())
        assert manifest["format"] == "torchst.checkpoint" and manifest["step"] == 7
        assert (
            manifest["files"]["model/model.safetensors"]["size"]
            == (step / "model" / "model.safetensors").stat().st_size
        )
        assert manifest["tree"]["state"]["epoch"] == 2
        assert mgr.metrics(7) == {"loss": 0.25}
        assert mgr.path(7) == str(step)


def test_model_file_is_plain_safetensors_readable_by_the_reference(tmp_path: Path) -> None:
    model = make_model()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model})
    ref = safetensors.torch.load_file(tmp_path / "step_1" / "model" / "model.safetensors")
    assert ref.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(ref[k], v)


def test_transformers_reads_the_model_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)  # tied lm_head / wte: stored once
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, {"model": model})
        config.save_pretrained(Path(mgr.path(3)) / "model")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(Path(tmp_path) / "step_3" / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_restore_latest_and_a_chosen_step(tmp_path: Path) -> None:
    model = make_model()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (10, 20, 30):
        mgr.save(step, {"model": fill(model, step), "step": step})
    fresh = make_model(1)
    state: dict[str, Any] = {"model": fresh, "step": -1}
    assert mgr.restore(state) == 30 and state["step"] == 30
    assert all(torch.all(p == 30) for p in fresh.parameters())
    assert mgr.restore(state, step=10) == 10
    assert all(torch.all(p == 10) for p in fresh.parameters())
    with pytest.raises(
        CheckpointNotFoundError, match=r"step 15 is not a committed checkpoint; committed steps: \[10, 20, 30\]"
    ):
        mgr.restore(state, step=15)
    assert mgr.read(20)["model"]["0.weight"].eq(20).all()


def test_restore_from_an_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        CheckpointManager(tmp_path).restore({"model": make_model()})


def test_keep_last_deletes_only_older_committed_steps(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    model = make_model()
    for step in range(1, 6):
        mgr.save(step, {"model": fill(model, step)})
        assert mgr.steps() == list(range(max(1, step - 1), step + 1))
    assert sorted(os.listdir(tmp_path)) == [".lock", "step_4", "step_5"]


def test_retention_policies_combine(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, keep=KeepEvery(4) | KeepBest(1, "loss"))
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.8, 5: 0.7, 6: 0.6, 7: 0.4, 8: 0.3, 9: 0.35}
    for step, loss in losses.items():
        mgr.save(step, {"x": step}, metrics={"loss": loss})
    assert mgr.steps() == [2, 4, 8, 9]  # best (2), every 4th (4, 8), last two (8, 9)


def test_retention_policy_objects() -> None:
    infos = [StepInfo(s, {"acc": a}) for s, a in [(1, 0.5), (2, float("nan")), (3, 0.9), (4, 0.7)]] + [StepInfo(5)]
    assert KeepLast(2).keep(infos) == {4, 5}
    assert KeepEvery(2).keep(infos) == {2, 4}
    assert KeepBest(2, "acc", mode="max").keep(infos) == {3, 4}
    assert KeepBest(1, "acc").keep(infos) == {1}
    combined = KeepLast(1) | KeepEvery(3) | KeepBest(1, "acc", mode="max")
    assert isinstance(combined, AnyOf) and len(combined.policies) == 3
    assert combined.keep(infos) == {3, 5}
    with pytest.raises(ValueError, match=r"KeepLast\(n\) must be an int >= 1, found 0"):
        KeepLast(0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        KeepBest(1, "acc", mode="best")


def test_keep_last_none_keeps_everything(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in range(4):
        mgr.save(step, {"x": step})
    assert mgr.steps() == [0, 1, 2, 3]


def test_saving_an_existing_step_replaces_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"x": "old"})
    mgr.save(5, {"x": "new"})
    assert mgr.steps() == [5] and mgr.read(5)["x"] == "new"
    assert sorted(os.listdir(tmp_path)) == [".lock", "step_5"]


def test_leftovers_are_invisible_and_cleaned_up(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"x": 1})
    mgr.close()
    (tmp_path / ".tmp-step_2-0123456789ab").mkdir()
    (tmp_path / ".tmp-step_2-0123456789ab" / "state.safetensors").write_bytes(b"partial")
    (tmp_path / ".trash-step_0-0123456789ab").mkdir()
    (tmp_path / "step_3").mkdir()  # no manifest: never committed by us
    mgr = CheckpointManager(tmp_path)
    assert mgr.steps() == [1]
    assert sorted(os.listdir(tmp_path)) == [".lock", "step_1", "step_3"]


def test_replaced_step_is_recovered_when_the_new_copy_never_committed(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(4, {"x": "kept"})
    mgr.close()
    os.rename(tmp_path / "step_4", tmp_path / ".replaced-step_4-0123456789ab")  # crash between the renames
    mgr = CheckpointManager(tmp_path)
    assert mgr.steps() == [4] and mgr.read()["x"] == "kept"


@pytest.mark.multiprocess
def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    code = textwrap.dedent(
        f"""
        import torchst
        try:
            torchst.CheckpointManager({str(tmp_path)!r})
        except torchst.CheckpointLockedError as e:
            print("LOCKED", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("LOCKED"), out.stderr
    assert f"pid {os.getpid()}" in out.stdout and "read_only=True" in out.stdout
    mgr.close()


def test_second_writer_in_the_same_process_is_refused_until_close(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointLockedError) as info:
        CheckpointManager(tmp_path / ".")  # the same directory by another spelling
    msg = str(info.value)
    assert f"this process (pid {os.getpid()}) already has a CheckpointManager writing to this directory" in msg
    assert f"(opened at {__file__}:" in msg and "close() it before opening another one" in msg
    assert "another process" not in msg and "read_only=True" in msg
    reader = CheckpointManager(tmp_path, read_only=True)  # readers need no lock
    mgr.save(1, {"x": 1})
    assert reader.steps() == [1]
    with pytest.raises(CheckpointError, match="read-only"):
        reader.save(2, {"x": 2})
    mgr.close()
    CheckpointManager(tmp_path).close()


def test_disk_full_raises_clearly_and_keeps_earlier_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    model = make_model()
    mgr.save(1, {"model": fill(model, 1.0)})
    real = step_writer.write_tensors

    def full(f: Any, plan: Any, **kw: Any) -> None:
        f.write(plan.header)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(step_writer, "write_tensors", full)
    with pytest.raises(
        CheckpointError, match=r"saving step 2 failed: No space left on device \(ENOSPC\): the disk is full"
    ) as info:
        mgr.save(2, {"model": fill(model, 2.0)})
    assert "earlier checkpoints are intact (steps [1])" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == [".lock", "step_1"]  # no temporary directory left behind
    monkeypatch.setattr(step_writer, "write_tensors", real)
    fresh = make_model(3)
    assert mgr.restore({"model": fresh}) == 1 and all(torch.all(p == 1) for p in fresh.parameters())
    mgr.save(2, {"model": model})
    assert mgr.steps() == [2]


def test_permission_denied_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"x": 1})

    def denied(directory: str, step: int) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", directory)

    monkeypatch.setattr(step_writer, "new_temp_dir", denied)
    with pytest.raises(CheckpointError, match="Permission denied .EACCES.: permission denied: make the checkpoint"):
        mgr.save(2, {"x": 2})
    assert mgr.steps() == [1]


def test_vanished_directory_is_a_clear_error(tmp_path: Path) -> None:
    import shutil

    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, {"x": 1})
    shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint directory no longer exists"):
        mgr.save(2, {"x": 2})


def test_damaged_step_is_reported_not_loaded(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": make_model()})
    path = tmp_path / "step_1" / "model" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: \d+ bytes but the manifest says \d+; the step is damaged"
    ):
        mgr.restore({"model": make_model()})
    (tmp_path / "step_1" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest is not valid JSON"):
        mgr.read(1)


def test_bad_arguments(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(SerializationError, match="step must be an int >= 0"):
        mgr.save(-1, {"x": 1})
    with pytest.raises(SerializationError, match="metrics must be plain numbers"):
        mgr.save(1, {"x": 1}, metrics={"loss": torch.tensor(1.0)})
    with pytest.raises(SerializationError, match=r"state\['bad'\] is a builtins.object"):
        mgr.save(1, {"bad": object()})
    assert mgr.steps() == []
    with pytest.raises(TypeError, match="retention policy"):
        CheckpointManager(tmp_path / "other", keep=3)  # type: ignore[arg-type]
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        CheckpointManager(tmp_path / "missing", read_only=True)


def test_public_names_are_exported() -> None:
    assert torchst.CheckpointManager is CheckpointManager
    assert {"CheckpointManager", "KeepBest", "KeepEvery", "KeepLast"} <= set(torchst.__all__)


def test_bad_tensors_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    with pytest.raises(SerializationError, match="meta device"):
        mgr.save(1, {"x": torch.empty(2, device="meta")})
    mgr.wait()
    assert mgr.steps() == [] and sorted(os.listdir(tmp_path)) == [".lock"]


def test_grad_scaler_and_scheduler_round_trip(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"scaler": scaler})
        fresh = torch.amp.GradScaler("cpu")
        mgr.restore({"scaler": fresh})
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # e.g. a DataLoader worker that outlives the manager
        os.write(ready_w, b"x")  # fork handlers have run by now
        os.read(stop_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        mgr.close()
        CheckpointManager(tmp_path).close()  # the child still runs, yet the lock is free
    finally:
        os.write(stop_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, stop_r, stop_w):
            os.close(fd)
