"""Task metrics through ``evaluate`` (perplexity, accuracy, F1) and greedy samples.

Metrics are ``evaluate`` modules shipped as package data in
``orthoft/evaluation/metric_modules/<name>/<name>.py`` (so a wheel install carries them) and loaded
by path, because the hub copies are unreachable offline. Evaluation is sharded over processes when
``torch.distributed`` is initialized; every process gets the full result.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.batches import IGNORE_INDEX, collate

METRICS_DIR_ENV = "ORTHOFT_METRICS_DIR"


# ---- metric modules ---------------------------------------------------------------------------
def metrics_dir() -> Path:
    """Folder of the metric modules: ``$ORTHOFT_METRICS_DIR`` if set, else the package's ``metric_modules``."""
    if os.environ.get(METRICS_DIR_ENV):
        return Path(os.environ[METRICS_DIR_ENV])
    # evaluate.load wants a real folder; orthoft.evaluation is a regular package, so files() is one
    return Path(str(resources.files(__package__).joinpath("metric_modules")))


def load_metric(name: str) -> Any:
    """``evaluate.load`` of a shipped metric module by path."""
    import evaluate

    path = metrics_dir() / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in metrics_dir().glob("*") if (p / f"{p.name}.py").is_file())
        raise FileNotFoundError(
            f"Metric module {path / (name + '.py')} not found (available: {available}). orthoft ships its "
            f"metrics as package data in orthoft/evaluation/metric_modules; unset {METRICS_DIR_ENV} (or point it "
            "at a folder of evaluate modules named <name>/<name>.py), or reinstall orthoft if they are missing."
        )
    return evaluate.load(str(path))


# ---- distributed helpers (work without torch.distributed too) ----------------------------------
def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(items: list[Any]) -> list[Any]:
    """Concatenate ``items`` from every process (in rank order); a no-op in a single process."""
    rank, world = _world()
    if world == 1:
        return items
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


# ---- task metrics ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_examples(
    model: nn.Module,
    examples: list[dict[str, Any]],
    kind: str,
    metric_names: list[str],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` (sharded over processes when distributed; every process gets the result).

    ``kind`` is ``lm`` (per-token NLL -> perplexity) or ``classification`` (argmax -> accuracy, f1).
    """
    rank, world = _world()
    if max_batches is not None:
        examples = examples[: max_batches * batch_size * world]
    local = examples[rank::world]  # every example goes to exactly one process
    was_training = model.training
    model.eval()
    nll_sums: list[float] = []
    counts: list[int] = []
    predictions: list[int] = []
    references: list[int] = []
    for start in range(0, len(local), batch_size):
        batch = collate(local[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if kind == "lm":
            shifted = labels[:, 1:]
            losses = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="none"
            ).view(shifted.shape)
            valid = shifted != IGNORE_INDEX
            nll_sums += (losses * valid).sum(1).tolist()
            counts += valid.sum(1).tolist()
        else:
            predictions += logits.argmax(-1).tolist()
            references += labels.tolist()
    model.train(was_training)
    results: dict[str, float] = {}
    if kind == "lm":
        nll_sums, counts = _gather(nll_sums), _gather(counts)
        if "perplexity" in metric_names:
            out = load_metric("perplexity").compute(nll_sum=nll_sums, num_tokens=counts)
            results.update(perplexity=out["perplexity"], loss=out["mean_nll"], tokens=out["num_tokens"])
    else:
        predictions, references = _gather(predictions), _gather(references)
        for name in metric_names:
            results.update(load_metric(name).compute(predictions=predictions, references=references))
        results["examples"] = len(references)
    return results


@torch.no_grad()
def generate_sample(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, device: Any, chat: bool = False
) -> str:
    """Greedy continuation of ``prompt`` (deterministic, consumes no random numbers).

    ``chat``: wrap the prompt as a user turn with the tokenizer's chat template (instruct models).
    """
    was_training = model.training
    model.eval()
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(device)
    output = model.generate(
        input_ids=encoded["input_ids"],  # not token_type_ids: BERT-style tokenizers add them, decoders reject them
        attention_mask=encoded["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
