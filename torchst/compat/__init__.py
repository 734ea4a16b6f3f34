"""Drop-in mirrors of other libraries' APIs, built on torchst's core.

>>> from torchst.compat.safetensors import safe_open
>>> from torchst.compat.safetensors.torch import save_file, load_file
"""

from __future__ import annotations

__all__: list[str] = []
