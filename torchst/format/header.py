"""Parse, validate and build the JSON header of a .safetensors file.

Pure functions over bytes and ints (no file access, no torch tensors), so the parser
can be fuzzed directly.  Layout of a file::

    [8-byte little-endian header length N][N bytes of UTF-8 JSON, space padded][data]

Validation is complete before any tensor byte is touched: dtype codes, shapes,
offsets that tile the data section from 0 without holes or overlaps, byte counts
equal to numel x dtype bits / 8, and the exact file length.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._dtypes import DTYPES, from_code, nbytes_for
from ..errors import FileSizeError, HeaderError, OffsetError, SerializationError

__all__ = [
    "MAX_HEADER_SIZE",
    "Header",
    "TensorInfo",
    "build_header",
    "parse_bytes",
    "parse_header",
    "read_header_length",
]

MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"
_PREFIX = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in data-offset order, metadata, and where data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_len: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header_length(prefix: bytes | bytearray | memoryview, *, source: str, file_size: int) -> int:
    """Decode and bound-check the 8-byte length prefix against the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(
            f"{source}: file has {file_size:,} bytes, fewer than the 8-byte header length prefix"
        )
    (n,) = _PREFIX.unpack_from(prefix)
    if n > MAX_HEADER_SIZE:
        raise HeaderError(
            f"{source}: header claims {n:,} bytes, more than the {MAX_HEADER_SIZE:,}-byte limit "
            "(not a safetensors file, or a corrupted one)"
        )
    if 8 + n > file_size:
        raise FileSizeError(
            f"{source}: header claims {n:,} bytes but the file has only {file_size - 8:,} bytes "
            "after the length prefix (truncated download?)"
        )
    return int(n)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"JSON constant {token} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # C speed for the common case; called once per JSON object
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0


def _numel_bounded(shape: tuple[int, ...], bound: int) -> int:
    # Exact product, but stop once it exceeds what could possibly fit: an absurd
    # shape must fail validation quickly and never drive an allocation.
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > bound:
            return n
    return n


def parse_header(raw: bytes | bytearray | memoryview, *, source: str = "<bytes>", data_size: int | None = None) -> Header:
    """Validate the JSON header bytes (without the 8-byte prefix).

    ``data_size`` is the exact number of bytes that follow the header in the file;
    when given, the tensors must cover it exactly.

    >>> h = parse_header(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data_size=8)
    >>> h.tensors["x"].shape
    (2,)
    """
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"{source}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{source}: header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{source}: header must be a JSON object, found {type(obj).__name__}")

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError(f"{source}: __metadata__ must be an object of string -> string")
    # No file holds 2**64 bytes; below that bound byte counts are exact, so messages can show them.
    bound = 1 << 67

    entries: list[TensorInfo] = []
    append, rows = entries.append, DTYPES
    for name, spec in obj.items():
        # Fast path: the same rules as _check_entry, inline and without building messages
        # (10,000-tensor headers are common).  Anything unusual goes to _check_entry, which
        # raises the precise error.
        try:
            code, shape_l, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
            row = rows[code] if type(code) is str else None
            if row is not None and type(shape_l) is list and type(offs) is list and len(offs) == 2:
                begin, end = offs
                if type(begin) is int and type(end) is int and 0 <= begin <= end:
                    numel = 1
                    for d in shape_l:
                        if type(d) is not int or d < 0:
                            break
                        numel *= d
                        if numel > bound:
                            break
                    else:
                        bits = numel * row.bits
                        if not bits & 7 and bits >> 3 == end - begin:
                            append(TensorInfo(name, code, tuple(shape_l), begin, end))
                            continue
        except (KeyError, TypeError, ValueError):
            pass
        append(_check_entry(name, spec, source, bound))

    entries.sort(key=_by_offsets)
    pos = 0
    for t in entries:
        if t.begin != pos:
            kind = "leaves a hole before it" if t.begin > pos else "overlaps the previous tensor"
            raise OffsetError(
                f"{source}: tensor {t.name!r} starts at data byte {t.begin:,} but the previous tensor "
                f"ends at {pos:,} ({kind})"
            )
        pos = t.end
    if data_size is not None and pos != data_size:
        if pos > data_size:
            last = entries[-1].name
            raise FileSizeError(
                f"{source}: tensor {last!r} ends at data byte {pos:,} but the file has {data_size:,} "
                "data bytes (truncated download?)"
            )
        raise FileSizeError(
            f"{source}: tensors end at data byte {pos:,} but the file has {data_size:,} data bytes "
            f"({data_size - pos:,} trailing bytes)"
        )
    return Header({t.name: t for t in entries}, metadata, len(raw))


def _by_offsets(t: TensorInfo) -> tuple[int, int]:
    return t.begin, t.end


def _check_entry(name: str, spec: object, source: str, bound: int) -> TensorInfo:
    """Validate one tensor entry with a precise error for every rule it breaks."""
    where = f"{source}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise HeaderError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    try:
        code, shape_l, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
    except KeyError as e:
        raise HeaderError(f"{where}: entry is missing {e.args[0]!r}") from None
    row = from_code(code, where)
    if not isinstance(shape_l, list) or not all(_is_uint(d) for d in shape_l):
        raise HeaderError(f"{where}: shape must be a list of non-negative integers, found {shape_l!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and _is_uint(offs[0]) and _is_uint(offs[1])):
        raise OffsetError(f"{where}: data_offsets must be two non-negative integers, found {offs!r}")
    begin, end = offs
    if end < begin:
        raise OffsetError(f"{where}: data_offsets [{begin:,}, {end:,}] end before they begin")
    shape = tuple(shape_l)
    numel = _numel_bounded(shape, bound)
    need = nbytes_for(row, numel) if numel <= bound else None
    if need is None and numel <= bound:
        raise OffsetError(f"{where}: {numel:,} {code} elements do not fill whole bytes")
    if need != end - begin:
        shown = f"{need:,} bytes" if need is not None else "more bytes than the file holds"
        raise OffsetError(
            f"{where}: shape {list(shape)} of {code} needs {shown} but data_offsets "
            f"[{begin:,}, {end:,}] span {end - begin:,}"
        )
    return TensorInfo(name, code, shape, begin, end)


def parse_bytes(buf: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> Header:
    """Validate a whole in-memory safetensors blob (prefix + header + data)."""
    n = read_header_length(buf[:8], source=source, file_size=len(buf))
    return parse_header(buf[8 : 8 + n], source=source, data_size=len(buf) - 8 - n)


def _check_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise SerializationError(f"{what} must be a str, found {type(value).__name__}: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SerializationError(f"{what} {value!r} is not encodable as UTF-8") from None
    return value


def build_header(
    entries: Iterable[tuple[str, str, Iterable[int], int]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Compact JSON header for ``(name, dtype code, shape, nbytes)`` in write order.

    Matches the reference byte for byte: ``__metadata__`` first (keys sorted here so the
    bytes are reproducible), then tensors in the given order, space-padded to 8 bytes.
    Returns the padded header without the length prefix.
    """
    obj: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise SerializationError(f"metadata must be a dict of str -> str, found {type(metadata).__name__}")
        obj[METADATA_KEY] = {
            _check_str(k, "metadata key"): _check_str(metadata[k], f"metadata value for {k!r}")
            for k in sorted(metadata, key=lambda k: _check_str(k, "metadata key"))
        }
    offset = 0
    for name, code, shape, nbytes in entries:
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def encode_prefix(header: bytes) -> bytes:
    """The 8-byte little-endian length prefix for a built header."""
    return _PREFIX.pack(len(header))
