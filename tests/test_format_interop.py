"""Cross-reads with the real ``safetensors`` package, in both directions, every backend."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch as ref
import torch

import torchst
from torchst._dtypes import DTYPES
from torchst.errors import FormatError
from torchst.format import BACKENDS

CODES = [code for code, row in DTYPES.items() if row.torch_dtype is not None]
# The reference's torch loader has no table entry for these two (it raises KeyError).
REF_TORCH_UNKNOWN = {"F8_E8M0", "F4"}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    for i, code in enumerate(CODES):
        row = DTYPES[code]
        assert row.torch_dtype is not None
        raw = torch.randint(0, 256, ((i % 3 + 1) * 4 * row.itemsize,), dtype=torch.uint8, generator=g)
        if row.torch_dtype == torch.bool:
            raw %= 2
        out[f"t.{code}"] = raw.view(row.torch_dtype).reshape(i % 3 + 1, 4)
    out["scalar"] = torch.tensor(-0.0)
    out["zero"] = torch.empty(3, 0, dtype=torch.int32)
    out["名前"] = torch.arange(3, dtype=torch.int16)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_we_read_what_the_reference_writes(tmp_path: Path, backend: str) -> None:
    tensors = every_dtype()
    path = tmp_path / "ref.safetensors"
    md = {"format": "pt", "a": "1", "b": "ü"}
    ref.save_file(tensors, path, metadata=md)
    with torchst.safe_open(path, backend=backend) as f, safetensors.safe_open(path, framework="pt") as r:
        assert f.keys() == r.keys()
        assert f.offset_keys() == r.offset_keys()
        assert f.metadata() == r.metadata() == md
        for name in f.offset_keys():
            assert f.get_slice(name).get_shape() == r.get_slice(name).get_shape()
            assert f.get_slice(name).get_dtype() == r.get_slice(name).get_dtype()
            assert same_bits(f.get_tensor(name), tensors[name]), name
    loaded = torchst.load_file(path, backend=backend)
    assert list(loaded) == list(ref.load_file(path))  # offset order, like the reference
    assert all(same_bits(loaded[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_reference_reads_what_we_write(tmp_path: Path, backend: str) -> None:
    tensors = every_dtype()
    if backend == "pread":
        # safetensors 0.8's pread path reshapes F4 to the logical (doubled) shape and fails.
        del tensors["t.F4"]
    path = tmp_path / "ours.safetensors"
    torchst.save_file(tensors, path, metadata={"format": "pt"})
    theirs = ref.load_file(path, backend=backend)
    assert list(theirs) == list(torchst.load_file(path))
    for name, t in tensors.items():
        assert same_bits(theirs[name], t), name
    with safetensors.safe_open(path, framework="pt") as r:
        assert r.metadata() == {"format": "pt"}
        assert r.get_slice("t.F32")[1:].equal(tensors["t.F32"][1:])
    # deserialize() is the reference's raw, framework-free reader.
    raw = dict(safetensors.deserialize(path.read_bytes()))
    if "t.F4" in tensors:
        assert raw["t.F4"]["shape"] == [tensors["t.F4"].shape[0], 8]  # two logical F4 values per byte
    assert bytes(raw["t.I64"]["data"]) == tensors["t.I64"].numpy().tobytes()


def test_reference_load_bytes_on_our_output() -> None:
    tensors = {n: t for n, t in every_dtype().items() if n.split(".")[-1] not in REF_TORCH_UNKNOWN}
    theirs = ref.load(torchst.save(tensors))
    assert all(same_bits(theirs[n], t) for n, t in tensors.items())


def test_numpy_flavoured_reference_reads_our_files(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    import safetensors.numpy as ref_np

    path = tmp_path / "n.safetensors"
    torchst.save_file({"a": torch.arange(6, dtype=torch.int32).reshape(2, 3), "b": torch.ones(2)}, path)
    arrays = ref_np.load_file(str(path))
    assert np.array_equal(arrays["a"], np.arange(6, dtype=np.int32).reshape(2, 3))
    ref_np.save_file({"x": np.arange(4, dtype=np.float64)}, str(tmp_path / "np.safetensors"))
    assert torchst.load_file(tmp_path / "np.safetensors")["x"].equal(torch.arange(4, dtype=torch.float64))


def test_multi_key_metadata_round_trips_both_ways(tmp_path: Path) -> None:
    md = {f"key{i}": f"value {i} ✓" for i in range(20)}
    torchst.save_file({"w": torch.ones(1)}, tmp_path / "a.safetensors", metadata=md)
    ref.save_file({"w": torch.ones(1)}, tmp_path / "b.safetensors", metadata=md)
    with safetensors.safe_open(tmp_path / "a.safetensors", framework="pt") as r:
        assert r.metadata() == md
    with torchst.safe_open(tmp_path / "b.safetensors") as f:
        assert f.metadata() == md


def _blob(header: dict[str, object] | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


BAD_FILES = {
    "short": b"\0\0\0",
    "not-json": _blob(b"{nope"),
    "array": _blob(b"[]"),
    "bad-dtype": _blob({"w": {"dtype": "X", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "bool-shape": _blob({"w": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"),
    "bad-count": _blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "hole": _blob({"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0"),
    "trailing": _blob({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0"),
    "truncated": _blob({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 15),
    "metadata-int": _blob({"__metadata__": {"a": 1}}),
    "f4-odd": _blob({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_both_reject_the_same_bad_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(safetensors.SafetensorError):
        safetensors.safe_open(path, framework="pt")
    with pytest.raises(FormatError):
        torchst.safe_open(path)
