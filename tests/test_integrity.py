"""Per-tensor checksums: the record, hashing while writing, verify=True on every load path."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import torchst
from torchst.errors import FileSizeError, FormatError, IntegrityError, ShardIndexError
from torchst.format.checksum import (
    CHECKSUM_KEY,
    checksum_metadata,
    combine_pieces,
    crc32c,
    crc32c_combine,
    read_checksums,
    verify_file,
)
from torchst.format.writer import plan_write, write_tensors


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 16, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.count": torch.arange(5, dtype=torch.int32),
        "d.empty": torch.empty(0, 3),
        "e.half": torch.randn(3, 3, generator=g).half(),
    }


def where(path: Path | str, name: str) -> tuple[int, int]:
    """Absolute file byte range of tensor ``name``."""
    with torchst.safe_open(path) as f:
        info = f.header.tensors[name]
        return f.header.data_start + info.begin, f.header.data_start + info.end


def flip(path: Path | str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def header_json(path: Path | str) -> dict[str, object]:
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


# -- the record ------------------------------------------------------------------------


def test_crc32c_is_the_castagnoli_checksum() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0
    assert crc32c(b"world", crc32c(b"hello ")) == crc32c(b"hello world")


def test_record_lists_every_tensor_and_reference_reads_the_file(tmp_path: Path) -> None:
    t = tensors()
    path = tmp_path / "m.safetensors"
    torchst.save_file(t, path, metadata={"note": "x"}, checksums=True)
    md = header_json(path)["__metadata__"]
    assert isinstance(md, dict) and md["note"] == "x"
    record = json.loads(md[CHECKSUM_KEY])
    assert record["algorithm"] == "crc32c" and len(record["header"]) == 8
    for name, value in t.items():
        data = value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b""
        assert record["tensors"][name] == f"{crc32c(data):08x}", name
    loaded = safetensors.torch.load_file(path)  # the reference reads it like any other file
    assert set(loaded) == set(t) and all(torch.equal(loaded[k], v) for k, v in t.items())


def test_save_file_without_checksums_is_byte_identical_to_reference(tmp_path: Path) -> None:
    t = tensors()
    torchst.save_file(t, tmp_path / "ours.safetensors", metadata={"k": "v"})
    safetensors.torch.save_file(t, tmp_path / "ref.safetensors", metadata={"k": "v"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # with checksums only the metadata entry differs: same data bytes, same tensor entries
    torchst.save_file(t, tmp_path / "sum.safetensors", metadata={"k": "v"}, checksums=True)
    a, b = header_json(tmp_path / "sum.safetensors"), header_json(tmp_path / "ref.safetensors")
    md = a["__metadata__"]
    assert isinstance(md, dict)
    md.pop(CHECKSUM_KEY)
    assert a == b
    ours, ref = (tmp_path / "sum.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    assert ours[-2000:] == ref[-2000:]


def test_every_write_route_gives_the_same_bytes(tmp_path: Path) -> None:
    t = tensors()
    torchst.save_file(t, tmp_path / "f.safetensors", checksums=True)
    expected = (tmp_path / "f.safetensors").read_bytes()
    assert torchst.save(t, checksums=True) == expected
    buf = io.BytesIO()  # seekable, no descriptor: header patched through seek
    crcs = write_tensors(buf, plan_write(t, checksums=True))
    assert buf.getvalue() == expected and crcs is not None and len(crcs) == len(t)
    staged = io.BytesIO()  # the accelerator path: hashed in the staging buffer
    write_tensors(staged, plan_write(t, checksums=True), staging_bytes=24, stage_all=True)
    assert staged.getvalue() == expected
    r, w = os.pipe()  # cannot seek back: hashed ahead, header written once
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(r, "rb").read()))
    reader.start()
    with os.fdopen(w, "wb") as pipe:
        write_tensors(pipe, plan_write(t, checksums=True))
    reader.join()
    assert got[0] == expected
    # a descriptor at a non-zero position: the header is patched where it was written
    with open(tmp_path / "off.bin", "wb") as f:
        f.write(b"PREFIX")
        write_tensors(f, plan_write(t, checksums=True))
    assert (tmp_path / "off.bin").read_bytes() == b"PREFIX" + expected


def test_tensors_split_across_writes_hash_and_write_like_whole_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large tensors go out in WRITEV_BYTES pieces, each hashed right before it is written: the
    # recorded CRC chains over the pieces, and small tensors share a write with pieces of others.
    from torchst.format import writer

    monkeypatch.setattr(writer, "WRITEV_BYTES", 1000)
    t = {"big": torch.arange(2600, dtype=torch.float32), "odd": torch.arange(333, dtype=torch.int8), **tensors()}
    torchst.save_file(t, tmp_path / "ours.safetensors")
    safetensors.torch.save_file(t, tmp_path / "ref.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    torchst.save_file(t, tmp_path / "sum.safetensors", checksums=True)
    md = header_json(tmp_path / "sum.safetensors")["__metadata__"]
    assert isinstance(md, dict)
    record = json.loads(md[CHECKSUM_KEY])["tensors"]
    assert record == {n: f"{crc32c(v.contiguous().view(torch.uint8).numpy().tobytes()):08x}" for n, v in t.items()}
    monkeypatch.undo()
    torchst.save_file(t, tmp_path / "whole.safetensors", checksums=True)
    assert (tmp_path / "sum.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_a_copied_record_is_never_carried_over(tmp_path: Path) -> None:
    t = tensors()
    torchst.save_file(t, tmp_path / "a.safetensors", checksums=True)
    with torchst.safe_open(tmp_path / "a.safetensors") as f:
        md = f.metadata()
    assert md is not None and CHECKSUM_KEY in md
    changed = {**t, "a.weight": t["a.weight"] + 1}
    torchst.save_file(changed, tmp_path / "b.safetensors", metadata=md)  # stale record dropped
    assert CHECKSUM_KEY not in (header_json(tmp_path / "b.safetensors")["__metadata__"] or {})  # type: ignore[operator]
    torchst.save_file(changed, tmp_path / "c.safetensors", metadata=md, checksums=True)  # replaced
    assert torch.equal(torchst.load_file(tmp_path / "c.safetensors", verify=True)["a.weight"], changed["a.weight"])


def test_default_saves_record_checksums_and_save_file_does_not(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    torchst.save_model(model, tmp_path / "m")
    torchst.save_model(model, tmp_path / "off", checksums=False)
    torchst.save_state_dict(model.state_dict(), tmp_path / "sd", max_shard_size=200)
    torchst.save_file(model.state_dict(), tmp_path / "plain.safetensors")
    assert verify_file(tmp_path / "m" / "model.safetensors").has_checksums
    assert not verify_file(tmp_path / "off" / "model.safetensors").has_checksums
    shards = sorted((tmp_path / "sd").glob("*.safetensors"))
    assert len(shards) > 1 and all(verify_file(p).has_checksums for p in shards)
    assert not verify_file(tmp_path / "plain.safetensors").has_checksums
    # user-facing metadata does not show the record
    with torchst.sharding.open_checkpoint(tmp_path / "m") as ckpt:
        assert CHECKSUM_KEY not in ckpt.metadata


# -- verification ----------------------------------------------------------------------


def test_clean_file_verifies_and_loads(tmp_path: Path) -> None:
    t = tensors()
    path = tmp_path / "m.safetensors"
    torchst.save_file(t, path, checksums=True)
    report = verify_file(path, chunk_bytes=100)  # many chunks, tensors split across them
    assert report.ok and report.has_checksums and report.tensors == len(t)
    for backend in ("mmap", "pread", "eager"):
        loaded = torchst.load_file(path, verify=True, backend=backend)
        assert all(torch.equal(loaded[k], v) for k, v in t.items())
    with torchst.safe_open(path, verify=True) as f:
        assert f.verifying
        assert torch.equal(f.get_slice("a.weight")[2:4], t["a.weight"][2:4])


@pytest.mark.parametrize("backend", ["mmap", "pread", "eager"])
def test_flipped_data_byte_is_caught_naming_tensor_and_range(tmp_path: Path, backend: str) -> None:
    t = tensors()
    path = tmp_path / "m.safetensors"
    torchst.save_file(t, path, checksums=True)
    start, end = where(path, "a.weight")
    flip(path, start + 100)
    assert torch.equal(torchst.load_file(path)["b.bias"], t["b.bias"])  # without verify: silent, as before
    with pytest.raises(IntegrityError) as e:
        torchst.load_file(path, verify=True, backend=backend)
    assert e.value.tensor == "a.weight" and e.value.byte_range == (start, end) and e.value.path == str(path)
    msg = str(e.value)
    assert str(path) in msg and "'a.weight'" in msg and f"{start:,}-{end:,}" in msg and "re-download" in msg
    assert isinstance(e.value, FormatError) and isinstance(e.value, ValueError)
    with torchst.safe_open(path, verify=True, backend=backend) as f:
        assert torch.equal(f.get_tensor("b.bias"), t["b.bias"])  # intact tensors still load
        with pytest.raises(IntegrityError, match="a.weight"):
            f.get_tensor("a.weight")
        with pytest.raises(IntegrityError, match="a.weight"):
            f.get_slice("a.weight")  # a slice is only trusted once the whole tensor was checked
    report = verify_file(path)
    assert not report.ok and [p.tensor for p in report.problems] == ["a.weight"]  # type: ignore[attr-defined]


def test_flipped_header_bytes_are_caught(tmp_path: Path) -> None:
    t = tensors()
    path = tmp_path / "m.safetensors"
    torchst.save_file(t, path, metadata={"format": "pt"}, checksums=True)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    value = json.loads(json.loads(header)["__metadata__"][CHECKSUM_KEY])["tensors"]["c.count"]
    other_value = f"{int(value, 16) ^ 1:08x}".encode()
    cases = {
        # same size, different meaning: only the header digest can tell
        "dtype": header.replace(b'"c.count":{"dtype":"I32"', b'"c.count":{"dtype":"F32"'),
        "metadata": header.replace(b'"format":"pt"', b'"format":"pu"'),
        # a recorded value altered: the tensor no longer matches it
        "record": header.replace(b'\\"c.count\\":\\"' + value.encode(), b'\\"c.count\\":\\"' + other_value),
        # a name altered inside the record: it no longer lists the file's tensors
        "name": header.replace(b'\\"a.weight\\"', b'\\"a.weighT\\"'),
    }
    for case, new in cases.items():
        assert new != header and len(new) == len(header), case
        bad = tmp_path / f"{case}.safetensors"
        bad.write_bytes(raw[:8] + new + raw[8 + n :])
        with pytest.raises(IntegrityError) as e:
            torchst.load_file(bad, verify=True)
        assert str(bad) in str(e.value), case
        assert not verify_file(bad).ok, case
        torchst.load_file(bad)  # without verify the file still loads (as before)
    with pytest.raises(IntegrityError, match="does not match its recorded crc32c"):
        torchst.load_file(tmp_path / "dtype.safetensors", verify=True)
    with pytest.raises(IntegrityError, match="'c.count'"):
        torchst.load_file(tmp_path / "record.safetensors", verify=True)
    # invalid JSON in the record, and an unknown algorithm
    broken = header.replace(b'{\\"algorithm', b'[\\"algorithm')
    (tmp_path / "json.safetensors").write_bytes(raw[:8] + broken + raw[8 + n :])
    with pytest.raises(IntegrityError, match="not valid JSON"):
        torchst.load_file(tmp_path / "json.safetensors", verify=True)
    other = header.replace(b'\\"crc32c\\"', b'\\"xxh64a\\"')
    (tmp_path / "algo.safetensors").write_bytes(raw[:8] + other + raw[8 + n :])
    with pytest.raises(IntegrityError, match="algorithm 'xxh64a'"):
        torchst.load_file(tmp_path / "algo.safetensors", verify=True)


def test_truncated_file_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    torchst.save_file(tensors(), path, checksums=True)
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(FileSizeError, match="truncated"):
        torchst.load_file(path, verify=True)
    report = verify_file(path)
    assert not report.ok and isinstance(report.problems[0], FileSizeError) and report.has_checksums


def test_file_without_checksums_loads_and_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = tensors()
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(t, path)
    with caplog.at_level(logging.WARNING, logger="torchst"):
        loaded = torchst.load_file(path, verify=True)
    assert all(torch.equal(loaded[k], v) for k, v in t.items())
    msgs = [r.getMessage() for r in caplog.records if "nothing could be checked" in r.getMessage()]
    assert len(msgs) == 1 and str(path) in msgs[0]
    report = verify_file(path)
    assert report.ok and not report.has_checksums


# -- sharded checkpoints and models ----------------------------------------------------


def sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    sd = {f"layer.{i}.weight": torch.randn(32, 32, generator=g) for i in range(4)}
    directory = tmp_path / "ckpt"
    res = torchst.save_state_dict(sd, directory, max_shard_size=4096 + 200)
    assert len(res.files) == 4
    return directory, sd


def test_sharded_load_verify_names_the_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory, sd = sharded(tmp_path)
    loaded = torchst.load_state_dict(directory, verify=True)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["layer.2.weight"]
    start, end = where(shard, "layer.2.weight")
    flip(shard, end - 1)
    for kwargs in ({}, {"backend": "pread"}, {"dtype": torch.float16}):
        with pytest.raises(IntegrityError) as e:
            torchst.load_state_dict(directory, verify=True, **kwargs)  # type: ignore[arg-type]
        assert e.value.path == str(shard) and e.value.tensor == "layer.2.weight" and e.value.byte_range == (start, end)
    torchst.load_state_dict(directory)  # without verify: loads (silently wrong), as before


def test_swapped_and_truncated_shards_are_caught(tmp_path: Path) -> None:
    directory, _ = sharded(tmp_path)
    files = sorted(directory.glob("model-*.safetensors"))
    a, b = files[0], files[1]
    assert a.stat().st_size == b.stat().st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(ShardIndexError, match=a.name):
        torchst.load_state_dict(directory, verify=True)
    a.write_bytes(data_a)
    b.write_bytes(data_b)
    os.truncate(b, b.stat().st_size - 1)
    with pytest.raises(FileSizeError, match=b.name):
        torchst.load_state_dict(directory, verify=True)


def test_load_model_verify(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    torchst.save_model(model, tmp_path / "m")
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    torchst.load_model(fresh, tmp_path / "m", verify=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    path = tmp_path / "m" / "model.safetensors"
    start, _ = where(path, "2.weight")
    flip(path, start)
    before = [p.clone() for p in fresh.parameters()]
    with pytest.raises(IntegrityError, match="'2.weight'"):
        torchst.load_model(fresh, tmp_path / "m", verify=True)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))  # the model was not touched
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(IntegrityError, match="'2.weight'"):
        torchst.load_model(meta, tmp_path / "m", verify=True)  # new tensors: the pread path


def test_read_checksums_absent_and_present(tmp_path: Path) -> None:
    torchst.save_file(tensors(), tmp_path / "a.safetensors", checksums=True)
    torchst.save_file(tensors(), tmp_path / "b.safetensors")
    with torchst.safe_open(tmp_path / "a.safetensors") as f:
        sums = read_checksums(f.header, source="a")
        assert sums is not None and set(sums.tensors) == set(tensors())
    with torchst.safe_open(tmp_path / "b.safetensors") as f:
        assert read_checksums(f.header, source="b") is None


def test_crc32c_combine_and_pieces_for_writers_that_place_bytes_themselves() -> None:
    data = bytes(range(256)) * 40 + b"tail"
    for cut in (0, 1, 7, 4096, len(data) - 1, len(data)):
        a, b = data[:cut], data[cut:]
        assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(data), cut
    cuts = [0, 100, 3000, 3001, len(data)]
    pieces = [(lo, hi - lo, crc32c(data[lo:hi])) for lo, hi in itertools.pairwise(cuts)]
    assert combine_pieces(reversed(pieces), len(data)) == crc32c(data)
    with pytest.raises(ValueError, match="uncovered or overlap"):
        combine_pieces(pieces[1:], len(data))
    with pytest.raises(ValueError, match="cover"):
        combine_pieces(pieces[:-1], len(data))


def test_checksum_metadata_builds_the_same_header_as_the_writer(tmp_path: Path) -> None:
    from torchst.format.header import build_header, encode_prefix

    t = {"a": torch.arange(4.0), "b": torch.arange(3, dtype=torch.int16)}
    path = tmp_path / "m.safetensors"
    torchst.save_file(t, path, metadata={"k": "v"}, checksums=True)
    entries = [("a", "F32", [4], 16), ("b", "I16", [3], 6)]
    crcs = [crc32c(t["a"].numpy().tobytes()), crc32c(t["b"].numpy().tobytes())]
    placeholder = build_header(entries, checksum_metadata({"k": "v"}, entries))
    final = build_header(entries, checksum_metadata({"k": "v"}, entries, crcs))
    assert len(placeholder) == len(final)  # the header can be overwritten in place
    raw = path.read_bytes()
    assert raw[: 8 + len(final)] == encode_prefix(final) + final


# -- training checkpoints ----------------------------------------------------------------


def _run(tmp_path: Path, steps: tuple[int, ...] = (1, 2, 3)) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    directory = tmp_path / "run"
    saved: dict[int, dict[str, torch.Tensor]] = {}
    with torchst.CheckpointManager(directory, keep_last=None) as mgr:
        for s in steps:
            torch.manual_seed(s)
            model = nn.Linear(32, 32)
            mgr.save(s, {"model": model, "step": s})
            saved[s] = {k: v.clone() for k, v in model.state_dict().items()}
    return directory, saved


def _model_file(directory: Path, step: int) -> Path:
    files = [p for p in (directory / f"step_{step}").rglob("*.safetensors") if "weight" in p.read_bytes()[:4096].decode("latin-1")]
    assert files, step
    return files[0]


def test_manager_steps_record_checksums_and_verify(tmp_path: Path) -> None:
    directory, _ = _run(tmp_path)
    mgr = torchst.CheckpointManager(directory, read_only=True)
    for s in mgr.steps():
        report = mgr.verify(s)
        assert report.ok and report.files and not report.unchecked, s
    off = tmp_path / "off"
    with torchst.CheckpointManager(off, checksums=False) as m:
        m.save(1, {"model": nn.Linear(2, 2)})
        assert m.verify(1).ok and m.verify(1).unchecked


def test_corrupted_newest_step_never_restores_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory, saved = _run(tmp_path)
    path = _model_file(directory, 3)
    start, end = where(path, "weight")
    flip(path, start + 5)
    mgr = torchst.CheckpointManager(directory, read_only=True)
    model = nn.Linear(32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IntegrityError) as e:
        mgr.restore({"model": model})
    msg = str(e.value)
    assert "step 3" in msg and str(path) in msg and "'weight'" in msg and "fallback=True" in msg
    assert e.value.tensor == "weight" and e.value.byte_range == (start, end)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing was loaded
    mgr.restore({"model": model}, verify=False)  # the caller asked for no check: loads the bad bytes
    assert not torch.equal(model.weight, saved[3]["weight"])
    with caplog.at_level(logging.WARNING, logger="torchst"):
        assert mgr.restore({"model": model}, fallback=True) == 2
    assert torch.equal(model.weight, saved[2]["weight"])
    assert any("step 3" in r.getMessage() and "restored step 2" in r.getMessage() for r in caplog.records)
    report = mgr.verify(3)
    assert not report.ok and [p.tensor for p in report.problems] == ["weight"]  # type: ignore[attr-defined]
    assert mgr.verify(2).ok
    # an explicit step is checked too; fallback looks only at steps below it
    with pytest.raises(IntegrityError, match="step 3"):
        mgr.restore({"model": model}, step=3)
    assert mgr.restore({"model": model}, step=2, fallback=True) == 2


def test_truncated_and_swapped_step_files_are_caught(tmp_path: Path) -> None:
    directory, _ = _run(tmp_path)
    mgr = torchst.CheckpointManager(directory, read_only=True)
    path3 = _model_file(directory, 3)
    os.truncate(path3, path3.stat().st_size - 1)
    with pytest.raises(torchst.CheckpointError, match=str(path3.parent.parent.name)):
        mgr.restore({"model": nn.Linear(32, 32)})
    assert not mgr.verify(3).ok and "bytes but the manifest says" in str(mgr.verify(3).problems[0])
    assert mgr.restore({"model": nn.Linear(32, 32)}, fallback=True) == 2
    # two files of equal size swapped between steps: same names and shapes, other bytes
    path1, path2 = _model_file(directory, 1), _model_file(directory, 2)
    assert path1.stat().st_size == path2.stat().st_size
    a, b = path1.read_bytes(), path2.read_bytes()
    path1.write_bytes(b)
    path2.write_bytes(a)
    with pytest.raises(IntegrityError, match="does not belong to step 2") as e:
        mgr.restore({"model": nn.Linear(32, 32)}, step=2)
    assert e.value.path == str(path2) and "step 2" in str(e.value)
    for s in (1, 2):
        problems = mgr.verify(s).problems
        assert len(problems) == 1 and "does not belong" in str(problems[0]), s
    with pytest.raises(torchst.CheckpointError, match="no intact step"):
        mgr.restore({"model": nn.Linear(32, 32)}, fallback=True)


def test_restore_of_a_step_without_checksums_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with torchst.CheckpointManager(tmp_path / "r", checksums=False) as mgr:
        mgr.save(1, {"model": nn.Linear(2, 2)})
        with caplog.at_level(logging.WARNING, logger="torchst"):
            assert mgr.restore({"model": nn.Linear(2, 2)}) == 1
    assert len([r for r in caplog.records if "nothing could be checked" in r.getMessage()]) == 1


# -- the command line --------------------------------------------------------------------


def test_cli_verify_lists_each_corrupted_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchst.cli import main

    directory, _ = sharded(tmp_path)
    assert main(["verify", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "every checksum matches" in out
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = ("layer.1.weight", "layer.3.weight")
    bad = [directory / index["weight_map"][n] for n in names]
    for shard, name in zip(bad, names):
        flip(shard, where(shard, name)[0])
    assert main(["verify", str(directory)]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CORRUPT")]
    assert len(lines) == 2 and "'layer.1.weight'" in lines[0] and "'layer.3.weight'" in lines[1]
    assert main(["verify", str(directory), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    problems = doc["checks"][0]["problems"]
    assert [p["tensor"] for p in problems] == ["layer.1.weight", "layer.3.weight"]
    assert problems[0]["path"] == str(bad[0]) and len(problems[0]["byte_range"]) == 2
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.ones(3)}, plain)
    assert main(["verify", str(plain)]) == 0
    assert "no checksums recorded" in capsys.readouterr().out


def test_cli_verify_run_directory_checks_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchst.cli import main

    directory, _ = _run(tmp_path)
    assert main(["verify", str(directory)]) == 0
    assert "3 of 3 committed step(s) OK" in capsys.readouterr().out
    path = _model_file(directory, 2)
    flip(path, where(path, "bias")[0])
    assert main(["verify", str(directory)]) == 1
    out = capsys.readouterr().out
    assert "step_2: CORRUPT" in out and "'bias'" in out and "damaged: [2]" in out
    assert main(["verify", str(directory / "step_2")]) == 1  # one step directory
    assert main(["verify", str(directory / "step_3")]) == 0
    capsys.readouterr()
    # inspect says whether checksums are there
    assert main(["inspect", str(directory / "step_3")]) == 0
    assert "crc32c checksums in every file" in capsys.readouterr().out
    torchst.save_file({"x": torch.ones(2)}, tmp_path / "p.safetensors")
    assert main(["inspect", str(tmp_path / "p.safetensors")]) == 0
    assert "no checksums" in capsys.readouterr().out


def test_compat_layer_writes_checksums_only_when_asked(tmp_path: Path) -> None:
    from torchst.compat.safetensors import torch as compat

    t = tensors()
    compat.save_file(t, tmp_path / "a.safetensors")
    safetensors.torch.save_file(t, tmp_path / "ref.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    compat.save_file(t, tmp_path / "b.safetensors", checksums=True)
    assert verify_file(tmp_path / "b.safetensors").has_checksums
    flip(tmp_path / "b.safetensors", where(tmp_path / "b.safetensors", "a.weight")[0])
    with pytest.raises(IntegrityError, match="a.weight"):
        compat.load_file(tmp_path / "b.safetensors", verify=True)
    model = nn.Linear(3, 3)
    compat.save_model(model, tmp_path / "m.safetensors", checksums=True)
    assert verify_file(tmp_path / "m.safetensors").has_checksums


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bench_integrity_quick_prints_its_lines(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_integrity.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(script.parents[1])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(r["bench"], r["impl"]) for r in records} == {
        ("save_checksums", "checksums"), ("save_checksums", "no_checksums"),
        ("verify_throughput", "verify"), ("verify_throughput", "plain_read"),
    }  # fmt: skip
    for r in records:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["ratio_vs_baseline"] > 0
    assert list(tmp_path.iterdir()) == []
