"""Docstring examples run as doctests (``--doctest-modules``), each in a fresh temporary directory.

Every example sees the names below, so a 2-4 line example can show one call without building
its inputs first.  Files are written into the example's own temporary directory, never the
repository:

- ``torch``, ``nn``, ``np``, ``torchst``;
- ``MyNet`` (one ``fc = nn.Linear(4, 4)``), ``model``/``fresh_model`` (two instances),
  ``opt``/``fresh_opt`` (SGD over them, one step taken on ``opt``), ``sched`` (StepLR of ``opt``);
- ``m.safetensors``: ``embed.weight`` (8 x 4) and ``lm_head.weight`` (8 x 4), float32;
- ``model.safetensors``: ``model``'s weights;
- ``ckpt/``: a sharded checkpoint (3 shards + index) of a tied model whose ``lm_head.weight``
  is an alias of ``embed.weight``;
- for examples that mention ``mgr`` or a path under ``"run``: ``mgr``, a ``CheckpointManager("run")`` holding steps 800,
  900 and 1000 of ``{"model": model, "optim": opt, "sched": sched}``, with ``step = 1100``,
  ``state = {"model": model, "optim": opt}`` and ``loss = 0.25`` for the next save.

Examples that need several processes (``torch.distributed``) are marked ``# doctest: +SKIP``;
the multiprocess tests run them for real.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

collect_ignore = ["torchst/__main__.py"]  # importing it runs the CLI


def _namespace(tmp: Path, text: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    import torchst

    class MyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(2))
            self.lm_head = nn.Linear(4, 8, bias=False)
            self.lm_head.weight = self.embed.weight

    torch.manual_seed(0)
    model, fresh_model = MyNet(), MyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    torchst.save_file({"embed.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)}, tmp / "m.safetensors")
    torchst.save_model(model, tmp / "model.safetensors")
    tied = Tied()
    torchst.save_model(tied, tmp / "ckpt", max_shard_size=100)
    extra: dict[str, Any] = {}
    if "mgr" in text or '"run' in text:
        mgr = torchst.CheckpointManager(tmp / "run", keep_last=3)
        for step in (800, 900, 1000):
            mgr.save(step, {"model": model, "optim": opt, "sched": sched})
        extra = {"mgr": mgr, "step": 1100, "state": {"model": model, "optim": opt}, "loss": 0.25}
    return {
        **extra,
        "np": np,
        "torch": torch,
        "nn": nn,
        "torchst": torchst,
        "MyNet": MyNet,
        "model": model,
        "fresh_model": fresh_model,
        "opt": opt,
        "fresh_opt": fresh_opt,
        "sched": sched,
    }


@pytest.fixture(autouse=True)
def _doctest_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    namespace = request.getfixturevalue("doctest_namespace")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace.clear()
        namespace.update(_namespace(tmp_path, request.node.dtest.docstring or ""))
        yield
    finally:
        mgr = namespace.get("mgr")
        if mgr is not None:
            mgr.close()
        os.chdir(cwd)
