"""Bridges to other libraries; each submodule imports its library only when used."""

from __future__ import annotations

__all__: list[str] = []
