"""The digits recipes: DreamBooth on digit 9 with prior preservation, and Orthogonal Adaptation concepts.

``run_digits_recipe`` writes into the recipe's ``output_dir``:

* ``samples.png``: the same seeds before and after fine-tuning, one column per digit prompt;
* ``adapter/``: the adapter alone (PEFT format);
* ``merged_pipeline/``: the adapter merged into the UNet, saved for plain diffusers;
* ``metrics.json``: validation noise-prediction losses (subject and prior digits) before/after,
  the merged-vs-adapter and reloaded-vs-merged image differences, timings.

``run_concepts_recipe`` trains each concept of ``concepts.items`` on its own, once per basis
kind, merges them by summation and writes ``concepts.json`` (bases overlap, interference, each
concept's validation loss alone and merged) and ``concepts.png``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..defaults import cache_dir
from ..io.files import staged_directory
from . import concepts as oa
from .data import DigitImages, load_digits, split
from .grid import save_panels
from .models import TINY_SCHEDULER_CONFIG, TINY_UNET_CONFIG, build_tiny_pipeline, load_pipeline, noise_prediction
from .pipeline_io import export_pipeline, merge_adapter_into_pipeline
from .recipe import BaseSection, ConceptItem, DiffusionRecipe, RecipeError
from .train import (
    ImageSet,
    PromptEmbeddings,
    clone_pipeline_unet,
    finetune_adapter,
    generate,
    generate_prior_images,
    pretrain_unet,
    validation_loss,
)

Log = Callable[[str], None] | None


def pretrained_digits_pipeline(
    base: BaseSection, template: str = "a photo of digit {digit}", log: Log = print
) -> DiffusionPipeline:
    """The pipeline to fine-tune: ``base.pretrained``, or the tiny one pre-trained on ``base.pretrain_digits``."""
    if base.pretrained:
        return load_pipeline(base.pretrained)
    settings = base.pretrain_settings("base")
    import diffusers

    identity = {
        "unet": TINY_UNET_CONFIG,
        "scheduler": TINY_SCHEDULER_CONFIG,
        "seed": base.seed,
        "image_size": base.image_size,
        "digits": base.pretrain_digits,
        "template": template,
        "settings": vars(settings),
        "versions": [torch.__version__, diffusers.__version__],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cached = cache_dir() / "diffusion" / f"tiny-digits-{key}"
    if base.cache and (cached / "model_index.json").is_file():
        if log:
            log(f"using the cached pre-trained tiny pipeline {cached}")
        return load_pipeline(cached)
    pipeline = build_tiny_pipeline(seed=base.seed, image_size=base.image_size)
    data = load_digits(base.image_size, base.pretrain_digits, template)
    if log:
        log(f"pre-training the tiny UNet on digits {base.pretrain_digits} ({len(data)} images, {settings.steps} steps)")
    result = pretrain_unet(pipeline, ImageSet(data.images, data.prompts), settings, log=log)
    if log:
        log(f"pre-training took {result.seconds:.0f} s")
    if base.cache:
        # written to a temporary folder and renamed, so an interrupted run never leaves a half cache
        with staged_directory(cached) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
    return pipeline


def _images(data: DigitImages) -> ImageSet:
    return ImageSet(data.images, data.prompts)


def _prior_sets(recipe: DiffusionRecipe, pipeline: DiffusionPipeline) -> tuple[ImageSet | None, ImageSet]:
    """(prior images for training or None, held-out real prior-digit images to measure preservation)."""
    subject = recipe.subject
    pool = load_digits(recipe.base.image_size, subject.prior_digits, subject.prompt)
    n_eval = min(subject.num_prior_images, len(pool) // 2)
    rest, held_out = split(pool, n_eval, seed=recipe.train.seed + 1)
    if subject.prior == "none":
        return None, _images(held_out)
    if subject.prior == "dataset":
        count = min(subject.num_prior_images, len(rest))
        return _images(rest.subset(list(range(count)))), _images(held_out)
    prompts = [subject.prompt.format(digit=d) for d in subject.prior_digits]
    sampling = _sampling(recipe)
    return generate_prior_images(pipeline, prompts, subject.num_prior_images, **sampling), _images(held_out)


def _sampling(recipe: DiffusionRecipe) -> dict[str, Any]:
    return {"num_inference_steps": recipe.sample.num_inference_steps, "guidance_scale": recipe.sample.guidance_scale}


def _grid_prompts(recipe: DiffusionRecipe) -> list[str]:
    return [
        recipe.subject.prompt.format(digit=d)
        for _ in range(recipe.sample.images_per_prompt)
        for d in recipe.sample.digits
    ]


def run_digits_recipe(recipe: DiffusionRecipe, log: Log = print) -> dict[str, Any]:
    """DreamBooth of ``recipe.subject.digit`` with an orthoft adapter; returns (and writes) the metrics."""
    start = time.perf_counter()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    subject = recipe.subject
    pipeline = pretrained_digits_pipeline(recipe.base, subject.prompt, log)
    data = load_digits(recipe.base.image_size, [subject.digit], subject.prompt)
    train, validation = split(data, subject.validation_images, seed=recipe.train.seed)
    prior, prior_held_out = _prior_sets(recipe, pipeline)
    sampling = _sampling(recipe)
    grid_prompts = _grid_prompts(recipe)
    before = generate(pipeline, grid_prompts, seed=recipe.sample.seed, **sampling)
    prior_embeddings = PromptEmbeddings(pipeline, prior_held_out.prompts, pipeline.unet.device)
    prior_loss_before = validation_loss(pipeline.unet, pipeline, prior_held_out, prior_embeddings)

    if log:
        log(f"fine-tuning {recipe.adapter.method} on digit {subject.digit}: {len(train)} images, prior={subject.prior}")
    result = finetune_adapter(
        pipeline, recipe.peft_config(), _images(train), recipe.train, prior, _images(validation), log=log
    )
    peft_unet = result.model
    prior_loss_after = validation_loss(peft_unet, pipeline, prior_held_out, prior_embeddings)
    after = generate(pipeline, grid_prompts, seed=recipe.sample.seed, **sampling)
    labels = [f"{d}" + (" (subject)" if d == subject.digit else "") for d in recipe.sample.digits]
    png = save_panels(
        [
            ("base model (pre-trained on digits 0-8)", before),
            (f"after {recipe.adapter.method} fine-tuning on digit {subject.digit}", after),
        ],
        out / "samples.png",
        columns=len(recipe.sample.digits),
        column_labels=labels,
    )
    adapter_dir = out / "adapter"
    peft_unet.save_pretrained(adapter_dir)
    trainable = sum(p.numel() for p in peft_unet.parameters() if p.requires_grad)

    check_prompts = [subject.prompt.format(digit=subject.digit)] * 2
    with_adapter = generate(pipeline, check_prompts, seed=123, **sampling)
    merge_adapter_into_pipeline(pipeline, peft_unet)
    merged = generate(pipeline, check_prompts, seed=123, **sampling)
    merged_dir = export_pipeline(pipeline, out / "merged_pipeline")
    reloaded = DiffusionPipeline.from_pretrained(str(merged_dir))
    reloaded.set_progress_bar_config(disable=True)
    from_disk = generate(reloaded, check_prompts, seed=123, **sampling)

    metrics = {
        "method": recipe.adapter.method,
        "subject_digit": subject.digit,
        "trainable_parameters": trainable,
        "train_images": len(train),
        "prior": subject.prior,
        "validation_loss_before": result.validation_before,
        "validation_loss_after": result.validation_after,
        "prior_validation_loss_before": prior_loss_before,
        "prior_validation_loss_after": prior_loss_after,
        "final_train_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "merged_vs_adapter_max_abs_diff": float((merged - with_adapter).abs().max()),
        "reloaded_vs_merged_max_abs_diff": float((from_disk - merged).abs().max()),
        "train_seconds": result.seconds,
        "total_seconds": time.perf_counter() - start,
        "samples_png": str(png),
        "adapter_dir": str(adapter_dir),
        "merged_pipeline_dir": str(merged_dir),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))
    if log:
        log(
            f"validation loss {metrics['validation_loss_before']:.5f} -> {metrics['validation_loss_after']:.5f}, "
            f"prior digits {prior_loss_before:.5f} -> {prior_loss_after:.5f}; wrote {png}"
        )
    return metrics


# ---- Orthogonal Adaptation --------------------------------------------------------------------
def concept_images(item: ConceptItem, image_size: int) -> torch.Tensor:
    """Images of ``item.digit`` after ``item.transform`` (a new concept the base model never saw)."""
    images = load_digits(image_size, [item.digit]).images
    if item.transform == "mirror":
        return images.flip(-1)
    if item.transform == "rotate180":
        return images.flip(-1).flip(-2)
    if item.transform == "transpose":
        return images.transpose(-1, -2).contiguous()
    return images


def run_concepts_recipe(recipe: DiffusionRecipe, log: Log = print) -> dict[str, Any]:
    """Train every concept independently per basis kind, merge by summation, measure interference."""
    section = recipe.concepts
    if section is None:
        raise RecipeError(
            f"{recipe.source_path}: no 'concepts' section. Fix: use recipes/diffusion-digits-concepts.yaml."
        )
    if recipe.adapter.method != "orthogonal_adaptation":
        raise RecipeError(
            f"{recipe.source_path}: adapter.method is {recipe.adapter.method!r}; concepts need orthogonal_adaptation."
        )
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = section.concepts("concepts")
    names = [item.name for item in items]
    base = pretrained_digits_pipeline(recipe.base, recipe.subject.prompt, log)
    prior, _ = _prior_sets(recipe, base)
    train_sets, eval_sets = {}, {}
    for item in items:
        images = concept_images(item, recipe.base.image_size)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(section.basis_seed))
        held = order[: section.validation_images]
        train_sets[item.name] = ImageSet(
            images[order[section.validation_images :]], [item.prompt] * (len(images) - len(held))
        )
        eval_sets[item.name] = ImageSet(images[held], [item.prompt] * len(held))
    report: dict[str, Any] = {"concepts": [vars(i) for i in items], "rank": section.rank, "bases": {}}
    panels = []
    for kind in section.bases:
        dirs = {}
        for index, item in enumerate(items):
            pipeline = clone_pipeline_unet(base)
            config = recipe.peft_config(
                rank=section.rank, concept_index=index, basis=kind, basis_seed=section.basis_seed
            )
            result = finetune_adapter(
                pipeline, config, train_sets[item.name], recipe.train, prior, eval_sets[item.name], item.name, log=None
            )
            result.model.save_pretrained(out / "concepts" / kind)
            dirs[item.name] = out / "concepts" / kind / item.name
            if log:
                log(
                    f"[{kind}] {item.name}: validation loss {result.validation_before:.5f} -> "
                    f"{result.validation_after:.5f} ({result.seconds:.0f} s)"
                )
        pipeline = clone_pipeline_unet(base)
        peft_unet = oa.load_concepts(pipeline.unet, dirs)
        report["bases"][kind] = measure_concepts(pipeline, peft_unet, names, eval_sets)
        if log:
            measured = report["bases"][kind]
            log(
                f"[{kind}] basis overlap {measured['basis_overlap']:.2e}, interference: subspace "
                f"{measured['subspace_interference']['mean']:.3g}, layer {measured['layer_interference']['mean']:.3g}, "
                f"denoiser {measured['denoiser_interference']['mean']:.3g}"
            )
        if kind == section.bases[0]:
            panels = concept_panels(recipe, pipeline, peft_unet, items)
    first = section.bases[0]
    report["ratios_to_" + first] = {
        kind: {
            measure: report["bases"][first][measure]["mean"] / max(report["bases"][kind][measure]["mean"], 1e-30)
            for measure in ("subspace_interference", "layer_interference", "denoiser_interference")
        }
        for kind in section.bases[1:]
    }
    report["concepts_png"] = str(save_panels(panels, out / "concepts.png", columns=recipe.sample.images_per_prompt))
    (out / "concepts.json").write_text(json.dumps(report, indent=2, default=str))
    return report


@torch.no_grad()
def measure_concepts(
    pipeline: DiffusionPipeline, peft_unet: Any, names: list[str], eval_sets: dict[str, ImageSet], seed: int = 5
) -> dict[str, Any]:
    """Bases overlap, the three interference measures and each concept's loss alone vs merged."""
    embeddings = PromptEmbeddings(pipeline, [s.prompts[0] for s in eval_sets.values()], pipeline.unet.device)
    generator = torch.Generator().manual_seed(seed)
    fixed = {}
    for name in names:
        clean = eval_sets[name].images
        steps = pipeline.scheduler.config.num_train_timesteps
        timesteps = torch.linspace(0.05 * steps, 0.95 * steps, len(clean)).long()
        noise = torch.randn(clean.shape, generator=generator)
        fixed[name] = (
            pipeline.scheduler.add_noise(clean, noise, timesteps),
            timesteps,
            embeddings(eval_sets[name].prompts),
        )

    def run(name: str) -> torch.Tensor:
        return noise_prediction(peft_unet, *fixed[name])

    to_own, to_output = oa.output_interference(peft_unet, names, run)
    losses = {}
    for name in names:
        with peft_unet.disable_adapter():
            base_loss = validation_loss(peft_unet, pipeline, eval_sets[name], embeddings)
        with oa.active_adapters(peft_unet, [name]):
            alone = validation_loss(peft_unet, pipeline, eval_sets[name], embeddings)
        with oa.active_adapters(peft_unet, names):
            merged = validation_loss(peft_unet, pipeline, eval_sets[name], embeddings)
        losses[name] = {"base": base_loss, "alone": alone, "merged": merged}

    def summary(measure: oa.Interference) -> dict[str, Any]:
        return {"mean": measure.mean, **measure.per_concept}

    return {
        "basis_overlap": oa.basis_overlap(peft_unet, names),
        "subspace_interference": summary(oa.subspace_interference(peft_unet, names)),
        "layer_interference": summary(oa.layer_interference(peft_unet, names, run)),
        "denoiser_interference": summary(to_own),
        "denoiser_change_relative_to_prediction": summary(to_output),
        "validation_loss": losses,
    }


def concept_panels(
    recipe: DiffusionRecipe, pipeline: DiffusionPipeline, peft_unet: Any, items: list[ConceptItem]
) -> list[tuple[str, torch.Tensor]]:
    """Per concept: base model, the concept's adapter alone, all concepts merged (same seeds)."""
    names = [item.name for item in items]
    sampling = _sampling(recipe)
    count = recipe.sample.images_per_prompt
    panels = []
    for item in items:
        prompts = [item.prompt] * count
        with peft_unet.disable_adapter():
            base = generate(pipeline, prompts, seed=recipe.sample.seed, **sampling)
        with oa.active_adapters(peft_unet, [item.name]):
            alone = generate(pipeline, prompts, seed=recipe.sample.seed, **sampling)
        with oa.active_adapters(peft_unet, names):
            merged = generate(pipeline, prompts, seed=recipe.sample.seed, **sampling)
        panels += [(f"'{item.prompt}': base", base), ("its adapter alone", alone), ("all concepts merged", merged)]
    return panels
