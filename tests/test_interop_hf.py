"""Interop with transformers, huggingface_hub and accelerate (offline, tiny models built from configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
huggingface_hub = pytest.importorskip("huggingface_hub")

import torchst
from torchst.nn import params_on_meta

X = torch.tensor([[1, 5, 7, 3, 99, 0, 12], [4, 2, 127, 11, 8, 8, 1]])


def tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def save_torchst_dir(model: torch.nn.Module, directory: Path) -> torchst.sharding.SaveResult:
    model.config.save_pretrained(directory)
    return torchst.save_model(model, directory, max_shard_size="20KB")


def test_torchst_sharded_save_loads_in_transformers(llama: torch.nn.Module, tmp_path: Path) -> None:
    res = save_torchst_dir(llama, tmp_path)
    assert len(res.files) > 2 and res.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # the same choice transformers makes
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(llama))


def test_transformers_sharded_save_loads_with_torchst(llama: torch.nn.Module, tmp_path: Path) -> None:
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with params_on_meta():
        fresh = transformers.LlamaForCausalLM(tiny_config())
    assert torchst.load_model(fresh, tmp_path) == ([], [])
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(logits(fresh.eval()), logits(llama))
    # into an existing model, and with accelerate's init_empty_weights
    existing = transformers.LlamaForCausalLM(tiny_config()).eval()
    assert torchst.load_model(existing, tmp_path) == ([], [])
    assert torch.equal(logits(existing), logits(llama))
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_config())
    torchst.load_model(empty, tmp_path, device_map="auto", max_memory={"cpu": "1GB"})
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    assert torch.equal(logits(empty.eval()), logits(llama))


def test_same_tensor_bytes_as_transformers(llama: torch.nn.Module, tmp_path: Path) -> None:
    llama.save_pretrained(tmp_path / "hf")
    torchst.save_model(llama, tmp_path / "st")
    ref = torchst.load_state_dict(tmp_path / "hf")
    ours = torchst.load_file(tmp_path / "st" / "model.safetensors")
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_huggingface_hub_load_torch_model_reads_torchst(llama: torch.nn.Module, tmp_path: Path) -> None:
    save_torchst_dir(llama, tmp_path)
    fresh = transformers.LlamaForCausalLM(tiny_config()).eval()
    result = huggingface_hub.load_torch_model(fresh, tmp_path, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) <= {"lm_head.weight"}  # the tied alias, filled through the tie
    assert torch.equal(logits(fresh), logits(llama))


def test_huggingface_hub_save_is_read_by_torchst(llama: torch.nn.Module, tmp_path: Path) -> None:
    huggingface_hub.save_torch_state_dict(llama.state_dict(), tmp_path, max_shard_size="20KB")
    sd = torchst.load_state_dict(tmp_path)  # the dropped tied name, recorded in the index, comes back
    assert sd["model.embed_tokens.weight"] is sd["lm_head.weight"]
    fresh = transformers.LlamaForCausalLM(tiny_config()).eval()
    assert torchst.load_model(fresh, tmp_path) == ([], [])
    assert torch.equal(logits(fresh), logits(llama))


def test_accelerate_load_checkpoint_and_dispatch_reads_torchst(llama: torch.nn.Module, tmp_path: Path) -> None:
    save_torchst_dir(llama, tmp_path)
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_config())
    empty.tie_weights()
    model = accelerate.load_checkpoint_and_dispatch(
        empty, str(tmp_path), device_map={"": "cpu"}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert torch.equal(logits(model.eval()), logits(llama))


def test_save_pretrained_round_trip_through_torchst_mixin(tmp_path: Path) -> None:
    class TinyHead(torchst.PretrainedMixin, torch.nn.Module):
        def __init__(self, vocab: int = 16, dim: int = 4) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, dim)
            self.out = torch.nn.Linear(dim, vocab, bias=False)
            self.out.weight = self.embed.weight

    m = TinyHead(vocab=20)
    m.save_pretrained(tmp_path, max_shard_size=200)
    # huggingface_hub reads the directory (the tied alias is filled by the model's tie)
    fresh = TinyHead(vocab=20)
    huggingface_hub.load_torch_model(fresh, tmp_path)
    assert torch.equal(fresh.embed.weight, m.embed.weight)


def test_torchst_load_checkpoint_and_dispatch(llama: torch.nn.Module, tmp_path: Path) -> None:
    from torchst.integrations.accelerate import load_checkpoint_and_dispatch

    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_config())
    model = load_checkpoint_and_dispatch(empty, tmp_path, max_memory={"cpu": "1GB"}, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model.eval()), logits(llama))


@pytest.mark.gpu
def test_torchst_dispatch_across_gpu_and_cpu(llama: torch.nn.Module, tmp_path: Path) -> None:
    from torchst.integrations.accelerate import load_checkpoint_and_dispatch

    llama.save_pretrained(tmp_path)
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_config())
    device_map = {"model.embed_tokens": 0, "lm_head": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model": 0}
    model = load_checkpoint_and_dispatch(empty, tmp_path, device_map=device_map)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "cpu"
    with torch.no_grad():
        got = model(X.cuda()).logits.cpu()
    assert torch.allclose(got, logits(llama), atol=1e-4)
