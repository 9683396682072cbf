"""Tiny text-to-image diffusion pipelines built from fixed configs, and helpers shared with real ones.

No pretrained diffusion weights exist offline, so the tiny pipeline is built from a fixed-seed
config and pre-trained briefly on scikit-learn digits (``orthoft.diffusion.train``). It is a
pixel-space diffusers ``IFPipeline`` (the DeepFloyd IF stage-I layout: tokenizer, text encoder,
``UNet2DConditionModel``, ``DDPMScheduler``) with the offline MiniLM-L6 as text encoder, so a
saved pipeline loads with plain ``diffusers.DiffusionPipeline.from_pretrained`` and no orthoft.

Like IF, the UNet returns ``2 * in_channels`` channels: the first half is the noise prediction,
the second the variance slot IF's pipeline splits off. The scheduler uses a fixed variance
(``variance_type="fixed_small"``), so that slot is ignored by sampling and by the loss.

The same helpers serve a real Stable Diffusion 1.x/2.x pipeline (latent space through its VAE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, IFPipeline, UNet2DConditionModel

# The tiny UNet: two resolutions (16x16, 8x8), cross-attention at 8x8 and in the mid block,
# ResNet blocks with 3x3 and 1x1 convolutions. Channel counts keep every in_features a multiple
# of 16 (e.g. 3x3 conv on 16 channels: 144), so block sizes 8 and 16 fit every layer.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "cross_attention_dim": 384,  # MiniLM-L6 hidden size
}

TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",  # the linear schedule wastes most steps on noise at 16x16
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": True,
}

# Module-name suffixes of the layer groups an adapter can target in a diffusers UNet or
# Transformer2DModel/DiT (PEFT matches a name by suffix).
UNET_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feedforward": ("ff.net.0.proj", "ff.net.2"),
    "projection": ("proj_in", "proj_out"),
    "resnet": ("conv1", "conv2", "conv_shortcut"),
    "time": ("time_emb_proj",),
    "patch_embedding": ("pos_embed.proj",),  # DiT / PixArt patchify Conv2d (kernel = stride = patch size)
}


def unet_target_modules(
    groups: tuple[str, ...] | list[str] = ("attention", "feedforward", "projection", "resnet"),
) -> list[str]:
    """Target module suffixes for the named layer groups (see ``UNET_TARGET_GROUPS``)."""
    unknown = [g for g in groups if g not in UNET_TARGET_GROUPS]
    if unknown:
        raise ValueError(
            f"unet_target_modules: unknown groups {unknown}. Fix: use groups among {sorted(UNET_TARGET_GROUPS)}."
        )
    return [name for group in groups for name in UNET_TARGET_GROUPS[group]]


def build_tiny_unet(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """The tiny pixel-space UNet from ``TINY_UNET_CONFIG`` (plus ``overrides``), initialized with ``seed``."""
    config = {**TINY_UNET_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def build_tiny_scheduler(**overrides: Any) -> DDPMScheduler:
    return DDPMScheduler(**{**TINY_SCHEDULER_CONFIG, **overrides})


def load_text_encoder(path: str | Path | None = None) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, frozen BertModel) of MiniLM-L6 (``orthoft.defaults.minilm_path()``) or of ``path``."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        from ..defaults import minilm_path

        path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text_encoder = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
    return tokenizer, text_encoder


def build_tiny_pipeline(
    seed: int = 0,
    unet: UNet2DConditionModel | None = None,
    text_encoder_path: str | Path | None = None,
    image_size: int = 16,
) -> IFPipeline:
    """A pixel-space ``IFPipeline`` with MiniLM and the tiny UNet (random from ``seed`` unless ``unet`` is given)."""
    tokenizer, text_encoder = load_text_encoder(text_encoder_path)
    if unet is None:
        unet = build_tiny_unet(seed, sample_size=image_size, cross_attention_dim=text_encoder.config.hidden_size)
    elif unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(
            f"build_tiny_pipeline: the UNet's cross_attention_dim {unet.config.cross_attention_dim} does not match the "
            f"text encoder's hidden size {text_encoder.config.hidden_size}. Fix: build the UNet with "
            f"cross_attention_dim={text_encoder.config.hidden_size}."
        )
    pipeline = IFPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=build_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(path: str | Path, torch_dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """Any diffusers text-to-image pipeline (a saved tiny one, or e.g. a Stable Diffusion hub id/folder)."""
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipeline = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def is_latent_pipeline(pipeline: DiffusionPipeline) -> bool:
    """True when the denoiser works on VAE latents (Stable Diffusion), False in pixel space (IF, tiny)."""
    return getattr(pipeline, "vae", None) is not None


@torch.no_grad()
def encode_prompts(
    pipeline: DiffusionPipeline, prompts: list[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """Text-encoder hidden states exactly as the pipeline computes them at inference (no guidance)."""
    device = device or pipeline.text_encoder.device
    embeds, _ = pipeline.encode_prompt(
        prompt=list(prompts), device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return embeds


@torch.no_grad()
def images_to_model_space(
    pipeline: DiffusionPipeline, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> what the UNet denoises: VAE latents times its scaling factor, or pixels."""
    if not is_latent_pipeline(pipeline):
        return images
    vae = pipeline.vae
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def noise_prediction(
    unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """The UNet's prediction for ``noisy``; an IF-style variance half is dropped."""
    output = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    return output[:, : noisy.shape[1]]


def training_target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict under the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    raise ValueError(
        f"training_target: prediction_type {kind!r} is not supported. Fix: use epsilon, v_prediction or sample."
    )
