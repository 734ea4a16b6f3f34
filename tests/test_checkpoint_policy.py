"""Symlink policy, hostile indexes, unindexed tensors and debris of interrupted saves."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

import torchst
from torchst.errors import CheckpointError, CheckpointLockedError, ShardIndexError
from torchst.sharding import cleanup, find_debris, load_state_dict, open_checkpoint, save_state_dict
from torchst.sharding import io as sio
from torchst.sharding.debris import save_lock

SD = {f"w{i}": torch.full((16,), float(i)) for i in range(4)}
SHARD = "model-00001-of-00002.safetensors"


def sharded(directory: Path) -> Path:
    save_state_dict(SD, directory, max_shard_size=128)
    assert (directory / SHARD).exists()
    return directory


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- symlinks ----------------------------------------------------------------------------


def test_shard_linked_outside_is_refused_unless_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = sharded(tmp_path / "ckpt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(ckpt / SHARD, outside / "secret.safetensors")
    os.symlink(outside / "secret.safetensors", ckpt / SHARD)
    with pytest.raises(ShardIndexError, match=r"is a symbolic link leading to .*elsewhere.*outside the checkpoint") as e:
        load_state_dict(ckpt)
    assert "trusted_roots=" in str(e.value)
    assert equal(load_state_dict(ckpt, trusted_roots=[outside]), SD)
    monkeypatch.setenv("TORCHST_TRUSTED_ROOTS", str(outside))
    assert equal(load_state_dict(ckpt), SD)


def test_shard_in_symlinked_subdirectory_is_refused(tmp_path: Path) -> None:
    ckpt = sharded(tmp_path / "ckpt")
    outside = tmp_path / "mounted"
    outside.mkdir()
    os.replace(ckpt / SHARD, outside / SHARD)
    os.symlink(outside, ckpt / "sub")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"sub/{v}" if v == SHARD else v for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShardIndexError, match=r"'sub/model-00001-of-00002.safetensors' .* symbolic link"):
        open_checkpoint(ckpt)
    assert equal(load_state_dict(ckpt, trusted_roots=[outside]), SD)


def test_links_inside_the_checkpoint_and_what_the_user_names_are_followed(tmp_path: Path) -> None:
    ckpt = sharded(tmp_path / "real")
    os.rename(ckpt / SHARD, ckpt / "renamed.safetensors")
    os.symlink("renamed.safetensors", ckpt / SHARD)  # a link that stays inside
    assert equal(load_state_dict(ckpt), SD)
    os.symlink(ckpt, tmp_path / "alias")  # the user names a link to the directory
    assert equal(load_state_dict(tmp_path / "alias"), SD)
    single = tmp_path / "one.safetensors"
    torchst.save_file(SD, single)
    os.symlink(single, tmp_path / "link.safetensors")  # the user names a link to a file
    assert equal(load_state_dict(tmp_path / "link.safetensors"), SD)
    # ... but model.safetensors found inside a directory is a file of that directory
    (tmp_path / "d").mkdir()
    os.symlink(single, tmp_path / "d" / "model.safetensors")
    with pytest.raises(ShardIndexError, match="symbolic link"):
        load_state_dict(tmp_path / "d")


def _hf_cache(root: Path) -> Path:
    """models--org--name/{blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>}, as huggingface_hub lays it out."""
    src = sharded(root / "src")
    repo = root / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(src))):
        os.replace(src / name, blobs / f"{i:040x}")
        os.symlink(f"../../blobs/{i:040x}", snap / name)
    return snap


def test_hugging_face_cache_layout_is_followed(tmp_path: Path) -> None:
    snap = _hf_cache(tmp_path)
    assert os.path.islink(snap / SHARD) and os.path.islink(snap / "model.safetensors.index.json")
    assert equal(load_state_dict(snap), SD)
    with open_checkpoint(snap / "model.safetensors.index.json") as ckpt:
        assert ckpt.files[0] == str(snap / SHARD)


def test_fake_cache_link_leading_elsewhere_is_refused(tmp_path: Path) -> None:
    snap = _hf_cache(tmp_path)
    target = os.path.realpath(snap / SHARD)
    other = tmp_path / "other"
    other.mkdir()
    os.replace(target, other / "x")
    os.unlink(snap / SHARD)
    os.symlink(other / "x", snap / SHARD)
    with pytest.raises(ShardIndexError, match="symbolic link"):
        load_state_dict(snap)


def test_verify_refuses_an_escaping_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = sharded(tmp_path / "ckpt")
    os.replace(ckpt / SHARD, tmp_path / "x.safetensors")
    os.symlink(tmp_path / "x.safetensors", ckpt / SHARD)
    from torchst.cli import main

    assert main(["verify", str(ckpt)]) != 0
    captured = capsys.readouterr()
    assert "symbolic link" in captured.err + captured.out and "Traceback" not in captured.err


# -- hostile indexes ---------------------------------------------------------------------


def _index(directory: Path, text: str) -> Path:
    (directory / "model.safetensors.index.json").write_text(text)
    return directory


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
        ('{"metadata": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + ', "weight_map": {}}', "nests JSON too deeply"),
        (
            '{"weight_map": {"w0": "model-00001-of-00002.safetensors", "w0": "model-00002-of-00002.safetensors"}}',
            r"duplicate key 'w0'; each tensor lives in exactly one shard",
        ),
        ('{"metadata": {"total_size": NaN}, "weight_map": {"w0": "a.safetensors"}}', "NaN is not allowed"),
    ],
)
def test_hostile_index_is_a_shard_index_error(tmp_path: Path, text: str, message: str) -> None:
    ckpt = _index(sharded(tmp_path), text)
    with pytest.raises(ShardIndexError, match=message):
        load_state_dict(ckpt)


def test_cli_prints_no_traceback_for_a_nested_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchst.cli import main

    ckpt = _index(sharded(tmp_path), "[" * 100_000 + "]" * 100_000)
    assert main(["verify", str(ckpt)]) == 1  # a damaged checkpoint
    captured = capsys.readouterr()
    assert "CORRUPT: " in captured.out and "nests JSON too deeply" in captured.out
    assert "Traceback" not in captured.err + captured.out


def _unindexed(directory: Path) -> Path:
    sharded(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    del index["weight_map"]["w1"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def test_unindexed_tensors_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _unindexed(tmp_path)
    with caplog.at_level(logging.WARNING, logger="torchst"), open_checkpoint(ckpt) as c:
        assert c.unindexed == {str(ckpt / SHARD): ("w1",)}
        assert "w1" not in c.tensors
    assert "not read from there by the index (e.g. 'w1'" in caplog.text
    assert sorted(load_state_dict(ckpt)) == ["w0", "w2", "w3"]  # ignored, as transformers does


def test_strict_load_model_names_unindexed_tensors(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    save_state_dict({**model.state_dict(), "a_extra": torch.ones(8)}, tmp_path, max_shard_size=60)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["a_extra"] == index["weight_map"]["bias"]  # one shard holds both
    del index["weight_map"]["a_extra"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r'Stored in shards but not listed by the index \(not loaded\): "a_extra"'):
        torchst.load_model(torch.nn.Linear(4, 4), tmp_path)
    fresh = torch.nn.Linear(4, 4)
    torchst.load_model(fresh, tmp_path, strict=False)
    assert torch.equal(fresh.weight, model.weight)


# -- debris ------------------------------------------------------------------------------


class _Stop(BaseException):
    pass


def _killed_save(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save stopped after writing its shards, before any commit: as a SIGKILL would leave it."""

    def die(*args: object) -> None:
        raise _Stop

    monkeypatch.setattr(sio, "_commit", die)
    monkeypatch.setattr(sio, "_referenced", lambda directory, name: True)  # a kill runs no cleanup
    with pytest.raises(_Stop):
        save_state_dict({k: v + 1 for k, v in SD.items()}, directory, max_shard_size=128)
    monkeypatch.undo()


def test_debris_found_and_cleaned_committed_files_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = sharded(tmp_path)
    _killed_save(ckpt, monkeypatch)
    debris = find_debris(ckpt)
    assert len(debris) == 2 and all(d.kind == "shard temporary" and d.nbytes > 0 for d in debris)
    assert all(os.path.basename(d.path).startswith(".tmp-") for d in debris)
    paths = [d.path for d in debris]
    assert [d.path for d in cleanup(ckpt, dry_run=True)] == paths and [d.path for d in find_debris(ckpt)] == paths
    assert [d.path for d in cleanup(ckpt)] == paths
    assert find_debris(ckpt) == []
    assert sorted(os.listdir(ckpt)) == [SHARD, "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert equal(load_state_dict(ckpt), SD)


def test_temporaries_named_by_the_committed_index_are_not_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = sharded(tmp_path)

    def die(src: str, dst: str) -> None:
        raise _Stop  # after the transitional index: the new checkpoint lives under temporary names

    monkeypatch.setattr(sio, "_link_over", die)
    with pytest.raises(_Stop):
        save_state_dict({k: v + 1 for k, v in SD.items()}, ckpt, max_shard_size=128)
    monkeypatch.undo()
    assert any(n.startswith(".tmp-") for n in os.listdir(ckpt))
    assert find_debris(ckpt) == [] and cleanup(ckpt) == []
    assert equal(load_state_dict(ckpt), {k: v + 1 for k, v in SD.items()})


def test_cleanup_refuses_while_a_save_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = sharded(tmp_path)
    _killed_save(ckpt, monkeypatch)
    # save_lock: what every sharded save holds while it runs
    with save_lock(str(ckpt)), pytest.raises(CheckpointLockedError, match="a save into this directory is in progress"):
        cleanup(ckpt)
    assert len(cleanup(ckpt)) == 2


def test_atomic_temporaries_go_only_when_stale(tmp_path: Path) -> None:
    ckpt = sharded(tmp_path)
    fresh = ckpt / ".model.safetensors.tmp-0123456789ab"
    old = ckpt / ".model.safetensors.index.json.tmp-ba9876543210"
    fresh.write_bytes(b"x" * 10)
    old.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert [d.path for d in find_debris(ckpt)] == [str(old), str(fresh)]
    assert [d.path for d in cleanup(ckpt)] == [str(old)]  # a live save_file may still own the fresh one
    assert fresh.exists() and not old.exists()
    assert [d.path for d in cleanup(ckpt, stale_after=0)] == [str(fresh)]


# -- command line ------------------------------------------------------------------------


def test_cli_verify_reports_debris_and_cleanup_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchst.cli import main

    ckpt = sharded(tmp_path)
    _killed_save(ckpt, monkeypatch)
    assert main(["verify", str(ckpt)]) == 0  # leftovers are not damage
    out = capsys.readouterr().out
    assert "note: 2 temporary file(s) left by interrupted saves" in out and f"torchst cleanup {ckpt}" in out
    assert main(["verify", "--json", str(ckpt)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["debris"]) == 2 and all(d["kind"] == "shard temporary" for d in doc["debris"])
    with save_lock(str(ckpt)):
        assert main(["cleanup", str(ckpt)]) == 2
    assert "a save into this directory is in progress" in capsys.readouterr().err
    assert main(["cleanup", "--dry-run", str(ckpt)]) == 0
    assert "would remove 2 leftover file(s)" in capsys.readouterr().out and len(find_debris(ckpt)) == 2
    assert main(["cleanup", str(ckpt)]) == 0
    assert "removed 2 leftover file(s)" in capsys.readouterr().out
    assert find_debris(ckpt) == [] and equal(load_state_dict(ckpt), SD)
    assert main(["cleanup", str(ckpt)]) == 0
    assert "nothing to clean" in capsys.readouterr().out


def test_cli_verify_reports_unindexed_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchst.cli import main

    ckpt = _unindexed(tmp_path)
    assert main(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT: 1 tensor(s) stored in shards are not listed by the index" in out and "'w1'" in out
