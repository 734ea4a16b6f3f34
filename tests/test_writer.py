"""Writer: golden bytes against the reference, refusals, atomic commit, the staging path."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch as ref
import torch

import torchst
from torchst._dtypes import DTYPES
from torchst.errors import SerializationError, SharedTensorError, UnsupportedDtypeError
from torchst.format import writer as writer_mod
from torchst.format.writer import plan_write, write_tensors

# Every dtype that both torch and the format know; F6_* have no torch dtype.
SHARED_CODES = [code for code, row in DTYPES.items() if row.torch_dtype is not None]


def sample(code: str, shape: tuple[int, ...] = (2, 3), seed: int = 0) -> torch.Tensor:
    """A tensor of ``code`` with arbitrary (random) bit patterns, NaNs included."""
    row = DTYPES[code]
    assert row.torch_dtype is not None
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * row.itemsize,), dtype=torch.uint8, generator=g)
    if row.torch_dtype == torch.bool:
        raw = raw % 2
    return raw.view(row.torch_dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))
    )


# -- golden bytes ------------------------------------------------------------------------------

# The reference's own README example, written by safetensors 0.x; must never change.
GOLDEN_ATTN = (
    b'@\x00\x00\x00\x00\x00\x00\x00{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}' + b"\x00" * 24
)


def test_golden_attn_example() -> None:
    assert torchst.save({"attn.0": torch.zeros(1, 2, 3)}) == GOLDEN_ATTN


def test_golden_empty_dict() -> None:
    assert torchst.save({}) == b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "


def test_golden_order_metadata_and_padding() -> None:
    tensors = {
        "b": torch.tensor([1], dtype=torch.int8),
        "a": torch.tensor([1.0], dtype=torch.float16),
        "c": torch.tensor([2], dtype=torch.int64),
    }
    blob = torchst.save(tensors, metadata={"z": "1", "format": "pt"})
    header = (
        b'{"__metadata__":{"format":"pt","z":"1"},'
        b'"c":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},'
        b'"a":{"dtype":"F16","shape":[1],"data_offsets":[8,10]},'
        b'"b":{"dtype":"I8","shape":[1],"data_offsets":[10,11]}}'
    )
    header += b" " * (-len(header) % 8)
    assert blob == struct.pack("<Q", len(header)) + header + b"\x02" + b"\x00" * 7 + b"\x00\x3c" + b"\x01"


def test_golden_float4_header_counts_logical_values() -> None:
    t = torch.tensor([[0x21, 0x43]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    blob = torchst.save({"q": t})
    header = b'{"q":{"dtype":"F4","shape":[1,4],"data_offsets":[0,2]}} '
    assert blob == b"8\x00\x00\x00\x00\x00\x00\x00" + header + b"\x21\x43"


@pytest.mark.parametrize("code", SHARED_CODES)
def test_bytes_identical_to_reference_per_dtype(code: str) -> None:
    for shape in [(2, 3), (4,), (0,), (3, 0, 2)] + ([] if code == "F4" else [()]):
        t = sample(code, shape)
        assert torchst.save({"t": t}) == ref.save({"t": t}), (code, shape)


def test_bytes_identical_all_dtypes_in_one_file(tmp_path: Path) -> None:
    tensors = {f"{code.lower()}.w{i}": sample(code, (i + 1, 2), seed=i) for i, code in enumerate(SHARED_CODES)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.empty(0, 5, dtype=torch.float16)
    assert torchst.save(tensors) == ref.save(tensors)
    torchst.save_file(tensors, tmp_path / "ours.safetensors")
    ref.save_file(tensors, tmp_path / "ref.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_bytes_identical_with_unicode_names() -> None:
    tensors = {"ß.weight": torch.ones(2), "层.0": torch.zeros(3, dtype=torch.int32), "emoji🙂": torch.ones(1)}
    assert torchst.save(tensors) == ref.save(tensors)


def test_single_key_metadata_identical() -> None:
    tensors = {"w": torch.ones(2)}
    for md in [{"format": "pt"}, {"ключ": "значение 🙂"}, {"": ""}, {"q": 'with "quotes" and \\ \n'}]:
        assert torchst.save(tensors, metadata=md) == ref.save(tensors, metadata=md)
    assert torchst.save({}, metadata={"format": "pt"}) == ref.save({}, metadata={"format": "pt"})


def test_empty_metadata_without_tensors_is_valid_json() -> None:
    # safetensors 0.8 writes '{},"__metadata__":{}}' here, which nobody can read back.
    blob = torchst.save({}, metadata={})
    assert blob == b'\x18\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{}}     '
    assert torchst.load(blob) == {} and ref.load(blob) == {}
    assert torchst.save({"w": torch.ones(1)}, metadata={}) == ref.save({"w": torch.ones(1)}, metadata={})


def test_multi_key_metadata_same_json_and_data() -> None:
    # The reference writes metadata in HashMap order; compare parsed headers and the data section.
    tensors = {"w": torch.arange(6.0), "b": torch.ones(3, dtype=torch.bfloat16)}
    md = {f"k{i}": str(i) * i for i in range(12)}
    ours, theirs = torchst.save(tensors, metadata=md), ref.save(tensors, metadata=md)
    assert len(ours) == len(theirs)
    n = struct.unpack("<Q", ours[:8])[0]
    assert ours[:8] == theirs[:8] and ours[8 + n :] == theirs[8 + n :]
    assert json.loads(ours[8 : 8 + n]) == json.loads(theirs[8 : 8 + n])
    assert list(json.loads(ours[8 : 8 + n])["__metadata__"]) == sorted(md)  # reproducible bytes
    assert torchst.save(tensors, metadata=dict(reversed(md.items()))) == ours


def test_save_and_save_file_agree(tmp_path: Path) -> None:
    tensors = {"a": sample("BF16", (5, 7)), "b": sample("I64", (3,))}
    torchst.save_file(tensors, tmp_path / "x.safetensors", metadata={"m": "1"})
    assert (tmp_path / "x.safetensors").read_bytes() == torchst.save(tensors, metadata={"m": "1"})


def test_caller_dicts_untouched() -> None:
    tensors = {"b": torch.ones(1), "a": torch.ones(2)}
    md = {"z": "1", "a": "2"}
    torchst.save(tensors, metadata=md)
    assert list(tensors) == ["b", "a"] and list(md) == ["z", "a"]


# -- refusals ----------------------------------------------------------------------------------


def test_refuses_non_contiguous() -> None:
    with pytest.raises(SerializationError, match=r"tensor 'w\.T' is not contiguous.*\.contiguous\(\)"):
        torchst.save({"w.T": torch.ones(2, 3).t()})
    with pytest.raises(SerializationError, match="'s'"):
        torchst.save({"s": torch.arange(10)[::2]})


def test_refuses_shared_storage() -> None:
    w = torch.ones(4, 4)
    with pytest.raises(SharedTensorError, match=r"\['a', 'b'\].*save_model"):
        torchst.save({"a": w, "b": w})
    with pytest.raises(SharedTensorError):
        torchst.save({"a": w, "b": w[1:3]})  # overlapping partial view


def test_disjoint_views_of_one_storage_are_not_shared(tmp_path: Path) -> None:
    base = torch.arange(16.0)
    assert torchst.save({"lo": base[:8], "hi": base[8:]}) == ref.save({"lo": base[:8], "hi": base[8:]})
    path = tmp_path / "m.safetensors"
    torchst.save_file({"a": torch.ones(3), "b": torch.zeros(5), "c": torch.arange(4)}, path)
    loaded = torchst.load_file(path)  # windows of one mapping
    out = tmp_path / "again.safetensors"
    torchst.save_file(loaded, out)
    assert out.read_bytes() == path.read_bytes()


def test_refuses_sparse() -> None:
    with pytest.raises(SerializationError, match=r"tensor 'sp'.*sparse.*\.to_dense\(\)"):
        torchst.save({"sp": torch.eye(3).to_sparse()})


def test_refuses_meta() -> None:
    with pytest.raises(SerializationError, match="tensor 'm' is on the meta device"):
        torchst.save({"m": torch.empty(2, device="meta")})


def test_refuses_metadata_name() -> None:
    with pytest.raises(SerializationError, match="__metadata__"):
        torchst.save({"__metadata__": torch.ones(1)})


@pytest.mark.parametrize("key", [1, None, ("a",), b"w"])
def test_refuses_non_str_names(key: object) -> None:
    with pytest.raises(SerializationError, match="tensor names must be str"):
        torchst.save({key: torch.ones(1)})  # type: ignore[dict-item]


def test_refuses_non_tensors() -> None:
    with pytest.raises(SerializationError, match="tensor 'x': expected a torch.Tensor, found list"):
        torchst.save({"x": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(SerializationError, match="expected a dict"):
        torchst.save([torch.ones(1)])  # type: ignore[arg-type]


@pytest.mark.parametrize("md", [{"a": 1}, {"a": None}, {1: "a"}, {"a": b"x"}, ["a"], "a=b"])
def test_refuses_bad_metadata(md: object) -> None:
    with pytest.raises(SerializationError, match="metadata"):
        torchst.save({"w": torch.ones(1)}, metadata=md)  # type: ignore[arg-type]


def test_refuses_unencodable_strings() -> None:
    with pytest.raises(SerializationError, match="UTF-8"):
        torchst.save({"w": torch.ones(1)}, metadata={"a": "\ud800"})


def test_refuses_dtypes_without_a_code() -> None:
    with pytest.raises(UnsupportedDtypeError, match=r"tensor 'c'.*complex128.*\.to\("):
        torchst.save({"c": torch.ones(2, dtype=torch.complex128)})


def test_refuses_scalar_float4() -> None:
    t = torch.tensor([[1]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(())
    with pytest.raises(SerializationError, match="reshape it"):
        torchst.save({"f": t})


def test_refusal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(SerializationError):
        torchst.save_file({"w": torch.ones(2, 2).t()}, path)
    assert list(tmp_path.iterdir()) == []


# -- atomic commit -----------------------------------------------------------------------------


def test_overwrite_a_file_that_is_still_mapped(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {"a": sample("F32", (64, 64)), "b": sample("BF16", (33,)), "c": sample("U8", (7,))}
    torchst.save_file(tensors, path)
    before = path.read_bytes()
    loaded = torchst.load_file(path)  # default mmap: tensors are windows of the old file
    torchst.save_file(loaded, path)
    assert path.read_bytes() == before
    assert same_bits(torchst.load_file(path, backend="pread")["a"], tensors["a"])
    loaded["a"].add_(1)  # still usable, and never reaches the new file
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_failure_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.ones(8)}, path)
    before = path.read_bytes()
    calls = 0
    real = writer_mod.tensor_bytes

    def failing(t: torch.Tensor) -> memoryview:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        return real(t)

    monkeypatch.setattr(writer_mod, "tensor_bytes", failing)
    with pytest.raises(OSError, match="No space left"):
        torchst.save_file({"a": torch.zeros(1 << 20), "b": torch.zeros(1 << 20)}, path)
    assert calls == 2
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left behind


def test_interrupt_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.ones(8)}, path)
    before = path.read_bytes()

    def interrupted(f: object, plan: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "write_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        torchst.save_file({"w": torch.zeros(8)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_fsync_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.ones(3)}, path, fsync=True)
    assert len(synced) == 2  # the file, then its directory (the rename)
    assert torchst.load_file(path)["w"].equal(torch.ones(3))
    synced.clear()
    torchst.save_file({"w": torch.ones(3)}, path)
    assert synced == []


def test_save_file_accepts_pathlike_and_str(tmp_path: Path) -> None:
    torchst.save_file({"w": torch.ones(1)}, str(tmp_path / "s.safetensors"))
    torchst.save_file({"w": torch.ones(1)}, tmp_path / "p.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()


# -- streaming / staging -----------------------------------------------------------------------


@pytest.mark.parametrize("staging_bytes", [1, 3, 64, 1 << 20])
def test_staging_path_gives_identical_bytes(staging_bytes: int) -> None:
    tensors = {
        "big": sample("F32", (100, 37)),
        "odd": sample("U8", (13,)),
        "f4": sample("F4", (3, 5)),
        "empty": torch.empty(0, 2),
        "s": torch.tensor(7, dtype=torch.int64),
    }
    plan = plan_write(tensors, {"k": "v"})
    direct, staged = io.BytesIO(), io.BytesIO()
    write_tensors(direct, plan)
    write_tensors(staged, plan, staging_bytes=staging_bytes, stage_all=True)
    assert staged.getvalue() == direct.getvalue() == ref.save(tensors, metadata={"k": "v"})
    assert plan.total_size == len(direct.getvalue())


def test_plan_order_and_header() -> None:
    tensors = {"z": torch.ones(1, dtype=torch.int8), "y": torch.ones(1, dtype=torch.float64), "x": torch.ones(2)}
    plan = plan_write(tensors)
    assert [n for n, _ in plan.order] == ["y", "x", "z"]
    assert all(t is tensors[n] for n, t in plan.order)  # no copies in the plan
    assert len(plan.header) % 8 == 0


def test_cpu_write_is_zero_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The file write reads tensor memory directly: the memoryview handed to write() covers
    # the tensor's own data pointer.
    t = torch.arange(1024, dtype=torch.float32)
    seen: list[int] = []

    class Sink(io.RawIOBase):
        def write(self, b: object) -> int:
            mv = memoryview(b)  # type: ignore[arg-type]
            if mv.nbytes == t.nbytes:
                import ctypes

                buf = (ctypes.c_char * mv.nbytes).from_buffer(mv) if not mv.readonly else None
                if buf is not None:
                    seen.append(ctypes.addressof(buf))
            return mv.nbytes

        def writable(self) -> bool:
            return True

    write_tensors(Sink(), plan_write({"t": t}))  # type: ignore[arg-type]
    assert seen == [t.data_ptr()]


@pytest.mark.gpu
def test_cuda_tensors_stream_through_staging_with_identical_bytes(tmp_path: Path) -> None:
    cpu = {"a": sample("F32", (300, 7)), "b": sample("BF16", (5,)), "c": sample("U8", (11,)), "e": torch.empty(0)}
    cuda = {k: v.to("cuda") for k, v in cpu.items()}
    expected = ref.save(cpu)
    assert torchst.save(cuda) == expected
    torchst.save_file(cuda, tmp_path / "g.safetensors")
    assert (tmp_path / "g.safetensors").read_bytes() == expected
    out = io.BytesIO()
    write_tensors(out, plan_write(cuda), staging_bytes=100)  # many round trips through one buffer
    assert out.getvalue() == expected
