"""Run a test scenario on N gloo ranks (CPU) in fresh processes, with a hard overall timeout.

``launch(tmp_path, 2, "tests/test_distributed.py::scenario_name", timeout=60, **kwargs)`` starts
N interpreters; each joins a process group through a file store, calls
``scenario_name(rank, world, out_dir, **kwargs)`` and exits.  Processes still running at the
deadline are killed and the launch fails, so a bug shows up as a failure, never a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = """
import datetime, importlib.util, json, os, sys
import torch.distributed as dist
path, fn, rank, world, store, out, kwargs = sys.argv[1:]
rank, world = int(rank), int(world)
sys.path.insert(0, os.path.dirname(path))
spec = importlib.util.spec_from_file_location("scenarios", path)
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
try:
    getattr(mod, fn)(rank, world, out, **json.loads(kwargs))
    dist.barrier()
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(1)
# Leave without tearing gloo down: a peer that already exited can make the teardown abort
# ("terminate called without an active exception") after the scenario passed.
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


class Launch:
    def __init__(self, codes: list[int | None], outputs: list[str]) -> None:
        self.codes = codes
        self.outputs = outputs

    def check(self) -> None:
        assert all(c == 0 for c in self.codes), "ranks failed: " + "\n---\n".join(
            f"rank {r} exit {c}:\n{o[-3000:]}" for r, (c, o) in enumerate(zip(self.codes, self.outputs))
        )


def launch(tmp: Path, world: int, target: str, *, timeout: float = 90, **kwargs: Any) -> Launch:
    path, fn = target.split("::")
    if not os.path.isabs(path):
        path = str(Path(__file__).parent.parent / path)
    store = tmp / f"store-{time.monotonic_ns()}"
    out = tmp
    procs = []
    logs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for rank in range(world):
        log = open(tmp / f"rank{rank}-{store.name}.log", "w+b")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = [sys.executable, "-c", WORKER, path, fn, str(rank), str(world), str(store), str(out), json.dumps(kwargs)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * world
    while time.monotonic() < deadline and any(c is None for c in codes):
        for i, p in enumerate(procs):
            codes[i] = p.poll()
        time.sleep(0.05)
    for i, p in enumerate(procs):
        if codes[i] is None:
            p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read().decode("utf-8", "replace"))
        log.close()
    if any(c is None for c in codes):
        raise AssertionError(f"{target} on {world} ranks did not finish within {timeout}s:\n" + "\n---\n".join(outputs))
    return Launch(codes, outputs)
