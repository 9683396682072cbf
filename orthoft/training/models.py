"""Loading base models and tokenizers (embedded defaults, local folders, hub ids, 4/8-bit) and wrapping them.

The embedded shortcuts ``smollm2`` and ``minilm`` resolve through :mod:`orthoft.defaults`, so the
default recipes never touch the hub.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import orthoft.adapters  # noqa: F401  (registers the methods with PEFT)

from .. import defaults
from ..io.dtypes import resolve_dtype
from ..io.schema import AdapterSection, RecipeError, method_config_class
from .recipe import ModelSection

logger = logging.getLogger(__name__)

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def resolve_path(name_or_path: str) -> str:
    """``smollm2`` / ``minilm`` -> the embedded folders; anything else is returned unchanged."""
    shortcuts = {"smollm2": defaults.smollm2_path, "minilm": defaults.minilm_path}
    if name_or_path.lower() in shortcuts:
        return str(shortcuts[name_or_path.lower()]())
    return name_or_path


def load_tokenizer(section: ModelSection) -> Any:
    """The tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    source = section.tokenizer or section.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(source), trust_remote_code=section.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError(
                f"model.tokenizer: {source} has neither a pad nor an EOS token; set model.tokenizer to one that does."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    section: ModelSection, tokenizer: Any, device_map: Any = None, seed: int = 0
) -> tuple[nn.Module, torch.dtype]:
    """The frozen base model and the dtype its computations run in.

    ``device_map``: where quantized weights go (bitsandbytes places them while loading); unquantized
    models are loaded on CPU and moved by Accelerate.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_cls = AutoModelForCausalLM if section.task == "causal_lm" else AutoModelForSequenceClassification
    # auto: bfloat16 on a GPU with bf16 support, float16 on other GPUs, float32 on CPU
    compute_dtype = resolve_dtype(section.compute_dtype, "model.compute_dtype")
    task_kwargs: dict[str, Any] = {}
    if section.task == "sequence_classification":
        task_kwargs["num_labels"] = section.num_labels
    if section.from_config is not None:
        options = dict(section.from_config)
        options.setdefault("vocab_size", len(tokenizer))
        options.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(options.pop("model_type"), **options, **task_kwargs)
        torch.manual_seed(seed)  # random init is part of the run's seeded state
        model = auto_cls.from_config(config)
        return model.to(compute_dtype), compute_dtype

    kwargs: dict[str, Any] = {"trust_remote_code": section.trust_remote_code, **task_kwargs}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    if section.load_in_4bit or section.load_in_8bit:
        from transformers import BitsAndBytesConfig

        if section.load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=section.bnb_4bit_quant_type,
                bnb_4bit_compute_dtype=compute_dtype,
                bnb_4bit_use_double_quant=section.bnb_4bit_use_double_quant,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = device_map if device_map is not None else "cpu"
        kwargs["dtype"] = compute_dtype
    else:
        kwargs["dtype"] = compute_dtype
    # a classification head is new: seed it so every process (and every rerun) starts the same
    torch.manual_seed(seed)
    model = auto_cls.from_pretrained(resolve_path(section.name_or_path), **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, compute_dtype


def is_quantized(model: nn.Module) -> bool:
    """Whether bitsandbytes loaded ``model`` in 4 or 8 bit."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def adapter_config(section: AdapterSection, task: str, name_or_path: str) -> Any:
    """The method's config object from the recipe's adapter section."""
    config_cls = method_config_class(section.method)
    # record a loadable base: the embedded shortcuts become their folders (export and eval reload from it)
    base = resolve_path(name_or_path) if name_or_path.lower() in ("smollm2", "minilm") else name_or_path
    try:
        # a copy: PEFT extends lists such as modules_to_save in place, which would change the recipe
        options = copy.deepcopy(section.options)
        return config_cls(**options, task_type=TASK_TYPES[task], base_model_name_or_path=base)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"adapter: invalid options for {config_cls.__name__}: {err}") from err


def build_peft_model(
    base_model: nn.Module, adapter: AdapterSection, task: str, name_or_path: str, gradient_checkpointing: bool
) -> nn.Module:
    """Quantization prep, gradient checkpointing and the orthoft adapter on ``base_model``."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(base_model):
        # casts norms/embeddings to float32 and freezes the base; checkpointing is set below
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        # non-reentrant checkpointing needs no input grads and keeps RNG state for exact recompute
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base_model.config.use_cache = False
    model = get_peft_model(base_model, adapter_config(adapter, task, name_or_path))
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError(
            f"adapter: method {adapter.method!r} with options {adapter.options} made no parameter trainable; "
            "check adapter.target_modules against the model's module names."
        )
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def load_trained(
    recipe_model: ModelSection, adapter_dir: str | Path, device_map: Any = None, seed: int = 0
) -> tuple[nn.Module, Any]:
    """(peft model in eval mode, tokenizer) from a recipe's model section and a saved adapter folder."""
    from peft import PeftModel

    tokenizer = load_tokenizer(recipe_model)
    base, _ = load_base_model(recipe_model, tokenizer, device_map=device_map, seed=seed)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, tokenizer
