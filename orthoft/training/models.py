"""Loading base models and tokenizers (embedded defaults, local folders, hub ids, 4/8-bit) and wrapping them.

The embedded shortcuts ``smollm2`` and ``minilm`` resolve through :mod:`orthoft.defaults`, so the
default recipes never touch the hub.
"""

from __future__ import annotations

import copy
import errno
import logging
import re
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
# a disk that cannot be written is not a wrong model path: those errors pass through unchanged
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
ADAPTABLE = ("Linear", "Conv1D", "Conv2d", "Embedding", "Linear4bit", "Linear8bitLt")


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (transformers' messages run to many lines)."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300].rstrip(". ")


def loading_error(err: BaseException) -> bool:
    """Whether ``err`` is a model/tokenizer that cannot be found or read (not a full disk or a bug)."""
    if isinstance(err, OSError):
        return err.errno not in DISK_ERRNOS
    return isinstance(err, (ValueError, KeyError, defaults.MissingResourceError))


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
    key = "model.tokenizer" if section.tokenizer else "model.name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(source), trust_remote_code=section.trust_remote_code)
    except Exception as err:
        if not loading_error(err):
            raise
        raise RecipeError(
            f"{key}: cannot load a tokenizer from {source!r}: {first_line(err)}. Fix: set {key} to a folder with "
            "tokenizer files, an embedded model (smollm2, minilm), or a hub id (needs the network)."
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError(
                f"model.tokenizer: {source} has neither a pad nor an EOS token; set model.tokenizer to one that does."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def auto_model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def load_base_model(
    section: ModelSection, tokenizer: Any, device_map: Any = None, seed: int = 0
) -> tuple[nn.Module, torch.dtype]:
    """The frozen base model and the dtype its computations run in.

    ``device_map``: where quantized weights go (bitsandbytes places them while loading); unquantized
    models are loaded on CPU and moved by Accelerate.
    """
    auto_cls = auto_model_class(section.task)
    # auto: bfloat16 on a GPU with bf16 support, float16 on other GPUs, float32 on CPU
    compute_dtype = resolve_dtype(section.compute_dtype, "model.compute_dtype")
    task_kwargs = task_options(section)
    if section.from_config is not None:
        config = config_from_recipe(section, tokenizer)
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
    try:
        model = auto_cls.from_pretrained(resolve_path(section.name_or_path), **kwargs)
    except Exception as err:
        if not loading_error(err):
            raise
        raise RecipeError(
            f"model.name_or_path: cannot load a model from {section.name_or_path!r}: {first_line(err)}. Fix: set it "
            "to a model folder (config.json and weights), an embedded model (smollm2, minilm), or a hub id."
        ) from err
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, compute_dtype


def task_options(section: ModelSection) -> dict[str, Any]:
    return {"num_labels": section.num_labels} if section.task == "sequence_classification" else {}


def config_from_recipe(section: ModelSection, tokenizer: Any = None) -> Any:
    """The transformers config of ``model`` (from ``from_config``, or read from the model folder: no weights)."""
    from transformers import AutoConfig

    if section.from_config is None:
        try:
            path = resolve_path(section.name_or_path)
            return AutoConfig.from_pretrained(
                path, trust_remote_code=section.trust_remote_code, **task_options(section)
            )
        except Exception as err:
            if not loading_error(err):
                raise
            raise RecipeError(
                f"model.name_or_path: cannot read the model config of {section.name_or_path!r}: {first_line(err)}. "
                "Fix: set it to a model folder with a config.json, an embedded model (smollm2, minilm), or a hub id."
            ) from err
    options = dict(section.from_config)
    if tokenizer is not None:
        options.setdefault("vocab_size", len(tokenizer))
        options.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        return AutoConfig.for_model(options.pop("model_type"), **options, **task_options(section))
    except (ValueError, TypeError, KeyError) as err:
        raise RecipeError(
            f"model.from_config: {first_line(err)}. Fix: use a transformers model_type and its fields."
        ) from err


def module_names(model: nn.Module) -> list[str]:
    """Leaf names of the layers an adapter can target (``q_proj``, ``dense`` ...), in model order, once each."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and type(module).__name__ in ADAPTABLE:
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def check_target_modules(model: nn.Module, options: dict[str, Any]) -> None:
    """RecipeError naming each ``adapter.target_modules`` entry that matches no module (PEFT would skip it)."""
    targets = options.get("target_modules")
    if not targets or targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):  # a regex over full module names, as PEFT reads it
        unmatched = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        available = module_names(model)
        raise RecipeError(
            f"adapter.target_modules: {', '.join(map(repr, unmatched))} matches no module of this model. Layers "
            f"it has: {available[:16]}{' ...' if len(available) > 16 else ''}. Fix: use those names, a regex, or "
            "all-linear."
        )


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
    check_target_modules(base_model, adapter.options)
    try:
        model = get_peft_model(base_model, adapter_config(adapter, task, name_or_path))
    except ValueError as err:  # the adapters' own messages name the layer and the valid sizes
        raise RecipeError(f"adapter ({adapter.method}): {err}") from err
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
