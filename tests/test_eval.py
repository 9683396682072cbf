"""Shipped evaluate metric modules and orthogonality diagnostics of trained adapters."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import orthoft
from orthoft.evaluation import evaluate_examples, format_orthogonality, load_metric, orthogonality_report
from tests.helpers import perturb_adapters


def test_accuracy_and_f1_modules():
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    predictions, references = [1, 0, 1, 1, 0], [1, 1, 0, 1, 0]
    assert accuracy.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(0.6)
    # positive class 1: tp=2, fp=1, fn=1 -> 2*2/(2*2+1+1)
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx(4 / 6)
    # class 0: tp=1, fp=1, fn=1 -> 0.5; macro = mean(0.5, 2/3)
    macro = f1.compute(predictions=predictions, references=references, average="macro")["f1"]
    assert macro == pytest.approx((0.5 + 4 / 6) / 2)
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=predictions, references=references, average="samples")


def test_perplexity_module_is_token_weighted():
    perplexity = load_metric("perplexity")
    out = perplexity.compute(nll_sum=[2.0, 10.0], num_tokens=[1, 5])
    assert out["perplexity"] == pytest.approx(math.exp(12 / 6)) and out["num_tokens"] == 6
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity.compute(nll_sum=[0.0], num_tokens=[0])


def test_missing_metric_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="available: \\['accuracy', 'f1', 'perplexity'\\]"):
        load_metric("bleu")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_lm_perplexity_matches_the_model_loss():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    result = evaluate_examples(model, examples, "lm", ["perplexity"], batch_size=4, pad_token_id=0, device="cpu")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # equal lengths: HF's token mean is the same quantity
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert result["tokens"] == 6 * 15


@pytest.mark.parametrize("block_share", [False, True])
def test_oft_diagnostics_agree_with_the_dense_rotation(block_share):
    model = get_peft_model(
        _tiny_llama(), orthoft.OFTConfig(target_modules=["q_proj", "down_proj"], block_size=16, block_share=block_share)
    )
    at_init = orthogonality_report(model)
    assert at_init["summary"]["layers"] == 2
    assert at_init["summary"]["max_angle_deg"] == pytest.approx(0.0, abs=1e-4)
    perturb_adapters(model, scale=0.3)
    report = orthogonality_report(model)
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "rotations"))
    entry = next(e for e in report["layers"] if e["layer"].endswith("q_proj"))
    # the per-block path must give the statistics of the dense block-diagonal R = transform_input(I)
    dense = layer.transform_input("default", torch.eye(64)).double()
    angles = torch.rad2deg(torch.angle(torch.linalg.eigvals(dense)).abs())
    assert entry["max_angle_deg"] == pytest.approx(angles.max().item(), abs=1e-3)
    assert entry["mean_angle_deg"] == pytest.approx(angles.mean().item(), abs=1e-3)
    assert entry["trace_angle_deg"] == pytest.approx(math.degrees(math.acos(dense.trace().item() / 64)), abs=1e-3)
    assert entry["orthogonality_error"] == pytest.approx((dense.T @ dense - torch.eye(64)).abs().max().item(), abs=1e-5)
    assert 0 < entry["max_angle_deg"] <= 180
    assert entry["orthogonality_error"] < 1e-2  # bounded skew, degree-4 Neumann: nearly orthogonal
    assert "orthogonality:" in format_orthogonality(report)


def test_dense_path_rotation_angle_and_output_scale():
    # BOFT has no per-block rotations(): the dense map comes from transform_input(I)
    model = get_peft_model(_tiny_llama(), orthoft.BOFTConfig(target_modules=["q_proj"], block_size=8))
    perturb_adapters(model, scale=0.2)
    entry = orthogonality_report(model)["layers"][0]
    assert entry["structure"] == "dense 64x64"
    assert entry["max_angle_deg"] > 0 and entry["orthogonality_error"] < 1e-2
    assert entry["max_abs_scale_minus_1"] > 0  # the trained output scale is reported
    # a large layer is skipped, not built
    skipped = orthogonality_report(model, max_dense_dim=32)["layers"][0]
    assert "skipped" in skipped


def test_known_rotation_angles():
    # a single 2-plane rotation by 30 degrees in a 16-dim block: angles {30, 30, 0 x 14}
    model = get_peft_model(
        _tiny_llama(), orthoft.OFTConfig(target_modules=["q_proj"], block_size=16, block_share=True,
                                         use_exact_cayley=True, max_skew_norm=None)
    )
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "rotations"))
    # Cayley: a skew entry q in one plane rotates by 2*atan(q)
    with torch.no_grad():
        layer.orthoft_oft_Q["default"].zero_()
        layer.orthoft_oft_Q["default"][0, 0] = math.tan(math.radians(15))
    entry = orthogonality_report(model)["layers"][0]
    assert entry["max_angle_deg"] == pytest.approx(30.0, abs=1e-3)
    assert entry["mean_angle_deg"] == pytest.approx(2 * 30.0 / 16, abs=1e-3)
    assert entry["orthogonality_error"] < 1e-5


def test_additive_methods_report_relative_change():
    model = get_peft_model(_tiny_llama(), orthoft.SVFTConfig(target_modules=["q_proj"]))
    entry = orthogonality_report(model)["layers"][0]
    assert entry["kind"] == "additive" and entry["relative_delta"] == pytest.approx(0.0, abs=1e-6)
    perturb_adapters(model, scale=0.1)
    assert orthogonality_report(model)["layers"][0]["relative_delta"] > 0


def test_clover_reports_relative_change():
    model = get_peft_model(_tiny_llama(), orthoft.CLOVERConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    entries = orthogonality_report(model)["layers"]
    assert entries and all(e["kind"] == "reparametrized" for e in entries)
    assert all(e["relative_delta"] < 1e-4 for e in entries)  # an exact reparametrization at init


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_is_reported_as_non_finite_not_as_small_angles(value):
    from orthoft.evaluation.orthogonality import non_finite_adapter_tensors

    model = get_peft_model(_tiny_llama(), orthoft.OFTConfig(target_modules=["q_proj", "v_proj"], block_size=16))
    perturb_adapters(model, scale=0.1)
    finite = orthogonality_report(model)
    assert non_finite_adapter_tensors(model) == [] and "non_finite_layers" not in finite["summary"]
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "rotations"))
    with torch.no_grad():
        layer.orthoft_oft_Q["default"][0, 0] = value
    report = orthogonality_report(model)
    entry = next(e for e in report["layers"] if e["layer"].endswith("q_proj"))
    assert entry["non_finite"] == ["orthoft_oft_Q.default"]
    assert not any(key.endswith("angle_deg") for key in entry)  # no angle at all rather than a wrong one
    assert report["summary"]["non_finite_layers"] == 1
    # the summary covers the finite layer only, exactly as that layer's own entry
    v_proj = next(e for e in report["layers"] if e["layer"].endswith("v_proj"))
    assert report["summary"]["max_angle_deg"] == v_proj["max_angle_deg"] > 0
    assert "NON-FINITE" in format_orthogonality(report) and "orthoft_oft_Q.default" in format_orthogonality(report)
    assert non_finite_adapter_tensors(model) == [
        next(n for n, m in model.named_modules() if m is layer) + ".orthoft_oft_Q.default"
    ]


def test_non_finite_additive_adapter_is_reported():
    model = get_peft_model(_tiny_llama(), orthoft.SVFTConfig(target_modules=["q_proj"]))
    perturb_adapters(model, scale=0.1)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    report = orthogonality_report(model)
    assert report["summary"]["non_finite_layers"] == 1 and "relative_delta" not in report["layers"][0]
    assert "mean_relative_delta" not in report["summary"]
