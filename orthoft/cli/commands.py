"""The ``orthoft`` command table and top-level parser: standard library only, no orthoft imports.

The console script (``orthoft_cli.py``, outside the package) runs this file by path to answer
``orthoft --help`` and ``--version`` without importing the package, whose ``__init__`` registers
the methods with PEFT and so loads torch, transformers and PEFT (seconds). Keep it that way: no
import here beyond the standard library. A new command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse

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
    "merge": ("orthoft.cli.merge", "combine saved adapters of one method into one adapter (or a merged model)"),
    "recipes": ("orthoft.cli.recipes", "list the recipes shipped with orthoft, or print one to copy and edit"),
}
DESCRIPTION = "Orthogonal fine-tuning: train, evaluate, export."


def base_parser(version: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one (still empty) sub-parser per command."""
    parser = argparse.ArgumentParser(prog="orthoft", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"orthoft {version}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        name: subparsers.add_parser(name, help=help_text, description=help_text)
        for name, (_, help_text) in COMMANDS.items()
    }
    return parser, commands


def command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is one), or None (``--help``, ``--version``, a typo)."""
    return next((arg for arg in argv if arg in COMMANDS), None)


__all__ = ["COMMANDS", "DESCRIPTION", "base_parser", "command_in"]
