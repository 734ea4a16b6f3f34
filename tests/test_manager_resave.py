"""Re-saving a step never hides it, and readers read one whole copy of it.

The kill tests use a helper process that imports torch once and forks one child per
scenario; each child re-saves step 5 and SIGKILLs itself at a chosen moment of the commit.
Run as a script (``python tests/test_manager_resave.py serve``) it is that helper.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from torchst import CheckpointManager
from torchst.errors import CheckpointChangedError, CheckpointError
from torchst.manager import layout, reading


def state(generation: int) -> dict[str, Any]:
    model = torch.nn.Linear(16, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(generation)
    return {"model": model, "extra": {"moment": torch.full((64,), float(generation)), "generation": generation}}


def generation_of(mgr: CheckpointManager, step: int | None = 5) -> int:
    """Restore into fresh objects; every tensor and value must come from one save."""
    target = state(-1)
    mgr.restore(target, step=step, restore_rng=False)
    gens = {int(v) for p in target["model"].parameters() for v in p.detach().flatten().tolist()}
    gens |= {int(v) for v in target["extra"]["moment"].tolist()} | {target["extra"]["generation"]}
    assert len(gens) == 1, f"a mix of saves: {gens}"
    return gens.pop()


# -- the child: re-save step 5 and die at the chosen moment ------------------------------


def _arm(point: str, n: int, after: bool) -> None:
    calls = {"n": 0}

    def wrap(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def patched(*args: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == n and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kw)
            if calls["n"] == n and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(owner, name, patched)

    if point == "exchange":
        wrap(layout, "exchange")
    elif point == "rename":
        wrap(os, "rename")
    elif point == "unlink":  # deleting the previous copy
        wrap(os, "unlink")
    else:
        raise ValueError(point)


def child(directory: str, fallback: bool, point: str, n: int, after: bool) -> None:
    if fallback:
        layout._renameat2 = None
    mgr = CheckpointManager(directory, keep_last=None)
    mgr.save(4, state(4))
    mgr.save(5, state(1))
    _arm(point, n, after)
    mgr.save(5, state(2))
    os._exit(0)


def serve() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(**job)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}), flush=True)


# -- the test side -----------------------------------------------------------------------

SCENARIOS = [
    # (fallback, point, n, after, the copy a reader must find: 1 = old, 2 = new)
    (False, "exchange", 1, False, 1),  # before the atomic exchange
    (False, "exchange", 1, True, 2),  # after it, before the old copy is deleted
    (False, "unlink", 2, False, 2),  # while the old copy is being deleted
    (True, "rename", 1, False, 1),  # fallback: before moving the old copy aside
    (True, "rename", 1, True, 1),  # between the two renames: step_5 does not exist
    (True, "rename", 2, True, 2),  # after the commit rename, before the old copy is deleted
    (True, "unlink", 2, False, 2),
]


def _exchange_supported(tmp_path: Path) -> bool:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        return layout.exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    finally:
        os.rmdir(tmp_path / "a")
        os.rmdir(tmp_path / "b")


@pytest.mark.multiprocess
def test_a_reader_finds_step_n_after_a_kill_at_every_moment_of_a_resave(tmp_path: Path) -> None:
    scenarios = SCENARIOS if _exchange_supported(tmp_path) else [s for s in SCENARIOS if s[0]]
    jobs = [
        {"directory": str(tmp_path / f"run{i}"), "fallback": fb, "point": point, "n": n, "after": after}
        for i, (fb, point, n, after, _) in enumerate(scenarios)
    ]
    proc = subprocess.run(
        [sys.executable, __file__, "serve"],
        input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(jobs), proc.stderr
    for job, result, (_, _, _, _, want) in zip(jobs, results, scenarios):
        assert result["signal"] == signal.SIGKILL, (job, proc.stderr)  # it died where it was told to
        reader = CheckpointManager(job["directory"], read_only=True)
        assert reader.steps() == [4, 5], job
        assert reader.latest_step() == 5
        assert generation_of(reader, None) == want, job  # the latest is step 5, never step 4
        writer = CheckpointManager(job["directory"], keep_last=None)  # cleans up what the kill left
        assert writer.steps() == [4, 5] and generation_of(writer) == want, job
        assert sorted(os.listdir(job["directory"])) == [".lock", "step_4", "step_5"], job
        writer.save(5, state(3))
        assert generation_of(reader) == 3
        writer.close()


def test_readers_see_step_n_at_every_moment_of_a_fallback_resave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "_renameat2", None)
    writer = CheckpointManager(tmp_path, keep_last=None)
    writer.save(4, state(4))
    writer.save(5, state(1))
    reader = CheckpointManager(tmp_path, read_only=True)
    seen: list[int] = []
    real = os.rename

    def observed(src: Any, dst: Any) -> None:
        seen.append(generation_of(reader, None))
        real(src, dst)
        seen.append(generation_of(reader, None))

    monkeypatch.setattr(os, "rename", observed)
    writer.save(5, state(2))
    monkeypatch.setattr(os, "rename", real)
    assert seen == [1, 1, 1, 2]  # before, between and after the two renames: always step 5


def test_a_reader_whose_step_is_replaced_while_opening_reads_the_new_copy_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CheckpointManager(tmp_path, keep_last=None)
    writer.save(5, state(1))
    reader = CheckpointManager(tmp_path, read_only=True)
    real = reading.parse_manifest
    calls = {"n": 0}

    def resave_after_the_manifest_was_read(*args: Any) -> Any:
        out = real(*args)
        calls["n"] += 1
        if calls["n"] == 1:  # the reader holds the old directory and its manifest; its files vanish now
            writer.save(5, state(2))
        return out

    monkeypatch.setattr(reading, "parse_manifest", resave_after_the_manifest_was_read)
    assert generation_of(reader) == 2
    assert calls["n"] >= 2  # it noticed and opened the step again


def test_a_step_replaced_on_every_attempt_raises_checkpoint_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CheckpointManager(tmp_path, keep_last=None)
    writer.save(5, state(1))
    reader = CheckpointManager(tmp_path, read_only=True)
    real = reading.parse_manifest
    generation = {"n": 1}

    def always_replaced(*args: Any) -> Any:
        out = real(*args)
        generation["n"] += 1
        writer.save(5, state(generation["n"]))
        return out

    monkeypatch.setattr(reading, "parse_manifest", always_replaced)
    monkeypatch.setattr(reading, "_BACKOFF_S", 0.0)
    with pytest.raises(CheckpointChangedError) as info:
        reader.restore(state(0))
    assert str(info.value) == (
        f"{tmp_path}: step (latest) was replaced or deleted while being opened, {reading.ATTEMPTS} times in a row; "
        "a writer is re-saving it continuously. Retry later, or restore another step"
    )


def test_a_filesystem_that_cannot_exchange_falls_back_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def refuses(*args: Any) -> int:
        calls.append(args)
        ctypes.set_errno(errno.EINVAL)  # what overlayfs, NFS and FUSE mounts answer
        return -1

    monkeypatch.setattr(layout, "_renameat2", refuses)
    monkeypatch.setattr(layout, "_no_exchange_devices", set())
    writer = CheckpointManager(tmp_path, keep_last=None)
    with caplog.at_level(logging.INFO, logger="torchst"):
        for g in range(1, 4):
            writer.save(5, state(g))
    assert generation_of(writer) == 3 and sorted(os.listdir(tmp_path)) == [".lock", "step_5"]
    assert len(calls) == 1  # the filesystem is remembered: later re-saves go straight to the fallback
    fallbacks = [r for r in caplog.records if "cannot exchange directories atomically" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].name == "torchst.manager.layout"
    assert fallbacks[0].getMessage() == (
        f"{tmp_path}: the filesystem cannot exchange directories atomically (EINVAL); re-saved steps are "
        "committed by two renames, during which readers see the previous copy"
    )


def test_a_failed_fallback_commit_puts_the_previous_copy_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "_renameat2", None)
    writer = CheckpointManager(tmp_path, keep_last=None)
    writer.save(5, state(1))
    real = os.rename

    def commit_fails(src: Any, dst: Any) -> None:
        if os.path.basename(str(src)).startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error", str(src))
        real(src, dst)

    monkeypatch.setattr(os, "rename", commit_fails)
    with pytest.raises(
        CheckpointError, match=r"saving step 5 failed: .*Input/output error.* earlier checkpoints are intact"
    ):
        writer.save(5, state(2))
    monkeypatch.setattr(os, "rename", real)
    assert sorted(os.listdir(tmp_path)) == [".lock", "step_5"] and generation_of(writer) == 1


@pytest.mark.parametrize("fallback", [False, True])
def test_concurrent_resaves_and_restores_never_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: bool
) -> None:
    if fallback:
        monkeypatch.setattr(layout, "_renameat2", None)
    writer = CheckpointManager(tmp_path, keep_last=None)
    writer.save(5, state(0))
    reader = CheckpointManager(tmp_path, read_only=True)
    done = threading.Event()
    errors: list[BaseException] = []

    def resave() -> None:
        try:
            for g in range(1, 25):
                writer.save(5, state(g))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=resave)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: readers land inside commits and deletes
    try:
        thread.start()
        seen = []
        while not done.is_set():
            try:
                seen.append(generation_of(reader, None))  # raises on a mix; never step 4 or nothing
            except CheckpointChangedError:
                pass  # the documented answer when re-saves outpace a starved reader's retries: never a mix
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert seen == sorted(seen) and generation_of(reader) == 24


STRESS_READER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_manager_resave import generation_of
from torchst import CheckpointManager
from torchst.errors import CheckpointChangedError
reader = CheckpointManager({directory!r}, read_only=True)
generation_of(reader, None)
print("ready", flush=True)
seen, changed = [], 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        g = generation_of(reader, None)
    except CheckpointChangedError:
        changed += 1
        continue
    seen.append(g)
    if g == {last}:
        break
assert seen == sorted(seen), seen
print(len(seen), changed, seen[-1])
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("fallback", [False, True])
def test_reader_processes_never_see_a_mix_while_a_writer_resaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: bool
) -> None:
    if fallback:
        monkeypatch.setattr(layout, "_renameat2", None)
    last = 150
    writer = CheckpointManager(tmp_path, keep_last=None)
    writer.save(5, state(0))
    code = STRESS_READER.format(tests=str(Path(__file__).parent), directory=str(tmp_path), last=last)
    readers = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in readers:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for g in range(1, last + 1):
        writer.save(5, state(g))
    for proc in readers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err  # a mix fails generation_of's assertion in the reader
        reads, _, final = map(int, out.split())
        assert reads > 1 and final == last


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
