"""Reader: backends, copy-on-write mappings, misaligned files, get_slice, load(bytes)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch as ref
import torch

import torchst
from torchst.errors import DeviceMapError, FormatError, TensorNotFoundError
from torchst.format import BACKENDS, find_shared_tensors

Index = Any


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def craft(header: dict[str, Any], data: bytes, *, pad: bool = True) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(10, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "layer.0.weight": torch.randn(8, 8, generator=g).to(torch.float16),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "q": torch.randint(0, 256, (4, 2), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn),
    }
    path = tmp_path / "model.safetensors"
    torchst.save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_every_backend(model_file: tuple[Path, dict[str, torch.Tensor]], backend: str) -> None:
    path, tensors = model_file
    loaded = torchst.load_file(path, backend=backend)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert same_bits(loaded[name], t), name
        assert loaded[name].device.type == "cpu"
        assert loaded[name].is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_safe_open_api(model_file: tuple[Path, dict[str, torch.Tensor]], backend: str) -> None:
    path, tensors = model_file
    with torchst.safe_open(path, framework="pt", device="cpu", backend=backend) as f:
        assert f.keys() == sorted(tensors)
        assert list(f) == sorted(tensors) and len(f) == len(tensors) and "step" in f and "nope" not in f
        with safetensors.safe_open(path, framework="pt") as r:
            assert f.offset_keys() == r.offset_keys()
            assert f.keys() == r.keys()
        assert f.metadata() == {"format": "pt"}
        md = f.metadata()
        assert md is not None
        md["x"] = "y"  # a copy: the header stays as read
        assert f.metadata() == {"format": "pt"}
        assert list(f.get_tensors()) == f.offset_keys()
        assert same_bits(f.get_tensor("embed.weight"), tensors["embed.weight"])
        s = f.get_slice("layer.0.weight")
        assert s.get_shape() == [8, 8] and s.shape == [8, 8] and len(s) == 8
        assert s.get_dtype() == "F16" and s.dtype == "F16"
        info = f.header.tensors["embed.weight"]
        assert (info.dtype, info.shape, info.nbytes) == ("F32", (10, 8), 320)
        assert f.header.data_start + f.header.data_size == path.stat().st_size


def test_offset_keys_follow_file_not_names(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(craft(header, b"\x01\x02\x03"))
    for backend in BACKENDS:
        with torchst.safe_open(path, backend=backend) as f:
            assert f.keys() == ["a", "b"]
            assert f.offset_keys() == ["b", "a"]
            assert list(f.get_tensors()) == ["b", "a"]
            assert f.get_tensor("a").tolist() == [3]
        assert list(torchst.load_file(path, backend=backend)) == list(ref.load_file(path))


def test_missing_tensor(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = model_file
    with torchst.safe_open(path) as f:
        with pytest.raises(TensorNotFoundError) as info:
            f.get_tensor("lm_head.weight")
        assert str(path) in str(info.value) and "'lm_head.weight'" in str(info.value)
        assert isinstance(info.value, KeyError)
        with pytest.raises(TensorNotFoundError):
            f.get_slice("lm_head.weight")


def test_bad_arguments(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = model_file
    with pytest.raises(ValueError, match="backend 'fast' is invalid"):
        torchst.safe_open(path, backend="fast")
    with pytest.raises(ValueError, match="framework 'tf'"):
        torchst.safe_open(path, framework="tf")
    for device in ["gpu:0", -1, 1.5, True]:
        with pytest.raises(DeviceMapError):
            torchst.safe_open(path, device=device)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        torchst.safe_open(path.with_name("missing.safetensors"))


def test_tensors_outlive_the_file(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = model_file
    for backend in BACKENDS:
        with torchst.safe_open(path, backend=backend) as f:
            t = f.get_tensor("embed.weight")
        assert same_bits(t, tensors["embed.weight"])
        with pytest.raises(FormatError, match="closed"):
            f.get_tensor("embed.weight")


# -- mmap: copy-on-write, one storage per tensor -----------------------------------------------


def test_mmap_tensors_are_writable_copy_on_write(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = model_file
    before = path.read_bytes()
    loaded = torchst.load_file(path)
    for t in loaded.values():
        if t.numel():
            t.view(-1).view(torch.uint8).bitwise_not_()
    assert path.read_bytes() == before
    again = torchst.load_file(path)
    assert same_bits(again["embed.weight"], tensors["embed.weight"])
    assert not same_bits(loaded["embed.weight"], tensors["embed.weight"])


def test_mmap_tensors_have_their_own_storage(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = model_file
    loaded = torchst.load_file(path)
    for name, t in loaded.items():
        if t.numel():
            assert t.untyped_storage().nbytes() == t.nbytes, name
            assert t.untyped_storage().data_ptr() == t.data_ptr(), name
    assert all(len(g) == 1 for g in find_shared_tensors(loaded))
    assert all(len(g) == 1 for g in ref._find_shared_tensors(loaded))


@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_third_party_file(tmp_path: Path, backend: str) -> None:
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    wide = torch.tensor([2**40 + 1, -3], dtype=torch.int64)
    header = {
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        "i": {"dtype": "I64", "shape": [2], "data_offsets": [13, 29]},
    }
    data = b"\x09" + values.numpy().tobytes() + wide.numpy().tobytes()
    for pad in (True, False):  # unpadded header: even the data section starts misaligned
        path = tmp_path / f"odd{pad}.safetensors"
        path.write_bytes(craft(header, data, pad=pad))
        loaded = torchst.load_file(path, backend=backend)
        assert loaded["w"].equal(values) and loaded["i"].equal(wide) and loaded["pad"].tolist() == [9]
        assert loaded["w"].data_ptr() % 4 == 0 and loaded["i"].data_ptr() % 8 == 0
        assert (loaded["w"] * 2).tolist() == [3.0, -4.0, 6.5]
        with torchst.safe_open(path, backend=backend) as f:
            assert f.get_slice("i")[1:].tolist() == [-3]
        assert ref.load_file(path)["w"].equal(values)


# -- get_slice ---------------------------------------------------------------------------------

INDICES: list[Index] = [
    0,
    -1,
    3,
    -4,
    slice(1, 3),
    slice(None, None, 2),
    slice(1, None, 3),
    slice(-3, -1),
    slice(10, 20),
    slice(3, 1),
    (slice(None), 2),
    (Ellipsis, 1),
    (1, Ellipsis),
    (1, Ellipsis, 2),
    (-2, -1, -3),
    (),
    Ellipsis,
    (slice(1, None, 2), slice(None), slice(0, 5, 3)),
    (slice(None), slice(1, 4, 2)),
    (2, slice(0, 1)),
]


@pytest.fixture
def slice_file(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    t = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    path = tmp_path / "s.safetensors"
    ref.save_file({"t": t, "b": t.to(torch.bfloat16), "s": torch.tensor(2.5), "e": torch.empty(0, 3)}, path)
    return path, t


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_slice_matches_reference(slice_file: tuple[Path, torch.Tensor], backend: str) -> None:
    path, _ = slice_file
    with torchst.safe_open(path, backend=backend) as f, safetensors.safe_open(path, framework="pt") as r:
        for index in INDICES:
            for name in ("t", "b"):
                ours, theirs = f.get_slice(name)[index], r.get_slice(name)[index]
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (name, index)
                assert ours.equal(theirs), (name, index)
                assert ours.is_contiguous()
        assert f.get_slice("s")[...].equal(r.get_slice("s")[...])
        assert f.get_slice("s")[()].equal(torch.tensor(2.5))
        assert f.get_slice("e")[0:0].shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_slice_errors_match_reference(slice_file: tuple[Path, torch.Tensor], backend: str) -> None:
    path, _ = slice_file
    with torchst.safe_open(path, backend=backend) as f, safetensors.safe_open(path, framework="pt") as r:
        for index, kind in [
            (4, IndexError),
            (-5, IndexError),
            ((0, 0, 0, 0), IndexError),
            (slice(None, None, -1), ValueError),
        ]:
            with pytest.raises(kind) as ours:
                f.get_slice("t")[index]
            with pytest.raises(kind) as theirs:
                r.get_slice("t")[index]
            assert str(ours.value) == str(theirs.value)


def test_get_slice_is_a_copy(slice_file: tuple[Path, torch.Tensor]) -> None:
    path, t = slice_file
    with torchst.safe_open(path) as f:
        part = f.get_slice("t")[1:3]
        part.zero_()
        assert f.get_tensor("t").equal(t)


def test_pread_slice_reads_only_needed_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.arange(1000 * 64, dtype=torch.float32).reshape(1000, 64)
    path = tmp_path / "big.safetensors"
    torchst.save_file({"t": t}, path)
    read: list[int] = []
    real = os.preadv

    def spy(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", spy)
    row = 64 * 4
    with torchst.safe_open(path, backend="pread") as f:
        for index, rows in [(slice(10, 12), 2), (5, 1), (-1, 1), ((slice(100, 110, 3), slice(0, 2)), 10)]:
            read.clear()
            assert f.get_slice("t")[index].equal(t[index])
            assert sum(read) == rows * row, index
        read.clear()
        f.get_tensor("t")
        assert sum(read) == t.nbytes


def test_float8_and_float4_slices(tmp_path: Path) -> None:
    raw = torch.arange(48, dtype=torch.uint8).reshape(6, 8)
    tensors = {"e8": raw.view(torch.float8_e8m0fnu), "f4": raw.clone().view(torch.float4_e2m1fn_x2)}
    path = tmp_path / "low.safetensors"
    torchst.save_file(tensors, path)
    for backend in BACKENDS:
        with torchst.safe_open(path, backend=backend) as f:
            assert f.get_slice("f4").get_shape() == [6, 16]  # logical F4 values in the header
            assert same_bits(f.get_slice("e8")[1:3], tensors["e8"][1:3])
            assert same_bits(f.get_slice("f4")[2], tensors["f4"][2])
            assert same_bits(f.get_tensor("f4"), tensors["f4"])


# -- load(bytes) -------------------------------------------------------------------------------


def test_load_bytes_every_dtype_including_e8m0_and_f4() -> None:
    raw = torch.arange(24, dtype=torch.uint8).reshape(3, 8)
    tensors = {
        "e8": raw.view(torch.float8_e8m0fnu),
        "f4": raw.clone().view(torch.float4_e2m1fn_x2),
        "f": torch.randn(3, 3),
        "s": torch.tensor(1, dtype=torch.int16),
        "z": torch.empty(2, 0),
    }
    blob = torchst.save(tensors)
    with pytest.raises(KeyError):
        ref.load(blob)  # the reference has no table entry for these dtypes
    loaded = torchst.load(blob)
    assert list(loaded) == ["f", "z", "s", "e8", "f4"]  # data-offset order
    for name, t in tensors.items():
        assert same_bits(loaded[name], t), name
    for source in (bytearray(blob), memoryview(blob)):
        assert same_bits(torchst.load(source)["f4"], tensors["f4"])


def test_load_bytes_owns_its_memory() -> None:
    blob = bytearray(torchst.save({"w": torch.ones(4)}))
    loaded = torchst.load(blob)
    blob[-4:] = b"\0\0\0\0"
    loaded["w"].add_(1)
    assert loaded["w"].tolist() == [2.0, 2.0, 2.0, 2.0]


def test_load_bytes_is_in_offset_order() -> None:
    # The reference returns hash order here; ours is deterministic: the order of the bytes.
    tensors = {"z": torch.ones(2, dtype=torch.int8), "a": torch.ones(1), "m": torch.ones(3, dtype=torch.float64)}
    blob = ref.save(tensors)
    assert list(torchst.load(blob)) == ["m", "a", "z"]
    assert torchst.load(blob).keys() == ref.load(blob).keys()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_load_onto_cuda(model_file: tuple[Path, dict[str, torch.Tensor]], backend: str) -> None:
    path, tensors = model_file
    loaded = torchst.load_file(path, device="cuda:0", backend=backend)
    for name, t in tensors.items():
        assert loaded[name].device == torch.device("cuda", 0), name
        assert same_bits(loaded[name].cpu(), t), name
    with torchst.safe_open(path, device=0, backend=backend) as f:
        part = f.get_slice("embed.weight")[2:4]
        assert part.device == torch.device("cuda", 0)
        assert part.cpu().equal(tensors["embed.weight"][2:4])
