"""THE dtype table: safetensors code <-> torch dtype <-> bit size <-> write order.

One row per code; every other module asks this table instead of keeping its own.
``rank`` is the reference writer's ordering (tensors are written by descending rank,
then by name), which is what makes our files byte-identical to safetensors'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DtypeError, UnsupportedDtypeError

__all__ = ["DTYPES", "DType", "from_code", "from_torch", "nbytes_for"]


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its header code, width in bits, torch dtype (None if absent)."""

    code: str
    bits: int
    rank: int
    torch_dtype: torch.dtype | None
    # torch elements per stored element group: float4_e2m1fn_x2 packs 2 logical values
    pack: int = 1

    @property
    def itemsize(self) -> int:
        """Bytes of one torch element (the packed unit for sub-byte dtypes)."""
        return self.bits * self.pack // 8

    def require_torch(self, where: str) -> torch.dtype:
        if self.torch_dtype is None:
            raise UnsupportedDtypeError(
                f"{where}: dtype {self.code} has no torch equivalent in torch {torch.__version__}; "
                "the file is valid and can be inspected, but this tensor cannot be loaded"
            )
        return self.torch_dtype


def _t(name: str) -> torch.dtype | None:
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) else None


# (code, bits, torch dtype name, pack), listed in the reference's ascending sort rank.
_ROWS: tuple[tuple[str, int, str, int], ...] = (
    ("BOOL", 8, "bool", 1),
    ("F4", 4, "float4_e2m1fn_x2", 2),
    ("F6_E2M3", 6, "", 1),
    ("F6_E3M2", 6, "", 1),
    ("U8", 8, "uint8", 1),
    ("I8", 8, "int8", 1),
    ("F8_E5M2", 8, "float8_e5m2", 1),
    ("F8_E4M3", 8, "float8_e4m3fn", 1),
    ("F8_E8M0", 8, "float8_e8m0fnu", 1),
    ("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", 1),
    ("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", 1),
    ("I16", 16, "int16", 1),
    ("U16", 16, "uint16", 1),
    ("F16", 16, "float16", 1),
    ("BF16", 16, "bfloat16", 1),
    ("I32", 32, "int32", 1),
    ("U32", 32, "uint32", 1),
    ("F32", 32, "float32", 1),
    ("C64", 64, "complex64", 1),
    ("F64", 64, "float64", 1),
    ("I64", 64, "int64", 1),
    ("U64", 64, "uint64", 1),
)

DTYPES: dict[str, DType] = {
    code: DType(code, bits, rank, _t(tname) if tname else None, pack)
    for rank, (code, bits, tname, pack) in enumerate(_ROWS)
}
_BY_TORCH: dict[torch.dtype, DType] = {d.torch_dtype: d for d in DTYPES.values() if d.torch_dtype is not None}


def from_code(code: object, where: str = "header") -> DType:
    """The table row for a header dtype code; DtypeError for anything unknown."""
    row = DTYPES.get(code) if isinstance(code, str) else None
    if row is None:
        raise DtypeError(f"{where}: unknown dtype {code!r}; expected one of {', '.join(DTYPES)}")
    return row


def from_torch(dtype: torch.dtype, where: str = "tensor") -> DType:
    """The table row for a torch dtype; UnsupportedDtypeError if safetensors has no code for it."""
    row = _BY_TORCH.get(dtype)
    if row is None:
        raise UnsupportedDtypeError(
            f"{where}: torch dtype {dtype} has no safetensors code; "
            f"cast it (e.g. .to(torch.float32)) before saving"
        )
    return row


def nbytes_for(row: DType, numel: int) -> int | None:
    """Bytes used by ``numel`` logical elements, or None when they do not fill whole bytes."""
    bits = numel * row.bits
    return None if bits % 8 else bits // 8
