"""Where an export may write: never over the working directory, its inputs, or a folder it did not write.

``--overwrite`` replaces OUT as a whole (the old folder is deleted once the new one is in place),
so OUT is refused, with or without ``--overwrite``, when it is the working directory or one of its
parents, when it is or holds an input of the export (the base model folder, an adapter folder, the
run folder an adapter came from), or lies inside a run's ``checkpoints/``. With ``--overwrite`` an
existing OUT is only replaced when an earlier export wrote it (it holds ``orthoft_export.json``)
or it is empty. A crash between the two renames of the swap leaves OUT missing and the old export
aside as ``.OUT.old-PID-*``; it is put back first (:func:`orthoft.io.files.restore_swapped_out`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..io.files import restore_swapped_out
from .report import EXPORT_INFO_FILE

RUN_MARKERS = ("recipe.yaml", "checkpoints")  # what `orthoft train` writes into a run folder
RUN_CONTENTS = " (its adapter, checkpoints and metrics)"


def run_folder_of(adapter: Path) -> Path | None:
    """The run folder an adapter was saved in (``RUN/final/adapter``, ``RUN/checkpoints/step-N/adapter``)."""
    for parent in list(adapter.parents)[:3]:
        if any((parent / marker).exists() for marker in RUN_MARKERS):
            return parent
    return None


def protected_inputs(base: str | None, adapters: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(what, folder) for every local folder an export reads: base, adapters and the runs they came from."""
    found: list[tuple[str, Path]] = []
    if base and Path(base).is_dir():
        found.append(("the base model folder", Path(base)))
    for adapter in adapters:
        adapter = Path(adapter)
        run = run_folder_of(adapter.resolve())
        if run is not None:  # before the adapter: "holds the run folder" says more than "holds the adapter"
            found.append(("the run folder", run))
        found.append(("the adapter folder", adapter))
    return found


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse(label: str, out: Path, reason: str) -> ValueError:
    """``label`` is the flag (``--out``), optionally after the caller (``export_merged: out_dir``)."""
    suggestion = Path.cwd() / "merged" if not _is_within(Path.cwd() / "merged", out) else out.parent / "merged-export"
    return ValueError(
        f"{label} {out} {reason}, and an export replaces OUT as a whole, so it would delete it (with --overwrite or "
        f"without, nothing was written). Fix: pass a new folder, e.g. {label.rpartition(': ')[2]} {suggestion}."
    )


def check_destination(
    out_dir: str | os.PathLike,
    inputs: Sequence[tuple[str, Path]] = (),
    overwrite: bool = False,
    label: str = "out_dir",
) -> Path | None:
    """Refuse an OUT that would destroy what the export did not write; returns the folder it restored OUT from.

    ``inputs``: (what, folder) pairs as from :func:`protected_inputs`. Raises ValueError (or
    FileExistsError for an existing OUT without ``overwrite``) naming OUT, what it would destroy and the fix.
    """
    target = Path(out_dir).absolute()
    out = Path(os.path.normpath(target))  # what messages show: as typed, without ".." parts
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd:
        raise _refuse(label, out, "is the working directory")
    if real in cwd.parents:
        raise _refuse(label, out, f"is a parent of the working directory {cwd}")
    resolved = [(what, folder.resolve()) for what, folder in inputs]
    for what, folder in resolved:  # the exact input first: "is the run folder" says more than "holds the adapter"
        if folder == real:
            raise _refuse(label, out, f"is {what}{RUN_CONTENTS if what == 'the run folder' else ''}")
    for what, folder in resolved:
        if real in folder.parents:
            raise _refuse(label, out, f"holds {what} {folder}")
        if what == "the run folder" and _is_within(real, folder / "checkpoints"):
            raise _refuse(label, out, f"is or lies inside the checkpoints folder of the run {folder}")
    restored = restore_swapped_out(target)
    if target.exists() or target.is_symlink():
        note = f" (restored from {restored.name}, where an interrupted export had left it)" if restored else ""
        _check_replaceable(target, out, overwrite, label, note)
    return restored


def _check_replaceable(target: Path, out: Path, overwrite: bool, label: str, note: str) -> None:
    if not target.is_dir():
        raise FileExistsError(f"{label} {out} is a file, not a folder. Fix: pass a folder path that does not exist.")
    if not overwrite:
        raise FileExistsError(
            f"{label} {out} already exists{note}. Fix: choose a new folder, or pass --overwrite (overwrite=True) to "
            "replace an earlier export."
        )
    if (target / EXPORT_INFO_FILE).is_file() or not any(target.iterdir()):
        return
    raise ValueError(
        f"{label} {out} is not an orthoft export (it has no {EXPORT_INFO_FILE}); overwrite only replaces a folder "
        "an earlier export wrote. Fix: pass a new folder, or move that one away yourself."
    )


__all__ = ["RUN_MARKERS", "check_destination", "protected_inputs", "run_folder_of"]
