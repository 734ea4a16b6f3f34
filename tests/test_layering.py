"""Imports point down only: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torchst

ROOT = Path(torchst.__file__).parent

# Rank of each top-level component of the package; a module may import its own
# component or any component of strictly lower rank.
RANKS = {
    "errors": 0,
    "_dtypes": 1,
    "_aliases": 1,
    "_progress": 1,
    "_lazy": 1,
    "storage": 1,
    "format": 2,
    "dedup": 3,
    "devices": 3,
    "sharding": 4,
    "state": 4,
    "nn": 5,
    "distributed": 6,
    "manager": 7,
    "integrations": 8,
    "compat": 8,
    "resolve": 8,
    "convert": 9,
    "cli": 10,
    "__init__": 11,
    "__main__": 12,
}


def _component(module_path: Path) -> str:
    rel = module_path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imported_components(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT)
    pkg_parts = list(rel.parts[:-1])  # package of this module, relative to torchst
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    found.add(target[0])
                else:  # "from . import x" at the package root
                    found.update(alias.name for alias in node.names)
            elif node.module and (node.module == "torchst" or node.module.startswith("torchst.")):
                parts = node.module.split(".")[1:]
                found.update([parts[0]] if parts else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torchst."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_component_has_a_rank() -> None:
    components = {_component(p) for p in ROOT.rglob("*.py")}
    assert components <= set(RANKS), f"add a rank for: {sorted(components - set(RANKS))}"


def test_imports_point_down_only() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        own = _component(path)
        for imported in _imported_components(path):
            if imported == own or imported not in RANKS:
                continue
            if RANKS[imported] >= RANKS[own]:
                violations.append(f"{path.relative_to(ROOT)} ({own}) imports {imported}")
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_import_does_not_pull_in_optional_packages() -> None:
    # accelerate / transformers / numpy integrations must be imported lazily, on use.
    code = (
        "import sys, torchst; "
        "print(sorted(m for m in ('transformers', 'accelerate', 'safetensors', 'huggingface_hub') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checker_resolves_relative_and_absolute_imports(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "torchst"
    (pkg / "format").mkdir(parents=True)
    mod = pkg / "format" / "bad.py"
    mod.write_text("from ..nn import save_model\nfrom . import header\nimport torchst.manager\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert _imported_components(mod) == {"nn", "format", "manager"}
