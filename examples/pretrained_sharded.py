"""Save a small transformer-style model sharded with ``save_pretrained``, reload it on meta.

The model ties its output projection to the token embedding.  It is saved into shards with
``save_pretrained``, then rebuilt with its parameters on the meta device (no memory, no random
init) and loaded with a ``device_map``, each tensor materialised directly where it belongs.

Run: python examples/pretrained_sharded.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
from torch import nn

import torchst


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(torchst.PretrainedMixin, nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: stored once, one Parameter after loading
        # computed, not saved: rebuilt by the constructor on load
        self.register_buffer("positions", torch.linspace(0, 1, context).unsqueeze(-1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def main() -> None:
    torch.manual_seed(0)
    model = TinyGPT().eval()
    tokens = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        expected = model(tokens)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: TinyGPT, {n_params:,} parameters, lm_head tied to embed: {model.lm_head.weight is model.embed.weight}"
    )

    with tempfile.TemporaryDirectory() as directory:
        t0 = time.perf_counter()
        saved = model.save_pretrained(directory, max_shard_size="500KB")
        print(
            f"save_pretrained: {len(saved.files)} shards, {saved.total_size / 1e6:.2f} MB of tensors "
            f"in {time.perf_counter() - t0:.3f}s"
        )
        print(f"  aliases recorded instead of duplicate bytes: {saved.aliases}")
        for name in sorted(os.listdir(directory)):
            print(f"  {name:40s} {os.path.getsize(os.path.join(directory, name)):>9,} bytes")
        with open(os.path.join(directory, saved.index_file or "")) as f:
            index = json.load(f)
        print(f"  index total_size: {index['metadata']['total_size']:,}")

        # Half the blocks on one "device", the rest elsewhere; on a GPU machine use e.g. {"blocks.2": 0}.
        device_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "": "cpu"}
        t0 = time.perf_counter()
        loaded = TinyGPT.from_pretrained(directory, device_map=device_map, dtype=torch.float32)
        print(f"from_pretrained on meta + device_map: {time.perf_counter() - t0:.3f}s, config {loaded.config}")
        print(
            f"  devices: { {str(p.device) for p in loaded.parameters()} }, "
            f"meta tensors left: {sum(p.is_meta for p in loaded.parameters())}"
        )
        print(f"  lm_head still tied to embed: {loaded.lm_head.weight is loaded.embed.weight}")
        with torch.no_grad():
            same = torch.equal(loaded(tokens), expected)
        print(f"  identical logits: {same}")
        assert same and loaded.lm_head.weight is loaded.embed.weight

        # The same directory, loaded in bfloat16 into a model built by hand on the meta device.
        with torchst.init_empty_weights():
            half = TinyGPT()
        missing, unexpected = torchst.load_model(half, directory, device_map={"": "cpu"}, dtype=torch.bfloat16)
        print(
            f"load_model into a meta model as bfloat16: missing={missing} unexpected={unexpected}, "
            f"dtype {half.embed.weight.dtype}"
        )


if __name__ == "__main__":
    main()
