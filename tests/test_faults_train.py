"""`orthoft train` never loses a user's run or folder, and every failure is one line (issue 11, training side).

Tiny Llama/BERT models from config (tests/tiny_recipes.py), 2-4 steps. Most runs are in-process
through ``orthoft.cli.main`` (fast, and faults are injected by monkeypatching); the kills run in a
subprocess through tests/scripts/inject_fault.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthoft.cli import main
from orthoft.io.schema import RecipeError
from orthoft.training.checkpoint import MANIFEST, latest_checkpoint, verify_checkpoint
from orthoft.training.recipe import load_recipe, recipe_from_dict
from orthoft.training.rundir import check_output_paths
from orthoft.training.runlog import MetricsLog
from tests.tiny_recipes import CAUSAL, CLASSIFICATION, REPO, subprocess_env, write_recipe

SMALL = {
    "data": {**CAUSAL["data"], "max_train_examples": 24, "max_eval_examples": 8},
    "train": {"max_steps": 4, "save_every": 1, "eval_every": 0, "warmup_steps": 0, "keep_checkpoints": 2},
    "eval": {"eval_before": False, "orthogonality": False},
}


def tiny(tmp_path: Path, name: str = "r.yaml", **sections: dict) -> Path:
    """A 4-step causal recipe writing to tmp_path/run (sections merged one level deep)."""
    merged = {key: dict(value) for key, value in SMALL.items()}
    merged["train"]["output_dir"] = str(tmp_path / "run")
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return write_recipe(CAUSAL, tmp_path / name, **merged)


def cli(capsys, *args: str) -> tuple[int, str]:
    """``orthoft ARGS`` in this process: (exit status, the ``orthoft train:`` line or the whole stderr)."""
    capsys.readouterr()
    status = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("orthoft train:")]
    return status, lines[-1] if lines else err


def digest(path: Path) -> str:
    """Names and bytes of every file under ``path`` (hidden entries aside)."""
    sha = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if not any(part.startswith(".") for part in rel.parts):
            sha.update(str(rel).encode() + file.read_bytes())
    return sha.hexdigest()


def hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob(".*"))


@pytest.fixture
def warnings_seen():
    """Messages the training logger emits (it does not propagate, so caplog cannot see them)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("orthoft.train")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an unbroken 4-step run (in this process: the same threads as the resumed runs)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    assert main(["train", str(tiny(tmp_path))]) == 0
    return load_file(str(tmp_path / "run" / "final" / "trainable.safetensors"))


def assert_bitwise(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    resumed = load_file(str(run_dir / "final" / "trainable.safetensors"))
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


# ---- one-line errors for what a user can get wrong -------------------------------------------
def _recipe_cases(tmp: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(name, arguments after `train`, fragments the one-line message must contain)."""
    (tmp / "folder.yaml").mkdir()
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00model: {}\n")
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    (tmp / "base").mkdir()
    (tmp / "base" / "config.json").write_text("{not json")
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "text.txt").write_text("To be, or not to be, that is the question. " * 400)
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp / "notes").mkdir()
    (tmp / "notes" / "mine.txt").write_text("the user's own file")
    good = str(tiny(tmp))
    run = str(tmp / "run")

    def recipe(name: str, **sections: dict) -> str:
        return str(tiny(tmp, f"{name}.yaml", **sections))

    text_data = {"source": "text_file", "path": str(corpus / "text.txt")}
    export = {"enabled": True}
    return [
        ("missing recipe", [str(tmp / "missing.yaml")], ("missing.yaml", "does not exist")),
        ("recipe is a folder", [str(tmp / "folder.yaml")], ("folder.yaml", "is a folder")),
        ("recipe not UTF-8", [str(tmp / "binary.yaml")], ("binary.yaml", "UTF-8")),
        ("recipe not YAML", [str(tmp / "bad.yaml")], ("bad.yaml", "not valid YAML")),
        ("override without =", [good, "--override", "train.max_steps"], ("train.max_steps", "SECTION.KEY=VALUE")),
        ("override unknown key", [good, "--override", "train.max_step=3"], ("'max_step'", "'max_steps'")),
        ("unknown adapter", [recipe("m", adapter={"method": "loraa"})], ("'loraa'", "Registered methods")),
        ("block_size 0", [recipe("b0", adapter={"block_size": 0})], ("block_size", "> 0, got 0", "Fix")),
        ("lr nan", [good, "--override", "optim.lr=.nan"], ("optim.lr", "finite")),
        ("lr negative", [good, "--override", "optim.lr=-1"], ("optim.lr", "> 0")),
        ("max_grad_norm inf", [good, "--override", "train.max_grad_norm=.inf"], ("max_grad_norm", "finite")),
        ("max_steps 0", [good, "--override", "train.max_steps=0"], ("max_steps", "> 0")),
        ("unknown optimizer", [good, "--override", "optim.name=adamz"], ("'adamz'", "valid")),
        ("check: target typo", [recipe("t", adapter={"target_modules": ["q_prj"]}), "--check"], ("'q_prj'", "q_proj")),
        (
            "train: one target matches nothing",
            [recipe("t2", adapter={"target_modules": ["q_proj", "v_prj"]})],
            ("'v_prj'", "target_modules"),
        ),
        ("check: block size 24", [recipe("b24", adapter={"block_size": 24}), "--check"], ("block size 24", "64")),
        ("check: data missing", [recipe("d", data={"source": "text_file", "path": "nope.txt"}), "--check"], ("nope",)),
        (
            "data not UTF-8",
            [recipe("d3", data={"source": "text_file", "path": str(tmp / "binary.txt")})],
            ("data.path", "binary.txt", "UTF-8"),
        ),
        (
            "check: data not UTF-8",
            [recipe("d4", data={"source": "text_file", "path": str(tmp / "binary.txt")}), "--check"],
            ("data.path", "binary.txt", "UTF-8"),
        ),
        ("data missing", [recipe("d2", data={"source": "text_file", "path": str(tmp / "nope.txt")})], ("nope.txt",)),
        ("tokenizer missing", [recipe("tok", model={"tokenizer": str(tmp / "no-tok")})], ("model.tokenizer", "no-tok")),
        (
            "model folder missing",
            [recipe("mod", model={"name_or_path": str(tmp / "no-model"), "from_config": None})],
            ("model.name_or_path", "no-model"),
        ),
        (
            "model config.json corrupt",
            [recipe("cfg", model={"name_or_path": str(tmp / "base"), "from_config": None})],
            ("model.name_or_path", "base"),
        ),
        (
            "from_config model_type unknown",
            [recipe("mt", model={"from_config": {"model_type": "llamma", "hidden_size": 64}})],
            ("model.from_config", "llamma"),
        ),
        ("output_dir is cwd", [recipe("o1", train={"output_dir": "."})], ("train.output_dir", "working directory")),
        ("output_dir parent of cwd", [recipe("o2", train={"output_dir": ".."})], ("train.output_dir", "parent")),
        (
            "output_dir holds the data",
            [recipe("o3", data=text_data, train={"output_dir": str(corpus)})],
            ("train.output_dir", "data.path"),
        ),
        ("export to cwd", [recipe("e1", export={**export, "output_dir": "."})], ("export.output_dir", "working")),
        (
            "export to the run",
            [recipe("e2", export={**export, "output_dir": run})],
            ("export.output_dir", "run folder"),
        ),
        (
            "export to a parent of the run",
            [recipe("e3", export={**export, "output_dir": str(tmp)})],
            ("export.output_dir", "working directory"),
        ),
        (
            "export to the data folder",
            [recipe("e4", data=text_data, export={**export, "output_dir": str(corpus)})],
            ("export.output_dir", "data.path"),
        ),
        (
            "export into final/",
            [recipe("e5", export={**export, "output_dir": f"{run}/final"})],
            ("export.output_dir", "final"),
        ),
        (
            "export onto a user folder",
            [recipe("e6", export={**export, "output_dir": str(tmp / "notes")})],
            ("export.output_dir", "not a model export"),
        ),
        ("resume with no run", [good, "--resume"], ("--resume", "no complete checkpoint")),
    ]


def test_every_train_error_is_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    sub = tmp_path / "work"
    sub.mkdir()
    monkeypatch.chdir(sub)  # the working directory of the cwd cases; the recipes live one level up
    results = {}
    for name, args, fragments in _recipe_cases(tmp_path):
        status, message = cli(capsys, "train", *args)
        results[name] = (status, message)
        assert status == 2, (name, message)
        assert message.startswith("orthoft train:") and "\n" not in message, (name, message)
        for fragment in fragments:
            assert fragment.lower() in message.lower(), (name, fragment, message)
    assert len(results) >= 30
    assert list(sub.iterdir()) == []  # nothing was written into the working directory
    assert not (tmp_path / "run").exists()  # and no refused run left a folder behind


def test_unreadable_recipe_is_one_line(tmp_path, capsys, monkeypatch):
    recipe = tiny(tmp_path)

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    status, message = cli(capsys, "train", str(recipe))
    assert status == 2 and "cannot read the recipe" in message and "r.yaml" in message


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(RecipeError, match="block_size"):
        main(["--debug", "train", str(tiny(tmp_path, adapter={"block_size": 0}))])


def test_block_size_zero_is_refused_not_defaulted():
    from orthoft.adapters.boft import BOFTConfig
    from orthoft.adapters.oft import OFTConfig

    for config_cls in (OFTConfig, BOFTConfig):
        for field in ("block_size", "num_blocks"):
            with pytest.raises(ValueError, match=f"{field} must be > 0, got 0. Fix"):
                config_cls(**{field: 0})
    assert OFTConfig().block_size == 32 and BOFTConfig().block_size == 8  # unset still means the default
    with pytest.raises(RecipeError, match="adapter.*block_size must be > 0, got 0. Fix"):
        recipe_from_dict({**CAUSAL, "adapter": {**CAUSAL["adapter"], "block_size": 0}}, source="my.yaml")


def test_check_builds_the_model_without_weights(tmp_path, capsys, monkeypatch):
    import accelerate

    entered = []
    real = accelerate.init_empty_weights

    def spy(*args, **kwargs):
        entered.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(accelerate, "init_empty_weights", spy)
    for base, name in ((CAUSAL, "c.yaml"), (CLASSIFICATION, "s.yaml")):
        recipe = write_recipe(base, tmp_path / name, train={"output_dir": str(tmp_path / f"run-{name}")})
        status = main(["train", str(recipe), "--check"])
        out = capsys.readouterr().out
        assert status == 0 and out.rstrip().endswith(f"{recipe}: valid")
        assert "built without weights" in out and "trainable parameters" in out
    assert len(entered) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "s.yaml"]  # --check writes nothing


# ---- never lose a run -------------------------------------------------------------------------
def test_resume_without_a_checkpoint_refuses_and_keeps_the_run(tmp_path, capsys):
    recipe = tiny(tmp_path, train={"save_every": 0, "max_steps": 2})
    assert main(["train", str(recipe)]) == 0
    before = digest(tmp_path / "run")
    status, message = cli(capsys, "train", str(recipe), "--resume", "--override", "train.max_steps=3")
    assert status == 2 and "no complete checkpoint" in message and "without --resume" in message
    assert digest(tmp_path / "run") == before  # final/, metrics and recipe.yaml untouched


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, capsys, monkeypatch):
    recipe = tiny(tmp_path, train={"max_steps": 2})
    assert main(["train", str(recipe)]) == 0
    before = digest(tmp_path / "run")

    # fails at start-up (data): the old run is back, nothing hidden is left
    bad = ["--override", "data.source=text_file", "--override", f"data.path={tmp_path / 'nope.txt'}"]
    status, message = cli(capsys, "train", str(recipe), "--overwrite", *bad)
    assert status == 2 and "nope.txt" in message
    assert digest(tmp_path / "run") == before and hidden(tmp_path / "run") == []

    # fails in the first step, before any checkpoint: the old run is back too
    from orthoft.training import loop

    def diverge(*args, **kwargs):
        raise ValueError("step 1: injected")

    monkeypatch.setattr(loop, "check_finite", diverge)
    status, message = cli(capsys, "train", str(recipe), "--overwrite")
    assert status == 2 and "injected" in message
    assert digest(tmp_path / "run") == before and hidden(tmp_path / "run") == []
    monkeypatch.undo()

    # succeeds: the old run's files are gone, the new run's are there, nothing hidden is left
    assert main(["train", str(recipe), "--overwrite", "--override", "train.max_steps=3"]) == 0
    assert hidden(tmp_path / "run") == []
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_failed_start_up_removes_only_what_it_created(tmp_path, capsys):
    nested = tmp_path / "a" / "b" / "run"
    bad = {"source": "text_file", "path": str(tmp_path / "nope.txt")}
    status, _ = cli(capsys, "train", str(tiny(tmp_path, data=bad, train={"output_dir": str(nested)})))
    assert status == 2 and not (tmp_path / "a").exists()  # every folder it created is gone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    status, _ = cli(capsys, "train", str(tiny(tmp_path, data=bad, train={"output_dir": str(mine)})))
    assert status == 2 and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # so the fixed recipe runs without --overwrite
    assert main(["train", str(tiny(tmp_path, train={"output_dir": str(mine), "max_steps": 1}))]) == 0


def test_output_paths_allow_resuming_from_the_saved_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    saved = write_recipe(CAUSAL, run / "recipe.yaml", train={"output_dir": str(run)})
    check_output_paths(load_recipe(saved))  # the run's own recipe.yaml given back to --resume
    other = write_recipe(CAUSAL, run / "my.yaml", train={"output_dir": str(run)})
    with pytest.raises(RecipeError, match="holds the recipe file"):
        check_output_paths(load_recipe(other))
    merged = write_recipe(CAUSAL, tmp_path / "m.yaml", export={"enabled": True, "output_dir": str(run / "exports")})
    check_output_paths(load_recipe(merged))  # a new folder inside the run is fine
    exported = tmp_path / "exports" / "m"
    exported.mkdir(parents=True)
    (exported / "config.json").write_text("{}")
    again = load_recipe(
        write_recipe(CAUSAL, tmp_path / "x.yaml", export={"enabled": True, "output_dir": str(exported)})
    )
    with pytest.raises(RecipeError, match="already holds an exported model. Fix: pass --overwrite"):
        check_output_paths(again)
    check_output_paths(again, replace=True)  # --overwrite or --resume: replaced when the run ends


# ---- checkpoints ------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor: the file still parses, the weights are wrong
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [_truncate, _flip, lambda p: p.write_bytes(b"")], ids=["truncated", "flipped", "empty"]
)
def test_resume_skips_a_damaged_latest_checkpoint_and_ends_bitwise(tmp_path, reference, warnings_seen, damage):
    recipe = tiny(tmp_path)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    latest = latest_checkpoint(run)
    assert latest.name == "step-000004" and verify_checkpoint(latest) is None
    assert set(json.loads((latest / MANIFEST).read_text())["files"]) >= {"trainable.safetensors", "optimizer.pt"}
    damage(latest / "trainable.safetensors")
    (run / "final").rename(tmp_path / "final.bak")  # as if the run had died after its last checkpoint
    saved_recipe = (run / "recipe.yaml").read_text()

    assert main(["train", str(recipe), "--resume"]) == 0
    assert any("step-000004" in w and "trainable.safetensors" in w for w in warnings_seen), warnings_seen
    assert_bitwise(run, reference)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]  # step 4 replayed once
    assert (run / "recipe.yaml").read_text() == saved_recipe


def test_a_failed_resume_names_the_files_and_keeps_recipe_yaml(tmp_path, capsys):
    recipe = tiny(tmp_path, train={"max_steps": 2})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    saved = (run / "recipe.yaml").read_text()
    for checkpoint in (run / "checkpoints").glob("step-*"):
        (checkpoint / "optimizer.pt").write_bytes(b"")
    status, message = cli(capsys, "train", str(recipe), "--resume", "--override", "train.max_steps=5")
    assert status == 2 and "no intact checkpoint" in message and "optimizer.pt" in message and "--overwrite" in message
    assert (run / "recipe.yaml").read_text() == saved


def test_a_checkpoint_without_manifest_that_fails_to_load_is_skipped(tmp_path, reference, warnings_seen):
    recipe = tiny(tmp_path)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    for checkpoint in (run / "checkpoints").glob("step-*"):
        (checkpoint / MANIFEST).unlink()  # as written before manifests existed
    (latest_checkpoint(run) / "trainer_state.json").write_text("{oops")
    (run / "final").rename(tmp_path / "final.bak")
    assert main(["train", str(recipe), "--resume"]) == 0
    assert any("trainer_state.json" in w for w in warnings_seen), warnings_seen
    assert_bitwise(run, reference)


def test_metrics_log_drops_a_torn_last_line_and_names_a_bad_one(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write({"event": "train", "step": 1})
    with log.path.open("a") as handle:
        handle.write('{"event": "train", "st')  # a power cut mid-append
    assert log.records() == [{"event": "train", "step": 1}]
    log.truncate_after(1)
    assert log.path.read_text() == '{"event": "train", "step": 1}\n'
    log.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        log.records()


# ---- non-finite training ----------------------------------------------------------------------
def _nan_gradient_at(monkeypatch, step: int, parameter: str) -> None:
    """Make the gradient of ``parameter`` NaN during optimizer step ``step`` (1-based)."""
    from orthoft.training.loop import TrainingRun

    build = TrainingRun._build_model_and_data

    def build_then_hook(self) -> None:
        build(self)
        param = dict(self.unwrapped.named_parameters())[parameter]
        param.register_hook(lambda grad: grad * float("nan") if self.state.step == step - 1 else grad)

    monkeypatch.setattr(TrainingRun, "_build_model_and_data", build_then_hook)


def test_nan_gradient_stops_the_run_naming_step_and_layer(tmp_path, capsys, monkeypatch):
    target = "base_model.model.model.layers.1.mlp.down_proj.orthoft_oft_Q.default"
    _nan_gradient_at(monkeypatch, 3, target)
    status, message = cli(capsys, "train", str(tiny(tmp_path)))
    assert status == 2, message
    assert "step 3" in message and target in message and "step-000002" in message and "optim.lr" in message
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-000002" and not (run / "final").exists()
    weights = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_loss_names_the_first_module_with_a_non_finite_output(tmp_path, capsys, monkeypatch):
    from orthoft.training.loop import TrainingRun

    build = TrainingRun._build_model_and_data

    def build_then_poison(self) -> None:
        build(self)
        module = dict(self.unwrapped.named_modules())["base_model.model.model.layers.1.mlp"]
        module.register_forward_hook(lambda _m, _i, out: out * float("nan") if self.state.step >= 1 else out)

    monkeypatch.setattr(TrainingRun, "_build_model_and_data", build_then_poison)
    status, message = cli(capsys, "train", str(tiny(tmp_path, train={"save_every": 0})))
    assert status == 2 and "step 2" in message and "loss is nan" in message
    assert "output of base_model.model.model.layers.1.mlp" in message, message
    assert not (tmp_path / "run").exists()  # no checkpoint, no final: nothing of value, nothing left


def test_a_nan_adapter_is_never_written_as_final(tmp_path, capsys, monkeypatch):
    from orthoft.training import loop

    update = loop.optimizer_update

    def update_then_poison(accelerator, optimizer, scheduler, params, max_grad_norm):
        norm = update(accelerator, optimizer, scheduler, params, max_grad_norm)
        with torch.no_grad():
            params[-1].fill_(float("inf"))  # as a buggy optimizer would
        return norm

    monkeypatch.setattr(loop, "optimizer_update", update_then_poison)
    status, message = cli(capsys, "train", str(tiny(tmp_path, train={"save_every": 0, "max_steps": 1})))
    assert status == 2 and "not finite" in message and "final/ was not written" in message
    assert not (tmp_path / "run" / "final").exists()


# ---- the disk ---------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    calls = {"optimizer": 0}

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            calls["optimizer"] += 1
            if calls["optimizer"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    status, message = cli(capsys, "train", str(tiny(tmp_path)))
    assert status == 2 and "disk is full" in message and "optimizer.pt" in message and "Fix:" in message
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-000001" and verify_checkpoint(latest_checkpoint(run)) is None
    assert hidden(run) == []  # the half-written checkpoint is gone
    monkeypatch.undo()
    assert main(["train", str(tiny(tmp_path)), "--resume"]) == 0


@pytest.mark.parametrize(
    ("code", "fragment"), [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.ENOSPC, "full")]
)
def test_unwritable_output_dir_is_one_line(tmp_path, capsys, monkeypatch, code, fragment):
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "run")):
            raise (PermissionError if code == errno.EACCES else OSError)(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    status, message = cli(capsys, "train", str(tiny(tmp_path)))
    assert status == 2 and fragment in message.lower() and str(tmp_path / "run") in message


def test_unwritable_recipe_yaml_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from orthoft.io import files

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(files, "write_bytes_atomic", denied)
    status, message = cli(capsys, "train", str(tiny(tmp_path)))
    assert status == 2 and "recipe.yaml" in message and "permission denied" in message.lower()
    assert not (tmp_path / "run").exists()


def test_created_folders_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["train", str(tiny(tmp_path, train={"max_steps": 1}))]) == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for folder in (
        run,
        run / "checkpoints",
        run / "checkpoints" / "step-000001",
        run / "final",
        run / "final" / "adapter",
    ):
        assert folder.stat().st_mode & 0o777 == 0o750, folder
    for file in (run / "recipe.yaml", run / "summary.json", run / "final" / "trainable.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o640, file


# ---- kills (subprocess) -----------------------------------------------------------------------
def _inject(fault: str, match: str, count: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tests" / "scripts" / "inject_fault.py"), fault, match, str(count), "--"]
    return subprocess.run(
        [*command, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orthoft.cli", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigkill_while_writing_a_checkpoint_then_resume(tmp_path):
    reference = tiny(tmp_path, "ref.yaml", train={"output_dir": str(tmp_path / "ref")})
    assert _cli("train", str(reference)).returncode == 0
    recipe = tiny(tmp_path)
    killed = _inject("kill", "adapter_config.json", 3, "train", str(recipe))  # amid step 3's checkpoint
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-000002" and verify_checkpoint(latest_checkpoint(run)) is None
    assert (run / "checkpoints" / ".staging-step-000003").is_dir()  # what the kill left
    resumed = _cli("train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert hidden(run) == []
    assert_bitwise(run, load_file(str(tmp_path / "ref" / "final" / "trainable.safetensors")))


def test_sigkill_during_overwrite_before_the_first_checkpoint_restores_the_old_run(tmp_path, capsys):
    recipe = tiny(tmp_path, train={"max_steps": 2})
    assert main(["train", str(recipe)]) == 0
    before = digest(tmp_path / "run")
    killed = _inject("kill", "adapter_config.json", 1, "train", str(recipe), "--overwrite")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len([p for p in (tmp_path / "run").iterdir() if p.name.startswith(".run.previous-run-")]) == 1
    # the next command in the folder puts the old run back; without a flag it is then refused, as before
    status, message = cli(capsys, "train", str(recipe))
    assert status == 2 and "already holds a run" in message
    assert digest(tmp_path / "run") == before and hidden(tmp_path / "run") == []


def test_inject_fault_wrapper_reports_enospc_as_one_line(tmp_path):
    result = _inject("enospc", "trainer_state.json", 1, "train", str(tiny(tmp_path, train={"max_steps": 1})))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("orthoft train:")][-1]
    assert "disk is full" in line
