"""orthoft adapters in diffusers pipelines (``orthoft.diffusion.loaders``) and diffusers' guarded LoRA loaders.

On the tiny pixel-space IF pipeline (random fixed-seed UNet, MiniLM text encoder) and a tiny DiT
pipeline: a saved adapter loaded with ``load_adapter`` samples exactly the images of the pipeline
it was saved from; ``save_adapter`` round-trips, switching/disabling/merging/exporting behave; and
diffusers' own loaders refuse an orthoft adapter with a message naming ``load_adapter`` while a
real LoRA still loads through them unchanged.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import orthoft.diffusion as od
from orthoft.adapters import BOFTConfig, HRAConfig, OFTConfig, OrthogonalAdaptationConfig
from orthoft.diffusion import guard
from orthoft.diffusion.models import build_tiny_pipeline, build_tiny_unet, unet_target_modules
from orthoft.diffusion.train import clone_pipeline_unet, generate
from tests.helpers import perturb_adapters

PROMPTS = ["a photo of digit 9", "a photo of digit 1"]
TARGETS = unet_target_modules(("attention", "feedforward", "projection", "resnet"))
# adapter -> config; "oft2" is a second OFT adapter (another seed): one layer holds adapters of one method only
CONFIGS = {
    "oft": lambda: OFTConfig(target_modules=TARGETS, block_size=8),
    "oft2": lambda: OFTConfig(target_modules=TARGETS, block_size=8),
    "boft": lambda: BOFTConfig(target_modules=TARGETS, block_size=4, n_butterfly_factor=2),
    "hra": lambda: HRAConfig(target_modules=TARGETS, r=4),
    "orthogonal_adaptation": lambda: OrthogonalAdaptationConfig(target_modules=TARGETS, rank=2),
}
REFUSED = r"is an orthoft adapter \(ORTHOFT_OFT\).*orthoft\.diffusion\.load_adapter\(pipe, path\)"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared CPU
    yield
    torch.set_num_threads(previous)


def sample(pipeline: DiffusionPipeline) -> torch.Tensor:
    return generate(pipeline, PROMPTS, seed=0, num_inference_steps=3)


@pytest.fixture(scope="module")
def base():
    pipeline = build_tiny_pipeline(seed=0)
    return pipeline, sample(pipeline)


def fresh(base) -> DiffusionPipeline:
    return clone_pipeline_unet(base[0])


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """method -> (adapter folder written by PeftModel.save_pretrained, the images of the pipeline it came from)."""
    root = tmp_path_factory.mktemp("adapters")
    result = {}
    for seed, (method, make_config) in enumerate(CONFIGS.items()):
        pipeline = fresh(base)
        peft_unet = get_peft_model(pipeline.unet, make_config())
        torch.manual_seed(seed)
        perturb_adapters(peft_unet, scale=0.1)
        peft_unet.save_pretrained(root / method)
        result[method] = (root / method, sample(pipeline))
    return result


def adapter_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("method", ["oft", "boft", "hra", "orthogonal_adaptation"])
def test_load_adapter_samples_the_images_of_the_saved_pipeline(base, saved, method):
    folder, expected = saved[method]
    assert (expected - base[1]).abs().max() > 1e-2  # the adapter changes the images, so equality means something
    pipeline = fresh(base)
    assert od.load_adapter(pipeline, folder) == "default"
    assert torch.equal(sample(pipeline), expected)
    assert od.list_adapters(pipeline) == {"default": f"ORTHOFT_{method.upper()}"}
    assert od.active_adapters(pipeline) == ["default"]
    adapter_tensors = [p for layer in adapter_layers(pipeline.unet) for p in layer.parameters()]
    assert adapter_tensors and not any(p.requires_grad for p in adapter_tensors)  # frozen for inference


def test_save_adapter_round_trip(base, saved, tmp_path):
    pipeline = fresh(base)
    od.load_adapter(pipeline, saved["oft"][0])
    od.load_adapter(pipeline, saved["oft2"][0], adapter_name="b")
    out = od.save_adapter(pipeline, tmp_path / "saved")
    assert {"adapter_config.json", "adapter_model.safetensors", "b"} <= {p.name for p in out.iterdir()}
    for folder, original in ((out, saved["oft"][0]), (out / "b", saved["oft2"][0])):
        written, expected = (
            load_file(folder / "adapter_model.safetensors"),
            load_file(original / "adapter_model.safetensors"),
        )
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"].startswith("ORTHOFT_")

    reloaded = fresh(base)
    od.load_adapter(reloaded, out)
    od.load_adapter(reloaded, out / "b", adapter_name="b")
    for pipe in (pipeline, reloaded):
        od.set_adapters(pipe, ["default", "b"])
    assert torch.equal(sample(reloaded), sample(pipeline))
    # PEFT's own loader reads save_adapter's folder too
    other = fresh(base)
    PeftModel.from_pretrained(other.unet, str(out))
    assert torch.equal(sample(other), saved["oft"][1])

    with pytest.raises(FileExistsError, match="overwrite=True"):
        od.save_adapter(pipeline, out)
    od.save_adapter(pipeline, out, adapter_names=["b"], overwrite=True)
    assert not (out / "adapter_config.json").exists() and (out / "b" / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="nothing to save"):
        od.save_adapter(fresh(base), tmp_path / "empty")


def test_set_adapters_disable_and_delete(base, saved):
    pipeline = fresh(base)
    od.load_adapter(pipeline, saved["oft"][0])
    od.load_adapter(pipeline, saved["oft2"][0], adapter_name="b")
    assert od.active_adapters(pipeline) == ["b"]  # the newly loaded adapter alone, as diffusers does
    assert torch.equal(sample(pipeline), saved["oft2"][1])
    od.set_adapters(pipeline, "default")
    assert torch.equal(sample(pipeline), saved["oft"][1])
    with od.adapters_disabled(pipeline):
        assert torch.equal(sample(pipeline), base[1])
    assert torch.equal(sample(pipeline), saved["oft"][1])
    od.set_adapters(pipeline, ["default", "b"])
    both = sample(pipeline)
    assert (both - saved["oft"][1]).abs().max() > 1e-2 and (both - saved["oft2"][1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"holds adapters \['b', 'default'\], not \['nope'\]"):
        od.set_adapters(pipeline, ["nope"])
    od.load_adapter(pipeline, saved["oft2"][0], adapter_name="c", activate=False)
    assert od.active_adapters(pipeline) == ["default", "b"] and torch.equal(sample(pipeline), both)
    od.delete_adapter(pipeline, "c")
    od.delete_adapter(pipeline, "b")
    assert od.list_adapters(pipeline) == {"default": "ORTHOFT_OFT"}
    assert torch.equal(sample(pipeline), saved["oft"][1])
    od.delete_adapter(pipeline, "default")  # the last one: the UNet is plain again
    assert not adapter_layers(pipeline.unet) and not hasattr(pipeline.unet, "peft_config")
    assert torch.equal(sample(pipeline), base[1])


def test_merge_and_export_for_plain_diffusers(base, saved, tmp_path):
    pipeline = fresh(base)
    od.load_adapter(pipeline, saved["oft"][0])
    od.load_adapter(pipeline, saved["oft2"][0], adapter_name="b")
    od.set_adapters(pipeline, ["default", "b"])
    unmerged = sample(pipeline)
    with pytest.raises(ValueError, match=r"merge_adapters\(pipe, component='unet'\)"):
        od.export_pipeline(pipeline, tmp_path / "unmerged")
    od.merge_adapters(pipeline)
    assert not adapter_layers(pipeline.unet) and not hasattr(pipeline.unet, "peft_config")
    merged = sample(pipeline)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    exported = DiffusionPipeline.from_pretrained(str(od.export_pipeline(pipeline, tmp_path / "merged")))
    exported.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(exported), merged, atol=1e-6, rtol=0)


def test_load_adapter_errors_leave_the_pipeline_unchanged(base, saved, tmp_path):
    pipeline = fresh(base)
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        od.load_adapter(pipeline, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"has no model component 'transformer'.*'text_encoder', 'unet'"):
        od.load_adapter(pipeline, saved["oft"][0], component="transformer")
    od.load_adapter(pipeline, saved["oft"][0])
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        od.load_adapter(pipeline, saved["oft2"][0])
    with pytest.raises(TypeError, match="already holds a OFTLayer adapter of another method"):
        od.load_adapter(pipeline, saved["boft"][0], adapter_name="b")
    assert od.list_adapters(pipeline) == {"default": "ORTHOFT_OFT"}  # the failed load left nothing behind
    assert torch.equal(sample(pipeline), saved["oft"][1])
    # the same architecture at other widths: the tensors do not fit
    narrow = build_tiny_unet(seed=0, block_out_channels=(8, 16))
    with pytest.raises(ValueError, match=r"does not fit the base model UNet2DConditionModel"):
        od.load_adapter(narrow, saved["oft"][0])
    assert not adapter_layers(narrow) and not hasattr(narrow, "peft_config")


def tiny_dit_pipeline() -> DiTPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
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
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def test_transformer_pipelines_take_the_adapter_in_their_transformer(tmp_path):
    pipeline = tiny_dit_pipeline()
    config = OFTConfig(target_modules=unet_target_modules(("attention", "feedforward")), block_size=8)
    peft_model = get_peft_model(copy.deepcopy(pipeline.transformer), config)
    perturb_adapters(peft_model, scale=0.1)
    peft_model.save_pretrained(tmp_path / "dit-oft")
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),)
    kwargs = {"timestep": torch.tensor([3, 700]), "class_labels": torch.tensor([1, 7])}
    with torch.no_grad():
        expected = peft_model(*inputs, **kwargs).sample
        before = pipeline.transformer(*inputs, **kwargs).sample
        od.load_adapter(pipeline, tmp_path / "dit-oft")  # no unet: the transformer
        after = pipeline.transformer(*inputs, **kwargs).sample
    assert (expected - before).abs().max() > 1e-3
    assert torch.equal(after, expected)
    assert od.list_adapters(pipeline, component="transformer") == {"default": "ORTHOFT_OFT"}


# ---- diffusers' own loaders ----------------------------------------------------------------
def test_guard_wraps_every_diffusers_lora_loader_once():
    assert guard.install() == 0  # done by `import orthoft.diffusion`; a second install wraps nothing
    loaders = {cls.__name__: cls for cls in guard.lora_loader_classes() if "load_lora_weights" in vars(cls)}
    for name in ("StableDiffusionLoraLoaderMixin", "StableDiffusionXLLoraLoaderMixin", "FluxLoraLoaderMixin"):
        assert name in loaders
    assert all(hasattr(vars(cls)["load_lora_weights"], guard.GUARD_MARK) for cls in loaders.values())
    assert all(hasattr(vars(cls)["lora_state_dict"].__func__, guard.GUARD_MARK) for cls in loaders.values())


def test_diffusers_lora_loaders_refuse_orthoft_adapters(base, saved, tmp_path, monkeypatch):
    folder = saved["oft"][0]
    weights = folder / "adapter_model.safetensors"
    pipeline = fresh(base)
    unet = pipeline.unet
    calls = [
        lambda: pipeline.load_lora_weights(str(folder)),
        lambda: pipeline.load_lora_weights(folder, weight_name="adapter_model.safetensors", adapter_name="x"),
        lambda: type(pipeline).lora_state_dict(str(folder)),
        lambda: unet.load_lora_adapter(str(folder)),
        lambda: unet.load_lora_adapter(str(folder), weight_name="adapter_model.safetensors"),  # diffusers: no-op
        lambda: unet.load_lora_adapter(str(folder), weight_name="adapter_model.safetensors", prefix=None),
        lambda: unet.load_lora_adapter(str(weights)),
        lambda: unet.load_lora_adapter(load_file(weights)),
        lambda: unet.load_attn_procs(str(folder)),
        lambda: pipeline.load_lora_weights(pretrained_model_name_or_path_or_dict=str(folder)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=REFUSED):
            call()
    assert not adapter_layers(unet) and not hasattr(unet, "peft_config")

    # weights copied without their adapter_config.json, under diffusers' LoRA file name: caught once fetched
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pytorch_lora_weights.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match=r"ORTHOFT_OFT.*load_adapter"):
        pipeline.load_lora_weights(str(bare))

    # a hub repository holding an orthoft adapter: its adapter_config.json is looked at first
    def fake_download(repo_id, filename, **kwargs):
        assert (repo_id, filename) == ("someone/orthoft-adapter", "adapter_config.json")
        return str(folder / filename)

    monkeypatch.setattr(guard.huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(ValueError, match=r"someone/orthoft-adapter is an orthoft adapter"):
        unet.load_lora_adapter("someone/orthoft-adapter", weight_name="adapter_model.safetensors")


def test_a_lora_still_loads_through_diffusers(base, tmp_path):
    lora_pipeline = fresh(base)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    lora_pipeline.unet.add_adapter(config)
    expected = sample(lora_pipeline)
    assert (expected - base[1]).abs().max() > 1e-2
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_pipeline.unet))
    type(lora_pipeline).save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)

    pipeline = fresh(base)
    assert hasattr(type(pipeline).load_lora_weights, guard.GUARD_MARK)  # the call below goes through the guard
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(sample(pipeline), expected, atol=1e-5, rtol=0)
    unet = fresh(base).unet
    unet.load_lora_adapter(
        str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix="unet", adapter_name="lora"
    )
    assert list(unet.peft_config) == ["lora"]


def test_diffusers_pipeline_switches_act_on_orthoft_adapters(base, saved):
    folder, expected = saved["oft"]
    pipeline = fresh(base)
    od.load_adapter(pipeline, folder)
    for call in (lambda: pipeline.set_adapters(["default"]), lambda: pipeline.unet.set_adapters("default")):
        with pytest.raises(ValueError, match=r"orthoft adapters.*orthoft\.diffusion\.set_adapters\(pipe, names\)"):
            call()
    pipeline.disable_lora()
    assert torch.equal(sample(pipeline), base[1])
    pipeline.enable_lora()
    assert torch.equal(sample(pipeline), expected)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    assert not adapter_layers(pipeline.unet)
    torch.testing.assert_close(sample(pipeline), expected, atol=1e-4, rtol=0)
