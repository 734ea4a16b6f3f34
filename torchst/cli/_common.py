"""Helpers shared by the subcommands: progress switch, sizes, JSON output, layout labels."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..resolve import Layout, Part


def show_progress(args: argparse.Namespace) -> bool:
    """Bars on a terminal from the first moment, never when stderr is piped or with ``-q``."""
    return not args.quiet and sys.stderr.isatty()


def note(args: argparse.Namespace, message: str) -> None:
    """An informational line on stderr (silenced by ``-q``)."""
    if not args.quiet:
        print(f"torchst {args.command}: {message}", file=sys.stderr)


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def human(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def base_dir(layout: Layout) -> str:
    if "://" in layout.path:  # a URL: a prefix unless it names a file
        return layout.path.rsplit("/", 1)[0] if layout.path.endswith((".safetensors", ".json")) else layout.path
    return layout.path if os.path.isdir(layout.path) else os.path.dirname(layout.path)


def rel(layout: Layout, path: str) -> str:
    """A file's name relative to what the user named (``model/model.safetensors`` in a step)."""
    return os.path.relpath(path, base_dir(layout) or ".")


def part_title(part: Part) -> str:
    role = "model weights" if part.role == "weights" else "training state"
    return f"{part.label} ({role})"


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def add_path(p: argparse.ArgumentParser, name: str, what: str) -> None:
    p.add_argument(
        name,
        help=f"{what}: a .safetensors file, a sharded directory or *.index.json, a CheckpointManager step "
        "directory (step_20/) or run directory",
    )
