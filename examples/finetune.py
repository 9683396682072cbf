"""QLoRA-style fine-tuning of your own model with an orthoft method on one GPU (or CPU).

The base model is loaded in 4-bit NF4 (frozen), an orthogonal adapter is trained on top, and the
result is an adapter folder (plus, with --export, a merged model). Under the hood this builds a
recipe and runs the same loop as ``orthoft train`` (checkpoints, --resume, metrics, curves).

Examples::

    # instruction data from the hub, chat template, loss on answers only
    python examples/finetune.py --model Qwen/Qwen2.5-7B-Instruct --method oft \\
        --dataset meta-math/MetaMathQA --prompt-template "{query}" --response-template "{response}" \\
        --chat-template --max-steps 1000 --lr 4e-4

    # your own plain-text file, a small model, CPU
    python examples/finetune.py --model smollm2 --dataset notes.txt --method boft \\
        --adapter-option block_size=8 --max-steps 50 --batch-size 4 --seq-len 128

Anything this script does not expose (classification, evaluation metrics, schedules, export
dtype) is a recipe key: see recipes/ and orthoft/training/recipe.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from orthoft.training.recipe import RecipeError, recipe_from_dict  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id or local folder (or 'smollm2' / 'minilm')")
    parser.add_argument(
        "--method", default="oft", help="oft (QOFT on a 4-bit base), boft, qgoft, hra, psoft, svft or clover"
    )
    parser.add_argument(
        "--adapter-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method config field, YAML value, e.g. block_size=16 or target_modules=[q_proj,v_proj]; repeatable",
    )
    parser.add_argument("--dataset", required=True, help="a local .txt file, 'hamlet', or a datasets hub id")
    parser.add_argument("--dataset-config", default=None, help="datasets config name")
    parser.add_argument("--text-field", default="text", help="plain-text field of a hub dataset")
    parser.add_argument("--prompt-template", default=None, help="instruction data: str.format template of a row")
    parser.add_argument("--response-template", default=None, help="instruction data: the answer the loss covers")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts with the tokenizer's chat template")
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=512, help="block size for text, max length for instructions")
    parser.add_argument("--no-4bit", action="store_true", help="keep the base in its own dtype (no bitsandbytes)")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--optimizer", default="adamw", help="adamw, muon, normuon, turbomuon, root, auon")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--output-dir", default=None, help="default: runs/<model>-<method>")
    parser.add_argument("--export", action="store_true", help="write a merged model to <output-dir>/merged at the end")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    parser.add_argument("--print-recipe", action="store_true", help="print the recipe this builds and exit")
    return parser.parse_args(argv)


def build_recipe(args: argparse.Namespace) -> dict:
    """The recipe (as YAML-ready data) for these arguments."""
    adapter: dict = {"method": args.method}
    if args.method not in ("clover",):  # CLOVER picks the attention projections per model type
        adapter["target_modules"] = "all-linear"
    for item in args.adapter_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--adapter-option {item!r}: expected KEY=VALUE, e.g. block_size=16")
        adapter[key.strip()] = yaml.safe_load(value)

    path = Path(args.dataset)
    if args.dataset == "hamlet":
        data: dict = {"source": "hamlet", "block_size": args.seq_len}
    elif path.is_file():
        data = {"source": "text_file", "path": str(path), "block_size": args.seq_len}
    else:
        data = {"source": "hf", "path": args.dataset, "hf_config": args.dataset_config, "text_field": args.text_field}
        data.update(block_size=args.seq_len, max_length=args.seq_len)
        if args.prompt_template or args.response_template:
            data.update(prompt_template=args.prompt_template, response_template=args.response_template)
        data["use_chat_template"] = args.chat_template
    if args.max_train_examples:
        data["max_train_examples"] = args.max_train_examples

    name = Path(args.model.rstrip("/")).name.lower()
    return {
        "description": f"examples/finetune.py: {args.method} on {args.model} with {args.dataset}",
        "model": {
            "name_or_path": args.model,
            "task": "causal_lm",
            "load_in_4bit": not args.no_4bit,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
        },
        "adapter": adapter,
        "data": data,
        "train": {
            "output_dir": args.output_dir or f"runs/{name}-{args.method}",
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": args.grad_accum,
            "warmup_steps": min(50, args.max_steps // 10),
            "gradient_checkpointing": args.gradient_checkpointing,
            "eval_every": args.eval_every,
            "save_every": args.save_every,
            "log_every": 10,
        },
        "optim": {"name": args.optimizer, "lr": args.lr},
        "eval": {"max_batches": 50},
        "export": {"enabled": args.export},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = build_recipe(args)
    try:
        recipe = recipe_from_dict(raw, source="examples/finetune.py arguments")
    except RecipeError as err:
        raise SystemExit(str(err)) from None
    if args.print_recipe:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        return 0
    from orthoft.training.loop import train

    summary = train(recipe, resume=args.resume, overwrite=args.overwrite)
    print(f"adapter: {summary['adapter_dir']}  (load with peft.PeftModel.from_pretrained after `import orthoft`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
