"""Measure how ``orthoft export``, ``orthoft eval`` and ``orthoft diffusion`` meet bad inputs and faults.

Usage: python tests/scripts/measure_cli_faults.py [--code ROOT] [--only PREFIX ...] [--json OUT]

Tiny fixtures are built once with this checkout (a tiny Llama saved from config, a wider one, an
OFT adapter trained on the first, a 2-step ``orthoft train`` run); every case then runs
``python -m orthoft.cli`` from the package at ``--code`` (default: this checkout; the code before
issue 11 is at /tmp/orthoft-before) in a fresh copy of them and is classified:

* ``data lost``: a file the user had (an input, the working directory, an earlier export) changed or vanished;
* ``traceback``: a Python traceback reached the user;
* ``silent``: the command succeeded where it should have refused (or reported a wrong result);
* ``clear``: it failed with a message and no traceback;
* ``ok``: a fault the command must survive (SIGKILL during ``export --overwrite``) left the old export whole.

Faults are injected by this same script run as ``--as-cli`` (``FAULT_CALL`` = fsync, open, mkdir,
stall-fsync or stall-rename; ``FAULT_ERRNO``; ``FAULT_UNDER``: a path prefix), which patches ``os``/``io``
calls only, so the same cases run against any version of the package.
"""

from __future__ import annotations

import argparse
import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DIFF = str(REPO / "recipes" / "diffusion-digits-oft.yaml")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def as_cli() -> None:
    """``orthoft.cli.main(sys.argv[2:])`` with the fault the FAULT_* variables describe."""
    call, under = os.environ["FAULT_CALL"], os.environ["FAULT_UNDER"]
    code = getattr(errno, os.environ.get("FAULT_ERRNO", "ENOSPC"))

    def hit(path):
        try:
            return os.path.abspath(os.fspath(path)).startswith(under)
        except TypeError:
            return False

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def fd_path(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    real_fsync, real_open, real_mkdir, real_rename = os.fsync, io.open, os.mkdir, os.rename
    if call == "fsync":

        def fsync(fd):
            p = fd_path(fd)
            if hit(p) and os.path.isfile(p):
                fail(p)
            return real_fsync(fd)

        os.fsync = fsync
    elif call == "open":

        def open_(file, mode="r", *a, **k):
            path = fd_path(file) if isinstance(file, int) else file  # os.fdopen(fd) goes through io.open too
            if isinstance(path, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and hit(path):
                fail(path)
            return real_open(file, mode, *a, **k)

        io.open = builtins.open = open_
    elif call == "mkdir":

        def mkdir(path, *a, **k):
            if hit(path):
                fail(path)
            return real_mkdir(path, *a, **k)

        os.mkdir = mkdir
    elif call == "stall-fsync":

        def fsync(fd):
            real_fsync(fd)
            p = fd_path(fd)
            if hit(p) and os.path.isfile(p):
                open(os.environ["FAULT_MARKER"], "w").write(p)
                time.sleep(600)

        os.fsync = fsync
    elif call == "stall-rename":

        def rename(src, dst, *a, **k):
            real_rename(src, dst, *a, **k)
            if os.path.abspath(os.fspath(src)) == under:  # the old OUT was just moved aside
                open(os.environ["FAULT_MARKER"], "w").write(os.fspath(dst))
                time.sleep(600)

        os.rename = rename
    from orthoft.cli import main

    sys.exit(main(sys.argv[2:]))


def build_fixtures(fx: Path) -> None:
    """base/, base_wide/ (hidden 128), adapter/ (OFT on base), run/ (2 steps of `orthoft train`) with this checkout."""
    sys.path.insert(0, str(REPO))
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import orthoft
    from tests.test_quantized import save_tiny_llama, tiny_llama_config
    from tests.tiny_recipes import CAUSAL, run_cli, write_recipe

    fx.mkdir(parents=True)
    save_tiny_llama(fx / "base")
    wide = tiny_llama_config()
    wide.hidden_size, wide.intermediate_size = 128, 256
    torch.manual_seed(0)
    LlamaForCausalLM(wide).save_pretrained(fx / "base_wide")
    torch.manual_seed(0)
    config = orthoft.OFTConfig(
        target_modules=["q_proj", "v_proj"], block_size=16, base_model_name_or_path=str(fx / "base")
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(fx / "base"), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(fx / "adapter")
    train = {"output_dir": str(fx / "run"), "max_steps": 2, "save_every": 1, "eval_every": 0}
    recipe = write_recipe(
        CAUSAL,
        fx / "causal.yaml",
        train={**train, "gradient_accumulation_steps": 1},
        data={"max_train_examples": 16, "max_eval_examples": 8},
    )
    run_cli(["train", str(recipe)])


def tree(path):
    """{relative file: size} of a folder (None when missing)."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.stat().st_size}
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def export(*extra, base="base", adapter="adapter", out="out"):
    argv = ["export"]
    if base:
        argv += ["--base", base]
    argv += ["--adapter", adapter, "--out", out, "--dtype", "fp32", *extra]
    return argv


def edit_json(path, **changes):
    data = json.loads(Path(path).read_text())
    data.update(changes)
    Path(path).write_text(json.dumps(data))


def poison(folder, value):
    from safetensors.torch import load_file, save_file

    f = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, f)


def truncate(folder, keep):
    f = Path(folder) / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def make_run2(d):
    (d / "run2" / "final").mkdir(parents=True)
    shutil.copytree(d / "adapter", d / "run2" / "final" / "adapter")
    shutil.copytree(d / "run" / "checkpoints", d / "run2" / "checkpoints")
    shutil.copy(d / "run" / "recipe.yaml", d / "run2" / "recipe.yaml")


def wide_recipe(d):
    recipe = yaml.safe_load((d / "run" / "recipe.yaml").read_text())
    recipe["model"]["from_config"].update(hidden_size=128, intermediate_size=256)
    (d / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def keeps(*paths):
    """check: every path still holds what it held before the command."""

    def check(d, before):
        for p in paths:
            if tree(d / p) != before[p]:
                return "data lost"
        return None

    check.paths = paths
    return check


# id, argv, setup(d), cwd (relative), fault env, check(d, trees) -> "data lost"/None, expect ("error"|"ok")
CASES = [
    # ---- export: OUT that would destroy something
    ("export/out-is-cwd", export("--overwrite", out="."), None, ".", None, keeps("adapter", "base"), "error"),
    ("export/out-is-cwd-no-overwrite", export(out="."), None, ".", None, keeps("adapter", "base"), "error"),
    (
        "export/out-is-parent-of-cwd",
        export("--overwrite", base="../base", adapter="../adapter", out=".."),
        lambda d: (d / "work").mkdir(),
        "work",
        None,
        keeps("adapter", "base"),
        "error",
    ),
    ("export/out-is-adapter", export("--overwrite", out="adapter"), None, ".", None, keeps("adapter"), "error"),
    ("export/out-is-base", export("--overwrite", out="base"), None, ".", None, keeps("base"), "error"),
    (
        "export/out-is-run-folder",
        export("--overwrite", adapter="run2/final/adapter", out="run2"),
        make_run2,
        ".",
        None,
        keeps("run2"),
        "error",
    ),
    (
        "export/out-is-run-checkpoints",
        export("--overwrite", adapter="run2/final/adapter", out="run2/checkpoints"),
        make_run2,
        ".",
        None,
        keeps("run2"),
        "error",
    ),
    (
        "export/out-is-user-folder",
        export("--overwrite", out="notes"),
        lambda d: (d / "notes").mkdir() or (d / "notes" / "todo.txt").write_text("mine"),
        ".",
        None,
        keeps("notes"),
        "error",
    ),
    (
        "export/out-is-a-file",
        export("--overwrite", out="todo.txt"),
        lambda d: (d / "todo.txt").write_text("mine"),
        ".",
        None,
        keeps("todo.txt"),
        "error",
    ),
    # ---- export: inputs
    ("export/adapter-without-config", export(adapter="base"), None, ".", None, None, "error"),
    ("export/adapter-folder-missing", export(adapter="nowhere"), None, ".", None, None, "error"),
    (
        "export/adapter-config-corrupt-json",
        export(),
        lambda d: (d / "adapter/adapter_config.json").write_text("{oops"),
        ".",
        None,
        None,
        "error",
    ),
    (
        "export/adapter-config-unknown-peft-type",
        export(),
        lambda d: edit_json(d / "adapter/adapter_config.json", peft_type="ORTHOFT_X"),
        ".",
        None,
        None,
        "error",
    ),
    ("export/safetensors-truncated", export(), lambda d: truncate(d / "adapter", 0.5), ".", None, None, "error"),
    ("export/safetensors-empty", export(), lambda d: truncate(d / "adapter", 0), ".", None, None, "error"),
    (
        "export/safetensors-missing",
        export(),
        lambda d: (d / "adapter/adapter_model.safetensors").unlink(),
        ".",
        None,
        None,
        "error",
    ),
    ("export/wrong-base-shape-mismatch", export(base="base_wide"), None, ".", None, None, "error"),
    ("export/base-folder-missing", export(base="nowhere"), None, ".", None, None, "error"),
    (
        "export/base-hub-id-offline",
        export(base=None),
        lambda d: edit_json(d / "adapter/adapter_config.json", base_model_name_or_path="some-org/some-model"),
        ".",
        None,
        None,
        "error",
    ),
    ("export/nan-adapter", export(), lambda d: poison(d / "adapter", float("nan")), ".", None, None, "error"),
    ("export/bad-max-shard-size", export("--max-shard-size", "lots"), None, ".", None, None, "error"),
    # ---- export: disk faults
    (
        "export/enospc-while-writing",
        export(),
        None,
        ".",
        {"FAULT_CALL": "fsync", "FAULT_ERRNO": "ENOSPC"},
        keeps("adapter", "base"),
        "error",
    ),
    (
        "export/erofs-creating-out",
        export(),
        None,
        ".",
        {"FAULT_CALL": "mkdir", "FAULT_ERRNO": "EROFS"},
        keeps("adapter", "base"),
        "error",
    ),
    (
        "export/eacces-creating-out",
        export(),
        None,
        ".",
        {"FAULT_CALL": "mkdir", "FAULT_ERRNO": "EACCES"},
        keeps("adapter", "base"),
        "error",
    ),
    # ---- eval
    ("eval/run-folder-missing", ["eval", "nowhere"], None, ".", None, None, "error"),
    (
        "eval/run-without-final-adapter",
        ["eval", "run"],
        lambda d: shutil.rmtree(d / "run/final"),
        ".",
        None,
        None,
        "error",
    ),
    ("eval/unknown-adapter-folder", ["eval", "run", "--adapter", "nowhere"], None, ".", None, None, "error"),
    (
        "eval/recipe-corrupt-yaml",
        ["eval", "run"],
        lambda d: (d / "run/recipe.yaml").write_text("model: [oops"),
        ".",
        None,
        None,
        "error",
    ),
    ("eval/bad-override-key", ["eval", "run", "--override", "train.nope=1"], None, ".", None, None, "error"),
    (
        "eval/adapter-config-corrupt-json",
        ["eval", "run"],
        lambda d: (d / "run/final/adapter/adapter_config.json").write_text(""),
        ".",
        None,
        None,
        "error",
    ),
    (
        "eval/adapter-config-unknown-peft-type",
        ["eval", "run"],
        lambda d: edit_json(d / "run/final/adapter/adapter_config.json", peft_type="ORTHOFT_X"),
        ".",
        None,
        None,
        "error",
    ),
    (
        "eval/safetensors-truncated",
        ["eval", "run"],
        lambda d: truncate(d / "run/final/adapter", 0.5),
        ".",
        None,
        None,
        "error",
    ),
    (
        "eval/safetensors-empty",
        ["eval", "run"],
        lambda d: truncate(d / "run/final/adapter", 0),
        ".",
        None,
        None,
        "error",
    ),
    (
        "eval/safetensors-missing",
        ["eval", "run"],
        lambda d: (d / "run/final/adapter/adapter_model.safetensors").unlink(),
        ".",
        None,
        None,
        "error",
    ),
    ("eval/wrong-base-shape-mismatch", ["eval", "run"], wide_recipe, ".", None, None, "error"),
    (
        "eval/nan-adapter",
        ["eval", "run"],
        lambda d: poison(d / "run/final/adapter", float("nan")),
        ".",
        None,
        None,
        "error",
    ),
    (
        "eval/inf-adapter",
        ["eval", "run"],
        lambda d: poison(d / "run/final/adapter", float("inf")),
        ".",
        None,
        None,
        "error",
    ),
    (
        "eval/metric-files-missing",
        ["eval", "run"],
        None,
        ".",
        {"ORTHOFT_METRICS_DIR": "/nonexistent/metrics"},
        None,
        "error",
    ),
    ("eval/output-is-a-folder", ["eval", "run", "--output", "run"], None, ".", None, keeps("run"), "error"),
    (
        "eval/enospc-writing-results",
        ["eval", "run", "--output", "res/eval.json"],
        None,
        ".",
        {"FAULT_CALL": "open", "FAULT_ERRNO": "ENOSPC", "FAULT_UNDER_REL": "res"},
        None,
        "error",
    ),
    (
        "eval/erofs-writing-results",
        ["eval", "run", "--output", "res/eval.json"],
        None,
        ".",
        {"FAULT_CALL": "mkdir", "FAULT_ERRNO": "EROFS", "FAULT_UNDER_REL": "res"},
        None,
        "error",
    ),
    # ---- diffusion
    ("diffusion/recipe-missing", ["diffusion", "train", "nowhere.yaml"], None, ".", None, None, "error"),
    (
        "diffusion/recipe-corrupt-yaml",
        ["diffusion", "train", "d.yaml"],
        lambda d: (d / "d.yaml").write_text("a: [b"),
        ".",
        None,
        None,
        "error",
    ),
    (
        "diffusion/recipe-unknown-key",
        ["diffusion", "train", "d.yaml"],
        lambda d: diff_recipe(d, extra={"nope": 1}),
        ".",
        None,
        None,
        "error",
    ),
    (
        "diffusion/recipe-unknown-method",
        ["diffusion", "train", "d.yaml"],
        lambda d: diff_recipe(d, adapter={"method": "nope"}),
        ".",
        None,
        None,
        "error",
    ),
    (
        "diffusion/recipe-bad-value",
        ["diffusion", "train", "d.yaml"],
        lambda d: diff_recipe(d, train={"steps": "many"}),
        ".",
        None,
        None,
        "error",
    ),
    ("diffusion/concepts-without-section", ["diffusion", "concepts", DIFF], None, ".", None, None, "error"),
    (
        "diffusion/base-folder-missing",
        ["diffusion", "train", DIFF, "--base", "nowhere", "--output-dir", "o"],
        None,
        ".",
        None,
        None,
        "error",
    ),
    (
        "diffusion/base-not-a-pipeline",
        ["diffusion", "train", DIFF, "--base", "base", "--output-dir", "o"],
        None,
        ".",
        None,
        keeps("base"),
        "error",
    ),
    (
        "diffusion/output-dir-is-a-file",
        ["diffusion", "train", DIFF, "--output-dir", "todo.txt"],
        lambda d: (d / "todo.txt").write_text("mine"),
        ".",
        None,
        keeps("todo.txt"),
        "error",
    ),
    (
        "diffusion/erofs-output-dir",
        ["diffusion", "train", DIFF, "--output-dir", "o"],
        None,
        ".",
        {"FAULT_CALL": "mkdir", "FAULT_ERRNO": "EROFS", "FAULT_UNDER_REL": "o"},
        None,
        "error",
    ),
]


def diff_recipe(d, extra=None, **sections):
    recipe = yaml.safe_load(Path(DIFF).read_text())
    for name, values in sections.items():
        recipe[name].update(values)
    recipe.update(extra or {})
    (d / "d.yaml").write_text(yaml.safe_dump(recipe))


def message_of(stderr):
    lines = [l for l in stderr.splitlines() if l.strip()]
    ours = [l for l in lines if l.startswith("orthoft ")]
    return (ours or lines or [""])[-1][:300]


def classify(rc, stderr, lost, expect):
    if lost:
        return "data lost"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if rc == 0:
        return "silent" if expect == "error" else "ok"
    return "clear"


def run_case(case, fx, workdir):
    cid, argv, setup, cwd, fault, check, expect = case
    d = workdir / cid.replace("/", "__")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(fx, d, symlinks=True)
    if setup:
        setup(d)
    watched = {p: tree(d / p) for p in getattr(check, "paths", ())}
    env = dict(ENV)
    cmd = [sys.executable, "-m", "orthoft.cli", *argv]
    if fault:
        fault = dict(fault)
        env.update({k: v for k, v in fault.items() if not k.startswith("FAULT_UNDER_REL")})
        if "FAULT_CALL" in fault:
            env["FAULT_UNDER"] = str(d / fault.get("FAULT_UNDER_REL", ".out"))  # default: export's staging folder
            cmd = [sys.executable, __file__, "--as-cli", *argv]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=d / cwd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - start
    lost = check(d, watched) if check else None
    verdict = classify(result.returncode, result.stderr, lost, expect)
    return {
        "case": cid,
        "verdict": verdict,
        "rc": result.returncode,
        "seconds": round(seconds, 1),
        "message": message_of(result.stderr),
        "stdout_tail": result.stdout[-400:],
    }


def kill_cases(fx, workdir, only):
    """SIGKILL during an export with --overwrite (mid-write, and between the two renames), then a rerun."""
    out = []
    for cid, call in (
        ("export/sigkill-mid-write-overwrite", "stall-fsync"),
        ("export/sigkill-between-renames-then-rerun", "stall-rename"),
    ):
        if only and not any(cid.startswith(p) for p in only):
            continue
        d = workdir / cid.replace("/", "__")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(fx, d, symlinks=True)
        first = subprocess.run(
            [sys.executable, "-m", "orthoft.cli", *export("--dtype", "bf16")],
            cwd=d,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert first.returncode == 0, first.stderr[-2000:]
        old = tree(d / "out")
        marker = d / "marker"
        env = {
            **ENV,
            "FAULT_CALL": call,
            "FAULT_MARKER": str(marker),
            "FAULT_UNDER": str(d / (".out" if call == "stall-fsync" else "out")),
        }
        proc = subprocess.Popen(
            [sys.executable, __file__, "--as-cli", *export("--overwrite")],
            cwd=d,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after_kill = tree(d / "out")
        state = "old" if after_kill == old else ("missing" if after_kill is None else "other")
        entry = {
            "case": cid,
            "killed": killed,
            "out_after_kill": state,
            "hidden": sorted(p.name for p in d.iterdir() if p.name.startswith(".out")),
        }
        if call == "stall-fsync":
            entry["verdict"] = "ok" if state == "old" else "data lost"
        else:
            rerun = subprocess.run(
                [sys.executable, "-m", "orthoft.cli", *export()],
                cwd=d,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=900,
            )
            hidden = [p for p in d.iterdir() if p.name.startswith(".out.old")]
            kept = tree(d / "out") == old or any(tree(p) == old for p in hidden)
            entry.update(
                rerun_rc=rerun.returncode, message=message_of(rerun.stderr), hidden_after_rerun=[p.name for p in hidden]
            )
            entry["verdict"] = (
                "data lost"
                if not kept
                else "traceback"
                if "Traceback" in rerun.stderr
                else "clear"
                if rerun.returncode
                else "silent"
            )
        out.append(entry)
        print(json.dumps(entry), flush=True)
    return out


def main() -> None:
    if sys.argv[1:2] == ["--as-cli"]:
        as_cli()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(REPO), help="checkout whose orthoft runs (PYTHONPATH)")
    parser.add_argument("--only", nargs="*", default=[], help="case id prefixes")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    ENV["PYTHONPATH"] = args.code
    with tempfile.TemporaryDirectory(prefix="cli-faults-") as tmp:
        fx, workdir = Path(tmp) / "fx", Path(tmp) / "cases"
        build_fixtures(fx)
        results = []
        for case in CASES:
            if not args.only or any(case[0].startswith(p) for p in args.only):
                results.append(run_case(case, fx, workdir))
                print(json.dumps(results[-1]), flush=True)
        results += kill_cases(fx, workdir, args.only)
    counts = {}
    for entry in results:
        counts[entry["verdict"]] = counts.get(entry["verdict"], 0) + 1
    print("counts:", counts)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
