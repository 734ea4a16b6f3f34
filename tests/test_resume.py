"""Resuming from a checkpoint in a fresh process is bit-identical to never stopping.

The training loop draws from every global RNG (dropout and data from torch, noise from
Python ``random`` and numpy) and uses a momentum/Adam optimizer plus an LR scheduler, so
each piece of state that ``CheckpointManager`` must carry is exercised.  Run as a script
(``python tests/test_resume.py resume DIR``) it is the fresh process.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchst

TOTAL, STOP = 8, 4


def build(opt_name: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)  # a different seed on resume proves the restore, not the init, decides
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 4))
    opt: torch.optim.Optimizer
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=TOTAL)
    return model, opt, sched


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, start: int, stop: int) -> None:
    model.train()
    for _ in range(start, stop):
        x = torch.randn(6, 8) * random.uniform(0.5, 1.5) + float(np.random.normal())
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def seed_all() -> None:
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)


def resume(directory: str, opt_name: str, out: str, async_save: bool) -> None:
    model, opt, sched = build(opt_name, seed=999)
    torch.manual_seed(42)  # scramble every RNG: the checkpoint must put them back
    random.seed(42)
    np.random.seed(42)
    state: dict[str, Any] = {"model": model, "optim": opt, "sched": sched, "progress": {"step": -1}}
    step = torchst.CheckpointManager(directory, async_save=async_save).restore(state)
    assert state["progress"]["step"] == step == STOP, (state["progress"], step)
    train_steps(model, opt, sched, STOP, TOTAL)
    torchst.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


CASES = [("sgd", False), ("adamw", True)]  # SGD+momentum saved synchronously, AdamW asynchronously


@pytest.mark.multiprocess
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path: Path) -> None:
    references = {}
    for opt_name, async_save in CASES:
        seed_all()
        model, opt, sched = build(opt_name, seed=0)
        train_steps(model, opt, sched, 0, TOTAL)
        references[opt_name] = {k: v.clone() for k, v in model.state_dict().items()}

        seed_all()
        model, opt, sched = build(opt_name, seed=0)
        train_steps(model, opt, sched, 0, STOP)
        mgr = torchst.CheckpointManager(tmp_path / opt_name, async_save=async_save)
        mgr.save(STOP, {"model": model, "optim": opt, "sched": sched, "progress": {"step": STOP}})
        # Keep training after save() returns: an async snapshot must not see these updates.
        train_steps(model, opt, sched, STOP, STOP + 2)
        mgr.close()

    # One fresh process resumes both runs (starting Python + torch dominates the test's time).
    args = [sys.executable, __file__, "resume", str(tmp_path)]
    run = subprocess.run(args, check=False, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    for opt_name, reference in references.items():
        resumed = torchst.load_file(tmp_path / f"{opt_name}.safetensors")
        assert resumed.keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(resumed[k], v), f"{opt_name}: {k} differs after resume"


def test_restore_in_process_continues_identically_with_accelerate(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)

    def prepared(seed: int) -> tuple[Any, Any, Any]:
        model, opt, sched = build("adamw", seed)
        return accelerator.prepare(model, opt, sched)

    seed_all()
    model, opt, sched = prepared(0)
    train_steps(model, opt, sched, 0, TOTAL)
    reference = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}

    seed_all()
    model, opt, sched = prepared(0)
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    train_steps(model, opt, sched, 0, STOP)
    with torchst.CheckpointManager(tmp_path) as mgr:
        mgr.save(STOP, {"model": model, "optim": opt, "sched": sched})
    train_steps(model, opt, sched, STOP, TOTAL)  # diverge the RNGs and state before restoring

    model2, opt2, sched2 = prepared(7)
    with torchst.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore({"model": model2, "optim": opt2, "sched": sched2}) == STOP
    train_steps(model2, opt2, sched2, STOP, TOTAL)
    for k, v in accelerator.unwrap_model(model2).state_dict().items():
        assert torch.equal(v, reference[k]), k


if __name__ == "__main__" and sys.argv[1] == "resume":
    for name, use_async in CASES:
        resume(str(Path(sys.argv[2]) / name), name, str(Path(sys.argv[2]) / f"{name}.safetensors"), use_async)
