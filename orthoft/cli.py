"""``orthoft`` command line: one subcommand per module, each registering its own parser.

A command module exposes ``add_parser(subparsers)`` that adds its subparser and sets
``func`` (taking the parsed args, returning an exit code). Modules are imported only when
listed here, so a new command is one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("orthoft.training", "orthoft.evaluation", "orthoft.export", "orthoft.diffusion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthoft", description="Orthogonal fine-tuning: train, evaluate, export.")
    version = importlib.import_module("orthoft").__version__
    parser.add_argument("--version", action="version", version=f"orthoft {version}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # command not built yet
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
