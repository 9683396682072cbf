"""Perplexity from per-sequence negative log-likelihoods, as an ``evaluate`` module shipped with orthoft.

Unlike the hub's ``perplexity`` (which downloads a model by id), this one takes what the training
loop already has: for each sequence, the summed token negative log-likelihood (nats) and the
number of predicted tokens. Perplexity is ``exp(sum nll / sum tokens)``: token-weighted, so
padding and uneven lengths do not bias it. Load it with ``orthoft.evaluation.load_metric("perplexity")``
(``evaluate.load`` of this folder).
"""

from __future__ import annotations

import math

import datasets
import evaluate

_DESCRIPTION = "exp of the mean per-token negative log-likelihood (natural log), weighted by tokens."
_INPUTS = """
Args:
    nll_sum (list of float): summed token negative log-likelihood of each sequence, in nats.
    num_tokens (list of int): number of predicted (non-ignored) tokens of each sequence.
Returns:
    perplexity (float), mean_nll (float, nats per token), num_tokens (int)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens) -> dict[str, float]:
        total_tokens = int(sum(num_tokens))
        if total_tokens <= 0:
            raise ValueError("perplexity: no predicted tokens; every label is ignored or the split is empty.")
        mean_nll = float(sum(nll_sum)) / total_tokens
        # overflow guard: a diverged model reports inf rather than raising
        perplexity = math.exp(mean_nll) if mean_nll < 700 else float("inf")
        return {"perplexity": perplexity, "mean_nll": mean_nll, "num_tokens": total_tokens}
