"""A saved adapter folder, checked before PEFT loads it, and PEFT's load errors turned into messages.

``PeftModel.from_pretrained`` reads ``adapter_config.json`` and ``adapter_model.safetensors`` deep
inside PEFT, where a corrupt file surfaces as a bare ``JSONDecodeError``, a ``KeyError`` of the
PEFT type, a Rust ``SafetensorError`` or a hub lookup error that names no file, and a base that
does not match as a ``RuntimeError`` listing every mismatching tensor. ``check_adapter_folder``
reads what PEFT will read (the JSON and the safetensors header, not the tensors) and names the bad
file and the fix; ``adapter_load_errors`` converts what only loading can find (shapes).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft import mapping
from safetensors import SafetensorError, safe_open

from ..adapters import REGISTERED  # importing the package registers every orthoft method with PEFT

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
# where an intact copy of a run's adapter usually is
ANOTHER_COPY = "use another copy of the adapter (a run keeps one per checkpoint: RUN/checkpoints/step-N/adapter)"


def _named_adapters(folder: Path) -> list[str]:
    """Subfolders holding an adapter (``save_pretrained`` writes non-default adapters there)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / ADAPTER_CONFIG).is_file())


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``folder``; a missing, corrupt or unknown-method file raises with the fix."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        where = "does not exist" if not folder.exists() else "holds no " + ADAPTER_CONFIG
        inside = _named_adapters(folder)
        hint = f" It holds adapters in the subfolders {inside}: pass one of those." if inside else ""
        raise FileNotFoundError(
            f"adapter folder {folder} {where}.{hint} Fix: pass the folder written by save_pretrained "
            "(a run's RUN/final/adapter or RUN/checkpoints/step-N/adapter)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is corrupt (not valid JSON: {err}). Fix: {ANOTHER_COPY}.") from err
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise ValueError(f"{config_file} records no peft_type, so it is no PEFT adapter config. Fix: {ANOTHER_COPY}.")
    peft_type = str(config["peft_type"])
    if peft_type not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{config_file}: peft_type {peft_type!r} is neither an orthoft method {sorted(REGISTERED)} nor a PEFT "
            "one. Fix: load it with the orthoft version (or plugin) that wrote it, or correct peft_type."
        )
    return config


def check_adapter_weights(folder: str | Path) -> Path:
    """The weights file of ``folder``; a missing, empty or truncated one raises naming the file and the fix."""
    folder = Path(folder)
    weights = folder / SAFETENSORS_WEIGHTS
    if not weights.is_file():
        if (folder / PICKLE_WEIGHTS).is_file():
            return folder / PICKLE_WEIGHTS
        raise FileNotFoundError(
            f"{folder} has {ADAPTER_CONFIG} but no weights ({SAFETENSORS_WEIGHTS}). Fix: {ANOTHER_COPY}."
        )
    if weights.stat().st_size == 0:
        raise ValueError(f"{weights} is empty (0 bytes; an interrupted copy or a full disk?). Fix: {ANOTHER_COPY}.")
    try:
        with safe_open(str(weights), framework="pt") as handle:  # reads and bounds-checks the header only
            names = list(handle.keys())
    except SafetensorError as err:
        raise ValueError(
            f"{weights} is corrupt or truncated ({weights.stat().st_size} bytes; safetensors: {err}). "
            f"Fix: {ANOTHER_COPY}."
        ) from err
    if not names:
        raise ValueError(f"{weights} holds no tensors. Fix: {ANOTHER_COPY}.")
    return weights


def check_adapter_folder(folder: str | Path) -> dict[str, Any]:
    """Everything PEFT will read from ``folder``, checked; returns its adapter config."""
    config = read_adapter_config(folder)
    check_adapter_weights(folder)
    return config


_SHAPE = r"(torch\.Size\(\[[^\]]*\]\)|\([^)]*\)|\[[^\]]*\])"
_SIZE_MISMATCH = re.compile(
    rf"size mismatch for ([^:]+): copying a param with shape {_SHAPE} from checkpoint, "
    rf"the shape in current model is {_SHAPE}"
)


@contextlib.contextmanager
def adapter_load_errors(
    adapter: str | Path, base: str | None, recorded_base: str | None = None, fix: str | None = None
) -> Iterator[None]:
    """Turn PEFT's errors while loading ``adapter`` onto ``base`` into one message naming both and the fix.

    ``fix``: what to do about a base of the wrong shape (default: load it onto the model it was trained on).
    """
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        match = _SIZE_MISMATCH.search(text)
        if match is None:
            raise  # not a shape mismatch: a bug, keep its traceback
        count = text.count("size mismatch for")
        recorded = f" (its {ADAPTER_CONFIG} records base {recorded_base!r})" if recorded_base else ""
        fix = fix or f"load it onto the model it was trained on{recorded}"
        raise ValueError(
            f"adapter {adapter} does not fit the base model {base}: {count} tensor(s) differ in shape, first "
            f"{match.group(1)} (adapter {match.group(2)}, model {match.group(3)}). Fix: {fix}."
        ) from err
    except SafetensorError as err:
        raise ValueError(f"{adapter}: cannot read its weights ({err}). Fix: {ANOTHER_COPY}.") from err


__all__ = [
    "ADAPTER_CONFIG",
    "PICKLE_WEIGHTS",
    "SAFETENSORS_WEIGHTS",
    "adapter_load_errors",
    "check_adapter_folder",
    "check_adapter_weights",
    "read_adapter_config",
]
