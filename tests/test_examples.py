"""Every script in examples/ runs to completion on CPU and reports what it did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))

# Lines an example must print to prove it did what it claims (checked when the example exists).
EXPECTED = {
    "quickstart.py": [
        "lm_head still tied to embed: True; outputs identical: True",
        "committed steps kept: [4, 6]",
        "parameters identical = True",
        "truncated file refused: FileSizeError",
        "flipped byte caught: IntegrityError",
    ],
    "pretrained_sharded.py": ["identical logits: True", "lm_head still tied to embed: True"],
    "fsdp_checkpoint.py": [
        "resumed on 1 rank: missing=[] unexpected=[]; weights identical = True",
        "from_pretrained on the FSDP2 checkpoint: identical logits: True",
    ],
    "train_resume.py": ["final weights identical to an uninterrupted run = True"],
}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, f"{script.name} failed:\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip(), f"{script.name} printed nothing"
    for phrase in EXPECTED.get(script.name, []):
        assert phrase in out.stdout, f"{script.name} did not print {phrase!r}:\n{out.stdout}"


def test_quickstart_is_listed() -> None:
    assert "quickstart.py" in [p.name for p in EXAMPLES]
