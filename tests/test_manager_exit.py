"""A training script whose final async save fails must not exit as if it succeeded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = """
import errno, sys, torch, torchst
from torchst.errors import CheckpointError
from torchst.manager import manager as manager_module

def broken_disk(directory, step, *args, **kwargs):
    if step == 2:
        raise CheckpointError(f"{directory}: saving step {step} failed: No space left on device (ENOSPC)")
    return real(directory, step, *args, **kwargs)

real = manager_module.write_step
manager_module.write_step = broken_disk
model = torch.nn.Linear(3, 2)
BODY
print("script done", flush=True)
"""


def run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    code = SCRIPT.replace("BODY", textwrap.dedent(body).strip())
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.multiprocess
def test_script_that_never_closes_the_manager_exits_nonzero(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        """
        mgr = torchst.CheckpointManager("run", async_save=True)
        mgr.save(1, {"model": model})
        mgr.save(2, {"model": model})  # the final save fails in the background
        """,
    )
    assert out.returncode == 1, out
    assert "script done" in out.stdout  # the script itself ran to its end
    assert "the asynchronous save of step 2 failed" in out.stderr
    assert "an asynchronous checkpoint save failed and was never collected" in out.stderr
    assert "No space left on device" in out.stderr and "mgr.close()" in out.stderr
    assert (tmp_path / "run" / "step_1" / "manifest.json").exists()
    assert not (tmp_path / "run" / "step_2").exists()


@pytest.mark.multiprocess
def test_with_block_raises_the_failure_in_the_script(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        """
        try:
            with torchst.CheckpointManager("run", async_save=True) as mgr:
                mgr.save(2, {"model": model})
        except CheckpointError as e:
            print("raised:", e, flush=True)
            sys.exit(3)
        """,
    )
    assert out.returncode == 3, out
    assert "raised: " in out.stdout and "saving step 2 failed: No space left on device" in out.stdout


@pytest.mark.multiprocess
def test_a_successful_async_script_exits_zero_and_a_collected_failure_does_not_kill_it(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        """
        mgr = torchst.CheckpointManager("run", async_save=True)
        mgr.save(2, {"model": model})
        try:
            mgr.wait()
        except CheckpointError:
            print("collected", flush=True)
        mgr.save(3, {"model": model})
        """,
    )
    assert out.returncode == 0, out
    assert "collected" in out.stdout and "never collected" not in out.stderr
    assert (tmp_path / "run" / "step_3" / "manifest.json").exists()
