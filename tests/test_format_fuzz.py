"""Property tests: valid dicts round-trip bit-exactly; garbage only ever raises FormatError."""

from __future__ import annotations

import json
import re
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchst
from torchst._dtypes import DTYPES
from torchst.errors import FormatError
from torchst.format import BACKENDS, parse_bytes

CODES = sorted(code for code, row in DTYPES.items() if row.torch_dtype is not None)
FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),  # generous for slow CI, but a hang still fails
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(lambda s: s != "__metadata__")
meta_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    code = draw(st.sampled_from(CODES))
    row = DTYPES[code]
    assert row.torch_dtype is not None
    min_dims = 1 if row.pack != 1 else 0  # a 0-d float4 pair cannot be stored
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=min_dims, max_size=3)))
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * row.itemsize, max_size=n * row.itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(row.torch_dtype).reshape(shape)


dicts = st.dictionaries(names, tensors(), max_size=6)
metadatas = st.none() | st.dictionaries(meta_text, meta_text, max_size=4)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


@FUZZ
@given(dicts, metadatas)
def test_valid_dicts_round_trip(tmp_path: Path, tensors: dict[str, torch.Tensor], md: dict[str, str] | None) -> None:
    blob = torchst.save(tensors, metadata=md)
    header = parse_bytes(blob)
    assert len(header.tensors) == len(tensors)
    assert (header.data_start % 8, header.metadata) == (0, md)
    assert all(same_bits(torchst.load(blob)[n], t) for n, t in tensors.items())
    path = tmp_path / "fuzz.safetensors"
    torchst.save_file(tensors, path, metadata=md)
    assert path.read_bytes() == blob
    for backend in BACKENDS:
        with torchst.safe_open(path, backend=backend) as f:
            assert f.keys() == sorted(tensors)
            assert f.metadata() == md
            loaded = f.get_tensors()
        assert list(loaded) == list(header.tensors)
        for name, t in tensors.items():
            assert same_bits(loaded[name], t), (backend, name)


@FUZZ
@given(dicts, st.none() | st.dictionaries(meta_text, meta_text, max_size=1))
def test_bytes_match_reference(tensors: dict[str, torch.Tensor], md: dict[str, str] | None) -> None:
    ref = pytest.importorskip("safetensors.torch")
    if not tensors and md == {}:
        md = None  # safetensors 0.8 writes invalid JSON here; test_writer covers our output
    assert torchst.save(tensors, metadata=md) == ref.save(tensors, metadata=md)


def _check_only_format_errors(blob: bytes, path: Path) -> None:
    """Parse ``blob`` in memory and as a file with every backend; anything but FormatError fails."""
    try:
        loaded = torchst.load(blob)
    except FormatError:
        loaded = None
    path.write_bytes(blob)
    for backend in BACKENDS:
        try:
            with torchst.safe_open(path, backend=backend) as f:
                for name in f.offset_keys():
                    f.get_slice(name).get_shape()
                    try:
                        t = f.get_tensor(name)
                    except FormatError:
                        continue  # e.g. a dtype torch cannot represent
                    if loaded is not None:
                        assert same_bits(t, loaded[name])
        except FormatError as e:
            assert str(path) in str(e)
            assert loaded is None  # the in-memory and file readers agree on validity


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_format_error(tmp_path: Path, blob: bytes) -> None:
    _check_only_format_errors(blob, tmp_path / "junk.safetensors")


@FUZZ
@given(st.binary(min_size=1, max_size=120))
def test_random_headers_only_raise_format_error(tmp_path: Path, raw: bytes) -> None:
    _check_only_format_errors(struct.pack("<Q", len(raw)) + raw, tmp_path / "junk.safetensors")


_SEED = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1, 2, 3], dtype=torch.int16),
    "c": torch.tensor(True),
    "d": torch.arange(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
}
_VALID = torchst.save(_SEED, metadata={"format": "pt"})
_HEADER_LEN = struct.unpack("<Q", _VALID[:8])[0]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 8 + _HEADER_LEN - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_flipped_header_bytes_only_raise_format_error(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    blob = bytearray(_VALID)
    for pos, value in flips:
        blob[pos] = value
    _check_only_format_errors(bytes(blob), tmp_path / "mutated.safetensors")


@FUZZ
@given(st.integers(0, len(_VALID)))
def test_truncations_only_raise_format_error(tmp_path: Path, cut: int) -> None:
    blob = _VALID[:cut]
    if cut < len(_VALID):
        with pytest.raises(FormatError):
            torchst.load(blob)
    _check_only_format_errors(blob, tmp_path / "cut.safetensors")


_NUMBER = re.compile(rb"\d+")


@FUZZ
@given(st.data())
def test_changed_numbers_only_raise_format_error(tmp_path: Path, data: st.DataObject) -> None:
    header = _VALID[8 : 8 + _HEADER_LEN].rstrip(b" ")
    m = data.draw(st.sampled_from(list(_NUMBER.finditer(header))))
    new = str(data.draw(st.integers(0, 40) | st.integers(-(2**70), 2**70))).encode()
    header = header[: m.start()] + new + header[m.end() :]
    blob = struct.pack("<Q", len(header)) + header + _VALID[8 + _HEADER_LEN :]
    _check_only_format_errors(blob, tmp_path / "numbers.safetensors")


@FUZZ
@given(st.data())
def test_mutated_json_structure_only_raises_format_error(tmp_path: Path, data: st.DataObject) -> None:
    obj = json.loads(_VALID[8 : 8 + _HEADER_LEN])
    name = data.draw(st.sampled_from(sorted(obj)))
    junk = st.recursive(
        st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats(allow_nan=False) | st.text(max_size=4),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=6,
    )
    if name == "__metadata__" or data.draw(st.booleans()):
        obj[name] = data.draw(junk)
    else:
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        obj[name][field] = data.draw(junk | st.sampled_from(sorted(DTYPES)))
    raw = json.dumps(obj).encode()
    _check_only_format_errors(
        struct.pack("<Q", len(raw)) + raw + _VALID[8 + _HEADER_LEN :], tmp_path / "structure.safetensors"
    )
