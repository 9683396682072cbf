"""What an export wrote and how far the exported model is from the adapter model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

EXPORT_INFO_FILE = "orthoft_export.json"


@dataclasses.dataclass
class ExportReport:
    """What ``export_merged`` wrote and how far the exported model is from the adapter model.

    Each error entry holds ``max_abs``, ``mean_abs``, ``relative_max`` (max_abs / max |reference|)
    and ``relative_mean`` (mean_abs / mean |reference|) over the probe batch's logits.

    * ``merge_error``: dense float32 merge vs the adapter model (the merge itself).
    * ``export_error``: the model as written (``dtype``, requantized if asked) vs the adapter model.
    * ``requantization_error``: requantized export vs the dense float32 merge (what requantizing
      adds); None without ``quantization``.
    """

    out_dir: Path
    base: str
    adapters: list[str]
    methods: dict[str, str]
    dtype: str
    quantization: dict[str, Any] | None
    merge_error: dict[str, float]
    export_error: dict[str, float]
    requantization_error: dict[str, float] | None
    probe: str
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def format_error(error: dict[str, float] | None) -> str:
    """One line for an error entry of :class:`ExportReport` (``n/a`` for None)."""
    if error is None:
        return "n/a"
    return (
        f"max {error['max_abs']:.3e} (relative {error['relative_max']:.3e}), "
        f"mean {error['mean_abs']:.3e} (relative {error['relative_mean']:.3e})"
    )


__all__ = ["EXPORT_INFO_FILE", "ExportReport", "format_error"]
