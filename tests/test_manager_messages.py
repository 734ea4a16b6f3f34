"""What a user reads when a run directory is damaged or hostile, and names the layout reserves."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from torchst import CheckpointManager
from torchst.errors import CheckpointError
from torchst.manager import layout
from torchst.manager import manager as manager_module
from torchst.state.codec import RESERVED_NAMES, STATE_FILE


def saved(tmp_path: Path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": torch.nn.Linear(3, 2), "epoch": 1})
    return mgr


def test_a_deeply_nested_manifest_is_a_checkpoint_error(tmp_path: Path) -> None:
    mgr = saved(tmp_path)
    manifest = tmp_path / "step_1" / "manifest.json"
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError) as info:
        mgr.restore({"model": torch.nn.Linear(3, 2)})
    assert str(info.value) == (
        f"{manifest}: manifest nests deeper than Python can parse; torchst never writes such a manifest, "
        "so the step is damaged or was not written by torchst"
    )
    with pytest.raises(CheckpointError, match="nests deeper than Python can parse"):
        mgr.metrics(1)


def test_a_parseable_but_deeply_nested_state_tree_is_a_checkpoint_error(tmp_path: Path) -> None:
    mgr = saved(tmp_path)
    path = tmp_path / "step_1" / "manifest.json"
    manifest = json.loads(path.read_text())
    deep: object = 0
    for _ in range(900):  # json parses it; decoding it would exhaust the Python stack
        deep = [deep]
    manifest["tree"]["state"]["epoch"] = deep
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"step_1: the state tree nests too deeply to restore$"):
        mgr.restore({"epoch": 0})
    with pytest.raises(CheckpointError, match=r"step_1: the state tree nests too deeply to read$"):
        mgr.read(1)


def test_a_deleted_file_is_reported_as_a_read_problem(tmp_path: Path) -> None:
    mgr = saved(tmp_path)
    os.remove(tmp_path / "step_1" / "model" / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        mgr.restore({"model": torch.nn.Linear(3, 2)})
    assert str(info.value) == (
        f"{tmp_path / 'step_1' / 'model' / 'model.safetensors'}: a file of committed step 1 is missing, so the "
        "step cannot be read (deleted by hand?); restore another step"
    )
    assert "saving" not in str(info.value)


def test_a_truncated_file_is_reported_before_anything_is_restored(tmp_path: Path) -> None:
    mgr = saved(tmp_path)
    path = tmp_path / "step_1" / STATE_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    epoch = {"epoch": 0}
    with pytest.raises(
        CheckpointError,
        match=rf"state.safetensors: {size - 1:,} bytes but the manifest says {size}; the step is damaged",
    ):
        mgr.restore(epoch)
    assert epoch == {"epoch": 0}


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_state_keys_named_like_the_step_files_are_escaped(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {name: model, "model": torch.nn.Linear(2, 2), "plain": torch.ones(2)})
    files = json.loads((tmp_path / "step_1" / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted([f"{name}-2/model.safetensors", "model/model.safetensors", STATE_FILE])
    fresh = torch.nn.Linear(3, 2)
    mgr.restore({name: fresh})
    assert torch.equal(fresh.weight, model.weight)


def test_the_manifest_name_is_reserved_for_state_keys() -> None:
    assert layout.MANIFEST in RESERVED_NAMES


def test_restore_and_read_show_progress_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tqdm")
    mgr = saved(tmp_path)
    mgr.restore({"model": torch.nn.Linear(3, 2)}, progress=True)
    assert "Restoring step 1" in capsys.readouterr().err
    monkeypatch.setenv("TORCHST_PROGRESS", "1")
    mgr.read()
    assert "Reading step 1" in capsys.readouterr().err
    monkeypatch.setenv("TORCHST_PROGRESS", "0")
    mgr.restore({"model": torch.nn.Linear(3, 2)})
    assert capsys.readouterr().err == ""


def test_save_shows_progress_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.delenv("TORCHST_PROGRESS", raising=False)
    mgr = CheckpointManager(tmp_path / "a", progress=True)
    mgr.save(1, {"model": torch.nn.Linear(3, 2)})
    assert "Saving step 1" in capsys.readouterr().err
    mgr.save(2, {"model": torch.nn.Linear(3, 2)}, progress=False)
    mgr.restore({"model": torch.nn.Linear(3, 2)}, progress=False)
    assert capsys.readouterr().err == ""
    quiet = CheckpointManager(tmp_path / "b", async_save=True)
    monkeypatch.setenv("TORCHST_PROGRESS", "1")
    quiet.save(1, {"model": torch.nn.Linear(3, 2)})  # the bar runs in the background writer
    quiet.close()
    assert "Saving step 1" in capsys.readouterr().err


def test_the_save_bar_counts_every_byte_of_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[dict[str, Any]] = []

    class Bar:
        def __init__(self, record: dict[str, Any]) -> None:
            self.record = record

        def update(self, n: float = 1) -> None:
            self.record["done"] += n

        def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            pass

    @contextmanager
    def recording(*, total: float | None, desc: str, enabled: bool | None = None, **kw: Any) -> Iterator[Bar]:
        bars.append({"total": total, "desc": desc, "enabled": enabled, "done": 0})
        yield Bar(bars[-1])

    monkeypatch.setattr(manager_module, "progress_bar", recording)
    mgr = CheckpointManager(tmp_path, progress=True)
    mgr.save(7, {"model": torch.nn.Linear(300, 200), "extra": torch.ones(1000)})
    mgr.restore({"model": torch.nn.Linear(300, 200)})
    files = json.loads((tmp_path / "step_7" / "manifest.json").read_text())["files"]
    size = sum(entry["size"] for entry in files.values())
    save, restore = bars
    assert save == {"total": size, "desc": "Saving step 7", "enabled": True, "done": size}
    assert restore["desc"] == "Restoring step 7" and restore["total"] == size and restore["done"] == size


@pytest.mark.parametrize("what", ["file", "directory"])
def test_symbolic_links_inside_a_step_are_refused(tmp_path: Path, what: str) -> None:
    mgr = saved(tmp_path / "run")
    model_dir = tmp_path / "run" / "step_1" / "model"
    outside = tmp_path / "outside"
    os.rename(model_dir, outside)  # identical bytes, but reached through a link
    if what == "file":
        model_dir.mkdir()
        os.symlink(outside / "model.safetensors", model_dir / "model.safetensors")
    else:
        os.symlink(outside, model_dir)
    with pytest.raises(CheckpointError) as info:
        mgr.restore({"model": torch.nn.Linear(3, 2)})
    assert str(info.value) == (
        f"{model_dir / 'model.safetensors'}: is (or lies under) a symbolic link; checkpoint steps hold regular "
        "files only, so it is not read. Copy the run directory with its links resolved (cp -rL)"
    )
