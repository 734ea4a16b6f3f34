"""The nn.Module edge: ``save_model`` / ``load_model``, standard state-dict hooks, ``PretrainedMixin``.

Everything goes through ``module.state_dict()`` and ``module.load_state_dict()``, so user hooks
and ``get_extra_state``/``set_extra_state`` keep working.  Tied parameters are stored once and
are one ``Parameter`` object again after loading.

Loading into a model whose tensors are on the ``meta`` device (``with torch.device("meta")``,
accelerate's ``init_empty_weights()``, ``from_pretrained``) materialises each tensor directly on
its target device and assigns it.  For CPU targets the tensors are read into memory the model
owns (one copy, file -> parameter), not left as windows of the mapped files.  That load is slower
than mapping, but the model then never depends on the files: tools that rewrite a checkpoint in
place (truncate + write) would otherwise make the next access to a mapped parameter crash the
process with SIGBUS, and first-touch page faults would land in the first forward pass instead of
the load.  Peak RSS is the model size.  Pass ``backend="mmap"`` for zero-copy, page-cache-backed
parameters when the files are known to stay put.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .dedup import TiedKeys
from .devices import DeviceMap, check_device, infer_device_map, resolve_device_map
from .errors import CheckpointError, DeviceMapError, SerializationError
from .format.reader import DeviceLike
from .sharding.io import Checkpoint, SaveResult, open_checkpoint, save_state_dict
from .storage.atomic import atomic_write

__all__ = [
    "EXTRA_STATE_KEY",
    "LoadResult",
    "PretrainedMixin",
    "cast_on_save",
    "load_model",
    "params_on_meta",
    "rename_keys_on_load",
    "save_model",
    "strip_prefix_on_load",
    "tied_weights_keys",
]

# JSON-able ``get_extra_state()`` values live in the file metadata under this key (no pickle).
EXTRA_STATE_KEY = "torchst.extra_state"
_EXTRA = "_extra_state"
PathLike = str | os.PathLike[str]


class LoadResult(NamedTuple):
    """Keys the model has but the checkpoint lacked, and keys the checkpoint has but the model lacks."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def tied_weights_keys(model: nn.Module) -> TiedKeys | None:
    """The model's transformers ``_tied_weights_keys`` (v4 list or v5 dict), prefixed per submodule.

    >>> tied_weights_keys(llama)
    {'lm_head.weight': 'model.embed_tokens.weight'}
    """
    as_list: list[str] = []
    as_dict: dict[str, str] = {}
    for name, sub in model.named_modules():
        tied = getattr(sub, "_tied_weights_keys", None)
        pre = f"{name}." if name else ""
        if isinstance(tied, Mapping):
            as_dict.update({pre + str(k): pre + str(v) for k, v in tied.items()})
        elif isinstance(tied, (list, tuple, set)):
            as_list.extend(pre + str(k) for k in tied)
    return as_dict or as_list or None


def save_model(
    model: nn.Module,
    path_or_directory: PathLike,
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    fsync: bool = False,
    checksums: bool = True,
    progress: bool | None = None,
) -> SaveResult:
    """Save ``model.state_dict()``: tied weights once, user hooks and extra state honoured.

    A path ending in ``.safetensors`` is one file; anything else is a directory (one
    ``model.safetensors`` unless ``max_shard_size`` asks for shards).  Each tensor's CRC32C is
    recorded in its file's metadata (``checksums=False`` turns that off), so
    ``load_model(..., verify=True)`` and ``torchst verify`` can detect corruption.
    ``progress=True`` (or ``TORCHST_PROGRESS=1``) shows a bar of the bytes written.

    >>> torchst.save_model(model, "ckpt", max_shard_size="2GB")
    >>> missing, unexpected = torchst.load_model(model, "ckpt")
    """
    if not isinstance(model, nn.Module):
        raise SerializationError(f"save_model expects a torch.nn.Module, found {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif key == _EXTRA or key.endswith("." + _EXTRA):
            extra[key] = value
        else:
            raise SerializationError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; a state_dict hook must "
                "return tensors"
            )
    md = dict(metadata or {})
    if extra:
        try:
            md[EXTRA_STATE_KEY] = json.dumps(extra, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SerializationError(
                f"get_extra_state() of {sorted(extra)} returned a value that is not JSON ({e}); return a tensor, "
                "or dicts/lists of str, int, float, bool and None (torchst never pickles)"
            ) from None
    return save_state_dict(
        tensors,
        path_or_directory,
        max_shard_size=max_shard_size,
        metadata=md,
        tied_keys=tied_weights_keys(model),
        fsync=fsync,
        checksums=checksums,
        progress=progress,
    )


def _tensors_by_name(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """State-dict tensors by name (persistent buffers only) and groups of names tied to one object."""
    named: dict[str, torch.Tensor] = {}
    groups: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or attr in mod._non_persistent_buffers_set:
                continue
            named[pre + attr] = t
            groups.setdefault(id(t), []).append(pre + attr)
    return named, [g for g in groups.values() if len(g) > 1]


def load_model(
    model: nn.Module,
    path_or_directory: PathLike,
    *,
    strict: bool = True,
    device: DeviceLike = "cpu",
    device_map: DeviceMap | str | None = None,
    dtype: torch.dtype | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    backend: str | None = None,
    verify: bool = False,
) -> LoadResult:
    """Load a file, directory or index into ``model`` through ``model.load_state_dict``.

    A model on the meta device (or any model given a ``device_map``) gets new tensors on
    ``device`` or on ``device_map={prefix: device}`` / ``"auto"`` (accelerate's planner, with
    ``max_memory``), in the model's dtypes or ``dtype`` for floating tensors.  A materialised
    model is copied into in place.  ``strict`` raises ``CheckpointError`` on missing/unexpected keys.
    ``verify=True`` checks every tensor against its recorded checksum before the model is touched
    (``IntegrityError`` names file, tensor and byte range).

    >>> with torch.device("meta"):
    ...     model = MyNet()
    >>> torchst.load_model(model, "ckpt", device_map={"": "cpu"}, dtype=torch.bfloat16)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_model expects a torch.nn.Module, found {type(model).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, found {dtype!r}")
    ckpt = open_checkpoint(path_or_directory)
    named, groups = _tensors_by_name(model)
    assign = device_map is not None or any(t.is_meta for t in named.values())
    dev = check_device(device)
    prefixes = _prefix_map(model, device_map, max_memory, dtype)
    devices = _placement(named, groups, list(ckpt.tensors), prefixes)
    dtypes: dict[str, torch.dtype] = {}
    if assign:  # new tensors take the model's declared dtype (or ``dtype``), as copying in would
        for n in ckpt.tensors:
            if n in named and not (dtype is not None and named[n].dtype.is_floating_point):
                dtypes[n] = named[n].dtype
    _check_shapes(ckpt, named)
    state = ckpt.load(
        device_map={"": dev, **devices},
        dtype=dtype,
        dtypes=dtypes,
        backend=backend or ("pread" if assign else "mmap"),
        verify=verify,
    )
    tied_to: dict[str, list[str]] = {n: g for g in groups for n in g}
    if assign:
        for alias, kept in ckpt.aliases.items():
            if alias in state and kept not in tied_to.get(alias, ()):
                state[alias] = state[alias].clone()  # the model does not tie them: keep them independent
    extra = ckpt.metadata.get(EXTRA_STATE_KEY)
    if extra is not None:
        state.update(json.loads(extra))
    result = model.load_state_dict(state, strict=False, assign=assign)
    loaded = {k for k in state if k not in result.unexpected_keys}
    missing = [k for k in result.missing_keys if not any(o in loaded for o in tied_to.get(k, ()))]
    unexpected = [k for k in result.unexpected_keys if k not in ckpt.aliases]
    if assign:
        _retie(model, groups, loaded)
    tie_weights = getattr(model, "tie_weights", None)
    if missing and callable(tie_weights):
        # transformers models declare ties (``_tied_weights_keys`` + config) that a model built
        # under init_empty_weights may not have applied yet; the file then lacks the tied name.
        tie_weights()
        tied_now = {n: g for g in _tensors_by_name(model)[1] for n in g}
        missing = [k for k in missing if not any(o in loaded for o in tied_now.get(k, ()))]
    if assign:
        _place_leftovers(model, loaded, dev, prefixes)
    unindexed = sorted(n for names in ckpt.unindexed.values() for n in names)
    if strict and (missing or unexpected or unindexed):
        raise CheckpointError(_mismatch_message(model, ckpt.source, missing, unexpected, unindexed))
    return LoadResult(missing, unexpected)


def _prefix_map(
    model: nn.Module,
    device_map: DeviceMap | str | None,
    max_memory: Mapping[int | str, int | str] | None,
    dtype: torch.dtype | None,
) -> DeviceMap | None:
    if isinstance(device_map, str):
        if device_map != "auto":
            raise DeviceMapError(f'device_map must be "auto" or a dict {{prefix: device}}, found {device_map!r}')
        return infer_device_map(model, max_memory=max_memory, dtype=dtype)
    if max_memory is not None:
        raise DeviceMapError('max_memory only applies to device_map="auto"')
    return device_map


def _placement(
    named: Mapping[str, torch.Tensor], groups: list[list[str]], stored: list[str], device_map: DeviceMap | None
) -> dict[str, torch.device]:
    if device_map is None:
        return {}
    known = [n for n in stored if n in named]
    devices = resolve_device_map(known, device_map)
    for g in groups:
        placed = {str(devices[n]) for n in g if n in devices}
        if len(placed) > 1:
            raise DeviceMapError(
                f"tied tensors {g} are mapped to different devices {sorted(placed)}; they are one tensor, "
                "so map their modules to the same device"
            )
    return devices


def _check_shapes(ckpt: Checkpoint, named: Mapping[str, torch.Tensor]) -> None:
    wrong = []
    for name, kept in [(n, n) for n in ckpt.tensors] + list(ckpt.aliases.items()):
        if name in named and kept in ckpt.tensors:
            shape = ckpt._request(kept, torch.device("meta"), None).shape
            if tuple(named[name].shape) != shape:
                wrong.append(f"{name!r}: checkpoint has shape {list(shape)}, the model has {list(named[name].shape)}")
    if wrong:
        raise CheckpointError(
            f"{ckpt.source}: size mismatch for {len(wrong)} tensor(s) (nothing was loaded): " + "; ".join(wrong[:10])
        )


def _retie(model: nn.Module, groups: list[list[str]], loaded: set[str]) -> None:
    for g in groups:
        src = next((n for n in g if n in loaded), None)
        if src is None:
            continue
        owner, _, attr = src.rpartition(".")
        mod = model.get_submodule(owner)
        obj: Any = mod._parameters[attr] if attr in mod._parameters else mod._buffers[attr]
        for n in g:
            owner, _, attr = n.rpartition(".")
            mod = model.get_submodule(owner)
            (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = obj


def _place_leftovers(model: nn.Module, loaded: set[str], dev: torch.device, prefixes: DeviceMap | None) -> None:
    """Buffers the checkpoint does not hold (e.g. non-persistent ones) follow their module's device."""
    stuck = []
    for mod_name, mod in model.named_modules():
        pre = f"{mod_name}." if mod_name else ""
        for attr, buf in list(mod._buffers.items()):
            name = pre + attr
            if buf is None or name in loaded:
                continue
            if buf.is_meta:
                stuck.append(name)
                continue
            target = dev if prefixes is None else resolve_device_map([name], {"": dev, **prefixes})[name]
            if buf.device != target:
                mod._buffers[attr] = buf.to(target)
    if stuck:
        warnings.warn(
            f"buffers {stuck[:5]} are still on the meta device: the checkpoint does not hold them and the model was "
            "built with meta buffers; build it under torchst.params_on_meta() so buffers are computed for real",
            stacklevel=3,
        )


def _mismatch_message(
    model: nn.Module, source: str, missing: list[str], unexpected: list[str], unindexed: Sequence[str] = ()
) -> str:
    msg = f"Error(s) in loading {source} into {type(model).__name__}:"
    if missing:
        msg += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
    if unexpected:
        msg += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
    if unindexed:
        msg += (
            "\n    Stored in shards but not listed by the index (not loaded): "
            + ", ".join(f'"{k}"' for k in unindexed[:20])
            + (f" and {len(unindexed) - 20} more" if len(unindexed) > 20 else "")
        )
    return msg + "\n  pass strict=False to load the matching keys and get the lists back"


# --- standard hooks -------------------------------------------------------------------------


def rename_keys_on_load(module: nn.Module, rename: Mapping[str, str] | Callable[[str], str]) -> RemovableHandle:
    """Rename checkpoint keys before ``module.load_state_dict`` matches them; returns a handle.

    ``rename`` is a ``{old: new}`` dict or a function of the key (relative to ``module``).

    >>> h = rename_keys_on_load(model, {"fc.w": "fc.weight"})
    >>> torchst.load_model(model, "old.safetensors"); h.remove()
    """
    fn: Callable[[str], str] = rename.get if isinstance(rename, Mapping) else rename  # type: ignore[assignment]
    mapping = rename if isinstance(rename, Mapping) else None

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rel = key[len(prefix) :]
            new = mapping.get(rel, rel) if mapping is not None else fn(rel)
            if new != rel:
                state_dict[prefix + new] = state_dict.pop(key)

    handle: RemovableHandle = module.register_load_state_dict_pre_hook(hook)  # type: ignore[no-untyped-call]
    return handle


def strip_prefix_on_load(module: nn.Module, prefix: str = "module.") -> RemovableHandle:
    """Drop ``prefix`` from checkpoint keys on load, e.g. a DDP/``torch.compile`` checkpoint.

    >>> h = strip_prefix_on_load(model, "module.")
    >>> torchst.load_model(model, "ddp.safetensors")
    """
    if not prefix:
        raise ValueError("prefix must be a non-empty string such as 'module.'")
    return rename_keys_on_load(module, lambda k: k.removeprefix(prefix))


def cast_on_save(module: nn.Module, dtype: torch.dtype) -> RemovableHandle:
    """Cast floating tensors of ``module.state_dict()`` to ``dtype`` (e.g. save fp32 weights as bf16).

    >>> h = cast_on_save(model, torch.bfloat16)
    >>> torchst.save_model(model, "model-bf16.safetensors"); h.remove()
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, found {dtype!r}")
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key, value in state_dict.items():
            if key.startswith(prefix) and isinstance(value, torch.Tensor) and value.is_floating_point():
                # one cast per source memory keeps tied weights tied in the saved state
                ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                state_dict[key] = cache.setdefault(ident, value.to(dtype))
        cache.clear()

    handle: RemovableHandle = module.register_state_dict_post_hook(hook)  # type: ignore[no-untyped-call]
    return handle


# --- save_pretrained / from_pretrained --------------------------------------------------------


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real.

    >>> with params_on_meta():
    ...     model = MyNet()   # parameters are meta, non-persistent buffers are computed
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:
            p = self._parameters[name]
            assert p is not None
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    # Initialising meta tensors is pointless and slow (torch routes some of it through its
    # compiler stack); skip the torch.nn.init functions for meta tensors only, like transformers.
    inits = {n: getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}

    def skip_meta(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            return tensor if isinstance(tensor, torch.Tensor) and tensor.is_meta else fn(tensor, *args, **kwargs)

        return init

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    for name, fn in inits.items():
        setattr(nn.init, name, skip_meta(fn))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


T = TypeVar("T", bound="PretrainedMixin")
CONFIG_NAME = "config.json"


class PretrainedMixin:
    """Give an ``nn.Module`` ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors).

    The constructor arguments are recorded automatically and must be JSON-able.

    >>> class Net(torchst.PretrainedMixin, nn.Module):
    ...     def __init__(self, dim: int = 8): super().__init__(); self.fc = nn.Linear(dim, dim)
    >>> Net(16).save_pretrained("net"); net = Net.from_pretrained("net", device_map={"": "cpu"})
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
        with params_on_meta():
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
