"""Asynchronous collective saves and per-rank RNG state of ``CheckpointManager(process_group=...)``."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_launch import launch
from test_distributed import _fsdp_training, _full, _mlp, _step, _world

import torchst

pytestmark = pytest.mark.multiprocess
HERE = "tests/test_distributed_async.py"


def _values(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full parameters and optimizer moments, keyed by parameter name (collective for DTensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"param/{n}": _full(p.detach()).clone() for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        out.update({f"optim/{names[id(p)]}/{k}": _full(v).clone() for k, v in st.items()})
    return out


def _check(model: torch.nn.Module, opt: torch.optim.Optimizer, ref: dict[str, torch.Tensor]) -> None:
    got = _values(model, opt)
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def scenario_async(rank: int, world: int, out: str) -> None:
    import torchst.distributed.save as save_mod
    from torchst.errors import CheckpointError

    model, opt = _fsdp_training(0)
    mgr = torchst.CheckpointManager(os.path.join(out, "run"), process_group=_world(), async_save=True, keep_last=2)
    refs = {}
    for i in range(3):
        _step(model, opt, i)
        refs[i] = _values(model, opt)
        mgr.save(i, {"model": model, "optim": opt, "step": i})
        # the save returned after its snapshot: changing the state now must not reach the step
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1000.0)
            for st in opt.state.values():
                st["exp_avg"].add_(7.0)
    if rank == 0:
        torchst.save_file({k: v.contiguous() for k, v in refs[2].items()}, os.path.join(out, "ref.safetensors"))
    mgr.wait()
    assert mgr.steps() == [1, 2] if rank == 0 else True  # keep_last=2, applied by rank 0
    fresh, fresh_opt = _fsdp_training(1)
    state: dict[str, Any] = {"model": fresh, "optim": fresh_opt, "step": -1}
    assert mgr.restore(state, 1) == 1 and state["step"] == 1
    _check(fresh, fresh_opt, refs[1])
    assert mgr.restore(state) == 2 and state["step"] == 2
    _check(fresh, fresh_opt, refs[2])

    # a snapshot that fails on one rank fails save() itself on every rank; nothing is written
    extra = torch.empty(2, device="meta") if rank == 1 else torch.zeros(2)
    try:
        mgr.save(5, {"model": model, "optim": opt, "extra": extra})
        raise AssertionError("a failed snapshot was not raised")
    except CheckpointError as e:
        assert "saving step 5 failed" in str(e) and "rank 1: " in str(e) and "nothing was written" in str(e), str(e)
    mgr.wait()  # nothing in flight

    # a failure on one rank in the background surfaces on every rank at the next wait()
    real = save_mod._pwrite
    if rank == world - 1:

        def failing(fd: int, view: memoryview, offset: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        save_mod._pwrite = failing  # type: ignore[assignment]
    mgr.save(3, {"model": model, "optim": opt, "step": 3})
    start = time.monotonic()
    try:
        mgr.wait()
        raise AssertionError("a failed background save was not raised")
    except CheckpointError as e:
        assert f"rank {world - 1}: OSError" in str(e) and "No space left" in str(e), str(e)
        assert "saving step 3 failed" in str(e), str(e)
    assert time.monotonic() - start < 30
    save_mod._pwrite = real  # type: ignore[assignment]
    mgr.wait()  # the failure was raised once; nothing is pending
    assert mgr.restore(state) == 2
    _check(fresh, fresh_opt, refs[2])
    # the next save works again, and close() finishes it
    mgr.save(4, {"model": model, "optim": opt, "step": 4})
    # while it is written in the background, a synchronous collective save of the same state runs
    # on the training group: the two never mix, and both write the same bytes
    with torchst.CheckpointManager(os.path.join(out, "sync"), process_group=_world()) as sync:
        sync.save(4, {"model": model, "optim": opt, "step": 4})
    mgr.close()
    if rank == 0:
        assert mgr.steps() == [2, 4]


def test_async_saves_on_two_ranks_snapshot_commit_and_agree_on_failures(tmp_path: Path) -> None:
    launch(tmp_path, 2, f"{HERE}::scenario_async", timeout=150).check()
    ref = torchst.load_file(tmp_path / "ref.safetensors")
    with torchst.CheckpointManager(tmp_path / "run", read_only=True) as mgr:
        assert mgr.steps() == [2, 4]
        model = _mlp(7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state: dict[str, Any] = {"model": model, "optim": opt, "step": -1}
        assert mgr.restore(state, 2) == 2 and state["step"] == 2
    _check(model, opt, ref)
    written = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run" / "step_4").rglob("*.safetensors"))
    assert len(written) == 2, written
    for rel in written:
        assert (tmp_path / "run" / rel).read_bytes() == (tmp_path / "sync" / rel).read_bytes(), rel


def _draws() -> list[float]:
    return [*torch.rand(3).tolist(), random.random(), float(np.random.rand())]


def scenario_rng(rank: int, world: int, out: str, async_save: bool) -> None:
    model, _ = _fsdp_training(0)
    torch.manual_seed(10 + rank)
    random.seed(20 + rank)
    np.random.seed(30 + rank)
    with torchst.CheckpointManager(os.path.join(out, "rng"), process_group=_world(), async_save=async_save) as mgr:
        mgr.save(1, {"model": model})
        after = _draws()
        _draws()
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
        assert mgr.restore({"model": model}) == 1
        assert _draws() == after
        # ranks were seeded differently: each got its own state back
        gathered = [torch.zeros(1) for _ in range(world)]
        torch.distributed.all_gather(gathered, torch.tensor([after[0]]))
        assert len({float(g) for g in gathered}) == world
        mgr.restore({"model": model}, restore_rng=False)
        assert _draws() != after


@pytest.mark.parametrize("async_save", [False, True])
def test_rng_is_saved_per_rank_and_restored_when_the_world_size_matches(
    tmp_path: Path, async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    launch(tmp_path, 2, f"{HERE}::scenario_rng", timeout=120, async_save=async_save).check()
    # one plain process: another world size, so the RNG is left alone with a warning
    model = _mlp(3)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with torchst.CheckpointManager(tmp_path / "rng", read_only=True) as mgr, caplog.at_level(logging.WARNING):
        mgr.restore({"model": model})
    assert torch.equal(torch.get_rng_state(), before)
    assert "RNG states of 2 ranks but it is restored into 1 process(es)" in caplog.text


def scenario_killed_async(rank: int, world: int, out: str) -> None:
    import torchst.distributed.save as save_mod
    from torchst.errors import CheckpointError

    model, opt = _fsdp_training(0)
    mgr = torchst.CheckpointManager(
        os.path.join(out, "run"), process_group=_world(), async_save=True, timeout=8, save_rng=False
    )
    mgr.save(1, {"model": model, "optim": opt})
    mgr.wait()
    if rank == 1:
        real = save_mod._pwrite

        def dying(fd: int, view: memoryview, offset: int) -> None:
            real(fd, view, offset)
            os.kill(os.getpid(), signal.SIGKILL)

        save_mod._pwrite = dying  # type: ignore[assignment]
    mgr.save(2, {"model": model, "optim": opt})  # returns: the rank dies in the background
    start = time.monotonic()
    try:
        mgr.close()
    except CheckpointError as e:
        with open(os.path.join(out, f"survivor-{rank}.json"), "w") as f:
            json.dump({"seconds": time.monotonic() - start, "error": str(e)}, f)
        os._exit(0)  # the group is broken; skip its teardown
    raise AssertionError("the save succeeded although a rank was killed")


def test_sigkill_during_a_background_save_fails_the_survivor_in_bounded_time(tmp_path: Path) -> None:
    result = launch(tmp_path, 2, f"{HERE}::scenario_killed_async", timeout=90)
    assert result.codes[1] == -signal.SIGKILL, result.outputs[1]
    assert result.codes[0] == 0, result.outputs[0]
    report = json.loads((tmp_path / "survivor-0.json").read_text())
    assert report["seconds"] < 30, report
    assert "saving step 2 failed" in report["error"] and "lost contact" in report["error"], report
    with torchst.CheckpointManager(tmp_path / "run") as mgr:  # the writer lock of the dead run is free
        assert mgr.steps() == [1]
        model = _mlp(7)
        assert mgr.restore({"model": model}) == 1


def test_timeout_needs_a_process_group(tmp_path: Path) -> None:
    with pytest.raises(torchst.errors.ArgumentError, match=r"timeout=5 bounds the collectives of a manager"):
        torchst.CheckpointManager(tmp_path / "run", timeout=5)
