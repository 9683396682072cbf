"""OFT and BOFT inside PEFT: registration, parity with PEFT's own OFT/BOFT, errors, options, quantized bases."""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, get_peft_model
from torch import nn

import orthoft
from orthoft.orthogonal import pack_skew
from tests.helpers import TinyMLP, clone, make_model, perturb_adapters


def test_import_exposes_configs():
    code = "import orthoft, peft; print(orthoft.OFTConfig, orthoft.BOFTConfig)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "OFTConfig" in out.stdout and "BOFTConfig" in out.stdout


def test_registered_types_do_not_collide_with_peft():
    assert "ORTHOFT_OFT" in peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.OFT] is not orthoft.adapters.OFTModel
    assert orthoft.OFTConfig().peft_type == "ORTHOFT_OFT"
    assert orthoft.BOFTConfig().peft_type == "ORTHOFT_BOFT"


@pytest.mark.parametrize("config", [orthoft.OFTConfig(block_size=8), orthoft.BOFTConfig(block_size=4)])
def test_saved_config_reloads_as_orthoft_class(config, tmp_path):
    config.target_modules = ["lin0", "lin1"]
    model = get_peft_model(TinyMLP(), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type
    reloaded = PeftConfig.from_pretrained(tmp_path)
    assert type(reloaded) is type(config)
    assert reloaded.block_size == config.block_size


def test_trainable_parameter_counts():
    model = get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0", "lin1"], block_size=8))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 64 * 7 // 2 + 32 * 7 // 2  # d (b-1) / 2 per layer
    model = get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0"], block_size=8, block_share=True))
    assert model.get_nb_trainable_parameters()[0] == 28
    model = get_peft_model(TinyMLP(), orthoft.BOFTConfig(target_modules=["lin0"], block_size=8, n_butterfly_factor=2))
    assert model.get_nb_trainable_parameters()[0] == 2 * 64 * 7 // 2 + 32  # m d (b-1)/2 + out


# ---- parity with PEFT -----------------------------------------------------------------------


def _linear_pair(d_in=64, d_out=48):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out)), torch.randn(6, d_in)


def test_oft_neumann_parity_with_peft():
    base, x = _linear_pair()
    theirs = get_peft_model(
        clone(base),
        peft.OFTConfig(
            r=0, oft_block_size=8, target_modules=["0"], use_cayley_neumann=True, num_cayley_neumann_terms=5
        ),
    )
    ours = get_peft_model(
        clone(base),
        orthoft.OFTConfig(block_size=8, target_modules=["0"], neumann_degree=3, max_skew_norm=None),
    )
    packed = torch.randn(8, 28) * 0.05
    with torch.no_grad():
        theirs.base_model.model[0].oft_R["default"].weight.copy_(packed)
        ours.base_model.model[0].orthoft_oft_Q["default"].copy_(packed)
    # PEFT's num_cayley_neumann_terms=5 is degree 3 here; same packed entries, same outputs
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_oft_exact_parity_with_peft_needs_sign_flip():
    """PEFT's exact branch computes (I-Q)(I+Q)^-1, the transpose of what its Neumann branch approximates.

    orthoft uses (I+Q)(I-Q)^-1 for both maps, so PEFT's exact adapter with packed Q equals
    orthoft's exact adapter with -Q (and its Neumann adapter with +Q, as tested above).
    """
    base, x = _linear_pair()
    theirs = get_peft_model(
        clone(base), peft.OFTConfig(r=0, oft_block_size=8, target_modules=["0"], use_cayley_neumann=False)
    )
    ours = get_peft_model(
        clone(base), orthoft.OFTConfig(block_size=8, target_modules=["0"], use_exact_cayley=True, max_skew_norm=None)
    )
    packed = torch.randn(8, 28) * 0.2
    with torch.no_grad():
        theirs.base_model.model[0].oft_R["default"].weight.copy_(packed)
        ours.base_model.model[0].orthoft_oft_Q["default"].copy_(-packed)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    with torch.no_grad():
        ours.base_model.model[0].orthoft_oft_Q["default"].copy_(packed)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)


def _patch_peft_boft_for_cpu(monkeypatch):
    """Let PEFT's BOFT run m > 1 on CPU by standing in for its CUDA block-diagonal extension."""
    from peft.tuners.boft import layer as boft_layer

    class BlockDiagStandIn:
        @staticmethod
        def apply(blocks):  # (N, D, H, H) -> (N, D*H, D*H)
            return torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", BlockDiagStandIn)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_boft_parity_with_peft(m, monkeypatch):
    if m > 1:
        _patch_peft_boft_for_cpu(monkeypatch)
    base, x = _linear_pair()
    theirs = get_peft_model(
        clone(base),
        peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=m, target_modules=["0"], init_weights=True),
    )
    ours = get_peft_model(
        clone(base),
        orthoft.BOFTConfig(
            block_size=4, n_butterfly_factor=m, target_modules=["0"], use_exact_cayley=True, max_skew_norm=None
        ),
    )
    their_layer, our_layer = theirs.base_model.model[0], ours.base_model.model[0]
    assert their_layer.boft_R["default"].shape[0] == m, "PEFT fell back to fewer butterfly factors"
    full = torch.randn(m, 64 // 4, 4, 4) * 0.3
    scale = 1 + 0.1 * torch.randn(48)
    with torch.no_grad():
        their_layer.boft_R["default"].copy_(full)
        their_layer.boft_s["default"].copy_(scale[:, None])
        # PEFT: Cayley (I-K)(I+K)^-1 of K = skew part of its matrix; orthoft: (I+Q)(I-Q)^-1, so Q = -K
        our_layer.orthoft_boft_Q["default"].copy_(pack_skew(-full))
        our_layer.orthoft_boft_s["default"].copy_(scale)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_peft_boft_falls_back_to_one_factor_on_cpu_but_orthoft_does_not():
    theirs = get_peft_model(
        TinyMLP(), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["lin0"])
    )
    ours = get_peft_model(TinyMLP(), orthoft.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=["lin0"]))
    assert theirs.base_model.model.lin0.boft_R["default"].shape[0] == 1
    assert ours.base_model.model.lin0.orthoft_boft_Q["default"].shape[0] == 2


# ---- errors -------------------------------------------------------------------------------------


def test_block_size_error_names_module_and_fix():
    with pytest.raises(ValueError, match=r"block size 48 does not divide in_features 64 of lin0.*Fix"):
        get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0"], block_size=48))


def test_num_blocks_error():
    with pytest.raises(ValueError, match="num_blocks 5 does not divide in_features 64 of lin0"):
        get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0"], num_blocks=5))


def test_boft_butterfly_span_error():
    # b * 2^(m-1) = 8 * 8 = 64 divides lin0 (64) but not lin1 (32)
    with pytest.raises(ValueError, match=r"block size 8 x 8 does not divide in_features 32 of lin1"):
        get_peft_model(
            TinyMLP(), orthoft.BOFTConfig(target_modules=["lin0", "lin1"], block_size=8, n_butterfly_factor=4)
        )


def test_boft_odd_block_error():
    with pytest.raises(ValueError, match="must be even"):
        orthoft.BOFTConfig(block_size=3, n_butterfly_factor=2)


def test_config_value_errors():
    with pytest.raises(ValueError, match="not both"):
        orthoft.OFTConfig(block_size=8, num_blocks=4)
    with pytest.raises(ValueError, match="module_dropout"):
        orthoft.OFTConfig(module_dropout=1.5)
    with pytest.raises(ValueError, match="bias"):
        orthoft.OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="neumann_degree"):
        orthoft.OFTConfig(neumann_degree=-1)


def test_unsupported_layer_type_error():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16))
    with pytest.raises(TypeError, match=r"Embedding.*Supported: nn.Linear.*Fix"):
        get_peft_model(model, orthoft.OFTConfig(target_modules=["0"], block_size=4))


def test_grouped_conv_error():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(TypeError, match="groups=2"):
        get_peft_model(model, orthoft.OFTConfig(target_modules=["0"], block_size=4))


def test_no_target_found_error():
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["does_not_exist"], block_size=4))


# ---- options ------------------------------------------------------------------------------------


def test_bias_options():
    model = get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin1"], block_size=4, bias="all"))
    assert model.base_model.model.lin0.bias.requires_grad
    model = get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0"], block_size=4, bias="oft_only"))
    assert model.base_model.model.lin0.base_layer.bias.requires_grad
    model = get_peft_model(TinyMLP(), orthoft.BOFTConfig(target_modules=["lin0"], block_size=4, bias="boft_only"))
    assert model.base_model.model.lin0.base_layer.bias.requires_grad
    model = get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0"], block_size=4))
    assert not model.base_model.model.lin0.base_layer.bias.requires_grad


@pytest.mark.parametrize(
    "config",
    [
        orthoft.OFTConfig(target_modules=["lin0"], block_size=4, module_dropout=0.5),
        orthoft.BOFTConfig(target_modules=["lin0"], block_size=4, dropout=0.5),
        orthoft.OFTConfig(target_modules=["lin0"], block_size=4, block_share=True, module_dropout=0.5),
    ],
)
def test_multiplicative_dropout_applies_in_training_only(config):
    model = get_peft_model(TinyMLP(), config)
    perturb_adapters(model, 0.2)
    x = torch.randn(4, 64)
    model.eval()
    evaluated = model(x)
    assert torch.equal(model(x), evaluated)
    model.train()
    outputs = [model(x) for _ in range(4)]
    assert any(not torch.allclose(o, evaluated) for o in outputs)
    assert any(not torch.allclose(outputs[0], o) for o in outputs[1:])


def test_bf16_model_keeps_float32_adapter_and_bf16_activations():
    model, x, targets = make_model("linear")
    reference = clone(model)
    peft_model = get_peft_model(model.to(torch.bfloat16), orthoft.OFTConfig(target_modules=targets, block_size=8))
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    perturb_adapters(peft_model)
    out = peft_model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    reference_adapter = get_peft_model(reference, orthoft.OFTConfig(target_modules=targets, block_size=8))
    perturb_adapters(reference_adapter)
    assert torch.allclose(out.float(), reference_adapter(x), atol=5e-2, rtol=5e-2)


def test_all_linear_and_default_targets_on_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 7))
    for targets in ["all-linear", None]:
        model = LlamaForCausalLM(config)
        expected = model(ids).logits
        peft_model = get_peft_model(model, orthoft.OFTConfig(target_modules=targets, block_size=16))
        assert torch.allclose(peft_model(ids).logits, expected, atol=1e-5)
        adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, orthoft.OrthoLayer)}
        assert {"q_proj", "v_proj"} <= adapted
        assert "lm_head" not in adapted
        if targets == "all-linear":
            assert {"k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted


# ---- Conv2d exactness -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
        dict(kernel_size=3, dilation=2, padding=2, bias=False),
        dict(kernel_size=1),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
    ],
)
def test_conv2d_is_the_exact_effective_weight_w_rt(conv):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, **conv)
    x = torch.randn(2, 4, 9, 8)
    model = get_peft_model(nn.Sequential(clone(base)), orthoft.OFTConfig(target_modules=["0"], block_size=2))
    perturb_adapters(model, 0.3)
    layer = model.base_model.model[0]
    rotation = torch.block_diag(*layer.rotations("default").unbind(0))
    d = layer.in_features
    # independent reference: rotate every unfolded input patch by R, then apply the frozen filters
    padded = x if base.padding_mode == "zeros" else F.pad(x, (1, 1, 1, 1), mode=base.padding_mode)
    padding = base.padding if base.padding_mode == "zeros" else 0
    patches = F.unfold(padded, base.kernel_size, dilation=base.dilation, padding=padding, stride=base.stride)
    rotated = torch.einsum("ndl,dk->nkl", patches, rotation)
    out = torch.einsum("od,ndl->nol", base.weight.reshape(6, d), rotated)
    if base.bias is not None:
        out = out + base.bias[None, :, None]
    expected_hw = model(x).shape[-2:]
    assert torch.allclose(model(x), out.reshape(2, 6, *expected_hw), atol=1e-5)


# ---- quantized bases (bitsandbytes on CPU) ------------------------------------------------------


def _quantized_mlp(kind: str, quant_type: str = "nf4", double_quant: bool = True):
    torch.manual_seed(0)
    dense = TinyMLP()
    model = clone(dense)
    for name in ("lin0", "lin1"):
        lin = getattr(dense, name)
        if kind == "4bit":
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                quant_type=quant_type,
                compress_statistics=double_quant,
                compute_dtype=torch.float32,
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
            )
        else:
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False
            )
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(model, name, q.to("cpu"))
    return model


@pytest.mark.parametrize(
    "kind,quant_type,double_quant", [("4bit", "nf4", True), ("4bit", "fp4", False), ("8bit", None, None)]
)
@pytest.mark.parametrize(
    "make_config",
    [
        lambda: orthoft.OFTConfig(target_modules=["lin0", "lin1"], block_size=8),
        lambda: orthoft.BOFTConfig(target_modules=["lin0", "lin1"], block_size=4, n_butterfly_factor=2),
    ],
)
def test_quantized_layers_train_input_side(kind, quant_type, double_quant, make_config):
    model = _quantized_mlp(kind, quant_type, double_quant)
    x = torch.randn(4, 64)
    expected = model(x)
    peft_model = get_peft_model(model, make_config())
    layer = peft_model.base_model.model.lin0
    assert layer.kind == "quantized"
    packed_before = layer.get_base_layer().weight.data.clone()
    assert torch.allclose(peft_model(x), expected, atol=1e-6)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = (peft_model(x) - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in peft_model.parameters() if p.requires_grad)
    assert (peft_model(x) - expected).abs().max() > 1e-4
    # the quantized kernel's weights were never touched by training
    assert torch.equal(layer.get_base_layer().weight.data, packed_before)


def test_quantized_merge_is_within_quantization_noise():
    torch.manual_seed(0)
    dense = TinyMLP()
    model = _quantized_mlp("4bit")
    x = torch.randn(8, 64)
    # what one nf4 rounding of these weights costs at the output
    quantization_noise = (model(x) - dense(x)).abs().max()
    peft_model = get_peft_model(model, orthoft.OFTConfig(target_modules=["lin0", "lin1"], block_size=8))
    perturb_adapters(peft_model, 0.02)
    adapted = peft_model(x)
    peft_model.merge_adapter()
    # merging requantizes the rotated weight: one more rounding, not a wrong merge
    assert (peft_model(x) - adapted).abs().max() < 2 * quantization_noise


def test_rotations_are_reused_in_inference_and_rebuilt_after_updates():
    model = get_peft_model(TinyMLP(), orthoft.OFTConfig(target_modules=["lin0"], block_size=8))
    layer = model.base_model.model.lin0
    model.eval()
    with torch.no_grad():
        first = layer.rotations("default")
        assert layer.rotations("default") is first
        layer.orthoft_oft_Q["default"].add_(0.01)
        rebuilt = layer.rotations("default")
    assert rebuilt is not first and not torch.equal(rebuilt, first)
    # training (grad enabled) never reuses a cached rotation
    assert layer.rotations("default") is not rebuilt


def test_peft_oft_conv2d_differs_from_the_exact_effective_weight():
    """Documents why orthoft does not match PEFT on Conv2d with kernel > 1.

    PEFT rotates unfolded stride-1 patches and folds them back by summation, which is not the
    convolution with ``W R^T``; orthoft convolves with ``W R^T`` exactly (tested above). With
    the same parameters the two agree only for 1x1 kernels.
    """
    torch.manual_seed(0)
    results = {}
    for kernel in (1, 3):
        base = nn.Sequential(nn.Conv2d(4, 6, kernel, padding=kernel // 2))
        x = torch.randn(2, 4, 8, 8)
        theirs = get_peft_model(
            clone(base), peft.OFTConfig(r=0, oft_block_size=2, target_modules=["0"], use_cayley_neumann=True)
        )
        ours = get_peft_model(
            clone(base), orthoft.OFTConfig(block_size=2, target_modules=["0"], neumann_degree=3, max_skew_norm=None)
        )
        packed = torch.randn(ours.base_model.model[0].orthoft_oft_Q["default"].shape) * 0.1
        with torch.no_grad():
            theirs.base_model.model[0].oft_R["default"].weight.copy_(packed)
            ours.base_model.model[0].orthoft_oft_Q["default"].copy_(packed)
        results[kernel] = (ours(x) - theirs(x)).abs().max().item()
    assert results[1] < 1e-5
    assert results[3] > 1e-2
