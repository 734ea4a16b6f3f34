"""save_model / save_state_dict show a byte-based progress bar on request or with TORCHST_PROGRESS=1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchst
import torchst.sharding.io as sio
from torchst._progress import progress_enabled


class _Recorder:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: float = 1) -> None:
        self.n += int(n)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, bool, _Recorder]]:
    seen: list[tuple[int, str, bool, _Recorder]] = []

    @contextmanager
    def fake(*, total: int, desc: str, enabled: bool | None = None, **kw: Any) -> Iterator[_Recorder]:
        rec = _Recorder()
        seen.append((total, desc, progress_enabled(enabled), rec))
        yield rec

    monkeypatch.setattr(sio, "show_progress", fake)
    return seen


def _model() -> nn.Module:
    m = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64), nn.Linear(64, 100, bias=False))
    m[2].weight = m[0].weight  # tied: stored once, counted once
    return m


def test_sharded_save_model_counts_every_stored_byte(tmp_path: Path, bars: list[Any]) -> None:
    res = torchst.save_model(_model(), tmp_path / "ckpt", max_shard_size="20KB", progress=True)
    assert len(res.files) > 1
    [(total, desc, enabled, rec)] = bars
    on_disk = sum((tmp_path / "ckpt" / fn).stat().st_size for fn in res.files)  # headers included
    assert res.total_size == (100 * 64 + 64 * 64 + 64) * 4  # tied weight stored once
    assert enabled and desc == "Saving ckpt" and total == on_disk == rec.n


def test_environment_switch_and_single_file(tmp_path: Path, bars: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    sd = {"a": torch.ones(1000), "b": torch.zeros(10, dtype=torch.int64)}
    torchst.save_state_dict(sd, tmp_path / "off.safetensors")
    monkeypatch.setenv("TORCHST_PROGRESS", "1")
    torchst.save_state_dict(sd, tmp_path / "on.safetensors")
    torchst.save_state_dict(sd, tmp_path / "forced_off.safetensors", progress=False)
    assert [(b[1], b[2]) for b in bars] == [
        ("Saving off.safetensors", False),
        ("Saving on.safetensors", True),
        ("Saving forced_off.safetensors", False),
    ]
    size = (tmp_path / "on.safetensors").stat().st_size
    assert all(b[0] == b[3].n == size for b in bars)


def test_real_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    torchst.save_model(_model(), tmp_path / "ckpt", max_shard_size="20KB", progress=True)
    err = capsys.readouterr()
    assert "Saving ckpt" in err.err and "k [" in err.err and err.out == ""  # bytes, scaled
    torchst.save_model(_model(), tmp_path / "quiet", max_shard_size="20KB")
    assert capsys.readouterr().err == ""
