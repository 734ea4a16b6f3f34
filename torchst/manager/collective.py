"""Collective training steps for ``CheckpointManager(directory, process_group=pg)``.

A step saved by several ranks has the single-process layout (``step_<n>/manifest.json``, one
``model.safetensors`` per module, ``state.safetensors``) with full tensors, so a plain process
restores it.  Saving: every rank takes the state apart the way the single-process encoder does
(optimizer state keyed by parameter name), each file is written in place by all ranks (see
``torchst.distributed``), then rank 0 writes the manifest, commits, applies retention.  Restoring: every
rank reads only the bytes of its own shards into new DTensors placed like its parameters (or
full tensors for plain ones), then the single-process restore checks and loads them.

RNG state is per rank: every rank's generators (torch CPU and CUDA, ``random``, numpy) are
gathered as JSON and rank 0 stores them in the step's tree under ``"rank_rng"``, keyed by rank.
A restore into the same world size gives each rank its own state back; into another world size
(or a plain process) the generators are left alone and a warning says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

from .._dtypes import from_code
from ..dedup import alias_metadata
from ..distributed.comm import Group
from ..distributed.load import read_into
from ..distributed.save import is_dtensor, write_file
from ..errors import CheckpointError
from ..sharding.checkpoint import open_checkpoint
from ..state import capture_rng, restore_state
from ..state import restore_rng as restore_rng_state
from ..state.codec import STATE_FILE, FileSpec, _modules, _qualname, _StateEncoder
from ..state.optim import parameter_names
from ..state.tree import Json, PathItem, TensorTable, TreeDecoder, TreeEncoder
from .layout import FORMAT, MANIFEST, VERSION, commit, committed_steps, new_temp_dir, write_json

if TYPE_CHECKING:
    from .manager import CheckpointManager

__all__ = ["join_group", "restore_step", "save_step", "warn_rank_rng"]

logger = logging.getLogger(__name__)


def join_group(process_group: Any, async_save: bool, timeout: Any = None) -> tuple[Group, Group | None]:
    """The manager's view of its process group (collectives time out after ``timeout``, default 10 min).

    With ``async_save`` also a separate gloo group for the background saves, created here by
    every rank (``new_group`` is collective), so their collectives never interleave with training's.
    """
    group = Group(process_group, timeout, "CheckpointManager")
    if not async_save:
        return group, None
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group.pg)
    # Local synchronization: only the members of ``process_group`` take part (a subgroup's
    # managers are not constructed by the other ranks of the world).
    background = dist.new_group(ranks=ranks, backend="gloo", timeout=group.timeout, use_local_synchronization=True)
    return group, Group(background, group.timeout, "CheckpointManager (background save)")


def rng_json() -> Json:
    """This process's RNG state as typed JSON (tensors as bytes), for the per-rank table."""
    state = capture_rng()
    state["torch"] = state["torch"].numpy().tobytes()
    if "cuda" in state:
        state["cuda"] = [t.cpu().numpy().tobytes() for t in state["cuda"]]
    table = TensorTable()
    return TreeEncoder(table).encode(state, ("<rng>",))


def _rng_from_json(node: Json, where: str) -> dict[str, Any]:
    state = TreeDecoder(lambda n, d: torch.empty(0), where=where).decode(node, ("<rng>",))
    if not isinstance(state, dict) or not isinstance(state.get("torch"), bytes):
        raise CheckpointError(f"{where}: the saved per-rank RNG state is malformed")
    state["torch"] = torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8)
    if "cuda" in state:
        state["cuda"] = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in state["cuda"]]
    return state


def warn_rank_rng(tree: Mapping[str, Json], world: int, where: str) -> bool:
    """True when ``tree`` holds one RNG state per rank for ``world`` ranks, else warn (if any)."""
    saved = tree.get("rank_rng")
    if not isinstance(saved, dict):
        return False
    states = saved.get("states")
    if isinstance(states, list) and len(states) == world:
        return True
    logger.warning(
        "%s: the step holds RNG states of %s ranks but it is restored into %d process(es); RNG state is left "
        "as it is (seed each rank yourself)",
        where,
        len(states) if isinstance(states, list) else "?",
        world,
    )
    return False


def encode_step(state: Mapping[str, Any]) -> tuple[dict[str, Json], dict[str, FileSpec]]:
    """The JSON tree and the files of a step, as the single-process encoder takes them apart."""
    enc = _Encoder(_Table(), parameter_names(_modules(state)))
    tree: dict[str, Json] = {"state": enc.encode(dict(state)), "rng": None}
    files = dict(enc.files)
    files[STATE_FILE] = FileSpec(enc.table.finish())
    return tree, files


class _Table(TensorTable):
    def finish(self) -> dict[str, torch.Tensor]:
        # DTensors stay DTensors (written in place); every tensor is written from its own
        # memory, so overlapping plain views need no clone here.
        return dict(self.tensors)


class _Encoder(_StateEncoder):
    def _module(self, module: torch.nn.Module, path: tuple[PathItem, ...]) -> Json:
        sd = module.state_dict()
        tensors = {k: v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        extra = {k: self.encode(v, path + (k,)) for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        rel = f"{self._dirname(path)}/model.safetensors"
        self.files[rel] = FileSpec(tensors)  # shared storage is found across ranks when writing
        return {"$module": rel, "keys": list(sd), "extra": extra, "type": _qualname(module)}


def save_step(
    mgr: CheckpointManager,
    group: Group,
    step: int,
    state: Mapping[str, Any],
    metrics_tree: Json,
    metrics: dict[str, Any],
) -> None:
    """Every rank: write ``state`` as ``step`` of ``mgr``'s directory; rank 0 commits."""
    tree, files = encode_step(state)
    write_step(mgr, group, step, tree, files, rng_json() if mgr.save_rng else None, metrics_tree, metrics)


def write_step(
    mgr: CheckpointManager,
    group: Group,
    step: int,
    tree: dict[str, Json],
    files: Mapping[str, FileSpec],
    rng: Json,
    metrics_tree: Json,
    metrics: dict[str, Any],
) -> None:
    """Every rank: write encoded ``files`` (tensors, DTensors or snapshot pieces); rank 0 commits."""
    directory = mgr.directory
    if mgr.save_rng:
        tree = {**tree, "rank_rng": {"world_size": group.size, "states": group.all_gather_json(rng, "exchanging RNG")}}
    try:
        earlier = committed_steps(directory)  # only named in an error message
    except OSError:
        earlier = []
    temp = group.run(lambda: new_temp_dir(directory, step) if group.rank == 0 else None, "creating the step")
    temp = group.all_gather_json(temp, "sharing the step directory")[0]
    assert isinstance(temp, str)
    try:
        sizes: dict[str, Json] = {}
        for rel, spec in files.items():
            path = os.path.join(temp, rel)  # write_file creates the folder (agreed, on every rank)
            size = write_file(spec.tensors, path, group, metadata=spec.metadata or None, checksums=mgr.checksums)
            sizes[rel] = {"size": size}

        def finish() -> None:
            manifest: dict[str, Json] = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "metrics": metrics_tree,
                "files": sizes,
                "tree": tree,
            }
            write_json(os.path.join(temp, MANIFEST), manifest)  # last file: a step with a manifest is whole
            aside = commit(temp, directory, step)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            mgr._metrics[step] = metrics
            mgr._apply_retention()

        group.run(finish if group.rank == 0 else lambda: None, f"committing step {step}")
    except BaseException as e:
        if group.rank == 0:
            # uncommitted: the new files; after an exchange commit: the previous copy.  Either way unused.
            shutil.rmtree(temp, ignore_errors=True)
        if isinstance(e, CheckpointError):
            raise CheckpointError(
                f"{directory}: saving step {step} failed: {e}. Nothing was committed for step {step}; "
                f"earlier checkpoints are intact (steps {earlier[-5:]})"
            ) from e
        raise
    logger.info("%s: step %d saved by %d ranks", directory, step, group.size)


def _optimizer_targets(node: Json, params: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """``{tensor name in state.safetensors: parameter}`` for the moments of an optimizer node."""
    if not isinstance(node, dict):
        return
    body = node.get("$optimizer")
    state = body.get("state") if isinstance(body, dict) else None
    if not isinstance(state, dict):
        return
    for pname, entry in state.items():
        if pname in params and isinstance(entry, dict):
            for value in entry.values():
                ref = value.get("$tensor") if isinstance(value, dict) else None
                if isinstance(ref, str):
                    out[ref] = params[pname]


def _targets(state: Mapping[str, Any], tree: Mapping[str, Json]) -> dict[str, dict[str, torch.Tensor]]:
    """For each file of the step: stored name -> the tensor whose placement it is read into."""
    saved = tree.get("state")
    out: dict[str, dict[str, torch.Tensor]] = {STATE_FILE: {}}
    if not isinstance(saved, dict):
        return out
    names = parameter_names(_modules(state))
    modules = dict(_modules(state))
    params: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for pname, p in module.named_parameters(remove_duplicate=False):
            params.setdefault(names.get(id(p), f"{prefix}.{pname}" if prefix else pname), p)
    for key, node in saved.items():
        target = state.get(key)
        rel = node.get("$module") if isinstance(node, dict) else None
        if isinstance(target, torch.nn.Module) and isinstance(rel, str):
            out[rel] = {k: v for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
        elif isinstance(target, torch.optim.Optimizer):
            _optimizer_targets(node, params, out[STATE_FILE])
    return out


def _empty_like_placed(like: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if like is not None and is_dtensor(like) and tuple(like.shape) == shape:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        dt: Any = like
        local_shape, _ = compute_local_shape_and_global_offset(shape, dt.device_mesh, dt.placements)
        local = torch.empty(local_shape, dtype=dtype, device=dt.to_local().device)
        return DTensor.from_local(
            local, dt.device_mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride()
        )
    return torch.empty(shape, dtype=dtype)


def restore_step(
    mgr: CheckpointManager,
    group: Group,
    state: MutableMapping[str, Any],
    step: int | None,
    device: str | torch.device | None,
    restore_rng: bool = True,
) -> int:
    """Every rank: restore ``step`` (None: rank 0's latest) into ``state``, resharding; returns the step."""
    mgr.wait()  # a background save in flight finishes first (on every rank: its outcome is agreed)
    chosen = group.run(lambda: step if step is not None else mgr.latest_step(), "choosing the step")
    chosen = group.all_gather_json(chosen, "agreeing on the step")[0]
    if chosen is None:
        raise CheckpointError(f"{mgr.directory}: no committed step to restore")

    def restore() -> int:
        with mgr._open(int(chosen)) as opened:
            targets = _targets(state, opened.manifest["tree"])
            cache: dict[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]] = {}

            def read(rel: str) -> tuple[Mapping[str, torch.Tensor], Mapping[str, str]]:
                if rel not in cache:
                    with open_checkpoint(os.path.join(opened.path, rel)) as ckpt:
                        like = targets.get(rel, {})
                        out = {}
                        for name, (_, _, info) in ckpt.tensors.items():
                            dtype = from_code(info.dtype).require_torch(f"{ckpt.source}: tensor {name!r}")
                            out[name] = _empty_like_placed(like.get(name), tuple(info.shape), dtype)
                        read_into(ckpt, out)
                        cache[rel] = (out, {**ckpt.metadata, **alias_metadata(ckpt.aliases)})
                return cache[rel]

            restore_state(
                state, opened.manifest["tree"], read, rng=False, device=device, where=opened.path, step=opened.step
            )
            tree = opened.manifest["tree"]
            if restore_rng and warn_rank_rng(tree, group.size, opened.path):
                restore_rng_state(
                    _rng_from_json(tree["rank_rng"]["states"][group.rank], opened.path), where=opened.path
                )
            return opened.step

    return group.run(restore, f"restoring step {chosen}")
