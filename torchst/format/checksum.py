"""Per-tensor CRC32C checksums, stored in a file's ``__metadata__``.

One metadata entry whose value is a JSON string, so every safetensors reader still reads the
file (metadata values must be strings)::

    "torchst.checksums": "{\\"algorithm\\":\\"crc32c\\",\\"header\\":\\"9a3e11c0\\",
                           \\"tensors\\":{\\"lm_head.weight\\":\\"0c1f2e3d\\", ...}}"

- ``tensors``: the CRC32C (Castagnoli polynomial, the checksum S3 and GCS verify uploads with,
  computed in hardware on x86 and ARM) of each tensor's data bytes, 8 lowercase hex digits,
  in file order.
- ``header``: the CRC32C of a canonical form of everything else in the header (the other
  metadata entries, each tensor's name, dtype, shape and offsets), so a flipped dtype
  (``I32`` -> ``F32`` has the same size) or metadata byte is caught too.

Nothing here imports torch until data is read (header-only tools stay fast).  Every value has a fixed width, so a writer can lay the header out with zero placeholders,
hash each tensor as its bytes stream to the file, and then overwrite the header in place with
the final values: the same length, one pass over the data, no extra copy.

>>> rec = encode_record(0x1234, [("w", 0xDEADBEEF)])
>>> rec
'{"algorithm":"crc32c","header":"00001234","tensors":{"w":"deadbeef"}}'
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import FormatError, IntegrityError
from .header import Header, TensorInfo, parse_header, read_header_length

__all__ = [
    "ALGORITHM",
    "CHECKSUM_KEY",
    "Checksums",
    "FileReport",
    "Verifier",
    "check_from_file",
    "check_header",
    "check_tensors",
    "checksum_metadata",
    "combine_pieces",
    "crc32c",
    "crc32c_combine",
    "encode_record",
    "header_digest",
    "read_checksums",
    "verify_file",
    "warn_unverified",
]

T = TypeVar("T")
CHECKSUM_KEY = "torchst.checksums"
ALGORITHM = "crc32c"
logger = logging.getLogger(__name__)
_crc_fn: Callable[..., int] | None = None
_HEX = frozenset("0123456789abcdef")


def _crc_impl() -> Callable[..., int]:
    global _crc_fn
    if _crc_fn is None:
        try:
            from crc32c import crc32c as fn
        except ImportError:
            raise ImportError(
                "per-tensor checksums need the 'crc32c' package (a dependency of torchst): "
                "pip install 'crc32c>=2.5', or pass checksums=False / verify=False"
            ) from None
        _crc_fn = fn
    return _crc_fn


def submit(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run ``fn(*args)`` on the I/O pool, or right here once the interpreter is shutting down.

    A non-daemon thread finishing a save at exit may not schedule new pool work.
    """
    from ..storage.buffers import io_pool  # imports torch: only when there is work to do

    try:
        return io_pool().submit(fn, *args)
    except RuntimeError:
        fut: Future[T] = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered through the future, like a pool task
            fut.set_exception(e)
        return fut


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C of a bytes-like object (memoryviews of tensor memory too), continuing from ``value``.

    Buffers of 32 KiB and more are hashed with the GIL released, so threads hash in parallel.

    >>> crc32c(b"hello world") == crc32c(b" world", crc32c(b"hello"))
    True
    """
    return _crc_impl()(data, value)


def encode_record(header_crc: int, tensors: Iterable[tuple[str, int]]) -> str:
    """The metadata value for ``(name, crc)`` pairs in file order; fixed width for given names."""
    obj = {
        "algorithm": ALGORITHM,
        "header": f"{header_crc:08x}",
        "tensors": {name: f"{crc:08x}" for name, crc in tensors},
    }
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def header_digest(
    metadata: Mapping[str, str] | None, entries: Iterable[tuple[str, str, Sequence[int], int, int]]
) -> int:
    """CRC32C of the canonical header: other metadata (sorted) + ``(name, dtype, shape, begin, end)``.

    Writers pass the entries they lay out, readers the parsed ones: both give the same bytes.
    """
    md = sorted([k, v] for k, v in (metadata or {}).items() if k != CHECKSUM_KEY)
    body = [[n, d, list(s), b, e] for n, d, s, b, e in entries]
    # ensure_ascii: an internal form only, and it never fails on odd names
    raw = json.dumps([md, body], separators=(",", ":"))
    return crc32c(raw.encode("ascii"))


def checksum_metadata(
    metadata: Mapping[str, str] | None,
    entries: Sequence[tuple[str, str, Sequence[int], int]],
    crcs: Sequence[int] | None = None,
) -> dict[str, str]:
    """``metadata`` plus the checksum record for a file laid out as ``entries``.

    ``entries`` are ``(name, dtype code, header shape, nbytes)`` in write order (what
    ``build_header`` takes); ``crcs`` the tensors' CRC32C values in that order, or None for zero
    placeholders of the same width.  Writers that place bytes themselves (several ranks writing
    one file) build the header with placeholders, hash what they write (``crc32c``, then
    ``combine_pieces`` across writers) and overwrite the header with the final record: the
    header keeps its length, so no data moves.  A record already in ``metadata`` is replaced.

    >>> entries = [("w", "F32", [2], 8)]
    >>> md = checksum_metadata({"format": "pt"}, entries, [crc32c(bytes(8))])
    >>> build_header(entries, md)  # doctest: +SKIP
    """
    user = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    laid, offset = [], 0
    for name, code, shape, nbytes in entries:
        laid.append((name, code, shape, offset, offset + nbytes))
        offset += nbytes
    values = crcs if crcs is not None else [0] * len(entries)
    if len(values) != len(entries):
        raise ValueError(f"{len(values)} checksums for {len(entries)} tensors")
    record = encode_record(header_digest(user, laid), zip((e[0] for e in entries), values))
    return {**user, CHECKSUM_KEY: record}


def _gf2_times(mat: Sequence[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: Sequence[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def _zero_operators() -> list[list[int]]:
    # The operator appending 2**k zero bytes to a CRC32C register, k = 0..63 (zlib's method).
    one_bit = [0x82F63B78] + [1 << n for n in range(31)]
    two_bits = _gf2_square(one_bit)
    four_bits = _gf2_square(two_bits)
    ops = [_gf2_square(four_bits)]
    for _ in range(63):
        ops.append(_gf2_square(ops[-1]))
    return ops


_ZERO_OPS: list[list[int]] = []


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``a + b`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)`` (no data needed).

    Lets pieces of one tensor be hashed where they are written (threads, ranks) and combined.

    >>> crc32c_combine(crc32c(b"hello "), crc32c(b"world"), 5) == crc32c(b"hello world")
    True
    """
    if len2 <= 0:
        return crc1
    if not _ZERO_OPS:
        _ZERO_OPS.extend(_zero_operators())
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(_ZERO_OPS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def combine_pieces(pieces: Iterable[tuple[int, int, int]], nbytes: int, *, name: str = "tensor") -> int:
    """The CRC32C of a tensor's ``nbytes`` bytes from ``(offset, length, crc)`` pieces that tile them.

    >>> combine_pieces([(5, 6, crc32c(b" world")), (0, 5, crc32c(b"hello"))], 11) == crc32c(b"hello world")
    True
    """
    crc, pos = 0, 0
    for offset, length, piece in sorted(pieces):
        if offset != pos:
            raise ValueError(f"{name}: pieces leave bytes [{pos:,}, {offset:,}) uncovered or overlap")
        crc = crc32c_combine(crc, piece, length)
        pos += length
    if pos != nbytes:
        raise ValueError(f"{name}: pieces cover {pos:,} of {nbytes:,} bytes")
    return crc


@dataclass(frozen=True)
class Checksums:
    """A parsed checksum record: the algorithm, the header digest, one CRC per tensor."""

    algorithm: str
    header: int
    tensors: dict[str, int]


def _hex32(value: object) -> int | None:
    if isinstance(value, str) and len(value) == 8 and _HEX.issuperset(value):
        return int(value, 16)
    return None


def read_checksums(header: Header, *, source: str) -> Checksums | None:
    """The file's checksum record, ``None`` when it has none; a damaged record is an IntegrityError."""
    raw = (header.metadata or {}).get(CHECKSUM_KEY)
    if raw is None:
        return None
    where = f"{source}: the checksum record ({CHECKSUM_KEY!r} in __metadata__)"
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(f"{where} is not valid JSON ({e}); the header is corrupted", path=source) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict):
        raise IntegrityError(f"{where} must be a JSON object with 'algorithm', 'header' and 'tensors'", path=source)
    algorithm = obj.get("algorithm")
    if algorithm != ALGORITHM:
        raise IntegrityError(
            f"{where} uses algorithm {algorithm!r}, which this torchst cannot check (it checks {ALGORITHM!r}); "
            "upgrade torchst, or load with verify=False",
            path=source,
        )
    head = _hex32(obj.get("header"))
    tensors: dict[str, int] = {}
    for name, value in obj["tensors"].items():
        crc = _hex32(value)
        if crc is None:
            raise IntegrityError(f"{where}: value {value!r} for tensor {name!r} is not 8 hex digits", path=source)
        tensors[name] = crc
    if head is None:
        raise IntegrityError(f"{where}: header digest {obj.get('header')!r} is not 8 hex digits", path=source)
    return Checksums(algorithm, head, tensors)


def check_header(header: Header, sums: Checksums, *, source: str) -> None:
    """Raise IntegrityError unless the header matches its digest and every tensor has a checksum."""
    entries = ((t.name, t.dtype, t.shape, t.begin, t.end) for t in header.tensors.values())
    got = header_digest(header.metadata, entries)
    if got != sums.header:
        raise IntegrityError(
            f"{source}: the header (bytes 0-{header.data_start:,}) does not match its recorded {ALGORITHM} "
            f"checksum (recorded {sums.header:08x}, computed {got:08x}): a tensor name, dtype, shape, offset or "
            "metadata entry was altered. The file is corrupted; re-download it or restore another copy",
            path=source,
            byte_range=(0, header.data_start),
        )
    if len(sums.tensors) != len(header.tensors) or not all(n in sums.tensors for n in header.tensors):
        missing = [n for n in header.tensors if n not in sums.tensors]
        extra = [n for n in sums.tensors if n not in header.tensors]
        raise IntegrityError(
            f"{source}: the checksum record does not list the file's tensors (no checksum for {missing[:3]}, "
            f"checksums for absent tensors {extra[:3]}); the header is corrupted",
            path=source,
            tensor=(missing + extra)[0] if missing or extra else None,
            byte_range=(0, header.data_start),
        )


def tensor_error(source: str, info: TensorInfo, data_start: int, expected: int, got: int) -> IntegrityError:
    """The error for one tensor whose bytes hash to ``got`` instead of ``expected``."""
    start, end = data_start + info.begin, data_start + info.end
    return IntegrityError(
        f"{source}: tensor {info.name!r} (file bytes {start:,}-{end:,}) does not match its recorded "
        f"{ALGORITHM} checksum (recorded {expected:08x}, computed {got:08x}). The file is corrupted "
        "(disk error, or an altered, truncated or mixed-up copy); re-download it or restore another copy",
        path=source,
        tensor=info.name,
        byte_range=(start, end),
    )


class Verifier:
    """Checks the tensors of one file against its checksum record (validated on creation).

    >>> f = torchst.safe_open("model.safetensors")  # save_model recorded checksums
    >>> v = Verifier(f.header, source=f.path)
    >>> t = f.get_tensor("fc.weight")
    >>> if v.active:
    ...     v.check(f.header.tensors["fc.weight"], memoryview(t.numpy()).cast("B"))
    """

    def __init__(self, header: Header, *, source: str) -> None:
        self.source = source
        self.data_start = header.data_start
        self.sums = read_checksums(header, source=source)
        if self.sums is not None:
            check_header(header, self.sums, source=source)

    @property
    def active(self) -> bool:
        """Whether the file records checksums (otherwise nothing can be checked)."""
        return self.sums is not None

    def check(self, info: TensorInfo, data: Any) -> None:
        """Raise IntegrityError unless ``data`` (the tensor's bytes) hashes to its recorded value."""
        if self.sums is not None:
            self.check_value(info, crc32c(data) if info.nbytes else 0)

    def check_value(self, info: TensorInfo, got: int) -> None:
        """Like ``check`` for a CRC the caller computed (e.g. chunk by chunk)."""
        if self.sums is None:
            return
        expected = self.sums.tensors[info.name]  # check_header made sure every tensor has one
        if got != expected:
            raise tensor_error(self.source, info, self.data_start, expected, got)


_GROUP_BYTES = 8 << 20


def check_tensors(verifier: Verifier, items: Iterable[tuple[TensorInfo, Any]]) -> None:
    """Check ``(info, bytes)`` pairs already in memory, hashing on several cores.

    Raises the first mismatch in the order given.  Small tensors are grouped so 10,000 of them
    cost a handful of tasks, not 10,000.
    """
    if not verifier.active:
        return
    groups: list[list[tuple[TensorInfo, Any]]] = [[]]
    size = 0
    for info, data in items:
        if size >= _GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((info, data))
        size += info.nbytes
    if len(groups) == 1 or (os.cpu_count() or 1) < 2:
        results = [_crc_group(g) for g in groups]
    else:
        futures = [submit(_crc_group, g) for g in groups]
        results = [f.result() for f in futures]
    for group, crcs in zip(groups, results):
        for (info, _), got in zip(group, crcs):
            verifier.check_value(info, got)


def _crc_group(group: list[tuple[TensorInfo, Any]]) -> list[int]:
    return [crc32c(data) if info.nbytes else 0 for info, data in group]


def check_from_file(fd: int, header: Header, verifier: Verifier, infos: Sequence[TensorInfo], *, source: str) -> None:
    """Read the bytes of ``infos`` (offset order) from ``fd`` and raise the first mismatch.

    For loads whose bytes never sit in CPU memory as stored (accelerator targets, dtype casts).
    """
    if verifier.active and infos:
        problems = _scan(fd, header, verifier, source, None, VERIFY_CHUNK, infos)
        if problems:
            raise problems[0]


def warn_unverified(sources: Sequence[str]) -> None:
    """Say once, for one load, that ``verify=True`` found no checksums to check in ``sources``."""
    if not sources:
        return
    shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    logger.warning(
        "verify=True: %s record%s no checksums, so nothing could be checked (saved by another tool, or with "
        "checksums=False); loading without verification",
        shown,
        "" if len(sources) > 1 else "s",
    )


@dataclass(frozen=True)
class FileReport:
    """What ``verify_file`` found: ``problems`` is empty when every checksum matched."""

    path: str
    has_checksums: bool
    tensors: int
    nbytes: int
    problems: tuple[FormatError, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


VERIFY_CHUNK = 8 << 20


def verify_file(
    path: str | os.PathLike[str],
    *,
    on_bytes: Callable[[int], object] | None = None,
    chunk_bytes: int = VERIFY_CHUNK,
) -> FileReport:
    """Read a whole .safetensors file once and check every recorded checksum.

    Corruption is reported, not raised: every bad tensor is one entry of ``problems`` (an
    IntegrityError naming tensor and byte range), a malformed header the only entry.  The next
    chunk is read while the current one is hashed (both release the GIL), so checking costs
    little more than reading.  ``on_bytes(n)`` is called as data bytes are checked.

    >>> report = verify_file("model.safetensors")
    >>> report.ok, report.has_checksums
    (True, True)
    """
    source = os.fspath(path)
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        try:
            n = read_header_length(os.pread(fd, 8, 0), source=source, file_size=size)
            header = parse_header(os.pread(fd, n, 8), source=source, data_size=size - 8 - n)
            verifier = Verifier(header, source=source)
        except FormatError as e:
            return FileReport(source, CHECKSUM_KEY in _raw_metadata_hint(fd, size), 0, size, (e,))
        if not verifier.active:
            return FileReport(source, False, len(header.tensors), size)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        problems = _scan(fd, header, verifier, source, on_bytes, max(1, chunk_bytes))
        return FileReport(source, True, len(header.tensors), size, tuple(problems))
    finally:
        os.close(fd)


def _raw_metadata_hint(fd: int, size: int) -> str:
    # For a report on a file whose header did not parse: does it look like it had checksums?
    try:
        return os.pread(fd, min(size, 1 << 20), 0).decode("utf-8", "replace")
    except OSError:
        return ""


_local = threading.local()


def _buffers(nbytes: int, make: Callable[[int], memoryview]) -> tuple[memoryview, memoryview]:
    # Two read buffers per thread, kept between files: fresh ones would page-fault on first
    # touch for every file checked (a cost a plain read with one reused buffer does not pay).
    have: tuple[memoryview, memoryview] | None = getattr(_local, "bufs", None)
    if have is None or len(have[0]) < nbytes:
        have = _local.bufs = (make(nbytes), make(nbytes))
    return have


def _scan(
    fd: int,
    header: Header,
    verifier: Verifier,
    source: str,
    on_bytes: Callable[[int], object] | None,
    chunk_bytes: int,
    infos: Sequence[TensorInfo] | None = None,
) -> list[FormatError]:
    """Read the bytes of ``infos`` (default: every tensor; in offset order) and check each one."""
    from ..storage.buffers import anon_buffer, pread_into

    infos = list(header.tensors.values()) if infos is None else infos
    problems: list[FormatError] = []
    start = header.data_start
    # Adjacent tensors form one run; each run is read in chunks, the next chunk always in flight.
    runs: list[list[int]] = []
    for info in infos:
        if info.nbytes and runs and runs[-1][1] == info.begin:
            runs[-1][1] = info.end
        elif info.nbytes:
            runs.append([info.begin, info.end])
    chunk = max(1, min(chunk_bytes, max((hi - lo for lo, hi in runs), default=1)))
    reads = [(off, min(chunk, hi - off)) for lo, hi in runs for off in range(lo, hi, chunk)]
    bufs = _buffers(chunk, anon_buffer) if reads else ()
    i, crc = 0, 0

    def finish(info: TensorInfo, got: int) -> None:
        try:
            verifier.check_value(info, got)
        except IntegrityError as e:
            problems.append(e)

    def read(k: int, pos: int, n: int) -> None:
        pread_into(fd, bufs[k][:n], start + pos, source=source)

    pending: Future[None] | None = submit(read, 0, *reads[0]) if reads else None
    try:
        for j, (pos, n) in enumerate(reads):
            k = j % 2
            assert pending is not None
            try:
                pending.result()
            except FormatError as e:  # the file shrank while we read it
                pending = None
                problems.append(e)
                return problems
            pending = submit(read, 1 - k, *reads[j + 1]) if j + 1 < len(reads) else None
            view, hi = bufs[k], pos + n
            while i < len(infos):
                info = infos[i]
                if info.begin >= hi and info.nbytes:
                    break
                a, b = max(info.begin, pos), min(info.end, hi)
                if b > a:
                    crc = crc32c(view[a - pos : b - pos], crc)
                if info.end > hi:
                    break
                finish(info, crc)
                crc, i = 0, i + 1
            if on_bytes is not None:
                on_bytes(n)
        for info in infos[i:]:  # empty tensors after the last run
            finish(info, 0)
        return problems
    finally:
        if pending is not None and not pending.cancel():
            pending.exception()  # wait for the read in flight before the caller closes ``fd``
