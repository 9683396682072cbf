"""Merge a trained orthoft adapter into its base model and save a plain Hugging Face model.

The exported folder loads with ``AutoModelForCausalLM.from_pretrained`` alone (no orthoft, no
PEFT). This script loads the base (in 4-bit if it was trained that way), attaches the adapter,
calls ``orthoft.export.export_merged`` (which measures the merge error on a probe batch), then
reloads the export with plain transformers and compares a greedy generation with the adapter model.

Examples::

    # a run written by `orthoft train` (base and quantization read from its recipe.yaml)
    python examples/merge_and_export.py --run runs/smollm2-qoft --out exported/smollm2-hamlet

    # any adapter folder
    python examples/merge_and_export.py --adapter path/to/adapter --base Qwen/Qwen2.5-7B-Instruct \\
        --load-in-4bit --dtype bf16 --out exported/qwen-metamath
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder of `orthoft train` (uses RUN/final/adapter and RUN/recipe.yaml)")
    source.add_argument("--adapter", help="an adapter folder written by save_pretrained")
    parser.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base in 4-bit NF4, as in QOFT training")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="written dtype")
    parser.add_argument("--requantize", default=None, help="save quantized again: base, nf4, fp4 or int8")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--prompt", default="The", help="prompt of the before/after generation check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orthoft.export import export_merged, load_for_export

    adapter, base, load_in_4bit = args.adapter, args.base, args.load_in_4bit
    if args.run:
        from orthoft.training.models import resolve_path
        from orthoft.training.recipe import load_recipe

        recipe = load_recipe(Path(args.run) / "recipe.yaml")
        adapter = str(Path(args.run) / "final" / "adapter")
        base = base or resolve_path(recipe.model.name_or_path)
        load_in_4bit = load_in_4bit or recipe.model.load_in_4bit

    from peft import PeftConfig

    import orthoft  # noqa: F401  (registers the methods, so PeftConfig can read orthoft adapters)

    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    peft_model, _ = load_for_export(base, [adapter], load_in_4bit=load_in_4bit)
    tokenizer = AutoTokenizer.from_pretrained(base)
    report = export_merged(
        peft_model,
        args.out,
        dtype=args.dtype,
        quantization=args.requantize,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
    )
    print(report)

    # the export must stand alone: reload it with plain transformers and generate
    merged = AutoModelForCausalLM.from_pretrained(args.out)
    device = next(peft_model.parameters()).device
    merged.to(device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        kwargs = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        with_adapter = peft_model.generate(input_ids=inputs["input_ids"], **kwargs)
        exported = merged.generate(input_ids=inputs["input_ids"], **kwargs)
    print("adapter model :", tokenizer.decode(with_adapter[0], skip_special_tokens=True))
    print("merged export :", tokenizer.decode(exported[0], skip_special_tokens=True))
    print(f"exported to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
