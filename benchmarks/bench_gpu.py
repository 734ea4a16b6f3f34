"""GPU loading and GPU-resident training saves: torchst beside the loaders people use, on one GPU.

    python benchmarks/bench_gpu.py [--device cuda:0] [--gb 8] [--train-gb 1.6] [--runs 3] [--dir DIR]
                                   [--only copy,load,save] [--budget-s 330]
    python benchmarks/bench_gpu.py --device cpu --tiny     # dry run of every code path on CPU (seconds)

One JSON line per measurement (``bench`` = ``gpu_env``, ``gpu_copy``, ``gpu_load``, ``gpu_save``,
``gpu_target``); absolute GB/s beside ratios, every baseline measured in the same invocation:

- ``gpu_copy``  host -> device ``copy_`` of a pinned buffer (the physical reference), a pageable one,
                and device -> pinned host.
- ``gpu_load``  a page-cached bf16 sharded checkpoint (Llama layout, ``--gb`` GB, tied embeddings) ->
                ``--device`` through ``torchst.load_state_dict`` / ``torchst.load_model`` (meta-initialised
                model) / ``torchst.load_file`` per shard, beside ``safetensors.torch.load_file``,
                ``transformers`` ``from_pretrained(device_map=...)``, ``fastsafetensors`` and
                ``runai-model-streamer`` (each only if importable; a missing one is a ``status:
                "missing"`` line saying how to provide it).  Every loaded tensor is compared bit for bit,
                on the device, with the values written (regenerated there from per-name seeds).
- ``gpu_save``  GPU-resident model + AdamW state -> disk: ``CheckpointManager`` sync and async saves vs
                ``torch.save`` and ``torch.distributed.checkpoint.save`` / ``async_save``.  ``blocked_s`` is
                how long the training loop waits in the call; the last torchst save of each kind is
                restored and compared bit for bit with the state at save time (the loop has moved on).
- ``gpu_target`` one line per target: >= 20 GB/s page cache -> device, >= 3x safetensors
                ``load_file(device)``, >= 1.0x fastsafetensors, async blocked <= 0.15x sync, all exact.
                ``met`` is null when a baseline is missing.

Each implementation runs in a fresh interpreter (imports and CUDA start-up are not timed); within it
``--runs`` timed runs, the device caching allocator emptied between runs.  ``--tiny`` runs every job in
one interpreter on a tiny model: a smoke test of the logic, not numbers.  ``--budget-s`` skips the jobs
that would start after the budget is spent (``status: "skipped"``), so a bounded run still reports.
Exit status: 0, or 1 when a torchst path raised or loaded a tensor that is not bit-exact (a job the
budget skipped is reported, not failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, fs_type, median, run_worker, worker_main
from _gpu_jobs import GB, TINY, cfg_for, work

SCRIPT = os.path.abspath(__file__)
LOADS = (
    "torchst.load_state_dict",
    "torchst.load_model",
    "safetensors.load_file",
    "fastsafetensors",
    "runai_model_streamer",
    "transformers",
    "torchst.load_file",
    "torchst.load_state_dict+fp16",
)
SAVES = ("torchst-sync", "torchst-async", "torch.save", "dcp.save", "dcp.async_save")
# What a missing baseline needs (the GPU machine has no registry: wheels travel with the tree).
NEEDS = {"runai_model_streamer": "runai-model-streamer"}
TARGET_GBPS, TARGET_VS_SAFETENSORS, TARGET_VS_FASTSAFETENSORS, TARGET_ASYNC = 20.0, 3.0, 1.0, 0.15


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def _missing(impl: str) -> str | None:
    module = impl.split(".")[0] if impl != "runai_model_streamer" else impl
    if module in ("torchst", "torch"):
        return None
    if importlib.util.find_spec(module) is None:
        pkg = NEEDS.get(impl, module)
        return (
            f"{module} is not importable here; install {pkg} (on a machine without a registry: "
            f"benchmarks/gpu_wheels.sh fetches its wheel into .whl/, which gpu_check.sh installs)"
        )
    return None


def _env(device: str) -> dict[str, Any]:
    import torch

    rec: dict[str, Any] = {"bench": "gpu_env", "device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(device)
        rec["gpu_count"] = torch.cuda.device_count()
    for mod in ("safetensors", "transformers", "accelerate", "fastsafetensors", "runai_model_streamer"):
        try:
            from importlib.metadata import version

            rec[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 - absent or unnamed: reported as None
            rec[mod] = None
    rec["cpus"] = os.cpu_count()
    return rec


class Runner:
    """Runs jobs in fresh workers (or all in one for ``--tiny``) within a time budget.

    No job starts after the budget; one that started may overrun it by ``GRACE_S`` at most, so a
    caller that allows budget + ``GRACE_S`` + a few seconds always gets the report.  Each result is
    also logged to stderr as it arrives, so a run stopped from outside still shows what it measured.
    """

    GRACE_S = 60.0

    def __init__(self, tiny: bool, budget_s: float) -> None:
        self.tiny, self.deadline = tiny, time.monotonic() + budget_s

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.tiny:
            out: list[dict[str, Any]] = run_worker(SCRIPT, jobs, timeout=600)
            return out
        results = []
        for job in jobs:
            now = time.monotonic()
            if now >= self.deadline and job["kind"] != "prepare":
                res: dict[str, Any] = {"skipped": "time budget (--budget-s) spent"}
            else:
                t0 = time.monotonic()
                try:
                    res = run_worker(SCRIPT, job, timeout=max(self.deadline + self.GRACE_S - now, 30.0))
                except Exception as e:  # a crashed or timed-out worker is reported, not fatal
                    if job["kind"] == "prepare":
                        raise
                    text = str(e).strip()
                    res = {"error": (text.splitlines()[-1] if text else repr(e))[:800]}
                res["job_s"] = round(time.monotonic() - t0, 1)
            what = {k: job[k] for k in ("kind", "impl") if k in job}
            print(json.dumps({**what, **res}), file=sys.stderr, flush=True)
            results.append(res)
        return results


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / GB, 3) if seconds > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="target device (cpu for a dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, one run, one worker: a smoke test")
    ap.add_argument(
        "--gb", type=float, default=8.0, help="checkpoint size in GB (bf16, Llama-7B widths; 0.67 GB at least)"
    )
    ap.add_argument("--train-gb", type=float, default=1.6, help="model + AdamW bytes of the save benchmark")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    ap.add_argument("--only", default="copy,load,save", help="comma-separated parts: copy, load, save")
    ap.add_argument("--impls", default=None, help="comma-separated subset of load/save implementations")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no job after this many seconds")
    args = ap.parse_args(argv)
    parts = {p for p in args.only.split(",") if p}
    if parts - {"copy", "load", "save"}:
        ap.error(f"unknown parts {sorted(parts - {'copy', 'load', 'save'})}; choose from copy, load, save")
    impls = [i for i in (args.impls.split(",") if args.impls else [*LOADS, *SAVES]) if i]
    unknown = sorted(set(impls) - set(LOADS) - set(SAVES))
    if unknown:
        ap.error(f"unknown implementations {unknown}; choose from {', '.join((*LOADS, *SAVES))}")
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: --device {args.device} needs CUDA, which this machine does not have", file=sys.stderr)
        return 2
    cfg = TINY if args.tiny else cfg_for(args.gb)
    runs = 1 if args.tiny else args.runs
    width, layers = (64, 3) if args.tiny else (4096, max(1, round(args.train_gb * GB / (3 * 4 * (4096 * 4097)))))
    emit({**_env(str(dev)), "tiny": args.tiny})
    scratch = tempfile.mkdtemp(prefix="bench-gpu-", dir=args.dir)
    runner = Runner(args.tiny, args.budget_s)
    failed = False
    try:
        ckpt = os.path.join(scratch, "ckpt")
        base = {"device": str(dev), "cfg": cfg, "ckpt": ckpt, "dir": scratch, "runs": runs}
        loads = [i for i in LOADS if i in impls] if "load" in parts else []
        saves = [i for i in SAVES if i in impls] if "save" in parts else []
        jobs: list[dict[str, Any]] = []
        if loads:
            jobs.append({**base, "kind": "prepare"})
        if "copy" in parts:
            jobs.append({**base, "kind": "copy", "bytes": 1 << 20 if args.tiny else min(int(args.gb * GB), 2 << 30)})
        missing = {i: _missing(i) for i in loads}
        jobs += [{**base, "kind": "load", "impl": i} for i in loads if not missing[i]]
        jobs += [{**base, "kind": "save", "impl": i, "width": width, "layers": layers} for i in saves]
        if not args.tiny:  # the targets' inputs first, so a spent budget skips only context lines
            order = [*LOADS[:4], "torchst-sync", "torchst-async", *LOADS[4:], *SAVES[2:]]
            jobs.sort(key=lambda j: -1 if j["kind"] != "load" and j["kind"] != "save" else order.index(j["impl"]))
        results = runner.run(jobs)
        by = {(j["kind"], j.get("impl")): r for j, r in zip(jobs, results)}
        prep = by.get(("prepare", None), {"bytes": 0, "tensors": 0})
        failed = _report(by, prep, missing, loads, saves, str(dev), args.tiny, fs_type(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def _status(res: dict[str, Any] | None) -> dict[str, Any]:
    if res is None:
        return {"status": "not run"}
    if "error" in res:
        return {"status": "error", "reason": res["error"]}
    if "skipped" in res:
        return {"status": "skipped", "reason": res["skipped"]}
    return {}


def _report(
    by: dict[tuple[str, str | None], dict[str, Any]],
    prep: dict[str, Any],
    missing: dict[str, str | None],
    loads: list[str],
    saves: list[str],
    device: str,
    tiny: bool,
    fs: str,
) -> bool:
    """Emit every line and the targets; True when a torchst path failed or was not bit-exact."""
    common = {"device": device, "tiny": tiny, "fs": fs}
    failed = False
    ref_gbps: float | None = None
    copy = by.get(("copy", None))
    if copy is not None:
        if _status(copy):
            emit({"bench": "gpu_copy", "impl": "copy", **common, **_status(copy)})
        for kind, r in copy.get("copies", {}).items():
            s = median(r["runs"])
            emit(
                {
                    "bench": "gpu_copy",
                    "impl": kind,
                    **common,
                    "bytes": copy["bytes"],
                    "seconds": round(s, 5),
                    "gb_per_s": _gbps(copy["bytes"], s),
                    "exact": r["exact"],
                }
            )
        pinned = copy.get("copies", {}).get("pinned_h2d") or copy.get("copies", {}).get("pageable_h2d")
        ref_gbps = _gbps(copy["bytes"], median(pinned["runs"])) if pinned else None
    if loads:
        emit(
            {
                "bench": "gpu_checkpoint",
                **common,
                "bytes": prep["bytes"],
                "tensors": prep["tensors"],
                "shards": prep.get("shards"),
                "torchst_save_model_from_device_s": round(prep.get("save_model_s", 0), 4),
            }
        )
    seconds = {i: median(r["runs"]) for i in loads if (r := by.get(("load", i))) is not None and not _status(r)}
    for impl in loads:
        res = by.get(("load", impl))
        rec: dict[str, Any] = {"bench": "gpu_load", "impl": impl, **common, "bytes": prep["bytes"]}
        if missing.get(impl):
            emit({**rec, "status": "missing", "reason": missing[impl]})
            continue
        if _status(res):
            failed = failed or (impl.startswith("torchst") and _status(res)["status"] == "error")
            emit({**rec, **_status(res)})
            continue
        assert res is not None
        s = seconds[impl]
        rec.update(seconds=round(s, 4), runs=[round(x, 4) for x in res["runs"]], gb_per_s=_gbps(prep["bytes"], s))
        if ref_gbps:
            rec["fraction_of_pinned_copy"] = round(rec["gb_per_s"] / ref_gbps, 3)
        rec.update(exact=res["exact"], tensors_checked=res["checked"])
        if not res["exact"]:
            rec.update(mismatched=res["mismatched"], missing=res["missing"])
            failed = failed or impl.startswith("torchst")
        for base in ("safetensors.load_file", "fastsafetensors", "transformers"):
            if base in seconds and base != impl and impl.startswith("torchst"):
                rec[f"speedup_vs_{base}"] = round(seconds[base] / s, 3)
        emit(rec)
    blocked: dict[str, float] = {}
    exact_saves: dict[str, bool] = {}
    for impl in saves:
        res = by.get(("save", impl))
        rec = {"bench": "gpu_save", "impl": impl, **common}
        if _status(res):
            failed = failed or (impl.startswith("torchst") and _status(res)["status"] == "error")
            emit({**rec, **_status(res)})
            continue
        assert res is not None
        b = blocked[impl] = median(res["blocked"])
        rec.update(
            checkpoint_bytes=res["bytes"],
            blocked_s=round(b, 4),
            durable_s=round(median(res["durable"]), 4),
            runs=[round(x, 4) for x in res["blocked"]],
            durable_gb_per_s=_gbps(res["bytes"], median(res["durable"])),
        )
        if "exact" in res:
            exact_saves[impl] = res["exact"]
            rec.update(exact=res["exact"], tensors_checked=res["checked"])
            if not res["exact"]:
                rec["mismatched"] = res["mismatched"]
                failed = True
        if "torch.save" in blocked and impl != "torch.save":
            rec["blocked_ratio_vs_torch.save"] = round(b / blocked["torch.save"], 3)
        emit(rec)
    _targets(seconds, blocked, prep["bytes"], {**common}, by, exact_saves, loads)
    return failed


def _targets(
    seconds: dict[str, float],
    blocked: dict[str, float],
    nbytes: int,
    common: dict[str, Any],
    by: dict[tuple[str, str | None], dict[str, Any]],
    exact_saves: dict[str, bool],
    loads: list[str],
) -> None:
    def line(target: str, impl: str, value: float | None, limit: float, higher: bool, why: str | None) -> None:
        rec: dict[str, Any] = {"bench": "gpu_target", "target": target, "impl": impl, **common, "limit": limit}
        if value is None:
            rec.update(value=None, met=None, reason=why)
        else:
            rec.update(value=round(value, 3), met=bool(value >= limit if higher else value <= limit))
        emit(rec)

    for impl in ("torchst.load_state_dict", "torchst.load_model"):
        if impl not in loads:
            continue
        s = seconds.get(impl)
        why = None if s else f"{impl} did not run"
        line("GB/s page cache -> device", impl, _gbps(nbytes, s) if s else None, TARGET_GBPS, True, why)
        for base, limit in (
            ("safetensors.load_file", TARGET_VS_SAFETENSORS),
            ("fastsafetensors", TARGET_VS_FASTSAFETENSORS),
        ):
            b = seconds.get(base)
            why = why or (None if b else f"baseline {base} missing or failed")
            line(f"speedup vs {base}", impl, b / s if (s and b) else None, limit, True, why)
    if {("save", "torchst-async"), ("save", "torchst-sync")} & set(by):
        a, y = blocked.get("torchst-async"), blocked.get("torchst-sync")
        why = None if (a and y) else "torchst-async or torchst-sync did not run"
        line("async blocked / sync blocked", "torchst-async", a / y if (a and y) else None, TARGET_ASYNC, False, why)
    exact = [by[("load", i)].get("exact") for i in loads if i.startswith("torchst") and ("load", i) in by]
    exact += list(exact_saves.values())
    if exact:
        rec = {"bench": "gpu_target", "target": "every torchst tensor bit-exact on the device", "impl": "torchst"}
        emit({**rec, **common, "value": sum(map(bool, exact)), "limit": len(exact), "met": all(map(bool, exact))})


if __name__ == "__main__":
    if not worker_main(sys.argv, work):
        sys.exit(main())
