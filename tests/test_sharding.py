"""Sharded directories: layout, round trips, crash safety at every step, index validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from torchst.errors import (
    CheckpointNotFoundError,
    DeviceMapError,
    FileSizeError,
    SerializationError,
    ShardIndexError,
    SharedTensorError,
    TensorNotFoundError,
)
from torchst.format.checksum import CHECKSUM_KEY
from torchst.sharding import load_state_dict, open_checkpoint, save_state_dict

ROOT = Path(__file__).resolve().parents[1]


def make_sd(seed: int = 0, layers: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 16, generator=g)
    sd = {"embed.weight": emb}
    for i in range(layers):
        sd[f"layers.{i}.attn.weight"] = torch.randn(32, 32, generator=g)
        sd[f"layers.{i}.norm.weight"] = torch.randn(32, generator=g).to(torch.bfloat16)
    sd["lm_head.weight"] = emb
    sd["step"] = torch.tensor(seed, dtype=torch.int64)
    return sd


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_sharded_layout_and_roundtrip(tmp_path: Path) -> None:
    sd = make_sd()
    res = save_state_dict(sd, tmp_path, max_shard_size="6KB")
    names = sorted(os.listdir(tmp_path))
    n = len(res.files)
    assert n > 2 and names == sorted([*res.files, "model.safetensors.index.json"])
    assert res.files[0] == f"model-00001-of-{n:05d}.safetensors"
    text = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert text.endswith("}\n") and text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    stored = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(stored)  # the alias is not a stored tensor
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in stored.values())
    for fn in res.files:
        assert os.path.getsize(tmp_path / fn) < 6000 + 1000 or len(safetensors.torch.load_file(tmp_path / fn)) == 1
    loaded = load_state_dict(tmp_path)
    assert_same(loaded, sd)
    assert loaded["lm_head.weight"] is loaded["embed.weight"]
    # the index path and the directory load the same thing; so does the reference reader per shard
    assert_same(load_state_dict(tmp_path / "model.safetensors.index.json"), sd)
    ref: dict[str, torch.Tensor] = {}
    for fn in res.files:
        ref.update(safetensors.torch.load_file(tmp_path / fn))
    assert_same(ref, stored)


def test_shards_match_reference_writer(tmp_path: Path) -> None:
    # checksums off: exactly what the reference writes for the same tensors and metadata
    res = save_state_dict(make_sd(), tmp_path, max_shard_size="6KB", metadata={"note": "x"}, checksums=False)
    for fn in res.files:
        with safetensors.safe_open(str(tmp_path / fn), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (reference API)
            md = f.metadata()
        assert CHECKSUM_KEY not in md
        ref = tmp_path / "ref.safetensors"
        safetensors.torch.save_file(tensors, ref, metadata=md)
        ours, theirs = (tmp_path / fn).read_bytes(), ref.read_bytes()
        # same layout and data; only the order of metadata keys may differ (the reference's is
        # hash order, ours is sorted), and with a single key the bytes are identical
        n = int.from_bytes(ours[:8], "little")
        assert ours[:8] == theirs[:8] and ours[8 + n :] == theirs[8 + n :], fn
        assert json.loads(ours[8 : 8 + n]) == json.loads(theirs[8 : 8 + n]), fn
    single = {"w": torch.arange(6.0)}
    save_state_dict(single, tmp_path / "one.safetensors", checksums=False)
    safetensors.torch.save_file(single, tmp_path / "ref1.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "ref1.safetensors").read_bytes()


def test_checksummed_shards_differ_from_reference_only_by_the_record(tmp_path: Path) -> None:
    # checksums on (the default): same tensors, same data bytes, same header entries; the only
    # difference is the one metadata entry, which the reference reader passes through
    off = save_state_dict(make_sd(), tmp_path / "off", max_shard_size="6KB", metadata={"note": "x"}, checksums=False)
    on = save_state_dict(make_sd(), tmp_path / "on", max_shard_size="6KB", metadata={"note": "x"})
    assert on.files == off.files
    for fn in on.files:
        a, b = (tmp_path / "on" / fn).read_bytes(), (tmp_path / "off" / fn).read_bytes()
        na, nb = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
        assert a[8 + na :] == b[8 + nb :], fn  # identical data section
        ha, hb = json.loads(a[8 : 8 + na]), json.loads(b[8 : 8 + nb])
        record = json.loads(ha["__metadata__"].pop(CHECKSUM_KEY))
        assert ha == hb, fn
        assert record["algorithm"] == "crc32c" and set(record["tensors"]) == set(hb) - {"__metadata__"}
        with safetensors.safe_open(str(tmp_path / "on" / fn), "pt") as f:
            assert f.metadata()[CHECKSUM_KEY] and set(f.keys()) == set(hb) - {"__metadata__"}
    assert (tmp_path / "on" / "model.safetensors.index.json").read_bytes() == (
        tmp_path / "off" / "model.safetensors.index.json"
    ).read_bytes()


def test_single_shard_is_model_safetensors_and_file_paths(tmp_path: Path) -> None:
    sd = make_sd()
    res = save_state_dict(sd, tmp_path / "ckpt")
    assert os.listdir(tmp_path / "ckpt") == ["model.safetensors"] and res.index_file is None
    assert_same(load_state_dict(tmp_path / "ckpt"), sd)
    save_state_dict(sd, tmp_path / "one.safetensors", max_shard_size=10)  # a file path is never split
    assert_same(load_state_dict(tmp_path / "one.safetensors"), sd)
    md = safetensors.safe_open(str(tmp_path / "one.safetensors"), "pt").metadata()
    assert md["format"] == "pt" and md["lm_head.weight"] == "embed.weight"


def test_oversized_tensor_gets_own_shard(tmp_path: Path) -> None:
    sd = {"a": torch.zeros(10), "big": torch.zeros(1000), "c": torch.zeros(10)}
    res = save_state_dict(sd, tmp_path, max_shard_size=100)
    assert [sorted(safetensors.torch.load_file(tmp_path / f)) for f in res.files] == [["a"], ["big"], ["c"]]


def test_metadata_in_every_shard_and_validation(tmp_path: Path) -> None:
    sd = make_sd()
    save_state_dict(sd, tmp_path, max_shard_size="6KB", metadata={"note": "x"})
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.metadata == {"format": "pt", "note": "x"}
    assert ckpt.aliases == {"lm_head.weight": "embed.weight"}
    with pytest.raises(SerializationError, match="reserved"):
        save_state_dict(sd, tmp_path / "x", metadata={"torchst.aliases": "{}"})
    with pytest.raises(SerializationError, match="str -> str"):
        save_state_dict(sd, tmp_path / "y", metadata={"n": 1})  # type: ignore[dict-item]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SerializationError, match="not a directory"):
        save_state_dict(sd, tmp_path / "file")


def test_dtype_cast_only_floats_and_backends(tmp_path: Path) -> None:
    sd = make_sd()
    save_state_dict(sd, tmp_path, max_shard_size="6KB")
    for backend in ("mmap", "pread", "eager"):
        out = load_state_dict(tmp_path, dtype=torch.float16, backend=backend)
        assert out["step"].dtype == torch.int64 and out["embed.weight"].dtype == torch.float16
        assert torch.equal(out["layers.1.attn.weight"], sd["layers.1.attn.weight"].half())
        assert out["lm_head.weight"] is out["embed.weight"]
        assert_same(load_state_dict(tmp_path, backend=backend), sd)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_state_dict(tmp_path, dtype=torch.int32)


def test_device_and_device_map_on_cpu(tmp_path: Path) -> None:
    sd = make_sd()
    save_state_dict(sd, tmp_path, max_shard_size="6KB")
    out = load_state_dict(tmp_path, device_map={"layers": "cpu", "": torch.device("cpu")})
    assert_same(out, sd)
    meta = load_state_dict(tmp_path, device="meta")
    assert meta["embed.weight"].is_meta and meta["embed.weight"].shape == (64, 16)
    with pytest.raises(DeviceMapError, match="does not place 2 tensor"):
        load_state_dict(tmp_path, device_map={"layers": "cpu"})
    with pytest.raises(DeviceMapError, match="needs the model"):
        load_state_dict(tmp_path, device_map="auto")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(DeviceMapError, match="CUDA is not available"):
            load_state_dict(tmp_path, device="cuda:1")


def test_shared_without_complete_name_is_refused(tmp_path: Path) -> None:
    base = torch.zeros(10)
    with pytest.raises(SharedTensorError):
        save_state_dict({"a": base[:6], "b": base[4:]}, tmp_path)
    assert not any(p.name.endswith(".safetensors") for p in tmp_path.iterdir())


def test_checkpoint_load_subset_by_name(tmp_path: Path) -> None:
    save_state_dict(make_sd(), tmp_path, max_shard_size="6KB")
    ckpt = open_checkpoint(tmp_path)
    part = ckpt.load(["lm_head.weight", "layers.1.norm.weight"])
    assert set(part) == {"embed.weight", "lm_head.weight", "layers.1.norm.weight"}
    assert part["lm_head.weight"] is part["embed.weight"]
    with pytest.raises(TensorNotFoundError, match="does not contain \\['nope'\\]"):
        ckpt.load(["nope"])


def test_non_contiguous_tensor_saved_as_contiguous(tmp_path: Path) -> None:
    t = torch.arange(12.0).reshape(3, 4)
    save_state_dict({"t": t.t()}, tmp_path)
    assert torch.equal(load_state_dict(tmp_path)["t"], t.t())


# --- index and shard validation -----------------------------------------------------------------


def _sharded(tmp_path: Path) -> dict[str, Any]:
    save_state_dict(make_sd(), tmp_path, max_shard_size="6KB")
    return json.loads((tmp_path / "model.safetensors.index.json").read_text())


def _write_index(tmp_path: Path, index: dict[str, Any]) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_shard_named(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    victim = index["weight_map"]["layers.2.attn.weight"]
    os.unlink(tmp_path / victim)
    with pytest.raises(ShardIndexError, match=rf"shard '{victim}' .*e.g. 'layers.2.attn.weight'.* is missing"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/tmp/evil.safetensors", "x.bin", "a\\b.safetensors"])
def test_unsafe_shard_name_in_index(tmp_path: Path, bad: str) -> None:
    index = _sharded(tmp_path)
    index["weight_map"]["embed.weight"] = bad
    _write_index(tmp_path, index)
    with pytest.raises(ShardIndexError, match=re_escape(bad)):
        load_state_dict(tmp_path)


def re_escape(s: str) -> str:
    import re

    return re.escape(repr(s))


def test_index_lies_about_shard_contents(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index["weight_map"]["ghost.weight"] = index["weight_map"]["embed.weight"]
    _write_index(tmp_path, index)
    with pytest.raises(ShardIndexError, match="ghost.weight.*does not contain it"):
        load_state_dict(tmp_path)


def test_truncated_shard(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    p = tmp_path / index["weight_map"]["layers.3.attn.weight"]
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(FileSizeError):
        load_state_dict(tmp_path)


def test_resolution_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        load_state_dict(tmp_path / "nope")
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="found no checkpoint"):
        load_state_dict(tmp_path)


def test_directory_with_one_other_named_file(tmp_path: Path) -> None:
    sd = {"w": torch.ones(3)}
    safetensors.torch.save_file(sd, tmp_path / "adapter_model.safetensors")
    assert_same(load_state_dict(tmp_path), sd)


def test_reads_safetensors_save_model_aliases(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    m = Tied()
    safetensors.torch.save_model(m, str(tmp_path / "m.safetensors"))
    out = load_state_dict(tmp_path / "m.safetensors")
    assert out["b.weight"] is out["a.weight"] and torch.equal(out["a.weight"], m.a.weight)


# --- crash safety -------------------------------------------------------------------------------


class Crash(Exception):
    pass


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> Callable[[], int]:
    """Make the k-th rename/link/unlink raise before it happens; returns a call counter."""
    calls = [0]
    for fname in ("replace", "link", "unlink"):
        real = getattr(os, fname)

        def wrapper(*a: Any, _real: Any = real, **kw: Any) -> Any:
            calls[0] += 1
            if calls[0] == k:
                raise Crash(f"crash at call {k}")
            return _real(*a, **kw)

        monkeypatch.setattr(os, fname, wrapper)
    return lambda: calls[0]


@pytest.mark.parametrize(
    ("old_size", "new_size"),
    [("6KB", "6KB"), (None, "6KB"), ("6KB", None), ("6KB", "12KB"), (None, None)],
    ids=["same-names", "single-to-sharded", "sharded-to-single", "fewer-shards", "single-to-single"],
)
def test_every_crash_point_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_size: str | None, new_size: str | None
) -> None:
    old, new = make_sd(1), make_sd(2)
    k = 1
    while True:
        d = tmp_path / f"run{k}"
        save_state_dict(old, d, max_shard_size=old_size)
        with monkeypatch.context() as mp:
            count = _crash_at(mp, k)
            try:
                save_state_dict(new, d, max_shard_size=new_size)
                finished = True
            except Crash:
                finished = False
            total = count()
        got = load_state_dict(d)
        step = int(got["step"])
        assert step in (1, 2), k
        assert_same(got, old if step == 1 else new)
        if finished:
            assert step == 2
            assert not [p for p in os.listdir(d) if p.startswith(".")], os.listdir(d)
            assert k > total
            break
        # the next save after a crash completes and leaves no debris behind
        save_state_dict(new, d, max_shard_size=new_size)
        assert_same(load_state_dict(d), new)
        assert not [p for p in os.listdir(d) if p.startswith(".")], (k, os.listdir(d))
        k += 1
    assert k >= 2  # at least one crash point was exercised


def test_resave_cleans_old_files_and_keeps_foreign_ones(tmp_path: Path) -> None:
    save_state_dict(make_sd(), tmp_path, max_shard_size="3KB")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.backup").write_text("keep me")
    first = sorted(os.listdir(tmp_path))
    res = save_state_dict(make_sd(), tmp_path, max_shard_size="12KB")
    assert len(res.files) < len(first) - 3
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.json", "model.safetensors.backup", "model.safetensors.index.json", *res.files]
    )


@pytest.mark.multiprocess
def test_bench_sharded_quick_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["scenario"] for r in rows} == {
        "save_cache",
        "save_disk",
        "load_existing_warm",
        "load_existing_cold",
        "load_meta_warm",
        "load_meta_cold",
    }
    assert {r["impl"] for r in rows} == {"torchst", "huggingface_hub"}
    assert all(r["seconds"] > 0 and r["min_s"] <= r["seconds"] <= r["max_s"] and len(r["runs"]) == 1 for r in rows)


def test_a_failing_shard_write_leaves_the_old_checkpoint_and_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards are written concurrently; one failing writer must fail the whole save cleanly.
    import torchst.sharding.io as sio

    old, new = make_sd(1), make_sd(2)
    d = tmp_path / "ckpt"
    save_state_dict(old, d, max_shard_size="6KB")
    before = sorted(p.name for p in d.iterdir())
    real = sio.write_tensors
    calls = [0]

    def flaky(f: Any, plan: Any, **kw: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        real(f, plan, **kw)

    monkeypatch.setattr(sio, "write_tensors", flaky)
    with pytest.raises(OSError, match="No space left"):
        save_state_dict(new, d, max_shard_size="6KB")
    assert calls[0] >= 2
    assert sorted(p.name for p in d.iterdir()) == before
    loaded = load_state_dict(d)
    assert all(torch.equal(loaded[k], v) for k, v in old.items())
