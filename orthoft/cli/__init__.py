"""``orthoft`` command line: a fixed command table, each command a module of this package.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the module of
the command being run is imported, so ``orthoft --help`` and ``--version`` load neither torch nor
PEFT. Errors a user can cause (bad recipe, missing file, wrong base, ...) are printed as one line
on stderr with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..version import __version__

# name -> (module, one-line help); the order is the order of ``orthoft --help``
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "orthoft.cli.train",
        "fine-tune with a YAML recipe (one GPU, CPU, or several processes via accelerate launch/torchrun)",
    ),
    "eval": ("orthoft.cli.eval", "evaluate a trained adapter: metrics and orthogonality diagnostics"),
    "export": (
        "orthoft.cli.export",
        "merge orthoft adapters into the base model and write a plain Hugging Face model folder",
    ),
    "diffusion": ("orthoft.cli.diffusion", "orthogonal adapters in diffusers pipelines"),
}
# what a user can cause and fix: shown as one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are added (its module imported)."""
    parser = argparse.ArgumentParser(prog="orthoft", description="Orthogonal fine-tuning: train, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"orthoft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return next((arg for arg in argv if arg in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"orthoft {args.command}: {' '.join(message.split())}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "build_parser", "main"]
