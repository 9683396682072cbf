"""End-to-end training runs on tiny models: exact resume after a kill, 2-process DDP, outputs of a run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_recipes import CAUSAL, CLASSIFICATION, REPO, run_cli, subprocess_env, write_recipe


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "trainable.safetensors"))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = write_recipe(CAUSAL, tmp_path / "full.yaml", train={"output_dir": str(full_dir)})
    run_cli(["train", str(full)])

    # killed right after step 5: steps 5 is lost, the latest checkpoint is step 4
    killed = write_recipe(CAUSAL, tmp_path / "killed.yaml", train={"output_dir": str(killed_dir)})
    command = [sys.executable, str(REPO / "tests" / "scripts" / "kill_after_step.py"), "5", "train", str(killed)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL, not a clean exit
    checkpoints = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]  # keep_checkpoints=2
    assert not (killed_dir / "final").exists()

    # without --resume an existing run is refused, not clobbered
    refused = run_cli(["train", str(killed)], check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    run_cli(["train", str(killed), "--resume"])
    expected, resumed = _final_weights(full_dir), _final_weights(killed_dir)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name  # bitwise
    assert any((expected[n] != 0).any() for n in expected)  # it did train

    # the log replays the lost step once: same losses, one record per step
    train_full = [r for r in _records(full_dir) if r["event"] == "train"]
    train_resumed = [r for r in _records(killed_dir) if r["event"] == "train"]
    assert [r["step"] for r in train_resumed] == list(range(1, 9))
    assert [r["loss"] for r in train_resumed] == [r["loss"] for r in train_full]
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["before"]["perplexity"] > summary["after"]["perplexity"]
    assert (killed_dir / "curves.png").stat().st_size > 0


@pytest.mark.skipif(not shutil.which("torchrun") and not (REPO / ".venv/bin/torchrun").exists(), reason="no torchrun")
def test_torchrun_two_processes_keep_identical_adapters(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    recipe = write_recipe(CAUSAL, tmp_path / "ddp.yaml", train={"output_dir": str(ddp_dir), "save_every": 0})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "orthoft.cli", "train", str(recipe)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["processes"] == 2
    # each rank hashed its own final adapter; both must be the same tensors
    digests = summary["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert summary["rank_max_abs_diff"] == 0.0

    # 2 processes x batch 4 see the same global batches as 1 process x batch 8 (equal-length blocks):
    # the averaged gradients, hence the weights, agree up to rounding. The reference also recomputes
    # activations (gradient checkpointing), which must not change the result either.
    single = write_recipe(
        CAUSAL,
        tmp_path / "single.yaml",
        train={"output_dir": str(single_dir), "save_every": 0, "batch_size": 8, "gradient_checkpointing": True},
    )
    run_cli(["train", str(single)])
    ddp_weights, single_weights = _final_weights(ddp_dir), _final_weights(single_dir)
    for name in ddp_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=1e-5, rtol=1e-4)


def test_classification_run_writes_everything_and_evaluates(tmp_path, capsys):
    from orthoft.cli import main
    from orthoft.training import load_recipe
    from orthoft.training.loop import train

    run_dir = tmp_path / "cls"
    recipe = load_recipe(write_recipe(CLASSIFICATION, tmp_path / "cls.yaml", train={"output_dir": str(run_dir)}))
    summary = train(recipe)
    assert {"accuracy", "f1", "examples"} <= summary["after"].keys()
    assert summary["test"]["examples"] == 32 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert summary["trainable_parameters"] < summary["total_parameters"]
    for name in ("metrics.jsonl", "curves.png", "summary.json", "orthogonality.json", "recipe.yaml"):
        assert (run_dir / name).is_file(), name
    checkpoint = run_dir / "checkpoints" / "step-000004"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "adapter",
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_rank0.pt",
        "trainer_state.json",
        "MANIFEST.json",
        "COMPLETE",
    }
    # the classifier head is trained in full and saved with the adapter
    assert any("classifier" in name for name in _final_weights(run_dir))

    # `orthoft eval RUN_DIR` reloads the adapter onto the base and reproduces the run's numbers
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    report = json.loads((run_dir / "final" / "eval_test.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert report["orthogonality"]["summary"]["layers"] > 0
    assert "orthogonality:" in capsys.readouterr().out


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    from orthoft.training.rundir import RunFolder

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite to start over"):
        RunFolder(tmp_path, is_main=True).claim(resume=False, overwrite=False)
    assert (tmp_path / "metrics.jsonl").is_file()  # a refusal touches nothing
    folder = RunFolder(tmp_path, is_main=True)
    folder.claim(resume=False, overwrite=True)
    assert not (tmp_path / "metrics.jsonl").exists()  # set aside, not deleted: a failed start puts it back
    assert (folder.aside / "metrics.jsonl").is_file()
    folder.roll_back()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # back, and no hidden folder left
    folder = RunFolder(tmp_path, is_main=True)
    folder.claim(resume=False, overwrite=True)
    folder.commit()  # the new run has a checkpoint: the old files go
    assert list(tmp_path.iterdir()) == []


def test_batch_plan_is_a_function_of_position():
    from orthoft.training.data import BatchPlan

    plan = BatchPlan(num_examples=10, batch_size=2, world_size=2, seed=3)
    assert plan.per_epoch == 2  # 10 // 4: the incomplete last global batch is dropped
    first_epoch = [plan.indices(k, r) for k in range(2) for r in range(2)]
    flat = [i for batch in first_epoch for i in batch]
    assert len(set(flat)) == 8  # no example twice within an epoch, across ranks
    fresh = BatchPlan(num_examples=10, batch_size=2, world_size=2, seed=3)
    assert fresh.indices(5, 1) == plan.indices(5, 1)  # jumping ahead gives the same batch
    assert plan.indices(2, 0) != plan.indices(0, 0) or plan.indices(3, 0) != plan.indices(1, 0)  # epochs reshuffle
