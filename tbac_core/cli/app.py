"""The entry point: the parser of every sub-command, and how errors become messages and exit codes.

Exit status: 0 success, 1 a generation (or a batch row) failed, 2 unusable arguments or files
(bad flags, a missing image, a missing or broken model folder), 130 interrupted. An unexpected
exception prints one line (its type and message); ``--debug`` prints its traceback too.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Sequence

from .. import __version__
from ..errors import (
    CheckpointError,
    ComponentNotFoundError,
    InvalidParameterError,
    LayerSpecError,
    TBACError,
    UsageError,
)
from .commands import COMMANDS
from .context import CommandContext

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# What was asked cannot be done with these arguments or files: the user fixes the call.
USAGE_ERRORS = (UsageError, InvalidParameterError, LayerSpecError, CheckpointError, ComponentNotFoundError)
DEBUG_HELP = "On an unexpected error, print its traceback (and log every failed batch row's)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tbac_core",
        description="TBAC-UniImage without ComfyUI: generate, edit and understand images, render batches.",
        epilog="Run 'python -m tbac_core <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"tbac_core {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    for command in subparsers.choices.values():  # also accepted after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None, *, pipeline=None) -> int:
    """Run the command line; returns the exit status.

    ``pipeline``: an already loaded ``TBACPipeline`` to use instead of loading the model options
    (for programs that embed the CLI, and tests).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(CommandContext(args, pipeline))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USAGE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TBACError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, the traceback only when asked
        if args.debug:
            traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first_line}" + ("" if args.debug else "  (--debug shows the "
              "traceback)"), file=sys.stderr)
        return EXIT_FAILED
