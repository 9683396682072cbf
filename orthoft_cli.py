"""The ``orthoft`` console script: ``--help`` and ``--version`` without importing orthoft.

``import orthoft`` registers every method with PEFT, which loads torch, transformers and PEFT
(seconds). The command table (``orthoft/cli/commands.py``) and the version (``orthoft/version.py``)
import nothing from orthoft, so this launcher runs those two files by path from the installed
package's folder (``importlib.util.find_spec`` locates it without running the package) and answers
``--help``, ``--version`` and usage errors with the same top-level parser. Every real command goes
to ``orthoft.cli.main``, the one implementation; ``python -m orthoft.cli`` is the same program.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path


def package_file(*parts: str) -> Path:
    """A file of the importable ``orthoft`` package, found without importing it."""
    spec = importlib.util.find_spec("orthoft")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("orthoft: the orthoft package is not importable by this Python; reinstall it (pip install).")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def main(argv: list[str] | None = None) -> int:
    """Run ``orthoft ARGV``: a command goes to ``orthoft.cli.main``; anything else is answered here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    table = runpy.run_path(str(package_file("cli", "commands.py")))
    if table["command_in"](argv) is None:
        version = runpy.run_path(str(package_file("version.py")))["__version__"]
        parser, _ = table["base_parser"](version)
        parser.parse_args(argv)  # --help / --version print and exit 0; no command is a usage error (exit 2)
        return 2
    from orthoft.cli import main as run_command

    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
