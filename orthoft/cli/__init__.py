"""``orthoft`` command line: a fixed command table, each command a module of this package.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; the table is in
``commands.py`` (standard library only), which the ``orthoft`` console script (``orthoft_cli.py``)
reads without importing this package, so ``orthoft --help`` and ``--version`` load neither torch nor
PEFT. Only the module of the command being run is imported. Errors a user can cause (bad recipe,
missing file, wrong base, ...) are printed as one line on stderr with exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from ..version import __version__
from .commands import COMMANDS, base_parser, command_in

# what a user can cause and fix: shown as one line, exit status 2. OSError covers the disk and the
# files (missing, read-only, full, no permission); RuntimeError is left out on purpose: real bugs keep
# their traceback, and library RuntimeErrors a user can cause are converted where they happen.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError)
# the fix for an OSError whose message does not give one
OS_ERROR_FIXES: dict[int, str] = {
    errno.ENOSPC: "free space on that disk or write somewhere else",
    errno.EDQUOT: "free space within your disk quota or write somewhere else",
    errno.EROFS: "that file system is read-only: write somewhere else",
    errno.EACCES: "you lack permission there: fix the permissions or write somewhere else",
    errno.EPERM: "the operation is not permitted there: fix the permissions or write somewhere else",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are added (its module imported)."""
    parser, commands = base_parser(__version__)
    if command is not None:
        importlib.import_module(COMMANDS[command][0]).add_arguments(commands[command])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_in(argv)).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"orthoft {args.command}: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The message of a user error on one line; an OSError without a fix gets the fix for its errno."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    message = " ".join(message.split())
    if isinstance(err, OSError) and "Fix:" not in message:
        fix = OS_ERROR_FIXES.get(err.errno or 0)
        if fix is not None:
            message += f". Fix: {fix} (--debug shows where it happened)."
        elif err.errno is not None and err.filename is not None:
            message += ". Fix: check that path (--debug shows where it happened)."
    return message


__all__ = ["COMMANDS", "OS_ERROR_FIXES", "USER_ERRORS", "build_parser", "main", "one_line"]
