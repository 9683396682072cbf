"""Examples for the training loop: tokenized once, in memory, with a deterministic batch order.

Three kinds of data:

* plain text (``hamlet``, ``text_file``, a ``file`` that is not a row file, ``hf``/``file`` rows
  with a text field): tokenized as one stream, cut into equal blocks of ``block_size`` tokens; the
  LAST ``held_out_fraction`` of the blocks is the evaluation set, so no evaluated text was trained
  on (not even overlapping windows).
* labelled text (``rotten_tomatoes``, ``hf``/``file`` rows with a label field): one example per
  row, truncated.
* instructions (``hf``/``file`` rows with ``prompt_template``/``response_template``): the loss
  covers only the response tokens.

Local files (``source: file``, or just ``path: my.jsonl``) are read by ``orthoft.io.datafiles``:
``.jsonl``/``.json``/``.csv``/``.tsv`` rows, anything else plain text.

The batch order is a pure function of (seed, epoch, position), see :class:`BatchPlan`: that is what
makes ``--resume`` exact without saving a data loader's state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io.batches import IGNORE_INDEX
from ..io.datafiles import ROW_SUFFIXES, read_rows
from .recipe import DataSection, RecipeError

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Tokenized splits. Each example is a dict with ``input_ids`` (list of int) and ``labels``
    (a list of int per token for language modelling, one int for classification)."""

    kind: str  # "lm" or "classification"
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    test: list[dict[str, Any]] | None = None
    description: str = ""


def build_task_data(section: DataSection, tokenizer: Any, task: str, seed: int) -> TaskData:
    """Load and tokenize the recipe's data for ``task`` (``causal_lm`` / ``sequence_classification``)."""
    if section.source == "hamlet":
        from orthoft.defaults import hamlet_text

        data = _text_blocks(hamlet_text(), section, tokenizer, "Hamlet (embedded)")
    elif section.source == "text_file":
        path = Path(section.path or "")
        if not path.is_file():
            raise RecipeError(f"data.path: text file {path} does not exist.")
        data = _text_blocks(path.read_text(encoding="utf-8"), section, tokenizer, str(path))
    elif section.source == "file" or (section.source == "hf" and Path(section.path or "").is_file()):
        data = _file_data(section, tokenizer, task, seed)  # hf cannot read one local file offline
    elif section.source == "rotten_tomatoes":
        from orthoft.defaults import rotten_tomatoes

        splits = rotten_tomatoes(seed)
        data = TaskData(
            "classification",
            train=_classification(splits["train"], section, tokenizer),
            eval=_classification(splits["validation"], section, tokenizer),
            test=_classification(splits["test"], section, tokenizer),
            description="Rotten Tomatoes (embedded, fixed seeded split)",
        )
    else:
        data = _hf_data(section, tokenizer, task, seed)
    expected = "lm" if task == "causal_lm" else "classification"
    if data.kind != expected:
        raise RecipeError(f"data: source {section.source!r} gives {data.kind} examples but model.task is {task!r}.")
    data.train = data.train[: section.max_train_examples] if section.max_train_examples else data.train
    data.eval = data.eval[: section.max_eval_examples] if section.max_eval_examples else data.eval
    if data.test is not None and section.max_test_examples:
        data.test = data.test[: section.max_test_examples]
    if not data.train or not data.eval:
        raise RecipeError(
            f"data: {data.description} gave {len(data.train)} training and {len(data.eval)} evaluation examples; "
            "both must be non-empty (lower data.block_size or raise the max_*_examples limits)."
        )
    return data


def _text_blocks(text: str, section: DataSection, tokenizer: Any, description: str) -> TaskData:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long text: no length warning
    size = section.block_size
    blocks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
    if len(blocks) < 2:
        raise RecipeError(f"data: {description} has {len(ids)} tokens, fewer than two blocks of {size}.")
    n_eval = max(1, round(len(blocks) * section.held_out_fraction))
    examples = [{"input_ids": b, "labels": list(b)} for b in blocks]
    return TaskData(
        "lm",
        train=examples[:-n_eval],
        eval=examples[-n_eval:],
        description=f"{description}: {len(ids)} tokens, {len(blocks)} blocks of {size}, last {n_eval} held out",
    )


def _classification(rows: list[dict[str, Any]], section: DataSection, tokenizer: Any) -> list[dict[str, Any]]:
    texts = [row[section.text_field] for row in rows]
    encoded = tokenizer(texts, truncation=True, max_length=section.max_length)["input_ids"]
    return [{"input_ids": ids, "labels": _label(row, section)} for ids, row in zip(encoded, rows)]


def _label(row: dict[str, Any], section: DataSection) -> int:
    value = row[section.label_field]
    try:
        return int(value)  # CSV gives "1"
    except (TypeError, ValueError) as err:
        raise RecipeError(
            f"data.label_field: {section.label_field!r} is {value!r} in row {row}; labels must be class numbers "
            "0..num_labels-1 (map label names to numbers in the file)."
        ) from err


def _require_fields(rows: list[dict[str, Any]], fields: list[str], description: str) -> None:
    """RecipeError naming a row that lacks one of ``fields`` (the recipe's text/label field names)."""
    for row in rows:
        missing = [name for name in fields if name not in row]
        if missing:
            raise RecipeError(
                f"data: a row of {description} has no field {missing[0]!r} (its fields: {sorted(row)}); set "
                "data.text_field / data.label_field to the data's column names."
            )


def _instruction(rows: list[dict[str, Any]], section: DataSection, tokenizer: Any) -> list[dict[str, Any]]:
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        try:
            prompt = section.prompt_template.format(**row)
            response = section.response_template.format(**row)
        except KeyError as err:
            raise RecipeError(
                f"data.prompt_template/response_template: field {err} is not in the dataset; its fields: {sorted(row)}."
            ) from err
        if section.use_chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        prompt_ids = tokenizer(prompt, add_special_tokens=not section.use_chat_template)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + response_ids)[: section.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: section.max_length]
        if any(label != IGNORE_INDEX for label in labels):  # a prompt longer than max_length teaches nothing
            examples.append({"input_ids": ids, "labels": labels})
    return examples


def _hf_data(section: DataSection, tokenizer: Any, task: str, seed: int) -> TaskData:
    try:
        import datasets
    except ImportError as err:
        raise RecipeError("data.source 'hf' needs the `datasets` package: pip install datasets.") from err
    try:
        loaded = datasets.load_dataset(section.path, section.hf_config)
    except Exception as err:  # offline, unknown id, gated: say which and how to fix
        raise RecipeError(
            f"data.path: could not load dataset {section.path!r} (config {section.hf_config!r}): {err}. "
            "It needs the Hugging Face hub (unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) or a local copy."
        ) from err
    if section.train_split not in loaded:
        raise RecipeError(f"data.train_split: {section.train_split!r} not in {list(loaded)}.")
    train_rows = loaded[section.train_split].shuffle(seed=seed)
    if section.max_train_examples:
        limit = section.max_train_examples + (0 if section.eval_split else section.eval_size)
        train_rows = train_rows.select(range(min(limit, len(train_rows))))
    if section.eval_split:
        eval_rows = list(loaded[section.eval_split])
        train_rows = list(train_rows)
    else:  # hold out the first eval_size shuffled rows
        rows = list(train_rows)
        eval_rows, train_rows = rows[: section.eval_size], rows[section.eval_size :]
    test_rows = list(loaded[section.test_split]) if section.test_split else None
    description = f"{section.path} ({section.hf_config or 'default'})"
    return _rows_data(train_rows, eval_rows, test_rows, section, tokenizer, task, description)


def _rows_data(
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    test_rows: list[dict[str, Any]] | None,
    section: DataSection,
    tokenizer: Any,
    task: str,
    description: str,
) -> TaskData:
    """Rows (from the hub or a local file) as labelled, instruction or plain-text examples."""
    if section.max_eval_examples:
        eval_rows = eval_rows[: section.max_eval_examples]
    if test_rows is not None and section.max_test_examples:
        test_rows = test_rows[: section.max_test_examples]
    all_rows = train_rows + eval_rows + (test_rows or [])
    if task == "sequence_classification":
        _require_fields(all_rows, [section.text_field, section.label_field], description)
        convert = _classification
        kind = "classification"
    elif section.prompt_template is not None:
        convert = _instruction
        kind = "lm"
    else:
        _require_fields(train_rows + eval_rows, [section.text_field], description)
        text = "\n\n".join(str(row[section.text_field]) for row in train_rows + eval_rows)
        return _text_blocks(text, section, tokenizer, description)
    return TaskData(
        kind,
        train=convert(train_rows, section, tokenizer),
        eval=convert(eval_rows, section, tokenizer),
        test=convert(test_rows, section, tokenizer) if test_rows is not None else None,
        description=description,
    )


def _file_data(section: DataSection, tokenizer: Any, task: str, seed: int) -> TaskData:
    """A local file: plain text cut into blocks, or rows (shuffled with ``seed``, ``eval_size`` held out)."""
    path = Path(section.path or "")
    if not path.is_file():
        raise RecipeError(f"data.path: file {path} does not exist (a relative path starts in {Path.cwd()}).")
    if path.suffix.lower() not in ROW_SUFFIXES:
        if task != "causal_lm":
            raise RecipeError(
                f"data.path: {path} is plain text, which has no labels; model.task {task!r} needs rows with "
                f"fields {section.text_field!r} and {section.label_field!r} (a .jsonl, .json or .csv file)."
            )
        return _text_blocks(path.read_text(encoding="utf-8"), section, tokenizer, str(path))
    splits = read_rows(path)
    rows = _split_rows(splits, section.train_split, "train_split", path)
    description = f"{path} ({len(rows)} {section.train_split} rows)"
    if task == "causal_lm" and section.prompt_template is None:  # one text stream, in file order
        tail = _split_rows(splits, section.eval_split, "eval_split", path) if section.eval_split else []
        return _rows_data(rows, tail, None, section, tokenizer, task, description)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[i] for i in order]
    if section.eval_split:
        eval_rows = _split_rows(splits, section.eval_split, "eval_split", path)
    elif section.eval_size >= len(rows):
        raise RecipeError(
            f"data.eval_size: holding out {section.eval_size} rows leaves none of the {len(rows)} rows of {path} for "
            f"training; set data.eval_size (e.g. {max(1, len(rows) // 10)}) or name a split in data.eval_split."
        )
    else:
        eval_rows, rows = rows[: section.eval_size], rows[section.eval_size :]
    test_rows = _split_rows(splits, section.test_split, "test_split", path) if section.test_split else None
    return _rows_data(rows, eval_rows, test_rows, section, tokenizer, task, description)


def _split_rows(splits: dict[str, list[dict[str, Any]]], name: str, key: str, path: Path) -> list[dict[str, Any]]:
    if name not in splits:
        raise RecipeError(
            f"data.{key}: {path} has no split {name!r}; its splits: {list(splits)} (a .json file may map split names "
            "to lists of rows; .jsonl and .csv files are one split, 'train')."
        )
    return list(splits[name])


class BatchPlan:
    """Which examples each process sees in each micro-batch, as a pure function of the position.

    Every epoch is a permutation seeded by ``seed + epoch``; it is cut into global micro-batches
    of ``batch_size * world_size`` (the incomplete last one is dropped so all processes take the
    same number of steps) and process ``rank`` takes slice ``rank`` of each. Micro-batch number
    ``k`` over the whole run is therefore known without iterating, which is what ``--resume`` needs.
    """

    def __init__(self, num_examples: int, batch_size: int, world_size: int, seed: int) -> None:
        self.num_examples, self.batch_size, self.world_size, self.seed = num_examples, batch_size, world_size, seed
        self.per_epoch = num_examples // (batch_size * world_size)
        if self.per_epoch == 0:
            raise RecipeError(
                f"train.batch_size: {batch_size} x {world_size} processes exceeds the {num_examples} training "
                "examples; lower the batch size or add data."
            )
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_batch: int, rank: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_examples, generator=generator)
        start = (position * self.world_size + rank) * self.batch_size
        return self._order[start : start + self.batch_size].tolist()

    def epoch_of(self, micro_batch: int) -> float:
        return micro_batch / self.per_epoch
