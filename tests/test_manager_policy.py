"""CheckpointManager arguments do what they say: retention, KeepBest metrics, one writer, logging."""

from __future__ import annotations

import ast
import inspect
import logging
import os
from pathlib import Path

import pytest

import torchst
from torchst import CheckpointManager, KeepBest, KeepEvery, KeepLast
from torchst.errors import CheckpointLockedError, SerializationError


def saved_steps(directory: Path, steps: range, **kwargs: object) -> list[int]:
    with CheckpointManager(directory, **kwargs) as mgr:  # type: ignore[arg-type]
        for step in steps:
            mgr.save(step, {"x": step})
        return mgr.steps()


def test_an_explicit_keep_policy_replaces_the_default_keep_last(tmp_path: Path) -> None:
    assert saved_steps(tmp_path / "a", range(1, 6), keep=KeepLast(2)) == [4, 5]
    assert saved_steps(tmp_path / "b", range(1, 8), keep=KeepEvery(3)) == [3, 6, 7]  # + the newest, always
    assert saved_steps(tmp_path / "c", range(1, 6)) == [3, 4, 5]  # the default: keep_last=3
    assert inspect.signature(CheckpointManager).parameters["keep_last"].default == 3


def test_keep_last_given_explicitly_next_to_keep_adds_to_it(tmp_path: Path) -> None:
    assert saved_steps(tmp_path / "a", range(1, 8), keep_last=2, keep=KeepEvery(3)) == [3, 6, 7]
    assert saved_steps(tmp_path / "b", range(1, 8), keep_last=3, keep=KeepLast(2)) == [5, 6, 7]
    assert saved_steps(tmp_path / "c", range(1, 8), keep_last=None, keep=KeepEvery(3)) == [3, 6, 7]
    assert saved_steps(tmp_path / "d", range(1, 5), keep_last=None) == [1, 2, 3, 4]
    mgr = CheckpointManager(tmp_path / "e", keep_last=2, keep=KeepEvery(3))
    assert repr(mgr.retention) == "KeepLast(n=2) | KeepEvery(k=3)"
    with pytest.raises(TypeError, match="keep_last must be an int >= 1 or None, found '3'"):
        CheckpointManager(tmp_path / "f", keep_last="3")  # type: ignore[arg-type]


def test_keep_best_refuses_metrics_without_its_metric_before_writing(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=KeepBest(2, "val_loss") | KeepLast(1))
    mgr.save(1, {"x": 1}, metrics={"val_loss": 0.5})
    with pytest.raises(SerializationError) as info:
        mgr.save(2, {"x": 2}, metrics={"val loss": 0.4})
    assert str(info.value) == (
        "step 2: metrics ['val loss'] have no 'val_loss', which KeepBest(n=2, metric='val_loss', mode='min') ranks "
        "steps by; report it (metrics={'val_loss': value, ...}), fix the name, or pass metrics=None on steps that "
        "were not evaluated (they are then kept only by the other policies)"
    )
    with pytest.raises(
        SerializationError, match=r"step 3: metric 'val_loss' is 'low' \(str\); KeepBest.* needs a number"
    ):
        mgr.save(3, {"x": 3}, metrics={"val_loss": "low"})
    assert mgr.steps() == [1] and sorted(os.listdir(tmp_path)) == [".lock", "step_1"]


def test_keep_best_ranks_only_evaluated_steps_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = CheckpointManager(tmp_path, keep=KeepBest(1, "val_loss") | KeepLast(1))
    with caplog.at_level(logging.WARNING, logger="torchst"):
        mgr.save(1, {"x": 1}, metrics={"val_loss": 0.2})
        mgr.save(2, {"x": 2})  # not evaluated
        mgr.save(3, {"x": 3})
        mgr.save(4, {"x": 4}, metrics={"val_loss": 0.9})
    warnings = [r for r in caplog.records if "KeepBest cannot rank it" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name == "torchst.manager.manager"
    assert "step 2 was saved without metrics, so KeepBest cannot rank it by 'val_loss'" in warnings[0].getMessage()
    assert mgr.steps() == [1, 4]  # the best (1) and the newest (4); 2 and 3 could not be ranked


def test_retention_and_cleanup_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="torchst"):
        with CheckpointManager(tmp_path, keep_last=1) as mgr:
            mgr.save(1, {"x": 1})
            mgr.save(2, {"x": 2})
        (tmp_path / ".tmp-step_3-0123456789ab").mkdir()
        os.rename(tmp_path / "step_2", tmp_path / ".replaced-step_2-0123456789ab")
        CheckpointManager(tmp_path).close()
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("torchst.manager.manager", "INFO", f"{tmp_path}: deleted step 1 (retention: KeepLast(n=1))") in messages
    assert (
        "torchst.manager.layout",
        "INFO",
        f"{tmp_path}: removed an interrupted save left by a stopped writer: .tmp-step_3-0123456789ab",
    ) in messages
    assert (
        "torchst.manager.layout",
        "WARNING",
        f"{tmp_path}: step 2 was being re-saved when a writer stopped; kept its previous copy",
    ) in messages


def test_a_second_manager_of_the_same_process_is_told_it_is_this_process(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path / "run")
    with pytest.raises(
        CheckpointLockedError, match=rf"this process \(pid {os.getpid()}\) already has a CheckpointManager"
    ):
        CheckpointManager(tmp_path / "run")
    first.close()
    with CheckpointManager(tmp_path / "run") as again:  # released by close(): a new writer is welcome
        again.save(1, {"x": 1})


def test_the_manager_and_state_packages_never_print() -> None:
    root = Path(torchst.__file__).parent
    calls = []
    for package in ("manager", "state"):
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    calls.append(f"{path.name}:{node.lineno}")
    assert calls == []
