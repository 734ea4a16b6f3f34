"""Every CUDA path, bit for bit on the device: devices, maps, staging, casts, meta models, async snapshots.

Tests marked ``gpu`` skip without CUDA (conftest); the two-device ones also skip on one GPU.
The errors for devices that do not exist are checked on every machine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchst
from torchst import CheckpointManager
from torchst.errors import DeviceMapError

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included), compared where ``a`` lives."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    b = b.to(a.device)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(BITS[a.element_size()]), b.contiguous().view(BITS[a.element_size()]))


def cuda0() -> torch.device:
    return torch.device("cuda", 0)


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(37, 5, generator=g),
        "bf16": torch.randn(301, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, 3, generator=g).half(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "i8": torch.randint(-128, 127, (33,), dtype=torch.int8, generator=g),
        "flag": torch.rand(11, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture(scope="module")
def big_tensors() -> dict[str, torch.Tensor]:
    """~110 MB in odd sizes: several staging-buffer chunks per tensor, so the buffer ring wraps."""
    g = torch.Generator().manual_seed(1)
    return {
        "big.a": torch.randn(10_500_001, generator=g),
        "big.b": torch.randint(-128, 127, ((33 << 20) + 3,), dtype=torch.int8, generator=g),
        "big.c": torch.randn(17_000_001, generator=g).to(torch.bfloat16),
    }


class Net(nn.Module):
    """Tied embedding/head, a computed non-persistent buffer and a persistent int buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 64)
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 64), persistent=False)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = torch.relu(block(h))
        out: torch.Tensor = self.head(self.norm(h))
        return out


@pytest.fixture
def net_ckpt(tmp_path: Path) -> Iterator[tuple[Net, Path]]:
    torch.manual_seed(0)
    net = Net()
    torchst.save_model(net, tmp_path / "ckpt", max_shard_size=40_000)  # several shards
    yield net, tmp_path / "ckpt"


def host_stats() -> dict[str, int]:
    """The pinned-memory allocator's counters (skip where this torch does not keep them)."""
    stats = getattr(torch.cuda, "host_memory_stats", dict)()
    if "active_requests.allocated" not in stats:
        pytest.skip("this torch does not report pinned-memory statistics (torch.cuda.host_memory_stats)")
    return dict(stats)


# ---------------------------------------------------------------------------------------------
# every machine: devices that do not exist
# ---------------------------------------------------------------------------------------------
def _absent_device() -> tuple[str, str]:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"cuda:{n}", rf"'cuda:{n}' does not exist: this machine has {n} CUDA device"
    return "cuda:7", r"'cuda:7' was requested but CUDA is not available"


@pytest.mark.parametrize(
    "entry",
    ["load_file", "load_file-pread", "safe_open", "load_state_dict", "state_dict_map", "load_model", "model_map"],
)
def test_a_device_that_does_not_exist_is_a_clear_error_before_any_read(tmp_path: Path, entry: str) -> None:
    bad, message = _absent_device()
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.ones(3)}, path)
    model = nn.Linear(3, 1, bias=False)
    calls: dict[str, Any] = {
        "load_file": lambda: torchst.load_file(path, device=bad),
        "load_file-pread": lambda: torchst.load_file(path, device=bad, backend="pread"),
        "safe_open": lambda: torchst.safe_open(path, device=bad),
        "load_state_dict": lambda: torchst.load_state_dict(path, device=bad),
        "state_dict_map": lambda: torchst.load_state_dict(path, device_map={"": bad}),
        "load_model": lambda: torchst.load_model(model, path, device=bad, strict=False),
        "model_map": lambda: torchst.load_model(model, path, device_map={"": bad}, strict=False),
    }
    with pytest.raises(DeviceMapError, match=message) as info:
        calls[entry]()
    assert isinstance(info.value, ValueError)
    assert torch.equal(torchst.load_file(path)["w"], torch.ones(3))  # nothing was disturbed


def test_restore_onto_a_device_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    bad, message = _absent_device()
    mgr = CheckpointManager(tmp_path)
    model = nn.Linear(3, 1)
    mgr.save(1, {"model": model})
    with pytest.raises(DeviceMapError, match=message):
        mgr.restore({"model": nn.Linear(3, 1)}, device=bad)
    mgr.close()


# ---------------------------------------------------------------------------------------------
# one GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda:0", 0, "cuda", "torch.device"])
def test_load_state_dict_onto_cuda_bit_exact(tmp_path: Path, device: Any) -> None:
    tensors = mixed_tensors()
    torchst.save_state_dict(tensors, tmp_path, max_shard_size=1000)
    dev = torch.device("cuda", 0) if device == "torch.device" else device
    loaded = torchst.load_state_dict(tmp_path, device=dev)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].device == cuda0(), name
        assert same_bits(loaded[name], t.to(cuda0())), name


@pytest.mark.gpu
def test_big_tensors_through_the_pinned_ring_on_a_side_stream(tmp_path: Path, big_tensors: dict[str, Any]) -> None:
    torchst.save_file(big_tensors, tmp_path / "big.safetensors")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loaded = torchst.load_state_dict(tmp_path / "big.safetensors", device="cuda:0")
    # Used at once on the default stream: the load must have finished its copies before returning.
    for name, t in big_tensors.items():
        assert loaded[name].device == cuda0() and same_bits(loaded[name], t.to(cuda0())), name
    reference = torchst.load_file(tmp_path / "big.safetensors", device="cuda:0")
    for name in big_tensors:
        assert same_bits(reference[name], loaded[name]), name


@pytest.mark.gpu
def test_pinned_staging_is_used_and_reused_without_leaks(tmp_path: Path, big_tensors: dict[str, Any]) -> None:
    path = tmp_path / "big.safetensors"
    torchst.save_file(big_tensors, path)
    torch.cuda.synchronize()
    device_before = torch.cuda.memory_allocated(0)
    host_before = getattr(torch.cuda, "host_memory_stats", dict)()  # may be empty before any pinned use
    loaded = torchst.load_state_dict(path, device="cuda:0")
    after_one = host_stats()
    assert after_one["active_requests.allocated"] > host_before.get("active_requests.allocated", 0)  # pinned used
    del loaded
    for _ in range(4):
        loaded = torchst.load_state_dict(path, device="cuda:0")
        assert same_bits(loaded["big.c"], big_tensors["big.c"].to(cuda0()))
        del loaded
    torch.cuda.synchronize()
    after = host_stats()
    assert after["allocated_bytes.current"] <= after_one["allocated_bytes.current"]  # cached blocks reused
    assert after["active_bytes.current"] <= after_one["active_bytes.current"]  # no load keeps its buffers
    assert torch.cuda.memory_allocated(0) == device_before  # every device byte went with the tensors


@pytest.mark.gpu
def test_device_map_dict_mixes_cpu_and_cuda(net_ckpt: tuple[Net, Path]) -> None:
    net, ckpt = net_ckpt
    sd = torchst.load_state_dict(ckpt, device_map={"blocks.1": "cpu", "": "cuda:0"})
    for name, t in net.state_dict().items():
        want = torch.device("cpu") if name.startswith("blocks.1.") else cuda0()
        assert sd[name].device == want and same_bits(sd[name], t.to(want)), name
    assert sd["head.weight"] is sd["embed.weight"]
    model = Net()  # materialised: a device_map still places each tensor anew
    torchst.load_model(model, ckpt, device_map={"blocks": 0, "": "cpu"})
    assert model.blocks[3].weight.device == cuda0() and model.norm.weight.device.type == "cpu"
    assert model.head.weight is model.embed.weight
    for name, t in model.state_dict().items():
        assert same_bits(t, net.state_dict()[name].to(t.device)), name


@pytest.mark.gpu
def test_device_map_auto_with_max_memory(net_ckpt: tuple[Net, Path]) -> None:
    net, ckpt = net_ckpt
    with torchst.nn.params_on_meta():
        split = Net()
    # 100 kB holds the tied embedding/head (77 kB) but not the blocks behind it (accelerate's planner).
    torchst.load_model(split, ckpt, device_map="auto", max_memory={0: 100_000, "cpu": "1GB"})
    placed = {t.device.type for t in split.state_dict().values()}
    assert placed == {"cuda", "cpu"}, placed  # the GPU's budget holds part of the model only
    assert split.head.weight is split.embed.weight
    for name, t in split.state_dict().items():
        assert same_bits(t, net.state_dict()[name].to(t.device)), name
    with torchst.nn.params_on_meta():
        whole = Net()
    torchst.load_model(whole, ckpt, device_map="auto", max_memory={0: "1GB", "cpu": "1GB"})
    assert {t.device for t in whole.state_dict().values()} == {cuda0()}
    assert whole.scale.device == cuda0()  # the computed buffer follows its module
    x = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        assert torch.allclose(whole(x.cuda()).cpu(), net(x), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_casts_onto_cuda(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = mixed_tensors()
    torchst.save_file(tensors, tmp_path / "m.safetensors")
    loaded = torchst.load_state_dict(tmp_path / "m.safetensors", device="cuda:0", dtype=dtype)
    for name, t in tensors.items():
        want = t.to(cuda0()).to(dtype) if t.is_floating_point() else t.to(cuda0())  # the device's own cast
        assert loaded[name].device == cuda0() and same_bits(loaded[name], want), name


@pytest.mark.gpu
def test_cast_copy_into_a_materialised_cuda_model(net_ckpt: tuple[Net, Path], tmp_path: Path) -> None:
    net, _ = net_ckpt
    torchst.save_model(copy.deepcopy(net).to(torch.bfloat16), tmp_path / "bf16")
    model = Net().cuda()  # float32 on the device: loaded in place, cast from bf16
    ptr = model.blocks[0].weight.data_ptr()
    torchst.load_model(model, tmp_path / "bf16")
    assert model.blocks[0].weight.data_ptr() == ptr and model.blocks[0].weight.dtype == torch.float32
    for name, t in model.state_dict().items():
        src = net.state_dict()[name].to(cuda0())
        stored = src.to(torch.bfloat16) if src.is_floating_point() else src
        assert same_bits(t, stored.to(t.dtype)), name


@pytest.mark.gpu
def test_meta_model_straight_to_cuda(net_ckpt: tuple[Net, Path]) -> None:
    net, ckpt = net_ckpt
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    with torchst.nn.params_on_meta():
        fresh = Net()
    torchst.load_model(fresh, ckpt, device="cuda:0")
    used = torch.cuda.memory_allocated(0) - before
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in fresh.state_dict().values()}.values())
    assert nbytes <= used <= nbytes + 64 * 1024 * len(fresh.state_dict())  # no second copy on the device
    assert all(t.device == cuda0() for t in fresh.state_dict().values())
    assert fresh.scale.device == cuda0() and fresh.head.weight is fresh.embed.weight
    for name, t in fresh.state_dict().items():
        assert same_bits(t, net.state_dict()[name].to(cuda0())), name
    x = torch.randint(0, 300, (3, 4))
    with torch.no_grad():
        assert torch.allclose(fresh(x.cuda()).cpu(), net(x), atol=1e-5)


@pytest.mark.gpu
def test_transformers_model_built_empty_loads_onto_cuda(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(cfg)
    torchst.load_model(empty, tmp_path, device="cuda:0")
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    assert all(p.device == cuda0() for p in empty.parameters())
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        got = empty.eval()(ids.cuda()).logits.cpu()
        assert torch.allclose(got, ref(ids).logits, atol=1e-4)


@pytest.mark.gpu
def test_save_from_cuda_writes_the_same_bytes_as_from_cpu(net_ckpt: tuple[Net, Path], tmp_path: Path) -> None:
    net, _ = net_ckpt
    torchst.save_model(net, tmp_path / "cpu", max_shard_size=40_000)
    torchst.save_model(copy.deepcopy(net).cuda(), tmp_path / "gpu", max_shard_size=40_000)
    names = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "gpu").iterdir()) and len(names) > 2
    for name in names:
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "gpu" / name).read_bytes(), name


def _train_state(device: Any, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 64, device=device)).square().mean().backward()
    opt.step()
    return model, opt


def _flat_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.detach().clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.gpu
def test_async_snapshot_of_gpu_state_is_taken_before_save_returns(tmp_path: Path) -> None:
    model, opt = _train_state("cuda:0", seed=0)
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=2)
    saved = _flat_state(model, opt)
    mgr.save(1, {"model": model, "optim": opt})
    with torch.no_grad():  # the loop moves on at once: in-place updates on the device
        for p in model.parameters():
            p.add_(1.0)
        for st in opt.state.values():
            st["exp_avg"].add_(1.0)
    mgr.wait()
    fresh, fresh_opt = _train_state("cuda:0", seed=1)
    assert mgr.restore({"model": fresh, "optim": fresh_opt}) == 1
    got = _flat_state(fresh, fresh_opt)
    assert set(got) == set(saved)
    for name, t in saved.items():
        assert got[name].device == t.device and same_bits(got[name], t), name
    cpu_model, cpu_opt = _train_state("cpu", seed=2)  # the same checkpoint onto a CPU-only job
    mgr.restore({"model": cpu_model, "optim": cpu_opt})
    for name, t in _flat_state(cpu_model, cpu_opt).items():
        if name.startswith("model."):
            assert t.device.type == "cpu" and same_bits(t, saved[name].cpu()), name
    mgr.close()


@pytest.mark.gpu
def test_async_snapshot_buffer_is_reused_across_saves(tmp_path: Path) -> None:
    model, opt = _train_state("cuda:0", seed=0)
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=1)
    mgr.save(0, {"model": model, "optim": opt})
    mgr.wait()
    first = host_stats()
    for step in range(1, 5):
        mgr.save(step, {"model": model, "optim": opt})
    mgr.wait()
    now = host_stats()
    assert now["active_requests.allocated"] == first["active_requests.allocated"]  # no new pinned block asked for
    assert now["allocated_bytes.current"] == first["allocated_bytes.current"]  # one arena, reused
    assert mgr.steps() == [4]
    mgr.close()


# ---------------------------------------------------------------------------------------------
# two GPUs
# ---------------------------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


@pytest.mark.gpu
@two_gpus
def test_two_device_map_with_big_tensors(tmp_path: Path, big_tensors: dict[str, Any]) -> None:
    torchst.save_file(big_tensors, tmp_path / "big.safetensors")
    torch.cuda.set_device(0)  # cuda:1's copies are not on the current device's stream
    sd = torchst.load_state_dict(tmp_path / "big.safetensors", device_map={"big.a": "cuda:0", "big": "cuda:1"})
    for name, t in big_tensors.items():
        want = cuda0() if name == "big.a" else torch.device("cuda", 1)
        assert sd[name].device == want and same_bits(sd[name], t.to(want)), name


@pytest.mark.gpu
@two_gpus
def test_two_device_auto_map_and_async_snapshot(net_ckpt: tuple[Net, Path], tmp_path: Path) -> None:
    net, ckpt = net_ckpt
    with torchst.nn.params_on_meta():
        model = Net()
    torchst.load_model(model, ckpt, device_map="auto", max_memory={0: 100_000, 1: "1GB", "cpu": "1GB"})
    devices = {t.device for t in model.state_dict().values()}
    assert {cuda0(), torch.device("cuda", 1)} <= devices, devices
    for name, t in model.state_dict().items():
        assert same_bits(t, net.state_dict()[name].to(t.device)), name
    mgr = CheckpointManager(tmp_path / "ckpts", async_save=True)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.save(1, {"model": model})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    mgr.wait()
    restored = Net()
    mgr.restore({"model": restored})
    for name, t in saved.items():
        assert same_bits(restored.state_dict()[name], t.cpu()), name
    mgr.close()
