"""torchst.compat.safetensors behaves like the real safetensors on the same inputs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import torchst.compat.safetensors as compat
import torchst.compat.safetensors.torch as compat_torch
from torchst.errors import FormatError, SerializationError, SharedTensorError, TensorNotFoundError

REF = (safetensors, safetensors.torch)
OURS = (compat, compat_torch)


def outcome(fn: Callable[[ModuleType, ModuleType], Any], mods: tuple[ModuleType, ModuleType]) -> Any:
    """``fn``'s result (tensors as comparable bit patterns) or the exception it raised."""
    try:
        result = fn(*mods)
    except Exception as e:  # noqa: BLE001 - the exception is the outcome under test
        return e
    return normalize(result)


def normalize(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.dtype, tuple(x.shape), x.contiguous().reshape(-1).view(torch.uint8).tolist() if x.numel() else [])
    if isinstance(x, dict):
        return [(k, normalize(v)) for k, v in x.items()]
    if isinstance(x, (list, tuple)):
        return [normalize(v) for v in x]
    return x


def same_behaviour(fn: Callable[[ModuleType, ModuleType], Any], *fragments: str) -> Any:
    """Run ``fn`` against both implementations; same result, or same exception kind and message bits."""
    theirs, ours = outcome(fn, REF), outcome(fn, OURS)
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"reference raised {theirs!r}, compat returned {ours!r}"
        if isinstance(theirs, safetensors.SafetensorError):
            assert isinstance(ours, compat.SafetensorError), repr(ours)
            assert isinstance(ours, FormatError)  # and our own tree
        else:
            builtin = next(c for c in type(theirs).__mro__ if c.__module__ == "builtins")
            assert isinstance(ours, builtin), f"reference raised {builtin.__name__}, compat raised {ours!r}"
        for frag in fragments:
            assert frag in str(theirs), f"{frag!r} not in reference message {theirs}"
            assert frag in str(ours), f"{frag!r} not in compat message {ours}"
        return ours
    assert not isinstance(ours, Exception), f"reference returned, compat raised {ours!r}"
    assert ours == theirs
    return ours


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(6, 4, generator=g),
        "ln.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "head.weight": torch.randn(3, 4, generator=g).to(torch.float16),
        "step": torch.tensor(3),
        "mask": torch.tensor([True, False]),
        "q8": torch.randint(0, 255, (2, 2), dtype=torch.uint8, generator=g).view(torch.float8_e5m2),
        "none": torch.empty(0, 2, dtype=torch.int32),
    }


@pytest.fixture
def ref_file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    return path


# -- writing -----------------------------------------------------------------------------------


def test_save_and_save_file_same_bytes(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    same_behaviour(lambda st, stt: stt.save(tensors))
    same_behaviour(lambda st, stt: stt.save(tensors, metadata={"format": "pt"}))
    same_behaviour(lambda st, stt: stt.save({}))
    for i, (_, stt) in enumerate((REF, OURS)):
        stt.save_file(tensors, tmp_path / f"{i}.safetensors", {"a": "b"})
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda: [torch.ones(1)], ["Expected a dict of [str, torch.Tensor] but received <class 'list'>"]),
        (lambda: {"a": [1.0]}, ["Key `a` is invalid, expected torch.Tensor but received <class 'list'>"]),
        (lambda: {"sp": torch.eye(2).to_sparse()}, ["You are trying to save a sparse tensors: `['sp']`", "to_dense"]),
        (lambda: {"t": torch.ones(2, 3).t()}, ["non contiguous tensor: `t`", ".contiguous()"]),
        (lambda: dict.fromkeys("ab", torch.ones(2)), ["Some tensors share memory", "save_model"]),
        (lambda: {**dict.fromkeys("ab", torch.ones(2)), "t": torch.ones(2, 3).t()}, ["Some tensors share memory"]),
        (lambda: {1: torch.ones(1)}, ["argument 'tensor_dict'", "'int' object is not an instance of 'str'"]),
        (lambda: {"m": torch.empty(2, device="meta")}, ["Cannot copy out of meta tensor"]),
        (lambda: {"c": torch.ones(1, dtype=torch.complex128)}, ["torch.complex128"]),
    ],
)
def test_save_refusals_match(make: Callable[[], Any], fragments: list[str]) -> None:
    err = same_behaviour(lambda st, stt: stt.save(make()), *fragments)
    assert isinstance(err, (SerializationError, SharedTensorError))  # our tree as well


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"a": 1}, "'int' object is not an instance of 'str'"),
        ({1: "a"}, "'int' object is not an instance of 'str'"),
        (["a"], "'list' object is not an instance of 'dict'"),
        ({"a": None}, "not an instance of 'str'"),
    ],
)
def test_bad_metadata_is_a_type_error(metadata: Any, fragment: str) -> None:
    err = same_behaviour(
        lambda st, stt: stt.save({"w": torch.ones(1)}, metadata=metadata), "argument 'metadata'", fragment
    )
    assert isinstance(err, TypeError) and isinstance(err, SerializationError)


def test_metadata_name_is_refused_where_the_reference_writes_a_broken_file() -> None:
    blob = safetensors.torch.save({"__metadata__": torch.ones(1)})
    with pytest.raises(safetensors.SafetensorError):
        safetensors.torch.load(blob)  # the reference cannot read what it wrote
    with pytest.raises(SerializationError, match="__metadata__"):
        compat_torch.save({"__metadata__": torch.ones(1)})


def test_save_file_is_atomic(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "m.safetensors"
    compat_torch.save_file(tensors, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="non contiguous"):
        compat_torch.save_file({"t": torch.ones(2, 3).t()}, path)
    assert path.read_bytes() == before
    compat_torch.save_file(compat_torch.load_file(path), path)  # over a file that is still mapped
    assert path.read_bytes() == before


# -- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_safe_open_same_results(ref_file: Path, backend: str) -> None:
    def read(st: ModuleType, stt: ModuleType) -> Any:
        with st.safe_open(ref_file, framework="pt", device="cpu", backend=backend) as f:
            s = f.get_slice("embed.weight")
            return (
                f.keys(),
                f.offset_keys(),
                f.metadata(),
                f.get_tensor("ln.bias"),
                f.get_tensors(),
                s.get_shape(),
                s.get_dtype(),
                s[1:5:2, ::3],
                s[-1],
                s[..., 0],
            )

    same_behaviour(read)
    same_behaviour(lambda st, stt: stt.load_file(ref_file, backend=backend))
    same_behaviour(lambda st, stt: stt.load_file(ref_file, device="cpu"))
    # load(bytes) returns hash order in the reference; compare by name.
    same_behaviour(lambda st, stt: sorted(stt.load(ref_file.read_bytes()).items(), key=lambda kv: kv[0]))


def test_safe_open_without_context_manager(ref_file: Path) -> None:
    same_behaviour(lambda st, stt: st.safe_open(ref_file, "pt").get_tensor("embed.weight"))


def test_numpy_framework(ref_file: Path) -> None:
    np = pytest.importorskip("numpy")

    def read(st: ModuleType, stt: ModuleType) -> Any:
        with st.safe_open(ref_file, framework="numpy") as f:
            a = f.get_tensor("embed.weight")
            return (type(a).__name__, a.tolist(), f.get_slice("head.weight")[1:].tolist())

    same_behaviour(read)
    with compat.safe_open(ref_file, framework="np") as f:
        assert isinstance(f.get_tensor("step"), np.ndarray)
        with pytest.raises(compat.SafetensorError, match="BF16 has no numpy equivalent"):
            f.get_tensor("ln.bias")


@pytest.mark.parametrize(
    ("open_args", "fragment"),
    [
        ({"framework": "bogus"}, "framework bogus is invalid"),
        ({"framework": "pt", "device": "bogus"}, "device bogus is invalid"),
        ({"framework": "pt", "backend": "x"}, 'backend "x" is invalid (expected one of: "mmap", "pread"'),
    ],
)
def test_open_argument_errors(ref_file: Path, open_args: dict[str, Any], fragment: str) -> None:
    same_behaviour(lambda st, stt: st.safe_open(ref_file, **open_args), fragment)


def test_missing_tensor_and_closed_file(ref_file: Path) -> None:
    def missing(st: ModuleType, stt: ModuleType) -> Any:
        with st.safe_open(ref_file, "pt") as f:
            return f.get_tensor("lm_head.weight")

    err = same_behaviour(missing, "File does not contain tensor lm_head.weight")
    assert isinstance(err, TensorNotFoundError) and isinstance(err, KeyError)
    assert str(ref_file) in str(err)

    def missing_slice(st: ModuleType, stt: ModuleType) -> Any:
        with st.safe_open(ref_file, "pt") as f:
            return f.get_slice("nope")

    same_behaviour(missing_slice, "File does not contain tensor nope")

    def closed(call: str) -> Callable[[ModuleType, ModuleType], Any]:
        def run(st: ModuleType, stt: ModuleType) -> Any:
            with st.safe_open(ref_file, "pt") as f:
                pass
            return getattr(f, call)("embed.weight") if call.startswith("get") else getattr(f, call)()

        return run

    for call in ("keys", "offset_keys", "metadata", "get_tensor", "get_slice"):
        same_behaviour(closed(call), "File is closed")


def test_missing_file(tmp_path: Path) -> None:
    same_behaviour(lambda st, stt: st.safe_open(tmp_path / "none.safetensors", "pt"))
    same_behaviour(lambda st, stt: stt.load_file(tmp_path / "none.safetensors"))


def _blob(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob",
    [
        b"\x01",
        _blob(b"{]"),
        _blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        _blob({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6),
        _blob({"w": {"dtype": "Z", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        _blob({"__metadata__": {"a": 1}}),
    ],
)
def test_bad_files_raise_safetensor_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    err = same_behaviour(lambda st, stt: st.safe_open(path, "pt"), "Error while deserializing header")
    assert str(path) in str(err) and isinstance(err.__cause__, FormatError)
    same_behaviour(lambda st, stt: stt.load_file(path))
    same_behaviour(lambda st, stt: stt.load(blob), "Error while deserializing")
    same_behaviour(lambda st, stt: st.deserialize(blob), "Error while deserializing")


def test_load_bytes_handles_dtypes_the_reference_cannot() -> None:
    t = {"e8": torch.arange(4, dtype=torch.uint8).view(torch.float8_e8m0fnu)}
    blob = compat_torch.save(t)
    with pytest.raises(KeyError):
        safetensors.torch.load(blob)
    assert compat_torch.load(blob)["e8"].view(torch.uint8).tolist() == [0, 1, 2, 3]


# -- raw API -----------------------------------------------------------------------------------


def test_serialize_and_deserialize(tmp_path: Path) -> None:
    a = torch.arange(6, dtype=torch.float32)
    b = torch.tensor([[0x21, 0x43]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)

    def specs(st: ModuleType) -> dict[str, Any]:
        return {
            "a": st.TensorSpec(dtype="float32", shape=[2, 3], data_ptr=a.data_ptr(), data_len=24),
            "b": st.TensorSpec(dtype="float4_e2m1fn_x2", shape=list(b.shape), data_ptr=b.data_ptr(), data_len=2),
        }

    blob = same_behaviour(lambda st, stt: st.serialize(specs(st), metadata={"k": "v"}))
    same_behaviour(lambda st, stt: (s := specs(st)["b"]).dtype + str(s.shape) + str(s.data_len))
    same_behaviour(lambda st, stt: sorted((name, sorted(spec.items())) for name, spec in st.deserialize(blob)))
    for i, (st, _) in enumerate((REF, OURS)):
        st.serialize_file(specs(st), tmp_path / f"{i}.safetensors")
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()
    same_behaviour(
        lambda st, stt: st.TensorSpec(dtype="float128", shape=[1], data_ptr=0, data_len=16), 'Unknown dtype "float128"'
    )
    bad = lambda st, stt: st.serialize(
        {"a": st.TensorSpec(dtype="float32", shape=[2], data_ptr=a.data_ptr(), data_len=4)}
    )
    same_behaviour(bad, "Error while serializing: invalid shape, data type, or offset for tensor")


def test_numpy_module(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    import safetensors.numpy as ref_np

    import torchst.compat.safetensors.numpy as our_np

    arrays = {"a": np.arange(6, dtype=">i4").reshape(2, 3), "b": np.ones(3, dtype=np.float16), "c": np.array(True)}
    assert our_np.save(arrays) == ref_np.save(arrays)
    assert our_np.save(arrays, metadata={"x": "y"}) == ref_np.save(arrays, metadata={"x": "y"})
    our_np.save_file(arrays, tmp_path / "o.safetensors")
    ref_np.save_file(arrays, tmp_path / "r.safetensors")
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    for loaded in (our_np.load_file(tmp_path / "r.safetensors"), our_np.load(ref_np.save(arrays))):
        assert list(loaded) == list(ref_np.load_file(str(tmp_path / "r.safetensors")))
        assert all(
            np.array_equal(loaded[k], arrays[k]) and loaded[k].dtype == arrays[k].dtype.newbyteorder("=")
            for k in arrays
        )
    with pytest.raises(ValueError, match="ascontiguousarray"):
        our_np.save({"t": np.ones((3, 2)).T})  # the reference writes the wrong bytes here
    with pytest.raises(compat.SafetensorError, match="Unknown dtype"):
        our_np.save({"s": np.array(["text"])})


# -- shared tensors, save_model / load_model ---------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_helpers_agree_with_reference() -> None:
    base, other = torch.arange(24.0).reshape(4, 6), torch.zeros(10)
    sd = {
        "full": base,
        "view": base.view(24),
        "lo": other[:4],
        "hi": other[4:],
        "free": torch.ones(3),
        "meta": torch.empty(2, device="meta"),
        "empty": torch.empty(0),
    }
    for t in sd.values():
        for fn in ("storage_ptr", "storage_size", "_is_complete", "_end_ptr"):
            if t.device.type == "meta" and fn != "storage_ptr":
                continue
            assert getattr(compat_torch, fn)(t) == getattr(safetensors.torch, fn)(t), fn

    def groups(x: list[set[str]]) -> set[frozenset[str]]:
        return {frozenset(g) for g in x}

    assert groups(compat_torch._find_shared_tensors(sd)) == groups(safetensors.torch._find_shared_tensors(sd))
    # A lone partial view ("lo") has no complete name: both refuse with RuntimeError.
    same_behaviour(lambda st, stt: stt._remove_duplicate_names(sd), "None is covering the entire storage")
    del sd["lo"], sd["hi"]
    for kw in ({}, {"preferred_names": ["view"]}, {"discard_names": ["full"]}):
        assert compat_torch._remove_duplicate_names(sd, **kw) == safetensors.torch._remove_duplicate_names(sd, **kw)
    assert compat_torch._remove_duplicate_names(sd, discard_names=["full"]) == {"view": ["full"]}
    ref_size = {k: v for k, v in safetensors.torch._SIZE.items() if k is not None}
    assert ref_size.items() <= compat_torch._SIZE.items()
    assert safetensors.torch._TYPES.items() <= compat_torch._TYPES.items()
    assert compat_torch._getdtype("F8_E8M0") == torch.float8_e8m0fnu
    with pytest.raises(KeyError):
        compat_torch._getdtype("F6_E2M3")


def test_nested_view_stays_shared() -> None:
    # safetensors 0.8 forgets the outer range after a nested view, so "c" (inside "a") looks
    # unshared and both would be written; we keep the furthest end and group all three.
    base = torch.zeros(100)
    sd = {"a": base, "b": base[10:20], "c": base[30:40]}
    assert compat_torch._find_shared_tensors(sd) == [{"a", "b", "c"}]
    assert compat_torch._remove_duplicate_names(sd) == {"a": ["b", "c"]}
    with pytest.raises(RuntimeError, match="share memory"):
        compat_torch.save(sd)


def test_no_complete_name_is_a_runtime_error() -> None:
    base = torch.zeros(10)
    sd = {"a": base[:6], "b": base[4:]}
    err = same_behaviour(lambda st, stt: stt._remove_duplicate_names(sd), "None is covering the entire storage")
    assert isinstance(err, SharedTensorError)


def test_save_model_and_load_model_match(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    md = {"user": "data"}
    paths = [tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"]
    safetensors.torch.save_model(model, paths[0], metadata=dict(md))
    compat_torch.save_model(model, paths[1], metadata=md)
    assert md == {"user": "data"}  # the caller's dict is not modified (the reference adds aliases)
    r, o = paths[0].read_bytes(), paths[1].read_bytes()
    n = struct.unpack("<Q", r[:8])[0]
    assert len(r) == len(o) and r[8 + n :] == o[8 + n :]
    assert json.loads(r[8 : 8 + n]) == json.loads(o[8 : 8 + n])
    assert json.loads(o[8 : 8 + n])["__metadata__"] == {"user": "data", "head.weight": "embed.weight"}

    for path in paths:
        for _, stt in (REF, OURS):
            fresh = Tied()
            result = stt.load_model(fresh, path)
            assert result == (set(), [])
            assert fresh.head.weight is fresh.embed.weight
            assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_load_model_strictness_matches(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    compat_torch.save_file({"embed.weight": torch.zeros(10, 4), "extra": torch.ones(1)}, path)
    same_behaviour(
        lambda st, stt: stt.load_model(Tied(), path),
        "Missing key(s) in state_dict:",
        '"body.bias"',
        'Unexpected key(s) in state_dict: "extra"',
    )
    same_behaviour(lambda st, stt: sorted(stt.load_model(Tied(), path, strict=False)[0]))
    same_behaviour(lambda st, stt: stt.load_model(Tied(), path, strict=False)[1])


def test_save_model_force_contiguous(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    model.weight = nn.Parameter(torch.ones(3, 2).t())
    same_behaviour(
        lambda st, stt: stt.save_model(model, tmp_path / "x.safetensors", force_contiguous=False),
        "non contiguous",
        "force_contiguous=True",
    )
    compat_torch.save_model(model, tmp_path / "ok.safetensors")
    assert compat_torch.load_file(tmp_path / "ok.safetensors")["weight"].equal(torch.ones(2, 3))


def test_transformers_tied_model_helpers() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    sd = model.state_dict()
    shared = [g for g in compat_torch._find_shared_tensors(sd) if len(g) > 1]
    assert shared == [{"lm_head.weight", "transformer.wte.weight"}]
    assert {frozenset(g) for g in compat_torch._find_shared_tensors(sd)} == {
        frozenset(g) for g in safetensors.torch._find_shared_tensors(sd)
    }
    for kw in ({}, {"discard_names": ["transformer.wte.weight"]}, {"preferred_names": ["lm_head.weight"]}):
        assert compat_torch._remove_duplicate_names(sd, **kw) == safetensors.torch._remove_duplicate_names(sd, **kw)
    assert compat_torch._remove_duplicate_names(sd) == {"lm_head.weight": ["transformer.wte.weight"]}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_transformers_runs_on_compat_as_safetensors(tmp_path: Path) -> None:
    # The drop-in claim, literally: transformers imports our modules under the safetensors name.
    code = textwrap.dedent(
        f"""
        import sys
        import torchst.compat.safetensors as st, torchst.compat.safetensors.torch as stt
        sys.modules["safetensors"], sys.modules["safetensors.torch"] = st, stt
        import torch, transformers
        cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        model.save_pretrained({str(tmp_path)!r})
        again = transformers.GPT2LMHeadModel.from_pretrained({str(tmp_path)!r})
        assert again.lm_head.weight is again.transformer.wte.weight
        for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), k
        assert sys.modules["safetensors"].safe_open.__module__ == "torchst.compat.safetensors"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="pt") as f:  # the real one reads it
        assert "transformer.wte.weight" in f.offset_keys()
