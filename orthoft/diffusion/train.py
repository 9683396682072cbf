"""Denoiser training on Accelerate: brief pre-training of the tiny UNet and DreamBooth-style adapter fine-tuning.

The loss is the usual noise-prediction MSE (or v-prediction, per the scheduler), optionally
min-SNR weighted. DreamBooth adds a prior-preservation term: the same loss on class images the
base model generated itself, so the adapter learns the subject without forgetting the class.
Text embeddings are computed once per distinct prompt with the pipeline's own
``encode_prompt``: the text encoder stays frozen, as in DreamBooth with a frozen text encoder.

Pixel-space (tiny IF-style) and latent (Stable Diffusion) pipelines share one code path; only
``images_to_model_space`` differs.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from peft import PeftConfig, get_peft_model

from ..io.dtypes import resolve_dtype
from ..training.engine import float32_trainable, make_accelerator, optimizer_update
from .models import encode_prompts, images_to_model_space, is_latent_pipeline, noise_prediction, training_target


@dataclass
class ImageSet:
    """Training images in [-1, 1] (N, C, H, W) with one prompt each."""

    images: torch.Tensor
    prompts: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.prompts):
            raise ValueError(
                f"ImageSet: {len(self.images)} images but {len(self.prompts)} prompts. Fix: give one prompt per image."
            )
        if len(self.images) == 0:
            raise ValueError("ImageSet: no images. Fix: check the data folder or the digit selection.")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class DenoiserTrainingSettings:
    """Optimization settings shared by pre-training and adapter fine-tuning.

    Args:
        steps: optimizer steps.
        batch_size: images per step (per process); with prior preservation, as many prior images again.
        learning_rate: peak AdamW learning rate, reached after ``warmup_steps`` and kept constant.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        prior_loss_weight: weight of the prior-preservation loss (used only when prior images are given).
        ema_decay: keep an exponential moving average of the trained parameters with this decay
            and use it as the final weights; ``None`` disables EMA.
        snr_gamma: min-SNR loss weighting (Hang et al. 2023; 5 is their default); ``None`` for plain MSE.
        condition_dropout: probability of training a sample with the empty prompt, which is what
            classifier-free guidance needs (pre-training only; DreamBooth keeps 0).
        gradient_accumulation_steps / mixed_precision: passed to ``accelerate.Accelerator``.
        max_grad_norm: gradient clipping.
        seed: seeds batches, noise and timesteps (offset by the process index).
        log_every: steps between log lines (0: none).
    """

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    prior_loss_weight: float = 1.0
    ema_decay: float | None = None
    snr_gamma: float | None = 5.0
    condition_dropout: float = 0.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DenoiserTrainingSettings: {name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"DenoiserTrainingSettings: learning_rate must be > 0, got {self.learning_rate}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(
                f"DenoiserTrainingSettings: ema_decay must be in (0, 1) or null, got {self.ema_decay}. Fix: e.g. 0.99."
            )
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(
                f"DenoiserTrainingSettings: condition_dropout must be in [0, 1), got {self.condition_dropout}."
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"DenoiserTrainingSettings: mixed_precision {self.mixed_precision!r} is not one of no, fp16, bf16."
            )


@dataclass
class TrainingResult:
    """What a training run returns: the trained module, loss history and validation losses."""

    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    validation_before: float | None = None
    validation_after: float | None = None
    seconds: float = 0.0


class PromptEmbeddings:
    """Text-encoder states per distinct prompt, computed once (the text encoder is frozen)."""

    def __init__(self, pipeline: DiffusionPipeline, prompts: list[str], device: torch.device) -> None:
        self.index = {p: i for i, p in enumerate(dict.fromkeys(list(prompts) + [""]))}
        self.table = encode_prompts(pipeline, list(self.index), device)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.table[torch.tensor([self.index[p] for p in prompts], device=self.table.device)]


def denoising_loss(
    unet: torch.nn.Module,
    scheduler: Any,
    clean: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """(Optionally min-SNR weighted) prediction MSE of ``unet`` on ``clean`` at random (or given) timesteps.

    The mean over the batch, or per sample with ``reduce=False``.
    """
    device = clean.device
    if noise is None:
        noise = torch.randn(clean.shape, generator=generator, device=generator.device).to(device, clean.dtype)
    if timesteps is None:
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (clean.shape[0],), generator=generator, device=generator.device).to(device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    prediction = noise_prediction(unet, noisy, timesteps, encoder_hidden_states).float()
    target = training_target(scheduler, clean, noise, timesteps).float()
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=tuple(range(1, prediction.ndim)))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps).float()
        weight = torch.clamp(snr, max=snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        per_sample = per_sample * weight
    return per_sample.mean() if reduce else per_sample


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    pipeline: DiffusionPipeline,
    data: ImageSet,
    embeddings: PromptEmbeddings,
    timesteps_per_image: int = 8,
    seed: int = 1234,
    batch_size: int = 64,
) -> float:
    """Plain noise-prediction MSE on ``data`` at evenly spaced timesteps with fixed noise: comparable across calls."""
    was_training = unet.training
    unet.eval()
    scheduler = pipeline.scheduler
    generator = torch.Generator().manual_seed(seed)
    device = next(p.device for p in unet.parameters())
    clean_all = images_to_model_space(pipeline, data.images.to(device), torch.Generator(device).manual_seed(seed))
    span = scheduler.config.num_train_timesteps
    grid = ((torch.arange(timesteps_per_image) + 0.5) * span / timesteps_per_image).long()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        clean = clean_all[start : start + batch_size]
        states = embeddings(data.prompts[start : start + batch_size])
        for t in grid:
            noise = torch.randn(clean.shape, generator=generator).to(device, clean.dtype)
            timesteps = torch.full((clean.shape[0],), int(t), device=device)
            loss = denoising_loss(unet, scheduler, clean, states, generator, None, timesteps, noise)
            total += float(loss) * clean.shape[0]
            count += clean.shape[0]
    unet.train(was_training)
    return total / count


def _batch(data: ImageSet, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    index = torch.randint(0, len(data), (size,), generator=generator)
    return data.images[index], [data.prompts[i] for i in index.tolist()]


def _micro_batch(
    data: ImageSet, prior: ImageSet | None, settings: DenoiserTrainingSettings, generator: torch.Generator
) -> tuple[torch.Tensor, list[str], int]:
    """(images, prompts, number of instance images first); prior images follow the instance images."""
    images, prompts = _batch(data, settings.batch_size, generator)
    if settings.condition_dropout > 0:
        drop = torch.rand(len(prompts), generator=generator) < settings.condition_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    n_instance = len(prompts)
    if prior is not None and settings.prior_loss_weight > 0:
        # one forward over instance + prior images, as diffusers' DreamBooth does
        prior_images, prior_prompts = _batch(prior, settings.batch_size, generator)
        images, prompts = torch.cat([images, prior_images]), prompts + prior_prompts
    return images, prompts, n_instance


def _dreambooth_loss(per_sample: torch.Tensor, n_instance: int, prior_loss_weight: float) -> torch.Tensor:
    """Mean instance loss plus the weighted mean prior-preservation loss (when prior samples follow)."""
    loss = per_sample[:n_instance].mean()
    if len(per_sample) > n_instance:
        loss = loss + prior_loss_weight * per_sample[n_instance:].mean()
    return loss


def _training_prompts(data: ImageSet, prior: ImageSet | None, validation: ImageSet | None) -> list[str]:
    return (
        list(data.prompts) + (list(prior.prompts) if prior else []) + (list(validation.prompts) if validation else [])
    )


def _log_progress(
    result: TrainingResult, settings: DenoiserTrainingSettings, log: Callable[[str], None] | None
) -> None:
    done = len(result.losses)
    if log and settings.log_every and (done % settings.log_every == 0 or done == settings.steps):
        recent = result.losses[-settings.log_every :]
        log(f"step {done}/{settings.steps} loss {sum(recent) / len(recent):.5f}")


def _record_validation(
    result: TrainingResult,
    when: str,
    model: torch.nn.Module,
    pipeline: DiffusionPipeline,
    validation: ImageSet | None,
    embeddings: PromptEmbeddings,
    log: Callable[[str], None] | None,
) -> None:
    """Set ``result.validation_<when>`` (``before``/``after``) when there is a validation set."""
    if validation is None:
        return
    value = validation_loss(model, pipeline, validation, embeddings)
    setattr(result, f"validation_{when}", value)
    if log:
        log(f"validation loss {when}: {value:.5f}")


def train_denoiser(
    pipeline: DiffusionPipeline,
    model: torch.nn.Module,
    data: ImageSet,
    settings: DenoiserTrainingSettings,
    prior: ImageSet | None = None,
    validation: ImageSet | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainingResult:
    """Train the trainable parameters of ``model`` (the pipeline's UNet, plain or PEFT-wrapped) with Accelerate.

    ``model`` must compute the pipeline's denoiser: either ``pipeline.unet`` itself or a
    ``PeftModel`` around it (adapters inject into ``pipeline.unet`` in place, so sampling with
    ``pipeline`` afterwards uses the trained adapters).
    """
    from diffusers.training_utils import EMAModel

    accelerator = make_accelerator(settings.mixed_precision, settings.gradient_accumulation_steps)
    device = accelerator.device
    _move_frozen_components(pipeline, device, settings.mixed_precision)
    model.to(device)
    trainable = float32_trainable(model)  # adapters (and a pre-trained UNet) train in float32 under any autocast
    embeddings = PromptEmbeddings(pipeline, _training_prompts(data, prior, validation), device)
    result = TrainingResult(model=model)
    _record_validation(result, "before", model, pipeline, validation, embeddings, log)

    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(1, settings.warmup_steps)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    # the prepared schedule steps once per optimizer update (per process count under DDP), as before the engine
    prepared_model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    ema = EMAModel(trainable, decay=settings.ema_decay) if settings.ema_decay is not None else None
    if ema is not None:
        ema.to(device)

    generator = torch.Generator().manual_seed(settings.seed + accelerator.process_index)
    prepared_model.train()
    start = time.perf_counter()
    for _ in range(settings.steps * settings.gradient_accumulation_steps):
        with accelerator.accumulate(prepared_model):
            images, prompts, n_instance = _micro_batch(data, prior, settings, generator)
            clean = images_to_model_space(pipeline, images.to(device))
            with accelerator.autocast():
                per_sample = denoising_loss(
                    prepared_model,
                    pipeline.scheduler,
                    clean,
                    embeddings(prompts),
                    generator,
                    settings.snr_gamma,
                    reduce=False,
                )
            loss = _dreambooth_loss(per_sample, n_instance, settings.prior_loss_weight)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                optimizer_update(accelerator, optimizer, lr_schedule, trainable, settings.max_grad_norm)
        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(trainable)
            result.losses.append(float(loss.detach()))
            _log_progress(result, settings, log)
    if ema is not None:
        ema.copy_to(trainable)
    result.seconds = time.perf_counter() - start
    result.model = accelerator.unwrap_model(prepared_model)
    result.model.eval()
    _record_validation(result, "after", result.model, pipeline, validation, embeddings, log)
    return result


def _move_frozen_components(pipeline: DiffusionPipeline, device: torch.device, mixed_precision: str) -> None:
    # frozen text encoder / VAE run in the half dtype under mixed precision, as in diffusers' scripts
    dtype = None if mixed_precision == "no" else resolve_dtype(mixed_precision, "mixed_precision")
    for name in ("text_encoder", "vae"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.to(device, dtype=dtype) if dtype is not None else module.to(device)


def pretrain_unet(
    pipeline: DiffusionPipeline,
    data: ImageSet,
    settings: DenoiserTrainingSettings,
    validation: ImageSet | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainingResult:
    """Train every UNet weight (the tiny pipeline's "pre-training"); EMA weights, if enabled, end up in the UNet."""
    pipeline.unet.requires_grad_(True)
    result = train_denoiser(pipeline, pipeline.unet, data, settings, validation=validation, log=log)
    pipeline.unet.requires_grad_(False)
    return result


def finetune_adapter(
    pipeline: DiffusionPipeline,
    peft_config: PeftConfig,
    instance: ImageSet,
    settings: DenoiserTrainingSettings,
    prior: ImageSet | None = None,
    validation: ImageSet | None = None,
    adapter_name: str = "default",
    log: Callable[[str], None] | None = print,
) -> TrainingResult:
    """DreamBooth with an orthoft adapter on ``pipeline.unet``; ``result.model`` is the ``PeftModel``.

    The adapter is injected into ``pipeline.unet`` in place, so ``pipeline(...)`` samples with it;
    ``result.model.save_pretrained(dir)`` saves the adapter alone.
    """
    pipeline.unet.requires_grad_(False)
    peft_unet = get_peft_model(pipeline.unet, peft_config, adapter_name=adapter_name)
    return train_denoiser(pipeline, peft_unet, instance, settings, prior=prior, validation=validation, log=log)


@torch.no_grad()
def generate(
    pipeline: DiffusionPipeline,
    prompts: list[str],
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) for ``prompts``; image ``i`` uses generator seed ``seed + i``.

    Seeding per image makes an image independent of the batch it was generated in, so "before"
    and "after" grids, or a saved and a reloaded pipeline, compare image by image.
    """
    device = pipeline.unet.device
    # IF pipelines default to clean_caption=True, which needs bs4/ftfy only to warn and skip it
    extra = {"clean_caption": False} if "clean_caption" in inspect.signature(pipeline.__call__).parameters else {}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        # IF-style pipelines return the raw denoised pixels for "pt"; latent ones decode to [0, 1]
        out = pipeline(
            prompt=chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
            **extra,
        ).images
        if is_latent_pipeline(pipeline):
            out = out * 2 - 1
        images.append(out.float().cpu())
    return torch.cat(images)


def generate_prior_images(
    pipeline: DiffusionPipeline, class_prompts: list[str], count: int, seed: int = 10_000, **sampling: Any
) -> ImageSet:
    """DreamBooth class images: ``count`` samples of the base model, cycling through ``class_prompts``."""
    prompts = [class_prompts[i % len(class_prompts)] for i in range(count)]
    return ImageSet(generate(pipeline, prompts, seed=seed, **sampling).clamp(-1, 1), prompts)


def clone_pipeline_unet(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """A copy of ``pipeline`` with its own deep-copied UNet (text encoder, VAE and tokenizer are shared)."""
    clone = copy.copy(pipeline)
    clone.unet = copy.deepcopy(pipeline.unet)
    clone.scheduler = copy.deepcopy(pipeline.scheduler)
    return clone


def warmup_for(steps: int) -> int:
    """A warm-up of about 10% of ``steps`` (at least 1)."""
    return max(1, math.ceil(0.1 * steps))


__all__ = [
    "DenoiserTrainingSettings",
    "ImageSet",
    "PromptEmbeddings",
    "TrainingResult",
    "clone_pipeline_unet",
    "denoising_loss",
    "finetune_adapter",
    "generate",
    "generate_prior_images",
    "pretrain_unet",
    "train_denoiser",
    "validation_loss",
]
