"""The one progress switch: explicit argument, else TORCHST_PROGRESS; bars go to stderr through tqdm."""

from __future__ import annotations

import io

import pytest

from torchst._progress import progress, progress_enabled


def test_explicit_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHST_PROGRESS", "1")
    assert progress_enabled(None) is True
    assert progress_enabled(False) is False
    monkeypatch.setenv("TORCHST_PROGRESS", "0")
    assert progress_enabled(None) is False
    assert progress_enabled(True) is True
    monkeypatch.delenv("TORCHST_PROGRESS")
    assert progress_enabled(None) is False


def test_enabled_bar_draws_from_the_start_and_disabled_draws_nothing() -> None:
    out = io.StringIO()
    with progress(total=2_000_000, desc="Saving", enabled=True, file=out) as bar:
        assert "Saving" in out.getvalue()  # drawn before any update: no delay threshold
        bar.update(2_000_000)
    assert "MB" in out.getvalue() or "M" in out.getvalue()
    quiet = io.StringIO()
    with progress(total=10, desc="Saving", enabled=False, file=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
