"""The Stable Diffusion (latent) code path, smoke-tested on a tiny random SD-layout pipeline on CPU.

The real Stable Diffusion command in ``examples/diffusion_dreambooth.py`` needs hub weights and a
GPU; this runs the same script on a ``StableDiffusionPipeline`` built from config (tiny VAE,
MiniLM text encoder, tiny UNet on 4-channel latents), so the VAE encoding, SD prompt encoding,
class-image generation, training, adapter saving, merging and export are exercised here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from orthoft.diffusion.models import build_tiny_unet, load_text_encoder
from orthoft.diffusion.train import generate

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "diffusion_dreambooth.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared CPU
    yield
    torch.set_num_threads(previous)


def tiny_stable_diffusion(path: Path) -> Path:
    tokenizer, text_encoder = load_text_encoder()
    tokenizer.model_max_length = 16  # SD pads prompts to this; 512 would only slow the test
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    unet = build_tiny_unet(seed=0, sample_size=8, in_channels=4, out_channels=4)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def test_example_script_on_a_tiny_stable_diffusion_layout(tmp_path):
    base = tiny_stable_diffusion(tmp_path / "tiny-sd")
    instance_dir = tmp_path / "subject"
    instance_dir.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(instance_dir / f"{i}.png")  # non-square: exercises resize + crop

    spec = importlib.util.spec_from_file_location("diffusion_dreambooth", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    output = tmp_path / "run"
    argv = [
        "--pretrained-model", str(base), "--instance-data-dir", str(instance_dir),
        "--instance-prompt", "a photo of sks texture", "--class-prompt", "a photo of texture",
        "--num-class-images", "2", "--method", "oft", "--adapter-option", "block_size=8",
        "--resolution", "16", "--steps", "3", "--batch-size", "2", "--learning-rate", "1e-2",
        "--num-inference-steps", "3", "--export-merged", "--output-dir", str(output),
    ]  # fmt: skip
    assert example.main(argv) == 0
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert Image.open(output / "samples.png").width > 0

    # the adapter loaded into the base pipeline and the exported merged pipeline sample the same image
    from orthoft.diffusion.pipeline_io import load_adapter_into_pipeline

    adapted = DiffusionPipeline.from_pretrained(str(base))
    adapted.set_progress_bar_config(disable=True)
    load_adapter_into_pipeline(adapted, output / "adapter")
    merged = DiffusionPipeline.from_pretrained(str(output / "merged_pipeline"))
    merged.set_progress_bar_config(disable=True)
    assert type(merged) is StableDiffusionPipeline
    prompts = ["a photo of sks texture"]
    expected = generate(adapted, prompts, seed=3, num_inference_steps=3)
    torch.testing.assert_close(generate(merged, prompts, seed=3, num_inference_steps=3), expected, atol=1e-4, rtol=0)
