"""Object storage: every API round-trips bit-exactly at s3:// (moto's server on 127.0.0.1) and memory://."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import torchst
from torchst.errors import CheckpointNotFoundError, FormatError, RemoteError, ShardIndexError

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3server import S3Server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    server.make_bucket("torchst-test")
    yield server
    server.stop()


@pytest.fixture(params=["s3", "memory"])
def base(request: pytest.FixtureRequest) -> str:
    """A fresh prefix on each store."""
    if request.param == "s3":
        request.getfixturevalue("s3")
        return f"s3://torchst-test/{uuid.uuid4().hex[:8]}"
    return f"memory://torchst-test/{uuid.uuid4().hex[:8]}"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(64, 33, generator=g),
        "bf16": torch.randn(17, 5, generator=g).bfloat16(),
        "i64": torch.arange(100),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "bool": torch.rand(9, generator=g) > 0.5,
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k, t in a.items():
        assert t.dtype == b[k].dtype and t.shape == b[k].shape, k
        assert torch.equal(t.reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 48)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("steps", torch.tensor(7))


def test_save_file_load_file_round_trip(base: str) -> None:
    sd = _tensors()
    url = f"{base}/m.safetensors"
    torchst.save_file(sd, url, metadata={"k": "v"})
    _same(torchst.load_file(url), sd)
    with torchst.safe_open(url) as f:
        assert f.metadata() == {"k": "v"}
        assert f.keys() == sorted(sd)
        _same({"f32": f.get_tensor("f32")}, {"f32": sd["f32"]})
        assert torch.equal(f.get_slice("f32")[5:9, 2:7], sd["f32"][5:9, 2:7])
        assert torch.equal(f.get_slice("bf16")[3], sd["bf16"][3])


def test_save_file_bytes_identical_to_reference(base: str) -> None:
    import fsspec
    from safetensors.torch import save as ref_save

    sd = {k: v for k, v in _tensors().items()}
    url = f"{base}/m.safetensors"
    torchst.save_file(sd, url, metadata={"a": "b"})
    with fsspec.open(url, "rb") as f:
        assert f.read() == ref_save(sd, metadata={"a": "b"})


def test_checksums_verify(base: str) -> None:
    sd = _tensors()
    url = f"{base}/m.safetensors"
    torchst.save_file(sd, url, checksums=True)
    _same(torchst.load_file(url, verify=True), sd)


def test_save_model_load_model_sharded_meta_device_map(base: str) -> None:
    torch.manual_seed(0)
    model = Net()
    r = torchst.save_model(model, f"{base}/ckpt", max_shard_size=4000)
    assert r.index_file == "model.safetensors.index.json" and len(r.files) > 1
    with torch.device("meta"):
        fresh = Net()
    assert torchst.load_model(fresh, f"{base}/ckpt", verify=True) == ([], [])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.head.weight is fresh.embed.weight
    mapped = Net()
    torchst.load_model(mapped, f"{base}/ckpt", device_map={"embed": "cpu", "": "cpu"}, dtype=torch.bfloat16)
    assert mapped.body.weight.dtype == torch.bfloat16
    assert torch.equal(mapped.body.weight, model.body.weight.bfloat16())
    sd = torchst.load_state_dict(f"{base}/ckpt")
    assert sd["head.weight"] is sd["embed.weight"]
    assert torch.equal(sd["body.bias"], model.body.bias)


def test_save_state_dict_single_then_sharded_then_single(base: str) -> None:
    import fsspec

    url = f"{base}/sd"
    fs, path = fsspec.core.url_to_fs(url)
    a = {"w": torch.randn(100, 100), "b": torch.randn(100)}
    torchst.save_state_dict(a, url, max_shard_size=None)
    _same(torchst.load_state_dict(url), a)
    b = {"w": torch.randn(100, 100), "b": torch.randn(100)}
    torchst.save_state_dict(b, url, max_shard_size=20_000)
    _same(torchst.load_state_dict(url), b)
    names = (
        {p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False, refresh=True)}
        if "s3" in url
        else {p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)}
    )
    assert "model.safetensors" not in names  # the old single file is cleaned up after the commit
    c = {"w": torch.randn(100, 100), "b": torch.randn(100)}
    torchst.save_state_dict(c, url, max_shard_size=None)
    _same(torchst.load_state_dict(url), c)
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/model.safetensors.index.json")


def test_local_load_never_imports_fsspec(tmp_path: object) -> None:
    code = (
        "import sys, torch, torchst\n"
        f"p = {str(tmp_path)!r} + '/m.safetensors'\n"
        "torchst.save_file({'a': torch.ones(3)}, p)\n"
        "torchst.load_file(p); torchst.load_state_dict(p)\n"
        "with torchst.safe_open(p) as f: f.get_tensor('a')\n"
        "assert 'fsspec' not in sys.modules, 'fsspec imported by a local load'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- bytes on the wire ----------------------------------------------------------------------


def test_header_read_stays_under_1mb(s3: S3Server) -> None:
    url = "s3://torchst-test/wire/big.safetensors"
    torchst.save_file({"a": torch.zeros(4 << 20, dtype=torch.uint8), "b": torch.zeros(1 << 20)}, url)
    s3.stats.reset()
    with torchst.safe_open(url) as f:
        assert f.keys() == ["a", "b"]
    assert s3.stats.gets == 1 and s3.stats.get_bytes <= 1_000_000


def test_large_header_takes_a_second_get(s3: S3Server) -> None:
    url = "s3://torchst-test/wire/many.safetensors"
    sd = {f"layer.{i:05d}.some_rather_long_parameter_name.weight": torch.full((2,), float(i)) for i in range(6000)}
    torchst.save_file(sd, url)
    s3.stats.reset()
    with torchst.safe_open(url) as f:
        assert len(f.keys()) == 6000
        assert torch.equal(
            f.get_tensor("layer.05999.some_rather_long_parameter_name.weight"),
            sd["layer.05999.some_rather_long_parameter_name.weight"],
        )
    assert s3.stats.gets == 3


@pytest.mark.slow
def test_one_tensor_of_100mb_file_transfers_under_2mb(s3: S3Server) -> None:
    url = "s3://torchst-test/wire/100mb.safetensors"
    one = torch.randn(1 << 18)  # 1 MiB
    torchst.save_file(
        {
            "big0": torch.zeros(50 << 20, dtype=torch.uint8),
            "one": one,
            "big1": torch.zeros(49 << 20, dtype=torch.uint8),
        },
        url,
    )
    s3.stats.reset()
    with torchst.safe_open(url) as f:
        assert torch.equal(f.get_tensor("one"), one)
    assert s3.stats.get_bytes <= 2_000_000


def test_one_tensor_of_16mb_file_transfers_what_it_needs(s3: S3Server) -> None:
    url = "s3://torchst-test/wire/16mb.safetensors"
    one = torch.randn(1 << 18)  # 1 MiB
    torchst.save_file(
        {"big0": torch.zeros(8 << 20, dtype=torch.uint8), "one": one, "big1": torch.zeros(7 << 20, dtype=torch.uint8)},
        url,
    )
    s3.stats.reset()
    with torchst.safe_open(url) as f:
        assert torch.equal(f.get_tensor("one"), one)
    assert s3.stats.get_bytes <= 2_000_000


def test_row_slice_transfers_under_256kb(s3: S3Server) -> None:
    url = "s3://torchst-test/wire/rows.safetensors"
    w = torch.randn(4096, 1024)  # 16 MiB; 16 rows = 64 KiB
    torchst.save_file({"w": w}, url)
    with torchst.safe_open(url) as f:
        s3.stats.reset()
        part = f.get_slice("w")[1000:1016]
    assert torch.equal(part, w[1000:1016])
    assert s3.stats.get_bytes <= 256_000


# -- failures -------------------------------------------------------------------------------


def test_missing_bucket_key_and_checkpoint(s3: S3Server) -> None:
    with pytest.raises(CheckpointNotFoundError, match="s3://no-such-bucket-x/m.safetensors"):
        torchst.load_file("s3://no-such-bucket-x/m.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="s3://torchst-test/absent.safetensors"):
        torchst.load_file("s3://torchst-test/absent.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        torchst.load_state_dict("s3://torchst-test/absent-dir")


def test_access_denied(s3: S3Server) -> None:
    url = "s3://torchst-test/denied/m.safetensors"
    torchst.save_file({"a": torch.ones(2)}, url)
    s3.stats.deny.add("denied/m.safetensors")
    try:
        with pytest.raises(RemoteError, match="access denied") as info:
            torchst.load_file(url)
        assert isinstance(info.value, OSError) and info.value.errno == 13
        assert url in str(info.value)
    finally:
        s3.stats.deny.clear()


def test_transient_errors_are_retried(s3: S3Server) -> None:
    url = "s3://torchst-test/flaky/m.safetensors"
    sd = {"a": torch.randn(10)}
    torchst.save_file(sd, url)
    s3.stats.fail_next["flaky/m.safetensors"] = 1
    _same(torchst.load_file(url), sd)
    assert s3.stats.fail_next["flaky/m.safetensors"] == 0


def test_truncated_object(s3: S3Server) -> None:
    blob = torchst.save({"a": torch.randn(1000)})
    s3.client().put_object(Bucket="torchst-test", Key="trunc/m.safetensors", Body=blob[:-100])
    with pytest.raises(FormatError, match="s3://torchst-test/trunc/m.safetensors"):
        torchst.load_file("s3://torchst-test/trunc/m.safetensors")


def test_missing_shard_is_named(s3: S3Server) -> None:
    url = "s3://torchst-test/noshard"
    torchst.save_state_dict({"a": torch.randn(1000), "b": torch.randn(1000)}, url, max_shard_size=5000)
    s3.client().delete_object(Bucket="torchst-test", Key="noshard/model-00002-of-00002.safetensors")
    with pytest.raises(ShardIndexError, match="model-00002-of-00002.safetensors"):
        torchst.load_state_dict(url)


def test_failed_upload_leaves_previous_checkpoint(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchst.storage import remote

    url = "s3://torchst-test/crash/ckpt"
    old = {"a": torch.randn(3 << 20), "b": torch.randn(3 << 20)}  # 12 MiB each: multipart uploads
    torchst.save_state_dict(old, url, max_shard_size=13 << 20)
    single = "s3://torchst-test/crash/one.safetensors"
    torchst.save_file(old, single)
    calls = {"n": 0}
    original = remote.RemoteWriter._send_part

    def failing(self: remote.RemoteWriter) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-upload")
        original(self)

    monkeypatch.setattr(remote.RemoteWriter, "_send_part", failing)
    new = {"a": torch.randn(3 << 20), "b": torch.randn(3 << 20)}
    with pytest.raises(KeyboardInterrupt):
        torchst.save_state_dict(new, url, max_shard_size=13 << 20)
    _same(torchst.load_state_dict(url), old)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        torchst.save_file(new, single)
    _same(torchst.load_file(single), old)
    uploads = s3.client().list_multipart_uploads(Bucket="torchst-test").get("Uploads", [])
    assert not [u for u in uploads if u["Key"].startswith("crash/")]  # aborted, not left to linger
    monkeypatch.undo()
    torchst.save_state_dict(new, url, max_shard_size=13 << 20)
    _same(torchst.load_state_dict(url), new)


def test_uploads_carry_crc32c(s3: S3Server) -> None:
    import base64

    from crc32c import crc32c

    url = "s3://torchst-test/crc/m.safetensors"
    sd = {"a": torch.randn(1000)}
    torchst.save_file(sd, url)
    head = s3.client().head_object(Bucket="torchst-test", Key="crc/m.safetensors", ChecksumMode="ENABLED")
    expected = base64.b64encode(crc32c(torchst.save(sd)).to_bytes(4, "big")).decode()
    assert head["ChecksumCRC32C"] == expected


def test_readers_ignore_uncommitted_shards(s3: S3Server) -> None:
    url = "s3://torchst-test/stray"
    sd = {"a": torch.randn(100)}
    torchst.save_state_dict(sd, url, max_shard_size=None)
    # a shard of an interrupted sharded save that never wrote its index
    torchst.save_file({"zzz": torch.ones(3)}, f"{url}/model-00001-of-00002.safetensors")
    _same(torchst.load_state_dict(url), sd)


@pytest.mark.slow
def test_bench_remote_quick_prints_json_lines() -> None:
    import json
    import os
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_remote.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(script.parents[1])}, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["impl"] for r in records} >= {"torchst_s3", "torchst_s3_save", "save_local+upload_boto3"}
    assert all("patched" in r["server"] and r["min_s"] <= r["median_s"] <= r["max_s"] for r in records)


def test_cli_inspect_of_a_url_reads_only_headers(s3: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from torchst.cli import main

    url = "s3://torchst-test/inspect/ckpt"
    torchst.save_state_dict(
        {"a": torch.zeros(3 << 20), "b": torch.zeros(3 << 20, dtype=torch.int32)}, url, max_shard_size=13 << 20
    )
    s3.stats.reset()
    assert main(["inspect", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "sharded" and doc["tensors"]["b"]["dtype"] == "I32"
    assert doc["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert s3.stats.get_bytes <= 1_000_000  # two 24 MiB shards: headers (and the index) only
