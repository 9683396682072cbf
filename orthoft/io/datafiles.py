"""Local data files as rows: JSON Lines, JSON, CSV/TSV (plain text stays text; ``training.data`` cuts it).

What each suffix holds:

* ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines skipped).
* ``.json``: a list of objects, or an object mapping split names to lists of objects
  (``{"train": [...], "validation": [...]}``).
* ``.csv`` / ``.tsv``: a header row, then one row per example (values are strings; numeric labels
  such as ``"1"`` are converted where they are used).

A file without a split structure is one split, ``train``. The standard library reads them, so
local data needs neither the ``datasets`` package nor its cache.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .schema import RecipeError

ROW_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
# read as plain text by a file source: one stream of tokens cut into blocks
TEXT_SUFFIXES = (".txt", ".text", ".md")
DATA_FILE_SUFFIXES = ROW_SUFFIXES + TEXT_SUFFIXES


def read_rows(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Split name -> rows of a ``.jsonl``/``.json``/``.csv``/``.tsv`` file; RecipeError naming the file and line."""
    suffix = path.suffix.lower()
    if suffix not in ROW_SUFFIXES:
        raise RecipeError(f"data.path: {path} is not a row file; row files end in {list(ROW_SUFFIXES)}.")
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        return {"train": _checked(list(reader), path, "row")}
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"data.path: {path} is not valid JSON: {err}.") from err
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            return {str(split): _checked(rows, path, f"{split!r} item") for split, rows in data.items()}
        if isinstance(data, list):
            return {"train": _checked(data, path, "item")}
        raise RecipeError(
            f"data.path: {path} holds a {type(data).__name__}; a JSON data file is a list of objects or an object "
            'mapping split names to lists of objects ({"train": [...], "validation": [...]}).'
        )
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecipeError(f"data.path: {path} line {number} is not valid JSON: {err}.") from err
        rows.append(_checked([row], path, f"line {number}:")[0])
    return {"train": rows}


def _checked(rows: list[Any], path: Path, unit: str) -> list[dict[str, Any]]:
    """``rows`` if every one is a mapping of field names; RecipeError naming the first that is not."""
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            where = unit if unit.endswith(":") else f"{unit} {number}:"
            raise RecipeError(f"data.path: {path} {where} {str(row)[:80]!r} is not an object of named fields.")
    return rows


__all__ = ["DATA_FILE_SUFFIXES", "ROW_SUFFIXES", "TEXT_SUFFIXES", "read_rows"]
