"""Padded batches of tokenized examples, shared by the training loop and evaluation.

An example is a dict with ``input_ids`` (a list of token ids) and ``labels``: a list of token ids
of the same length for language modelling (``IGNORE_INDEX`` where no loss is taken, e.g. on a
prompt), or one class id for classification.
"""

from __future__ import annotations

from typing import Any

import torch

# label of tokens that take no loss (the ``ignore_index`` default of torch's cross entropy)
IGNORE_INDEX = -100


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding for LM)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    if not token_labels:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
