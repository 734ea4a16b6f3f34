"""CheckpointManager(async_save=True): snapshots, one save in flight, failures, exit."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from torchst import CheckpointManager
from torchst.errors import CheckpointError
from torchst.manager import manager as manager_mod
from torchst.manager.snapshot import HostArena
from torchst.state import FileSpec


class GatedWriter:
    """Replaces write_step: each background write waits for ``release()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = manager_mod.write_step
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls: list[int] = []
        monkeypatch.setattr(manager_mod, "write_step", self)

    def __call__(self, directory: str, step: int, *args: Any, **kw: Any) -> Any:
        self.calls.append(step)
        self.started.set()
        assert self.gate.wait(30), "test never released the writer"
        return self.real(directory, step, *args, **kw)

    def release(self) -> None:
        self.gate.set()


def model_of(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(16, 16)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def test_save_returns_before_the_step_is_durable_and_wait_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated = GatedWriter(monkeypatch)
    mgr = CheckpointManager(tmp_path, async_save=True)
    model = model_of(1.0)
    mgr.save(1, {"model": model, "note": "first"})
    assert gated.started.wait(10)
    assert mgr.steps() == []  # not committed yet: invisible
    with torch.no_grad():  # the caller updates parameters right away
        model.weight.add_(100.0)
        model.bias.zero_()
    gated.release()
    mgr.wait()
    assert mgr.steps() == [1]
    fresh = model_of(0.0)
    state: dict[str, Any] = {"model": fresh, "note": None}
    mgr.restore(state)
    assert torch.all(fresh.weight == 1.0) and torch.all(fresh.bias == 1.0) and state["note"] == "first"


def test_only_one_save_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gated = GatedWriter(monkeypatch)
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=None)
    mgr.save(1, {"x": 1})
    assert gated.started.wait(10)
    timer = threading.Timer(0.3, gated.release)
    timer.start()
    t0 = time.perf_counter()
    mgr.save(2, {"x": 2})  # must wait for step 1 to finish first
    assert time.perf_counter() - t0 >= 0.25
    assert 1 in mgr.steps()
    mgr.wait()
    assert mgr.steps() == [1, 2] and gated.calls == [1, 2]


def test_restore_waits_for_the_save_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gated = GatedWriter(monkeypatch)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(5, {"model": model_of(5.0)})
    threading.Timer(0.2, gated.release).start()
    fresh = model_of(0.0)
    assert mgr.restore({"model": fresh}) == 5
    assert torch.all(fresh.weight == 5.0)


def test_background_failure_is_raised_by_the_next_wait_or_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"x": 1})
    mgr.wait()
    real = manager_mod.write_step

    def failing(directory: str, step: int, *args: Any, **kw: Any) -> Any:
        raise CheckpointError(f"saving step {step} failed: No space left on device (ENOSPC)")

    monkeypatch.setattr(manager_mod, "write_step", failing)
    mgr.save(2, {"x": 2})  # returns: the failure happens in the background
    with pytest.raises(CheckpointError, match="saving step 2 failed: No space left"):
        mgr.wait()
    mgr.wait()  # reported once
    mgr.save(3, {"x": 3})
    with pytest.raises(CheckpointError, match="saving step 3 failed"):
        mgr.save(4, {"x": 4})  # the next save() raises the pending failure and saves nothing
    monkeypatch.setattr(manager_mod, "write_step", real)
    mgr.save(5, {"x": 5})
    mgr.wait()
    assert mgr.steps() == [1, 5]


def test_unexpected_background_errors_are_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(manager_mod, "write_step", broken)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"x": 1})
    with pytest.raises(CheckpointError, match="background save failed.*Input/output error"):
        mgr.wait()


def test_snapshot_buffers_are_bounded_and_reused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    model = model_of(1.0)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 16)).sum().backward()
    opt.step()
    mgr.save(1, {"model": model, "optim": opt})
    mgr.wait()
    size = mgr._arena.nbytes
    ptr = mgr._arena._buf.data_ptr() if mgr._arena._buf is not None else 0
    assert size >= 3 * (16 * 16 + 16) * 4  # weights + two Adam moments
    for step in range(2, 5):
        mgr.save(step, {"model": model, "optim": opt})
    mgr.wait()
    assert mgr._arena.nbytes == size and mgr._arena._buf is not None and mgr._arena._buf.data_ptr() == ptr


def test_arena_snapshot_copies_every_dtype_exactly() -> None:
    tensors = {
        "f32": torch.randn(5, 3),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.arange(3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }
    arena = HostArena()
    out = arena.snapshot({"a": FileSpec(dict(tensors), {"k": "v"})})
    assert out["a"].metadata == {"k": "v"}
    for name, t in tensors.items():
        copy = out["a"].tensors[name]
        assert copy.dtype == t.dtype and copy.shape == t.shape and torch.equal(copy, t)
        assert t.numel() == 0 or copy.data_ptr() != t.data_ptr()
        assert copy.data_ptr() % 64 == 0 or t.numel() == 0


@pytest.mark.multiprocess
def test_pending_save_completes_at_interpreter_exit(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import torch, torchst
        mgr = torchst.CheckpointManager({str(tmp_path)!r}, async_save=True)
        mgr.save(1, {{"w": torch.arange(4_000_000, dtype=torch.float32), "tag": "exit"}})
        print("returned", mgr.steps())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "returned []" in out.stdout  # the script exited with the save still in flight
    mgr = CheckpointManager(tmp_path)
    assert mgr.steps() == [1]
    saved = mgr.read(1)
    assert saved["tag"] == "exit" and torch.equal(saved["w"], torch.arange(4_000_000, dtype=torch.float32))


@pytest.mark.gpu
def test_cuda_sources_are_snapshotted_into_pinned_memory(tmp_path: Path) -> None:
    model = model_of(3.0).cuda()
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"model": model, "t": torch.arange(5, device="cuda")})
    assert mgr._arena._buf is not None and mgr._arena._buf.is_pinned()
    with torch.no_grad():
        model.weight.zero_()
    mgr.wait()
    fresh = model_of(0.0).cuda()
    state: dict[str, Any] = {"model": fresh, "t": None}
    mgr.restore(state)
    assert torch.all(fresh.weight == 3.0) and state["t"].device.type == "cuda"
