"""Readers see one whole checkpoint while a writer re-saves it: never a mix, only torchst errors."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import torchst
from torchst.errors import CheckpointChangedError, CheckpointError, ShardIndexError
from torchst.sharding import checkpoint as ck
from torchst.sharding import io as sio
from torchst.sharding import load_state_dict, open_checkpoint, save_state_dict

N = 8


def generation(gen: int, *, dtype: torch.dtype = torch.float32, width: int = 64) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((width,), float(gen), dtype=dtype) for i in range(N)}


def save(directory: Path, gen: int, shards: int, **kw: Any) -> None:
    """``shards`` shards of generation ``gen`` (1 = a single model.safetensors)."""
    tensors = generation(gen, **kw)
    per = next(iter(tensors.values())).nbytes * (N // shards)
    save_state_dict(tensors, directory, max_shard_size=None if shards == 1 else per)
    expected = 1 if shards == 1 else shards
    assert len(open_checkpoint(directory).files) == expected


def generations(sd: dict[str, torch.Tensor]) -> set[float]:
    assert sorted(sd) == [f"t{i}" for i in range(N)]
    return {v for t in sd.values() for v in t.float().unique().tolist()}


class _Stop(BaseException):
    """Ends the writer midway, as a kill would (BaseException: nothing catches it)."""


@contextmanager
def after_index_read(action: Callable[[], None]) -> Iterator[list[int]]:
    """Run ``action`` once, right after a reader has read the index and before it opens a shard."""
    real = ck.ShardIndex.parse
    calls = [0]

    def parse(text: str | bytes, *, source: str = "<index>") -> ck.ShardIndex:
        out = real(text, source=source)
        calls[0] += 1
        if calls[0] == 1:
            action()
        return out

    ck.ShardIndex.parse = parse  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        ck.ShardIndex.parse = real  # type: ignore[method-assign]


def half_save(directory: Path, gen: int, shards: int, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """A re-save stopped after replacing half of the final shard names."""

    def run() -> None:
        real = sio._link_over
        done = [0]

        def link_over(src: str, dst: str) -> None:
            if done[0] == shards // 2:
                raise _Stop
            real(src, dst)
            done[0] += 1

        monkeypatch.setattr(sio, "_link_over", link_over)
        try:
            save(directory, gen, shards)
        except _Stop:
            pass
        finally:
            monkeypatch.setattr(sio, "_link_over", real)

    return run


@pytest.mark.parametrize("backend", ["mmap", "pread", "eager"])
def test_reader_between_shard_replacements_never_mixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    save(tmp_path, 0, 4)
    with after_index_read(half_save(tmp_path, 1, 4, monkeypatch)) as calls:
        sd = load_state_dict(tmp_path, backend=backend)
    assert calls[0] >= 2  # the reader saw the index change and started again
    assert generations(sd) == {1.0}  # the transitional index: every tensor of the new save
    assert generations(load_state_dict(tmp_path)) == {1.0}
    save(tmp_path, 2, 4)  # the stopped save's leftovers do not disturb the next one
    assert generations(load_state_dict(tmp_path)) == {2.0}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 4), (4, 1), (1, 4), (1, 1), (4, 4)])
def test_reader_overtaken_by_whole_saves_gets_the_new_checkpoint(tmp_path: Path, before: int, after: int) -> None:
    # Between the reader's index read and its shard opens, a whole save (old files deleted
    # included) lands: the reader must start again, not blame a missing shard or mix.
    save(tmp_path, 0, before)
    real = ck._build
    calls = []

    def build(*args: Any) -> ck.Checkpoint:
        calls.append(1)
        if len(calls) == 1:
            save(tmp_path, 1, after)
        return real(*args)

    ck._build = build  # type: ignore[assignment]
    try:
        sd = load_state_dict(tmp_path, backend="pread")
    finally:
        ck._build = real  # type: ignore[assignment]
    assert generations(sd) == {1.0}
    assert len(calls) >= 3  # the reader, the save helper's own check, the reader again


def test_open_checkpoint_keeps_the_snapshot_it_advertised(tmp_path: Path) -> None:
    save(tmp_path, 7, 4)
    with open_checkpoint(tmp_path) as ckpt:
        # Replaced under the open checkpoint: same names, other dtype, other shape, other values.
        save(tmp_path, 3, 4, dtype=torch.bfloat16, width=96)
        for backend in ("mmap", "pread", "eager"):
            sd = ckpt.load(backend=backend)
            assert {t.dtype for t in sd.values()} == {torch.float32}, backend
            assert {tuple(t.shape) for t in sd.values()} == {(64,)}, backend
            assert generations(sd) == {7.0}, backend
        cast = ckpt.load(dtype=torch.float64)
        assert {t.dtype for t in cast.values()} == {torch.float64} and generations(cast) == {7.0}
        with ckpt.open_file(ckpt.files[0], backend="pread") as f:
            assert f.get_tensor(f.keys()[0]).dtype == torch.float32
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.load()
    fresh = load_state_dict(tmp_path)
    assert {t.dtype for t in fresh.values()} == {torch.bfloat16} and generations(fresh) == {3.0}


def test_single_file_snapshot_survives_replacement(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.arange(4.0)}, path)
    with open_checkpoint(path) as ckpt:
        torchst.save_file({"w": torch.zeros(9, dtype=torch.int8)}, path)
        assert torch.equal(ckpt.load(backend="pread")["w"], torch.arange(4.0))
        assert torch.equal(ckpt.load()["w"], torch.arange(4.0))


def test_mmap_loads_do_not_share_memory(tmp_path: Path) -> None:
    save(tmp_path, 1, 2)
    with open_checkpoint(tmp_path) as ckpt:
        a = ckpt.load()
        a["t0"].add_(5)
        assert generations(ckpt.load()) == {1.0}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_descriptor_leaks(tmp_path: Path) -> None:
    save(tmp_path, 1, 4)
    load_state_dict(tmp_path)
    before = _open_fds()
    for i in range(200):
        if i % 3 == 0:
            with open_checkpoint(tmp_path) as ckpt:
                ckpt.load(backend="pread")
        elif i % 3 == 1:
            open_checkpoint(tmp_path).load()  # dropped without close(): released when collected
        else:
            load_state_dict(tmp_path, backend="eager")
    with pytest.raises(ShardIndexError):
        load_state_dict(tmp_path / "model.safetensors.index.json", trusted_roots=None) if False else _broken(tmp_path)
    assert _open_fds() == before


def _broken(tmp_path: Path) -> None:
    os.unlink(tmp_path / "model-00002-of-00004.safetensors")
    load_state_dict(tmp_path)


def test_a_writer_that_never_pauses_gets_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, 1, 2)
    from torchst.sharding import anchor

    monkeypatch.setattr(ck, "_unchanged", lambda source, anchor: False)
    monkeypatch.setattr(anchor.time, "sleep", lambda s: None)
    with pytest.raises(CheckpointChangedError, match=r"changed 10 times while it was being opened; a writer is re-sav"):
        load_state_dict(tmp_path)


def test_missing_shard_without_a_writer_is_reported_as_is(tmp_path: Path) -> None:
    save(tmp_path, 1, 4)
    os.unlink(tmp_path / "model-00003-of-00004.safetensors")
    with pytest.raises(ShardIndexError, match=r"'model-00003-of-00004.safetensors' .* is missing .* incomplete"):
        load_state_dict(tmp_path)


def test_index_naming_model_safetensors_is_retargeted_before_overwrite(tmp_path: Path) -> None:
    # A foreign index that keeps its tensors in "model.safetensors": a single-file re-save must
    # not overwrite that name while the index still reads from it.
    torchst.save_file(generation(0), tmp_path / "model.safetensors")
    index = ck.ShardIndex.build(dict.fromkeys(generation(0), "model.safetensors"), 8 * 256)
    (tmp_path / "model.safetensors.index.json").write_text(index.to_json())
    seen: list[set[float]] = []
    real = sio._link_over

    def link_over(src: str, dst: str) -> None:
        seen.append(generations(load_state_dict(tmp_path)))  # a reader just before the overwrite
        real(src, dst)
        seen.append(generations(load_state_dict(tmp_path)))  # and just after

    sio._link_over = link_over  # type: ignore[assignment]
    try:
        save(tmp_path, 1, 1)
    finally:
        sio._link_over = real  # type: ignore[assignment]
    assert seen == [{1.0}, {1.0}]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


# -- many processes ----------------------------------------------------------------------

READERS = ("mmap", "pread", "eager", "safe_open")
SHARD_CYCLES = {"reused": (4,), "new": (4, 2, 1, 8, 2)}


def _writer(directory: str, mode: str, stop: Any, gens: Any) -> None:
    cycle = SHARD_CYCLES[mode]
    gen = 1
    while not stop.is_set():
        # Odd generations are bf16 and wider: bytes read with another save's header would show.
        kw: dict[str, Any] = {"dtype": torch.bfloat16, "width": 96} if gen % 2 else {}
        tensors = generation(gen, **kw)
        shards = cycle[gen % len(cycle)]
        per = next(iter(tensors.values())).nbytes * (N // shards)
        save_state_dict(tensors, directory, max_shard_size=None if shards == 1 else per)
        gens.value = gen
        gen += 1


def _reader(directory: str, kind: str, seconds: float, out: Any) -> None:
    loads, mixed, errors, samples = 0, 0, {}, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if kind == "safe_open":
                sd = {}
                with open_checkpoint(directory) as ckpt:
                    for path in ckpt.files:
                        with ckpt.open_file(path) as f:
                            sd.update((n, f.get_tensor(n)) for n in f)
            else:
                sd = load_state_dict(directory, backend=kind)
            values = {v for t in sd.values() for v in t.float().unique().tolist()}
            shapes = {(t.dtype, tuple(t.shape)) for t in sd.values()}
            loads += 1
            if sorted(sd) != [f"t{i}" for i in range(N)] or len(values) != 1 or len(shapes) != 1:
                mixed += 1
                samples.append(f"{sorted(sd)} {sorted(values)} {shapes}")
        except Exception as e:  # noqa: BLE001 - every kind of failure is counted and judged below
            name = type(e).__name__ + ("" if isinstance(e, torchst.TorchstError) else " (not a torchst error)")
            errors[name] = errors.get(name, 0) + 1
            if not isinstance(e, torchst.TorchstError):
                samples.append(f"{name}: {e}")
    out.put((kind, loads, mixed, errors, samples[:3]))


def _stress(tmp_path: Path, mode: str, seconds: float, per_kind: int) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    directory = str(tmp_path / "ckpt")
    save_state_dict(generation(0), directory, max_shard_size=256 * 2)
    stop, gens, out = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    writer = ctx.Process(target=_writer, args=(directory, mode, stop, gens))
    readers = [ctx.Process(target=_reader, args=(directory, k, seconds, out)) for k in READERS for _ in range(per_kind)]
    writer.start()
    for r in readers:
        r.start()
    try:
        results = [out.get(timeout=seconds + 120) for _ in readers]
        stop.set()
        writer.join(60)
        for r in readers:
            r.join(60)
    finally:
        for p in [writer, *readers]:
            if p.is_alive():
                p.kill()
    assert writer.exitcode == 0
    report = "\n".join(map(str, results))
    assert gens.value >= 3, f"the writer saved only {gens.value} times\n{report}"
    for kind, loads, mixed, errors, samples in results:
        assert mixed == 0, f"{kind}: {mixed} mixed loads, e.g. {samples}\n{report}"
        assert not any("not a torchst error" in e for e in errors), f"{kind}: {errors} {samples}\n{report}"
        assert loads > 0, f"{kind}: no load succeeded ({errors})\n{report}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", sorted(SHARD_CYCLES))
def test_stress_readers_during_resaves(tmp_path: Path, mode: str) -> None:
    _stress(tmp_path, mode, seconds=1.5, per_kind=1)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", sorted(SHARD_CYCLES))
def test_stress_readers_during_resaves_long(tmp_path: Path, mode: str) -> None:
    _stress(tmp_path, mode, seconds=20, per_kind=2)


@pytest.mark.multiprocess
def test_forked_child_reads_after_the_parent_used_the_io_pool(tmp_path: Path) -> None:
    import multiprocessing as mp

    from torchst.storage.buffers import io_pool

    save(tmp_path, 5, 2)
    io_pool().submit(lambda: None).result()  # the parent's pool threads exist; a child has none
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=lambda: out.put(sorted(generations(load_state_dict(tmp_path, backend="pread")))))
    child.start()
    try:
        assert out.get(timeout=60) == [5.0]
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize(("before", "after"), [(4, 2), (4, 4), (1, 4), (4, 1)])
def test_header_only_resolve_retries_a_resave(tmp_path: Path, before: int, after: int) -> None:
    # torchst.resolve (inspect, verify) reads headers without torch; a save landing between its
    # index read and its header reads must not look like a damaged checkpoint.
    import torchst.resolve as tr

    save(tmp_path, 0, before)
    real = tr._checkpoint_plan
    calls = []

    def plan(path: str, *args: Any) -> Any:
        out = real(path, *args)
        calls.append(1)
        if len(calls) == 1:
            save(tmp_path, 1, after)
        return out

    tr._checkpoint_plan = plan  # type: ignore[assignment]
    try:
        layout = tr.resolve(tmp_path)
    finally:
        tr._checkpoint_plan = real  # type: ignore[assignment]
    assert len(calls) == 2
    assert layout.kind == ("file" if after == 1 else "sharded") and len(layout.files) == after
    assert sorted(layout.parts[0].tensors) == [f"t{i}" for i in range(N)]


def test_header_only_resolve_gives_up_on_a_writer_that_never_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchst.resolve as tr
    from torchst.sharding import anchor

    save(tmp_path, 1, 2)
    monkeypatch.setattr(anchor.HeldAnchor, "unchanged", lambda self, source: False)
    monkeypatch.setattr(anchor.time, "sleep", lambda s: None)
    with pytest.raises(CheckpointChangedError, match="changed 10 times"):
        tr.resolve(tmp_path)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i in range(N):
            self.register_buffer(f"t{i}", torch.zeros(64))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_load_model_reads_one_snapshot_and_releases_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(tmp_path, 0, 4)
    net = _Net()
    torchst.load_model(net, tmp_path)
    before = _open_fds()
    with after_index_read(half_save(tmp_path, 1, 4, monkeypatch)):
        torchst.load_model(net, tmp_path)
    assert generations(net.state_dict()) == {1.0}
    wrong = _Net()
    wrong.t0 = torch.zeros(3)
    with pytest.raises(CheckpointError, match="size mismatch"):
        torchst.load_model(wrong, tmp_path)  # fails after opening, before reading
    assert _open_fds() == before


def test_load_model_follows_trusted_roots(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", 3, 2)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = tmp_path / "ckpt" / "model-00001-of-00002.safetensors"
    os.replace(shard, outside / "s.safetensors")
    os.symlink(outside / "s.safetensors", shard)
    with pytest.raises(ShardIndexError, match="symbolic link"):
        torchst.load_model(_Net(), tmp_path / "ckpt")
    net = _Net()
    torchst.load_model(net, tmp_path / "ckpt", trusted_roots=[outside])
    assert generations(net.state_dict()) == {3.0}
