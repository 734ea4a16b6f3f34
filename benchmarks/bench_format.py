"""Format-core benchmarks: torchst beside safetensors, torch.save/torch.load(mmap=True), readinto.

    python benchmarks/bench_format.py [--quick] [--dir DIR] [--tmpfs DIR] [--runs N] [--only a,b]

Prints one JSON line per measurement.  Every run happens in a fresh interpreter (imports are not
timed), implementations alternate round by round (the order rotates), and lines report the
median, min and max of ``--runs`` rounds (default 7), the peak RSS and the ratio of medians against
the baseline measured in the same invocation.  Scenarios (targets from the format-core issue):

- ``lazy_10k``     safe_open + get_tensor of every tensor of a 10,000-tensor file (<= 0.5x safetensors)
- ``load_file_10k`` load_file of the same 10,000-tensor file (<= 0.5x safetensors.torch.load_file)
- ``load_touch``   load a ~2 GiB file (256 tensors) and read every byte with ``t.sum()`` (<= 1.0x)
- ``save``         save the ~2 GiB dict (<= 1.0x, extra peak RSS <= 64 MiB): page-cache regime on
                   tmpfs and on disk (``os.sync()`` before each save), and the disk regime
                   ``save_disk_durable`` (torchst ``fsync=True``; the baselines' fsync is timed too)
- ``read``         pread / eager loads vs a plain sequential ``readinto`` of the same file (>= 0.9x
                   throughput), warm (tmpfs) and cold (disk, page cache dropped with fadvise)

``--quick`` shrinks every file and runs all jobs in one worker process (a smoke test, not numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    MIB,
    drop_cache,
    emit,
    free_bytes,
    fs_type,
    import_torchst,
    median,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    run_worker,
    scratch_dir,
    timed,
    worker_main,
)

SCRIPT = os.path.abspath(__file__)
GIB = 1 << 30
SCENARIOS = ("lazy_10k", "load_file_10k", "load_touch", "save", "read")
# Targets: (baseline impl, comparison, limit); "time" ratios are impl/baseline seconds,
# "throughput" ratios are baseline/impl seconds.
TARGETS: dict[str, tuple[str, str, float]] = {
    "lazy_10k": ("safetensors", "time", 0.5),
    "load_file_10k": ("safetensors", "time", 0.5),
    "load_touch": ("safetensors", "time", 1.0),
    "save": ("safetensors", "time", 1.0),
    "read": ("readinto", "throughput", 0.9),
}
EXTRA_RSS_LIMIT_MIB = 64


# ---------------------------------------------------------------------------------------------
# worker side: runs in a fresh interpreter, times exactly one operation
# ---------------------------------------------------------------------------------------------
def _small_dict(n: int, numel: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i // 10}.p{i % 10}.weight": torch.randn(numel, generator=g) for i in range(n)}


def _big_dict(n: int, rows: int, cols: int, *, random: bool) -> dict[str, Any]:
    import torch

    out = {}
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        t = torch.empty(rows, cols)
        # fill_ touches every page (resident memory) and is much faster than randn.
        out[f"model.layers.{i:03d}.weight"] = t.normal_(generator=g) if random else t.fill_(i * 0.5)
    return out


def _prepare(job: dict[str, Any]) -> dict[str, Any]:
    import safetensors.torch
    import torch

    for spec in job["files"]:
        if spec["set"] == "small":
            d = _small_dict(spec["n"], spec["numel"])
        else:
            d = _big_dict(spec["n"], spec["rows"], spec["cols"], random=True)
        for fmt, path in spec["paths"].items():
            if fmt == "safetensors":
                safetensors.torch.save_file(d, path)
            else:
                torch.save(d, path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)  # clean pages, so cold runs can drop them from the cache
            os.close(fd)
        del d
    return {"seconds": 0.0}


def _load(impl: str, backend: str | None, path: str) -> dict[str, Any]:
    if impl == "torchst":
        import torchst

        return torchst.load_file(path, backend=backend or "mmap")
    if impl == "safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(path, backend=backend or "mmap")
    import torch

    return dict(torch.load(path, mmap=True, weights_only=True))


def _readinto(path: str) -> bytearray:
    size = os.path.getsize(path)
    buf = bytearray(size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{path}: short read at {done}")
            done += got
    return buf


def _work(job: dict[str, Any]) -> dict[str, Any]:
    kind = job["kind"]
    if kind == "prepare":
        return _prepare(job)
    import safetensors
    import safetensors.torch
    import torch

    torchst = import_torchst()

    if job.get("tree") and not os.path.abspath(torchst.__file__).startswith(os.path.abspath(job["tree"])):
        raise RuntimeError(f"expected torchst from {job['tree']}, imported {torchst.__file__}")
    impl, backend, path = job["impl"], job.get("backend"), job.get("path", "")
    keep: list[Any] = []
    if kind == "save":
        d = _big_dict(job["n"], job["rows"], job["cols"], random=False)
        os.sync()  # earlier runs' dirty pages must not be written back during this one
    if job.get("cold"):
        drop_cache(path)
    reset_peak_rss()
    base = rss_mib()

    if kind == "lazy":

        def op() -> None:
            if impl == "torch":
                sd = torch.load(path, mmap=True, weights_only=True)
                keep.extend(sd[k] for k in sd)
                return
            opener = torchst.safe_open if impl == "torchst" else safetensors.safe_open
            with opener(path, framework="pt") as f:
                keep.extend(f.get_tensor(k) for k in f.keys())  # noqa: SIM118 (the reference API)

    elif kind == "touch":

        def op() -> None:
            tensors = _load(impl, backend, path)
            keep.append(tensors)
            for t in tensors.values():
                t.sum()

    elif kind == "read":

        def op() -> None:
            keep.append(_readinto(path) if impl == "readinto" else _load(impl, backend, path))

    elif kind == "save":
        out = job["out"]

        durable = bool(job.get("durable"))

        def op() -> None:
            if impl == "torchst":
                torchst.save_file(d, out, fsync=durable)
                return
            if impl == "safetensors":
                safetensors.torch.save_file(d, out)
            else:
                torch.save(d, out)
            if durable:  # no fsync option in the baselines: make their file durable too (timed)
                fd = os.open(out, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    else:
        raise ValueError(f"unknown job kind {kind!r}")

    seconds = timed(op)
    peak = peak_rss_mib()
    if kind == "save":
        os.unlink(job["out"])
    return {"seconds": seconds, "peak_rss_mib": peak, "base_rss_mib": base, "extra_rss_mib": peak - base}


# ---------------------------------------------------------------------------------------------
# parent side: plan files and jobs, run them, print one line per (bench, impl)
# ---------------------------------------------------------------------------------------------
def _pick_sizes(quick: bool, tmpfs: str | None) -> tuple[dict[str, int], str | None]:
    if quick:
        return {"small_n": 200, "small_numel": 64, "big_n": 8, "rows": 128, "cols": 256}, None
    sizes = {"small_n": 10_000, "small_numel": 256, "big_n": 256, "rows": 2048, "cols": 1024}
    note = None
    if tmpfs is not None:
        # tmpfs holds the .safetensors and .pt fixtures plus one save output at a time.
        tensor_bytes = sizes["rows"] * sizes["cols"] * 4
        free = free_bytes(tmpfs) - 512 * MIB
        fits = max(8, min(sizes["big_n"], free // (3 * tensor_bytes)))
        if fits < sizes["big_n"]:
            note = (
                f"{tmpfs} has only {free_bytes(tmpfs) / GIB:.1f} GiB free: the large file is reduced to "
                f"{fits} tensors ({fits * tensor_bytes / GIB:.2f} GiB) instead of {sizes['big_n']}"
            )
            sizes["big_n"] = int(fits)
    return sizes, note


def _default_disk_dir() -> str:
    tmp = tempfile.gettempdir()
    return tmp if fs_type(tmp) not in ("tmpfs", "ramfs") else "/var/tmp"


def _group(bench: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    return {"bench": bench, "lines": lines}


def _plan(
    args: argparse.Namespace, sizes: dict[str, int], tmp: str, disk: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    small = {"set": "small", "n": sizes["small_n"], "numel": sizes["small_numel"]}
    big = {"set": "big", "n": sizes["big_n"], "rows": sizes["rows"], "cols": sizes["cols"]}
    f = {
        "small_st": os.path.join(tmp, "small.safetensors"),
        "small_pt": os.path.join(tmp, "small.pt"),
        "big_st": os.path.join(tmp, "big.safetensors"),
        "big_pt": os.path.join(tmp, "big.pt"),
        "disk_st": os.path.join(disk, "big.safetensors"),
    }
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    files = []
    if "lazy_10k" in only or "load_file_10k" in only:
        files.append({**small, "paths": {"safetensors": f["small_st"], "pt": f["small_pt"]}})
    big_paths = {}
    if "load_touch" in only or "read" in only:
        big_paths["safetensors"] = f["big_st"]
    if "load_touch" in only:
        big_paths["pt"] = f["big_pt"]
    if big_paths:
        files.append({**big, "paths": big_paths})
    if "read" in only:
        files.append({**big, "paths": {"safetensors": f["disk_st"]}})
    prepare = {"kind": "prepare", "files": files}

    groups = []
    loc = {"tmpfs": (tmp, "warm"), "disk": (disk, "cold")}
    if "lazy_10k" in only:
        groups.append(
            _group(
                "lazy_10k",
                [
                    {"impl": "safetensors", "kind": "lazy", "path": f["small_st"]},
                    {"impl": "torchst", "kind": "lazy", "path": f["small_st"]},
                    {"impl": "torch", "kind": "lazy", "path": f["small_pt"]},
                ],
            )
        )
    if "load_file_10k" in only:
        groups.append(
            _group(
                "load_file_10k",
                [
                    {"impl": "safetensors", "kind": "read", "path": f["small_st"]},
                    {"impl": "torchst", "kind": "read", "path": f["small_st"]},
                ],
            )
        )
    if "load_touch" in only:
        lines = [{"impl": "safetensors", "kind": "touch", "path": f["big_st"]}]
        lines += [
            {"impl": "torchst", "backend": b, "kind": "touch", "path": f["big_st"]} for b in ("mmap", "pread", "eager")
        ]
        lines.append({"impl": "torch", "kind": "touch", "path": f["big_pt"]})
        groups.append(_group("load_touch", lines))
    if "save" in only:
        # page-cache regime on tmpfs and on disk (dirty pages flushed before each save), and the
        # disk regime: durable writes (fsync timed)
        for where, durable in (("tmpfs", False), ("disk", False), ("disk", True)):
            out = os.path.join(loc[where][0], "out.safetensors")
            lines = [
                {
                    "impl": impl,
                    "kind": "save",
                    "out": out,
                    "fs": where,
                    "durable": durable,
                    "n": big["n"],
                    "rows": big["rows"],
                    "cols": big["cols"],
                }
                for impl in ("safetensors", "torchst", "torch")
            ]
            groups.append(_group(f"save_{where}{'_durable' if durable else ''}", lines))
    if "read" in only:
        for where, (d, cache) in loc.items():
            path = f["big_st"] if where == "tmpfs" else f["disk_st"]
            lines = [{"impl": "readinto", "kind": "read", "path": path}]
            lines += [{"impl": "torchst", "backend": b, "kind": "read", "path": path} for b in ("pread", "eager")]
            lines.append({"impl": "safetensors", "backend": "pread", "kind": "read", "path": path})
            for ln in lines:
                ln["fs"], ln["cold"] = where, cache == "cold"
            groups.append(_group(f"read_{where}_{cache}", lines))
    return prepare, groups


def _summarize(group: dict[str, Any], results: list[list[dict[str, Any]]], meta: dict[str, Any]) -> None:
    bench = group["bench"]
    scenario = next(s for s in SCENARIOS if bench.startswith(s))
    base_impl, kind, limit = TARGETS[scenario]
    medians = [median([r["seconds"] for r in rs]) for rs in results]
    base_t = next(
        m for ln, m in zip(group["lines"], medians) if ln["impl"] == base_impl and ln.get("backend") in (None, "mmap")
    )
    torch_t = next((m for ln, m in zip(group["lines"], medians) if ln["impl"] == "torch"), None)
    for ln, rs, med in zip(group["lines"], results, medians):
        ratio = med / base_t if kind == "time" else base_t / med
        extra = median([r["extra_rss_mib"] for r in rs])
        rec: dict[str, Any] = {
            "bench": bench,
            "impl": ln["impl"],
            "backend": ln.get("backend"),
            "median_s": round(med, 5),
            "min_s": round(min(r["seconds"] for r in rs), 5),
            "max_s": round(max(r["seconds"] for r in rs), 5),
            "runs": [round(r["seconds"], 5) for r in rs],
            "peak_rss_mib": round(median([r["peak_rss_mib"] for r in rs]), 1),
            "extra_rss_mib": round(extra, 1),
            "baseline": base_impl,
            "ratio_vs_baseline": round(ratio, 3),
            "ratio_kind": "seconds impl/baseline" if kind == "time" else "throughput impl/baseline",
        }
        if torch_t is not None and ln["impl"] != "torch":
            rec["ratio_vs_torch"] = round(med / torch_t, 3)
        if ln.get("tree"):
            rec["torchst_tree"] = ln["tree"]
        # load_touch's target is for the default (mmap) backend; pread/eager lines are context.
        if ln["impl"] == "torchst" and (scenario != "load_touch" or ln.get("backend") == "mmap"):
            cmp = "<=" if kind == "time" else ">="
            rec["target"] = f"{cmp} {limit}x {base_impl}"
            met = ratio <= limit if kind == "time" else ratio >= limit
            if scenario == "save":
                rec["target"] += f", extra peak RSS <= {EXTRA_RSS_LIMIT_MIB} MiB"
                met = met and extra <= EXTRA_RSS_LIMIT_MIB
            rec["met"] = met
        else:
            rec["target"] = None
        if "path" in ln or "out" in ln:
            p = ln.get("path") or ln["out"]
            rec["fs"] = fs_type(os.path.dirname(p))
        if scenario in ("read", "load_touch") and ln.get("path"):
            size = os.path.getsize(ln["path"])
            rec["size_bytes"] = size
            rec["gib_per_s"] = round(size / GIB / med, 3)
        rec["cache"] = "cold" if ln.get("cold") else "warm"
        rec.update(meta)
        emit(rec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny files, one worker process: a smoke test")
    p.add_argument("--dir", help="disk directory for on-disk scenarios (default: a non-tmpfs temp dir)")
    p.add_argument("--tmpfs", default="/dev/shm", help="tmpfs directory (default /dev/shm)")
    p.add_argument("--runs", type=int, default=None, help="rounds per measurement (default 7, quick 1)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument(
        "--also-tree",
        metavar="DIR",
        help="also measure the torchst package found in DIR (e.g. an older checkout), interleaved",
    )
    args = p.parse_args(argv)
    if args.also_tree and args.quick:
        p.error("--also-tree needs fresh processes; it cannot be combined with --quick")
    runs = args.runs or (1 if args.quick else 7)

    tmpfs_root = args.tmpfs if os.path.isdir(args.tmpfs) else None
    tmpfs_note = None if tmpfs_root else f"{args.tmpfs} does not exist: 'tmpfs' scenarios use the temp dir"
    if tmpfs_root and fs_type(tmpfs_root) not in ("tmpfs", "ramfs"):
        tmpfs_note = f"{tmpfs_root} is {fs_type(tmpfs_root)}, not tmpfs"
    sizes, size_note = _pick_sizes(args.quick, tmpfs_root)
    disk_root = args.dir or _default_disk_dir()
    tmp = scratch_dir(tmpfs_root or tempfile.gettempdir(), "torchst-bench-")
    disk = scratch_dir(disk_root, "torchst-bench-")
    meta: dict[str, Any] = {
        "quick": args.quick,
        "process": "one worker for all runs" if args.quick else "fresh process per run",
        "cpus": os.cpu_count(),
        "n_small": sizes["small_n"],
        "n_large": sizes["big_n"],
        "large_bytes": sizes["big_n"] * sizes["rows"] * sizes["cols"] * 4,
    }
    for note in (tmpfs_note, size_note):
        if note:
            meta.setdefault("note", []).append(note)
    try:
        prepare, groups = _plan(args, sizes, tmp, disk)
        if args.also_tree:
            tree = os.path.abspath(args.also_tree)
            for g in groups:
                g["lines"] = [
                    x for ln in g["lines"] for x in ([ln, {**ln, "tree": tree}] if ln["impl"] == "torchst" else [ln])
                ]
        jobs_per_group = []
        for g in groups:
            jobs_per_group.append([{k: v for k, v in ln.items() if k != "fs"} for ln in g["lines"]])
        if args.quick:
            flat = [prepare] + [j for jobs in jobs_per_group for j in jobs for _ in range(runs)]
            out = run_worker(SCRIPT, flat)[1:]
            for g, jobs in zip(groups, jobs_per_group):
                res = [out[i * runs : (i + 1) * runs] for i in range(len(jobs))]
                del out[: len(jobs) * runs]
                _summarize(g, res, meta)
            return
        run_worker(SCRIPT, prepare, timeout=1800)
        for g, jobs in zip(groups, jobs_per_group):
            res: list[list[dict[str, Any]]] = [[] for _ in jobs]
            # Interleave implementations so slow phases of a noisy machine hit all of them, and
            # rotate who goes first: a run inherits the page-cache and free-memory state its
            # predecessor left behind.
            for r in range(runs):
                for k in range(len(jobs)):
                    i = (r + k) % len(jobs)
                    job = jobs[i]
                    res[i].append(run_worker(SCRIPT, job, pythonpath=job.get("tree")))
            _summarize(g, res, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    if not worker_main(sys.argv, _work):
        main()
