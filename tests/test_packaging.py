"""The package carries what it needs: shipped recipes found by name, metrics as package data, a
console script that answers ``--help``/``--version`` without torch, and a wheel that trains,
evaluates and exports outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from orthoft.io.recipes import find_recipe, recipe_info, recipes_dir, shipped_recipes
from orthoft.io.schema import RecipeError
from tests.tiny_recipes import CAUSAL, REPO, TINY_LLAMA

PACKAGE = REPO / "orthoft"


def test_recipes_ship_in_the_package_and_the_checkout_folder_points_there():
    root = recipes_dir()
    assert root.resolve() == (PACKAGE / "recipes").resolve()
    files = sorted(p for p in root.rglob("*.yaml"))
    shipped = shipped_recipes()
    assert len(shipped) == len(files) > 20  # names (file stems) are unique across subfolders
    assert {"smollm2-qoft", "minilm-sentiment-oft", "qwen2.5-7b-metamath-qoft", "diffusion-digits-oft"} <= set(shipped)
    assert (REPO / "recipes").resolve() == root.resolve()  # recipes/ of the checkout is a pointer, not a copy
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"recipes/*.yaml", "recipes/*/*.yaml"' in pyproject and '"metric_modules/*/*.py"' in pyproject


def test_find_recipe_by_name_or_path(tmp_path, monkeypatch):
    root = recipes_dir()
    smollm2 = root / "smollm2-qoft.yaml"
    monkeypatch.chdir(tmp_path)  # outside the checkout: recipes/... is not a relative path here
    for name in ("smollm2-qoft", "smollm2-qoft.yaml", "recipes/smollm2-qoft.yaml"):
        assert find_recipe(name) == smollm2, name
    gpu = root / "gpu" / "qwen2.5-7b-metamath-qoft.yaml"
    assert find_recipe("gpu/qwen2.5-7b-metamath-qoft") == gpu == find_recipe("qwen2.5-7b-metamath-qoft")
    own = tmp_path / "smollm2-qoft.yaml"  # a file of that name wins over the shipped one
    own.write_text("model: {}")
    assert find_recipe("smollm2-qoft.yaml") == Path("smollm2-qoft.yaml")
    assert find_recipe(own) == own
    with pytest.raises(RecipeError, match=r"does not exist, .*Did you mean smollm2-qoft\?.*`orthoft recipes`"):
        find_recipe("smollm2-qof")
    with pytest.raises(RecipeError, match="does not exist"):
        find_recipe("elsewhere/smollm2-qoft.yaml")  # a folder that is not recipes/ does not name a shipped one


def test_orthoft_recipes_lists_and_prints(capsys):
    from orthoft.cli import main

    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name, path in shipped_recipes().items():
        info = recipe_info(name, path)
        assert f"{name}\n    run: {info.command} {name}\n" in listing
        assert info.description and info.description.split()[0] in listing
    assert "run: orthoft train smollm2-qoft" in listing
    assert "run: orthoft diffusion concepts diffusion-digits-concepts" in listing
    assert main(["recipes", "minilm-sentiment-hra"]) == 0
    assert capsys.readouterr().out == (recipes_dir() / "minilm-sentiment-hra.yaml").read_text()
    assert main(["recipes", "minilm-sentiment-hra", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(recipes_dir() / "minilm-sentiment-hra.yaml")
    assert main(["recipes", "nope"]) == 2
    assert "orthoft recipes: Recipe file nope does not exist" in capsys.readouterr().err


def test_train_finds_a_shipped_recipe_by_name(tmp_path, monkeypatch, capsys):
    from orthoft.cli import main
    from orthoft.training.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    assert main(["train", "smollm2-qoft", "--check"]) == 0
    assert "smollm2-qoft: valid" in capsys.readouterr().out
    recipe = load_recipe("minilm-sentiment-oft", ["train.max_steps=30"])
    assert recipe.source_path == str(recipes_dir() / "minilm-sentiment-oft.yaml")
    assert recipe.output_dir() == Path("runs/minilm-sentiment-oft") and recipe.train.max_steps == 30


def test_metrics_ship_in_the_package(monkeypatch):
    from orthoft.evaluation.metrics import METRICS_DIR_ENV, load_metric, metrics_dir

    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
    assert metrics_dir().resolve() == (PACKAGE / "evaluation" / "metric_modules").resolve()
    assert load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1])["accuracy"] == 0.75
    with pytest.raises(FileNotFoundError, match=r"available: \['accuracy', 'f1', 'perplexity'\].*package data"):
        load_metric("bleu")


def _launcher_run(*args: str) -> subprocess.CompletedProcess:
    """``orthoft ARGS`` through the console script's module, reporting which heavy modules it imported."""
    code = textwrap.dedent(
        f"""
        import sys, orthoft_cli
        try:
            code = orthoft_cli.main({list(args)!r})
        except SystemExit as stop:
            code = stop.code
        print("imported:", sorted(m for m in ("torch", "peft", "transformers", "orthoft") if m in sys.modules))
        sys.exit(code)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_console_script_answers_help_and_version_without_importing_orthoft():
    from orthoft.cli.commands import COMMANDS
    from orthoft.version import __version__

    version = _launcher_run("--version")
    assert version.returncode == 0 and version.stdout.splitlines() == [f"orthoft {__version__}", "imported: []"]
    help_text = _launcher_run("--help")
    assert help_text.returncode == 0 and help_text.stdout.endswith("imported: []\n")
    for name, (_, text) in COMMANDS.items():
        assert name in help_text.stdout and text.split()[0] in help_text.stdout
    usage = _launcher_run("tran")
    assert usage.returncode == 2 and "invalid choice: 'tran'" in usage.stderr
    assert 'orthoft = "orthoft_cli:main"' in (REPO / "pyproject.toml").read_text()


def test_console_script_hands_commands_to_the_package(capsys):
    import orthoft_cli

    assert orthoft_cli.main(["recipes", "smollm2-qoft", "--path"]) == 0  # runs orthoft.cli.main
    assert capsys.readouterr().out.strip() == str(recipes_dir() / "smollm2-qoft.yaml")
    assert orthoft_cli.main(["recipes", "nope"]) == 2  # its one-line user errors too
    assert capsys.readouterr().err.startswith("orthoft recipes: ")


def _tiny_base(folder: Path) -> Path:
    """A tiny random Llama saved as a model folder, with the MiniLM tokenizer (what a user's base would be)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orthoft.defaults import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


WHEEL_DRIVER = """
import json, sys
import orthoft
from orthoft.cli import main
print(json.dumps({"orthoft_file": orthoft.__file__}))
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(f"orthoft {' '.join(argv)} exited {code}")
"""


@pytest.mark.slow  # 50-70 s on a shared 2-core machine: a wheel build and a fresh process that imports torch
def test_wheel_installed_outside_the_repo_trains_evaluates_and_exports(tmp_path):
    """Build the wheel from a copy of the sources, install it into a bare folder, run it from elsewhere."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "orthoft_cli.py"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "orthoft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("orthoft-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True, timeout=300
    )

    work = tmp_path / "work"  # the user's folder: no orthoft checkout, no recipes/ or eval/ here
    work.mkdir()
    base = _tiny_base(work / "tiny-base")
    rows = [{"text": f"line {i}: to be, or not to be, that is the question {i % 7}"} for i in range(60)]
    (work / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name_or_path": str(base)},
        "adapter": CAUSAL["adapter"],
        "data": {"path": "lines.jsonl", "block_size": 16},
        "train": {"output_dir": "run", "max_steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 0},
        "optim": {"name": "adamw", "lr": 0.05},
        "eval": {"eval_before": False},
    }
    (work / "mine.yaml").write_text(yaml.safe_dump(recipe))
    commands = [
        ["recipes", "minilm-sentiment-oft", "--path"],
        ["train", "minilm-sentiment-oft", "--check"],
        ["train", "mine.yaml"],
        ["eval", "run"],
        ["export", "--adapter", "run/final/adapter", "--out", "merged"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ORTHOFT_METRICS_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", WHEEL_DRIVER, json.dumps(commands)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert Path(json.loads(lines[0])["orthoft_file"]).is_relative_to(site)  # the wheel's orthoft, not the repo's
    assert lines[1] == str(site / "orthoft" / "recipes" / "minilm-sentiment-oft.yaml")
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["perplexity"] > 1  # metrics loaded from the wheel
    assert json.loads((work / "run" / "final" / "eval_eval.json").read_text())["metrics"]["perplexity"] > 1
    assert (work / "merged" / "config.json").is_file() and list((work / "merged").glob("*.safetensors"))

    launcher = subprocess.run(
        [str(site / "bin" / "orthoft"), "--version"], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    assert launcher.returncode == 0 and launcher.stdout.startswith("orthoft ")
