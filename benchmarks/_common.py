"""Helpers shared by the benchmark scripts: medians, fresh-process runs, RSS, page cache, output.

Every benchmark prints one JSON line per measurement (``emit``), measures each run in a fresh
subprocess (``run_worker``) so import costs and allocator state never leak between runs, and
quotes the median of several runs because the machines we run on are shared and noisy.

    from _common import emit, median, run_worker
    res = [run_worker(__file__, {"bench": "x"}) for _ in range(5)]
    emit({"bench": "x", "median_s": median([r["seconds"] for r in res])})
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

MIB = 1 << 20

__all__ = [
    "MIB",
    "drop_cache",
    "emit",
    "free_bytes",
    "fs_type",
    "median",
    "peak_rss_mib",
    "reset_peak_rss",
    "rss_mib",
    "run_worker",
    "timed",
    "worker_main",
]


def median(xs: Sequence[float]) -> float:
    """Median of the runs (robust to the odd run slowed down by a neighbour)."""
    return float(statistics.median(xs))


def import_torchst() -> Any:
    """``import torchst`` with every public name resolved: its façade is lazy, and imports are never timed."""
    import torchst

    for name in torchst.__all__:
        getattr(torchst, name)
    return torchst


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def emit(record: dict[str, Any]) -> None:
    """Print one measurement as a single JSON line (flushed, so partial runs still report)."""
    print(json.dumps(record, sort_keys=False), flush=True)


# -- memory ---------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _status_mib(field: str) -> float:
    kib = _status_kib(field)
    if kib is None:  # no /proc: the lifetime peak is the best the platform offers
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark (Linux >= 4.0); False if the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size of this process, in MiB (since start or the last reset)."""
    return _status_mib("VmHWM")


# -- files ----------------------------------------------------------------------------------
def drop_cache(path: str) -> bool:
    """Evict ``path`` from the page cache (cold reads); the file must be clean (fsync'd) first."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` ("tmpfs", "ext4", ...; "?" if unknown)."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def free_bytes(path: str) -> int:
    """Bytes available to us on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def scratch_dir(parent: str, prefix: str) -> str:
    """A fresh directory under ``parent`` for one benchmark run's files."""
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


# -- fresh-process runs -----------------------------------------------------------------------
_WORKER_FLAG = "--worker"


def run_worker(
    script: str, job: dict[str, Any] | list[dict[str, Any]], *, timeout: float = 600, pythonpath: str | None = None
) -> Any:
    """Run ``script --worker JOB`` in a fresh interpreter and return the JSON it prints last.

    The worker side is ``worker_main``; a list of jobs runs them all in one process (quick mode).
    ``pythonpath`` is put first on the worker's import path (e.g. another checkout to compare).
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, script, _WORKER_FLAG, json.dumps(job)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("{", "["))]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}) for job {job}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def worker_main(argv: Sequence[str], work: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If ``argv`` asks for a worker, run ``work`` on its job(s), print the JSON result, return True."""
    if len(argv) < 3 or argv[1] != _WORKER_FLAG:
        return False
    job = json.loads(argv[2])
    out: Any = [work(j) for j in job] if isinstance(job, list) else work(job)
    print(json.dumps(out), flush=True)
    return True
