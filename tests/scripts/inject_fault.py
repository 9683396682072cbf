"""Run the orthoft CLI with one disk fault injected: a full disk, a read-only disk, no permission, or a kill.

Usage: python tests/scripts/inject_fault.py FAULT MATCH COUNT -- train RECIPE.yaml [options]

FAULT is one of
  enospc   opening the COUNT-th file whose path contains MATCH for writing raises OSError(ENOSPC)
  erofs    creating a folder or opening a file for writing under a path containing MATCH raises
           OSError(EROFS), from the COUNT-th such call on
  eacces   the same with PermissionError(EACCES)
  kill     the process SIGKILLs itself when it opens the COUNT-th file matching MATCH for writing
           (nothing is cleaned up, as after a power cut or an out-of-memory kill)

Only Python-level calls are intercepted (``open``, ``io.open``, ``os.open``, ``os.mkdir``): JSON and
YAML files (``adapter_config.json``, ``trainer_state.json``, ``recipe.yaml``) and folders, not the
files that safetensors and ``torch.save`` write from C++ code. The wrapper knows nothing of
orthoft's modules, so it runs against any version of the package (tests/test_faults_train.py and the
before/after measurement in tests/scripts/measure_train_faults.py).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install(fault: str, match: str, count: int) -> None:
    """Patch the write entry points so that the ``count``-th write matching ``match`` fails as ``fault``."""
    seen = {"n": 0}
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def hit(path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)) or match not in os.fsdecode(path):
            return False
        seen["n"] += 1
        if fault in ("erofs", "eacces"):
            return seen["n"] >= count  # a read-only disk stays read-only
        return seen["n"] == count

    def fail(path: object) -> None:
        if fault == "kill":
            print(f"inject_fault.py: SIGKILL while opening {path}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}[fault]
        raise (PermissionError if fault == "eacces" else OSError)(code, os.strerror(code), os.fsdecode(path))

    def open_(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202 (builtins.open's signature)
        if any(c in mode for c in "wax+") and not isinstance(file, int) and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202
        if flags & WRITE_FLAGS and hit(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):  # noqa: ANN001, ANN202
        if fault in ("erofs", "eacces") and hit(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open = os_open
    os.mkdir = mkdir


if __name__ == "__main__":
    split = sys.argv.index("--")
    fault_name, match_text, count_text = sys.argv[1:split]
    install(fault_name, match_text, int(count_text))
    from orthoft.cli import main

    sys.exit(main(sys.argv[split + 1 :]))
