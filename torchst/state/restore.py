"""Restore a saved training state into the caller's objects: check everything, then write.

A restore runs in two phases.  The *check* phase walks the caller's objects next to the
saved tree, decodes every value and compares every module key, shape and dtype, every
optimizer parameter and group, every generator and the RNG state with what the caller
holds; it changes nothing.  Only when all of it fits does the *apply* phase load each
object (``load_state_dict``, ``set_state``, dict assignment).  So a checkpoint of another
architecture raises ``CheckpointError`` with the model, optimizer, scheduler and plain
values exactly as they were.

Module tensors are mapped, not read, during the check (headers only), so checking costs
no extra memory.  What the check cannot foresee is a user hook raising inside
``load_state_dict``; that error is re-raised naming the objects already loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch

from ..errors import CheckpointError
from .codec import FileReader, _modules, _StateDecoder, is_stateful
from .optim import parameter_names, prepare_named_optimizer_state
from .rng import check_rng, restore_rng
from .tree import Json, PathItem, format_path

__all__ = ["restore_state"]

Apply = Callable[[], Any]  # writes one prepared value into place and returns the value to keep
_MAX_LISTED = 6


def _tag(node: Json) -> str:
    return next(iter(node), "") if isinstance(node, dict) and len(node) else ""


def _kind(node: Json) -> str:
    names = {
        "$module": "a module",
        "$optimizer": "an optimizer",
        "$stateful": "a Stateful object",
        "$generator": "a generator",
    }
    return names.get(_tag(node), "a plain value")


def _compatible_dtypes(saved: torch.dtype, current: torch.dtype) -> bool:
    # load_state_dict casts on copy; a cast between floating types (an fp32 checkpoint into a
    # bf16 model) is a deliberate choice users make, any other dtype change loses meaning.
    return saved == current or (saved.is_floating_point and current.is_floating_point)


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


class _Restore:
    def __init__(self, dec: _StateDecoder, label: str) -> None:
        self.dec = dec
        self.label = label  # "step 20" or "the checkpoint", for messages

    def mismatch(self, path: tuple[PathItem, ...], what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.dec.where}: cannot restore {self.label}: {format_path(path)} {what}. Nothing was restored: "
            "the model, optimizer and every other object are unchanged. Build the objects as they were when "
            "saving, or read the saved values with CheckpointManager.read() and load what fits by hand"
        )

    def prepare(self, target: Any, node: Json, path: tuple[PathItem, ...]) -> Apply:
        tag = _tag(node)
        if isinstance(target, torch.nn.Module):
            if tag != "$module":
                raise self.mismatch(path, f"is an nn.Module here but the checkpoint holds {_kind(node)} there")
            assert isinstance(node, dict)
            return self._module(target, node, path)
        if isinstance(target, torch.optim.Optimizer):
            if tag != "$optimizer":
                raise self.mismatch(path, f"is an optimizer here but the checkpoint holds {_kind(node)} there")
            assert isinstance(node, dict)
            saved = self.dec.decode(node["$optimizer"], path)
            where = f"{self.dec.where}: {format_path(path)}"
            try:
                sd = prepare_named_optimizer_state(target, saved, self.dec.names, where=where)
            except CheckpointError as e:
                raise CheckpointError(f"{e}. Nothing was restored: every object is unchanged") from None
            return lambda: (target.load_state_dict(sd), target)[1]
        if isinstance(target, torch.Generator):
            if tag != "$generator":
                raise self.mismatch(path, f"is a torch.Generator here but the checkpoint holds {_kind(node)} there")
            assert isinstance(node, dict)
            return self._generator(target, node, path)
        if is_stateful(target):
            if tag != "$stateful":
                raise self.mismatch(
                    path, f"is a {type(target).__name__} here but the checkpoint holds {_kind(node)} there"
                )
            assert isinstance(node, dict)
            sd = self.dec.decode(node["$stateful"], path)
            return lambda: (target.load_state_dict(sd), target)[1]
        if isinstance(target, MutableMapping) and isinstance(node, dict) and not tag.startswith("$"):
            children = {
                k: self.prepare(target[k], v, path + (k,)) if k in target else self._value(v, path + (k,))
                for k, v in node.items()
            }

            def apply_mapping() -> Any:
                for k, child in children.items():
                    target[k] = child()
                return target

            return apply_mapping
        if isinstance(target, list) and isinstance(node, list) and len(target) == len(node):
            items = [self.prepare(t, v, path + (i,)) for i, (t, v) in enumerate(zip(target, node))]

            def apply_list() -> Any:
                target[:] = [item() for item in items]
                return target

            return apply_list
        if isinstance(target, tuple) and tag == "$tuple" and isinstance(node, dict):
            body = node["$tuple"]
            if isinstance(body, list) and len(body) == len(target) and not hasattr(target, "_fields"):
                parts = [self.prepare(t, v, path + (i,)) for i, (t, v) in enumerate(zip(target, body))]
                return lambda: tuple(part() for part in parts)
        value = self.dec.decode(node, path)
        same = isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor) and target.shape == value.shape
        if same and target.dtype == value.dtype:

            def apply_tensor() -> Any:
                with torch.no_grad():
                    target.copy_(value)  # keeps the caller's tensor object (and anything aliasing it)
                return target

            return apply_tensor
        return lambda: value  # a plain value is replaced by the saved one

    def _value(self, node: Json, path: tuple[PathItem, ...]) -> Apply:
        value = self.dec.decode(node, path)
        return lambda: value

    def _module(self, module: torch.nn.Module, node: dict[str, Json], path: tuple[PathItem, ...]) -> Apply:
        saved = self.dec.module_state(node, path)
        current = module.state_dict()
        problems = []
        missing = [k for k in current if k not in saved]
        unexpected = [k for k in saved if k not in current]
        for k, have in current.items():
            if k not in saved or not isinstance(have, torch.Tensor):
                continue
            got = saved[k]
            if not isinstance(got, torch.Tensor):
                problems.append(f"{k!r} is a tensor in the module but not in the checkpoint")
            elif torch.nn.parameter.is_lazy(have):
                continue  # shape unknown until the first forward; load_state_dict materialises it
            elif got.shape != have.shape:
                problems.append(
                    f"{k!r} has shape {list(got.shape)} in {self.label} but {list(have.shape)} in the model"
                )
            elif not _compatible_dtypes(got.dtype, have.dtype):
                problems.append(f"{k!r} is {got.dtype} in {self.label} but {have.dtype} in the model")
        if missing:
            problems.append(
                f"missing from {self.label}: {missing[:_MAX_LISTED]}{' ...' if len(missing) > _MAX_LISTED else ''}"
            )
        if unexpected:
            problems.append(
                f"in {self.label} but not in the model: {unexpected[:_MAX_LISTED]}"
                f"{' ...' if len(unexpected) > _MAX_LISTED else ''}"
            )
        if problems:
            cls = type(module).__name__
            raise self.mismatch(path, f"({cls}) does not match the checkpoint: {_listed(problems)}")

        def apply_module() -> Any:
            module.load_state_dict(saved)  # user hooks run as usual
            return module

        return apply_module

    def _generator(self, gen: torch.Generator, node: dict[str, Json], path: tuple[PathItem, ...]) -> Apply:
        value = self.dec.decode(node["$generator"], path)
        have = gen.get_state()
        if not isinstance(value, torch.Tensor) or value.dtype != have.dtype or value.shape != have.shape:
            found = f"{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise self.mismatch(
                path,
                f"is a {gen.device} generator with a state of {list(have.shape)} {have.dtype}, "
                f"but {self.label} holds {found} (a generator of another device type?)",
            )
        state = value.cpu()
        return lambda: (gen.set_state(state), gen)[1]


def _contains_stateful(value: Any) -> bool:
    if is_stateful(value) or isinstance(value, torch.Generator):
        return True
    if isinstance(value, Mapping):
        return any(_contains_stateful(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_stateful(v) for v in value)
    return False


def restore_state(
    state: MutableMapping[str, Any],
    tree: Mapping[str, Json],
    files: FileReader,
    *,
    rng: bool = True,
    device: str | torch.device | None = None,
    where: str = "checkpoint",
    step: int | None = None,
) -> None:
    """Load a tree from ``encode_state`` into the caller's objects, in place, all or nothing.

    Stateful objects are loaded with their own ``load_state_dict``; plain values in ``state``
    are replaced.  Keys of the checkpoint that ``state`` does not name are left out.  Every
    object is checked before the first one is written: on a mismatch ``CheckpointError``
    names the key and both shapes, and nothing has changed.

    >>> from torchst.state.codec import encode_state
    >>> enc = encode_state({"model": model, "optim": opt})
    >>> reader = lambda rel: (enc.files[rel].tensors, enc.files[rel].metadata)
    >>> restore_state({"model": fresh_model, "optim": fresh_opt}, enc.tree, reader)
    """
    saved = tree.get("state")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: the manifest has no 'state' tree")
    label = f"step {step}" if step is not None else "the checkpoint"
    dec = _StateDecoder(files, device, where, parameter_names(_modules(state)))
    missing = [k for k in state if k not in saved and _contains_stateful(state[k])]
    if missing:
        raise CheckpointError(
            f"{where}: {label} has no entry for {missing} (it has {sorted(saved)}); "
            "restore with a state dict whose keys match the ones used when saving. Nothing was restored"
        )
    job = _Restore(dec, label)
    prepared = [(key, job.prepare(state[key], saved[key], (key,))) for key in state if key in saved]
    rng_state = None
    rng_tree = tree.get("rng")
    if rng and rng_tree is not None:
        rng_state = dec.decode(rng_tree, ("<rng>",))
        check_rng(rng_state, where=f"{where}: RNG state")
    done: list[str] = []
    for key, apply in prepared:
        try:
            state[key] = apply()
        except Exception as e:
            # Only code outside torchst's checks gets here (a load_state_dict hook, say).
            raise CheckpointError(
                f"{where}: restoring state[{key!r}] from {label} failed after the checks passed: {e!r}; "
                f"already restored: {done or 'nothing'}, not restored: "
                f"{[k for k, _ in prepared[len(done) + 1 :]] + ([] if rng_state is None else ['<rng>'])}"
            ) from e
        done.append(key)
    if rng_state is not None:
        restore_rng(rng_state, where=f"{where}: RNG state")
