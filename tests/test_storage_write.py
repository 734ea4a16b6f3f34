"""The one write path: commits, preallocation, and write failures that name the user's path."""

from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as ref
import torch

import torchst
from torchst.errors import CheckpointError, TorchstError, WriteError
from torchst.storage import atomic, open_output


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(64, 1024, generator=g) for i in range(4)} | {"b": torch.arange(7)}


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_output_file_gathers_small_writes_and_keeps_large_ones_in_order(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    pieces = [b"h" * 10, b"x" * (1 << 20), b"y" * 3, memoryview(b"z" * 300_000), b"q"]
    with open_output(path, size=sum(len(p) for p in pieces)) as f:
        f.write(pieces[0])
        f.writev([memoryview(pieces[1]), memoryview(pieces[2])])
        f.write(pieces[3])
        f.write(pieces[4])
        assert f.tell() == sum(len(p) for p in pieces)
    assert path.read_bytes() == b"".join(bytes(p) for p in pieces)
    assert _listing(tmp_path) == ["out.bin"]


def test_replace_false_writes_the_path_itself_and_refuses_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "shard.bin"
    with open_output(path, replace=False) as f:
        f.write(b"abc")
    assert path.read_bytes() == b"abc"
    with pytest.raises(WriteError) as info, open_output(path, replace=False, shown_as="final.bin"):
        pass
    assert info.value.errno == errno.EEXIST and info.value.filename == "final.bin"
    assert path.read_bytes() == b"abc"


def test_save_file_is_byte_identical_and_preallocates_the_exact_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = atomic.preallocate

    def spy(fd: int, nbytes: int) -> bool:
        calls.append(nbytes)
        return real(fd, nbytes)

    monkeypatch.setattr(atomic, "delays_allocation", lambda fd: True)
    monkeypatch.setattr(atomic, "preallocate", spy)
    t = _tensors()
    torchst.save_file(t, tmp_path / "a.safetensors", metadata={"k": "v"})
    ref.save_file(t, tmp_path / "b.safetensors", metadata={"k": "v"})
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes()
    assert calls == [len(data)]


def test_save_file_on_a_full_disk_raises_write_error_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.ones(8)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(atomic, "writev_all", _no_space)
    with pytest.raises(WriteError) as info:
        torchst.save_file(_tensors(), path)
    e = info.value
    assert isinstance(e, OSError) and isinstance(e, TorchstError)
    assert e.errno == errno.ENOSPC and e.filename == str(path)
    assert (
        str(e)
        == f"{path}: cannot write: No space left on device (ENOSPC): the disk is full: free space or save to a larger volume"
    )
    assert ".tmp-" not in str(e)
    assert path.read_bytes() == before and _listing(tmp_path) == ["m.safetensors"]
    again = pickle.loads(pickle.dumps(e))  # crosses process boundaries intact
    assert type(again) is WriteError and again.errno == errno.ENOSPC and str(again) == str(e)


def test_preallocation_reports_a_full_disk_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrote: list[object] = []
    monkeypatch.setattr(atomic, "delays_allocation", lambda fd: True)
    monkeypatch.setattr(atomic, "preallocate", _no_space)
    monkeypatch.setattr(atomic, "writev_all", lambda fd, views: wrote.append(views))
    path = tmp_path / "m.safetensors"
    with pytest.raises(
        WriteError, match=r"m\.safetensors: cannot write 1,048,\d{3} bytes: No space left .*bytes free\)"
    ):
        torchst.save_file({"w": torch.zeros(1 << 18)}, path)
    assert wrote == [] and _listing(tmp_path) == []


def test_save_state_dict_single_file_and_sharded_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _tensors(1)
    d = tmp_path / "ckpt"
    torchst.save_state_dict(old, d, max_shard_size="300KB")
    before = _listing(d)
    monkeypatch.setattr(atomic, "writev_all", _no_space)
    with pytest.raises(WriteError) as info:
        torchst.save_state_dict(_tensors(2), d, max_shard_size="300KB")
    assert info.value.errno == errno.ENOSPC
    # the shard's final name, not the hidden temporary it was being written to
    assert os.path.dirname(info.value.filename) == str(d)
    assert os.path.basename(info.value.filename).startswith("model-0000")
    assert ".tmp-" not in str(info.value)
    assert _listing(d) == before
    loaded = torchst.load_state_dict(d)
    assert all(torch.equal(loaded[k], v) for k, v in old.items())
    single = tmp_path / "one.safetensors"
    with pytest.raises(WriteError, match=f"^{single}: cannot write: No space left"):
        torchst.save_state_dict(_tensors(), single)
    assert not single.exists()


def test_permission_denied_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open
    locked = tmp_path / "locked"
    locked.mkdir()

    def denied(path: str, flags: int, mode: int = 0o777, **kw: object) -> int:
        if os.path.dirname(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(atomic.os, "open", denied)
    target = locked / "m.safetensors"
    with pytest.raises(WriteError, match=f"^{target}: cannot write: Permission denied .EACCES.") as info:
        torchst.save_file({"w": torch.ones(2)}, target)
    assert info.value.errno == errno.EACCES and info.value.filename == str(target)
    assert isinstance(info.value, PermissionError) is False and isinstance(info.value, OSError)


def _save_as_unprivileged(directory: str, conn: Any) -> None:
    # Root ignores directory permissions: the forked child drops to "nobody" first.
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    out = []
    for call in (
        lambda: torchst.save_file({"w": torch.ones(2)}, os.path.join(directory, "m.safetensors")),
        lambda: torchst.save_state_dict({"w": torch.ones(2)}, os.path.join(directory, "ckpt")),
    ):
        try:
            call()
            out.append(None)
        except Exception as e:  # noqa: BLE001 (reported to the parent, which asserts the type)
            out.append((type(e).__name__, getattr(e, "errno", None), getattr(e, "filename", None), str(e)))
    conn.send(out)
    conn.close()


@pytest.mark.multiprocess
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    tmp_path.chmod(0o755)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_save_as_unprivileged, args=(str(ro), child))
    proc.start()
    got = parent.recv()
    proc.join(60)
    ro.chmod(0o700)
    single, sharded = got
    assert single[:3] == ("WriteError", errno.EACCES, str(ro / "m.safetensors"))
    assert single[3].startswith(f"{ro / 'm.safetensors'}: cannot write: Permission denied (EACCES)")
    assert sharded[:3] == ("WriteError", errno.EACCES, str(ro / "ckpt"))
    assert _listing(ro) == []


def test_manager_reports_the_underlying_cause_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = torchst.CheckpointManager(tmp_path / "run")
    mgr.save(1, {"extra": {"w": torch.ones(4)}})
    monkeypatch.setattr(atomic, "writev_all", _no_space)
    with pytest.raises(CheckpointError) as info:
        mgr.save(2, {"extra": {"w": torch.ones(1 << 16)}})
    msg = str(info.value)
    assert "saving step 2 failed: No space left on device (ENOSPC): the disk is full" in msg
    assert msg.count("No space left") == 1 and "earlier checkpoints are intact (steps [1])" in msg
    assert mgr.steps() == [1]
