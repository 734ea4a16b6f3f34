"""Positional scatter reads and owned buffers behind the pread and eager backends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchst
from torchst.errors import FileSizeError
from torchst.storage import buffers as _buffers
from torchst.storage.buffers import anon_buffer, read_scatter


def _payload(tmp_path: Path, n: int) -> tuple[Path, bytes]:
    data = bytes(range(256)) * (n // 256 + 1)
    p = tmp_path / "blob.bin"
    p.write_bytes(data[:n])
    return p, data[:n]


def test_read_scatter_coalesces_adjacent_views_and_splits_large_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, data = _payload(tmp_path, 100_000)
    calls: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls.append((offset, len(bufs)))
        return real(fd, bufs, offset)

    monkeypatch.setattr(_buffers.os, "preadv", spy)
    # 1,000 adjacent 10-byte views, a gap, then one 80,000-byte view split into 30,000-byte chunks.
    small = [bytearray(10) for _ in range(1000)]
    big = bytearray(80_000)
    targets = [(i * 10, memoryview(b)) for i, b in enumerate(small)] + [(20_000, memoryview(big))]
    fd = os.open(p, os.O_RDONLY)
    try:
        read_scatter(fd, targets, chunk=30_000)
    finally:
        os.close(fd)
    assert b"".join(small) == data[:10_000]
    assert bytes(big) == data[20_000:100_000]
    # one call for the small views, three for the big one (not 1,001 calls)
    assert sorted(calls) == [(0, 1000), (20_000, 1), (50_000, 1), (80_000, 1)]


def test_read_scatter_respects_iov_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, data = _payload(tmp_path, 3000)
    monkeypatch.setattr(_buffers, "_IOV_MAX", 7)
    bufs = [bytearray(1) for _ in range(3000)]
    fd = os.open(p, os.O_RDONLY)
    try:
        read_scatter(fd, [(i, memoryview(b)) for i, b in enumerate(bufs)])
    finally:
        os.close(fd)
    assert b"".join(bufs) == data


def test_read_scatter_survives_short_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, data = _payload(tmp_path, 5000)
    real = os.preadv

    def stingy(fd: int, bufs: list[memoryview], offset: int) -> int:
        # Return at most 333 bytes per call, as a signal-interrupted or network read may.
        budget, trimmed = 333, []
        for b in bufs:
            if budget <= 0:
                break
            trimmed.append(b[:budget])
            budget -= len(trimmed[-1])
        return real(fd, trimmed, offset)

    monkeypatch.setattr(_buffers.os, "preadv", stingy)
    bufs = [bytearray(n) for n in (1, 500, 1499, 3000)]
    targets, off = [], 0
    for b in bufs:
        targets.append((off, memoryview(b)))
        off += len(b)
    fd = os.open(p, os.O_RDONLY)
    try:
        read_scatter(fd, targets)
    finally:
        os.close(fd)
    assert b"".join(bufs) == data


def test_read_scatter_past_end_of_file_is_a_file_size_error(tmp_path: Path) -> None:
    p, _ = _payload(tmp_path, 100)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(FileSizeError, match=r"blob.bin: expected 50 bytes at offset 80 .* ended after 20"):
            read_scatter(fd, [(80, memoryview(bytearray(50)))], source=str(p))
    finally:
        os.close(fd)


def test_anon_buffer_is_writable_zeroed_and_kept_alive_by_tensors() -> None:
    buf = anon_buffer(8 << 20)
    assert len(buf) == 8 << 20 and not buf.readonly
    t = torch.frombuffer(buf, dtype=torch.int32, count=4, offset=4096)
    del buf
    assert t.tolist() == [0, 0, 0, 0]
    t += 7  # still mapped after the last Python reference to the buffer is gone
    assert t.tolist() == [7, 7, 7, 7]
    assert len(anon_buffer(0)) == 0


@pytest.mark.parametrize("backend", ["pread", "eager"])
def test_many_small_and_a_few_large_tensors_round_trip(tmp_path: Path, backend: str) -> None:
    # Exercises coalescing (500 small tensors) and chunked parallel reads (tensors > 16 MiB).
    g = torch.Generator().manual_seed(0)
    tensors = {f"s{i:03d}": torch.randn(i % 7, generator=g) for i in range(500)}
    tensors["big"] = torch.randn(5_000_000, generator=g)  # 20 MB
    tensors["half"] = torch.randn(9_000_001, generator=g).half()
    p = tmp_path / "m.safetensors"
    torchst.save_file(tensors, p)
    loaded = torchst.load_file(p, backend=backend)
    assert list(loaded) == list(torchst.safe_open(p).offset_keys())
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    with torchst.safe_open(p, backend=backend) as f:
        assert torch.equal(f.get_tensor("big"), tensors["big"])


def test_save_through_a_pipe_and_a_raw_file_match_the_reference(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from torchst.format.writer import plan_write, write_tensors

    tensors = {"a": torch.arange(10, dtype=torch.int16), "b": torch.ones(3, 5), "c": torch.zeros(0)}
    expected = safetensors_torch.save(tensors)
    plan = plan_write(tensors)
    r, w = os.pipe()
    with os.fdopen(w, "wb") as pipe_out:
        write_tensors(pipe_out, plan)  # not seekable: plain buffered writes
    with os.fdopen(r, "rb") as pipe_in:
        assert pipe_in.read() == expected
    raw = tmp_path / "raw.safetensors"
    with open(raw, "wb", buffering=0) as f:
        write_tensors(f, plan)  # an unbuffered FileIO: writev straight from tensor memory
        f.write(b"tail")  # the file position is right after the tensors
    assert raw.read_bytes() == expected + b"tail"
