"""The one staged writer: a folder or file appears complete at its final path, or not at all.

Everything is first written to a hidden sibling (``.NAME.partial-PID-XXXX``), files and folders
are fsynced, then one rename publishes it. An existing target is renamed aside first and deleted
only after the new one is in place, so a crash at any point leaves either the old or the new
version (plus, at most, a hidden partial folder that the next write to the same place removes
once its process is gone). Folders get the permissions the umask allows, like ``mkdir``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush one file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder bottom-up, then ``root`` itself."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync_path(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(path, directory=True)
    fsync_path(root, directory=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(target: Path, kind: str = "partial") -> Path:
    """A new empty hidden folder beside ``target`` (``.NAME.<kind>-PID-XXXX``), with umask permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a published folder should look like mkdir's
    return staging


def publish_directory(staging: Path, target: Path, overwrite: bool = False) -> None:
    """Rename the complete ``staging`` folder to ``target``; an old ``target`` is swapped out first.

    Without ``overwrite`` an existing ``target`` raises FileExistsError and nothing changes.
    """
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists. Fix: choose another path or allow overwriting.")
        old = make_staging_dir(target, "old")
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)  # put the old version back: nothing was published
        raise
    fsync_path(target.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def remove_stale_partials(target: Path) -> None:
    """Delete hidden staging folders of earlier writes to ``target`` whose process is gone.

    A stale ``.old`` folder is the previous version of ``target`` that a crash left aside; it is
    only removed when ``target`` itself exists, so the clean-up never deletes the only copy.
    """
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(partial|old)-(\d+)-")
    for candidate in target.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or not candidate.is_dir() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def restore_swapped_out(target: Path) -> Path | None:
    """Put back the previous ``target`` that a crash between the two renames of ``publish_directory`` left aside.

    Such a crash leaves no ``target``, only ``.NAME.old-PID-XXXX`` of a dead process: the only copy.
    When ``target`` is missing, the newest such folder is renamed back to ``target``; returns the
    folder it came from (None when there was nothing to restore).
    """
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.old-(\d+)-")
    stale = []
    for candidate in target.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and candidate.is_dir() and not _pid_alive(int(match.group(1))):
            stale.append(candidate)
    if not stale:
        return None
    newest = max(stale, key=lambda p: p.stat().st_mtime)
    os.rename(newest, target)
    fsync_path(target.parent, directory=True)
    return newest


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, overwrite: bool = True, sync: bool = True) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``target``; on success it is fsynced and replaces ``target``.

    On any error (or a kill) the staging folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    remove_stale_partials(target)
    staging = make_staging_dir(target)
    try:
        yield staging
        if sync:
            sync_tree(staging)
        publish_directory(staging, target, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` through a fsynced temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent, directory=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


__all__ = [
    "fsync_path",
    "make_staging_dir",
    "publish_directory",
    "remove_stale_partials",
    "restore_swapped_out",
    "staged_directory",
    "sync_tree",
    "write_bytes_atomic",
    "write_text_atomic",
]
