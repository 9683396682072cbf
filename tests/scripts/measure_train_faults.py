"""Measure how ``orthoft train`` meets bad inputs and faults: clear message, traceback, silent, or data lost.

Usage: python tests/scripts/measure_train_faults.py [--code ROOT] [--only NAME ...] [--json OUT]

Each case builds its files in a fresh folder (also the working directory of the commands), runs
``python -m orthoft.cli`` from the package at ``--code`` (default: this checkout; the lead keeps the
code before issue 11 at /tmp/orthoft-before) and classifies what happened:

* ``data lost``: a file the user had (an earlier run, the working directory, an input) is gone or changed;
* ``traceback``: a Python traceback reached the user;
* ``silent``: the command succeeded (or left a wrong state) where it should have refused or warned;
* ``vague``: one message, but it does not name the file or key (``fragments``) to fix;
* ``clear``: one message naming the file or key (and the command did the right thing);
* ``ok``: a fault the command is expected to survive (a kill, a corrupt checkpoint) and it did.

Fault injection uses tests/scripts/inject_fault.py, which knows nothing of orthoft's modules, so the
same cases run against any version of the package.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
from tests.tiny_recipes import CAUSAL  # noqa: E402

BASE: dict[str, Any] = copy.deepcopy(CAUSAL)
BASE["data"].update(max_train_examples=24, max_eval_examples=8)
BASE["train"].update(max_steps=3, save_every=1, eval_every=0, warmup_steps=0, keep_checkpoints=2)
BASE["eval"] = {"eval_before": False, "orthogonality": False}

CASES: dict[str, Callable[[Ctx], tuple[str, str]]] = {}


def case(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES[name] = fn
        return fn

    return register


class Ctx:
    """One case's folder, the code under test and helpers to run it."""

    def __init__(self, root: Path, code: Path) -> None:
        self.root, self.code = root, code

    def recipe(self, name: str = "r.yaml", **sections: dict[str, Any]) -> Path:
        data = copy.deepcopy(BASE)
        data["train"]["output_dir"] = str(self.root / "run")
        for section, values in sections.items():
            if values is None:
                data.pop(section, None)
                continue
            data.setdefault(section, {}).update(values)
        path = self.root / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def run(self, *args: str, fault: tuple[str, str, int] | None = None, cwd: Path | None = None):
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env.update(TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env["PYTHONPATH"] = str(self.code) + os.pathsep + str(REPO)
        if fault is None:
            command = [sys.executable, "-m", "orthoft.cli", *args]
        else:
            command = [sys.executable, str(HERE / "inject_fault.py"), *map(str, fault), "--", *args]
        return subprocess.run(command, cwd=cwd or self.root, env=env, capture_output=True, text=True, timeout=600)

    def trained(self, **sections: dict[str, Any]) -> Path:
        """A finished run in ``root/run``; returns the recipe."""
        recipe = self.recipe(**sections)
        result = self.run("train", str(recipe))
        if result.returncode != 0:
            raise RuntimeError(f"setup run failed:\n{result.stderr[-3000:]}")
        return recipe


def digest_tree(path: Path) -> str:
    """A hash of every file's name and bytes under ``path`` (hidden folders aside)."""
    digest = hashlib.sha256()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(str(rel).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def error_line(result: subprocess.CompletedProcess) -> str | None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("orthoft train:")]
    return lines[-1] if lines else None


def judge(result: subprocess.CompletedProcess, fragments: tuple[str, ...], lost: bool = False) -> tuple[str, str]:
    """The outcome of a command that should have refused with a message naming ``fragments``."""
    tail = (error_line(result) or result.stderr.strip().splitlines()[-1:] or [""])[-1][:300]
    if lost:
        return "data lost", tail
    if "Traceback (most recent call last)" in result.stderr:
        return "traceback", tail
    if result.returncode == 0:
        return "silent", "exit 0: " + (result.stdout.strip().splitlines() or [""])[-1][:200]
    message = error_line(result)
    if message is None:
        return "traceback", tail
    if all(f.lower() in message.lower() for f in fragments):
        return "clear", f"exit {result.returncode}: {message[:300]}"
    return "vague", f"exit {result.returncode}: {message[:300]}"


# ---- recipe and input errors ------------------------------------------------------------------
@case("recipe file missing")
def _(ctx: Ctx):
    return judge(ctx.run("train", "missing.yaml"), ("missing.yaml",))


@case("recipe file is a folder")
def _(ctx: Ctx):
    (ctx.root / "recipes.yaml").mkdir()
    return judge(ctx.run("train", "recipes.yaml"), ("recipes.yaml", "folder"))


@case("recipe file not UTF-8")
def _(ctx: Ctx):
    (ctx.root / "bin.yaml").write_bytes(b"\xff\xfe\x00model: {}\n")
    return judge(ctx.run("train", "bin.yaml"), ("bin.yaml",))


@case("recipe not valid YAML")
def _(ctx: Ctx):
    (ctx.root / "bad.yaml").write_text("model: [unclosed\n")
    return judge(ctx.run("train", "bad.yaml"), ("bad.yaml",))


@case("--override without =")
def _(ctx: Ctx):
    return judge(ctx.run("train", str(ctx.recipe()), "--override", "train.max_steps"), ("train.max_steps",))


@case("--override unknown key")
def _(ctx: Ctx):
    return judge(ctx.run("train", str(ctx.recipe()), "--override", "train.max_step=3"), ("max_step",))


@case("unknown adapter method")
def _(ctx: Ctx):
    return judge(ctx.run("train", str(ctx.recipe(adapter={"method": "loraa"}))), ("loraa",))


@case("adapter.block_size: 0 (train)")
def _(ctx: Ctx):
    return judge(ctx.run("train", str(ctx.recipe(adapter={"block_size": 0}))), ("block_size",))


@case("adapter.num_blocks: 0 --check")
def _(ctx: Ctx):
    recipe = ctx.recipe(adapter={"block_size": None, "num_blocks": 0})
    return judge(ctx.run("train", str(recipe), "--check"), ("num_blocks",))


@case("--check: target_modules typo")
def _(ctx: Ctx):
    recipe = ctx.recipe(adapter={"target_modules": ["q_prj"]})
    return judge(ctx.run("train", str(recipe), "--check"), ("q_prj",))


@case("train: one of target_modules matches nothing")
def _(ctx: Ctx):
    recipe = ctx.recipe(adapter={"target_modules": ["q_proj", "v_prj"]})
    return judge(ctx.run("train", str(recipe)), ("v_prj",))


@case("--check: block_size does not divide width")
def _(ctx: Ctx):
    recipe = ctx.recipe(adapter={"block_size": 24})
    return judge(ctx.run("train", str(recipe), "--check"), ("block size 24",))


@case("--check: optim.lr .nan")
def _(ctx: Ctx):
    recipe = ctx.recipe()
    return judge(ctx.run("train", str(recipe), "--check", "--override", "optim.lr=.nan"), ("optim.lr",))


@case("train.max_grad_norm .nan")
def _(ctx: Ctx):
    recipe = ctx.recipe()
    return judge(ctx.run("train", str(recipe), "--override", "train.max_grad_norm=.nan"), ("max_grad_norm",))


@case("diverging run (lr 1e30, no skew bound)")
def _(ctx: Ctx):
    recipe = ctx.recipe(optim={"lr": 1e30}, adapter={"max_skew_norm": None})
    result = ctx.run("train", str(recipe))
    final = ctx.root / "run" / "final"
    if final.exists():
        return "silent", "wrote final/ from a diverged run"
    return judge(result, ("step",))


@case("data.path missing")
def _(ctx: Ctx):
    recipe = ctx.recipe(data={"source": "text_file", "path": str(ctx.root / "nope.txt")})
    return judge(ctx.run("train", str(recipe)), ("nope.txt",))


@case("data.path not UTF-8")
def _(ctx: Ctx):
    (ctx.root / "data.txt").write_bytes(bytes(range(256)) * 64)
    recipe = ctx.recipe(data={"source": "text_file", "path": str(ctx.root / "data.txt")})
    return judge(ctx.run("train", str(recipe)), ("data.txt",))


@case("model.tokenizer missing folder")
def _(ctx: Ctx):
    recipe = ctx.recipe(model={"tokenizer": str(ctx.root / "no-tokenizer")})
    return judge(ctx.run("train", str(recipe)), ("no-tokenizer",))


@case("model.name_or_path missing folder")
def _(ctx: Ctx):
    model = {"name_or_path": str(ctx.root / "no-model"), "from_config": None}
    recipe = ctx.recipe(model=model)
    return judge(ctx.run("train", str(recipe)), ("no-model",))


@case("model folder with corrupt config.json")
def _(ctx: Ctx):
    (ctx.root / "base").mkdir()
    (ctx.root / "base" / "config.json").write_text("{not json")
    recipe = ctx.recipe(model={"name_or_path": str(ctx.root / "base"), "from_config": None})
    return judge(ctx.run("train", str(recipe)), ("config.json",))


@case("model.from_config unknown model_type")
def _(ctx: Ctx):
    recipe = ctx.recipe(model={"from_config": {"model_type": "llamma", "hidden_size": 64}})
    return judge(ctx.run("train", str(recipe)), ("llamma",))


# ---- folders: never delete what the command did not create -------------------------------------
def _with_sentinel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sentinel = folder / "notes.txt"
    sentinel.write_text("the user's own file\n")
    return sentinel


@case("export.output_dir: . (the working directory)")
def _(ctx: Ctx):
    sentinel = _with_sentinel(ctx.root)
    recipe = ctx.recipe(export={"enabled": True, "output_dir": "."})
    result = ctx.run("train", str(recipe))
    return judge(result, ("export.output_dir",), lost=not sentinel.is_file() or not recipe.is_file())


@case("export.output_dir: the run folder")
def _(ctx: Ctx):
    recipe = ctx.recipe(export={"enabled": True, "output_dir": str(ctx.root / "run")})
    result = ctx.run("train", str(recipe))
    lost = not (ctx.root / "run" / "final").is_dir() or not (ctx.root / "run" / "checkpoints").is_dir()
    return judge(result, ("export.output_dir",), lost=lost and result.returncode == 0)


@case("export.output_dir: parent of the run folder")
def _(ctx: Ctx):
    sentinel = _with_sentinel(ctx.root / "runs")
    recipe = ctx.recipe(
        train={"output_dir": str(ctx.root / "runs" / "a")},
        export={"enabled": True, "output_dir": str(ctx.root / "runs")},
    )
    result = ctx.run("train", str(recipe))
    return judge(result, ("export.output_dir",), lost=not sentinel.is_file())


@case("export.output_dir: the folder holding data.path")
def _(ctx: Ctx):
    data = ctx.root / "corpus" / "text.txt"
    data.parent.mkdir()
    data.write_text(("To be, or not to be, that is the question. " * 400) + "\n")
    recipe = ctx.recipe(
        data={"source": "text_file", "path": str(data)}, export={"enabled": True, "output_dir": str(data.parent)}
    )
    result = ctx.run("train", str(recipe))
    return judge(result, ("export.output_dir",), lost=not data.is_file())


@case("export.output_dir: <run>/final")
def _(ctx: Ctx):
    recipe = ctx.recipe(export={"enabled": True, "output_dir": str(ctx.root / "run" / "final")})
    result = ctx.run("train", str(recipe))
    lost = result.returncode == 0 and not (ctx.root / "run" / "final" / "adapter").is_dir()
    return judge(result, ("export.output_dir",), lost=lost)


@case("export.output_dir: another run's export, no --overwrite")
def _(ctx: Ctx):
    earlier = ctx.root / "exports" / "m"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text('{"model_type": "llama"}')
    (earlier / "model.safetensors").write_bytes(b"an earlier run's merged weights")
    before = digest_tree(earlier)
    result = ctx.run("train", str(ctx.recipe(export={"enabled": True, "output_dir": str(earlier)})))
    return judge(result, ("export.output_dir", "--overwrite"), lost=digest_tree(earlier) != before)


@case("export.output_dir: a user's folder, with --overwrite")
def _(ctx: Ctx):
    sentinel = _with_sentinel(ctx.root / "mine")
    result = ctx.run(
        "train", str(ctx.recipe(export={"enabled": True, "output_dir": str(sentinel.parent)})), "--overwrite"
    )
    return judge(result, ("export.output_dir",), lost=not sentinel.is_file())


@case("train.output_dir: . with --overwrite, recipe.yaml in cwd")
def _(ctx: Ctx):
    recipe = ctx.recipe("recipe.yaml", train={"output_dir": "."})
    text = recipe.read_text() + "# my notes on this recipe\n"
    recipe.write_text(text)
    result = ctx.run("train", "recipe.yaml", "--overwrite")
    return judge(result, ("train.output_dir",), lost=recipe.read_text() != text)


@case("train.output_dir: the folder holding data.path")
def _(ctx: Ctx):
    data = ctx.root / "corpus" / "text.txt"
    data.parent.mkdir()
    data.write_text(("To be, or not to be, that is the question. " * 400) + "\n")
    recipe = ctx.recipe(data={"source": "text_file", "path": str(data)}, train={"output_dir": str(data.parent)})
    result = ctx.run("train", str(recipe))
    return judge(result, ("train.output_dir",), lost=not data.is_file())


@case("--resume on a finished run without checkpoints")
def _(ctx: Ctx):
    recipe = ctx.trained(train={"save_every": 0})
    before = digest_tree(ctx.root / "run" / "final")
    result = ctx.run("train", str(recipe), "--resume", "--override", "train.max_steps=2")
    lost = digest_tree(ctx.root / "run" / "final") != before
    return judge(result, ("--resume", "checkpoint"), lost=lost)


@case("--resume with no run at all")
def _(ctx: Ctx):
    result = ctx.run("train", str(ctx.recipe()), "--resume")
    return judge(result, ("--resume", "checkpoint"))


@case("--overwrite, new run fails at start-up")
def _(ctx: Ctx):
    recipe = ctx.trained()
    before = digest_tree(ctx.root / "run")
    result = ctx.run(
        "train",
        str(recipe),
        "--overwrite",
        "--override",
        "data.source=text_file",
        "--override",
        f"data.path={ctx.root / 'missing.txt'}",
    )
    return judge(result, ("missing.txt",), lost=digest_tree(ctx.root / "run") != before)


@case("failed start-up leaves a folder that blocks the rerun")
def _(ctx: Ctx):
    recipe = ctx.recipe(data={"source": "text_file", "path": str(ctx.root / "missing.txt")})
    first = ctx.run("train", str(recipe))
    rerun = ctx.run("train", str(ctx.recipe()))
    if rerun.returncode != 0:
        return "silent", "the rerun was refused: " + (error_line(rerun) or "")[:200]
    return judge(first, ("missing.txt",))


# ---- checkpoints and resume -------------------------------------------------------------------
def _latest(ctx: Ctx) -> Path:
    return sorted((ctx.root / "run" / "checkpoints").glob("step-*"))[-1]


def _resume_after(ctx: Ctx, damage: Callable[[Path], None], fragments: tuple[str, ...]) -> tuple[str, str]:
    """Finish a reference run, damage the latest checkpoint of a second run, resume it; compare."""
    reference = ctx.trained(train={"output_dir": str(ctx.root / "ref")})
    del reference
    recipe = ctx.trained()
    damage(_latest(ctx) / "trainable.safetensors")
    (ctx.root / "run" / "final").rename(ctx.root / "final.bak")  # as if killed before the end
    result = ctx.run("train", str(recipe), "--resume")
    if "Traceback (most recent call last)" in result.stderr:
        return "traceback", result.stderr.strip().splitlines()[-1][:300]
    if result.returncode != 0:
        return judge(result, fragments)
    same = digest_tree(ctx.root / "run" / "final" / "trainable.safetensors") == digest_tree(
        ctx.root / "ref" / "final" / "trainable.safetensors"
    )
    warned = all(f.lower() in result.stderr.lower() for f in fragments)
    if same and warned:
        return "clear", "warned, resumed from the previous checkpoint, final weights bitwise equal"
    return "silent", f"exit 0, final weights {'equal' if same else 'DIFFER from an unbroken run'}, warned={warned}"


@case("--resume, latest trainable.safetensors truncated")
def _(ctx: Ctx):
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return _resume_after(ctx, damage, ("trainable.safetensors",))


@case("--resume, latest trainable.safetensors empty")
def _(ctx: Ctx):
    return _resume_after(ctx, lambda p: p.write_bytes(b""), ("trainable.safetensors",))


@case("--resume, latest trainable.safetensors one byte flipped")
def _(ctx: Ctx):
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40
        path.write_bytes(bytes(data))

    return _resume_after(ctx, damage, ("trainable.safetensors",))


@case("--resume, latest optimizer.pt truncated")
def _(ctx: Ctx):
    def damage(path: Path) -> None:
        optimizer = path.parent / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])

    return _resume_after(ctx, damage, ("optimizer.pt",))


@case("--resume, latest trainer_state.json garbage")
def _(ctx: Ctx):
    return _resume_after(ctx, lambda p: (p.parent / "trainer_state.json").write_text("{oops"), ("trainer_state.json",))


@case("--resume after a power cut tore the last metrics.jsonl line")
def _(ctx: Ctx):
    ctx.trained(train={"output_dir": str(ctx.root / "ref")})
    recipe = ctx.trained()
    with (ctx.root / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"event": "train", "st')
    (ctx.root / "run" / "final").rename(ctx.root / "final.bak")
    result = ctx.run("train", str(recipe), "--resume")
    if result.returncode != 0:
        return judge(result, ("metrics.jsonl",))
    same = digest_tree(ctx.root / "run" / "final" / "trainable.safetensors") == digest_tree(
        ctx.root / "ref" / "final" / "trainable.safetensors"
    )
    return ("ok" if same else "silent"), f"resumed, final weights bitwise {'equal' if same else 'DIFFERENT'}"


@case("failed --resume keeps recipe.yaml")
def _(ctx: Ctx):
    recipe = ctx.trained()
    saved = (ctx.root / "run" / "recipe.yaml").read_text()
    for checkpoint in (ctx.root / "run" / "checkpoints").glob("step-*"):
        (checkpoint / "trainable.safetensors").write_bytes(b"")
    result = ctx.run("train", str(recipe), "--resume", "--override", "train.max_steps=5")
    lost = (ctx.root / "run" / "recipe.yaml").read_text() != saved
    return judge(result, ("checkpoint",), lost=lost)


@case("SIGKILL while writing a checkpoint, then --resume")
def _(ctx: Ctx):
    ctx.trained(train={"output_dir": str(ctx.root / "ref")})
    recipe = ctx.recipe()
    killed = ctx.run("train", str(recipe), fault=("kill", "adapter_config.json", 2))
    if killed.returncode != -9:
        return "silent", f"the kill did not happen (exit {killed.returncode})"
    latest = _latest(ctx).name
    result = ctx.run("train", str(recipe), "--resume")
    if result.returncode != 0:
        return judge(result, ("checkpoint",))
    same = digest_tree(ctx.root / "run" / "final" / "trainable.safetensors") == digest_tree(
        ctx.root / "ref" / "final" / "trainable.safetensors"
    )
    return ("ok" if same and latest == "step-000001" else "silent"), f"latest after kill {latest}, bitwise {same}"


@case("SIGKILL during --overwrite before the first checkpoint")
def _(ctx: Ctx):
    recipe = ctx.trained()
    before = digest_tree(ctx.root / "run" / "final")
    ctx.run("train", str(recipe), "--overwrite", fault=("kill", "adapter_config.json", 1))
    hidden = [p for p in (ctx.root / "run").rglob("final") if p.is_dir()]
    kept = any(digest_tree(p) == before for p in hidden)
    return ("ok", "the old run's final/ survives") if kept else ("data lost", "old final/ gone")


@case("disk full (ENOSPC) while writing a checkpoint")
def _(ctx: Ctx):
    recipe = ctx.recipe()
    result = ctx.run("train", str(recipe), fault=("enospc", "trainer_state.json", 2))
    staging = [p.name for p in (ctx.root / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    outcome, detail = judge(result, ("space",))
    if outcome == "clear" and staging:
        return "silent", f"left {staging}"
    return outcome, detail


@case("read-only disk (EROFS) for train.output_dir")
def _(ctx: Ctx):
    result = ctx.run("train", str(ctx.recipe()), fault=("erofs", str(ctx.root / "run"), 1))
    return judge(result, ("read-only", "run"))


@case("no permission (EACCES) in train.output_dir")
def _(ctx: Ctx):
    (ctx.root / "run").mkdir()
    result = ctx.run("train", str(ctx.recipe()), fault=("eacces", str(ctx.root / "run") + "/", 1))
    return judge(result, ("permission", "run"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(REPO), help="folder holding the orthoft package to test")
    parser.add_argument("--only", nargs="*", help="case names (substrings) to run")
    parser.add_argument("--json", help="write the outcomes here")
    args = parser.parse_args()
    results = {}
    for name, fn in CASES.items():
        if args.only and not any(s in name for s in args.only):
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="orthoft-fault-") as tmp:
            try:
                outcome, detail = fn(Ctx(Path(tmp), Path(args.code)))
            except Exception as err:  # a broken case must not hide the others
                outcome, detail = "harness error", f"{type(err).__name__}: {err}"[:300]
        results[name] = {
            "outcome": outcome,
            "detail": " ".join(detail.split()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{outcome:10s} | {name} | {results[name]['detail']}", flush=True)
    counts: dict[str, int] = {}
    for item in results.values():
        counts[item["outcome"]] = counts.get(item["outcome"], 0) + 1
    print(json.dumps(counts))
    if args.json:
        Path(args.json).write_text(json.dumps({"code": args.code, "cases": results, "counts": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
