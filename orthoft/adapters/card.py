"""The model card (README.md) of an adapter folder: what it is, that it needs orthoft, how to load it.

``OrthoConfig.save_pretrained`` calls :func:`write_adapter_card` for every folder it writes an
``adapter_config.json`` to: ``PeftModel.save_pretrained`` (after PEFT wrote or updated its own
card there), Trainer checkpoints, transformers' ``save_pretrained`` of a model with adapters. The
card says that loading needs ``pip install orthoft`` and ``import orthoft``, because PEFT and
transformers look the adapter type up in a table only ``import orthoft`` fills: without it they
fail with a bare ``KeyError: 'ORTHOFT_OFT'`` before any orthoft code can run.

The orthoft part sits between markers and is rewritten on every save; what PEFT or a user wrote
around it stays. PEFT's blank template ("Model Card for Model ID", "More Information Needed") is
replaced. A ``training`` block (data, hyper-parameters, metrics), when a training loop passes one,
has markers of its own and survives later saves that do not pass it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from peft import __version__ as peft_version
from peft.config import PeftConfig

from ..version import __version__

CARD_NAME = "README.md"
ADAPTER_BLOCK = ("<!-- orthoft:adapter:start -->", "<!-- orthoft:adapter:end -->")
TRAINING_BLOCK = ("<!-- orthoft:training:start -->", "<!-- orthoft:training:end -->")
PEFT_TEMPLATE_MARKERS = ("# Model Card for Model ID", "[More Information Needed]")
LOADING_NOTE = (
    "Needs `pip install orthoft` and `import orthoft` before PEFT or transformers can load this adapter: "
    "the import registers its peft_type (ORTHOFT_*) with PEFT; without it loading fails with KeyError."
)
# the PEFT auto class that loads an adapter of each task_type (AutoPeftModel reads the base class from the config)
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}
# PeftConfig bookkeeping the card shows elsewhere or not at all
_NOT_OPTIONS = {"base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode", "auto_mapping"}


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def config_options(config: PeftConfig) -> dict[str, Any]:
    """The config's method options as JSON-ready data: no PEFT bookkeeping, no unset values, no loading note."""
    data = config.to_dict()
    skipped = _NOT_OPTIONS | {"requires", "peft_version"}
    return {key: _jsonable(value) for key, value in sorted(data.items()) if key not in skipped and value is not None}


def adapter_block(config: PeftConfig) -> str:
    """The orthoft part of the card for ``config``, markers included."""
    method = getattr(config, "method", "") or "?"
    label = type(config).__name__.removesuffix("Config")
    base = config.base_model_name_or_path or "(not recorded)"
    peft_type = str(config.peft_type)
    auto_class = AUTO_CLASSES.get(getattr(config.task_type, "value", config.task_type), "AutoPeftModel")
    options = "\n".join(
        f"- `{key}`: `{json.dumps(value, default=str)}`" for key, value in config_options(config).items()
    )
    lines = [
        ADAPTER_BLOCK[0],
        f"# {label} adapter for {base} (orthoft)",
        "",
        f"An [orthoft](https://pypi.org/project/orthoft/) adapter: PEFT type `{peft_type}`, method `{method}`.",
        "PEFT and transformers load it only after `import orthoft`, which registers orthoft's methods with PEFT;",
        f"without it they fail with `KeyError: '{peft_type}'`.",
        "",
        "## Load it",
        "",
        "```bash",
        "pip install orthoft",
        "```",
        "",
        "```python",
        f"import orthoft  # registers {peft_type} with PEFT: needed before any load below",
        f"from peft import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("path/to/this/folder")',
        "# or PeftModel.from_pretrained(base_model, folder), or base_model.load_adapter(folder)",
        "```",
        "",
        "A plain model that needs neither orthoft nor PEFT: `orthoft export --adapter <this folder> --out <dir>` "
        "(or `orthoft.export_merged`), which merges at full precision and measures the merge.",
        "",
        "## Adapter",
        "",
        f"- Base model: `{base}`",
        f"- Method: {label} (orthoft `{method}`, PEFT type `{peft_type}`)",
        f"- orthoft {__version__}, PEFT {peft_version}",
        "",
        "Config (also in `adapter_config.json`):",
        "",
        options or "- (defaults)",
        ADAPTER_BLOCK[1],
    ]
    return "\n".join(lines)


def training_block(training: Mapping[str, Any]) -> str:
    """The card's training part: ``training`` maps a heading (``data``, ``hyperparameters``, ``metrics``, ...)
    to a value (text, or a mapping shown as a list)."""
    lines = [TRAINING_BLOCK[0], "## Training", ""]
    for heading, value in training.items():
        lines.append(f"### {str(heading).replace('_', ' ').capitalize()}")
        lines.append("")
        if isinstance(value, Mapping):
            lines += [f"- `{key}`: {json.dumps(_jsonable(item), default=str)}" for key, item in value.items()]
        else:
            lines.append(str(value))
        lines.append("")
    lines.append(TRAINING_BLOCK[1])
    return "\n".join(lines)


def _replace_block(text: str, markers: tuple[str, str], block: str | None) -> tuple[str, bool]:
    """``text`` with the part between ``markers`` replaced by ``block`` (kept when None); whether it was there."""
    start, end = text.find(markers[0]), text.find(markers[1])
    if start < 0 or end < start:
        return text, False
    if block is None:
        return text, True
    return text[:start] + block + text[end + len(markers[1]) :], True


def _merge_card_text(text: str, adapter: str, training: str | None) -> str:
    text, had_adapter = _replace_block(text, ADAPTER_BLOCK, adapter)
    text, had_training = _replace_block(text, TRAINING_BLOCK, training)
    if not had_adapter:
        if all(marker in text for marker in PEFT_TEMPLATE_MARKERS):
            # PEFT's blank template: keep only its framework versions
            versions = text[text.find("### Framework versions") :] if "### Framework versions" in text else ""
            text = f"\n{adapter}\n\n{versions}"
        else:
            text = f"\n{adapter}\n\n{text.lstrip()}"
    if training is not None and not had_training:
        end = text.find(ADAPTER_BLOCK[1]) + len(ADAPTER_BLOCK[1])
        text = f"{text[:end]}\n\n{training}{text[end:]}"
    return text


def write_adapter_card(directory: str | Path, config: PeftConfig, training: Mapping[str, Any] | None = None) -> Path:
    """Write or update ``directory/README.md`` for the adapter ``config`` describes; returns its path.

    ``training``: optional data, hyper-parameters and metrics of the run, e.g.
    ``{"data": "hamlet (embedded)", "hyperparameters": {...}, "metrics": {"perplexity": 12.3}}``;
    omitted, a training part written before is kept.
    """
    path = Path(directory) / CARD_NAME
    card = ModelCard(path.read_text(encoding="utf-8")) if path.exists() else ModelCard("---\nlibrary_name: peft\n---\n")
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in ("orthoft", f"orthoft-{getattr(config, 'method', '')}") if t not in tags]
    card.data.library_name = card.data.library_name or "peft"
    block = adapter_block(config)
    card.text = _merge_card_text(card.text, block, training_block(training) if training is not None else None)
    path.write_text(str(card), encoding="utf-8")
    return path
