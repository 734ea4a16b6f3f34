"""Optimizer state keyed by parameter *name*, so it restores into freshly built objects.

``optimizer.state_dict()`` numbers parameters by position across its param groups; a
model rebuilt with groups in another order (or a new optimizer that has not stepped yet)
would silently receive the wrong moments.  Here every parameter is named after the module
attribute that holds it (``"encoder.0.weight"``); parameters that no module in the
checkpoint holds are named by position (``"#3"``), as torch does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["load_named_optimizer_state", "named_optimizer_state", "parameter_names", "prepare_named_optimizer_state"]


def parameter_names(modules: Iterable[tuple[str, torch.nn.Module]]) -> dict[int, str]:
    """``id(param) -> name`` for every parameter of ``modules``, prefixed by ``prefix.`` when given.

    >>> names = parameter_names([("", model)])
    >>> names[id(model.fc.weight)]
    'fc.weight'
    """
    out: dict[int, str] = {}
    for prefix, module in modules:
        for name, p in module.named_parameters(remove_duplicate=False):
            out.setdefault(id(p), f"{prefix}.{name}" if prefix else name)  # tied: first name wins
    return out


def _names(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[str]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [names.get(id(p), f"#{k}") for k, p in enumerate(params)]


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with positional parameter ids replaced by names.

    >>> sd = named_optimizer_state(opt, parameter_names([("", model)]))
    >>> sorted(sd["state"])
    ['fc.bias', 'fc.weight']
    """
    sd = optimizer.state_dict()
    ordered = _names(optimizer, names)
    if len(set(ordered)) != len(ordered):
        dupes = sorted({n for n in ordered if ordered.count(n) > 1})
        raise CheckpointError(f"optimizer holds the same parameter twice ({dupes}); torch optimizers forbid this")
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    if len(ids) != len(ordered):
        raise CheckpointError(
            f"{type(optimizer).__name__}.state_dict() lists {len(ids)} parameters but its param_groups hold "
            f"{len(ordered)}; cannot key its state by parameter name"
        )
    by_id = dict(zip(ids, ordered))
    state = {by_id[k]: v for k, v in sd["state"].items() if k in by_id}
    groups = [{**g, "params": [by_id[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def prepare_named_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], names: Mapping[int, str], *, where: str = "optimizer"
) -> dict[str, Any]:
    """Check a ``named_optimizer_state`` dict against ``optimizer``; return what its ``load_state_dict`` takes.

    Raises ``CheckpointError`` without touching the optimizer when parameters or groups do
    not match, so a caller can check everything before it loads anything.

    >>> saved = named_optimizer_state(opt, parameter_names([("", model)]))
    >>> sd = prepare_named_optimizer_state(fresh_opt, saved, parameter_names([("", fresh_model)]))
    >>> fresh_opt.load_state_dict(sd)
    """
    if not isinstance(saved, Mapping) or "param_groups" not in saved or "state" not in saved:
        raise CheckpointError(f"{where}: the saved entry is not an optimizer state (no 'state'/'param_groups')")
    saved_groups = saved["param_groups"]
    saved_state = saved["state"]
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
        raise CheckpointError(f"{where}: the saved optimizer state is malformed (param_groups/state)")
    ordered = _names(optimizer, names)
    group_of: dict[str, int] = {}
    for gi, g in enumerate(saved_groups):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), list):
            raise CheckpointError(f"{where}: saved param group {gi} is malformed (no 'params' list)")
        for n in g["params"]:
            group_of[n] = gi
    missing = [n for n in ordered if n not in group_of]
    unexpected = sorted(set(group_of) - set(ordered))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the optimizer's parameters do not match the checkpoint: missing from the checkpoint "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, in the checkpoint but not in the optimizer "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; build the model and optimizer as when "
            "saving (names come from the modules saved in the same checkpoint)"
        )
    groups: list[dict[str, Any]] = []
    k = 0
    for gi, g in enumerate(optimizer.param_groups):
        members = ordered[k : k + len(g["params"])]
        ids = list(range(k, k + len(members)))
        k += len(members)
        sources = sorted({group_of[n] for n in members})
        if len(sources) != 1 or len(saved_groups[sources[0]]["params"]) != len(members):
            raise CheckpointError(
                f"{where}: param group {gi} holds {members[:4]}{' ...' if len(members) > 4 else ''}, which "
                "were not one group when saved; keep the same grouping (the order of groups may change)"
            )
        src = saved_groups[sources[0]]
        new = {key: v for key, v in src.items() if key not in ("params", "param_names")}
        new["params"] = ids
        if "param_names" in g:
            new["param_names"] = list(g["param_names"])
        groups.append(new)
    # Moments are not shape-checked here: they belong to parameters whose shapes the module
    # check of the same restore compares (and some optimizers keep factored, other-shaped state).
    state = {i: saved_state[n] for i, n in enumerate(ordered) if n in saved_state}
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], names: Mapping[int, str], *, where: str = "optimizer"
) -> None:
    """Load a ``named_optimizer_state`` dict into ``optimizer``, matching parameters by name.

    Works when the optimizer has not stepped yet and when param groups were reordered; the
    hyperparameters of each group come from the saved group that held the same parameters.
    Nothing is loaded when the check fails.

    >>> sd = named_optimizer_state(opt, parameter_names([("", model)]))
    >>> load_named_optimizer_state(fresh_opt, sd, parameter_names([("", fresh_model)]))
    """
    optimizer.load_state_dict(prepare_named_optimizer_state(optimizer, saved, names, where=where))
