"""Shared pieces of ``eval/gpu_check.py``: the run's budget and device, random-init Llama models, table helpers."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the device machine runs a plain copy of the tree, orthoft not installed
    sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from orthoft.adapters import REGISTERED  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()  # the device tool returns only the output's tail: keep it tables
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_TARGETS = ["q_proj", "v_proj", "down_proj"]
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
MIB = 2**20


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Run:
    out_dir: Path
    dry_run: bool
    device: str
    budget: Budget
    results: dict[str, Any] = field(default_factory=dict)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Training autocast: bf16 on CUDA; the CPU dry run trains in float32."""
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


# ---- shared helpers -----------------------------------------------------------------------------


def relative_max(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| (as ``export_merged`` reports ``relative_max``)."""
    reference = reference.float()
    return float((actual.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    # train mode (no dropout in these models): bitsandbytes repacks 4-bit CPU weights at eval forwards
    model.train()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float().cpu()


def free_memory(run: Run) -> None:
    gc.collect()
    if run.device == "cuda":
        torch.cuda.empty_cache()


def save_random_llama(folder: Path, dtype: torch.dtype, device: str, **config: Any) -> Path:
    """A random-init Llama (seed 0) saved to ``folder``: from_pretrained can then quantize it."""
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.to(dtype).save_pretrained(folder)
    del model
    return folder


def load_llama(folder: Path, kind: str, device: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """``kind``: "fp32"/"bf16" dense, or "nf4" (double quantization) / "int8" bitsandbytes."""
    if kind in ("fp32", "bf16"):
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    if kind == "nf4":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=compute_dtype, device_map={"": device}
    )
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def orthoft_configs() -> dict[str, type]:
    """Every method registered with PEFT (the list tests/test_quantized.py runs too), by config class name."""
    return {config_cls.__name__: config_cls for config_cls, _ in sorted(REGISTERED.values(), key=str)}


def fmt(value: Any, spec: str = ".2e") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    return format(value, spec) if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
