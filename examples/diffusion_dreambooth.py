"""DreamBooth with an orthoft adapter: the tiny digits pipeline on CPU, or a real Stable Diffusion on a GPU.

Tiny, offline, CPU (pre-trains the tiny UNet on digits 0-8 once, ~1 min, cached; then learns
digit 9 with prior preservation, ~1 min)::

    python examples/diffusion_dreambooth.py --recipe recipes/diffusion-digits-oft.yaml
    python examples/diffusion_dreambooth.py --recipe recipes/diffusion-digits-boft.yaml --output-dir runs/boft
    python examples/diffusion_dreambooth.py --concepts recipes/diffusion-digits-concepts.yaml

Real Stable Diffusion 1.x/2.x on a GPU (needs the weights from the hub or a local folder, and a
folder of 3-10 photos of the subject; not run by the tests)::

    accelerate launch examples/diffusion_dreambooth.py \\
        --pretrained-model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance-data-dir ./dog --instance-prompt "a photo of sks dog" \\
        --class-prompt "a photo of dog" --num-class-images 200 \\
        --method oft --adapter-option block_size=32 \\
        --target-groups attention feedforward projection resnet \\
        --resolution 512 --steps 800 --batch-size 1 --learning-rate 1e-4 \\
        --mixed-precision fp16 --output-dir runs/sd15-dog-oft

It writes ``adapter/`` (a few MB), ``samples.png`` (the validation prompts before/after) and,
with ``--export-merged``, ``merged_pipeline/``: a plain diffusers Stable Diffusion folder with the
adapter folded into the UNet (Conv2d exactly), loadable with
``StableDiffusionPipeline.from_pretrained`` and no orthoft. To use the adapter without merging
(diffusers' ``pipe.load_lora_weights`` reads only LoRA and refuses it, naming this call)::

    import orthoft.diffusion as od
    pipe = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to("cuda")
    od.load_adapter(pipe, "runs/sd15-dog-oft/adapter")
    pipe("a photo of sks dog on the beach").images[0]
    od.merge_adapters(pipe); od.export_pipeline(pipe, "sd15-dog-merged")   # the same as --export-merged

Any registered method works (``--method boft --adapter-option block_size=8``, ``hra``, ``psoft``,
...); OFT's block size must divide every adapted layer's ``in_features`` (SD 1.5: 320/640/1280
channels, 3x3 convs x9, text states 768), so 32 fits all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="a digits recipe YAML (tiny pipeline, CPU)")
    parser.add_argument("--concepts", help="an Orthogonal Adaptation concepts recipe YAML")
    parser.add_argument("--pretrained-model", help="Stable Diffusion hub id or folder (GPU run)")
    parser.add_argument("--instance-data-dir", type=Path, help="folder with the subject's images")
    parser.add_argument("--instance-prompt", default="a photo of sks dog")
    parser.add_argument("--class-prompt", help="class prompt for prior preservation (omit to train without prior)")
    parser.add_argument("--num-class-images", type=int, default=200)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--validation-prompts", nargs="*", default=None)
    parser.add_argument("--method", default="oft")
    parser.add_argument("--adapter-option", action="append", default=[], help="KEY=VALUE (YAML value), repeatable")
    parser.add_argument("--target-groups", nargs="+", default=["attention", "feedforward", "projection", "resnet"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--ema-decay", type=float, default=None)
    parser.add_argument("--num-inference-steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-merged", action="store_true", help="also save the merged pipeline")
    parser.add_argument("--output-dir", help="overrides the recipe's output_dir / default runs/dreambooth")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)")
    args = parser.parse_args(argv)
    modes = [bool(args.recipe), bool(args.concepts), bool(args.pretrained_model)]
    if sum(modes) != 1:
        parser.error("give exactly one of --recipe, --concepts or --pretrained-model")
    if args.pretrained_model and args.instance_data_dir is None:
        parser.error("--pretrained-model needs --instance-data-dir (a folder of subject images)")
    return args


def load_instance_images(folder: Path, resolution: int) -> torch.Tensor:
    """RGB images resized (shorter side) and center-cropped to ``resolution``, in [-1, 1] (N, 3, H, W)."""
    import numpy as np
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not paths:
        raise FileNotFoundError(
            f"{folder} has no .png/.jpg/.jpeg/.webp images. Fix: point --instance-data-dir at them."
        )
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images)


def run_stable_diffusion(args: argparse.Namespace) -> dict:
    from accelerate import PartialState

    from orthoft.diffusion.grid import save_panels
    from orthoft.diffusion.loaders import merge_adapters
    from orthoft.diffusion.models import load_pipeline, unet_target_modules
    from orthoft.diffusion.pipeline_io import export_pipeline
    from orthoft.diffusion.train import (
        DenoiserTrainingSettings,
        ImageSet,
        finetune_adapter,
        generate,
        generate_prior_images,
    )
    from orthoft.io.schema import method_config_class

    out = Path(args.output_dir or "runs/dreambooth")
    out.mkdir(parents=True, exist_ok=True)
    device = PartialState().device
    pipeline = load_pipeline(args.pretrained_model).to(device)
    sampling = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    instance = load_instance_images(args.instance_data_dir, args.resolution)
    prior = None
    if args.class_prompt:
        prior = generate_prior_images(pipeline, [args.class_prompt], args.num_class_images, batch_size=4, **sampling)
    prompts = args.validation_prompts or [args.instance_prompt, f"{args.instance_prompt} on the beach"]
    before = generate(pipeline, prompts, seed=args.seed, batch_size=4, **sampling)

    options = {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in args.adapter_option)}
    config = method_config_class(args.method)(target_modules=unet_target_modules(args.target_groups), **options)
    settings = DenoiserTrainingSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=min(50, args.steps // 10),
        prior_loss_weight=args.prior_loss_weight,
        ema_decay=args.ema_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
    )
    result = finetune_adapter(
        pipeline, config, ImageSet(instance, [args.instance_prompt] * len(instance)), settings, prior=prior
    )
    result.model.save_pretrained(out / "adapter")
    after = generate(pipeline, prompts, seed=args.seed, batch_size=4, **sampling)
    png = save_panels(
        [("base", before), (f"after {args.method}", after)], out / "samples.png", columns=len(prompts), scale=1
    )
    report = {"adapter_dir": str(out / "adapter"), "samples_png": str(png), "final_loss": result.losses[-1]}
    if args.export_merged:
        merge_adapters(pipeline)  # the adapter trained in place in pipeline.unet
        report["merged_pipeline_dir"] = str(export_pipeline(pipeline, out / "merged_pipeline"))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pretrained_model:
        report = run_stable_diffusion(args)
    else:
        from orthoft.diffusion.digits import run_concepts_recipe, run_digits_recipe
        from orthoft.diffusion.recipe import load_recipe

        overrides = {"output_dir": args.output_dir} if args.output_dir else {}
        recipe = load_recipe(args.recipe or args.concepts, **overrides)
        report = (run_digits_recipe if args.recipe else run_concepts_recipe)(recipe)
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
