"""``PretrainedMixin``: ``save_pretrained`` / ``from_pretrained`` for any ``nn.Module`` (config.json + weights)."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from ..devices import DeviceLike, DeviceMap
from ..errors import CheckpointError, SerializationError
from ..sharding.io import SaveResult
from ..storage.atomic import atomic_write
from .load import load_model
from .meta import init_empty_weights
from .save import save_model

__all__ = ["PretrainedMixin"]

PathLike = str | os.PathLike[str]
T = TypeVar("T", bound="PretrainedMixin")
CONFIG_NAME = "config.json"


class PretrainedMixin:
    """Give an ``nn.Module`` ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors).

    The constructor arguments are recorded automatically and must be JSON-able.

    >>> class Net(torchst.PretrainedMixin, nn.Module):
    ...     def __init__(self, dim: int = 8): super().__init__(); self.fc = nn.Linear(dim, dim)
    >>> _ = Net(16).save_pretrained("net")
    >>> Net.from_pretrained("net").fc
    Linear(in_features=16, out_features=16, bias=True)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]
        sig = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self: Any, *args: Any, **kw: Any) -> None:
            if "_torchst_config" not in self.__dict__:  # the outermost constructor call records
                bound = sig.bind(self, *args, **kw)
                bound.apply_defaults()
                config: dict[str, Any] = {}
                for name, p in sig.parameters.items():
                    if name == "self" or p.kind is p.VAR_POSITIONAL:
                        if p.kind is p.VAR_POSITIONAL and bound.arguments.get(name):
                            raise SerializationError(f"{cls.__name__}: *{name} cannot be recorded in config.json")
                        continue
                    value = bound.arguments.get(name)
                    if p.kind is p.VAR_KEYWORD:
                        config.update(value or {})
                    else:
                        config[name] = value
                self.__dict__["_torchst_config"] = config
            init(self, *args, **kw)

        cls.__init__ = wrapped  # type: ignore[method-assign]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments this instance was built with."""
        return dict(self.__dict__.get("_torchst_config", {}))

    def save_pretrained(
        self,
        directory: PathLike,
        *,
        max_shard_size: int | str | None = "5GB",
        metadata: Mapping[str, str] | None = None,
    ) -> SaveResult:
        """Write ``config.json`` and the weights (sharded above ``max_shard_size``) into ``directory``."""
        if not isinstance(self, nn.Module):
            raise TypeError("PretrainedMixin must be mixed into an nn.Module subclass")
        try:
            text = json.dumps(self.config, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise SerializationError(
                f"{type(self).__name__}: constructor arguments {self.config!r} cannot be written to {CONFIG_NAME} "
                f"({e}); use JSON-able arguments (str, numbers, bools, None, lists, dicts)"
            ) from None
        result = save_model(self, os.fspath(directory), max_shard_size=max_shard_size, metadata=metadata)
        with atomic_write(os.path.join(directory, CONFIG_NAME)) as f:
            f.write(text.encode("utf-8"))
        return result

    @classmethod
    def from_pretrained(  # noqa: PYI019 (Self needs Python 3.11)
        cls: type[T],
        directory: PathLike,
        *,
        device: DeviceLike = "cpu",
        device_map: DeviceMap | str | None = None,
        dtype: torch.dtype | None = None,
        strict: bool = True,
        max_memory: Mapping[int | str, int | str] | None = None,
        **overrides: Any,
    ) -> T:
        """Build from ``config.json`` (plus ``overrides``) with meta parameters, then load the weights."""
        config_path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{config_path} not found: was the directory written by save_pretrained?") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object of constructor arguments")
        config.update(overrides)
        with init_empty_weights():
            try:
                model = cls(**config)
            except TypeError as e:
                raise CheckpointError(f"{config_path}: cannot build {cls.__name__}(**config): {e}") from None
        assert isinstance(model, nn.Module)
        load_model(
            model, directory, strict=strict, device=device, device_map=device_map, dtype=dtype, max_memory=max_memory
        )
        model.eval()  # like transformers: a loaded model is ready for inference
        return model
