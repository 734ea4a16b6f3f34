"""The CLI as a process: torch-free start, progress on a terminal, clean piped JSON, exit codes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchst
from torchst.cli import build_parser, main

# Runs the console script in-process and reports whether torch got imported.
_PROBE = (
    "import sys, runpy, io, contextlib\n"
    "sys.argv = ['torchst'] + sys.argv[1:]\n"
    "code = 0\n"
    "try:\n"
    "    with contextlib.redirect_stdout(io.StringIO()):\n"
    "        runpy.run_module('torchst', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "print(code, 'torch' in sys.modules)\n"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    sd = {f"layer.{i}.weight": torch.full((4, 4), float(i)) for i in range(20)}
    torchst.save_file(sd, d / "a.safetensors", metadata={"k": "v"})
    torchst.save_file(sd, d / "b.safetensors", metadata={"k": "v"})
    torchst.save_state_dict(sd, d / "sharded", max_shard_size=300)
    return {"a": d / "a.safetensors", "b": d / "b.safetensors", "sharded": d / "sharded"}


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{a}"],
        ["inspect", "{sharded}", "--json"],
        ["verify", "{sharded}"],
        ["diff", "{a}", "{b}"],
        ["--version"],
        ["--help"],
        ["inspect", "--help"],
    ],
    ids=lambda a: " ".join(a),
)
def test_header_only_commands_never_import_torch(files: dict[str, Path], argv: list[str]) -> None:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"], out.stderr


def test_import_torchst_is_lazy_and_complete() -> None:
    code = (
        "import sys, torchst\n"
        "assert 'torch' not in sys.modules\n"
        "assert set(torchst.__all__) <= set(dir(torchst))\n"
        "import torchst.format.header, torchst._dtypes, torchst.resolve, torchst.cli\n"
        "assert 'torch' not in sys.modules\n"
        "for name in torchst.__all__: exec(f'from torchst import {name}')\n"
        "print(torchst.save_file.__module__, torchst.nn.__name__, torchst.sharding.open_checkpoint.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torchst.format.writer", "torchst.nn", "open_checkpoint"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        torchst.nope  # noqa: B018


def _under_pty(argv: list[str]) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; returns (exit code, everything it wrote)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # A terminal has a size (a fresh pty reports 0 columns, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchst", *argv], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty semantics")
def test_progress_bar_on_a_terminal_and_not_with_quiet(files: dict[str, Path]) -> None:
    code, text = _under_pty(["verify", str(files["sharded"]), "--full"])
    assert code == 0 and "Reading" in text and "%|" in text and "OK: 20 tensors" in text
    code, text = _under_pty(["diff", str(files["a"]), str(files["b"])])
    assert code == 0 and "Comparing" in text and "identical" in text
    code, text = _under_pty(["inspect", str(files["sharded"])])
    assert code == 0 and "Reading headers" in text and "20 tensors" in text
    out = files["a"].parent / "converted"
    code, text = _under_pty(["convert", str(files["sharded"]), str(out), "--max-shard-size", "300"])
    assert code == 0 and "Saving" in text and "%|" in text and "converted 20 tensors" in text
    code, text = _under_pty(["inspect", str(files["sharded"]), "-q"])
    assert code == 0 and "%|" not in text and "20 tensors" in text


def test_piped_json_is_clean(files: dict[str, Path]) -> None:
    for argv in (
        ["inspect", str(files["sharded"])],
        ["verify", str(files["a"])],
        ["diff", str(files["a"]), str(files["b"])],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "torchst", *argv, "--json"], capture_output=True, text=True, check=True
        )
        json.loads(out.stdout)
        assert out.stderr == ""


def test_help_documents_every_argument_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[attr-defined]
        for action in sub._actions:
            assert action.help, f"torchst {name}: {action.dest} has no help text"
        for flag in ("-q", "--quiet"):
            assert flag in sub._option_string_actions, name
    for name in ("inspect", "verify", "diff"):
        assert "--json" in subparsers.choices[name]._option_string_actions  # type: ignore[attr-defined]
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "1    diff: the checkpoints differ; verify: corruption found" in text
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"torchst {torchst.__version__}"
    assert main(["inspect"]) == 2  # missing argument: usage error


def test_os_errors_and_ctrl_c_have_no_traceback(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchst.cli.inspect as cli_inspect
    import torchst.convert

    def denied(path: object, **_: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(cli_inspect, "resolve", denied)
    assert main(["inspect", str(files["a"])]) == 2
    err = capsys.readouterr().err
    assert err == f"torchst inspect: error: {files['a']}: Permission denied (check the file's permissions)\n"

    def interrupted(path: object, **_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_inspect, "resolve", interrupted)
    assert main(["inspect", str(files["a"])]) == 130
    assert capsys.readouterr().err.strip() == "torchst inspect: interrupted"

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.safetensors"))

    monkeypatch.setattr(torchst.convert, "save_state_dict", disk_full)
    assert main(["convert", str(files["a"]), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    monkeypatch.undo()
    (tmp_path / "plain").write_text("")  # a file where a directory is needed: a real OSError
    assert main(["convert", str(files["a"]), str(tmp_path / "plain" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchst convert: error: ") and "plain" in err and "Traceback" not in err


def test_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    # `torchst inspect big | head -1`: the reader goes away early; no traceback, exit 0.
    big = tmp_path / "big.safetensors"
    torchst.save_file({f"layer.{i}.weight": torch.zeros(1) for i in range(5000)}, big)  # more than a pipe buffer
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchst", "inspect", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # like `head -1` exiting
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and first.startswith(b"layer.") and "Traceback" not in err
