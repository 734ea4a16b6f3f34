"""Collective saves and loads on gloo (CPU): byte equality with the single-process save,
resharding, strictness, and failures on one rank (exception, SIGKILL)."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_launch import launch

import torchst

pytestmark = pytest.mark.multiprocess
HERE = "tests/test_distributed.py"


def full_tensors(world: int) -> dict[str, torch.Tensor]:
    """The full tensors every scenario shards; per-rank names come last, in rank order."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 4, generator=g)
    out = {
        "a.shard0_uneven": torch.randn(5, 3, generator=g),
        "b.shard1_uneven": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "c.replicate": torch.randn(3, 4, generator=g).half(),
        "d.plain": torch.arange(6, dtype=torch.int64),
        "f.shard0_tiny": torch.randn(1, 4, generator=g),
        "g.scalar": torch.tensor(3.5),
        "h.shard2_3d": torch.randn(2, 3, 5, generator=g),
        "i.big_replicated": torch.randn(600, 500, generator=g),
        "j.empty": torch.zeros(0, 3),
        "k.shard1_tall": torch.randn(300, 4, generator=g),
        "emb.weight": emb,
        "head.weight": emb,
    }
    for r in range(world):
        out[f"e.only_rank{r}"] = torch.full((2, 2), float(r))
    return out


def _distributed(world: int, rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = full_tensors(world)
    layout: dict[str, Any] = {
        "a.shard0_uneven": [Shard(0)],
        "b.shard1_uneven": [Shard(1)],
        "c.replicate": [Replicate()],
        "f.shard0_tiny": [Shard(0)],
        "h.shard2_3d": [Shard(2)],
        "i.big_replicated": [Replicate()],
        "j.empty": [Shard(0)],
        "k.shard1_tall": [Shard(1)],  # 300 strided runs per rank: its checksum is read back
        "emb.weight": [Shard(0)],
    }
    sd: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        if name in layout:
            sd[name] = distribute_tensor(t, mesh, layout[name])
        elif name == "head.weight":
            sd[name] = sd["emb.weight"]  # tied: the same DTensor under two names
        elif name.startswith("e.only_rank"):
            if name == f"e.only_rank{rank}":
                sd[name] = t
        else:
            sd[name] = t.clone()
    return sd


def _resharded_targets(world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = full_tensors(world)
    out: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        if t.dim() >= 2 and t.numel():
            out[name] = distribute_tensor(torch.zeros_like(t), mesh, [Shard(1)])
        elif t.dim() == 1:
            out[name] = distribute_tensor(torch.zeros_like(t), mesh, [Replicate()])
        else:
            out[name] = torch.zeros_like(t)
    return out


def scenario_placements(rank: int, world: int, out: str) -> None:
    import torchst.distributed as tsd
    from torchst.errors import CheckpointError

    sd = _distributed(world, rank)
    tsd.save_state_dict(sd, os.path.join(out, "sharded"), max_shard_size=2000, metadata={"run": "x"}, timeout=30)
    tsd.save_state_dict(sd, os.path.join(out, "single"), checksums=False, timeout=30)

    # resharding load: everything saved as Shard(0)/Replicate comes back as Shard(1)/Replicate
    targets = _resharded_targets(world)
    missing, unexpected = tsd.load_state_dict(targets, os.path.join(out, "sharded"), timeout=30)
    assert (missing, unexpected) == ([], []), (missing, unexpected)
    full = full_tensors(world)
    for name, t in targets.items():
        got = t.full_tensor() if hasattr(t, "full_tensor") else t
        assert torch.equal(got, full[name]), name

    # strictness: the same error on every rank, before anything is loaded
    extra = {**_resharded_targets(world), "not.in.file": torch.zeros(1)}
    try:
        tsd.load_state_dict(extra, os.path.join(out, "sharded"), timeout=30)
        raise AssertionError("strict load accepted a missing key")
    except CheckpointError as e:
        assert "Missing key(s)" in str(e) and "not.in.file" in str(e), str(e)
    missing, _ = tsd.load_state_dict(extra, os.path.join(out, "sharded"), strict=False, timeout=30)
    assert missing == ["not.in.file"]
    wrong = {"a.shard0_uneven": torch.zeros(5, 4)}
    try:
        tsd.load_state_dict(wrong, os.path.join(out, "sharded"), strict=False, timeout=30)
        raise AssertionError("shape mismatch accepted")
    except CheckpointError as e:
        assert "checkpoint has shape [5, 3], the target has [5, 4]" in str(e), str(e)

    # one rank fails mid-save (disk full): every rank raises, the previous checkpoint stays
    import torchst.distributed.save as save_mod

    if rank == world - 1:
        real = save_mod._pwrite
        calls = []

        def failing(fd: int, view: memoryview, offset: int) -> None:
            calls.append(1)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, view, offset)

        save_mod._pwrite = failing  # type: ignore[assignment]
    changed = {k: (v * 2 if k == "d.plain" else v) for k, v in sd.items()}
    try:
        tsd.save_state_dict(changed, os.path.join(out, "sharded"), max_shard_size=2000, timeout=30)
        raise AssertionError("save with a failing rank succeeded")
    except CheckpointError as e:
        assert f"rank {world - 1}: OSError" in str(e) and "No space left" in str(e), str(e)
    with open(os.path.join(out, f"fault-ok-{rank}"), "w") as f:
        f.write("ok")


def _reference(world: int) -> dict[str, torch.Tensor]:
    return full_tensors(world)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_two_ranks_write_the_single_process_bytes_and_reshard(tmp_path: Path) -> None:
    launch(tmp_path, 2, f"{HERE}::scenario_placements", timeout=120).check()
    ref_sharded, ref_single = tmp_path / "ref_sharded", tmp_path / "ref_single"
    # checksums on (the default of both, combined from the ranks' pieces or read back) and off
    torchst.save_state_dict(_reference(2), ref_sharded, max_shard_size=2000, metadata={"run": "x"})
    torchst.save_state_dict(_reference(2), ref_single, max_shard_size=None, checksums=False)
    got = _files(tmp_path / "sharded")
    assert len(got) > 3 and "model.safetensors.index.json" in got
    assert got == _files(ref_sharded)
    assert _files(tmp_path / "single") == _files(ref_single)
    # the failed save on one rank left the committed checkpoint (and nothing else) behind
    assert all((tmp_path / f"fault-ok-{r}").exists() for r in range(2))
    loaded = torchst.load_state_dict(tmp_path / "sharded", verify=True)  # the recorded checksums hold
    assert torch.equal(loaded["d.plain"], torch.arange(6))
    assert loaded["head.weight"] is loaded["emb.weight"]


def scenario_killed(rank: int, world: int, out: str) -> None:
    import torchst.distributed as tsd
    import torchst.distributed.save as save_mod
    from torchst.errors import CheckpointError

    sd = _distributed(world, rank)
    directory = os.path.join(out, "ckpt")
    tsd.save_state_dict(sd, directory, max_shard_size=2000, timeout=30)
    if rank == 1:
        real = save_mod._pwrite

        def dying(fd: int, view: memoryview, offset: int) -> None:
            real(fd, view, offset)
            os.kill(os.getpid(), signal.SIGKILL)

        save_mod._pwrite = dying  # type: ignore[assignment]
    start = time.monotonic()
    try:
        tsd.save_state_dict({k: v for k, v in sd.items()}, directory, max_shard_size=2000, timeout=10)
    except CheckpointError as e:
        with open(os.path.join(out, f"survivor-{rank}.json"), "w") as f:
            json.dump({"seconds": time.monotonic() - start, "error": str(e)}, f)
        os._exit(0)  # the group is broken; skip its teardown
    raise AssertionError("the save succeeded although a rank was killed")


def test_sigkill_of_one_rank_fails_the_survivors_in_bounded_time(tmp_path: Path) -> None:
    result = launch(tmp_path, 2, f"{HERE}::scenario_killed", timeout=90)
    assert result.codes[1] == -signal.SIGKILL, result.outputs[1]
    assert result.codes[0] == 0, result.outputs[0]
    report = json.loads((tmp_path / "survivor-0.json").read_text())
    assert report["seconds"] < 30, report
    assert "CheckpointError" not in report["error"] and "rank 0" in report["error"], report
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # temporaries removed
    loaded = torchst.load_state_dict(tmp_path / "ckpt")
    ref = full_tensors(2)
    assert sorted(loaded) == sorted(ref)
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)


def mesh_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "fsdp_tp.weight": torch.randn(7, 6, generator=g),
        "tp_col.weight": torch.randn(4, 5, generator=g).to(torch.bfloat16),
        "nested.weight": torch.randn(9, 3, generator=g),
        "strided.weight": torch.randn(8, 3, generator=g),
        "bias": torch.randn(3, generator=g),
        "big": torch.randn(600, 500, generator=g),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def scenario_mesh_2d(rank: int, world: int, out: str) -> None:
    """Four ranks on a 2 x 2 (dp, tp) mesh: FSDP2 x TP layouts, saved and reloaded differently."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import torchst.distributed as tsd

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    layout: dict[str, Any] = {
        "fsdp_tp.weight": [Shard(0), Shard(1)],
        "tp_col.weight": [Replicate(), Shard(1)],
        "nested.weight": [Shard(0), Shard(0)],
        "strided.weight": [_StridedShard(0, split_factor=2), Shard(0)],
        "bias": [Replicate(), Replicate()],
        "big": [Replicate(), Replicate()],
    }
    full = mesh_tensors()
    sd = {n: distribute_tensor(t, mesh, layout[n]) if n in layout else t.clone() for n, t in full.items()}
    tsd.save_state_dict(sd, os.path.join(out, "by4"), max_shard_size=3000, timeout=60)
    flipped = {
        n: distribute_tensor(torch.zeros_like(t), mesh, [Shard(t.dim() - 1), Replicate()]) if t.dim() else t * 0
        for n, t in full.items()
    }
    tsd.load_state_dict(flipped, os.path.join(out, "by4"), timeout=60)
    for n, t in flipped.items():
        got = t.full_tensor() if hasattr(t, "full_tensor") else t
        assert torch.equal(got, full[n]), n


def scenario_reshard_to_two(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import torchst.distributed as tsd

    mesh = init_device_mesh("cpu", (world,))
    full = mesh_tensors()
    targets = {
        n: distribute_tensor(torch.zeros_like(t), mesh, [Shard(t.dim() - 1)]) if t.dim() else t * 0
        for n, t in full.items()
    }
    tsd.load_state_dict(targets, os.path.join(out, "by4"), timeout=60)
    tsd.save_state_dict(targets, os.path.join(out, "by2"), max_shard_size=3000, timeout=60)


def test_four_ranks_on_a_2d_mesh_reshard_to_two_then_one(tmp_path: Path) -> None:
    launch(tmp_path, 4, f"{HERE}::scenario_mesh_2d", timeout=150).check()
    ref = tmp_path / "ref"
    torchst.save_state_dict(mesh_tensors(), ref, max_shard_size=3000)
    assert _files(tmp_path / "by4") == _files(ref)
    launch(tmp_path, 2, f"{HERE}::scenario_reshard_to_two", timeout=90).check()
    assert _files(tmp_path / "by2") == _files(ref)
    loaded = torchst.load_state_dict(tmp_path / "by2")
    assert all(torch.equal(loaded[n], t) for n, t in mesh_tensors().items())


def tiny_llama(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def scenario_llama_fsdp2(rank: int, world: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    import torchst.distributed as tsd

    model = tiny_llama(0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    result = tsd.save_model(model, os.path.join(out, "llama"), max_shard_size=20_000, timeout=60)
    assert result.aliases == {"lm_head.weight": "model.embed_tokens.weight"}, result.aliases
    if rank == 0:
        model.config.save_pretrained(os.path.join(out, "llama"))
    other = tiny_llama(1)
    for layer in other.model.layers:
        fully_shard(layer)
    fully_shard(other)
    assert tsd.load_model(other, os.path.join(out, "llama"), timeout=60) == ([], [])
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), n
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_fsdp2_llama_saved_by_two_ranks_loads_with_from_pretrained(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    launch(tmp_path, 2, f"{HERE}::scenario_llama_fsdp2", timeout=150).check()
    assert (tmp_path / "llama" / "model.safetensors.index.json").exists()
    reference = tiny_llama(0)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 17]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_collective_calls_need_an_initialised_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    import torchst.distributed as tsd

    assert not dist.is_initialized()
    with pytest.raises(torchst.CheckpointError, match="init_process_group"):
        tsd.save_state_dict({"w": torch.zeros(2)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_world_size_one_matches_the_single_process_api(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import torchst.distributed as tsd

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = full_tensors(1)
        sd = {n: distribute_tensor(t, mesh, [Shard(0)]) if t.dim() == 2 else t for n, t in full.items()}
        sd["head.weight"] = sd["emb.weight"]
        tsd.save_state_dict(sd, tmp_path / "tsd", max_shard_size=2000)
        torchst.save_state_dict(full, tmp_path / "ref", max_shard_size=2000)
        assert _files(tmp_path / "tsd") == _files(tmp_path / "ref")
        # a checkpoint of the single-process API loads into DTensors the same way
        targets = {n: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) if t.dim() == 2 else torch.zeros_like(t)
                   for n, t in full.items()}  # fmt: skip
        assert tsd.load_state_dict(targets, tmp_path / "ref") == ([], [])
        assert all(torch.equal(targets[n].full_tensor() if t.dim() == 2 else targets[n], t) for n, t in full.items())
        with pytest.raises(torchst.CheckpointError, match="rank 0: SerializationError: .*give a directory"):
            tsd.save_state_dict(sd, tmp_path / "one.safetensors")
    finally:
        dist.destroy_process_group()


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _fsdp_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    model(torch.randn(4, 6, generator=g)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def scenario_manager(rank: int, world: int, out: str) -> None:
    import torchst

    model, opt = _fsdp_training(0)
    for i in range(3):
        _step(model, opt, i)
    mgr = torchst.CheckpointManager(os.path.join(out, "run"), process_group=_world())
    mgr.save(3, {"model": model, "optim": opt, "epoch": 1})
    # the full values, for the single-process restore checked by the test
    names = {id(p): n for n, p in model.named_parameters()}
    ref = {f"param/{n}": _full(p.detach()) for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        ref.update({f"optim/{names[id(p)]}/{k}": _full(v) for k, v in st.items()})
    if rank == 0:
        torchst.save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "ref.safetensors"))

    fresh, fresh_opt = _fsdp_training(1)
    state: dict[str, Any] = {"model": fresh, "optim": fresh_opt, "epoch": 0}
    assert mgr.restore(state) == 3 and state["epoch"] == 1
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(_full(a.detach()), _full(b.detach())), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(_full(v), _full(fresh_opt.state[q][k])), k
    # training continues identically
    _step(model, opt, 3)
    _step(fresh, fresh_opt, 3)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(_full(a.detach()), _full(b.detach()))
    mgr.close()


def _world() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD


def test_manager_fsdp2_adamw_saved_by_two_ranks_restores_into_two_and_one(tmp_path: Path) -> None:
    launch(tmp_path, 2, f"{HERE}::scenario_manager", timeout=150).check()
    ref = torchst.load_file(tmp_path / "ref.safetensors")
    with torchst.CheckpointManager(tmp_path / "run", read_only=True) as mgr:
        assert mgr.steps() == [3]
        model = _mlp(7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state: dict[str, Any] = {"model": model, "optim": opt, "epoch": 0}
        assert mgr.restore(state) == 3 and state["epoch"] == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[f"param/{n}"]), n
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, ref[f"optim/{names[id(p)]}/{k}"]), (names[id(p)], k)
    assert len(opt.state) == 4
    # the module file of the step is an ordinary safetensors file of full tensors
    weights = torchst.load_file(tmp_path / "run" / "step_3" / "model" / "model.safetensors")
    assert torch.equal(weights["0.weight"], ref["param/0.weight"])
