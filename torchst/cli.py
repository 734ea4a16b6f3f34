"""``torchst inspect | verify | convert | diff``: parse arguments, call one API, print.

>>> torchst inspect model.safetensors          # dtypes, shapes, sizes, metadata
>>> torchst verify checkpoint_dir/ --full       # validate every header and read every byte
>>> torchst convert pytorch_model.bin out_dir/  # legacy torch.save -> safetensors (no pickle code runs)
>>> torchst diff a.safetensors b_dir/ --atol 1e-6
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from .errors import FormatError, TorchstError, UnsupportedDtypeError
from .format.header import TensorInfo
from .format.reader import SafeFile
from .sharding import Checkpoint, open_checkpoint

__all__ = ["main"]


@dataclass(frozen=True)
class _Entry:
    file: str
    info: TensorInfo


def _entries(ckpt: Checkpoint) -> dict[str, _Entry]:
    return {name: _Entry(path, info) for name, (path, _, info) in ckpt.tensors.items()}


def _open(stack: ExitStack, path: str, backend: str = "mmap") -> tuple[Checkpoint, dict[str, SafeFile]]:
    ckpt = open_checkpoint(path)  # validates every header and the shard index
    return ckpt, {p: stack.enter_context(SafeFile(p, backend=backend)) for p in ckpt.files}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _numel(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n


def cmd_inspect(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        ckpt, opened = _open(stack, args.path)
        files = list(opened.values())
        entries = _entries(ckpt)
        total = sum(e.info.nbytes for e in entries.values())
        params = sum(_numel(e.info) for e in entries.values())
        dtypes = Counter(e.info.dtype for e in entries.values())
        metadata = {os.path.basename(f.path): f.metadata() for f in files}
        if args.json:
            print(
                json.dumps(
                    {
                        "files": [os.path.basename(f.path) for f in files],
                        "tensors": {
                            n: {
                                "dtype": e.info.dtype,
                                "shape": list(e.info.shape),
                                "nbytes": e.info.nbytes,
                                "file": os.path.basename(e.file),
                            }
                            for n, e in sorted(entries.items())
                        },
                        "total_bytes": total,
                        "parameters": params,
                        "dtypes": dict(sorted(dtypes.items())),
                        "metadata": metadata,
                        "aliases": ckpt.aliases,
                    },
                    indent=2,
                )
            )
            return 0
        width = max((len(n) for n in entries), default=4)
        for name in sorted(entries):
            e = entries[name]
            shard = f"  {os.path.basename(e.file)}" if len(files) > 1 else ""
            print(f"{name:<{width}}  {e.info.dtype:>11}  {list(e.info.shape)!s:<20} {_human(e.info.nbytes):>10}{shard}")
        print(
            f"{len(entries):,} tensors, {params:,} parameters, {_human(total)} in {len(files)} file(s); "
            f"dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(dtypes.items()))}"
        )
        for alias, kept in ckpt.aliases.items():
            print(f"alias: {alias} -> {kept} (stored once)")
        for fname, md in metadata.items():
            if md:
                print(f"metadata ({fname}): {json.dumps(md, sort_keys=True)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        ckpt, files = _open(stack, args.path, backend="pread")
        skipped = []
        if args.full:
            for name, (path, _, _) in ckpt.tensors.items():
                try:
                    files[path].get_tensor(name)  # pread: every byte is read from disk
                except UnsupportedDtypeError:
                    skipped.append(name)
        how = "headers and index validated" + (", every byte read" if args.full else "")
        print(f"OK: {len(ckpt.tensors):,} tensors in {len(files)} file(s), {how}")
        if skipped:
            print(f"note: {len(skipped)} tensor(s) use dtypes this torch cannot load and were not read: {skipped[:5]}")
    return 0


def _load_legacy(path: str) -> dict[str, torch.Tensor]:
    print(
        f"loading {path} with torch.load(weights_only=True): only tensors and plain containers "
        "are unpickled, no code from the file runs",
        file=sys.stderr,
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        why = [
            ln.split("error:", 1)[1].split(". ")[0].strip() for ln in str(e).splitlines() if "Unpickler error:" in ln
        ]
        first = why[0] if why else type(e).__name__
        raise FormatError(
            f"{path}: refused: the file pickles objects other than tensors and plain containers ({first}); "
            "torchst never executes code from a checkpoint - re-save it as a state_dict of tensors"
        ) from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                print(f"using the tensors under key {key!r}", file=sys.stderr)
                obj = inner
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise TorchstError(
            f"{path}: expected a dict of str -> Tensor (a state_dict), found {type(obj).__name__}; "
            "save model.state_dict() rather than the model or the training state"
        )
    return obj


def cmd_convert(args: argparse.Namespace) -> int:
    from .sharding import load_state_dict, save_state_dict

    src = args.src
    if src.endswith((".bin", ".pt", ".pth", ".ckpt")):
        tensors = _load_legacy(src)
    else:
        tensors = load_state_dict(src)
    # Shared tensors (tied weights) are stored once and recorded as aliases.
    save_state_dict(tensors, args.dst, max_shard_size=args.max_shard_size, metadata={"format": "pt"})
    print(f"converted {len(tensors):,} tensors: {src} -> {args.dst}")
    return 0


def _iter_diff(
    a: dict[str, _Entry], fa: dict[str, SafeFile], b: dict[str, _Entry], fb: dict[str, SafeFile], atol: float
) -> Iterator[str]:
    for name in sorted(a.keys() - b.keys()):
        yield f"- {name}: only in first"
    for name in sorted(b.keys() - a.keys()):
        yield f"+ {name}: only in second"
    for name in sorted(a.keys() & b.keys()):
        ia, ib = a[name].info, b[name].info
        if (ia.dtype, ia.shape) != (ib.dtype, ib.shape):
            yield f"~ {name}: {ia.dtype}{list(ia.shape)} vs {ib.dtype}{list(ib.shape)}"
            continue
        ta, tb = fa[a[name].file].get_tensor(name), fb[b[name].file].get_tensor(name)
        if ta.dtype not in _NUMERIC:
            # ints, bool, float8, float4: exact comparison of the stored bytes
            if not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
                yield f"~ {name}: bytes differ"
            continue
        wide = torch.complex128 if ta.dtype.is_complex else torch.float64
        diff = (ta.to(wide) - tb.to(wide)).abs()
        nan_mismatch = bool((torch.isnan(ta) != torch.isnan(tb)).any())
        worst = float(diff.nan_to_num(0.0).max()) if diff.numel() else 0.0
        if nan_mismatch or worst > atol:
            extra = ", NaN positions differ" if nan_mismatch else ""
            yield f"~ {name}: max abs difference {worst:.3g} (atol {atol:g}){extra}"


_NUMERIC = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64)


def cmd_diff(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        (ca, fa), (cb, fb) = _open(stack, args.a), _open(stack, args.b)
        ea, eb = _entries(ca), _entries(cb)
        lines = list(_iter_diff(ea, fa, eb, fb, args.atol))
        if ca.aliases != cb.aliases:
            lines.append(f"~ aliases: {ca.aliases} vs {cb.aliases}")
        if args.metadata:
            ma, mb = ca.metadata, cb.metadata
            lines += [
                f"~ metadata {k!r}: {ma.get(k)!r} vs {mb.get(k)!r}"
                for k in sorted(ma.keys() | mb.keys())
                if ma.get(k) != mb.get(k)
            ]
        for line in lines:
            print(line)
        print(f"{'identical' if not lines else f'{len(lines)} difference(s)'}: {len(ea):,} vs {len(eb):,} tensors")
        return 0 if not lines else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchst", description="Inspect, verify, convert and compare checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="list tensors, dtypes, shapes, sizes and metadata")
    s.add_argument("path", help="a .safetensors file, a checkpoint directory or an *.index.json")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)
    s = sub.add_parser("verify", help="validate headers and the shard index; --full also reads every byte")
    s.add_argument("path")
    s.add_argument("--full", action="store_true")
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser("convert", help="legacy .bin/.pt (weights_only) or safetensors -> safetensors file or directory")
    s.add_argument("src")
    s.add_argument("dst", help="a path ending in .safetensors, or a directory")
    s.add_argument("--max-shard-size", default="5GB", help='e.g. "500MB", "2GiB" or bytes (directories only)')
    s.set_defaults(func=cmd_convert)
    s = sub.add_parser("diff", help="compare two checkpoints; exit 1 when they differ")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--atol", type=float, default=0.0, help="tolerated absolute difference for float tensors")
    s.add_argument("--metadata", action="store_true", help="also compare header metadata")
    s.set_defaults(func=cmd_diff)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (TorchstError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        print(f"torchst {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
