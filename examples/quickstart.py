"""Save a small model with torchst, load it back three ways, and show what happened.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torchst


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64))


def main() -> None:
    model = build_model()
    x = torch.randn(4, 64)
    expected = model(x)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        t0 = time.perf_counter()
        torchst.save_file(model.state_dict(), path, metadata={"format": "pt", "arch": "mlp"})
        print(f"saved {len(model.state_dict())} tensors, {path.stat().st_size:,} bytes "
              f"in {1e3 * (time.perf_counter() - t0):.1f} ms -> {path.name}")

        # 1. Lazy: the header is validated on open; tensors are read only when asked for.
        with torchst.safe_open(path) as f:
            print(f"header: {len(f.keys())} tensors, metadata={f.metadata()}")
            for name in f.keys():
                sl = f.get_slice(name)
                print(f"  {name:<10} {sl.get_dtype():>4} {sl.get_shape()}")
            rows = f.get_slice("0.weight")[:2]
            print(f"first two rows of 0.weight via get_slice: shape {tuple(rows.shape)}")

        # 2. Zero-copy load (mmap) into a fresh model.
        fresh = build_model()
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        fresh.load_state_dict(torchst.load_file(path))
        same = torch.equal(fresh(x), expected)
        print(f"mmap load into a fresh model: outputs identical = {same}")

        # 3. Owned memory via positional reads (for network filesystems).
        sd = torchst.load_file(path, backend="pread")
        print(f"pread load: {sum(t.numel() for t in sd.values()):,} parameters, "
              f"all equal = {all(torch.equal(sd[k], v) for k, v in model.state_dict().items())}")

        # Files are interchangeable with the safetensors format, and bad files are refused early.
        path.write_bytes(path.read_bytes()[:-10])
        try:
            torchst.load_file(path)
        except torchst.FormatError as e:
            print(f"truncated file refused: {type(e).__name__}: {e}".replace(tmp, "<tmp>"))
        if not same:
            raise SystemExit("round-trip mismatch")


if __name__ == "__main__":
    main()
