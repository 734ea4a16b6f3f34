"""THE dtype table: safetensors code <-> torch dtype <-> bit size <-> write order.

One row per code; every other module asks this table instead of keeping its own.
Importing it does not import torch (header-only tools such as ``torchst inspect`` start
without it): the torch side of each row is looked up on first use.
``rank`` is the reference writer's ordering (tensors are written by descending rank,
then by name), which is what makes our files byte-identical to safetensors'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from .errors import DtypeError, UnsupportedDtypeError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "DType", "from_code", "from_torch", "nbytes_for"]


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its header code, width in bits, torch dtype (None if absent).

    >>> from_code("BF16").bits
    16
    """

    code: str
    bits: int
    rank: int
    # name of the torch dtype attribute ("" when torch has none); resolved by ``torch_dtype``
    torch_name: str = field(default="", repr=False)
    # torch elements per stored element group: float4_e2m1fn_x2 packs 2 logical values
    pack: int = 1

    @cached_property  # after the first use, a plain attribute read (the reader's hot path)
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype, or None when this torch has no such dtype (imports torch)."""
        return _torch_table()[0][self.code]

    @property
    def itemsize(self) -> int:
        """Bytes of one torch element (the packed unit for sub-byte dtypes)."""
        return self.bits * self.pack // 8

    def require_torch(self, where: str) -> torch.dtype:
        dt = self.torch_dtype
        if dt is None:
            import torch

            raise UnsupportedDtypeError(
                f"{where}: dtype {self.code} has no torch equivalent in torch {torch.__version__}; "
                "the file is valid and can be inspected, but this tensor cannot be loaded"
            )
        return dt


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
    code: DType(code, bits, rank, tname, pack) for rank, (code, bits, tname, pack) in enumerate(_ROWS)
}
_TORCH: tuple[dict[str, torch.dtype | None], dict[torch.dtype, DType]] | None = None


def _torch_table() -> tuple[dict[str, torch.dtype | None], dict[torch.dtype, DType]]:
    # Built once, on the first question that needs torch.
    global _TORCH
    if _TORCH is None:
        import torch

        by_code: dict[str, torch.dtype | None] = {}
        for row in DTYPES.values():
            dt = getattr(torch, row.torch_name, None) if row.torch_name else None
            by_code[row.code] = dt if isinstance(dt, torch.dtype) else None
        by_torch = {dt: DTYPES[code] for code, dt in by_code.items() if dt is not None}
        _TORCH = (by_code, by_torch)
    return _TORCH


def from_code(code: object, where: str = "header") -> DType:
    """The table row for a header dtype code; DtypeError for anything unknown."""
    row = DTYPES.get(code) if isinstance(code, str) else None
    if row is None:
        raise DtypeError(f"{where}: unknown dtype {code!r}; expected one of {', '.join(DTYPES)}")
    return row


def from_torch(dtype: torch.dtype, where: str = "tensor") -> DType:
    """The table row for a torch dtype; UnsupportedDtypeError if safetensors has no code for it."""
    row = _torch_table()[1].get(dtype)
    if row is None:
        raise UnsupportedDtypeError(
            f"{where}: torch dtype {dtype} has no safetensors code; cast it (e.g. .to(torch.float32)) before saving"
        )
    return row


def nbytes_for(row: DType, numel: int) -> int | None:
    """Bytes used by ``numel`` logical elements, or None when they do not fill whole bytes."""
    bits = numel * row.bits
    return None if bits % 8 else bits // 8
