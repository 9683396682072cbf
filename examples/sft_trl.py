"""Supervised fine-tuning with TRL's SFTTrainer, an orthoft adapter and an orthoft optimizer.

By default it runs offline in a minute or two on CPU: the embedded SmolLM2-135M-Instruct
(``orthoft.defaults``), passages of Hamlet, a qGOFT adapter on every linear layer, Muon, 5 steps.
The qGOFT/HRA training penalties reach SFTTrainer's loss by themselves (no extra code), and the
adapter folder it writes carries a model card saying how to load it (``import orthoft``).

Examples::

    python examples/sft_trl.py                                    # offline, a few steps
    python examples/sft_trl.py --method hra --adapter-option r=8 --optimizer normuon --max-steps 200
    python examples/sft_trl.py --dataset notes.txt --out runs/sft-notes     # your own text file
    python examples/sft_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/Capybara \\
        --max-steps 500 --bf16                                     # hub model and chat data (needs network)

The order that matters: wrap the model with ``get_peft_model`` first, then build the optimizer
from the wrapped model and hand both to SFTTrainer. An optimizer built on the bare model holds
weights that the wrapping freezes (``build_optimizer`` refuses such a model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="hub id or local folder; 'smollm2' is the embedded one")
    parser.add_argument(
        "--dataset",
        default="hamlet",
        help="'hamlet' (embedded), a local .txt (passages of --lines-per-example lines), a local .json/.jsonl "
        "with a 'text' or 'messages' field, or a datasets hub id",
    )
    parser.add_argument("--lines-per-example", type=int, default=8, help="for 'hamlet' and .txt files")
    parser.add_argument("--max-examples", type=int, default=256)
    parser.add_argument("--method", default="qgoft", help="orthoft method: oft, boft, qgoft, hra, psoft, svft, clover")
    parser.add_argument(
        "--adapter-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method config field, YAML value, e.g. reg_lambda=0.01 or target_modules=[q_proj,v_proj]; repeatable",
    )
    parser.add_argument(
        "--optimizer", default="muon", help="muon, normuon, turbomuon, root, auon, hybridauon, or adamw"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of the orthogonalized groups")
    parser.add_argument("--adamw-lr", type=float, default=None, help="of the AdamW fallback group (default: --lr)")
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=96, help="tokens per example")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--out", default="runs/sft-trl", help="output folder: checkpoints and adapter/")
    return parser.parse_args(argv)


def model_path(name: str) -> str:
    if name.lower() == "smollm2":
        from orthoft.defaults import smollm2_path

        return str(smollm2_path())
    return name


def load_dataset(spec: str, lines_per_example: int, max_examples: int) -> Any:
    import datasets

    if spec == "hamlet" or spec.endswith(".txt"):
        if spec == "hamlet":
            from orthoft.defaults import hamlet_text

            text = hamlet_text()
        else:
            text = Path(spec).read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        passages = ["\n".join(lines[i : i + lines_per_example]) for i in range(0, len(lines), lines_per_example)]
        return datasets.Dataset.from_dict({"text": passages[:max_examples]})
    if spec.endswith((".json", ".jsonl")):
        data = datasets.load_dataset("json", data_files=spec, split="train")
    else:
        data = datasets.load_dataset(spec, split="train")
    return data.select(range(min(max_examples, len(data))))


def adapter_config(method: str, options: list[str]) -> Any:
    from orthoft.adapters.registry import registered_methods

    if method not in registered_methods():
        raise SystemExit(f"--method {method!r}: not an orthoft method; use one of {sorted(registered_methods())}")
    values: dict[str, Any] = {"target_modules": "all-linear"}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise SystemExit(f"--adapter-option {option!r}: expected KEY=VALUE, e.g. block_size=16")
        values[key] = yaml.safe_load(value)
    return registered_methods()[method](**values)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # before the heavy imports: --help stays quick
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import orthoft  # registers orthoft's methods with PEFT
    from orthoft.adapters.card import write_adapter_card
    from orthoft.optim import build_optimizer

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    config = adapter_config(args.method, args.adapter_option)
    model = get_peft_model(model, config)  # first wrap ...
    model.print_trainable_parameters()
    optimizer = build_optimizer(model, args.optimizer, lr=args.lr, adamw_lr=args.adamw_lr)  # ... then build
    data = load_dataset(args.dataset, args.lines_per_example, args.max_examples)
    sft_args = SFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    with torch.no_grad():
        start_penalty = orthoft.regularization_loss(model).item()
    trainer = SFTTrainer(
        model=model, args=sft_args, train_dataset=data, processing_class=tokenizer, optimizers=(optimizer, None)
    )
    result = trainer.train()
    with torch.no_grad():
        end_penalty = orthoft.regularization_loss(model).item()
    adapter_dir = Path(args.out) / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter_config.json, weights, README.md naming orthoft
    training = {
        "data": f"{args.dataset} ({len(data)} examples, max_length {args.max_length})",
        "hyperparameters": {
            "optimizer": args.optimizer,
            "lr": args.lr,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": args.grad_accum,
        },
        "metrics": {"train_loss": round(result.training_loss, 4), "penalty_end": round(end_penalty, 6)},
    }
    write_adapter_card(adapter_dir, model.peft_config["default"], training)
    print(f"train loss {result.training_loss:.4f}; adapter penalty {start_penalty:.4g} -> {end_penalty:.4g}")
    print(f"adapter: {adapter_dir} (load it after `import orthoft`; see its README.md)")


if __name__ == "__main__":
    main()
