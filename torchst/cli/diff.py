"""``torchst diff A B``: compare two checkpoints of any layout; exit 1 when they differ.

Names are compared after resolving aliases (a tied ``lm_head.weight`` recorded as an alias is the
same tensor as one stored twice, or one a writer dropped because it is tied).  Tensor bytes are
compared first, chunk by chunk; only chunks whose bytes differ are widened (float64) to measure
the difference, so comparing identical checkpoints costs about one read of each and never
imports torch.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from .._progress import progress
from ..resolve import Layout, Part, StoredTensor, resolve, user_metadata
from ._common import add_path, emit_json, show_progress

_CHUNK = 8 << 20  # a multiple of every element size
# Element types whose differences are measured (others are compared by their bytes only).
_WIDENED = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64"}


def register(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    p = sub.add_parser(
        "diff",
        parents=[common],
        help="compare two checkpoints of any layout; exit 1 when they differ",
        description="Compare tensor names, dtypes, shapes and values of two checkpoints. Aliases (tied weights) "
        "are resolved. Manager steps are compared part by part (model weights, training state); a step and a "
        "plain checkpoint compare the step's model weights.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path(p, "a", "the first checkpoint")
    add_path(p, "b", "the second checkpoint")
    p.add_argument(
        "--atol", type=float, default=0.0, help="tolerated absolute difference for float tensors (default: 0, exact)"
    )
    p.add_argument("--metadata", action="store_true", help="also compare the header metadata")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    p.set_defaults(run=run)


@dataclass(frozen=True)
class Difference:
    """One difference: ``kind`` is only_in_first | only_in_second | part_only_in_first |
    part_only_in_second | dtype_shape | bytes | values | metadata."""

    part: str
    name: str
    kind: str
    detail: str

    def line(self) -> str:
        where = f"{self.part}: " if self.part else ""
        sign = {"only_in_first": "-", "only_in_second": "+", "part_only_in_first": "-", "part_only_in_second": "+"}
        return f"{sign.get(self.kind, '~')} {where}{self.name}: {self.detail}"


def _memcmp() -> Any:
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):  # no C library handle (Windows): slices compare instead
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class Comparer:
    """Compares stored tensors chunk by chunk through two reusable buffers (no allocation per tensor)."""

    def __init__(self, atol: float, bar: Any, largest: int = _CHUNK) -> None:
        self.atol = atol
        self.bar = bar
        self.files: dict[str, io.FileIO] = {}
        # No bigger than the largest tensor, a multiple of every element size.
        self.chunk = min(_CHUNK, -(-max(largest, 1) // 16) * 16)
        self.bufs = (bytearray(self.chunk), bytearray(self.chunk))
        self.views = (memoryview(self.bufs[0]), memoryview(self.bufs[1]))
        self.memcmp = _memcmp()
        self.addrs = tuple(ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self.bufs)
        self.wide: Any = None  # a reusable torch buffer, created on the first differing float chunk

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _read(self, i: int, path: str, offset: int, n: int) -> None:
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = io.FileIO(path, "r")  # closed in close()
        f.seek(offset)
        view = self.views[i][:n]
        got = 0
        while got < n:
            k = f.readinto(view[got:])
            if not k:
                raise OSError(f"{path}: file ended at byte {offset + got:,}, inside a tensor (truncated meanwhile?)")
            got += k

    def _equal(self, n: int) -> bool:
        if self.memcmp is not None:
            return bool(self.memcmp(self.addrs[0], self.addrs[1], n) == 0)
        return self.views[0][:n].tobytes() == self.views[1][:n].tobytes()

    def compare(self, a: StoredTensor, b: StoredTensor) -> tuple[str, str] | None:
        """None when equal, else (kind, detail); reads both tensors once."""
        code, total = a.info.dtype, a.info.nbytes
        worst, nan_mismatch, pos = 0.0, False, 0
        while pos < total:
            n = min(self.chunk, total - pos)
            self._read(0, a.file, a.offset + pos, n)
            self._read(1, b.file, b.offset + pos, n)
            if not self._equal(n):
                if code not in _WIDENED:
                    self.bar.update(total - pos)
                    return "bytes", "bytes differ"
                w, nm = self._widen(code, n)
                worst, nan_mismatch = max(worst, w), nan_mismatch or nm
            pos += n
            self.bar.update(n)
        if nan_mismatch or worst > self.atol:
            extra = ", NaN positions differ" if nan_mismatch else ""
            return "values", f"max abs difference {worst:.3g} (atol {self.atol:g}){extra}"
        return None

    def _widen(self, code: str, n: int) -> tuple[float, bool]:
        import warnings

        import torch  # only differing float bytes need it

        dt = getattr(torch, _WIDENED[code])
        count = n // torch.empty((), dtype=dt).element_size()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on a bytearray we own and do not resize
            ta = torch.frombuffer(self.bufs[0], dtype=dt, count=count)
            tb = torch.frombuffer(self.bufs[1], dtype=dt, count=count)
        # float32 holds every F16/BF16 value exactly and measures F32 differences to 2**-24 of
        # themselves, plenty for a tolerance; F64 and C64 are measured in double precision.
        wide = {torch.float64: torch.float64, torch.complex64: torch.complex128}.get(dt, torch.float32)
        if self.wide is None or self.wide.dtype != wide:
            self.wide = torch.empty(self.chunk // 2, dtype=wide)  # reused: no allocation per chunk
        d = self.wide[:count]
        if dt == wide:
            torch.sub(ta, tb, out=d)  # one pass
        else:
            d.copy_(ta)
            d.sub_(tb)
        if not count:
            return 0.0, False
        if d.is_complex():
            worst = float(d.abs().max())
        else:
            lo, hi = torch.aminmax(d)  # one pass instead of abs() then max()
            worst = max(-float(lo), float(hi))
        if math.isnan(worst):  # NaN somewhere: compare NaN positions, then measure the rest
            nan_mismatch = bool((torch.isnan(ta) != torch.isnan(tb)).any())
            return float(d.abs().nan_to_num_(0.0).max()), nan_mismatch
        return worst, False


def pair_parts(a: Layout, b: Layout) -> tuple[list[tuple[Part, Part]], list[Difference]]:
    """Which part of ``a`` is compared with which of ``b``: same labels, or a lone checkpoint with a step's weights."""
    la, lb = {p.label: p for p in a.parts}, {p.label: p for p in b.parts}
    if len(la) == 1 and len(lb) == 1:
        return [(a.parts[0], b.parts[0])], []
    if "" in la or "" in lb:
        other = b if "" in la else a
        weights = [p for p in other.parts if p.role == "weights"]
        if other.kind != "step" or len(weights) != 1:
            raise ValueError(
                f"{other.path} is a {other.kind} with parts {sorted(p.label for p in other.parts)}; "
                "name one step directory (e.g. run/step_20) to compare it with a single checkpoint"
            )
        return ([(a.parts[0], weights[0])] if "" in la else [(weights[0], b.parts[0])]), []
    pairs = [(la[k], lb[k]) for k in la if k in lb]
    extra = [Difference(k, "(part)", "part_only_in_first", "only in first") for k in la if k not in lb]
    extra += [Difference(k, "(part)", "part_only_in_second", "only in second") for k in lb if k not in la]
    return pairs, extra


def _label(pa: Part, pb: Part) -> str:
    return pa.label if pa.label == pb.label else (pa.label or pb.label)


def _names(p: Part) -> set[str]:
    return set(p.tensors) | set(p.aliases)


def _group(p: Part, name: str) -> set[str]:
    """The names sharing ``name``'s stored tensor (itself excluded)."""
    kept = p.aliases.get(name, name)
    return ({kept} | {a for a, k in p.aliases.items() if k == kept}) - {name}


def compare_parts(pa: Part, pb: Part, comparer: Comparer, metadata: bool) -> tuple[list[Difference], list[str]]:
    label = _label(pa, pb)
    diffs: list[Difference] = []
    notes: list[str] = []
    na, nb = _names(pa), _names(pb)
    for name, mine, theirs, kind, which in (
        *((n, pa, pb, "only_in_first", "first") for n in sorted(na - nb)),
        *((n, pb, pa, "only_in_second", "second") for n in sorted(nb - na)),
    ):
        tied = sorted(_group(mine, name) & _names(theirs))
        if tied:
            # Tied weights: one writer keeps this name (stored or as an alias), the other drops it
            # (transformers does); the values are compared under the name both have.
            notes.append(f"{name}: tied to {tied[0]} in the {which} checkpoint, absent from the other")
            continue
        diffs.append(Difference(label, name, kind, f"only in {which}"))
    done: dict[tuple[str, int, str, int], tuple[str, str] | None] = {}
    for name in sorted(na & nb):
        sa, sb = pa.lookup(name), pb.lookup(name)
        assert sa is not None and sb is not None
        ia, ib = sa.info, sb.info
        if (ia.dtype, ia.shape) != (ib.dtype, ib.shape):
            detail = f"{ia.dtype}{list(ia.shape)} vs {ib.dtype}{list(ib.shape)}"
            diffs.append(Difference(label, name, "dtype_shape", detail))
            continue
        key = (sa.file, sa.offset, sb.file, sb.offset)
        if key not in done:  # an alias and its target are compared once
            done[key] = comparer.compare(sa, sb)
        found = done[key]
        if found is not None:
            diffs.append(Difference(label, name, found[0], found[1]))
    if metadata:
        ma, mb = _user_metadata(pa), _user_metadata(pb)
        for k in sorted(ma.keys() | mb.keys()):
            if ma.get(k) != mb.get(k):
                diffs.append(Difference(label, f"metadata {k!r}", "metadata", f"{ma.get(k)!r} vs {mb.get(k)!r}"))
    return diffs, notes


def _user_metadata(p: Part) -> dict[str, str]:
    out: dict[str, str] = {}
    for md in p.metadata.values():
        out.update(user_metadata(md))
    return out


def _bytes_to_compare(pairs: list[tuple[Part, Part]]) -> int:
    total = 0
    for pa, pb in pairs:
        seen = set()
        for name in _names(pa) & _names(pb):
            sa, sb = pa.lookup(name), pb.lookup(name)
            if sa and sb and sa.info.nbytes == sb.info.nbytes and (sa.file, sa.offset) not in seen:
                seen.add((sa.file, sa.offset))
                total += sa.info.nbytes
    return total


def run(args: argparse.Namespace) -> int:
    bars = show_progress(args)
    a, b = resolve(args.a, progress=bars), resolve(args.b, progress=bars)
    try:
        pairs, diffs = pair_parts(a, b)
    except ValueError as e:
        print(f"torchst diff: error: {e}", file=sys.stderr)
        return 2
    notes: list[str] = []
    with progress(total=_bytes_to_compare(pairs), desc="Comparing", enabled=bars) as bar:
        largest = max((t.info.nbytes for pa, _ in pairs for t in pa.tensors.values()), default=0)
        comparer = Comparer(args.atol, bar, largest)
        try:
            for pa, pb in pairs:
                found, remarks = compare_parts(pa, pb, comparer, args.metadata)
                diffs += found
                notes += remarks
        finally:
            comparer.close()
    count_a = sum(len(_names(pa)) for pa, _ in pairs)
    count_b = sum(len(_names(pb)) for _, pb in pairs)
    if args.json:
        emit_json(
            {
                "a": a.path,
                "b": b.path,
                "identical": not diffs,
                "atol": args.atol,
                "compared": [[pa.label, pb.label] for pa, pb in pairs],
                "tensors": {"first": count_a, "second": count_b},
                "differences": [asdict(d) for d in diffs],
                "notes": notes,
            }
        )
    else:
        for d in diffs:
            print(d.line())
        for text in notes:
            print(f"note: {text}")
        verdict = "identical" if not diffs else f"{len(diffs)} difference(s)"
        print(f"{verdict}: {count_a:,} vs {count_b:,} tensors")
    return 0 if not diffs else 1
