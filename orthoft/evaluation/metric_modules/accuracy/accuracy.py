"""Accuracy as an ``evaluate`` module shipped with orthoft (the hub copy is unreachable offline).

Load it with ``orthoft.evaluation.load_metric("accuracy")`` (``evaluate.load`` of this folder).
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference label."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) or the count of correct predictions.
    sample_weight (list of float, optional): per-example weights.
Returns:
    accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("accuracy: no predictions given; the evaluation split is empty.")
        weights = sample_weight if sample_weight is not None else [1.0] * len(predictions)
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        return {"accuracy": float(correct / sum(weights)) if normalize else float(correct)}
