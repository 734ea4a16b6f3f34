"""The fast paths of the header parser and reader agree with the careful ones."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import pytest
import torch

import torchst
from torchst.errors import DtypeError, HeaderError, OffsetError
from torchst.format.header import parse_header


def _raw(entries: dict[str, object]) -> bytes:
    return json.dumps(entries).encode()


def test_unusual_but_valid_entries_take_the_careful_path() -> None:
    # A dimension beyond any file size followed by a 0: zero elements, zero bytes, valid.
    h = parse_header(
        _raw(
            {
                "huge_then_zero": {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]},
                "f4": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]},
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11], "extra": 1},
            }
        ),
        data_size=11,
    )
    assert h.tensors["huge_then_zero"].shape == (2**70, 0) and h.tensors["huge_then_zero"].nbytes == 0
    assert h.tensors["f4"].nbytes == 3
    assert list(h.tensors) == ["huge_then_zero", "f4", "x"]


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, DtypeError, "unknown dtype 'F33'"),
        ({"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}, HeaderError, "shape must be a list"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, HeaderError, "shape must be a list"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}, OffsetError, "two non-negative integers"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, OffsetError, "end before they begin"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, OffsetError, "needs 12 bytes"),
        ({"dtype": "F4", "shape": [3], "data_offsets": [0, 8]}, OffsetError, "do not fill whole bytes"),
        ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}, OffsetError, "more bytes than"),
        ({"shape": [2], "data_offsets": [0, 8]}, HeaderError, "missing 'dtype'"),
        ([1, 2], HeaderError, "entry must be an object"),
    ],
)
def test_every_rejection_names_the_tensor(entry: object, error: type[Exception], message: str) -> None:
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    with pytest.raises(error, match=rf"m.safetensors: tensor 'bad': .*{message}"):
        parse_header(_raw({"good": ok, "bad": entry}), source="m.safetensors", data_size=16)


def test_duplicate_keys_are_rejected_with_the_key() -> None:
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    with pytest.raises(HeaderError, match="duplicate key 'a'"):
        parse_header(raw, data_size=2)


def test_parsing_restores_the_garbage_collector(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    torchst.save_file({f"t{i}": torch.full((2,), float(i)) for i in range(50)}, p)
    assert gc.isenabled()
    with torchst.safe_open(p) as f:
        assert gc.isenabled()
        assert torch.equal(f.get_tensors()["t7"], torch.full((2,), 7.0))
    assert gc.isenabled()
    gc.disable()
    try:
        torchst.load_file(p)
        assert not gc.isenabled()  # a caller's choice is left alone
    finally:
        gc.enable()
    bad = tmp_path / "bad.safetensors"
    header = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,9]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(9))
    with pytest.raises(OffsetError):
        torchst.safe_open(bad)
    assert gc.isenabled()


@pytest.mark.parametrize("backend", ["mmap", "eager"])
def test_window_tensors_are_zero_copy_and_own_their_storage(tmp_path: Path, backend: str) -> None:
    p = tmp_path / "m.safetensors"
    torchst.save_file({"a": torch.arange(6, dtype=torch.int64).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, p)
    with torchst.safe_open(p, backend=backend) as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]] and b.dtype == torch.bfloat16 and b.shape == (3,)
    assert a.untyped_storage().nbytes() == 48 and b.untyped_storage().nbytes() == 6
    # Both windows lie in one buffer: b's bytes start where a's end (no copy was made).
    assert b.data_ptr() == a.data_ptr() + 48
