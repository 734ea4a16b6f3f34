"""Distributed checkpoints of FSDP2-sharded state: torchst.distributed beside torch.distributed.checkpoint.

    python benchmarks/bench_distributed.py [--size-mb 1024] [--rounds 7] [--dir DIR] [--quick]

State: ``--size-mb`` of float32 ``[2048, 2048]`` matrices as DTensors sharded ``Shard(0)`` over 2
ranks (FSDP2's layout), gloo on CPU.  Every measurement runs in fresh processes (a 2-rank job
through a file store); the time of an operation is the slowest rank's, between two barriers.
Rounds alternate the implementations so drifting machine load hits all of them alike.

- ``save``        torchst ``tsd.save_state_dict`` vs ``dcp.save`` + ``FileSystemWriter`` (baseline,
                  target <= 1.0x) vs DCP's Hugging Face route ``HuggingFaceStorageWriter(...,
                  enable_consolidation=True)`` (target torchst <= 0.5x of it)
- ``load_2to2``   2 ranks load the 2-rank checkpoint resharded to ``Shard(1)``: ``tsd.load_state_dict``
                  vs ``dcp.load`` (target <= 1.0x)
- ``load_2to1``   1 process loads the full tensors into preallocated memory (target <= 1.0x)

Each line: median / min / max seconds over the rounds, the ratio of medians against the DCP
baseline, and the extra host memory per rank (peak RSS during the operation minus RSS before it,
median over ranks and rounds; target <= 64 MiB beyond the rank's local shard).  Loads read files
that are in the page cache (just written).  ``--quick`` is a smoke test (tiny state, 1 round).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import MIB, emit, median, peak_rss_mib, reset_peak_rss, rss_mib

SCRIPT = os.path.abspath(__file__)
DIM = 2048
SAVES = ("torchst", "dcp", "dcp_hf")
TARGET = {"save": 1.0, "load_2to2": 1.0, "load_2to1": 1.0}


# -- one rank of one job ------------------------------------------------------------------------
def _state(n: int, dim: int, world: int, rank: int, fill: bool) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    rows = dim // world
    out = {}
    for i in range(n):
        local = torch.empty(rows, dim)
        if fill:
            local.fill_(float(i + rank))
        out[f"layers.{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return out


def _targets(n: int, dim: int, world: int, placement: str) -> dict[str, Any]:
    import torch

    # zeros, not empty: the targets' pages are touched before the measurement, so the RSS
    # growth reported is what the load itself allocates
    if world == 1:
        return {f"layers.{i}.weight": torch.zeros(dim, dim) for i in range(n)}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    dim_ = 1 if placement == "shard1" else 0
    shape = (dim, dim // world) if dim_ == 1 else (dim // world, dim)
    return {
        f"layers.{i}.weight": DTensor.from_local(torch.zeros(shape), mesh, [Shard(dim_)], run_check=False)
        for i in range(n)
    }


def _op(job: dict[str, Any], sd: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    import torchst.distributed as tsd

    impl, op, path = job["impl"], job["op"], job["path"]
    if op == "save":
        if impl == "torchst":
            tsd.save_state_dict(sd, path, max_shard_size="5GB")
        elif impl == "dcp":
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(path))
        else:
            writer = dcp.HuggingFaceStorageWriter(path, save_distributed=True, enable_consolidation=True)
            dcp.save(sd, storage_writer=writer)
    elif impl == "torchst":
        tsd.load_state_dict(sd, path)
    else:
        dcp.load(sd, storage_reader=dcp.FileSystemReader(path))


def rank_main(job: dict[str, Any], rank: int) -> None:
    import torch
    import torch.distributed as dist

    world = job["world"]
    dist.init_process_group(
        "gloo",
        init_method="file://" + job["store"],
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
    )
    n, dim = job["tensors"], job["dim"]
    if job["op"] == "save":
        sd = _state(n, dim, world, rank, fill=True)
    else:
        sd = _targets(n, dim, world, job.get("placement", "shard0"))
    dist.barrier()
    reset_peak_rss()
    before = rss_mib()
    start = time.perf_counter()
    _op(job, sd)
    dist.barrier()
    seconds = time.perf_counter() - start
    extra = max(0.0, peak_rss_mib() - before)
    t = torch.tensor([seconds, extra], dtype=torch.float64)
    gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, t)
    if rank == 0:
        print(
            json.dumps(
                {"seconds": max(float(g[0]) for g in gathered), "extra_rss_mib": [float(g[1]) for g in gathered]}
            )
        )
    dist.destroy_process_group()


# -- driver --------------------------------------------------------------------------------------
def run_job(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    store = tempfile.mktemp(prefix="store-", dir=job["scratch"])
    job = {**job, "store": store}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, "--rank", str(r), "--job", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(job["world"])
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{job['impl']} {job['op']} failed:\n{err[-3000:]}")
    return dict(json.loads(outs[0][0].strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="total state size (float32 matrices)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None, help="scratch directory (default: the system temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny state, one round: a smoke test")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(json.loads(args.job), args.rank)
        return
    dim = 64 if args.quick else DIM
    per = dim * dim * 4
    tensors = max(1, (2 if args.quick else args.size_mb) * MIB // per)
    rounds = 1 if args.quick else args.rounds
    scratch = tempfile.mkdtemp(prefix="bench-dist-", dir=args.dir)
    base = {"tensors": tensors, "dim": dim, "scratch": scratch}
    size_mb = round(tensors * per / MIB, 1)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for r in range(rounds):
            order = SAVES[r % 3 :] + SAVES[: r % 3]  # who goes first rotates
            for impl in order:
                path = os.path.join(scratch, f"{impl}-{r}")
                results.setdefault(("save", impl), []).append(
                    run_job({**base, "impl": impl, "op": "save", "world": 2, "path": path})
                )
            for op, world, placement in (("load_2to2", 2, "shard1"), ("load_2to1", 1, "full")):
                for impl in order:
                    if impl == "dcp_hf":
                        continue
                    path = os.path.join(scratch, f"{impl}-{r}")
                    job = {**base, "impl": impl, "op": op, "world": world, "path": path, "placement": placement}
                    results.setdefault((op, impl), []).append(run_job(job))
            for impl in SAVES:
                shutil.rmtree(os.path.join(scratch, f"{impl}-{r}"), ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for (op, impl), runs in results.items():
        secs = [x["seconds"] for x in runs]
        baseline = [x["seconds"] for x in results[(op, "dcp")]]
        ratio = median(secs) / median(baseline)
        rec: dict[str, Any] = {
            "bench": op,
            "impl": impl,
            "size_mb": size_mb,
            "ranks": 1 if op == "load_2to1" else 2,
            "median_s": round(median(secs), 4),
            "min_s": round(min(secs), 4),
            "max_s": round(max(secs), 4),
            "runs": [round(s, 4) for s in secs],
            "extra_rss_mib_per_rank": round(median([m for x in runs for m in x["extra_rss_mib"]]), 1),
            "baseline": "dcp",
            "ratio_vs_baseline": round(ratio, 3),
        }
        if impl == "torchst":
            rec["target"] = TARGET[op]
            rec["met"] = ratio <= TARGET[op]
            if op == "save":
                hf = [x["seconds"] for x in results[("save", "dcp_hf")]]
                rec["ratio_vs_dcp_hf"] = round(median(secs) / median(hf), 3)
                rec["met_vs_dcp_hf"] = rec["ratio_vs_dcp_hf"] <= 0.5
        emit(rec)


if __name__ == "__main__":
    main()
