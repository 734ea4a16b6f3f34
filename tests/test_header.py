"""Header validation: a crafted file for every rejection rule, and the pure parser."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

import torchst
from torchst.errors import (
    DtypeError,
    FileSizeError,
    FormatError,
    HeaderError,
    OffsetError,
    UnsupportedDtypeError,
)
from torchst.format import MAX_HEADER_SIZE, parse_bytes, parse_header


def craft(header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors blob with an arbitrary (possibly invalid) header and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def entry(dtype: str = "U8", shape: Any = (1,), offsets: Any = (0, 1)) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def rejected(tmp_path: Path, blob: bytes, kind: type[FormatError], *fragments: str) -> str:
    """Write ``blob``, open it with every backend, check the error class and message; return it."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    messages = set()
    for backend in torchst.format.BACKENDS:
        with pytest.raises(kind) as info:
            torchst.safe_open(path, backend=backend)
        messages.add(str(info.value))
    with pytest.raises(kind):
        torchst.load(blob)
    (msg,) = messages  # same validation, same message, whichever backend
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# -- the length prefix -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_prefix(tmp_path: Path, size: int) -> None:
    msg = rejected(tmp_path, b"\x01" * size, HeaderError, f"{size:,} bytes", "8-byte")
    assert "prefix" in msg


def test_header_length_over_cap(tmp_path: Path) -> None:
    blob = struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}"
    rejected(tmp_path, blob, HeaderError, f"{MAX_HEADER_SIZE + 1:,}", f"{MAX_HEADER_SIZE:,}-byte limit")


def test_header_length_at_cap_is_only_a_size_problem(tmp_path: Path) -> None:
    # Exactly at the cap is allowed by the rule; the file is just too short for it.
    blob = struct.pack("<Q", MAX_HEADER_SIZE) + b"{}"
    rejected(tmp_path, blob, FileSizeError, "truncated")


def test_header_length_beyond_file_end(tmp_path: Path) -> None:
    blob = craft(b'{"a":1}', length=100)
    rejected(tmp_path, blob, FileSizeError, "header claims 100 bytes", "only 7 bytes")


def test_huge_length_prefix_is_not_allocated(tmp_path: Path) -> None:
    blob = struct.pack("<Q", 2**64 - 1) + b"{}"
    rejected(tmp_path, blob, HeaderError, "limit")


# -- JSON-level rules --------------------------------------------------------------------------


def test_invalid_utf8(tmp_path: Path) -> None:
    rejected(tmp_path, craft(b'{"\xff\xfe":1}'), HeaderError, "not valid UTF-8")


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":}', b"{} {}", b"\x00" * 8])
def test_invalid_json(tmp_path: Path, raw: bytes) -> None:
    rejected(tmp_path, craft(raw), HeaderError, "not valid JSON")


@pytest.mark.parametrize(("raw", "found"), [(b"[]", "list"), (b'"x"', "str"), (b"1", "int"), (b"null", "NoneType")])
def test_non_object_json(tmp_path: Path, raw: bytes, found: str) -> None:
    rejected(tmp_path, craft(raw), HeaderError, "must be a JSON object", found)


@pytest.mark.parametrize("const", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_constants(tmp_path: Path, const: bytes) -> None:
    rejected(tmp_path, craft(b'{"__metadata__":{"a":' + const + b"}}"), HeaderError, "not valid JSON", "not allowed")


def test_deeply_nested_json_is_a_header_error(tmp_path: Path) -> None:
    rejected(tmp_path, craft(b"[" * 100_000 + b"]" * 100_000), HeaderError, "not valid JSON")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    e = json.dumps(entry())
    raw = f'{{"x":{e},"x":{e}}}'.encode()
    rejected(tmp_path, craft(raw, b"\0"), HeaderError, "duplicate key 'x'")


def test_duplicate_fields_inside_an_entry(tmp_path: Path) -> None:
    raw = b'{"x":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}}'
    rejected(tmp_path, craft(raw, b"\0"), HeaderError, "duplicate key 'dtype'")


@pytest.mark.parametrize("meta", [{"a": 1}, {"a": None}, {"a": ["b"]}, "text", ["a"], 3])
def test_metadata_must_map_str_to_str(tmp_path: Path, meta: object) -> None:
    rejected(tmp_path, craft({"__metadata__": meta}), HeaderError, "__metadata__", "string -> string")


def test_null_metadata_means_none(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(craft({"__metadata__": None}))
    with torchst.safe_open(path) as f:
        assert f.metadata() is None
        assert f.keys() == []


# -- entry-level rules -------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["F128", "f32", "", 5, None, ["F32"]])
def test_unknown_dtype(tmp_path: Path, code: object) -> None:
    msg = rejected(tmp_path, craft({"w.weight": entry(dtype=code)}, b"\0"), DtypeError, "'w.weight'", "unknown dtype")
    assert repr(code) in msg
    assert "F32" in msg  # lists the valid codes


@pytest.mark.parametrize("spec", [1, "F32", None, [1, 2], True])
def test_entry_not_an_object(tmp_path: Path, spec: object) -> None:
    rejected(tmp_path, craft({"w": spec}), HeaderError, "tensor 'w'", "must be an object")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_entry_missing_field(tmp_path: Path, missing: str) -> None:
    e = entry()
    del e[missing]
    rejected(tmp_path, craft({"w": e}, b"\0"), HeaderError, "tensor 'w'", f"missing {missing!r}")


@pytest.mark.parametrize("shape", [[-1], [True], [1.0], ["1"], [None], 1, "1", None, [[1]], {"0": 1}])
def test_shape_must_be_list_of_non_negative_ints(tmp_path: Path, shape: object) -> None:
    blob = craft({"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}, b"\0")
    rejected(tmp_path, blob, HeaderError, "tensor 'w'", "shape must be a list of non-negative integers")


@pytest.mark.parametrize(
    "offsets", [[0], [0, 1, 2], [-1, 0], [0, -1], [0.0, 1], [0, True], "0,1", None, {"0": 1}, [None, 1]]
)
def test_malformed_data_offsets(tmp_path: Path, offsets: object) -> None:
    blob = craft({"w": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}, b"\0")
    rejected(tmp_path, blob, OffsetError, "tensor 'w'", "data_offsets must be two non-negative integers")


def test_end_before_begin(tmp_path: Path) -> None:
    blob = craft({"w": entry(shape=(0,), offsets=(4, 0))}, b"\0" * 4)
    rejected(tmp_path, blob, OffsetError, "tensor 'w'", "[4, 0]", "end before they begin")


@pytest.mark.parametrize(
    ("dtype", "shape", "offsets", "need"),
    [
        ("F32", (2,), (0, 4), "8 bytes"),
        ("F32", (2,), (0, 12), "8 bytes"),
        ("U8", (), (0, 0), "1 bytes"),
        ("BF16", (3, 0), (0, 2), "0 bytes"),
        ("F6_E2M3", (4,), (0, 4), "3 bytes"),
    ],
)
def test_byte_count_must_match_shape(
    tmp_path: Path, dtype: str, shape: tuple[int, ...], offsets: tuple[int, int], need: str
) -> None:
    blob = craft({"w": entry(dtype, shape, offsets)}, b"\0" * offsets[1])
    rejected(tmp_path, blob, OffsetError, "tensor 'w'", need, f"span {offsets[1] - offsets[0]:,}")


@pytest.mark.parametrize(("dtype", "n"), [("F4", 3), ("F4", 1), ("F6_E2M3", 3), ("F6_E3M2", 1)])
def test_sub_byte_counts_must_fill_whole_bytes(tmp_path: Path, dtype: str, n: int) -> None:
    blob = craft({"w": entry(dtype, (n,), (0, 2))}, b"\0\0")
    rejected(tmp_path, blob, OffsetError, "tensor 'w'", "do not fill whole bytes")


def test_absurd_shape_fails_fast_without_allocating(tmp_path: Path) -> None:
    for shape in [(2**40, 2**40), (2**63,) * 64, (2**70,)]:
        blob = craft({"w": entry("F32", shape, (0, 4))}, b"\0" * 4)
        msg = rejected(tmp_path, blob, OffsetError, "tensor 'w'", "more bytes than the file holds")
        assert "span 4" in msg


def test_absurd_shape_with_zero_dim_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "z.safetensors"
    path.write_bytes(craft({"w": entry("F32", (2**60, 0), (0, 0))}))
    with torchst.safe_open(path) as f:
        assert f.get_slice("w").get_shape() == [2**60, 0]


# -- layout of the data section ----------------------------------------------------------------


def test_hole_between_tensors(tmp_path: Path) -> None:
    blob = craft({"a": entry(offsets=(0, 1)), "b": entry(offsets=(2, 3))}, b"\0" * 3)
    rejected(tmp_path, blob, OffsetError, "tensor 'b'", "starts at data byte 2", "ends at 1", "hole")


def test_hole_at_start(tmp_path: Path) -> None:
    blob = craft({"a": entry(offsets=(1, 2))}, b"\0" * 2)
    rejected(tmp_path, blob, OffsetError, "tensor 'a'", "hole")


def test_overlapping_tensors(tmp_path: Path) -> None:
    blob = craft({"a": entry("U8", (2,), (0, 2)), "b": entry("U8", (2,), (1, 3))}, b"\0" * 3)
    rejected(tmp_path, blob, OffsetError, "tensor 'b'", "overlaps")


def test_two_tensors_on_the_same_bytes(tmp_path: Path) -> None:
    blob = craft({"a": entry(), "b": entry()}, b"\0")
    rejected(tmp_path, blob, OffsetError, "overlaps")


def test_trailing_bytes(tmp_path: Path) -> None:
    blob = craft({"a": entry()}, b"\0" * 5)
    rejected(tmp_path, blob, FileSizeError, "4 trailing bytes")


def test_data_without_tensors_is_trailing(tmp_path: Path) -> None:
    rejected(tmp_path, craft({}, b"junk"), FileSizeError, "trailing")


def test_truncated_file_names_last_tensor(tmp_path: Path) -> None:
    blob = craft({"a": entry("F32", (2,), (0, 8)), "lm_head.weight": entry("F32", (4,), (8, 24))}, b"\0" * 20)
    rejected(
        tmp_path, blob, FileSizeError, "tensor 'lm_head.weight'", "ends at data byte 24", "20 data bytes", "truncated"
    )


def test_truncated_real_file(tmp_path: Path) -> None:
    import torch

    good = torchst.save({"w": torch.ones(64)})
    for cut in (len(good) - 1, len(good) - 100, 72):
        rejected(tmp_path, good[:cut], FileSizeError, "tensor 'w'", "truncated")
    rejected(tmp_path, good[:60], FileSizeError, "header claims 64 bytes", "truncated")


# -- valid headers -----------------------------------------------------------------------------


def test_unrepresentable_dtype_parses_but_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "f6.safetensors"
    header = {
        "b": entry("F6_E3M2", (8,), (3, 9)),
        "a": entry("F6_E2M3", (2, 2), (0, 3)),
        "c": entry("F32", (1,), (9, 13)),
    }
    path.write_bytes(craft(header, bytes(range(13))))
    for backend in torchst.format.BACKENDS:
        with torchst.safe_open(path, backend=backend) as f:
            assert f.keys() == ["a", "b", "c"]
            assert f.offset_keys() == ["a", "b", "c"]
            assert f.get_slice("a").get_shape() == [2, 2]
            assert f.get_slice("b").get_dtype() == "F6_E3M2"
            assert f.get_tensor("c").shape == (1,)
            for name, code in (("a", "F6_E2M3"), ("b", "F6_E3M2")):
                with pytest.raises(UnsupportedDtypeError, match=f"tensor '{name}'.*{code}.*no torch equivalent"):
                    f.get_tensor(name)
                with pytest.raises(UnsupportedDtypeError):
                    f.get_slice(name)[0]
            with pytest.raises(UnsupportedDtypeError):
                f.get_tensors()
    with pytest.raises(UnsupportedDtypeError, match="F6_E2M3"):
        torchst.load(path.read_bytes())


def test_parse_header_is_pure() -> None:
    raw = (
        b'{"__metadata__":{"k":"v"},"y":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},'
        b'"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    )
    h = parse_header(raw, data_size=8)
    assert list(h.tensors) == ["x", "y"]  # data-offset order, not JSON order
    assert h.tensors["y"].shape == (2,) and h.tensors["y"].begin == 4 and h.tensors["y"].nbytes == 4
    assert h.metadata == {"k": "v"}
    assert h.header_len == len(raw) and h.data_start == 8 + len(raw) and h.data_size == 8
    # Without data_size only the tiling is checked, not the file length.
    assert parse_header(raw).data_size == 8
    with pytest.raises(FileSizeError, match="<bytes>"):
        parse_header(raw, data_size=9)


def test_parse_bytes_accepts_padding_and_unicode_names() -> None:
    raw = json.dumps({"ß.ω": entry()}, ensure_ascii=False).encode() + b"   "
    h = parse_bytes(craft(raw, b"\x07"), source="mem")
    assert list(h.tensors) == ["ß.ω"]
    with pytest.raises(HeaderError, match="^mem: "):
        parse_bytes(b"\0" * 4, source="mem")


def test_every_error_is_a_value_error(tmp_path: Path) -> None:
    # Callers that only know the builtin keep working.
    path = tmp_path / "x.safetensors"
    path.write_bytes(craft(b"nope"))
    with pytest.raises(ValueError):
        torchst.load_file(path)
