"""The run folder (``train.output_dir``): where a run may write, and how it never loses what was there.

* :func:`check_output_paths` refuses, before anything is written, a ``train.output_dir`` that is
  the working directory, one of its parents or a folder holding an input (model, tokenizer, data,
  recipe), and an ``export.output_dir`` that would replace any of those, the run folder, a parent of
  it, or one of the run's own files (``final/``, ``checkpoints/``): an export replaces its folder
  as a whole.
* :class:`RunFolder` claims the folder for one run. ``--overwrite`` moves an earlier run's files
  into a hidden folder inside it (``.previous-run-PID-XXXX``) instead of deleting them; they are
  deleted only once the new run has something to show (its first checkpoint, or ``final/``), and
  moved back when it fails before that. A run that fails before then also removes what it wrote
  itself, and the folder if it created it, so the rerun is not refused. A kill in that window
  leaves the old run aside; the next run in the folder restores it (nothing newer was committed)
  or deletes it (the new run had committed).
* :func:`explain_os_error`: a full, read-only or forbidden disk as one message with the path and the fix.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from ..io.files import make_staging_dir
from .checkpoint import CHECKPOINTS, RUN_FILES, complete_checkpoints
from .recipe import Recipe, RecipeError

logger = logging.getLogger("orthoft.train")

ASIDE_KIND = "previous-run"
ASIDE_PATTERN = re.compile(rf"^\.run\.{ASIDE_KIND}-(\d+)-")
# errno -> what it means for a run and how to fix it
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full. Fix: free space there or set train.output_dir on another disk",
    errno.EDQUOT: "the disk quota is exceeded. Fix: free space there or set train.output_dir on another disk",
    errno.EROFS: "the file system is read-only. Fix: set train.output_dir to a writable folder",
    errno.EACCES: "permission denied. Fix: make the folder writable or set train.output_dir elsewhere",
    errno.EPERM: "operation not permitted. Fix: make the folder writable or set train.output_dir elsewhere",
}


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def input_paths(recipe: Recipe) -> list[tuple[str, Path]]:
    """(recipe key, resolved path) of every local file or folder the run reads."""
    from .. import defaults

    found: list[tuple[str, Path]] = []
    model = recipe.model
    named = [("model.name_or_path", model.name_or_path if model.from_config is None else None)]
    named.append(("model.tokenizer", model.tokenizer or model.name_or_path))
    for key, name in named:
        if not name:
            continue
        if name.lower() == "smollm2":  # converted on first use under the cache: that folder is an input
            found.append((key, _resolved(defaults.cache_dir())))
        elif name.lower() != "minilm" and Path(name).expanduser().exists():  # minilm lives in its package
            found.append((key, _resolved(name)))
    if recipe.data.path and Path(recipe.data.path).expanduser().exists():
        found.append(("data.path", _resolved(recipe.data.path)))
    if recipe.source_path and Path(recipe.source_path).is_file():
        found.append(("the recipe file", _resolved(recipe.source_path)))
    return found


def check_output_paths(recipe: Recipe, replace: bool = False) -> None:
    """RecipeError when ``train.output_dir`` or ``export.output_dir`` could replace a user's files.

    ``replace`` (``--overwrite`` or ``--resume``): an existing export folder may be replaced at the end.
    """
    cwd = Path.cwd().resolve()
    run_dir = _resolved(recipe.output_dir())
    inputs = input_paths(recipe)
    where = f"{recipe.source_path}: train.output_dir {recipe.output_dir()}"
    if cwd.is_relative_to(run_dir):
        what = "the working directory" if cwd == run_dir else f"a parent of the working directory {cwd}"
        raise RecipeError(f"{where} is {what}; a run needs a folder of its own. Fix: set train.output_dir: runs/NAME.")
    for key, path in inputs:
        # the run's own saved recipe.yaml may be the recipe given back to --resume
        if path.is_relative_to(run_dir) and path != run_dir / "recipe.yaml":
            raise RecipeError(
                f"{where} {'is' if path == run_dir else 'holds'} {key} ({path}); the run would write beside (and "
                "--overwrite replace files in) an input. Fix: set train.output_dir to a folder of its own (runs/NAME)."
            )
    export = recipe.export
    if export.enabled and export.output_dir:
        check_export_dir(recipe, _resolved(export.output_dir), run_dir, cwd, inputs, replace)


def check_export_dir(
    recipe: Recipe, export_dir: Path, run_dir: Path, cwd: Path, inputs: list, replace: bool = False
) -> None:
    """RecipeError when the export (which replaces ``export_dir`` as a whole) would delete a user's files."""
    where = f"{recipe.source_path}: export.output_dir {recipe.export.output_dir}"
    fix = "Fix: set export.output_dir to a new folder of its own (or leave it unset for <train.output_dir>/merged)."
    if cwd.is_relative_to(export_dir):
        what = "the working directory" if cwd == export_dir else f"a parent of the working directory {cwd}"
        raise RecipeError(f"{where} is {what}; the export would replace it. {fix}")
    if run_dir.is_relative_to(export_dir):
        what = "the run folder" if run_dir == export_dir else f"a parent of the run folder {run_dir}"
        raise RecipeError(f"{where} is {what} (train.output_dir); the export would replace the run. {fix}")
    if export_dir.is_relative_to(run_dir):
        first = export_dir.relative_to(run_dir).parts[0]
        if (first in RUN_FILES and first != "merged") or first.startswith("."):
            raise RecipeError(f"{where} is inside the run's own {first}; the export would replace it. {fix}")
    for key, path in inputs:
        if path.is_relative_to(export_dir):
            what = "is" if path == export_dir else "holds"
            raise RecipeError(f"{where} {what} {key} ({path}); the export would replace it. {fix}")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not (export_dir / "config.json").is_file():
        raise RecipeError(
            f"{where} exists and is not a model export (no config.json); the export would replace its files. {fix}"
        )
    if export_dir.is_dir() and any(export_dir.iterdir()) and not replace:
        raise RecipeError(
            f"{where} already holds an exported model. Fix: pass --overwrite to replace it when this run ends, or "
            "set export.output_dir to a new folder."
        )


class DiskError(OSError):
    """A full, read-only or forbidden disk; ``errno`` and ``filename`` as raised, the message names the fix."""

    def __init__(self, err: OSError, message: str) -> None:
        super().__init__(err.errno, err.strerror, err.filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def explain_os_error(err: OSError, output_dir: Path) -> OSError | None:
    """The error as a :class:`DiskError` naming the path and the fix, for a full/read-only/forbidden disk; else None."""
    if err.errno not in DISK_ERRORS or isinstance(err, DiskError):
        return None
    path = Path(err.filename) if err.filename else output_dir
    staged = re.match(r"^\.(.+)\.partial-\d+-", path.name)  # a staged write: name the file it was for
    if staged:
        path = path.with_name(staged.group(1))
    return DiskError(err, f"cannot write {path}: {DISK_ERRORS[err.errno]}.")


class RunFolder:
    """``train.output_dir`` claimed by one run (the main process does the file work, the others only read)."""

    def __init__(self, output_dir: Path, is_main: bool) -> None:
        self.path, self.is_main = output_dir, is_main
        self.aside: Path | None = None  # the earlier run's files while this run has not committed
        self.created: list[Path] = []  # folders this run created, innermost first
        self.resuming = False
        self.claimed = False  # set once the folder is this run's: only then may roll_back remove anything
        self.committed = False

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Refuse or set aside an earlier run; create the folder. RecipeError/FileExistsError on refusal."""
        self.resuming = resume
        if self.is_main:
            self.settle_interrupted()
        if resume:
            return  # the checkpoint is found (and verified) by the caller
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{self.path} already holds a run ({', '.join(existing)}). Pass --resume to continue it, "
                "--overwrite to start over, or set train.output_dir elsewhere."
            )
        if not self.is_main:
            return
        if existing:
            self.set_aside(existing)
        missing = self.path
        while not missing.exists():
            self.created.append(missing)
            missing = missing.parent
        self.path.mkdir(parents=True, exist_ok=True)
        self.claimed = True

    def set_aside(self, names: list[str]) -> None:
        """Move an earlier run's ``names`` into a hidden folder; all of them, or (on an error) none."""
        aside = make_staging_dir(self.path / "run", ASIDE_KIND)
        moved: list[str] = []
        try:
            for name in names:
                os.rename(self.path / name, aside / name)
                moved.append(name)
        except BaseException:
            for name in moved:
                os.rename(aside / name, self.path / name)
            os.rmdir(aside)
            raise
        self.aside = aside
        logger.info("--overwrite: the earlier run is kept in %s until this one has a checkpoint", aside)

    def commit(self) -> None:
        """The new run has a checkpoint or final/: the earlier run's files go."""
        if self.committed:
            return
        self.committed = True
        if self.is_main and self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def roll_back(self) -> None:
        """After a failure before :meth:`commit`: remove this run's files, restore the earlier run's."""
        if self.committed or self.resuming or not self.claimed:
            return
        self.committed = True  # once
        if self.path.is_dir():
            for name in RUN_FILES:
                _remove(self.path / name)
        if self.aside is not None:
            for entry in self.aside.iterdir():
                os.rename(entry, self.path / entry.name)
            os.rmdir(self.aside)
            self.aside = None
            logger.warning("this run failed before its first checkpoint: the earlier run in %s is back", self.path)
        for folder in self.created:  # innermost first; only while empty: nothing of anyone else's goes
            try:
                folder.rmdir()
            except OSError:
                break

    def settle_interrupted(self) -> None:
        """Restore (or, if the newer run committed, delete) earlier runs set aside by a killed ``--overwrite``."""
        if not self.path.is_dir():
            return
        for aside in sorted(self.path.iterdir()):
            match = ASIDE_PATTERN.match(aside.name)
            if not match or not aside.is_dir() or _pid_alive(int(match.group(1))):
                continue
            if complete_checkpoints(self.path / CHECKPOINTS) or (self.path / "final").is_dir():
                logger.warning("removing %s: the run that replaced it had already saved a checkpoint", aside)
                shutil.rmtree(aside, ignore_errors=True)
                continue
            for name in RUN_FILES:  # what the killed run wrote before its first checkpoint
                _remove(self.path / name)
            for entry in aside.iterdir():
                os.rename(entry, self.path / entry.name)
            os.rmdir(aside)
            logger.warning(
                "restored the run in %s: an --overwrite run was killed before its first checkpoint", self.path
            )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


__all__ = [
    "DISK_ERRORS",
    "DiskError",
    "RunFolder",
    "check_export_dir",
    "check_output_paths",
    "explain_os_error",
    "input_paths",
]
