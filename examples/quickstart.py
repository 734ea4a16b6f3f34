"""torchst in one minute: files, models with tied weights, training checkpoints.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torchst


class TinyLM(nn.Module):
    """Embedding -> MLP -> output head tied to the embedding (like most LLMs)."""

    def __init__(self, vocab: int = 512, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.mlp(self.embed(ids))))


def ms(t0: float) -> str:
    return f"{1e3 * (time.perf_counter() - t0):.1f} ms"


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 512, (2, 16))
    expected = model(ids)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        # 1. One .safetensors file: the reference format, byte for byte.
        path = root / "weights.safetensors"
        t0 = time.perf_counter()
        torchst.save_file({"w": torch.randn(256, 64), "b": torch.zeros(64)}, path, metadata={"format": "pt"})
        print(f"[file] saved {path.stat().st_size:,} bytes in {ms(t0)}")
        with torchst.safe_open(path) as f:  # header fully validated here; no tensor read yet
            rows = f.get_slice("w")[:2]
            print(f"[file] keys={f.keys()} metadata={f.metadata()} first rows of w: {tuple(rows.shape)}")

        # 2. A model with tied weights, sharded like a Hugging Face checkpoint.
        ckpt = root / "tiny-lm"
        t0 = time.perf_counter()
        torchst.save_model(model, ckpt, max_shard_size="100KB")
        files = sorted(p.name for p in ckpt.iterdir())
        print(f"[model] saved in {ms(t0)}: {files}")
        with torchst.init_empty_weights():  # parameters on meta (no memory), buffers real
            fresh = TinyLM()
        t0 = time.perf_counter()
        result = torchst.load_model(fresh, ckpt, device_map={"": "cpu"})
        same = torch.equal(fresh(ids), expected)
        print(f"[model] loaded onto a meta-initialised model in {ms(t0)}: missing={list(result.missing_keys)} "
              f"unexpected={list(result.unexpected_keys)}")
        print(f"[model] lm_head still tied to embed: {fresh.lm_head.weight is fresh.embed.weight}; "
              f"outputs identical: {same}")

        # 3. Training checkpoints: model + optimizer + scheduler + RNG + your own values, no pickle.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
        mgr = torchst.CheckpointManager(root / "run", keep_last=2, async_save=True)
        for step in range(1, 7):
            loss = model(ids).logsumexp(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 2 == 0:
                mgr.save(step, {"model": model, "optim": opt, "sched": sched, "extra": {"loss": loss.item()}})
        mgr.wait()
        print(f"[train] committed steps kept: {mgr.steps()} (keep_last=2)")
        mgr.close()  # releases the writer lock, as when the training process exits
        restored_model = TinyLM()
        restored_opt = torch.optim.AdamW(restored_model.parameters(), lr=1e-3)
        restored_sched = torch.optim.lr_scheduler.StepLR(restored_opt, step_size=2)
        state = {"model": restored_model, "optim": restored_opt, "sched": restored_sched, "extra": {}}
        step = torchst.CheckpointManager(root / "run").restore(state)
        resumed = all(torch.equal(a, b) for a, b in zip(model.parameters(), restored_model.parameters()))
        print(f"[train] restored step {step}: parameters identical = {resumed}, "
              f"lr = {restored_sched.get_last_lr()[0]:.2e}, extra = {state['extra']}")

        # 4. Bad files are refused before any tensor byte is touched.
        path.write_bytes(path.read_bytes()[:-10])
        try:
            torchst.load_file(path)
        except torchst.FormatError as e:
            print(f"[safety] truncated file refused: {type(e).__name__}: {e}".replace(tmp, "<tmp>"))

        # 5. Per-tensor checksums (on by default for model saves) catch a flipped byte in the data.
        shard = ckpt / files[0]
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0x01
        shard.write_bytes(bytes(raw))
        try:
            torchst.load_model(TinyLM(), ckpt, verify=True)
        except torchst.IntegrityError as e:
            print(f"[integrity] flipped byte caught: {type(e).__name__}: {e}".replace(tmp, "<tmp>"))
        if not (same and resumed):
            raise SystemExit("round-trip mismatch")


if __name__ == "__main__":
    main()
