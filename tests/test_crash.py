"""Crash safety: a saving process SIGKILLed at many moments never leaves a broken checkpoint.

A helper process imports torch once and forks one child per scenario (forking is much
cheaper than starting Python + torch again).  Each child saves steps in a loop and kills
itself with SIGKILL at a chosen moment: the N-th tensor write, fsync, rename or unlink
(retention deletes), or after a delay.  After every kill the test checks, with a new
manager: the newest committed step restores bit-exactly (every listed step does), no
partial step is listed, leftovers are cleaned up, and saving works again.

Run as a script (``python tests/test_crash.py serve``) it is the forking helper.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

STEPS = 5
KEEP = 2


def expected(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "0.weight": torch.randn(64, 32, generator=g),
        "0.bias": torch.randn(64, generator=g),
        "1.weight": torch.randn(8, 64, generator=g),
        "1.bias": torch.randn(8, generator=g),
        "moment": torch.randn(128, 256, generator=g),
        "counts": torch.randint(0, 1000, (50,), generator=g),
    }


def make_state(step: int) -> dict[str, Any]:
    t = expected(step)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    model.load_state_dict({k: v for k, v in t.items() if k[0].isdigit()})
    return {"model": model, "extra": {"moment": t["moment"], "counts": t["counts"], "step": step}}


# -- the child: save in a loop, die at the chosen moment ---------------------------------


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, n: int) -> None:
    """Patch the chosen primitive so that its n-th call SIGKILLs this process."""
    import torchst.format.writer as fw

    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    def wrap(owner: Any, name: str, after: bool = False) -> None:
        real = getattr(owner, name)

        def patched(*args: Any, **kw: Any) -> Any:
            if hit() and not after:
                _kill()
            out = real(*args, **kw)
            if calls["n"] == n and after:
                _kill()
            return out

        setattr(owner, name, patched)

    if kind == "write":  # before the n-th tensor's bytes: the file is partly written
        wrap(fw, "tensor_bytes")
    elif kind == "fsync":
        wrap(os, "fsync")
    elif kind == "rename":
        wrap(os, "rename")
    elif kind == "rename-after":
        wrap(os, "rename", after=True)
    elif kind == "unlink":  # shutil.rmtree of retention deletes and replaced steps
        wrap(os, "unlink")
    elif kind == "timer":
        threading.Timer(n / 1000, _kill).start()
    else:
        raise ValueError(kind)


def child(directory: str, kind: str, n: int, async_save: bool, progress: str) -> None:
    import torchst

    mgr = torchst.CheckpointManager(directory, keep_last=KEEP, async_save=async_save)
    _arm(kind, n)
    with open(progress, "w") as log:
        for step in range(1, STEPS + 1):
            mgr.save(step, make_state(step))
            # Synchronous: durable now.  Async: save() waited for the previous step.
            done = step if not async_save else step - 1
            if done:
                log.write(f"{done}\n")
                log.flush()
        mgr.wait()
        log.write(f"{STEPS}\n")
        log.flush()


def serve() -> None:
    """Read scenarios (JSON lines) on stdin, fork a child for each, report how it ended."""
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(job["directory"], job["kind"], job["n"], job["async"], job["progress"])
            except Exception:  # noqa: BLE001 - reported through the exit code and stderr
                import traceback

                traceback.print_exc()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        print(json.dumps({"signal": sig, "code": code}), flush=True)


# -- the test side -------------------------------------------------------------------------


def run_scenarios(tmp_path: Path, scenarios: list[tuple[str, int, bool]]) -> list[tuple[Path, dict[str, Any], int]]:
    jobs = []
    for i, (kind, n, async_save) in enumerate(scenarios):
        d = tmp_path / f"{i:03d}-{kind}-{n}-{'async' if async_save else 'sync'}"
        jobs.append({"directory": str(d), "kind": kind, "n": n, "async": async_save, "progress": str(d) + ".log"})
    proc = subprocess.run(
        [sys.executable, __file__, "serve"],
        input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(jobs), proc.stderr
    out = []
    for job, res in zip(jobs, results):
        assert res["code"] in (0, -1) or res["signal"], f"{job}: child failed:\n{proc.stderr}"
        log = Path(job["progress"])
        done = [int(x) for x in log.read_text().split()] if log.exists() else []
        out.append((Path(job["directory"]), res, max(done, default=0)))
    return out


def check_directory(directory: Path, committed: int) -> None:
    import torchst

    if not directory.exists():
        assert committed == 0
        return
    mgr = torchst.CheckpointManager(directory, keep_last=KEEP)
    steps = mgr.steps()
    assert set(steps) <= set(range(1, STEPS + 1)), steps
    if committed:
        assert steps and steps[-1] >= committed, f"step {committed} was reported durable but steps are {steps}"
    for step in steps:  # every listed step is complete and bit-exact, the newest included
        state = make_state(0)
        mgr.restore(state, step=step, restore_rng=False)
        want = expected(step)
        for k, v in state["model"].state_dict().items():
            assert torch.equal(v, want[k]), (step, k)
        assert torch.equal(state["extra"]["moment"], want["moment"]) and state["extra"]["step"] == step
        assert torch.equal(state["extra"]["counts"], want["counts"])
    leftovers = sorted(n for n in os.listdir(directory) if n != ".lock" and not n.startswith("step_"))
    assert leftovers == [], leftovers
    mgr.save(99, make_state(99))  # the directory is usable again
    assert mgr.latest_step() == 99
    mgr.close()
    shutil.rmtree(directory)


def _check_all(tmp_path: Path, scenarios: list[tuple[str, int, bool]]) -> int:
    kills = 0
    for directory, res, committed in run_scenarios(tmp_path, scenarios):
        kills += res["signal"] == signal.SIGKILL
        check_directory(directory, committed)
    return kills


@pytest.mark.multiprocess
def test_sigkill_at_many_moments_never_breaks_the_checkpoint(tmp_path: Path) -> None:
    # Per step: 7 tensors written (4 model, 3 state), 6 fsyncs, 1 commit rename; from step 3 on,
    # retention adds a rename (hide the oldest step), an fsync and unlinks.
    scenarios = [
        ("write", 1, False),  # first tensor of the first step
        ("write", 11, False),  # step 2, in the state file after the model file
        ("write", 17, True),  # async: inside the background writer of step 3
        ("fsync", 2, False),
        ("fsync", 9, False),  # step 2, before a tensor file is durable
        ("fsync", 16, True),
        ("rename", 1, False),  # right before the very first commit
        ("rename", 4, False),  # before the retention delete hides step 1
        ("rename-after", 2, False),  # right after a commit, before the parent fsync
        ("unlink", 1, False),  # in the middle of deleting a step's files
        ("unlink", 5, True),
        ("timer", 40, True),
    ]
    kills = _check_all(tmp_path, scenarios)
    assert kills >= len(scenarios) - 2  # the moments are real: (almost) every child died mid-run


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_sweep(tmp_path: Path) -> None:
    scenarios = [
        (kind, n, a)
        for a in (False, True)
        for kind, top in [("write", 40), ("fsync", 32), ("rename", 8), ("rename-after", 8), ("unlink", 16)]
        for n in range(1, top + 1)
    ]
    scenarios += [("timer", ms, a) for a in (False, True) for ms in range(20, 600, 15)]
    kills = _check_all(tmp_path, scenarios)
    assert kills > len(scenarios) // 2


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
