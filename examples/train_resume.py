"""Checkpoint a training loop with async saves, kill it mid-run, resume, get the same result.

Run: python examples/train_resume.py

1. A forked child process trains for 12 steps, saving every 3 steps with ``async_save=True``
   (``save()`` only snapshots; a background thread writes and commits) and is SIGKILLed
   at step 8, like a preempted job.
2. This process builds a *fresh* model, optimizer and scheduler, restores the latest
   committed step (RNG state included) and finishes the run.
3. The final weights are compared with an uninterrupted run: they are bit-identical.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchst

TOTAL_STEPS, EVERY, KILL_AT = 12, 3, 8


def build(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=TOTAL_STEPS)
    return {"model": model, "optim": optim, "sched": sched, "progress": {"step": 0, "losses": []}}


def train(state: dict[str, Any], start: int, mgr: torchst.CheckpointManager | None, kill_at: int = -1) -> None:
    model, optim, sched = state["model"], state["optim"], state["sched"]
    for step in range(start, TOTAL_STEPS + 1):
        x = torch.randn(32, 16)  # data and dropout draw from the global RNG, which is checkpointed
        loss = (model(x) - x[:, :4]).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        state["progress"]["step"] = step
        state["progress"]["losses"].append(round(loss.item(), 6))
        if mgr is not None and step % EVERY == 0:
            mgr.save(step, state, metrics={"loss": loss.item()})
            print(f"  step {step:2d}  loss {loss.item():.4f}  checkpoint queued (async)", flush=True)
        if step == kill_at:
            print(f"  step {step:2d}  SIGKILL (simulated preemption)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def child(directory: str) -> None:
    torch.manual_seed(1234)
    mgr = torchst.CheckpointManager(directory, keep_last=2, async_save=True)
    train(build(seed=0), 1, mgr, kill_at=KILL_AT)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(Path(tmp) / "checkpoints")
        print(f"1. training in a child process, checkpointing every {EVERY} steps")
        import torch._dynamo

        pid = os.fork()  # POSIX only, like SIGKILL; a fork skips a second interpreter start
        if pid == 0:
            try:
                child(directory)
            finally:
                os._exit(1)  # only reached if the kill did not happen
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        print(f"   child ended by signal {sig} ({signal.Signals(sig).name if sig else 'none'})")

        mgr = torchst.CheckpointManager(directory, keep_last=2, async_save=True)
        print(f"2. committed steps on disk: {mgr.steps()}  (keep_last=2; nothing partial is listed)")
        state = build(seed=99)  # fresh objects, different init: only the checkpoint matters
        step = mgr.restore(state)
        print(f"   resumed from step {step}; losses so far: {state['progress']['losses']}")
        train(state, step + 1, mgr)
        mgr.wait()
        mgr.close()

        torch.manual_seed(1234)
        reference = build(seed=0)
        train(reference, 1, None)
        same = all(
            torch.equal(a, b)
            for a, b in zip(state["model"].state_dict().values(), reference["model"].state_dict().values())
        )
        print(f"3. final weights identical to an uninterrupted run = {same}")
        print(f"   final loss {state['progress']['losses'][-1]} vs {reference['progress']['losses'][-1]}")
        if not same:
            raise SystemExit("resume was not bit-identical")


if __name__ == "__main__":
    main()
