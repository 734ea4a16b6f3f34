"""Worker side of bench_gpu.py: the checkpoint's contents, bit-exact checks, and the timed jobs.

Each job runs in a fresh interpreter started by bench_gpu.py (``--worker``); this module imports
torch, torchst and the baselines lazily, inside the jobs, so that no import is ever timed.

    from _gpu_jobs import check_exact, work
    check_exact(loaded, names, "cuda:0")   # {"exact": True, "checked": 21, ...}
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

GB = 10**9
FULL = {"vocab": 32000, "hidden": 4096, "inter": 11008, "heads": 32, "shard": "2GB"}  # Llama-7B widths
TINY = {"vocab": 256, "hidden": 64, "inter": 176, "heads": 4, "layers": 2, "shard": "40KB"}
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


# ---------------------------------------------------------------------------------------------
# checkpoint contents: every tensor regenerates from its name, on the device that checks it
# ---------------------------------------------------------------------------------------------
def expected(name: str, shape: tuple[int, ...], device: Any) -> Any:
    """The bf16 values written for ``name`` (seeded by the name, generated on ``device``)."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(TIED.get(name, name).encode()))
    return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)


def check_exact(tensors: Mapping[str, Any], names: set[str], device: Any, cast: Any = None) -> dict[str, Any]:
    """Compare every tensor bit for bit, on ``device``, with what was written (optionally cast)."""
    import torch

    dev = torch.device(device)
    bad: list[str] = []
    seen: set[str] = set()
    required = names - set(TIED)  # file-level loaders return stored tensors only, not tied aliases
    for name, t in tensors.items():
        if name not in names:
            continue
        seen.add(name)
        want = expected(name, tuple(t.shape), dev)
        if cast is not None:
            want = want.to(cast)
        if t.device != dev or t.dtype != want.dtype or t.shape != want.shape:
            bad.append(f"{name} ({t.dtype} on {t.device})")
            continue
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        if not torch.equal(t.view(bits), want.view(bits)):  # bits, not values: NaN patterns count too
            bad.append(name)
    missing = sorted(required - seen)
    return {"exact": not bad and not missing, "checked": len(seen), "mismatched": bad[:5], "missing": missing[:5]}


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: Any) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cfg_for(gb: float) -> dict[str, Any]:
    cfg = dict(FULL)
    h, i, v = cfg["hidden"], cfg["inter"], cfg["vocab"]
    per_layer = 2 * (4 * h * h + 3 * h * i + 2 * h)
    cfg["layers"] = max(1, round((gb * GB - 2 * (v * h + h)) / per_layer))
    return cfg


def _meta_model(cfg: dict[str, Any]) -> Any:
    import torch
    from bench_sharded import _model_class

    with torch.device("meta"):
        return _model_class()(cfg).to(torch.bfloat16)


def _shards(ckpt: str) -> list[str]:
    return [os.path.join(ckpt, n) for n in sorted(os.listdir(ckpt)) if n.endswith(".safetensors")]


def _warm(ckpt: str) -> None:
    for path in _shards(ckpt):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


# ---------------------------------------------------------------------------------------------
# worker jobs
# ---------------------------------------------------------------------------------------------
def _prepare(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import torchst

    dev, cfg, ckpt = torch.device(job["device"]), job["cfg"], job["ckpt"]
    model = _meta_model(cfg).to_empty(device=dev)
    model.lm_head.weight = model.model.embed_tokens.weight  # to_empty re-creates the tied parameter
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied: once, under the embedding's name
            p.copy_(expected(name, tuple(p.shape), dev))
    _sync(dev)
    t0 = time.perf_counter()
    torchst.save_model(model, ckpt, max_shard_size=cfg["shard"])  # device -> disk through torchst
    seconds = time.perf_counter() - t0
    if importlib.util.find_spec("transformers"):
        from bench_sharded import _llama_config

        _llama_config(cfg).save_pretrained(ckpt)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"tensors": len(model.state_dict()), "bytes": nbytes, "shards": len(_shards(ckpt)), "save_model_s": seconds}


def _copy(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    dev = torch.device(job["device"])
    cuda = dev.type == "cuda"
    n, runs = job["bytes"], job["runs"]
    out: dict[str, Any] = {}
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    for kind, pin in (("pinned_h2d", True), ("pageable_h2d", False), ("d2h_pinned", True)):
        if pin and not cuda:
            continue  # no pinned memory without an accelerator: the pageable line is the reference
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pin and cuda)
        host.fill_(7)
        src, to = (dst, host) if kind.startswith("d2h") else (host, dst)
        secs = []
        for r in range(runs + 1):
            _sync(dev)
            t0 = time.perf_counter()
            to.copy_(src, non_blocking=cuda)
            _sync(dev)
            if r:  # run 0 warms up (first-touch, driver mappings)
                secs.append(time.perf_counter() - t0)
        ok = bool(torch.equal(dst[:: max(1, n // 4096)].cpu(), host[:: max(1, n // 4096)]))
        out[kind] = {"runs": secs, "exact": ok}
        del host, src, to
    return {"copies": out, "bytes": n}


def _load_fn(impl: str, job: dict[str, Any]) -> Callable[[], tuple[dict[str, Any], Any]]:
    """A function that loads the checkpoint onto the device: (name -> tensor, object to keep alive)."""
    import torch

    dev, ckpt = torch.device(job["device"]), job["ckpt"]
    files = _shards(ckpt)
    if impl.startswith("torchst.load_state_dict"):
        import torchst

        cast = torch.float16 if impl.endswith("+fp16") else None
        return lambda: (torchst.load_state_dict(ckpt, device=dev, dtype=cast), None)
    if impl == "torchst.load_model":
        import torchst

        def load_model() -> tuple[dict[str, Any], Any]:
            model = _meta_model(job["cfg"])
            torchst.load_model(model, ckpt, device=dev)
            return model.state_dict(), model

        return load_model
    if impl == "torchst.load_file":
        import torchst

        return lambda: ({k: v for f in files for k, v in torchst.load_file(f, device=dev).items()}, None)
    if impl == "safetensors.load_file":
        import safetensors.torch

        return lambda: ({k: v for f in files for k, v in safetensors.torch.load_file(f, device=str(dev)).items()}, None)
    if impl == "transformers":
        import transformers

        device_map = "cuda" if dev.type == "cuda" and not dev.index else str(dev)

        def from_pretrained() -> tuple[dict[str, Any], Any]:
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device_map)
            return model.state_dict(), model

        return from_pretrained
    if impl == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        def fast() -> tuple[dict[str, Any], Any]:
            # nogds: GPUDirect Storage needs a kernel module most machines (and VMs) lack.
            f = fastsafe_open(files, framework="pt", device=str(dev), nogds=True)
            return {k: f.get_tensor(k) for k in f.keys()}, f  # noqa: SIM118 - no __iter__

        return fast
    if impl == "runai_model_streamer":
        from runai_model_streamer import SafetensorsStreamer

        def runai() -> tuple[dict[str, Any], Any]:
            out = {}
            with SafetensorsStreamer() as streamer:
                streamer.stream_files(files)
                for name, t in streamer.get_tensors():  # host tensors; the device copy is ours
                    out[name] = t.to(dev, non_blocking=dev.type == "cuda")
            return out, None

        return runai
    raise ValueError(f"unknown load implementation {impl!r}")


def _load(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    impl, dev = job["impl"], job["device"]
    load = _load_fn(impl, job)  # imports happen here, untimed
    cast = torch.float16 if impl.endswith("+fp16") else None
    names = set(_meta_model(job["cfg"]).state_dict())
    _warm(job["ckpt"])
    secs: list[float] = []
    checks: list[dict[str, Any]] = []
    for _ in range(job["runs"]):
        _release(dev)
        t0 = time.perf_counter()
        tensors, keep = load()
        _sync(dev)
        secs.append(time.perf_counter() - t0)
        checks.append(check_exact(tensors, names, dev, cast))
        closer = getattr(keep, "__exit__", None)
        if closer is not None and not isinstance(keep, torch.nn.Module):
            closer(None, None, None)
        del tensors, keep
    bad = next((c for c in checks if not c["exact"]), checks[-1])
    return {"runs": secs, **bad}


def _train_state(dev: Any, width: int, layers: int, seed: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # AdamW moments exist on the device, as mid-training
    for p in model.parameters():
        p.grad = None
    return model, opt


def _tensors_of(model: Any, opt: Any) -> dict[str, Any]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.detach().clone() for k, v in st.items() if hasattr(v, "dtype")})
    return out


def _save(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    impl, dev, runs = job["impl"], torch.device(job["device"]), job["runs"]
    model, opt = _train_state(dev, job["width"], job["layers"], seed=0)
    nbytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())  # weights + two moments
    work = tempfile.mkdtemp(prefix=f"{impl}-", dir=job["dir"])
    blocked: list[float] = []
    durable: list[float] = []
    exact: dict[str, Any] | None = None
    try:
        mgr = None
        if impl.startswith("torchst"):
            import torchst

            mgr = torchst.CheckpointManager(os.path.join(work, "ckpt"), keep_last=1, async_save=impl.endswith("async"))
        for i in range(runs + 1):
            ref = _tensors_of(model, opt) if mgr is not None and i == runs else None
            _sync(dev)  # the training step has finished on the device
            t0 = time.perf_counter()
            finish = _save_once(impl, mgr, model, opt, work, i)
            t1 = time.perf_counter()
            finish()
            t2 = time.perf_counter()
            with torch.no_grad():  # the loop moves on; an async snapshot must not see this
                for p in model.parameters():
                    p.mul_(0.999)
            if i:  # run 0 warms up (allocates the snapshot buffers once, as in a real run)
                blocked.append(t1 - t0)
                durable.append(t2 - t0)
            if ref is not None and mgr is not None:
                exact = _restore_check(mgr, ref, job, dev)
        if mgr is not None:
            mgr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res: dict[str, Any] = {"blocked": blocked, "durable": durable, "bytes": nbytes}
    if exact is not None:
        res.update(exact)
    return res


def _save_once(impl: str, mgr: Any, model: Any, opt: Any, work: str, i: int) -> Callable[[], None]:
    """Start one save; return what finishes it (durable on disk when that returns)."""
    import torch

    if mgr is not None:
        mgr.save(i, {"model": model, "optim": opt, "step": i})
        return mgr.wait  # torchst's saves fsync before they commit
    if impl == "torch.save":
        path = os.path.join(work, f"ckpt-{i}.pt")
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": i}, path)
        return lambda: _fsync_all([path], drop=os.path.join(work, f"ckpt-{i - 1}.pt"))
    import torch.distributed.checkpoint as dcp

    path = os.path.join(work, f"dcp-{i}")
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    fut = dcp.save(state, checkpoint_id=path) if impl == "dcp.save" else dcp.async_save(state, checkpoint_id=path)

    def finish() -> None:
        if impl == "dcp.async_save":
            fut.result()
        _fsync_all([os.path.join(path, n) for n in os.listdir(path)], drop=os.path.join(work, f"dcp-{i - 1}"))

    return finish


def _fsync_all(paths: list[str], drop: str) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if os.path.isdir(drop):
        shutil.rmtree(drop)
    elif os.path.exists(drop):
        os.unlink(drop)


def _restore_check(mgr: Any, ref: dict[str, Any], job: dict[str, Any], dev: Any) -> dict[str, Any]:
    """Restore the step just saved into a fresh model + optimizer; compare bits with ``ref``, on the device."""
    import torch

    mgr.wait()
    model, opt = _train_state(dev, job["width"], job["layers"], seed=1)  # different values everywhere
    mgr.restore({"model": model, "optim": opt})
    got = _tensors_of(model, opt)
    bad = [
        k
        for k, v in ref.items()
        if k not in got or got[k].device != v.device or not torch.equal(got[k].view(-1), v.view(-1))
    ]
    return {"exact": not bad, "checked": len(ref), "mismatched": bad[:5], "missing": []}


def work(job: dict[str, Any]) -> dict[str, Any]:
    kind = job["kind"]
    try:
        if kind == "prepare":
            return _prepare(job)
        if kind == "copy":
            return _copy(job)
        return _load(job) if kind == "load" else _save(job)
    except Exception as e:
        if kind == "prepare":
            raise
        return {"error": f"{type(e).__name__}: {e}"[:800]}
    finally:
        _release(job["device"])
