"""FSDP2 training on 2 CPU processes, one Hugging Face checkpoint written in place by both ranks,
resumed on a different number of processes, then opened with ``from_pretrained``.

Runs in seconds on CPU (gloo): ``python examples/fsdp_checkpoint.py``.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import torchst
import torchst.distributed as tsd

CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
BATCH = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def sharded_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    for layer in model.model.layers:  # one FSDP2 unit per decoder layer, and the rest at the root
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model: LlamaForCausalLM, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = model(BATCH, labels=BATCH).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def join(rank: int, world: int, store: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )


def first_run(rank: int, world: int, work: str) -> None:
    """2 ranks: train 3 steps, then every rank writes its own shards of one checkpoint."""
    join(rank, world, os.path.join(work, "store-1"))
    model = sharded_model(seed=0)
    loss = train(model, steps=3)
    result = tsd.save_model(model, os.path.join(work, "ckpt"), max_shard_size="200KB")
    if rank == 0:
        CONFIG.save_pretrained(os.path.join(work, "ckpt"))  # config.json: from_pretrained needs it
        print(f"trained on {world} ranks (loss {loss:.3f}); wrote {len(result.files)} shards + index in place")
    dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        mp.spawn(first_run, args=(2, work), nprocs=2, join=True)
        ckpt = os.path.join(work, "ckpt")
        print("files:", sorted(f for f in os.listdir(ckpt) if not f.startswith(".")))

        # Resume on 1 process (a different world size): the same collective API reshards.
        join(0, 1, os.path.join(work, "store-2"))
        model = sharded_model(seed=123)  # different initial weights: everything must come from the file
        missing, unexpected = tsd.load_model(model, ckpt)
        saved = torchst.load_state_dict(ckpt)  # plain single-process read of the same checkpoint
        same = all(torch.equal(v.full_tensor(), saved[k]) for k, v in model.state_dict().items())
        print(f"resumed on 1 rank: missing={missing} unexpected={unexpected}; weights identical = {same}")
        train(model, steps=1)
        tsd.save_model(model, ckpt, max_shard_size="200KB")  # replaces the checkpoint atomically
        with torch.no_grad():
            fsdp_logits = model(BATCH).logits
        dist.destroy_process_group()

        # Any tool reads the result: no consolidation step.
        plain = LlamaForCausalLM.from_pretrained(ckpt).eval()
        model.eval()
        with torch.no_grad():
            identical = torch.equal(plain(BATCH).logits, fsdp_logits)
        print(f"from_pretrained on the FSDP2 checkpoint: identical logits: {identical}")
        if not (same and identical and not missing and not unexpected):
            sys.exit(1)


if __name__ == "__main__":
    main()
