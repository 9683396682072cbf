"""Evaluation of trained adapters: task metrics and orthogonality diagnostics.

* ``orthoft.evaluation.metrics``: perplexity, accuracy and F1 through the shipped ``evaluate``
  modules (package data in ``orthoft/evaluation/metric_modules``), sharded over processes; greedy samples.
* ``orthoft.evaluation.orthogonality``: per-layer diagnostics (orthogonality error, rotation
  angles, relative weight change) read from each layer's declared ``map_kind``.

This package knows nothing of training or recipes: the ``orthoft eval`` command
(``orthoft/cli/eval.py``) loads the run and calls these functions.
"""

from .metrics import METRICS_DIR_ENV, evaluate_examples, generate_sample, load_metric, metrics_dir
from .orthogonality import format_orthogonality, format_values, orthogonality_report

__all__ = [
    "METRICS_DIR_ENV",
    "evaluate_examples",
    "format_orthogonality",
    "format_values",
    "generate_sample",
    "load_metric",
    "metrics_dir",
    "orthogonality_report",
]
