"""Every registered orthoft method on diffusers denoisers: identity at init, merged == unmerged.

Parametrized over ``orthoft.adapters.REGISTERED`` at collection time, so a method added later
is covered without touching this file: it runs with its config defaults plus the options in
``METHOD_OPTIONS`` (sizes that fit these tiny models), and must either pass or be listed in
``NOT_APPLICABLE`` with the reason. The tiny UNet has Conv2d 3x3 (ResNet), 1x1 (shortcuts,
proj_in/proj_out) and linear attention/feed-forward layers; the DiT has a 2x2/stride-2 patch Conv2d.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel
from peft import get_peft_model

import orthoft
from orthoft.adapters import REGISTERED
from orthoft.diffusion.models import build_tiny_unet, unet_target_modules

# options that fit the tiny models' layer sizes (in_features are multiples of 16, or 16 itself)
METHOD_OPTIONS: dict[str, dict] = {
    "ORTHOFT_OFT": {"block_size": 8},
    "ORTHOFT_BOFT": {"block_size": 4, "n_butterfly_factor": 2},
    "ORTHOFT_HRA": {"r": 4},
    "ORTHOFT_PSOFT": {"r": 4},
    "ORTHOFT_ORTHOGONAL_ADAPTATION": {"rank": 2},
}
NOT_APPLICABLE: dict[str, str] = {
    "ORTHOFT_CLOVER": (
        "CLOVER reparametrizes Q-K / V-O head pairs of language-model attention by joint SVD and needs "
        "head metadata; diffusers attention on Conv2d feature maps is out of its scope (Conv2d is unsupported)"
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: with several threads on a shared 2-core machine the forward passes
    # were measured ~300x slower (thread oversubscription), so pin one thread for this module
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


UNET_GROUPS = ("attention", "feedforward", "projection", "resnet")
DIT_GROUPS = ("attention", "feedforward", "patch_embedding")


def tiny_unet() -> tuple[torch.nn.Module, tuple, dict]:
    unet = build_tiny_unet(seed=0, cross_attention_dim=32).eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 1, 16, 16, generator=generator)
    states = torch.randn(2, 5, 32, generator=generator)
    return unet, (sample, torch.tensor([3, 700])), {"encoder_hidden_states": states}


def tiny_dit() -> tuple[torch.nn.Module, tuple, dict]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
            norm_num_groups=8,
        ).eval()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return dit, (sample,), {"timestep": torch.tensor([3, 700]), "class_labels": torch.tensor([1, 7])}


MODELS = {"unet": (tiny_unet, UNET_GROUPS), "dit": (tiny_dit, DIT_GROUPS)}


def method_params():
    for peft_type in sorted(REGISTERED):
        for model_name in MODELS:
            marks = []
            if peft_type in NOT_APPLICABLE:
                marks = [pytest.mark.skip(reason=f"{peft_type}: {NOT_APPLICABLE[peft_type]}")]
            yield pytest.param(
                peft_type, model_name, id=f"{peft_type.removeprefix('ORTHOFT_').lower()}-{model_name}", marks=marks
            )


def wrap(peft_type: str, model_name: str):
    build, groups = MODELS[model_name]
    model, args, kwargs = build()
    reference = copy.deepcopy(model)
    config_cls, tuner_cls = REGISTERED[peft_type]
    unsupported = getattr(tuner_cls.tuner_layer_cls, "unsupported_kinds", {})
    if "conv2d" in unsupported:
        groups = tuple(g for g in groups if g not in ("resnet", "projection", "patch_embedding"))
    config = config_cls(target_modules=unet_target_modules(groups), **METHOD_OPTIONS.get(peft_type, {}))
    try:
        peft_model = get_peft_model(model, config)
    except (TypeError, ValueError) as err:
        raise AssertionError(
            f"{peft_type} could not wrap the tiny {model_name}: {err}\nFix: give it fitting options in METHOD_OPTIONS "
            "of tests/test_diffusion_adapters.py, or list it in NOT_APPLICABLE with the reason."
        ) from err
    return peft_model, reference, args, kwargs, "conv2d" not in unsupported


def output(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs, return_dict=False)[0]


def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.mark.parametrize("peft_type,model_name", list(method_params()))
def test_identity_at_init(peft_type, model_name):
    peft_model, reference, args, kwargs, convs = wrap(peft_type, model_name)
    adapted = [m for m in peft_model.modules() if isinstance(m, orthoft.OrthoLayer)]
    assert adapted, "no layer was adapted"
    if convs:
        kernels = {tuple(m.get_base_layer().kernel_size) for m in adapted if m.kind == "conv2d"}
        expected = {(3, 3), (1, 1)} if model_name == "unet" else {(2, 2)}
        assert expected <= kernels, f"Conv2d kernels adapted: {kernels}"
    torch.testing.assert_close(output(peft_model, args, kwargs), output(reference, args, kwargs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("peft_type,model_name", list(method_params()))
def test_merged_equals_unmerged(peft_type, model_name):
    peft_model, reference, args, kwargs, _ = wrap(peft_type, model_name)
    perturb(peft_model)
    adapted = output(peft_model, args, kwargs)
    base = output(reference, args, kwargs)
    scale = float(adapted.abs().max())
    assert float((adapted - base).abs().max()) > 1e-3 * scale, "perturbing the adapter must change the output"
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, orthoft.OrthoLayer) for m in merged.modules())
    assert type(merged) is type(reference)
    torch.testing.assert_close(output(merged, args, kwargs), adapted, atol=2e-4 * scale, rtol=1e-4)
