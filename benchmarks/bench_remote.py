"""Object storage: torchst at s3:// against the usual download-then-load and save-then-upload routes.

A local S3 server (moto, in a subprocess on 127.0.0.1) holds a sharded checkpoint of a model of
``--size-mb`` MiB.  Each round runs every implementation once, in a rotated order:

- ``load``: ``torchst.load_model(meta_model, "s3://...")`` (ranged GETs straight into tensors) vs
  downloading the shards (boto3 ``download_file`` and s3fs ``get``, the faster one is the
  baseline) then ``safetensors.torch.load_file`` + ``model.load_state_dict``, vs torchst from a
  local copy;
- ``save``: ``torchst.save_model(model, "s3://...")`` (streamed multipart uploads) vs
  ``torchst.save_model`` to a local directory then uploading it with boto3 ``upload_file``.

moto is patched (see ``tests/s3server.py``): objects stay in memory and a ranged GET copies only
its range; unpatched moto 5.x copies the whole object for every range, the opposite of real S3.
Every line says so (``"server"``).  Peak extra memory is the peak RSS of the round beyond the RSS
before it and the model's own bytes.

    python benchmarks/bench_remote.py --size-mb 1024 --runs 5
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import MIB, emit, median, peak_rss_mib, reset_peak_rss, rss_mib

BUCKET = "bench"


def serve(port: int) -> None:
    """Run the patched moto server until stdin closes (the parent exits)."""
    from moto.server import ThreadedMotoServer
    from s3server import _patch_moto

    _patch_moto()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


def _model(size_mb: int, device: str = "cpu") -> Any:
    import torch
    from torch import nn

    width = 2048
    layers = max(1, size_mb * MIB // (width * width * 4))
    with torch.device(device):
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB (default 1024)")
    ap.add_argument("--shard-mb", type=int, default=256, help="max shard size in MiB")
    ap.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, one round (smoke test)")
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    if args.quick:
        args.size_mb, args.runs, args.shard_mb = 64, 1, 16

    from s3server import PATCH_NOTE, free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the S3 server did not start")
        _bench(args, f"http://127.0.0.1:{port}", PATCH_NOTE)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


def _bench(args: argparse.Namespace, endpoint: str, note: str) -> None:
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
    )
    import boto3
    import fsspec
    import torch
    from safetensors.torch import load_file as st_load_file

    import torchst

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    s3fs_fs, _ = fsspec.core.url_to_fs(f"s3://{BUCKET}")
    scratch = tempfile.mkdtemp(prefix="bench-remote-")
    src = _model(args.size_mb)
    nbytes = sum(p.numel() * p.element_size() for p in src.parameters())
    shard = f"{args.shard_mb}MiB"
    url = f"s3://{BUCKET}/ckpt"
    torchst.save_model(src, url, max_shard_size=shard)
    local = os.path.join(scratch, "local")
    torchst.save_model(src, local, max_shard_size=shard)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="ckpt/")["Contents"]]

    def fresh_meta() -> Any:
        return _model(args.size_mb, "meta")

    def load_remote(model: Any) -> None:
        torchst.load_model(model, url)

    def load_local(model: Any) -> None:
        torchst.load_model(model, local)

    def download_then_load(model: Any, how: str) -> None:
        d = os.path.join(scratch, "dl-" + uuid.uuid4().hex[:6])
        os.makedirs(d)
        try:
            if how == "boto3":
                for k in keys:
                    client.download_file(BUCKET, k, os.path.join(d, k.rsplit("/", 1)[1]))
            else:
                s3fs_fs.get([f"{BUCKET}/{k}" for k in keys], d + "/")
            for fn in sorted(os.listdir(d)):
                if fn.endswith(".safetensors"):
                    model.load_state_dict(st_load_file(os.path.join(d, fn)), strict=False)
        finally:
            shutil.rmtree(d)

    def save_remote(model: Any) -> None:
        torchst.save_model(model, f"s3://{BUCKET}/out-remote", max_shard_size=shard)

    def save_then_upload(model: Any) -> None:
        d = os.path.join(scratch, "up-" + uuid.uuid4().hex[:6])
        try:
            torchst.save_model(model, d, max_shard_size=shard)
            for fn in sorted(os.listdir(d)):
                client.upload_file(os.path.join(d, fn), BUCKET, f"out-upload/{fn}")
        finally:
            shutil.rmtree(d, ignore_errors=True)

    impls: dict[str, tuple[str, Any, Any]] = {
        # name: (bench, setup -> model, op(model))
        "torchst_s3": ("load", fresh_meta, load_remote),
        "download_boto3+safetensors": ("load", lambda: _model(args.size_mb), lambda m: download_then_load(m, "boto3")),
        "download_s3fs+safetensors": ("load", lambda: _model(args.size_mb), lambda m: download_then_load(m, "s3fs")),
        "torchst_local": ("load", fresh_meta, load_local),
        "torchst_s3_save": ("save", lambda: src, save_remote),
        "save_local+upload_boto3": ("save", lambda: src, save_then_upload),
    }
    runs: dict[str, list[float]] = {k: [] for k in impls}
    extra: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for r in range(args.runs):
        order = names[r % len(names):] + names[: r % len(names)]  # alternate who goes first
        for name in order:
            bench, setup, op = impls[name]
            model = setup()
            gc.collect()
            before = rss_mib()
            reset_peak_rss()
            t0 = time.perf_counter()
            op(model)
            runs[name].append(time.perf_counter() - t0)
            # the model's own bytes are not "extra" when they are allocated by the load
            own = nbytes / MIB if setup is fresh_meta else 0.0
            extra[name].append(max(0.0, peak_rss_mib() - before - own))
            del model
    load_base = min(median(runs["download_boto3+safetensors"]), median(runs["download_s3fs+safetensors"]))
    save_base = median(runs["save_local+upload_boto3"])
    for name, (bench, _, _) in impls.items():
        med = median(runs[name])
        base = load_base if bench == "load" else save_base
        rec: dict[str, Any] = {
            "bench": f"remote_{bench}",
            "impl": name,
            "size_mib": round(nbytes / MIB),
            "median_s": round(med, 4),
            "min_s": round(min(runs[name]), 4),
            "max_s": round(max(runs[name]), 4),
            "runs": [round(x, 4) for x in runs[name]],
            "gb_per_s": round(nbytes / med / 1e9, 3),
            "ratio_vs_baseline": round(med / base, 3),
            "peak_extra_mib": round(max(extra[name]), 1),
            "server": note,
        }
        if name == "torchst_s3":
            rec["target"] = "ratio <= 0.7 and peak_extra_mib <= 256"
            rec["met"] = rec["ratio_vs_baseline"] <= 0.7 and rec["peak_extra_mib"] <= 256
        if name == "torchst_s3_save":
            rec["target"] = "ratio <= 0.8"
            rec["met"] = rec["ratio_vs_baseline"] <= 0.8
        emit(rec)
    shutil.rmtree(scratch, ignore_errors=True)
    del torch


if __name__ == "__main__":
    main()
