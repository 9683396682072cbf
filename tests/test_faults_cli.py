"""Every error a user can cause in ``orthoft export``, ``orthoft eval`` and ``orthoft diffusion``.

Each case runs ``orthoft.cli.main`` in-process in a fresh copy of tiny fixtures (a tiny Llama
saved from config, a wider one, an OFT adapter trained on the first, a 2-step run) and must end in
exactly one ``orthoft CMD: ...`` line on stderr naming the file or key, exit status 2, no
traceback, and every input as it was. Full and read-only disks are injected by monkeypatching
``os.fsync``/``os.mkdir`` for paths under one folder. SIGKILLs during ``orthoft export
--overwrite`` (while writing, and between the two renames of the swap) run in a subprocess: OUT
is then the old complete export, or is restored from where the swap left it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from orthoft.cli import main
from tests.test_quantized import save_tiny_llama, tiny_llama_config
from tests.tiny_recipes import CAUSAL, REPO, subprocess_env, write_recipe

# ---- fixtures ---------------------------------------------------------------------------------


def _save_adapter(base: Path, folder: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import orthoft

    torch.manual_seed(0)
    config = orthoft.OFTConfig(target_modules=["q_proj", "v_proj"], block_size=16, base_model_name_or_path=str(base))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """base/, base_wide/ (hidden 128), adapter/ (OFT on base), run/ (2 steps of `orthoft train`), digits.yaml."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("faults-cli")
    save_tiny_llama(root / "base")
    wide = tiny_llama_config()
    wide.hidden_size, wide.intermediate_size = 128, 256
    torch.manual_seed(0)
    LlamaForCausalLM(wide).save_pretrained(root / "base_wide")
    _save_adapter(root / "base", root / "adapter")
    recipe = write_recipe(
        CAUSAL,
        root / "causal.yaml",
        train={"output_dir": "run", "max_steps": 2, "save_every": 1, "eval_every": 0, "gradient_accumulation_steps": 1},
        data={"max_train_examples": 16, "max_eval_examples": 8},
    )
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert main(["train", str(recipe)]) == 0
    finally:
        os.chdir(cwd)
    digits = {"adapter": {"method": "oft", "target_groups": ["attention"], "block_size": 8}, "output_dir": "digits"}
    (root / "digits.yaml").write_text(yaml.safe_dump(digits))
    return root


@pytest.fixture
def work(fixtures, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the fixtures, the working directory of the command."""
    folder = tmp_path / "w"
    shutil.copytree(fixtures, folder)
    monkeypatch.chdir(folder)
    return folder


def tree(path: Path) -> dict[str, str] | None:
    """{relative file: sha256} of a folder or file (None when missing): bitwise "as it was"."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---- case setups ------------------------------------------------------------------------------


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def poison(folder: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[sorted(tensors)[0]].view(-1)[0] = value
    save_file(tensors, weights)


def truncate(weights: Path, keep: float) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])


def make_run2(w: Path) -> None:
    """run2/: a run folder whose final adapter was trained on base/."""
    shutil.copytree(w / "run", w / "run2")
    shutil.rmtree(w / "run2" / "final" / "adapter")
    shutil.copytree(w / "adapter", w / "run2" / "final" / "adapter")


def widen_recipe(w: Path) -> None:
    recipe = yaml.safe_load((w / "run" / "recipe.yaml").read_text())
    recipe["model"]["from_config"].update(hidden_size=128, intermediate_size=256)
    (w / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def diffusion_recipe(w: Path, **changes) -> None:
    recipe = yaml.safe_load((w / "digits.yaml").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    (w / "digits.yaml").write_text(yaml.safe_dump(recipe))


def export(*extra: str, base: str | None = "base", adapter: str = "adapter", out: str = "out") -> list[str]:
    argv = ["export", *(["--base", base] if base else []), "--adapter", adapter, "--out", out]
    return [*argv, "--dtype", "fp32", *extra]


# ---- injected disk faults ---------------------------------------------------------------------


def inject(monkeypatch, call: str, code: int, under: Path) -> None:
    """``os.fsync`` (of a file) or ``os.mkdir`` fail with ``code`` for paths under ``under`` (a prefix)."""
    prefix = str(under)

    def hit(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(prefix)

    if call == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if hit(path) and os.path.isfile(path):
                raise OSError(code, os.strerror(code), path)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if hit(path):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)


# ---- the table ----------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str  # a fragment of the one-line message
    setup: Callable[[Path], None] | None = None
    keep: tuple[str, ...] = ()  # paths that must be bitwise as they were
    fault: tuple[str, int, str] | None = None  # (call, errno, path prefix relative to the working directory)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."


RUN2 = "run2/final/adapter"
EXPORT_CASES = [
    Case("out-is-cwd", export("--overwrite", out="."), "is the working directory", keep=("adapter", "base")),
    Case("out-is-cwd-no-overwrite", export(out="."), "is the working directory", keep=("adapter", "base")),
    Case(
        "out-is-parent-of-cwd",
        export("--overwrite", base="../base", adapter="../adapter", out=".."),
        "is a parent of the working directory",
        setup=lambda w: (w / "sub").mkdir(),
        keep=("adapter", "base"),
        cwd="sub",
    ),
    Case("out-is-adapter", export("--overwrite", out="adapter"), "is the adapter folder", keep=("adapter",)),
    Case("out-is-base", export("--overwrite", out="base"), "is the base model folder", keep=("base",)),
    Case("out-is-run", export("--overwrite", adapter=RUN2, out="run2"), "is the run folder", make_run2, ("run2",)),
    Case(
        "out-is-run-checkpoints",
        export("--overwrite", adapter=RUN2, out="run2/checkpoints"),
        "checkpoints folder of the run",
        make_run2,
        ("run2",),
    ),
    Case(
        "out-is-a-user-folder",
        export("--overwrite", out="notes"),
        "is not an orthoft export",
        lambda w: (w / "notes").mkdir() or (w / "notes" / "todo.txt").write_text("mine"),
        ("notes",),
    ),
    Case(
        "out-is-a-file",
        export("--overwrite", out="todo.txt"),
        "is a file",
        lambda w: (w / "todo.txt").write_text("mine"),
        ("todo.txt",),
    ),
    Case(
        "out-exists",
        export(out="prev"),
        "already exists",
        lambda w: (w / "prev").mkdir() or (w / "prev" / "orthoft_export.json").write_text("{}"),
        ("prev",),
    ),
    Case("adapter-without-config", export(adapter="base"), "holds no adapter_config.json"),
    Case("adapter-folder-missing", export(adapter="nowhere"), "adapter folder nowhere does not exist"),
    Case(
        "adapter-in-named-subfolder",
        export(adapter="named"),
        "subfolders ['first']",
        lambda w: (w / "named").mkdir() or shutil.copytree(w / "adapter", w / "named" / "first"),
    ),
    Case(
        "adapter-config-corrupt-json",
        export(),
        "adapter_config.json is corrupt (not valid JSON",
        lambda w: (w / "adapter" / "adapter_config.json").write_text("{oops"),
    ),
    Case(
        "adapter-config-without-peft-type",
        export(),
        "records no peft_type",
        lambda w: (w / "adapter" / "adapter_config.json").write_text("{}"),
    ),
    Case(
        "adapter-config-unknown-peft-type",
        export(),
        "peft_type 'ORTHOFT_X' is neither",
        lambda w: edit_json(w / "adapter" / "adapter_config.json", peft_type="ORTHOFT_X"),
    ),
    Case(
        "safetensors-truncated",
        export(),
        "adapter_model.safetensors is corrupt or truncated",
        lambda w: truncate(w / "adapter" / "adapter_model.safetensors", 0.5),
    ),
    Case(
        "safetensors-empty",
        export(),
        "adapter_model.safetensors is empty",
        lambda w: truncate(w / "adapter" / "adapter_model.safetensors", 0),
    ),
    Case(
        "safetensors-missing",
        export(),
        "no weights (adapter_model.safetensors)",
        lambda w: (w / "adapter" / "adapter_model.safetensors").unlink(),
    ),
    Case("wrong-base-shape-mismatch", export(base="base_wide"), "does not fit the base model base_wide"),
    Case("base-folder-missing", export(base="nowhere"), "cannot load the base model 'nowhere'"),
    Case(
        "base-hub-id-offline",
        export(base=None),
        "cannot load the base model 'some-org/some-model'",
        lambda w: edit_json(w / "adapter" / "adapter_config.json", base_model_name_or_path="some-org/some-model"),
    ),
    Case(
        "base-weights-truncated",
        export(),
        "cannot load the weights of the base model 'base'",
        lambda w: truncate(w / "base" / "model.safetensors", 0.5),
    ),
    Case("nan-adapter", export(), "NaN/inf", lambda w: poison(w / "adapter", float("nan"))),
    Case("bad-max-shard-size", export("--max-shard-size", "lots"), "--max-shard-size 'lots' is not a size"),
    Case("disk-full", export(), "No space left on device", fault=("fsync", errno.ENOSPC, ".out"), keep=("out",)),
    Case("read-only-disk", export(), "Read-only file system", fault=("mkdir", errno.EROFS, ".out"), keep=("out",)),
    Case("no-permission", export(), "Permission denied", fault=("mkdir", errno.EACCES, ".out"), keep=("out",)),
]
FINAL = "run/final/adapter"
EVAL_CASES = [
    Case("run-folder-missing", ["eval", "nowhere"], "nowhere does not exist"),
    Case(
        "run-without-final-adapter",
        ["eval", "run"],
        "adapter folder run/final/adapter does not exist",
        lambda w: shutil.rmtree(w / "run" / "final"),
    ),
    Case("unknown-adapter-folder", ["eval", "run", "--adapter", "nowhere"], "adapter folder nowhere does not exist"),
    Case(
        "recipe-corrupt-yaml",
        ["eval", "run"],
        "not valid YAML",
        lambda w: (w / "run" / "recipe.yaml").write_text("model: [oops"),
    ),
    Case("bad-override-key", ["eval", "run", "--override", "train.nope=1"], "'nope'"),
    Case(
        "adapter-config-corrupt-json",
        ["eval", "run"],
        "adapter_config.json is corrupt",
        lambda w: (w / FINAL / "adapter_config.json").write_text(""),
    ),
    Case(
        "adapter-config-unknown-peft-type",
        ["eval", "run"],
        "peft_type 'ORTHOFT_X'",
        lambda w: edit_json(w / FINAL / "adapter_config.json", peft_type="ORTHOFT_X"),
    ),
    Case(
        "safetensors-truncated",
        ["eval", "run"],
        "is corrupt or truncated",
        lambda w: truncate(w / FINAL / "adapter_model.safetensors", 0.5),
    ),
    Case(
        "safetensors-empty",
        ["eval", "run"],
        "is empty",
        lambda w: truncate(w / FINAL / "adapter_model.safetensors", 0),
    ),
    Case(
        "safetensors-missing",
        ["eval", "run"],
        "no weights",
        lambda w: (w / FINAL / "adapter_model.safetensors").unlink(),
    ),
    Case("wrong-base-shape-mismatch", ["eval", "run"], "does not fit the base model", widen_recipe),
    Case("nan-adapter", ["eval", "run"], "is non-finite", lambda w: poison(w / FINAL, float("nan")), ("run",)),
    Case("inf-adapter", ["eval", "run"], "is non-finite", lambda w: poison(w / FINAL, float("inf")), ("run",)),
    Case(
        "metric-files-missing", ["eval", "run"], "perplexity.py not found", env={"ORTHOFT_METRICS_DIR": "/nonexistent"}
    ),
    Case("output-is-a-folder", ["eval", "run", "--output", "run"], "--output run is a folder", keep=("run",)),
    Case(
        "disk-full-writing-results",
        ["eval", "run", "--no-metrics", "--output", "res/eval.json"],
        "No space left on device",
        lambda w: (w / "res").mkdir() or (w / "res" / "eval.json").write_text('{"earlier": 1}'),
        keep=("res",),
        fault=("fsync", errno.ENOSPC, "res"),
    ),
    Case(
        "read-only-results-folder",
        ["eval", "run", "--output", "res/eval.json"],
        "Read-only file system",
        fault=("mkdir", errno.EROFS, "res"),
    ),
]
DIFFUSION_CASES = [
    Case("recipe-missing", ["diffusion", "train", "nowhere.yaml"], "nowhere.yaml does not exist"),
    Case(
        "recipe-corrupt-yaml",
        ["diffusion", "train", "digits.yaml"],
        "not valid YAML",
        lambda w: (w / "digits.yaml").write_text("a: [b"),
    ),
    Case(
        "recipe-unknown-key",
        ["diffusion", "train", "digits.yaml"],
        "unknown key 'nope'",
        lambda w: diffusion_recipe(w, nope=1),
    ),
    Case(
        "recipe-unknown-method",
        ["diffusion", "train", "digits.yaml"],
        "'nope'",
        lambda w: diffusion_recipe(w, adapter={"method": "nope"}),
    ),
    Case(
        "recipe-bad-value",
        ["diffusion", "train", "digits.yaml"],
        "steps",
        lambda w: diffusion_recipe(w, train={"steps": "many"}),
    ),
    Case("concepts-without-section", ["diffusion", "concepts", "digits.yaml"], "no 'concepts' section"),
    Case(
        "base-folder-missing",
        ["diffusion", "train", "digits.yaml", "--base", "nowhere"],
        "base pipeline folder nowhere does not exist",
    ),
    Case(
        "base-not-a-pipeline",
        ["diffusion", "train", "digits.yaml", "--base", "base"],
        "has no model_index.json",
        keep=("base",),
    ),
    Case(
        "output-dir-is-a-file",
        ["diffusion", "train", "digits.yaml", "--output-dir", "todo.txt"],
        "output_dir todo.txt is a file",
        lambda w: (w / "todo.txt").write_text("mine"),
        ("todo.txt",),
    ),
    Case(
        "read-only-output-dir",
        ["diffusion", "train", "digits.yaml"],
        "Read-only file system",
        fault=("mkdir", errno.EROFS, "digits"),
    ),
]
CASES = [
    *(pytest.param(case, id=f"export/{case.id}") for case in EXPORT_CASES),
    *(pytest.param(case, id=f"eval/{case.id}") for case in EVAL_CASES),
    *(pytest.param(case, id=f"diffusion/{case.id}") for case in DIFFUSION_CASES),
]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_with_exit_status_2(case, work, capsys, monkeypatch):
    if case.setup:
        case.setup(work)
    before = {path: tree(work / path) for path in case.keep}
    monkeypatch.chdir(work / case.cwd)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if case.fault:
        call, code, under = case.fault
        inject(monkeypatch, call, code, work / under)
    capsys.readouterr()
    status = main(case.argv)
    err = capsys.readouterr().err
    command = case.argv[0]
    lines = [line for line in err.splitlines() if line.startswith(f"orthoft {command}:")]
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    assert len(lines) == 1, err[-3000:]
    assert case.expect in lines[0], lines[0]
    for path, content in before.items():
        assert tree(work / path) == content, f"{path} changed"
    leftovers = [p.name for p in work.iterdir() if p.name.startswith((".out.", ".todo.txt.", ".notes."))]
    assert not leftovers, leftovers


def test_debug_shows_the_traceback(work):
    with pytest.raises(FileNotFoundError, match="adapter folder nowhere does not exist"):
        main(["--debug", *export(adapter="nowhere")])


# ---- export --overwrite under SIGKILL --------------------------------------------------------------

# the CLI in a child that stalls (to be killed) after the first staged file reached the disk, or
# right after the old OUT was renamed aside (between the two renames of the swap)
STALLED_EXPORT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    stall, out, marker = sys.argv[1:4]
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if stall == "write" and "/.out.partial-" in path and os.path.isfile(path):
            Path(marker).write_text(path)
            time.sleep(300)

    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if stall == "swap" and os.path.abspath(src) == out:
            Path(marker).write_text(str(dst))
            time.sleep(300)

    os.fsync, os.rename = fsync, rename
    from orthoft.cli import main

    sys.exit(main(sys.argv[4:]))
    """
)


def _kill_stalled_export(work: Path, stall: str) -> None:
    marker = work / "marker"
    argv = export("--overwrite", "--dtype", "bf16")
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_EXPORT, stall, str(work / "out"), str(marker), *argv],
        cwd=work,
        env={**subprocess_env(), "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the export never reached the stall"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    marker.unlink()


def test_sigkill_while_writing_keeps_the_old_export(work, capsys):
    assert main(export()) == 0
    old = tree(work / "out")
    _kill_stalled_export(work, "write")
    assert tree(work / "out") == old  # the old complete export, bitwise
    # the dead process's staging folder is cleared by the next export, which then replaces OUT
    assert main(export("--overwrite", "--dtype", "bf16")) == 0
    assert json.loads((work / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert not [p.name for p in work.iterdir() if p.name.startswith(".out")]


def test_sigkill_between_the_renames_restores_the_old_export(work, capsys):
    assert main(export()) == 0
    old = tree(work / "out")
    _kill_stalled_export(work, "swap")
    aside = [p for p in work.iterdir() if p.name.startswith(".out.old-")]
    assert not (work / "out").exists() and len(aside) == 1 and tree(aside[0]) == old  # the crash window itself
    # the next export puts the only copy back (and, without --overwrite, refuses to replace it)
    capsys.readouterr()
    assert main(export()) == 2
    err = capsys.readouterr().err
    assert f"restored from {aside[0].name}" in err and "already exists" in err
    assert tree(work / "out") == old and not aside[0].exists()
    assert main(export("--overwrite", "--dtype", "bf16")) == 0
    assert not [p.name for p in work.iterdir() if p.name.startswith(".out")]


def test_export_folders_honour_the_umask(work):
    previous = os.umask(0o027)
    try:
        assert main(export(out="nested/out")) == 0
    finally:
        os.umask(previous)
    for folder in (work / "nested", work / "nested" / "out"):
        assert folder.stat().st_mode & 0o777 == 0o750, (folder, oct(folder.stat().st_mode))
    assert (work / "nested" / "out" / "config.json").stat().st_mode & 0o777 == 0o640
