"""CheckpointManager.restore is all or nothing: a mismatch is found before anything is written."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from torchst import CheckpointManager
from torchst.errors import CheckpointError


def small(hidden: int = 5, out: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, out))


def train_state(model: torch.nn.Module, steps: int = 2) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
        sched.step()
    return {"model": model, "optim": opt, "sched": sched}


def raw_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in model.state_dict().items()
    }


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Everything a failed restore must leave alone, as comparable values."""
    opt_sd = state["optim"].state_dict()
    return {
        "model": raw_bytes(state["model"]),
        "ids": [id(p) for p in state["model"].parameters()],
        "optim_state": {
            k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
            for k, s in opt_sd["state"].items()
        },
        "optim_groups": [dict(g) for g in opt_sd["param_groups"]],
        "sched": dict(state["sched"].state_dict()),
        "extra": {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state["extra"].items()},
    }


def assert_unchanged(before: dict[str, Any], state: dict[str, Any]) -> None:
    assert raw_bytes(state["model"]) == before["model"]  # every parameter and buffer, bit for bit
    assert [id(p) for p in state["model"].parameters()] == before["ids"]
    opt_sd = state["optim"].state_dict()
    assert opt_sd["param_groups"] == before["optim_groups"]
    assert opt_sd["state"].keys() == before["optim_state"].keys()
    for k, s in opt_sd["state"].items():
        for n, v in s.items():
            assert (
                torch.equal(v, before["optim_state"][k][n])
                if isinstance(v, torch.Tensor)
                else v == before["optim_state"][k][n]
            )
    assert state["sched"].state_dict() == before["sched"]
    assert state["extra"].keys() == before["extra"].keys()
    for k, v in state["extra"].items():
        assert torch.equal(v, before["extra"][k]) if isinstance(v, torch.Tensor) else v == before["extra"][k]


def saved_run(tmp_path: Path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path / "run")
    state = train_state(small())
    state["extra"] = {"epoch": 7, "ema": torch.full((3,), 7.0), "note": "saved"}
    mgr.save(20, state)
    return mgr


def fresh_state(model: torch.nn.Module) -> dict[str, Any]:
    state = train_state(model, steps=1)
    state["extra"] = {"epoch": 0, "ema": torch.zeros(3), "note": "fresh"}
    return state


def test_restore_into_another_architecture_changes_nothing(tmp_path: Path) -> None:
    mgr = saved_run(tmp_path)
    # "extra" comes first so that a restore which wrote as it went would already have changed it.
    target = fresh_state(small(hidden=8))
    target = {"extra": target.pop("extra"), **target}
    before = snapshot(target)
    rng_before = torch.get_rng_state().clone(), random.getstate()
    with pytest.raises(CheckpointError) as info:
        mgr.restore(target)
    msg = str(info.value)
    assert "cannot restore step 20: state['model'] (Sequential) does not match the checkpoint" in msg
    assert "'0.weight' has shape [5, 6] in step 20 but [8, 6] in the model" in msg
    assert "'2.weight' has shape [2, 5] in step 20 but [2, 8] in the model" in msg
    assert "Nothing was restored" in msg and str(tmp_path / "run" / "step_20") in msg
    assert info.value.__cause__ is None  # found by the check, not by a torch copy half-way through
    assert_unchanged(before, target)
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]


def test_restore_reports_missing_and_unexpected_keys_without_loading(tmp_path: Path) -> None:
    mgr = saved_run(tmp_path)
    deeper = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2))
    target = fresh_state(deeper)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"missing from step 20: \['3.weight', '3.bias'\]"):
        mgr.restore(target)
    assert_unchanged(before, target)
    shallower = fresh_state(torch.nn.Sequential(torch.nn.Linear(6, 5)))
    before = snapshot(shallower)
    with pytest.raises(CheckpointError, match=r"in step 20 but not in the model: \['2.weight', '2.bias'\]"):
        mgr.restore(shallower)
    assert_unchanged(before, shallower)


def test_optimizer_mismatch_leaves_the_matching_model_untouched(tmp_path: Path) -> None:
    mgr = saved_run(tmp_path)
    model = small(seed=3)
    opt = torch.optim.AdamW(
        [{"params": [model[0].weight]}, {"params": [model[0].bias, model[2].weight, model[2].bias]}]
    )
    target: dict[str, Any] = {"model": model, "optim": opt, "extra": {"epoch": 0}}
    before = raw_bytes(model)
    with pytest.raises(
        CheckpointError,
        match=r"state\['optim'\]: param group 0 holds \['model.0.weight'\], which were not one group when saved; "
        r"keep the same grouping \(the order of groups may change\)\. Nothing was restored: every object is unchanged$",
    ):
        mgr.restore(target)
    assert raw_bytes(model) == before and target["extra"] == {"epoch": 0}


def test_integer_buffer_dtype_change_is_refused_float_casts_are_allowed(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    model = torch.nn.BatchNorm1d(4)
    model(torch.randn(5, 4))
    mgr.save(1, {"model": model})
    bf16 = torch.nn.BatchNorm1d(4).to(torch.bfloat16)
    bf16.num_batches_tracked = bf16.num_batches_tracked.long()
    mgr.restore({"model": bf16})  # fp32 checkpoint into a bf16 model: cast, as load_state_dict does
    assert torch.equal(bf16.running_mean, model.running_mean.to(torch.bfloat16))
    odd = torch.nn.BatchNorm1d(4)
    odd.num_batches_tracked = odd.num_batches_tracked.float()
    before = raw_bytes(odd)
    with pytest.raises(
        CheckpointError, match=r"'num_batches_tracked' is torch.int64 in step 1 but torch.float32 in the model"
    ):
        mgr.restore({"model": odd})
    assert raw_bytes(odd) == before


def test_generator_of_another_kind_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    gen = torch.Generator().manual_seed(1)
    mgr.save(3, {"model": small(), "gen": gen})
    target_model = small(seed=4)
    before = raw_bytes(target_model)

    class Odd(torch.Generator):
        def get_state(self) -> torch.Tensor:
            return torch.zeros(16, dtype=torch.uint8)

    with pytest.raises(CheckpointError, match=r"state\['gen'\] is a cpu generator with a state of \[16\] torch.uint8"):
        mgr.restore({"model": target_model, "gen": Odd()})
    assert raw_bytes(target_model) == before


def test_a_failing_user_hook_is_reported_with_what_was_restored(tmp_path: Path) -> None:
    mgr = saved_run(tmp_path)
    model = small(seed=5)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("hook says no")

    target = {"extra": {"epoch": 0}, "model": model}
    model._register_load_state_dict_pre_hook(refuse)
    with pytest.raises(
        CheckpointError,
        match=r"restoring state\['model'\] from step 20 failed after the checks passed: "
        r"ValueError\('hook says no'\); already restored: \['extra'\], not restored: \['<rng>'\]",
    ):
        mgr.restore(target)


def test_a_matching_restore_still_loads_everything(tmp_path: Path) -> None:
    mgr = saved_run(tmp_path)
    target = fresh_state(small(seed=9))
    ema = target["extra"]["ema"]
    assert mgr.restore(target) == 20
    saved = mgr.read(20)
    assert all(torch.equal(v, saved["model"][k]) for k, v in target["model"].state_dict().items())
    assert target["extra"]["epoch"] == 7 and target["extra"]["ema"] is ema and torch.equal(ema, torch.full((3,), 7.0))
    assert target["sched"].state_dict()["last_epoch"] == 2
