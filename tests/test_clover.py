"""CLOVER on tiny Llama (GQA and MHA) and GPT-2 built from config: exactness, structure, merge, save/load."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import orthoft
from orthoft.adapters.clover import CLOVERLayer
from tests.helpers import make_model, perturb_adapters

HEADS, HEAD_DIM = 4, 16


def tiny_llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GPT2Config(n_embd=64, n_head=HEADS, n_layer=2, vocab_size=128, n_positions=32)
        model = GPT2LMHeadModel(config).eval()
    # GPT-2 initializes biases to 0: make them nonzero so that the bias handling is tested
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(std=0.1)
            block.attn.c_proj.bias.normal_(std=0.1)
    return model


MODELS = {"llama_gqa": lambda: tiny_llama(2), "llama_mha": lambda: tiny_llama(4), "gpt2": tiny_gpt2}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def wrapped(name: str, adapter_name: str = "default"):
    base = MODELS[name]()
    reference = logits(base)
    return get_peft_model(base, orthoft.CLOVERConfig(), adapter_name=adapter_name), reference


def attention(peft_model, layer: int = 0):
    model = peft_model.base_model.model
    return model.model.layers[layer].self_attn if hasattr(model, "model") else model.transformer.h[layer].attn


def perturb_cores(peft_model, scale: float = 0.3) -> None:
    """Dense, relative perturbations of every core S (CLOVER trains S dense)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, CLOVERLayer):
                for core in module.orthoft_clover_S.values():
                    noise = torch.randn(core.shape, generator=generator)
                    core.add_(scale * core.abs().mean() * noise)


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_reparametrization_at_init(name):
    peft_model, reference = wrapped(name)
    assert torch.equal(logits(peft_model), reference)


def test_which_projections_carry_a_core():
    gqa, _ = wrapped("llama_gqa")
    attn = attention(gqa)
    assert all(isinstance(getattr(attn, p), CLOVERLayer) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert attn.o_proj.clover_side["default"] == "input"
    assert attn.k_proj.orthoft_clover_S["default"].shape == (2, HEAD_DIM, HEAD_DIM), "one core per kv head"
    mha, _ = wrapped("llama_mha")
    attn = attention(mha)
    assert isinstance(attn.v_proj, CLOVERLayer) and not isinstance(attn.o_proj, BaseTunerLayer), "joint V-O"
    assert isinstance(attn.q_proj, CLOVERLayer) and isinstance(attn.k_proj, CLOVERLayer), "RoPE: Q, K alone"
    gpt2, _ = wrapped("gpt2")
    attn = attention(gpt2)
    assert isinstance(attn.c_attn, CLOVERLayer) and not isinstance(attn.c_proj, BaseTunerLayer)
    assert not isinstance(gpt2.base_model.model.transformer.h[0].mlp.c_proj, BaseTunerLayer)
    assert attn.c_attn.orthoft_clover_S["default"].shape == (2 * HEADS, 16, 16), "Q-K and V-O cores per head"


@pytest.mark.parametrize("name,expected", [("llama_gqa", 2 * 12), ("llama_mha", 2 * 12), ("gpt2", 2 * 8)])
def test_parameter_count(name, expected):
    peft_model, _ = wrapped(name)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == expected * HEAD_DIM**2


def _svals(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def _orig_weights(name: str, layer: int = 0) -> dict[str, torch.Tensor]:
    model = MODELS[name]()
    if name == "gpt2":
        attn = model.transformer.h[layer].attn
        q, k, v = attn.c_attn.weight.detach().T.double().split(64)
        return {"q": q, "k": k, "v": v, "o": attn.c_proj.weight.detach().T.double()}
    attn = model.model.layers[layer].self_attn
    return {p[0]: getattr(attn, p).weight.detach().double() for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


def _merged_weights(peft_model, name: str, layer: int = 0) -> dict[str, torch.Tensor]:
    merged = peft_model.merge_and_unload()
    if name == "gpt2":
        attn = merged.transformer.h[layer].attn
        q, k, v = attn.c_attn.weight.detach().T.double().split(64)
        return {"q": q, "k": k, "v": v, "o": attn.c_proj.weight.detach().T.double()}
    attn = merged.model.layers[layer].self_attn
    return {p[0]: getattr(attn, p).weight.detach().double() for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


def _head(weight: torch.Tensor, h: int, rows: bool = True) -> torch.Tensor:
    return weight[h * HEAD_DIM : (h + 1) * HEAD_DIM] if rows else weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM]


def _in_row_space(candidate: torch.Tensor, original: torch.Tensor) -> bool:
    basis = torch.linalg.qr(original.T).Q  # orthonormal basis of original's row space
    return torch.allclose(candidate @ basis @ basis.T, candidate, atol=1e-5)


def test_trained_heads_are_cores_between_orthonormal_bases_llama_gqa():
    peft_model, _ = wrapped("llama_gqa")
    perturb_cores(peft_model)
    attn = attention(peft_model)
    cores = {
        p[0]: getattr(attn, p).orthoft_clover_S["default"].detach() for p in ("q_proj", "k_proj", "v_proj")
    }
    cores["o"] = attn.o_proj.orthoft_clover_S["default"].detach()
    before, after = _orig_weights("llama_gqa"), _merged_weights(peft_model, "llama_gqa")
    for role, heads in (("q", HEADS), ("k", 2), ("v", 2)):  # QR: W_h' = S_h B_h, B_h orthonormal rows
        for h in range(heads):
            new = _head(after[role], h)
            assert torch.allclose(_svals(new), _svals(cores[role][h]), atol=1e-4), (role, h)
            assert _in_row_space(new, _head(before[role], h)), (role, h)
    for h in range(HEADS):  # O by QR on its input: W_O^h' = B_h S_h, B_h orthonormal columns
        new = _head(after["o"], h, rows=False)
        assert torch.allclose(_svals(new), _svals(cores["o"][h]), atol=1e-4)
        assert _in_row_space(new.T, _head(before["o"], h, rows=False).T)


def test_value_output_pairs_are_joint_svd_cores_llama_mha():
    peft_model, _ = wrapped("llama_mha")
    perturb_cores(peft_model)
    cores = attention(peft_model).v_proj.orthoft_clover_S["default"].detach()
    before, after = _orig_weights("llama_mha"), _merged_weights(peft_model, "llama_mha")
    assert torch.equal(after["o"], before["o"]), "O stays as it is, the core is folded into V"
    for h in range(HEADS):
        # W_O^h W_V^h' = U_h S_h V_h^T with orthonormal U_h, V_h spanning the original product's spaces
        product = _head(after["o"], h, rows=False) @ _head(after["v"], h)
        original = _head(before["o"], h, rows=False) @ _head(before["v"], h)
        assert torch.allclose(_svals(product)[:HEAD_DIM], _svals(cores[h]), atol=1e-4)
        assert _in_row_space(product, original) and _in_row_space(product.T, original.T)


def test_query_key_pairs_are_joint_svd_cores_gpt2():
    peft_model, _ = wrapped("gpt2")
    perturb_cores(peft_model)
    cores = attention(peft_model).c_attn.orthoft_clover_S["default"].detach()
    before, after = _orig_weights("gpt2"), _merged_weights(peft_model, "gpt2")
    assert torch.equal(after["k"], before["k"]), "K stays as it is, the Q-K core is folded into Q"
    for h in range(HEADS):
        scores = _head(after["q"], h).T @ _head(after["k"], h)  # x^T U_h S_h^T V_h^T y
        assert torch.allclose(_svals(scores)[:HEAD_DIM], _svals(cores[h]), atol=1e-4)
        values_outputs = _head(after["o"], h, rows=False) @ _head(after["v"], h)
        assert torch.allclose(_svals(values_outputs)[:HEAD_DIM], _svals(cores[HEADS + h]), atol=1e-4)


def test_core_gradient_is_the_one_of_cores_between_orthonormal_bases():
    """Training S through the per-head transform is CLOVER's own parametrization ``W_h' = S_h B_h``."""
    peft_model, _ = wrapped("llama_gqa")
    layer = attention(peft_model).q_proj
    weight = layer.get_base_layer().weight.detach().double()
    x = torch.randn(5, 64, dtype=torch.float64)
    upstream = torch.randn(5, 64, dtype=torch.float64)
    (layer(x.float()) * upstream.float()).sum().backward()
    s0 = layer.orthoft_clover_S0["default"].double()
    core = s0.clone().requires_grad_(True)
    bases = torch.linalg.solve(s0, weight.reshape(HEADS, HEAD_DIM, 64))  # B_h = S0_h^{-1} W_h
    eye = torch.eye(HEAD_DIM, dtype=torch.float64).expand(HEADS, -1, -1)
    assert torch.allclose(bases @ bases.mT, eye, atol=1e-5), "B_h has orthonormal rows"
    out = torch.einsum("hij,hjk,nk->nhi", core, bases, x).reshape(5, 64)
    (out * upstream).sum().backward()
    assert torch.allclose(layer.orthoft_clover_S["default"].grad.double(), core.grad, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_equals_unmerged_after_perturbation(name):
    peft_model, reference = wrapped(name)
    perturb_adapters(peft_model, 0.05)
    adapted = logits(peft_model)
    assert (adapted - reference).abs().max() > 1e-2
    peft_model.merge_adapter()
    assert torch.allclose(logits(peft_model), adapted, atol=1e-4)
    peft_model.unmerge_adapter()
    assert torch.allclose(logits(peft_model), adapted, atol=1e-4)
    with peft_model.disable_adapter():
        assert torch.allclose(logits(peft_model), reference, atol=1e-4)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    plain = MODELS[name]()
    assert sorted(n for n, _ in merged.named_parameters()) == sorted(n for n, _ in plain.named_parameters())
    assert torch.allclose(logits(merged), adapted, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip_is_exact(name, tmp_path):
    peft_model, _ = wrapped(name)
    perturb_adapters(peft_model, 0.05)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("orthoft_clover_S0") for k in saved) and not any("index" in k for k in saved)
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path)
    assert loaded.peft_config["default"].num_kv_heads == (2 if name == "llama_gqa" else HEADS)
    assert torch.equal(logits(loaded), expected)


def test_gradients_reach_every_core_and_nothing_else():
    peft_model, _ = wrapped("llama_gqa")
    peft_model.train()
    perturb_adapters(peft_model, 0.01)
    peft_model(IDS).logits.square().mean().backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("orthoft_clover_S" in n for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_two_adapters_merged_and_unmerged_agree():
    peft_model, _ = wrapped("llama_gqa", adapter_name="first")
    peft_model.add_adapter("second", orthoft.CLOVERConfig())
    peft_model.base_model.set_adapter(["first", "second"])
    perturb_adapters(peft_model, 0.05)
    both = logits(peft_model)
    peft_model.merge_adapter()
    assert torch.allclose(logits(peft_model), both, atol=1e-4)
    peft_model.unmerge_adapter()
    assert torch.allclose(logits(peft_model), both, atol=1e-4)


def test_bf16_model():
    base = tiny_llama(2).to(torch.bfloat16)
    reference = logits(base)
    peft_model = get_peft_model(base, orthoft.CLOVERConfig())
    assert attention(peft_model).q_proj.orthoft_clover_left["default"].dtype == torch.float32
    assert torch.equal(logits(peft_model), reference)


def test_unsupported_modules_raise_clear_errors():
    model, _, targets = make_model("conv2d")
    with pytest.raises(TypeError, match="Fix"):
        get_peft_model(model, orthoft.CLOVERConfig(target_modules=targets, num_heads=2, head_dim=4))
    model, _, targets = make_model("linear")
    with pytest.raises(TypeError, match="Fix"):
        get_peft_model(model, orthoft.CLOVERConfig(target_modules=targets, num_heads=2, head_dim=4))
    with pytest.raises(TypeError, match="Fix"):  # matches GPT-2's mlp.c_proj too
        get_peft_model(tiny_gpt2(), orthoft.CLOVERConfig(target_modules=["c_attn", "c_proj"]))
    with pytest.raises(ValueError, match="Fix"):  # a head layout that does not fit the weights
        get_peft_model(tiny_llama(2), orthoft.CLOVERConfig(head_dim=8))
