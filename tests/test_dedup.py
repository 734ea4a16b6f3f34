"""Shared-storage dedup: canonical names, alias metadata, compatibility with safetensors."""

from __future__ import annotations

import pytest
import safetensors
import safetensors.torch
import torch

import torchst
from torchst.dedup import (
    ALIASES_KEY,
    alias_metadata,
    aliases_from_metadata,
    deduplicate,
    expand_aliases,
)
from torchst.errors import FormatError, SerializationError, SharedTensorError, TensorNotFoundError


def test_alphabetically_first_complete_name_is_kept() -> None:
    w = torch.arange(6.0).reshape(3, 2)
    sd = {"model.embed.weight": w, "lm_head.weight": w, "other": torch.ones(2)}
    d = deduplicate(sd)
    assert list(d.tensors) == ["lm_head.weight", "other"]
    assert d.tensors["lm_head.weight"] is w
    assert d.aliases == {"model.embed.weight": "lm_head.weight"}
    assert list(sd) == ["model.embed.weight", "lm_head.weight", "other"]  # caller's dict untouched


def test_matches_safetensors_choice() -> None:
    base = torch.zeros(4, 4)
    sd = {"c": base, "b": base.view(16), "a": base[1:], "z": torch.ones(3)}
    ours = deduplicate(sd)
    ref = safetensors.torch._remove_duplicate_names(sd)
    assert {alias: kept for kept, names in ref.items() for alias in names} == ours.aliases
    assert ours.aliases == {"a": "b", "c": "b"}  # "a" is partial, so "b" is the first complete name


def test_disjoint_windows_are_all_kept() -> None:
    qkv = torch.zeros(6, 2)
    q, k, v = qkv.split(2)
    d = deduplicate({"q": q, "k": k, "v": v})
    assert d.aliases == {}
    assert set(d.tensors) == {"q", "k", "v"}


def test_no_complete_name_raises() -> None:
    base = torch.zeros(10)
    with pytest.raises(SharedTensorError, match=r"\['a', 'b'\].*covers the whole storage"):
        deduplicate({"a": base[:6], "b": base[4:]})


def test_preferred_and_discard_names() -> None:
    w = torch.zeros(2)
    sd = {"a": w, "b": w, "c": w}
    assert deduplicate(sd, discard_names=["a"]).aliases == {"a": "b", "c": "b"}
    assert deduplicate(sd, preferred_names=["c"], discard_names=["c"]).aliases == {"a": "c", "b": "c"}


def test_tied_keys_v4_list_and_v5_dict() -> None:
    w = torch.zeros(3)
    sd = {"lm_head.weight": w, "model.embed_tokens.weight": w}
    # without the model's declaration, the alphabetical rule keeps lm_head.weight
    assert deduplicate(sd).aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    expected = {"lm_head.weight": "model.embed_tokens.weight"}
    assert deduplicate(sd, tied_keys=["lm_head.weight"]).aliases == expected
    assert deduplicate(sd, tied_keys=[r"lm_head\.w.*"]).aliases == expected  # v4 regex patterns
    assert deduplicate(sd, tied_keys={"lm_head.weight": "model.embed_tokens.weight"}).aliases == expected
    with pytest.raises(SerializationError, match="wrap it in a list"):
        deduplicate(sd, tied_keys="lm_head.weight")


def test_non_tensor_rejected() -> None:
    with pytest.raises(SerializationError, match="'x' is a int"):
        deduplicate({"x": 3})  # type: ignore[dict-item]


def test_alias_metadata_roundtrip_and_safetensors_entries() -> None:
    md = alias_metadata({"lm_head.weight": "embed.weight", "b": "a"})
    assert md["lm_head.weight"] == "embed.weight" and md["b"] == "a"
    assert md[ALIASES_KEY] == '{"b":"a","lm_head.weight":"embed.weight"}'
    assert aliases_from_metadata(md) == {"b": "a", "lm_head.weight": "embed.weight"}
    # the record is authoritative even if a user overrode a plain entry
    assert aliases_from_metadata({**md, "b": "user text"}) == {"b": "a", "lm_head.weight": "embed.weight"}
    assert alias_metadata({}) == {}
    assert aliases_from_metadata(None) == {}


def test_aliases_from_safetensors_save_model(tmp_path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.lm_head = torch.nn.Linear(2, 4, bias=False)
            self.lm_head.weight = self.embed.weight

    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_model(Tied(), str(path), metadata={"format": "pt"})
    with torchst.safe_open(path) as f:
        md, names = f.metadata(), f.keys()
    assert aliases_from_metadata(md) == {}  # plain entries are ambiguous without the names
    assert aliases_from_metadata(md, names=names) == {"lm_head.weight": "embed.weight"}


def test_torchst_alias_metadata_readable_by_safetensors(tmp_path) -> None:
    w = torch.ones(2, 2)
    d = deduplicate({"embed.weight": w, "lm_head.weight": w})
    path = tmp_path / "m.safetensors"
    torchst.save_file(d.tensors, path, metadata={"format": "pt", **alias_metadata(d.aliases)})
    with safetensors.safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        assert f.keys() == ["embed.weight"]
    assert md["lm_head.weight"] == "embed.weight"
    loaded = torchst.load_file(path)
    with torchst.safe_open(path) as g:
        full = expand_aliases(loaded, aliases_from_metadata(g.metadata()))
    assert full["lm_head.weight"] is full["embed.weight"]


def test_bad_alias_records() -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        aliases_from_metadata({ALIASES_KEY: "{nope"})
    with pytest.raises(FormatError, match="must be a JSON object"):
        aliases_from_metadata({ALIASES_KEY: "[1]"})
    with pytest.raises(FormatError, match="itself an alias"):
        aliases_from_metadata({ALIASES_KEY: '{"a":"b","b":"c"}'})
    with pytest.raises(FormatError, match="alias of itself"):
        alias_metadata({"a": "a"})


def test_expand_aliases_errors_and_no_mutation() -> None:
    t = {"a": torch.zeros(1)}
    out = expand_aliases(t, {"b": "a"})
    assert out["b"] is t["a"] and list(t) == ["a"]
    with pytest.raises(TensorNotFoundError, match="'c' is an alias of 'x'"):
        expand_aliases(t, {"c": "x"})
    with pytest.raises(FormatError, match="also stored"):
        expand_aliases({"a": torch.zeros(1), "b": torch.zeros(1)}, {"b": "a"})
