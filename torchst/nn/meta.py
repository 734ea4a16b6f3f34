"""Models without weight memory: ``init_empty_weights`` and real buffers for meta-built models.

A checkpoint holds parameters and persistent buffers only.  Non-persistent buffers (RoPE
``inv_freq``, causal masks, position ids) are computed by the module's constructor, so a model
built entirely on the meta device (``with torch.device("meta")``) has nothing to load them from.
``init_empty_weights`` therefore puts only parameters on meta and computes buffers for real, as
accelerate's does.  For models already built on the meta device, ``load_model`` calls
``materialize_meta_buffers``, which recomputes such buffers by building the module that owns
them again (parameters on meta, so nothing big is allocated) from its recorded configuration.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["init_empty_weights", "materialize_meta_buffers", "params_on_meta"]

logger = logging.getLogger(__name__)


@contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory, no init); buffers stay real.

    Load the weights with ``torchst.load_model``, which materialises each parameter on its
    target device.  ``include_buffers=True`` puts buffers on meta too (like accelerate's option);
    ``load_model`` then recomputes the ones checkpoints do not hold where it can.

    >>> with torchst.init_empty_weights():
    ...     net = MyNet()
    >>> net.fc.weight.is_meta
    True
    >>> torchst.load_model(net, "model.safetensors"); net.fc.weight.device
    LoadResult(missing_keys=[], unexpected_keys=[])
    device(type='cpu')
    """
    if include_buffers:
        with torch.device("meta"), _skip_meta_init():
            yield
        return
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:
            p = self._parameters[name]
            assert p is not None
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with _skip_meta_init():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def params_on_meta() -> Any:
    """The former name of ``init_empty_weights()``; kept so existing code keeps working.

    >>> with params_on_meta():
    ...     net = MyNet()
    """
    return init_empty_weights()


@contextmanager
def _skip_meta_init() -> Iterator[None]:
    # Initialising meta tensors is pointless and slow (torch routes some of it through its
    # compiler stack); skip the torch.nn.init functions for meta tensors only, like transformers.
    inits = {n: getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}

    def skip_meta(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            return tensor if isinstance(tensor, torch.Tensor) and tensor.is_meta else fn(tensor, *args, **kwargs)

        return init

    for name, fn in inits.items():
        setattr(nn.init, name, skip_meta(fn))
    try:
        yield
    finally:
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


def materialize_meta_buffers(model: nn.Module, skip: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Compute the non-persistent buffers of ``model`` that are on meta; return those it could not.

    Each module owning such buffers is built again under ``init_empty_weights`` from what it
    was built from: ``type(m)(m.config)`` for transformers modules (rotary embeddings, whole
    models), ``type(m)(**m.config)`` for ``PretrainedMixin`` models; the same constructor
    computes the same values, so logits match ``from_pretrained`` bit for bit.  Buffers named
    in ``skip`` (loaded from the checkpoint) are left alone.

    >>> with torch.device("meta"):
    ...     rope = nn.Module(); rope.register_buffer("inv_freq", torch.ones(2), persistent=False)
    >>> materialize_meta_buffers(rope)  # a plain module records nothing to rebuild it from
    ['inv_freq']
    """
    owners: dict[str, list[str]] = {}
    for mod_name, mod in model.named_modules():
        for attr, buf in mod._buffers.items():
            pre = f"{mod_name}." if mod_name else ""
            if buf is not None and buf.is_meta and pre + attr not in skip:
                owners.setdefault(mod_name, []).append(attr)
    if not owners:
        return []
    stuck: list[str] = []
    root: nn.Module | None | bool = None  # built at most once, only when a submodule cannot be
    for mod_name, attrs in owners.items():
        mod = model.get_submodule(mod_name)
        fresh = _rebuild(mod)
        if fresh is None:
            if root is None:
                root = _rebuild(model) or False
            fresh = _submodule(root, mod_name) if isinstance(root, nn.Module) else None
        pre = f"{mod_name}." if mod_name else ""
        for attr in attrs:
            old = mod._buffers[attr]
            new = fresh._buffers.get(attr) if fresh is not None and type(fresh) is type(mod) else None
            if old is None or new is None or new.is_meta or new.shape != old.shape:
                stuck.append(pre + attr)
                continue
            mod._buffers[attr] = new if new.dtype == old.dtype else new.to(old.dtype)
            logger.debug("computed buffer %r on %s by rebuilding %s", pre + attr, new.device, type(mod).__name__)
    return stuck


def _rebuild(mod: nn.Module) -> nn.Module | None:
    """A new instance of ``mod``'s class from its recorded config (meta parameters), or None."""
    from .pretrained import PretrainedMixin  # the mixin records its constructor arguments

    config = getattr(mod, "config", None)
    try:
        with init_empty_weights():
            if isinstance(mod, PretrainedMixin):
                return mod.__class__(**mod.config)
            if config is not None and callable(getattr(config, "to_dict", None)):  # a transformers config
                return mod.__class__(config)
    except Exception as e:  # noqa: BLE001 - any constructor failure means "cannot rebuild"; reported by the caller
        logger.debug("cannot rebuild %s from its config: %s", type(mod).__name__, e)
    return None


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None
