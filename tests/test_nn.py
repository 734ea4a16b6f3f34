"""nn.Module integration: tied weights, strictness, hooks, extra state, meta loads, save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
import safetensors.torch
import torch
from torch import nn

import torchst
from torchst.errors import CheckpointError, DeviceMapError, SerializationError
from torchst.nn import (
    EXTRA_STATE_KEY,
    PretrainedMixin,
    cast_on_save,
    load_model,
    params_on_meta,
    rename_keys_on_load,
    save_model,
    strip_prefix_on_load,
    tied_weights_keys,
)


class TinyLM(PretrainedMixin, nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 8, layers: int = 2, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((dim,), 0.5))
        self.register_buffer("inv_freq", torch.arange(dim, dtype=torch.float32) / dim, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.scale + self.inv_freq
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.lm_head(self.norm(h))


X = torch.tensor([[1, 5, 7, 3], [0, 2, 39, 11]])


def test_tied_weights_stored_once_and_retied(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path / "m.safetensors")
    with torchst.safe_open(tmp_path / "m.safetensors") as f:
        assert f.keys() == [
            "embed.weight",
            "layers.0.bias",
            "layers.0.weight",
            "layers.1.bias",
            "layers.1.weight",
            "norm.bias",
            "norm.weight",
            "scale",
        ]
        assert f.metadata()["lm_head.weight"] == "embed.weight"
    fresh = TinyLM()
    result = load_model(fresh, tmp_path / "m.safetensors")
    assert result == ([], []) and result.missing_keys == []
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh(X), m(X))


def test_meta_load_materialises_on_target_and_reties(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path, max_shard_size=400)
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".safetensors")]) > 2
    with params_on_meta():
        fresh = TinyLM()
    assert fresh.embed.weight.is_meta and not fresh.inv_freq.is_meta
    assert load_model(fresh, tmp_path) == ([], [])
    assert fresh.lm_head.weight is fresh.embed.weight
    assert isinstance(fresh.embed.weight, nn.Parameter) and fresh.embed.weight.requires_grad
    assert not any(t.is_meta for t in fresh.state_dict().values())
    assert torch.equal(fresh(X), m(X))
    # owned memory, not a window of the mapped shard: writing to it never reaches the file
    with torch.no_grad():
        fresh.embed.weight.zero_()
    assert torch.equal(torchst.load_state_dict(tmp_path)["embed.weight"], m.embed.weight)


def test_meta_load_with_device_map_and_dtype(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path)
    with torch.device("meta"):
        fresh = TinyLM()
    # a fully-meta model gets its non-persistent buffer computed again from its recorded config
    load_model(fresh, tmp_path, device_map={"layers": "cpu", "": "cpu"}, dtype=torch.bfloat16)
    assert torch.equal(fresh.inv_freq, m.inv_freq)
    assert fresh.layers[0].weight.dtype == torch.bfloat16 and fresh.embed.weight.device.type == "cpu"
    assert torch.equal(fresh.layers[1].bias, m.layers[1].bias.bfloat16())
    assert fresh.lm_head.weight is fresh.embed.weight


def test_meta_load_keeps_model_dtypes(tmp_path: Path) -> None:
    m = TinyLM().to(torch.bfloat16)
    save_model(m, tmp_path)
    with params_on_meta():
        fresh = TinyLM()  # declared float32
    load_model(fresh, tmp_path)
    assert fresh.layers[0].weight.dtype == torch.float32
    assert torch.equal(fresh.layers[0].weight, m.layers[0].weight.float())


def test_device_map_errors(tmp_path: Path) -> None:
    save_model(TinyLM(), tmp_path)
    with params_on_meta():
        fresh = TinyLM()
    with pytest.raises(DeviceMapError, match="does not place"):
        load_model(fresh, tmp_path, device_map={"layers": "cpu"})
    with pytest.raises(DeviceMapError, match='"auto"'):
        load_model(fresh, tmp_path, device_map="balanced")
    with pytest.raises(DeviceMapError, match="max_memory only"):
        load_model(fresh, tmp_path, device_map={"": "cpu"}, max_memory={"cpu": "1GB"})
    with pytest.raises(DeviceMapError, match="disk"):
        load_model(fresh, tmp_path, device_map={"": "disk"})


def test_device_map_auto_on_cpu(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path)
    with params_on_meta():
        fresh = TinyLM()
    load_model(fresh, tmp_path, device_map="auto", max_memory={"cpu": "1GB"})
    assert torch.equal(fresh(X), m(X)) and fresh.lm_head.weight is fresh.embed.weight


def test_strict_missing_unexpected_and_shape(tmp_path: Path) -> None:
    save_model(TinyLM(layers=3), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r'Unexpected key\(s\) in state_dict: "layers.2.bias", "layers.2.weight"'):
        load_model(TinyLM(layers=2), tmp_path / "a.safetensors")
    res = load_model(TinyLM(layers=4), tmp_path / "a.safetensors", strict=False)
    assert sorted(res.missing_keys) == ["layers.3.bias", "layers.3.weight"] and res.unexpected_keys == []
    target = TinyLM(dim=4)
    before = target.layers[0].weight.clone()
    with pytest.raises(
        CheckpointError, match=r"'layers.0.weight': checkpoint has shape \[8, 8\], the model has \[4, 4\]"
    ):
        load_model(target, tmp_path / "a.safetensors", strict=False)
    assert torch.equal(target.layers[0].weight, before)  # nothing was loaded


def test_untied_model_from_tied_file_stays_untied(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path / "m.safetensors")
    untied = TinyLM(tie=False)
    assert load_model(untied, tmp_path / "m.safetensors") == ([], [])
    assert torch.equal(untied.lm_head.weight, m.embed.weight)
    with params_on_meta():
        meta_untied = TinyLM(tie=False)
    load_model(meta_untied, tmp_path / "m.safetensors")
    assert meta_untied.lm_head.weight.data_ptr() != meta_untied.embed.weight.data_ptr()


def test_reference_tied_file_without_alias_record(tmp_path: Path) -> None:
    # transformers-style: the tied name is simply absent; the model's own tie fills it
    m = TinyLM()
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(sd, tmp_path / "t.safetensors")
    with params_on_meta():
        fresh = TinyLM()
    assert load_model(fresh, tmp_path / "t.safetensors") == ([], [])
    assert fresh.lm_head.weight is fresh.embed.weight and torch.equal(fresh(X), m(X))


def test_safetensors_load_model_reads_our_file(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path / "m.safetensors")
    fresh = TinyLM()
    missing, unexpected = safetensors.torch.load_model(fresh, tmp_path / "m.safetensors")
    assert (missing, unexpected) == (set(), []) or (list(missing), unexpected) == ([], [])
    assert torch.equal(fresh(X), m(X))


# --- user hooks and extra state go through state_dict()/load_state_dict() ----------------------


def test_state_dict_pre_and_post_hooks_run_on_save(tmp_path: Path) -> None:
    m = TinyLM()
    seen: list[str] = []
    m.register_state_dict_pre_hook(lambda mod, prefix, keep_vars: seen.append("pre"))

    def post(mod: nn.Module, sd: dict[str, Any], prefix: str, meta: Any) -> None:
        sd[prefix + "marker"] = torch.tensor([7.0])

    m.register_state_dict_post_hook(post)
    save_model(m, tmp_path / "m.safetensors")
    assert seen == ["pre"]
    assert torch.equal(torchst.load_file(tmp_path / "m.safetensors")["marker"], torch.tensor([7.0]))


def test_load_state_dict_pre_and_post_hooks_run_on_load(tmp_path: Path) -> None:
    m = TinyLM()
    save_model(m, tmp_path / "m.safetensors")
    fresh = TinyLM()
    calls: list[str] = []

    def pre(mod: nn.Module, sd: dict[str, Any], prefix: str, *args: Any) -> None:
        calls.append("pre")
        sd[prefix + "norm.weight"] = sd[prefix + "norm.weight"] * 2

    def post(mod: nn.Module, keys: Any) -> None:
        calls.append(f"post:{len(keys.missing_keys)}")

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    load_model(fresh, tmp_path / "m.safetensors")
    assert calls == ["pre", "post:0"]
    assert torch.equal(fresh.norm.weight, m.norm.weight * 2)


class WithExtra(nn.Module):
    def __init__(self, extra: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.extra = extra

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


@pytest.mark.parametrize("extra", [{"step": 3, "names": ["a", "b"], "lr": 0.5}, torch.arange(4)])
def test_extra_state_roundtrip(tmp_path: Path, extra: Any) -> None:
    outer = nn.Sequential(WithExtra(extra))
    save_model(outer, tmp_path / "m.safetensors")
    fresh = nn.Sequential(WithExtra(None))
    assert load_model(fresh, tmp_path / "m.safetensors") == ([], [])
    got = fresh[0].extra
    if isinstance(extra, torch.Tensor):
        assert torch.equal(got, extra)
    else:
        assert got == extra
        with torchst.safe_open(tmp_path / "m.safetensors") as f:
            assert json.loads(f.metadata()[EXTRA_STATE_KEY]) == {"0._extra_state": extra}


def test_extra_state_not_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="not JSON"):
        save_model(WithExtra({1, 2}), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# --- standard hooks --------------------------------------------------------------------------


def test_strip_prefix_loads_ddp_checkpoint_and_handle_removes(tmp_path: Path) -> None:
    m = TinyLM()
    ddp_sd = {f"module.{k}": v for k, v in m.state_dict().items()}
    torchst.save_state_dict(ddp_sd, tmp_path / "ddp.safetensors")
    fresh = TinyLM()
    handle = strip_prefix_on_load(fresh)
    assert load_model(fresh, tmp_path / "ddp.safetensors") == ([], [])
    assert torch.equal(fresh(X), m(X))
    handle.remove()
    with pytest.raises(CheckpointError, match="Missing key"):
        load_model(TinyLM(), tmp_path / "ddp.safetensors")
    res = load_model(fresh, tmp_path / "ddp.safetensors", strict=False)
    assert "module.norm.weight" in res.unexpected_keys


def test_rename_keys_dict_and_callable(tmp_path: Path) -> None:
    m = TinyLM()
    sd = dict(m.state_dict())
    sd["final_norm.weight"] = sd.pop("norm.weight")
    torchst.save_state_dict(sd, tmp_path / "old.safetensors")
    fresh = TinyLM()
    h = rename_keys_on_load(fresh, {"final_norm.weight": "norm.weight"})
    assert load_model(fresh, tmp_path / "old.safetensors") == ([], [])
    h.remove()
    assert torch.equal(fresh.norm.weight, m.norm.weight)
    h2 = rename_keys_on_load(fresh, lambda k: k.replace("final_norm", "norm"))
    assert load_model(fresh, tmp_path / "old.safetensors") == ([], [])
    h2.remove()


def test_cast_on_save_keeps_ties_and_ints(tmp_path: Path) -> None:
    m = TinyLM()
    m.register_buffer("count", torch.tensor([3]))
    h = cast_on_save(m, torch.bfloat16)
    save_model(m, tmp_path / "bf16.safetensors")
    h.remove()
    sd = torchst.load_file(tmp_path / "bf16.safetensors")
    assert sd["embed.weight"].dtype == torch.bfloat16 and sd["count"].dtype == torch.int64
    assert "lm_head.weight" not in sd  # still tied after the cast
    assert m.state_dict()["embed.weight"].dtype == torch.float32
    with pytest.raises(TypeError):
        cast_on_save(m, torch.int8)


def test_tied_weights_keys_prefers_declared_source(tmp_path: Path) -> None:
    class Inner(nn.Module):
        _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(4, 2)
            self.lm_head = nn.Linear(2, 4, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight

    outer = nn.Module()
    outer.inner = Inner()
    assert tied_weights_keys(outer) == {"inner.lm_head.weight": "inner.model.embed_tokens.weight"}
    res = save_model(outer, tmp_path / "m.safetensors")
    assert res.aliases == {"inner.lm_head.weight": "inner.model.embed_tokens.weight"}


# --- save_pretrained / from_pretrained --------------------------------------------------------


def test_save_pretrained_from_pretrained(tmp_path: Path) -> None:
    m = TinyLM(vocab=30, dim=8, layers=3)
    res = m.save_pretrained(tmp_path, max_shard_size=500)
    assert res.index_file == "model.safetensors.index.json"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"dim": 8, "layers": 3, "tie": True, "vocab": 30}
    loaded = TinyLM.from_pretrained(tmp_path, device_map={"": "cpu"}, dtype=torch.float64)
    assert isinstance(loaded, TinyLM) and not loaded.training
    assert loaded.lm_head.weight is loaded.embed.weight and loaded.embed.weight.dtype == torch.float64
    assert torch.allclose(loaded(X[:, :2] % 30).float(), m(X[:, :2] % 30), atol=1e-5)
    assert loaded.inv_freq.dtype == torch.float32  # computed buffer, not in the checkpoint


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json not found"):
        TinyLM.from_pretrained(tmp_path)
    TinyLM().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cannot build TinyLM"):
        TinyLM.from_pretrained(tmp_path, bogus=1)

    class Bad(PretrainedMixin, nn.Module):
        def __init__(self, fn: Any = print) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 1)

    with pytest.raises(SerializationError, match="cannot be written to config.json"):
        Bad().save_pretrained(tmp_path / "bad")
