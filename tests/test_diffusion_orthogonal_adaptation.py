"""Orthogonal Adaptation on a tiny random UNet: bases, merging, saving, interference measures (fast)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from orthoft.adapters import orthogonal_adaptation
from orthoft.diffusion import concepts
from orthoft.diffusion.models import build_tiny_unet, noise_prediction, unet_target_modules

NAMES = ["c0", "c1", "c2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared CPU
    yield
    torch.set_num_threads(previous)


def inputs():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 1, 16, 16, generator=generator)
    return sample, torch.tensor([5, 300, 900]), torch.randn(3, 5, 32, generator=generator)


def concepts_unet(basis: str = "orthogonal", rank: int = 4, trained: bool = True):
    """A tiny UNet with three concept adapters of ``basis``; B perturbed as if trained."""
    unet = build_tiny_unet(seed=0, cross_attention_dim=32)
    targets = unet_target_modules()
    configs = [
        orthogonal_adaptation.OrthogonalAdaptationConfig(
            target_modules=targets, rank=rank, concept_index=i, basis=basis
        )
        for i in range(3)
    ]
    peft_model = get_peft_model(unet, configs[0], adapter_name=NAMES[0])
    for name, config in zip(NAMES[1:], configs[1:]):
        peft_model.add_adapter(name, config)
    if trained:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in sorted(peft_model.named_parameters()):
                if "orthoft_oa_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    concepts.activate(peft_model, NAMES)
    return peft_model


def test_orthogonal_bases_are_orthonormal_and_mutually_orthogonal_on_every_layer_kind():
    peft_model = concepts_unet()
    layers = concepts.concept_layers(peft_model)
    assert {layer.kind for layer in layers} == {"linear", "conv2d"}
    for layer in layers:
        stacked = torch.cat([layer.basis(n).double() for n in NAMES])  # (3 * rank, in_features)
        eye = torch.eye(stacked.shape[0], dtype=torch.float64)
        assert torch.allclose(stacked @ stacked.T, eye, atol=1e-6), layer.module_name
    assert concepts.basis_overlap(peft_model, NAMES) < 1e-6
    concepts.check_mergeable(peft_model, NAMES)


def test_a_slot_computed_alone_is_the_slice_of_the_shared_basis():
    # concepts are trained apart: slot 2 computed on its own must match slot 2 of a 3-slot draw
    alone = orthogonal_adaptation.concept_basis(144, 4, 2, "orthogonal", 0, "down_blocks.0.resnets.0.conv1")
    first = orthogonal_adaptation.concept_basis(144, 4, 0, "orthogonal", 0, "down_blocks.0.resnets.0.conv1")
    assert torch.allclose(alone.double() @ first.double().T, torch.zeros(4, 4, dtype=torch.float64), atol=1e-6)
    other_layer = orthogonal_adaptation.concept_basis(144, 4, 0, "orthogonal", 0, "down_blocks.0.resnets.0.conv2")
    assert not torch.allclose(first, other_layer), "each layer has its own basis"
    again = orthogonal_adaptation.concept_basis(144, 4, 2, "orthogonal", 0, "down_blocks.0.resnets.0.conv1")
    assert torch.equal(alone, again)


@pytest.mark.parametrize("basis", ["independent", "gaussian"])
def test_random_bases_overlap(basis):
    peft_model = concepts_unet(basis)
    assert concepts.basis_overlap(peft_model, NAMES) > 0.05
    with pytest.raises(ValueError, match="overlapping bases"):
        concepts.check_mergeable(peft_model, NAMES)


def test_identity_at_init_and_sum_merge_equals_all_active():
    sample, timesteps, states = inputs()
    reference = build_tiny_unet(seed=0, cross_attention_dim=32)
    expected = noise_prediction(reference, sample, timesteps, states)
    untrained = concepts_unet(trained=False)
    torch.testing.assert_close(noise_prediction(untrained, sample, timesteps, states), expected, atol=1e-6, rtol=0)

    peft_model = concepts_unet()
    with torch.no_grad():
        together = noise_prediction(peft_model, sample, timesteps, states)
    assert (together - expected).abs().max() > 1e-2
    deltas = {
        layer.module_name: sum(layer.adapter_delta_weight(n) for n in NAMES)
        for layer in concepts.concept_layers(peft_model)
    }
    bases = {layer.module_name: {n: layer.basis(n) for n in NAMES} for layer in concepts.concept_layers(peft_model)}
    readback = {
        layer.module_name: {n: layer.orthoft_oa_B[n].detach().clone() for n in NAMES}
        for layer in concepts.concept_layers(peft_model)
    }
    merged = concepts.merge_concepts(peft_model, NAMES)
    with torch.no_grad():
        torch.testing.assert_close(noise_prediction(merged, sample, timesteps, states), together, atol=1e-4, rtol=1e-4)
    # each concept's B is recoverable from the summed update: A_c A_c'^T = 0 and A_c A_c^T = I
    for module_name, delta in deltas.items():
        for name in NAMES:
            torch.testing.assert_close(
                concepts.b_from_merged(delta, bases[module_name][name]), readback[module_name][name], atol=1e-5, rtol=0
            )


def test_save_and_load_concepts_keeps_the_saved_bases(tmp_path, monkeypatch):
    sample, timesteps, states = inputs()
    peft_model = concepts_unet()
    with torch.no_grad():
        expected = noise_prediction(peft_model, sample, timesteps, states)
    peft_model.save_pretrained(tmp_path)
    dirs = {name: tmp_path / name for name in NAMES}  # PEFT saves adapters other than "default" in subfolders
    # the bases travel with the adapters: loading must not depend on re-deriving them from the RNG
    real_basis = orthogonal_adaptation.concept_basis
    monkeypatch.setattr(orthogonal_adaptation, "concept_basis", lambda *args: torch.full_like(real_basis(*args), 0.5))
    loaded = concepts.load_concepts(build_tiny_unet(seed=0, cross_attention_dim=32), dirs)
    with torch.no_grad():
        torch.testing.assert_close(noise_prediction(loaded, sample, timesteps, states), expected, atol=1e-6, rtol=0)
    for saved_layer, loaded_layer in zip(concepts.concept_layers(peft_model), concepts.concept_layers(loaded)):
        for name in NAMES:
            assert torch.equal(saved_layer.basis(name), loaded_layer.basis(name))


def test_interference_measures_orthogonal_vs_independent_bases():
    sample, timesteps, states = inputs()

    def measure(basis):
        peft_model = concepts_unet(basis)

        def run(_name):
            return noise_prediction(peft_model, sample, timesteps, states)

        to_own, to_output = concepts.output_interference(peft_model, NAMES, run)
        return (
            concepts.subspace_interference(peft_model, NAMES),
            concepts.layer_interference(peft_model, NAMES, run),
            to_own,
        )

    orthogonal, independent = measure("orthogonal"), measure("independent")
    # inside each concept's basis span the merge leaves the concept's update untouched
    assert orthogonal[0].mean < 1e-5
    assert independent[0].mean > 0.05
    assert orthogonal[0].mean < 1e-3 * independent[0].mean
    for measured in (*orthogonal[1:], *independent[1:]):
        assert all(0 < value < float("inf") for value in measured.per_concept.values())


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="Fix: lower rank"):
        orthogonal_adaptation.concept_basis(16, 8, 2, "orthogonal", 0, "layer")
    with pytest.raises(ValueError, match="basis"):
        orthogonal_adaptation.OrthogonalAdaptationConfig(basis="random")
    with pytest.raises(ValueError, match="concept_index"):
        orthogonal_adaptation.OrthogonalAdaptationConfig(concept_index=-1)
