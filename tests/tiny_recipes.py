"""Tiny recipes for the training tests: models built from config, seconds per run on CPU."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}

# causal LM on Hamlet; the MiniLM tokenizer ships in a package (no conversion step, vocab 30k)
CAUSAL: dict[str, Any] = {
    "model": {"name_or_path": "tiny-llama", "tokenizer": "minilm", "from_config": TINY_LLAMA},
    "adapter": {"method": "oft", "target_modules": "all-linear", "block_size": 16},
    "data": {"source": "hamlet", "block_size": 32, "max_train_examples": 96, "max_eval_examples": 16},
    "train": {
        "max_steps": 8,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "save_every": 2,
        "eval_every": 4,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
    },
    "optim": {"name": "adamw", "lr": 0.05},
    "eval": {"generate_prompt": "HAMLET:", "max_new_tokens": 4},
}

CLASSIFICATION: dict[str, Any] = {
    "model": {
        "name_or_path": "tiny-bert",
        "tokenizer": "minilm",
        "task": "sequence_classification",
        "from_config": TINY_BERT,
    },
    "adapter": {
        "method": "oft",
        "target_modules": ["query", "key", "value", "dense"],
        "block_size": 16,
        "modules_to_save": ["classifier"],
    },
    "data": {
        "source": "rotten_tomatoes",
        "max_length": 32,
        "max_train_examples": 64,
        "max_eval_examples": 32,
        "max_test_examples": 32,
    },
    "train": {"max_steps": 4, "batch_size": 8, "save_every": 2},
    "optim": {"name": "adamw", "lr": 0.01},
}


def write_recipe(base: dict[str, Any], path: Path, **sections: dict[str, Any]) -> Path:
    """Write ``base`` with ``sections`` merged in (one level deep) to ``path``."""
    recipe = copy.deepcopy(base)
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # one thread per process: modest on shared CPUs, and the same reduction order in every run
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m orthoft.cli ARGS`` in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "orthoft.cli", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"orthoft {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result
