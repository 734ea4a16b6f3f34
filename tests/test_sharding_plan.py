"""The shard planner works on plain ints: sizes, limits, names, the index format."""

from __future__ import annotations

import pytest

from torchst.errors import SerializationError, ShardIndexError
from torchst.sharding.index import ShardIndex
from torchst.sharding.plan import check_shard_name, parse_size, plan_shards, shard_filename


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500MB", 500_000_000),
        ("5GB", 5_000_000_000),
        ("2GiB", 2 * 2**30),
        ("10KiB", 10 * 1024),
        ("1.5GB", 1_500_000_000),
        ("100", 100),
        ("7 mb", 7_000_000),
        (1234, 1234),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5XB", "GB", "-1GB", "", 0, -5, True, 1.5, "1e9"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(SerializationError, match="max_shard_size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_one_shard_is_plain_model_file() -> None:
    plan = plan_shards({"a": 10, "b": 20}, 100)
    assert plan.filenames == ("model.safetensors",)
    assert plan.shards == (("a", "b"),)
    assert not plan.is_sharded and plan.total_size == 30
    assert plan_shards({"a": 10**12}, None).filenames == ("model.safetensors",)


def test_greedy_split_in_given_order() -> None:
    plan = plan_shards([("x", 40), ("y", 40), ("z", 40), ("w", 10)], 100)
    assert plan.shards == (("x", "y"), ("z", "w"))
    assert plan.filenames == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert plan.weight_map == {
        "w": "model-00002-of-00002.safetensors",
        "x": "model-00001-of-00002.safetensors",
        "y": "model-00001-of-00002.safetensors",
        "z": "model-00002-of-00002.safetensors",
    }
    assert list(plan.weight_map) == ["w", "x", "y", "z"]


def test_exact_fit_and_oversized_tensor_gets_own_shard() -> None:
    assert plan_shards({"a": 50, "b": 50, "c": 1}, 100).shards == (("a", "b"), ("c",))
    plan = plan_shards({"a": 10, "big": 500, "c": 10, "d": 10}, 100)
    assert plan.shards == (("a",), ("big",), ("c", "d"))
    assert plan.total_size == 530


def test_zero_sized_tensors_and_empty_plan() -> None:
    assert plan_shards({"a": 0, "b": 0}, 1).shards == (("a", "b"),)
    assert plan_shards({}, 100).shards == ((),)


def test_plan_validates_input() -> None:
    with pytest.raises(SerializationError, match="appears twice"):
        plan_shards([("a", 1), ("a", 2)], 10)
    with pytest.raises(SerializationError, match="byte size"):
        plan_shards({"a": -1}, 10)


def test_shard_filename() -> None:
    assert shard_filename(3, 12) == "model-00003-of-00012.safetensors"
    assert shard_filename(1, 2, "diffusion_pytorch_model") == "diffusion_pytorch_model-00001-of-00002.safetensors"


@pytest.mark.parametrize(
    "bad",
    [
        "/etc/passwd.safetensors",
        "../x.safetensors",
        "a/../../x.safetensors",
        "a\\b.safetensors",
        "C:x.safetensors",
        "model.bin",
        "",
        "a//b.safetensors",
        "./a.safetensors",
        3,
    ],
)
def test_unsafe_shard_names(bad: object) -> None:
    with pytest.raises(ShardIndexError):
        check_shard_name(bad, "idx")


def test_safe_shard_names() -> None:
    assert check_shard_name("sub/model-00001-of-00002.safetensors", "idx") == "sub/model-00001-of-00002.safetensors"
    assert check_shard_name(".tmp-0123456789ab-model.safetensors", "idx")


def test_index_text_is_sorted_indented_with_newline() -> None:
    idx = ShardIndex.build({"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}, 96)
    text = idx.to_json()
    assert text == (
        '{\n  "metadata": {\n    "total_size": 96\n  },\n  "weight_map": {\n'
        '    "a": "model-00001-of-00002.safetensors",\n    "b": "model-00002-of-00002.safetensors"\n  }\n}\n'
    )
    assert ShardIndex.parse(text) == idx
    assert idx.filenames == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"metadata": {}}', "no 'weight_map'"),
        ('{"weight_map": {}}', "empty"),
        ('{"weight_map": {"a": "../../x.safetensors"}}', "unsafe"),
        ('{"weight_map": {"a": "x.bin"}}', "must end with"),
        ('{"weight_map": {"a": 3}}', "non-empty strings"),
        ('{"metadata": [], "weight_map": {"a": "x.safetensors"}}', "'metadata' must be"),
        ('{"metadata": {"total_size": "big"}, "weight_map": {"a": "x.safetensors"}}', "total_size"),
    ],
)
def test_index_parse_errors(doc: str, message: str) -> None:
    with pytest.raises(ShardIndexError, match=message):
        ShardIndex.parse(doc, source="m.safetensors.index.json")


def test_planner_and_index_are_torch_free() -> None:
    import ast
    from pathlib import Path

    import torchst.sharding.index
    import torchst.sharding.plan

    for mod in (torchst.sharding.plan, torchst.sharding.index):
        tree = ast.parse(Path(mod.__file__ or "").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m == "torch" or m.startswith("torch.") for m in imported), (mod.__name__, imported)
