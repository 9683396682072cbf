"""Every registered orthoft method on bitsandbytes bases: a real transformers model loaded with BitsAndBytesConfig.

nf4 and fp4 (double quantization) ``Linear4bit`` and ``Linear8bitLt``, after
``peft.prepare_model_for_kbit_training``: identity at init, forward, backward and training steps,
the quantized kernel untouched. Parametrized over ``orthoft.adapters.REGISTERED``, so methods that
land later are covered without editing this file. CUDA cases run where a GPU is present.

The helpers at the top are shared with ``tests/test_export.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from torch import nn

import orthoft
from orthoft.adapters import REGISTERED
from orthoft.adapters.base import keep_bnb_4bit_unpacked

METHODS = sorted(REGISTERED)
# methods that only reparametrize attention projections; they pick their own default targets
ATTENTION_ONLY = {"ORTHOFT_CLOVER"}
TINY_TARGETS = ["q_proj", "v_proj", "down_proj"]
QUANTIZATIONS = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def save_tiny_llama(folder):
    """Save a tiny Llama (random init, fixed seed) to ``folder`` for tests to load with BitsAndBytesConfig."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def load_quantized(folder, quantization: str = "nf4-double", device: str = "cpu", prepare: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**QUANTIZATIONS[quantization], bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": device})
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def method_config(peft_type: str, **kwargs):
    config_cls = REGISTERED[peft_type][0]
    if peft_type in ATTENTION_ONLY:
        return config_cls(**kwargs)
    return config_cls(target_modules=kwargs.pop("target_modules", TINY_TARGETS), **kwargs)


def exact_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Eval logits with every bnb 4-bit layer in its standard layout.

    On AVX512-BF16 CPUs bitsandbytes otherwise switches unadapted 4-bit layers to a bf16 kernel at
    the first eval forward, whose rounding (~3e-3 relative) would swamp the 1e-3 comparisons.
    """
    for module in model.modules():
        keep_bnb_4bit_unpacked(module)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    return logits


def train_steps(model: nn.Module, input_ids: torch.Tensor, steps: int = 3, lr: float = 2e-2) -> list[float]:
    """A few AdamW steps of causal-LM loss on ``input_ids``; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def quantized_base_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module.get_base_layer()
        for name, module in model.named_modules()
        if isinstance(module, orthoft.OrthoLayer) and module.kind == "quantized"
    }


# ---- every method on every bnb format -----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
@pytest.mark.parametrize("peft_type", METHODS)
def test_method_trains_on_quantized_transformers_model(peft_type, quantization, device, tiny_llama_dir):
    torch.manual_seed(0)
    input_ids = torch.randint(0, 128, (2, 12)).to(device)
    model = load_quantized(tiny_llama_dir, quantization, device)
    before = exact_logits(model, input_ids)
    peft_model = get_peft_model(model, method_config(peft_type))
    layers = quantized_base_layers(peft_model)
    assert layers, f"{peft_type} wrapped no quantized layer"
    packed = {name: layer.weight.data.clone() for name, layer in layers.items()}

    # identity at init (8-bit: the same int8 kernel on the same inputs)
    assert torch.allclose(exact_logits(peft_model, input_ids), before, atol=1e-5)

    losses = train_steps(peft_model, input_ids)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)
    assert (exact_logits(peft_model, input_ids) - before).abs().max() > 1e-4, "training did not move the model"
    # input-side (or additive) adapters: the quantized kernel's data never changes
    for name, layer in layers.items():
        assert torch.equal(layer.weight.data, packed[name]), name


@pytest.mark.parametrize("peft_type", ["ORTHOFT_OFT", "ORTHOFT_PSOFT"])
def test_training_after_an_eval_pass_still_gets_gradients(peft_type, tiny_llama_dir):
    """bitsandbytes' CPU bf16 inference layout has no backward; orthoft keeps adapted layers out of it.

    The base is evaluated BEFORE wrapping too (so it is already repacked), which also checks that
    the dequantized weight orthoft reads is the one the layer computes with.
    """
    if peft_type not in REGISTERED:
        pytest.skip(f"{peft_type} not registered")
    from peft.utils import resolve_quantization_backend

    torch.manual_seed(0)
    input_ids = torch.randint(0, 128, (2, 12))
    model = load_quantized(tiny_llama_dir, "nf4-double")
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)  # may repack every Linear4bit for the bf16 CPU kernel
    peft_model = get_peft_model(model, method_config(peft_type))
    for name, base in quantized_base_layers(peft_model).items():
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False), name
        x = torch.randn(3, base.in_features)
        dense = resolve_quantization_backend(base).get_base_weight(base).float()
        with torch.no_grad():
            assert torch.allclose(base(x), x @ dense.T, atol=1e-5), f"{name}: dequantized weight is not the layer's"
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=input_ids)
    # unadapted 4-bit layers stay out of the bf16 layout too: the gradient flows back through them
    for name, module in peft_model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        assert not getattr(state, "packing_format_for_cpu", False), name
    train_steps(peft_model, input_ids, steps=1)
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_4bit_config_keeps_kernel_input_side_for_multiplicative_methods(tiny_llama_dir):
    """OFT's forward is ``base(x R)``: the Linear4bit is called on the rotated input, not rebuilt."""
    torch.manual_seed(0)
    model = load_quantized(tiny_llama_dir, "nf4-double")
    peft_model = get_peft_model(model, orthoft.OFTConfig(target_modules=["q_proj"], block_size=16))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    handle = layer.get_base_layer().register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        next(p for p in peft_model.parameters() if p.requires_grad).normal_(std=0.1)
        x = torch.randn(2, 5, 64)
        layer(x)
    handle.remove()
    assert len(seen) == 1 and not torch.allclose(seen[0], x)
    assert torch.allclose(seen[0], layer.transform_input("default", x), atol=1e-6)
