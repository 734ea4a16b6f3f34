"""Training-loop checkpointing: how long does save() block the loop? (~1 GB model + AdamW state)

One JSON line per implementation, all measured in the same run:

- ``torchst-async``   ``CheckpointManager(async_save=True).save()``: snapshot, then return
- ``torchst-sync``    ``CheckpointManager().save()``: written, fsynced and committed on return
- ``torch.save``      ``torch.save({"model": ..., "optim": ...})`` (pickle; not fsynced)
- ``dcp.save``        ``torch.distributed.checkpoint.save`` without a process group
- ``dcp.async_save``  ``torch.distributed.checkpoint.async_save`` without a process group

All implementations run in one interpreter on one model, alternating round by round (the order
rotates; ``os.sync()`` before each save), ``--runs`` rounds (default 7) after a warm-up round.
``blocked_s`` is the median time the loop waits in the save call (page-cache regime for torch.save
and DCP), with ``blocked_min_s``/``blocked_max_s``; ``durable_s`` (+ min/max) adds the time
until the checkpoint is durable on disk (disk regime: torch.save and DCP get an fsync of their
files; torchst's synchronous save already fsyncs before it returns).  Targets: async blocked <= 0.15x synchronous torchst;
synchronous torchst <= 1.0x torch.save and <= 1.0x dcp.save.

    python benchmarks/bench_training.py            # ~1 GB model (+2 GB AdamW state), 7 rounds
    python benchmarks/bench_training.py --quick    # tiny model, one round: a smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from _common import emit, median, peak_rss_mib, run_worker, worker_main
except ImportError:  # the helpers module is optional; keep the script runnable on its own
    import json
    import subprocess

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)

    def median(xs: list[float]) -> float:
        return float(statistics.median(xs))

    def peak_rss_mib() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run_worker(script: str, job: Any, *, timeout: float = 600) -> Any:
        out = subprocess.run(
            [sys.executable, script, "--worker", json.dumps(job)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return json.loads(out.stdout.splitlines()[-1])

    def worker_main(argv: list[str], work: Any) -> bool:
        if len(argv) < 3 or argv[1] != "--worker":
            return False
        job = json.loads(argv[2])
        print(json.dumps([work(j) for j in job] if isinstance(job, list) else work(job)), flush=True)
        return True


IMPLS = ("torchst-async", "torchst-sync", "torch.save", "dcp.save", "dcp.async_save")


def build(width: int, layers: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # AdamW state (exp_avg, exp_avg_sq) exists, as mid-training
    for p in model.parameters():
        p.grad = None
    return model, opt


class _Saver:
    """One implementation's save: ``save(i)`` returns (seconds blocked, seconds until durable)."""

    def __init__(self, impl: str, work: str, model: Any, opt: Any) -> None:
        self.impl, self.work, self.model, self.opt = impl, work, model, opt
        self.mgr: Any = None
        if impl.startswith("torchst"):
            import torchst

            self.mgr = torchst.CheckpointManager(
                os.path.join(work, impl), keep_last=1, async_save=impl.endswith("async")
            )

    def save(self, i: int) -> tuple[float, float]:
        import torch

        if self.mgr is not None:
            t0 = time.perf_counter()
            self.mgr.save(i, {"model": self.model, "optim": self.opt, "step": i})
            t1 = time.perf_counter()
            self.mgr.wait()
            return t1 - t0, time.perf_counter() - t0
        if self.impl == "torch.save":
            path = os.path.join(self.work, f"ckpt-{i}.pt")
            t0 = time.perf_counter()
            torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict(), "step": i}, path)
            t1 = time.perf_counter()
            _fsync(path)
            t2 = time.perf_counter()
            _remove(os.path.join(self.work, f"ckpt-{i - 1}.pt"))
            return t1 - t0, t2 - t0
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.work, f"{self.impl}-{i}")
        state = {"model": self.model.state_dict(), "optim": self.opt.state_dict()}
        t0 = time.perf_counter()
        if self.impl == "dcp.save":
            dcp.save(state, checkpoint_id=path)
            t1 = time.perf_counter()
        else:
            fut = dcp.async_save(state, checkpoint_id=path)
            t1 = time.perf_counter()
            fut.result()
        for name in os.listdir(path):
            _fsync(os.path.join(path, name))
        t2 = time.perf_counter()
        _remove(os.path.join(self.work, f"{self.impl}-{i - 1}"))
        return t1 - t0, t2 - t0

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _work(job: dict[str, Any]) -> dict[str, Any]:
    """Every implementation in this interpreter, alternating round by round (the order rotates)."""
    impls, root, runs = job["impls"], job["dir"], job["runs"]
    model, opt = build(job["width"], job["layers"])
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # weights + two AdamW moments
    work = tempfile.mkdtemp(prefix="rounds-", dir=root)
    blocked: dict[str, list[float]] = {i: [] for i in impls}
    durable: dict[str, list[float]] = {i: [] for i in impls}
    savers = [_Saver(i, work, model, opt) for i in impls]
    try:
        for i in range(runs + 1):  # round 0 warms up (allocates the snapshot buffers once, as in a real run)
            k = i % len(savers)
            for saver in savers[k:] + savers[:k]:
                os.sync()  # the previous save's dirty pages are not written back during this one
                b, d = saver.save(i)
                _update(model)  # the loop moves on; an async snapshot must not be affected
                if i:
                    blocked[saver.impl].append(b)
                    durable[saver.impl].append(d)
    finally:
        for saver in savers:
            saver.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"blocked": blocked, "durable": durable, "bytes": nbytes, "peak_rss_mib": peak_rss_mib()}


def _update(model: Any) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_dir() -> str:
    for cand in (os.environ.get("TMPDIR"), "/var/tmp", tempfile.gettempdir()):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK):
            return cand
    return "."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, all implementations in one process")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: /var/tmp)")
    p.add_argument("--runs", type=int, default=None, help="timed rounds (default 7, quick 1)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(IMPLS)}")
    args = p.parse_args(argv)
    runs = args.runs or (1 if args.quick else 7)
    # 16 x Linear(4096, 4096) = 268M float32 parameters = 1.07 GB (+ 2.15 GB of AdamW moments).
    width, layers = (256, 4) if args.quick else (4096, 16)
    impls = args.only.split(",") if args.only else list(IMPLS)
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    root = tempfile.mkdtemp(prefix="torchst-bench-training-", dir=args.dir or _default_dir())
    try:
        job = {"impls": impls, "dir": root, "runs": runs, "width": width, "layers": layers}
        res = run_worker(os.path.abspath(__file__), job, timeout=3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    by_impl = {i: {"blocked": res["blocked"][i], "durable": res["durable"][i]} for i in impls}
    blocked = {k: median(r["blocked"]) for k, r in by_impl.items()}
    targets = {
        "torchst-async": ("torchst-sync", 0.15),
        "torchst-sync": ("torch.save", 1.0),
        "dcp.save": ("torchst-sync", None),
    }
    for impl, r in by_impl.items():
        rec: dict[str, Any] = {
            "bench": "training_save",
            "impl": impl,
            "quick": args.quick,
            "checkpoint_bytes": res["bytes"],
            "blocked_s": round(blocked[impl], 4),
            "blocked_min_s": round(min(r["blocked"]), 4),
            "blocked_max_s": round(max(r["blocked"]), 4),
            "durable_s": round(median(r["durable"]), 4),
            "durable_min_s": round(min(r["durable"]), 4),
            "durable_max_s": round(max(r["durable"]), 4),
            "runs": [round(x, 4) for x in r["blocked"]],
            "peak_rss_mib": round(res["peak_rss_mib"], 1),  # of the process running every implementation
            "baseline": "torch.save",
        }
        if "torch.save" in blocked:
            rec["ratio_vs_baseline"] = round(blocked[impl] / blocked["torch.save"], 3)
        base, limit = targets.get(impl, (None, None))
        if base in blocked and limit is not None:
            rec["target"] = f"blocked <= {limit}x {base}"
            rec["ratio_vs_target_base"] = round(blocked[impl] / blocked[base], 3)
            rec["met"] = bool(blocked[impl] <= limit * blocked[base])
        if impl == "torchst-sync" and "torch.save" in by_impl:
            # torch.save returns before its bytes are durable; this compares like with like.
            rec["ratio_vs_torch_save_fsynced"] = round(blocked[impl] / median(by_impl["torch.save"]["durable"]), 3)
        if impl == "torchst-sync" and "dcp.save" in blocked:
            rec["ratio_vs_dcp"] = round(blocked[impl] / blocked["dcp.save"], 3)
            rec["met_vs_dcp"] = bool(blocked[impl] <= blocked["dcp.save"])
        emit(rec)


if __name__ == "__main__":
    if not worker_main(sys.argv, _work):
        main()
