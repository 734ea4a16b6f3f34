"""``torchst convert SRC DST``: torch.save checkpoints (or safetensors) -> safetensors file or directory."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import show_progress


def register(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="torch.save .bin/.pt/.ckpt (read with weights_only=True) or safetensors -> safetensors",
        description="Convert a checkpoint to safetensors. What SRC is gets decided by its content (zip or legacy "
        "torch.save pickle, or safetensors), not its extension. Legacy files are always read with "
        "torch.load(weights_only=True): only tensors and plain containers are unpickled, no code from the file "
        "runs. A state_dict nested under 'state_dict', 'model_state_dict', 'model' or 'module' is unwrapped. "
        "Tied tensors are stored once and recorded as aliases.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        help="a torch.save file, a directory with pytorch_model.bin or pytorch_model-0000i-of-0000N.bin + "
        "pytorch_model.bin.index.json, or a safetensors checkpoint (to re-shard it)",
    )
    p.add_argument("dst", help="a path ending in .safetensors (one file), or a directory (sharded if needed)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help='largest shard when DST is a directory, e.g. "500MB", "2GiB" or a number of bytes (default: 5GB)',
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_checkpoint  # imports torch: only this command needs it

    # The library logs each legacy file it reads "with torch.load(weights_only=True) ..." (stderr).
    result = convert_checkpoint(args.src, args.dst, max_shard_size=args.max_shard_size, progress=show_progress(args))
    aliases = f", {len(result.aliases)} alias(es) recorded" if result.aliases else ""
    print(f"converted {result.tensors:,} tensors ({result.source_kind}){aliases}: {args.src} -> {args.dst}")
    return 0
