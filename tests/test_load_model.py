"""load_model from the user's side: meta-built LLMs, one device check, no ignored argument, clear errors."""

from __future__ import annotations

import ast
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchst
from torchst.errors import ArgumentError, CheckpointError, DeviceMapError, FormatError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

X = torch.tensor([[1, 5, 7, 3, 99, 0, 12], [4, 2, 127, 11, 8, 8, 1]])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


# -- meta-initialised RoPE models ------------------------------------------------------------


def _llama(tmp_path: Path, kind: str = "llama"):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        )  # fmt: skip
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        )  # fmt: skip
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    ref = cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = ref(X).logits
    return cls, cfg, expected


@pytest.mark.parametrize("kind", ["llama", "qwen2-linear-rope"])
def test_readme_recipe_torch_device_meta_matches_from_pretrained_bit_for_bit(tmp_path: Path, kind: str) -> None:
    cls, cfg, expected = _llama(tmp_path, kind)
    with torch.device("meta"):  # the README's way: everything on meta, rotary inv_freq included
        model = cls(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on meta, nothing to warn about
        torchst.load_model(model, tmp_path / "hf", device_map={"": "cpu"})
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        assert torch.equal(model.eval()(X).logits, expected)


def test_init_empty_weights_matches_from_pretrained_bit_for_bit(tmp_path: Path) -> None:
    cls, cfg, expected = _llama(tmp_path)
    with torchst.init_empty_weights():
        model = cls(cfg)
    assert model.model.embed_tokens.weight.is_meta and not model.model.rotary_emb.inv_freq.is_meta
    assert torchst.load_model(model, tmp_path / "hf") == ([], [])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model.eval()(X).logits, expected)


def test_init_empty_weights_include_buffers_then_load(tmp_path: Path) -> None:
    cls, cfg, expected = _llama(tmp_path)
    with torchst.init_empty_weights(include_buffers=True):
        model = cls(cfg)
    assert model.model.rotary_emb.inv_freq.is_meta
    torchst.load_model(model, tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model.eval()(X).logits, expected)


def test_meta_buffer_that_cannot_be_computed_is_named_with_the_fix(tmp_path: Path) -> None:
    class Rope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("inv_freq", torch.arange(2.0), persistent=False)

    torchst.save_model(Rope(), tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = Rope()
    with pytest.warns(UserWarning, match=r"\['inv_freq'\] are still on the meta device.*torchst\.init_empty_weights\(\)"):
        torchst.load_model(model, tmp_path / "m.safetensors")
    with torchst.init_empty_weights():
        model = Rope()
    torchst.load_model(model, tmp_path / "m.safetensors")
    assert torch.equal(model.inv_freq, torch.arange(2.0))


def test_strict_false_names_parameters_left_on_meta(tmp_path: Path) -> None:
    torchst.save_file({"embed.weight": torch.ones(16, 8)}, tmp_path / "part.safetensors")
    with torchst.init_empty_weights():
        model = Net()
    with pytest.warns(UserWarning, match=r"does not hold 6 tensor\(s\) of Net, which stay on the meta device") as rec:
        missing, _ = torchst.load_model(model, tmp_path / "part.safetensors", strict=False)
    assert "'layers.0.weight'" in str(rec[0].message) and "'head.bias'" in str(rec[0].message)
    assert len(missing) == 6 and not model.embed.weight.is_meta


# -- every name a message or docstring mentions exists ----------------------------------------

_NAME = re.compile(r"\btorchst((?:\.[A-Za-z_]\w*)+)")


_REPORTERS = {"warn", "debug", "info", "warning", "error", "exception", "critical"}


def _texts(tree: ast.AST) -> list[str]:
    """Docstrings, and the strings of every raise and every warnings/logging call."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(ast.get_docstring(node) or "")
        reporting = isinstance(node, ast.Raise) or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REPORTERS
        )
        if reporting:
            out += [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return out


def _mentioned_names() -> set[str]:
    root = Path(torchst.__file__).parent
    found: set[str] = set()
    for path in root.rglob("*.py"):
        for text in _texts(ast.parse(path.read_text())):
            found.update("torchst" + m for m in _NAME.findall(text))
    readme = Path(torchst.__file__).parent.parent / "README.md"
    if readme.exists():
        found.update("torchst" + m for m in _NAME.findall(readme.read_text()))
    return found


def _metadata_keys() -> set[str]:
    """Module constants such as ``ALIASES_KEY = "torchst.aliases"``: names of metadata keys, not attributes."""
    keys: set[str] = set()
    for path in Path(torchst.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            value = node.value.value if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) else None
            if isinstance(value, str) and value.startswith("torchst."):
                keys.add(value)
    return keys


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_torchst_name_in_messages_docstrings_and_readme_exists() -> None:
    names = _mentioned_names() - _metadata_keys()
    assert "torchst.init_empty_weights" in names and "torchst.load_model" in names
    broken = sorted(n for n in names if not _resolves(n))
    assert broken == []


# -- one device check for every entry point --------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize(
    "call",
    [
        lambda p: torchst.load_file(p, device="cuda"),
        lambda p: torchst.safe_open(p, device="cuda:1"),
        lambda p: torchst.load_state_dict(p, device="cuda"),
        lambda p: torchst.load_model(Net(), p, device="cuda"),
        lambda p: torchst.load_model(Net(), p, device_map={"": "cuda:0"}),
    ],
)
def test_cuda_without_cuda_is_the_same_device_map_error_everywhere(tmp_path: Path, call) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.safetensors"
    torchst.save_model(Net(), path)
    with pytest.raises(DeviceMapError, match=r"'cuda(:\d)?' was requested but CUDA is not available on this machine"):
        call(path)


def test_device_strings_are_never_rewritten(tmp_path: Path) -> None:
    from torchst.format.reader import check_device

    assert str(check_device("meta")) == "meta"
    assert check_device(torch.device("cuda", 1)).index == 1 if torch.cuda.device_count() > 1 else True
    path = tmp_path / "m.safetensors"
    torchst.save_file({"w": torch.ones(2)}, path)
    assert torchst.load_file(path, device="meta")["w"].is_meta  # meta stays meta, never cpu
    with pytest.raises(DeviceMapError, match="device 'cpux' is invalid"):
        torchst.load_file(path, device="cpux")


# -- no silently ignored argument ------------------------------------------------------------


def test_dtype_on_a_built_model_casts_it(tmp_path: Path) -> None:
    src = Net()
    torchst.save_model(src, tmp_path / "m.safetensors")
    model = Net()
    torchst.load_model(model, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.head.weight, src.head.weight.bfloat16())
    assert all(p.requires_grad for p in model.parameters())


def test_device_map_typo_names_the_key_and_close_matches(tmp_path: Path) -> None:
    torchst.save_model(Net(), tmp_path / "m.safetensors")
    with torchst.init_empty_weights():
        model = Net()
    with pytest.raises(DeviceMapError, match=r"'layer\.0' \(did you mean 'layers\.0'.*\) match no module or tensor name"):
        torchst.load_model(model, tmp_path / "m.safetensors", device_map={"layer.0": "cpu", "": "cpu"})
    assert model.embed.weight.is_meta  # nothing was loaded
    with pytest.raises(DeviceMapError, match="'hed' .*did you mean 'head'"):
        torchst.load_state_dict(tmp_path / "m.safetensors", device_map={"hed": "cpu", "": "cpu"})


# -- clear errors -------------------------------------------------------------------------------


def test_load_file_on_a_directory_points_to_the_directory_loaders(tmp_path: Path) -> None:
    torchst.save_model(Net(), tmp_path / "ckpt")
    with pytest.raises(FormatError, match=r"is a directory, not a \.safetensors file; .*torchst\.load_state_dict"):
        torchst.load_file(tmp_path / "ckpt")


@pytest.mark.parametrize("legacy", [False, True])
def test_load_file_on_a_torch_save_file_points_to_convert(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(Net().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    kind = "a pickle stream" if legacy else "a zip archive"
    with pytest.raises(FormatError, match=rf"is not a safetensors file: it is {kind}.*`torchst convert "):
        torchst.load_file(path)
    with pytest.raises(FormatError, match="torchst convert"):
        torchst.load_model(Net(), path)


def test_same_misuse_same_class_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    torchst.save_model(Net(), path)
    for call in (
        lambda: torchst.save_model({"w": torch.ones(1)}, path),  # type: ignore[arg-type]
        lambda: torchst.load_model({"w": torch.ones(1)}, path),  # type: ignore[arg-type]
    ):
        with pytest.raises(ArgumentError, match="expects a torch.nn.Module, found dict"):
            call()
    for call in (
        lambda: torchst.load_file(path, backend="fast"),
        lambda: torchst.load_state_dict(path, backend="fast"),
        lambda: torchst.load_model(Net(), path, backend="fast"),
    ):
        with pytest.raises(ArgumentError, match="backend 'fast' is invalid"):
            call()
    for call in (
        lambda: torchst.load_state_dict(path, dtype=torch.int8),
        lambda: torchst.load_model(Net(), path, dtype=torch.int8),
        lambda: torchst.nn.cast_on_save(Net(), torch.int8),
    ):
        with pytest.raises(ArgumentError, match="dtype must be a floating torch.dtype"):
            call()
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, TypeError)


def test_shape_mismatch_loads_nothing(tmp_path: Path) -> None:
    torchst.save_file({"embed.weight": torch.ones(3, 8)}, tmp_path / "bad.safetensors")
    model = Net()
    before = model.embed.weight.clone()
    with pytest.raises(CheckpointError, match=r"'embed.weight': checkpoint has shape \[3, 8\], the model has \[16, 8\]"):
        torchst.load_model(model, tmp_path / "bad.safetensors", strict=False)
    assert torch.equal(model.embed.weight, before)


# -- progress and logging --------------------------------------------------------------------


def test_progress_bar_on_request_and_by_environment(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tqdm")
    torchst.save_model(Net(), tmp_path / "ckpt", max_shard_size=200)
    with torchst.init_empty_weights():
        model = Net()
    torchst.load_model(model, tmp_path / "ckpt", progress=True)
    assert "Loading weights" in capsys.readouterr().err
    monkeypatch.setenv("TORCHST_PROGRESS", "1")
    torchst.load_state_dict(tmp_path / "ckpt")
    assert "Loading" in capsys.readouterr().err
    torchst.load_state_dict(tmp_path / "ckpt", progress=False)
    assert capsys.readouterr().err == ""


def test_buffer_computation_is_logged(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cls, cfg, _ = _llama(tmp_path)
    with torch.device("meta"):
        model = cls(cfg)
    with caplog.at_level(logging.DEBUG, logger="torchst"):
        torchst.load_model(model, tmp_path / "hf")
    assert any("inv_freq" in r.getMessage() and r.name.startswith("torchst.") for r in caplog.records)


# -- in-place loads into a built model ---------------------------------------------------------


def test_in_place_load_fills_the_same_parameters(tmp_path: Path) -> None:
    src = Net()
    torchst.save_model(src, tmp_path / "ckpt", max_shard_size=300)  # several shards
    model = Net()
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert torchst.load_model(model, tmp_path / "ckpt") == ([], [])
    for n, p in model.named_parameters():
        assert p is params[n] and torch.equal(p, dict(src.named_parameters())[n])
    assert opt.param_groups[0]["params"][0] is model.embed.weight  # the optimizer still trains the model


def test_in_place_load_with_a_hook_that_exchanges_entries(tmp_path: Path) -> None:
    src = Net()
    torchst.save_model(src, tmp_path / "m.safetensors")
    model = Net()

    def swap(module: nn.Module, state: dict, prefix: str, *args: object) -> None:  # type: ignore[type-arg]
        a, b = prefix + "layers.0.weight", prefix + "layers.1.weight"
        state[a], state[b] = state[b], state[a]

    model.register_load_state_dict_pre_hook(swap)
    torchst.load_model(model, tmp_path / "m.safetensors")
    assert torch.equal(model.layers[0].weight, src.layers[1].weight)
    assert torch.equal(model.layers[1].weight, src.layers[0].weight)
