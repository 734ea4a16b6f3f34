"""The nn.Module edge: ``save_model`` / ``load_model``, empty-model construction, state-dict hooks,
``PretrainedMixin``.

Everything goes through ``module.state_dict()`` and ``module.load_state_dict()``, so user hooks
and ``get_extra_state``/``set_extra_state`` keep working.  Tied parameters are stored once and
are one ``Parameter`` object again after loading.

Build big models with ``torchst.init_empty_weights()`` (parameters on the meta device, buffers
computed for real) and load them with ``torchst.load_model``: each tensor is materialised
directly on its target device.

>>> with torchst.init_empty_weights():
...     net = MyNet()
>>> torchst.load_model(net, "model.safetensors")
LoadResult(missing_keys=[], unexpected_keys=[])
"""

from __future__ import annotations

from .hooks import cast_on_save, rename_keys_on_load, strip_prefix_on_load
from .load import LoadResult, load_model
from .meta import init_empty_weights, materialize_meta_buffers, params_on_meta
from .pretrained import PretrainedMixin
from .save import EXTRA_STATE_KEY, save_model, tied_weights_keys

__all__ = [
    "EXTRA_STATE_KEY",
    "LoadResult",
    "PretrainedMixin",
    "cast_on_save",
    "init_empty_weights",
    "load_model",
    "materialize_meta_buffers",
    "params_on_meta",
    "rename_keys_on_load",
    "save_model",
    "strip_prefix_on_load",
    "tied_weights_keys",
]
