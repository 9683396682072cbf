"""F1 score as an ``evaluate`` module shipped with orthoft (the hub copy is unreachable offline).

Load it with ``orthoft.evaluation.load_metric("f1")`` (``evaluate.load`` of this folder).
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Harmonic mean of precision and recall: binary for one positive label, or averaged over labels."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    pos_label (int): the positive class for average="binary" (default 1).
    average (str): "binary" (default), "macro" (unweighted mean over labels), "micro" (global counts,
        equal to accuracy for single-label data) or "weighted" (mean weighted by label support).
Returns:
    f1 (float); 0.0 when the positive class is never predicted nor present.
"""


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, pos_label: int = 1, average: str = "binary") -> dict[str, float]:
        pairs = list(zip(predictions, references))
        if not pairs:
            raise ValueError("f1: no predictions given; the evaluation split is empty.")

        def counts(label: int) -> tuple[int, int, int]:
            tp = sum(p == label and r == label for p, r in pairs)
            fp = sum(p == label and r != label for p, r in pairs)
            fn = sum(p != label and r == label for p, r in pairs)
            return tp, fp, fn

        labels = sorted({label for pair in pairs for label in pair})
        if average == "binary":
            return {"f1": _f1(*counts(pos_label))}
        if average == "micro":
            totals = [sum(c) for c in zip(*(counts(label) for label in labels))]
            return {"f1": _f1(*totals)}
        if average in ("macro", "weighted"):
            scores = [_f1(*counts(label)) for label in labels]
            if average == "macro":
                return {"f1": sum(scores) / len(scores)}
            support = [sum(r == label for _, r in pairs) for label in labels]
            return {"f1": sum(s * n for s, n in zip(scores, support)) / sum(support)}
        raise ValueError(f"f1: average={average!r} is not one of 'binary', 'micro', 'macro', 'weighted'.")
