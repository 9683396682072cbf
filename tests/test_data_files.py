"""Local data files as recipe data (JSONL, JSON, CSV/TSV, plain text), TensorBoard through
Accelerate's trackers, and the run's title on ``curves.png``."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from orthoft.io.datafiles import read_rows
from orthoft.io.schema import RecipeError
from orthoft.training.data import build_task_data
from orthoft.training.models import load_tokenizer
from orthoft.training.recipe import TRACKERS, recipe_from_dict
from tests.tiny_recipes import CAUSAL, CLASSIFICATION

ROWS = [{"text": f"this film is {'great' if i % 2 else 'awful'}, take {i}", "label": i % 2} for i in range(40)]


def _write(folder: Path, name: str, rows: list[dict] = ROWS) -> Path:
    """``rows`` as the file type ``name``'s suffix says."""
    path = folder / name
    if path.suffix in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps({"train": rows[:30], "validation": rows[30:]}), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        path.write_text("\n".join(row["text"] for row in rows), encoding="utf-8")
    return path


def _recipe(base: dict, data: dict, **train):
    raw = copy.deepcopy(base)
    raw["data"] = data
    raw["train"].update(train)
    return recipe_from_dict(raw, source="test.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(recipe_from_dict(copy.deepcopy(CLASSIFICATION)).model)


def test_read_rows_of_every_row_format(tmp_path):
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        rows = read_rows(_write(tmp_path, name))
        assert list(rows) == ["train"] and len(rows["train"]) == 40, name
        assert rows["train"][3]["text"] == ROWS[3]["text"] and int(rows["train"][3]["label"]) == 1
    splits = read_rows(_write(tmp_path, "d.json"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 10}
    (tmp_path / "list.json").write_text(json.dumps(ROWS[:5]))
    assert read_rows(tmp_path / "list.json") == {"train": ROWS[:5]}
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 0}\n\n[1, 2]\n')
    with pytest.raises(RecipeError, match=r"bad.jsonl line 3: '\[1, 2\]' is not an object"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    with pytest.raises(RecipeError, match="broken.jsonl line 1 is not valid JSON"):
        read_rows(tmp_path / "broken.jsonl")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(RecipeError, match="a JSON data file is a list of objects"):
        read_rows(tmp_path / "scalar.json")


def test_source_follows_the_path(tmp_path):
    assert _recipe(CLASSIFICATION, {"path": "reviews.jsonl"}).data.source == "file"
    assert _recipe(CLASSIFICATION, {"path": "data/reviews.CSV"}).data.source == "file"
    assert _recipe(CAUSAL, {"path": "notes.txt"}).data.source == "file"
    assert _recipe(CAUSAL, {"path": "wikitext", "hf_config": "wikitext-2-raw-v1"}).data.source == "hf"
    no_suffix = tmp_path / "corpus"
    no_suffix.write_text("some text")
    assert _recipe(CAUSAL, {"path": str(no_suffix)}).data.source == "file"  # an existing file is a file
    assert _recipe(CAUSAL, {"source": "text_file", "path": "notes.jsonl"}).data.source == "text_file"
    with pytest.raises(RecipeError, match=r"data: set source \(one of .*'file'.*\) or path"):
        _recipe(CAUSAL, {"block_size": 8})


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.tsv"])
def test_classification_rows_from_files(tmp_path, monkeypatch, tokenizer, name):
    monkeypatch.chdir(tmp_path)  # relative paths start in the current folder
    _write(tmp_path, name)
    extra = {"eval_split": "validation"} if name.endswith(".json") else {"eval_size": 8}
    recipe = _recipe(CLASSIFICATION, {"path": name, "max_length": 16, **extra})
    data = build_task_data(recipe.data, tokenizer, recipe.model.task, seed=0)
    assert data.kind == "classification"
    assert (len(data.train), len(data.eval)) == ((30, 10) if name.endswith(".json") else (32, 8))
    texts = {tokenizer.decode(e["input_ids"], skip_special_tokens=True): e["labels"] for e in data.train + data.eval}
    assert len(texts) == 40  # every row once, train and eval disjoint
    assert texts[ROWS[7]["text"]] == 1 and texts[ROWS[8]["text"]] == 0  # labels kept, CSV strings converted
    again = build_task_data(recipe.data, tokenizer, recipe.model.task, seed=0)
    assert again.eval == data.eval  # the held-out rows are a function of the seed
    # a local file given to `source: hf` (the hub loader cannot read one offline) is read the same way
    as_hf = _recipe(CLASSIFICATION, {"source": "hf", "path": name, "max_length": 16, **extra})
    assert build_task_data(as_hf.data, tokenizer, "sequence_classification", seed=0).eval == data.eval


def test_causal_lm_from_text_and_rows(tmp_path, tokenizer):
    text = _write(tmp_path, "d.txt")
    data = build_task_data(_recipe(CAUSAL, {"path": str(text), "block_size": 8}).data, tokenizer, "causal_lm", 0)
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    assert data.kind == "lm" and all(len(e["input_ids"]) == 8 for e in data.train + data.eval)
    assert [t for e in data.train + data.eval for t in e["input_ids"]] == ids[: 8 * (len(ids) // 8)]
    rows = _write(tmp_path, "d.jsonl")
    from_rows = build_task_data(_recipe(CAUSAL, {"path": str(rows), "block_size": 8}).data, tokenizer, "causal_lm", 0)
    stream = tokenizer("\n\n".join(row["text"] for row in ROWS), add_special_tokens=False)["input_ids"]
    assert from_rows.train[0]["input_ids"] == stream[:8]  # the rows' text field, in file order, as one stream
    templates = {"prompt_template": "Review: {text}\nSentiment:", "response_template": " {label}", "eval_size": 4}
    instruct = _recipe(CAUSAL, {"path": str(rows), **templates})
    data = build_task_data(instruct.data, tokenizer, "causal_lm", 0)
    assert (len(data.train), len(data.eval)) == (36, 4)
    example = data.train[0]
    answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(answer).strip() in ("0", "1")  # the loss covers only the response


def test_file_data_errors_name_the_fix(tmp_path, tokenizer):
    rows = _write(tmp_path, "d.jsonl")
    cases = [
        (CLASSIFICATION, {"path": str(rows)}, "data.eval_size: holding out 500 rows leaves none of the 40 rows"),
        (CLASSIFICATION, {"path": str(_write(tmp_path, "d.txt"))}, "is plain text, which has no labels"),
        (CLASSIFICATION, {"path": str(rows), "text_field": "review", "eval_size": 4}, "no field 'review'"),
        (CLASSIFICATION, {"path": str(tmp_path / "missing.jsonl")}, "missing.jsonl does not exist"),
        (CLASSIFICATION, {"path": str(rows), "eval_split": "validation"}, "no split 'validation'; its splits"),
    ]
    for base, data, message in cases:
        recipe = _recipe(base, data)
        with pytest.raises(RecipeError, match=message):
            build_task_data(recipe.data, tokenizer, recipe.model.task, 0)
    named = _write(tmp_path, "named.csv", [{"text": "good", "label": "positive"}] * 10)
    recipe = _recipe(CLASSIFICATION, {"path": str(named), "eval_size": 2})
    with pytest.raises(RecipeError, match="labels must be class numbers"):
        build_task_data(recipe.data, tokenizer, recipe.model.task, 0)


def test_report_to_names_are_accelerates_and_checked():
    from accelerate.utils import LoggerType

    from orthoft.training.engine import make_accelerator

    assert set(TRACKERS) == {t.value for t in LoggerType}
    with pytest.raises(RecipeError, match="train.report_to: unknown tracker 'tensorbord'"):
        _recipe(CLASSIFICATION, dict(CLASSIFICATION["data"]), report_to=["tensorbord"])
    from accelerate.tracking import get_available_trackers

    missing = next((t.value for t in LoggerType if t.value != "all" and t not in get_available_trackers()), None)
    if missing is None:
        pytest.skip("every tracker Accelerate knows is installed")
    with pytest.raises(ValueError, match=f"tracker '{missing}' is not installed.*pip install {missing}"):
        make_accelerator("no", log_with=[missing], project_dir="unused")


def test_run_from_a_csv_file_reports_to_tensorboard_and_titles_its_curves(tmp_path, monkeypatch):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from orthoft.training.loop import train

    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "reviews.csv")
    run_dir = tmp_path / "run"
    recipe = _recipe(
        CLASSIFICATION,
        {"path": "reviews.csv", "eval_size": 8, "max_length": 16},
        output_dir=str(run_dir),
        max_steps=3,
        save_every=0,
        eval_every=2,
        report_to=["tensorboard"],
    )
    summary = train(recipe)
    assert summary["after"]["examples"] == 8

    tracker_dir = run_dir / "trackers" / "orthoft"  # Accelerate's TensorBoard run folder (the hparams in a subfolder)
    assert list(tracker_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    scalars = EventAccumulator(str(tracker_dir))
    scalars.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    logged = scalars.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train_records], rel=1e-6)
    assert [e.step for e in scalars.Scalars("eval/accuracy")] == [0, 2, 3]  # before, every 2 steps, after
    assert "train/lr" in scalars.Tags()["scalars"]

    title = Image.open(run_dir / "curves.png").text["Title"]
    for part in ("test: oft on tiny-bert", "data reviews.csv", "block_size=16", "adamw lr=0.01", "3 steps", "seed 0"):
        assert part in title, (part, title)
