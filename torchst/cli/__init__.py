"""The ``torchst`` command line: ``inspect | verify | convert | diff | cleanup``.

Each subcommand lives in its own module with ``register(subparsers)`` (arguments, help) and
``run(args) -> exit code``; adding one is a new module plus a line in ``COMMANDS``.

Exit codes: 0 ok; 1 differences (``diff``) or corruption (``verify``) found; 2 usage error or
unreadable input; 130 interrupted.  No traceback for an ``OSError`` or Ctrl-C.  Header-only
commands (``inspect``, ``verify``, ``--help``, ``--version`` and ``diff`` of
identical checkpoints) never import torch.

>>> main(["verify", "ckpt/"])            # same as the shell command `torchst verify ckpt/`
OK: 3 tensors in 3 file(s), headers, index and manifests validated, every checksum matches
0
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import TorchstError
from . import cleanup, convert, diff, inspect, verify

__all__ = ["COMMANDS", "EXIT_DIFFERENT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_DIFFERENT = 1  # diff found differences, verify found corruption
EXIT_USAGE = 2  # bad arguments or unreadable input
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

COMMANDS = (inspect, verify, convert, diff, cleanup)

EPILOG = """\
exit codes:
  0    success (verify: no problem found; diff: identical)
  1    diff: the checkpoints differ; verify: corruption found
  2    usage error, or an input that cannot be read (missing, not a checkpoint, permission, I/O error)
  130  interrupted (Ctrl-C)

layouts: every PATH may be a .safetensors file, a sharded directory (or its *.index.json),
a CheckpointManager step directory (step_20/: model weights and training state) or a
CheckpointManager run directory (every committed step).

progress bars are shown on a terminal (stderr) and never when it is piped or with -q."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (also used to render ``--help``)."""
    p = argparse.ArgumentParser(
        prog="torchst",
        description="Inspect, verify, convert and compare safetensors checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"torchst {__version__}", help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no notes on stderr (errors are still shown)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub, common, EPILOG)
    return p


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    def format(self, record: logging.LogRecord) -> str:
        return f"torchst: {record.getMessage()}"


def _setup_logging(quiet: bool) -> tuple[logging.Handler, int]:
    # The library logs what users want to know (a nested key chosen, a fallback); show it on stderr.
    handler = _Handler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    logger = logging.getLogger("torchst")
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > handler.level:
        logger.setLevel(handler.level)
    return handler, level


def _describe_os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        what += " (free some space or write elsewhere)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        what += " (check the file's permissions)"
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{what}"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: run one subcommand and return its exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler, level = _setup_logging(args.quiet)
    prog = f"torchst {args.command}"
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`torchst inspect big | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except TorchstError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"{prog}: error: {_describe_os_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    finally:  # main() may be called in-process: leave logging as we found it
        logging.getLogger("torchst").removeHandler(handler)
        logging.getLogger("torchst").setLevel(level)
