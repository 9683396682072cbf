"""The test battery every orthoft method must pass, on every layer kind it supports.

A method joins by adding a ``MethodCase`` to ``CASES``; ``kinds`` lists the layer kinds it
supports (others must raise a clear TypeError, checked below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import orthoft
from tests.helpers import clone, make_model, perturb_adapters

ALL_KINDS = ("linear", "conv1d", "conv2d")


@dataclasses.dataclass
class MethodCase:
    name: str
    make_config: Callable[[list[str]], peft.PeftConfig]  # target module names -> config
    kinds: tuple[str, ...] = ALL_KINDS
    orthogonal: bool = True  # whether the multiplicative map is orthogonal (tests R^T R = I)
    merge_atol: float = 1e-4


CASES = [
    MethodCase("oft", lambda t: orthoft.OFTConfig(target_modules=t, block_size=4)),
    MethodCase("oft_exact", lambda t: orthoft.OFTConfig(target_modules=t, block_size=8, use_exact_cayley=True)),
    MethodCase("oft_shared", lambda t: orthoft.OFTConfig(target_modules=t, block_size=4, block_share=True)),
    MethodCase("boft", lambda t: orthoft.BOFTConfig(target_modules=t, block_size=4, n_butterfly_factor=2)),
    MethodCase("boft_m3", lambda t: orthoft.BOFTConfig(target_modules=t, block_size=2, n_butterfly_factor=3)),
    MethodCase("qgoft", lambda t: orthoft.QGOFTConfig(target_modules=t), orthogonal=False),
    MethodCase("goft_strict", lambda t: orthoft.QGOFTConfig(target_modules=t, strict=True)),
    MethodCase(
        "qgoft_butterfly", lambda t: orthoft.QGOFTConfig(target_modules=t, layout="butterfly"), orthogonal=False
    ),
    MethodCase(
        "goft_butterfly_2layers",
        lambda t: orthoft.QGOFTConfig(target_modules=t, strict=True, layout="butterfly", num_layers=2),
    ),
    MethodCase("hra", lambda t: orthoft.HRAConfig(target_modules=t, r=8)),
    MethodCase("hra_gs", lambda t: orthoft.HRAConfig(target_modules=t, r=4, apply_GS=True)),
    # additive methods: W + dW, no multiplicative map to check for orthogonality
    MethodCase("psoft", lambda t: orthoft.PSOFTConfig(target_modules=t, r=4), orthogonal=False),
    MethodCase(
        "psoft_exact_lowrank",
        lambda t: orthoft.PSOFTConfig(target_modules=t, r=6, use_exact_cayley=True, svd="lowrank"),
        orthogonal=False,
    ),
    MethodCase("svft_banded_full", lambda t: orthoft.SVFTConfig(target_modules=t, bandwidth=1), orthogonal=False),
    MethodCase(
        "svft_random_rank6",
        lambda t: orthoft.SVFTConfig(target_modules=t, pattern="random", num_entries=12, rank=6),
        orthogonal=False,
    ),
]


def case_params():
    for case in CASES:
        for kind in ALL_KINDS:
            marks = [] if kind in case.kinds else [pytest.mark.skip(reason=f"{case.name} does not support {kind}")]
            yield pytest.param(case, kind, id=f"{case.name}-{kind}", marks=marks)


def wrapped(case: MethodCase, kind: str, adapter_name: str = "default"):
    model, x, targets = make_model(kind)
    reference = clone(model)
    peft_model = get_peft_model(model, case.make_config(targets), adapter_name=adapter_name)
    return peft_model, reference, x


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_identity_at_init(case, kind):
    peft_model, reference, x = wrapped(case, kind)
    assert torch.allclose(peft_model(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_merged_equals_unmerged_after_perturbation(case, kind):
    peft_model, reference, x = wrapped(case, kind)
    perturb_adapters(peft_model)
    adapted = peft_model(x)
    assert (adapted - reference(x)).abs().max() > 1e-3, "perturbation must change the output"
    peft_model.merge_adapter()
    assert torch.allclose(peft_model(x), adapted, atol=case.merge_atol)
    peft_model.unmerge_adapter()
    assert torch.allclose(peft_model(x), adapted, atol=case.merge_atol)
    with peft_model.disable_adapter():
        assert torch.allclose(peft_model(x), reference(x), atol=case.merge_atol)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, orthoft.OrthoLayer) for m in merged.modules())
    assert torch.allclose(merged(x), adapted, atol=case.merge_atol)


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_gradients_finite_and_reach_every_adapter_tensor(case, kind):
    peft_model, _, x = wrapped(case, kind)
    perturb_adapters(peft_model, 0.01)
    peft_model(x).square().mean().backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_save_load_round_trip_is_exact(case, kind, tmp_path):
    peft_model, _, x = wrapped(case, kind)
    perturb_adapters(peft_model)
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    base, _, _ = make_model(kind)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(loaded(x), expected)
    saved = {k: v for k, v in peft_model.state_dict().items() if "orthoft_" in k}
    for key, value in loaded.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_two_adapters_merged_and_unmerged_agree(case, kind):
    peft_model, _, x = wrapped(case, kind, adapter_name="first")
    _, _, targets = make_model(kind)
    peft_model.add_adapter("second", case.make_config(targets))
    perturb_adapters(peft_model)  # only "first" is trainable
    peft_model.base_model.set_adapter(["first", "second"])
    perturb_adapters(peft_model)  # now both
    both = peft_model(x)
    peft_model.base_model.set_adapter("first")
    only_first = peft_model(x)
    assert (both - only_first).abs().max() > 1e-4
    peft_model.base_model.set_adapter(["first", "second"])
    peft_model.merge_adapter()
    assert torch.allclose(peft_model(x), both, atol=case.merge_atol)
    peft_model.unmerge_adapter()
    assert torch.allclose(peft_model(x), both, atol=case.merge_atol)
    # merging a subset keeps the rest applied on top
    peft_model.merge_adapter(adapter_names=["first"])
    assert torch.allclose(peft_model(x), both, atol=case.merge_atol)
    peft_model.unmerge_adapter()


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_rotation_is_orthogonal(case, kind):
    if not case.orthogonal:
        pytest.skip("method does not promise an orthogonal map")
    peft_model, _, _ = wrapped(case, kind)
    perturb_adapters(peft_model, 0.02)
    for module in peft_model.modules():
        if isinstance(module, orthoft.OrthoLayer) and not module.additive:
            eye = torch.eye(module.in_features)
            with torch.no_grad():
                dense = module.transform_input("default", eye)
            err = (dense.T @ dense - eye).abs().max()
            assert err < 1e-4, f"{module.module_name}: |R^T R - I| = {err}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unsupported_kinds_raise_clear_errors(case):
    for kind in ALL_KINDS:
        if kind in case.kinds:
            continue
        model, _, targets = make_model(kind)
        with pytest.raises(TypeError, match="Fix"):
            get_peft_model(model, case.make_config(targets))


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors_in(getattr(value, f.name))]
    return []


@pytest.mark.parametrize("case,kind", list(case_params()))
def test_rotations_are_built_in_float32_under_bf16_autocast(case, kind, monkeypatch):
    """Every adapter-side build (rotations, cores, bases) is float32 and the same with and without autocast."""
    peft_model, _, x = wrapped(case, kind)
    perturb_adapters(peft_model)
    built: list = []
    original = orthoft.OrthoLayer.cached_for_inference

    def recording(self, key, tensors, build):
        value = original(self, key, tensors, build)
        built.append(value)
        return value

    monkeypatch.setattr(orthoft.OrthoLayer, "cached_for_inference", recording)
    peft_model(x)
    reference, built[:] = list(built), []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = peft_model(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    expected, got = _tensors_in(reference), _tensors_in(built)
    assert len(got) == len(expected)  # quasi qGOFT and SVFT use their tensors as stored: nothing built
    for want, have in zip(expected, got):
        assert have.dtype == want.dtype and (not have.is_floating_point() or have.dtype == torch.float32)
        assert torch.equal(have, want)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
