"""Pickle-free training state: the typed JSON tree, name-keyed optimizer state, RNG state."""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchst.errors import CheckpointError, SerializationError
from torchst.state import (
    STATE_FILE,
    TensorTable,
    TreeDecoder,
    TreeEncoder,
    capture_rng,
    decode_state,
    encode_state,
    load_named_optimizer_state,
    named_optimizer_state,
    parameter_names,
    restore_rng,
    restore_state,
)
from torchst.state.tree import plain_table


def roundtrip(value: Any) -> Any:
    table = TensorTable()
    tree = TreeEncoder(table).encode(value)
    text = json.dumps(tree, allow_nan=False)  # the manifest is strict JSON
    return TreeDecoder(plain_table(table.finish())).decode(json.loads(text))


def same(a: Any, b: Any) -> bool:
    """Equality that also checks types all the way down and NaN bit patterns."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (
            list(a) == list(b) and all(type(k) is type(kb) for k, kb in zip(a, b)) and all(same(a[k], b[k]) for k in a)
        )
    return bool(a == b)


def test_scalars_keep_their_exact_type_and_value() -> None:
    values = [None, True, False, 0, -1, 2**80, 1.0, -0.0, 0.1, 1e308, 5e-324, "", "ünï\x00", math.inf, -math.inf]
    out = roundtrip(values)
    assert same(out, values)
    assert type(out[5]) is int and type(out[6]) is float  # 2**80 stays int, 1.0 stays float
    assert math.copysign(1, out[7]) == -1.0  # -0.0 keeps its sign


def test_nan_survives_as_nan_and_keeps_its_sign() -> None:
    out = roundtrip([math.nan, -math.nan])
    assert math.isnan(out[0]) and math.copysign(1, out[0]) == 1
    assert math.isnan(out[1]) and math.copysign(1, out[1]) == -1


def test_containers_tuples_lists_sets_and_non_str_keys() -> None:
    value = {
        "tuple": (1, (2.0, [3]), ()),
        "list": [(1,), []],
        "int keys": {0: "a", -5: "b"},
        "mixed keys": {1: 1, "1": 2, 1.5: 3, (1, 2): 4, None: 5, False: 6},
        "$dollar": {"$tensor": "not a tag"},
        "set": {3, 1, 2},
        "frozen": frozenset({"x"}),
        "bytes": b"\x00\xff",
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "od": OrderedDict([("b", 1), ("a", 2)]),
    }
    out = roundtrip(value)
    assert same(
        {k: v for k, v in out.items() if k not in ("set", "frozen", "od")},
        {k: v for k, v in value.items() if k not in ("set", "frozen", "od")},
    )
    assert out["set"] == {1, 2, 3} and type(out["set"]) is set
    assert out["frozen"] == frozenset({"x"}) and type(out["frozen"]) is frozenset
    assert list(out["od"].items()) == [("b", 1), ("a", 2)]
    assert type(out["size"]) is torch.Size and out["dtype"] is torch.bfloat16


def test_tensor_references_restore_exactly_and_once() -> None:
    t = torch.randn(3, 4, dtype=torch.float64)
    half = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    value = {"a": t, "b": [t, half], "scalar": torch.tensor(7, dtype=torch.int64), "view": t.t()}
    table = TensorTable()
    tree = TreeEncoder(table).encode(value)
    assert len(table.tensors) == 4  # `t` twice is stored once
    out = TreeDecoder(plain_table(table.finish())).decode(tree)
    assert out["a"] is out["b"][0]
    assert torch.equal(out["a"], t) and out["b"][1].dtype == torch.bfloat16 and torch.equal(out["b"][1], half)
    assert out["scalar"].shape == () and out["scalar"].item() == 7
    assert torch.equal(out["view"], t.t())


def test_overlapping_views_are_stored_independently() -> None:
    base = torch.arange(10.0)
    table = TensorTable()
    TreeEncoder(table).encode({"x": base[:6], "y": base[4:]})
    tensors = table.finish()
    assert torch.equal(tensors["x"], base[:6]) and torch.equal(tensors["y"], base[4:])
    assert tensors["x"].untyped_storage().data_ptr() != tensors["y"].untyped_storage().data_ptr()


def test_numpy_arrays_round_trip_as_numpy() -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = roundtrip({"a": arr})
    assert isinstance(out["a"], np.ndarray) and out["a"].dtype == np.int32
    np.testing.assert_array_equal(out["a"], arr)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), "builtins.object"),
        (lambda: 1, "function"),
        (np.int64(3), "numpy.int64"),
        ({"k": {torch.ones(1): 1}}, "tensor as a dict key"),
    ],
)
def test_unsupported_values_raise_with_the_path(value: Any, message: str) -> None:
    with pytest.raises(SerializationError, match=message) as info:
        TreeEncoder(TensorTable()).encode({"extra": [value]})
    assert "state['extra'][0]" in str(info.value) or "tensor as a dict key" in message


def test_namedtuples_and_cycles_are_refused() -> None:
    from collections import namedtuple

    Point = namedtuple("Point", "x y")
    with pytest.raises(SerializationError, match="namedtuple.*_asdict"):
        TreeEncoder(TensorTable()).encode({"p": Point(1, 2)})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="reference cycle"):
        TreeEncoder(TensorTable()).encode({"loop": loop})


def test_unknown_tags_are_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match=r"unknown or malformed entry.*\$pickle"):
        TreeDecoder(plain_table({})).decode({"a": {"$pickle": "gASV"}})


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
keys = st.text(max_size=6) | st.integers() | st.booleans() | st.tuples(st.integers())
trees = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids) | st.dictionaries(keys, kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_any_tree_of_plain_values_round_trips_exactly(value: Any) -> None:
    assert same(roundtrip(value), value)


# -- optimizer state keyed by name --------------------------------------------------------


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
        opt.step()


def test_optimizer_state_is_keyed_by_parameter_name() -> None:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt)
    sd = named_optimizer_state(opt, parameter_names([("model", model)]))
    assert sorted(sd["state"]) == ["model.0.bias", "model.0.weight", "model.2.bias", "model.2.weight"]
    assert sd["param_groups"][0]["params"] == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    assert torch.equal(sd["state"]["model.2.bias"]["exp_avg"], opt.state[model[2].bias]["exp_avg"])


def test_optimizer_restores_into_fresh_unstepped_optimizer_with_reordered_groups() -> None:
    model = _model(0)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}],
        momentum=0.9,
    )
    _train(model, opt)
    # deepcopy: a checkpoint holds copies, never the live optimizer tensors
    sd = copy.deepcopy(named_optimizer_state(opt, parameter_names([("m", model)])))

    fresh = _model(1)
    fresh.load_state_dict(model.state_dict())
    # Groups in the other order, parameters inside a group reversed; the optimizer never stepped.
    fresh_opt = torch.optim.SGD(
        [{"params": list(fresh[2].parameters())[::-1], "lr": 0.5}, {"params": fresh[0].parameters(), "lr": 0.5}],
        momentum=0.9,
    )
    load_named_optimizer_state(fresh_opt, sd, parameter_names([("m", fresh)]))
    assert [g["lr"] for g in fresh_opt.param_groups] == [0.01, 0.1]  # hyperparameters follow their group
    for p_old, p_new in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p_old]["momentum_buffer"], fresh_opt.state[p_new]["momentum_buffer"])
    _train(model, opt, 2)
    _train(fresh, fresh_opt, 2)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_optimizer_mismatch_names_what_is_missing() -> None:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sd = named_optimizer_state(opt, parameter_names([("m", model)]))
    other = _model(0)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \['n.0.weight'"):
        load_named_optimizer_state(torch.optim.SGD(other.parameters(), lr=0.1), sd, parameter_names([("n", other)]))
    split = torch.optim.SGD([{"params": [other[0].weight]}, {"params": [other[0].bias, *other[2].parameters()]}])
    with pytest.raises(CheckpointError, match="were not one group when saved"):
        load_named_optimizer_state(split, sd, parameter_names([("m", other)]))


def test_parameters_outside_modules_are_named_by_position() -> None:
    free = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([free], lr=0.1)
    free.grad = torch.ones(2)
    opt.step()
    sd = named_optimizer_state(opt, {})
    assert list(sd["state"]) == ["#0"]


# -- RNG ----------------------------------------------------------------------------------


def test_rng_state_restores_every_generator() -> None:
    saved = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(roundtrip(saved))  # through the JSON tree, as in a checkpoint
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_rng_state_refuses_garbage() -> None:
    with pytest.raises(CheckpointError, match="not an RNG state"):
        restore_rng({"python": None})


# -- whole states ---------------------------------------------------------------------------


class Counter:
    """A user class with the Stateful protocol."""

    def __init__(self) -> None:
        self.n = 0
        self.history: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "history": list(self.history)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n, self.history = sd["n"], list(sd["history"])


def _files(enc: Any) -> Any:
    def read(rel: str) -> Any:
        spec = enc.files[rel]
        return {k: v.clone() for k, v in spec.tensors.items()}, spec.metadata

    return read


def test_encode_state_puts_module_weights_in_their_own_readable_file() -> None:
    model = _model(0)
    enc = encode_state({"model": model, "extra": {"lr": 0.1}}, rng=False)
    assert sorted(enc.files) == ["model/model.safetensors", STATE_FILE]
    spec = enc.files["model/model.safetensors"]
    assert spec.metadata["format"] == "pt"
    assert sorted(spec.tensors) == sorted(model.state_dict())
    assert enc.tree["rng"] is None


def test_tied_weights_are_stored_once_and_restored_tied() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    enc = encode_state({"model": model}, rng=False)
    spec = enc.files["model/model.safetensors"]
    assert list(spec.tensors) == ["embed.weight"]
    fresh = Tied()
    restore_state({"model": fresh}, enc.tree, _files(enc))
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


def test_restore_state_in_place_with_stateful_objects_and_plain_values() -> None:
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt)
    sched.step()
    counter = Counter()
    counter.n, counter.history = 4, [0.5, math.nan]
    gen = torch.Generator().manual_seed(3)
    gen_state = gen.get_state()
    buf = torch.arange(4.0)
    state = {
        "model": model,
        "optim": opt,
        "sched": sched,
        "nested": {"counter": counter, "gen": gen},
        "epoch": 3,
        "buf": buf,
        "only_saved": (1, 2),
    }
    enc = encode_state(state)

    fresh = _model(9)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    fresh_counter, fresh_gen, fresh_buf = Counter(), torch.Generator(), torch.zeros(4)
    target = {
        "model": fresh,
        "optim": fresh_opt,
        "sched": fresh_sched,
        "nested": {"counter": fresh_counter, "gen": fresh_gen},
        "epoch": 0,
        "buf": fresh_buf,
        "new": 1,
    }
    restore_state(target, enc.tree, _files(enc))
    assert target["epoch"] == 3 and target["new"] == 1 and "only_saved" not in target
    assert target["buf"] is fresh_buf and torch.equal(fresh_buf, buf)  # tensors are restored in place
    assert target["nested"]["counter"] is fresh_counter and fresh_counter.n == 4
    assert math.isnan(fresh_counter.history[1])
    assert torch.equal(fresh_gen.get_state(), gen_state)
    assert fresh_sched.state_dict() == sched.state_dict()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])


def test_restore_state_refuses_missing_or_mismatched_objects() -> None:
    model = _model(0)
    enc = encode_state({"model": model, "value": 1}, rng=False)
    with pytest.raises(CheckpointError, match=r"has no entry for \['optim'\]"):
        restore_state({"model": model, "optim": torch.optim.SGD(model.parameters(), lr=1)}, enc.tree, _files(enc))
    with pytest.raises(CheckpointError, match="is an nn.Module here but the checkpoint holds a plain value"):
        restore_state({"value": _model(0)}, enc.tree, _files(enc))


def test_decode_state_gives_plain_state_dicts() -> None:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    enc = encode_state({"model": model, "optim": opt, "c": Counter()}, rng=False)
    plain = decode_state(enc.tree, _files(enc))
    assert torch.equal(plain["model"]["2.weight"], model[2].weight)
    assert "model.2.weight" in plain["optim"]["state"]
    assert plain["c"] == {"n": 0, "history": []}


def test_state_must_be_a_dict_with_str_keys() -> None:
    with pytest.raises(SerializationError, match="must be a dict"):
        encode_state([1, 2])  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="keys must be str"):
        encode_state({1: 2})  # type: ignore[dict-item]
