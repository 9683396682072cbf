"""Which learning rate each orthoft method wants, per optimizer: MiniLM-L6 on Rotten Tomatoes.

Every method (adapters as in ``recipes/minilm-sentiment-*.yaml``: query/key/value/dense) x {AdamW,
Muon, NorMuon, TurboMuon, ROOT, AuON} x a log-spaced lr grid, and LoRA r8 (PEFT) through the same
grids as the reference (its A and B go to the orthogonalized optimizers as plain matrices). One
short fine-tune per point (default 100 steps x 16, max length 48): cosine schedule with 10% warmup,
grad-norm clip 1.0, the method's regularizer added to the loss, batches grouped by length (a seeded
shuffle, then length-sorted inside windows of 32 batches, the windows' batches shuffled: HF
Trainer's ``group_by_length``). Orthogonalized optimizers send what they cannot orthogonalize
(vectors, the head) to AdamW at the method's best AdamW lr so far in the JSONL (the table's value
before there is one), which is also what ``optim.lr: auto`` does. Test accuracy on the embedded
test split (1,275 snippets).

Two departures from the recipes, for a shared CPU (docs/quality.md): adapters only on the top
``--adapt-layers`` (default 2) of the 6 layers, the frozen bottom layers' outputs computed once per
process and reused by every run (``--adapt-layers 6`` adapts all); and a mean-pooled linear head
(how all-MiniLM-L6-v2 was trained) instead of BERT's [CLS] pooler, with which short runs barely
learn.

Each finished run is appended to a JSONL file as one record, and a point already in the file is
not run again: a cut-off keeps what finished and a rerun resumes. Phases (``--phases``), in order:

- ``grid``: the lr grids of ``--methods`` x ``--optimizers`` (or of ``--jobs METHOD:OPT,OPT ...``);
- ``seeds``: ``--seeds`` seeds at each pair's best grid lr;
- ``auto``: every pair at ``orthoft.recommended_lr`` (usually a grid point, reused).

``--sensitivity FILE`` also appends each method's one-step sensitivity at init (the muP-style
check of docs/quality.md). The markdown table (best lr, accuracy per seed, diverged lrs, the rule's
lr, the ``lr: auto`` accuracy, params, seconds per run) is printed at the end; with ``--phases``
and nothing after it, only the table is made, from the JSONL.

    python eval/bench_quality.py --quick            # OFT and LoRA x AdamW and Muon x 3 lrs: 12 runs of 60 steps
    python eval/bench_quality.py --out eval/results/quality.jsonl --budget-minutes 60
    python eval/bench_quality.py --out eval/results/quality.jsonl --phases --table docs/quality-table.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orthoft.optim.optimizers import OPTIMIZERS as OPTIMIZERS_BY_NAME
from orthoft.optim.optimizers import AuON

TARGETS = ["query", "key", "value", "dense"]
HEAD = ["classifier"]
ADAMW_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
ORTHOGONALIZED_GRID = [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
GRIDS = {
    "adamw": ADAMW_GRID,
    "muon": ORTHOGONALIZED_GRID,
    "normuon": ORTHOGONALIZED_GRID,
    "turbomuon": ORTHOGONALIZED_GRID,
    "root": ORTHOGONALIZED_GRID,
    "auon": ORTHOGONALIZED_GRID,
}
OPTIMIZERS = list(GRIDS)
# AuON as it was before the trust-region bound (the "before" of docs/quality.md); bench only
EXTRA_OPTIMIZERS = {"auon_unbounded": ORTHOGONALIZED_GRID}
METHODS = ["oft", "boft", "qgoft", "hra", "psoft", "svft", "clover", "lora"]
# bench-only variants, with the method whose recommended lr they use: SVFT on truncated bases (the fast setting)
VARIANT_METHODS = {"svft_r128": "svft"}
CHANCE_LOSS = math.log(2)


def adapter_config(method: str) -> Any:
    """The recipes' adapter for ``method`` (LoRA: r 8, alpha 16, the same target modules)."""
    import peft

    import orthoft

    common = {"modules_to_save": list(HEAD), "task_type": "SEQ_CLS"}
    factories: dict[str, Callable[[], Any]] = {
        "oft": lambda: orthoft.OFTConfig(target_modules=TARGETS, block_size=32, **common),
        "boft": lambda: orthoft.BOFTConfig(target_modules=TARGETS, block_size=8, n_butterfly_factor=2, **common),
        "qgoft": lambda: orthoft.QGOFTConfig(target_modules=TARGETS, reg_lambda=1e-3, **common),
        "hra": lambda: orthoft.HRAConfig(target_modules=TARGETS, r=8, reg_lambda=1e-4, **common),
        "psoft": lambda: orthoft.PSOFTConfig(target_modules=TARGETS, r=32, **common),
        "svft": lambda: orthoft.SVFTConfig(target_modules=TARGETS, pattern="banded", bandwidth=2, **common),
        "svft_r128": lambda: orthoft.SVFTConfig(
            target_modules=TARGETS, pattern="banded", bandwidth=2, rank=128, svd="lowrank", **common
        ),
        "clover": lambda: orthoft.CLOVERConfig(
            target_modules=["query", "key", "value"],
            projection_roles={"query": "q", "key": "k", "value": "v"},
            **common,
        ),
        "lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **common),
    }
    return factories[method]()


class Task:
    """Tokenized Rotten Tomatoes (``orthoft.defaults``) and the frozen bottom layers' outputs, once per process.

    Only the top ``adapt_layers`` of MiniLM's 6 layers carry adapters, so the bottom ones are the
    same function in every run: their output is computed once per snippet (on first use) and each
    run trains on it. That is what makes a grid of hundreds of runs fit a shared CPU.
    """

    def __init__(self, max_length: int, test_size: int | None, adapt_layers: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        from orthoft.defaults import minilm_path, rotten_tomatoes

        self.model_path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.frozen = AutoModel.from_pretrained(self.model_path).eval()
        self.num_layers = self.frozen.config.num_hidden_layers
        if not 1 <= adapt_layers <= self.num_layers:
            raise ValueError(f"--adapt-layers must be in 1..{self.num_layers}, got {adapt_layers}")
        self.first_adapted = self.num_layers - adapt_layers
        splits = rotten_tomatoes(0)
        self.train = self._encode(splits["train"], max_length)
        test = self._encode(splits["test"][:test_size], max_length)
        self._states: dict[tuple[str, int], torch.Tensor] = {}
        order = sorted(range(len(test)), key=lambda i: len(test[i][0]))  # sorted: little padding
        self._fill("test", test, order)
        self.test_batches = [self._collate("test", test, order[k : k + 64]) for k in range(0, len(order), 64)]
        self.test_size = len(test)

    def _encode(self, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
        ids = self.tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)["input_ids"]
        return [(i, r["label"]) for i, r in zip(ids, rows, strict=True)]

    @torch.no_grad()
    def _fill(self, split: str, examples: list[tuple[list[int], int]], indices: list[int]) -> None:
        missing = sorted((i for i in indices if (split, i) not in self._states), key=lambda i: len(examples[i][0]))
        pad = self.tokenizer.pad_token_id
        for k in range(0, len(missing), 64):
            chunk = missing[k : k + 64]
            width = max(len(examples[i][0]) for i in chunk)
            ids = torch.tensor([examples[i][0] + [pad] * (width - len(examples[i][0])) for i in chunk])
            mask = (torch.arange(width) < torch.tensor([len(examples[i][0]) for i in chunk])[:, None]).long()
            hidden = self.frozen(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for row, i in enumerate(chunk):
                self._states[(split, i)] = hidden[self.first_adapted][row, : len(examples[i][0])].clone()

    def _collate(self, split: str, examples: list[tuple[list[int], int]], indices: list[int]) -> dict:
        states = [self._states[(split, i)] for i in indices]
        width = max(len(x) for x in states)
        hidden = torch.zeros(len(states), width, states[0].shape[-1])
        mask = torch.zeros(len(states), width, dtype=torch.long)
        for row, x in enumerate(states):
            hidden[row, : len(x)], mask[row, : len(x)] = x, 1
        labels = torch.tensor([examples[i][1] for i in indices])
        return {"hidden_states": hidden, "attention_mask": mask, "labels": labels}

    def fixed_batch(self, size: int) -> dict[str, torch.Tensor]:
        """The first ``size`` training snippets as one batch."""
        self._fill("train", self.train, list(range(size)))
        return self._collate("train", self.train, list(range(size)))

    def batches(self, steps: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(seed)
        order = list(range(len(self.train)))
        rng.shuffle(order)
        order = order[: steps * batch_size]
        window = 32 * batch_size
        chunks = []
        for start in range(0, len(order), window):
            part = sorted(order[start : start + window], key=lambda i: len(self.train[i][0]))
            chunks += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
        rng.shuffle(chunks)
        self._fill("train", self.train, order)
        return [self._collate("train", self.train, chunk) for chunk in chunks]


class TopLayersClassifier(torch.nn.Module):
    """The PEFT-wrapped encoder's top layers on cached hidden states, mean pooling, a linear ``classifier``.

    Mean pooling is how all-MiniLM-L6-v2 was trained. The head is named like the recipes' so
    routing keeps it on AdamW.
    """

    def __init__(self, encoder: torch.nn.Module, first_adapted: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.first_adapted = first_adapted
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        dtype = hidden_states.dtype
        additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        hidden = hidden_states
        for layer in self.encoder.get_base_model().encoder.layer[self.first_adapted :]:
            hidden = layer(hidden, additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.classifier((hidden * mask).sum(1) / mask.sum(1))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return argparse.Namespace(logits=logits, loss=loss)


def build_model(task: Task, method: str, seed: int) -> torch.nn.Module:
    import peft
    from transformers import AutoModel

    config = adapter_config(method)
    config.task_type, config.modules_to_save = "FEATURE_EXTRACTION", None
    config.layers_to_transform = list(range(task.first_adapted, task.num_layers))
    encoder = peft.get_peft_model(AutoModel.from_pretrained(task.model_path), config)
    torch.manual_seed(seed)  # the new head
    return TopLayersClassifier(encoder, task.first_adapted)


class UnboundedAuON(AuON):
    """AuON before the trust-region bound: ``cosh_brake(M)`` as it is (for the before/after table)."""

    def trust_region(self, direction: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        return direction


def build_run_optimizer(model: torch.nn.Module, method: str, optimizer: str, lr: float, adamw_lr: float) -> Any:
    from orthoft.optim import build_optimizer

    OPTIMIZERS_BY_NAME.setdefault("auonunbounded", UnboundedAuON)  # the bench's own, never the package's
    if optimizer == "adamw":
        return build_optimizer(model, "adamw", lr=lr, weight_decay=0.0)
    return build_optimizer(
        model, optimizer, lr=lr, adamw_lr=adamw_lr, adamw_weight_decay=0.0, muon_for_plain_matrices=method == "lora"
    )


def run_point(task: Task, point: dict[str, Any], steps: int, batch_size: int) -> dict[str, Any]:
    """One fine-tune; returns the JSONL record (accuracy, diverged, params, seconds)."""
    from transformers import get_scheduler


    start = time.perf_counter()
    model = build_model(task, point["method"], point["seed"])
    params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    optimizer = build_run_optimizer(model, point["method"], point["optimizer"], point["lr"], point["adamw_lr"])
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    model.train()
    for batch in task.batches(steps, batch_size, point["seed"]):
        loss = model(**batch).loss  # the model's loss includes the qGOFT/HRA penalty
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if not math.isfinite(losses[-1]):
            break
    train_seconds = time.perf_counter() - start
    finite = all(math.isfinite(v) for v in losses)
    accuracy = evaluate(model, task) if finite else 0.0
    tail = statistics.mean(losses[-20:]) if finite else float("nan")
    return {
        **point,
        "steps": steps,
        "batch_size": batch_size,
        "accuracy": accuracy,
        "train_loss_tail": tail,
        # diverged: a non-finite loss, or the last 20 steps no better than guessing (ln 2)
        "diverged": not finite or tail >= CHANCE_LOSS,
        "params": params,
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_seconds, 1),
        "test_size": task.test_size,
        "torch": torch.__version__,
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task) -> float:
    model.eval()
    correct = 0
    for batch in task.test_batches:
        labels = batch["labels"]
        logits = model(hidden_states=batch["hidden_states"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / task.test_size


# ----------------------------------------------------------------------------------------------- records


def point_key(point: dict[str, Any]) -> tuple:
    return (point["method"], point["optimizer"], round(point["lr"], 12), point["seed"], point.get("variant", ""))


def read_records(path: Path, steps: int | None = None, adapt_layers: int | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [
        r
        for r in records
        if (steps is None or r["steps"] == steps) and (adapt_layers is None or r.get("adapt_layers") == adapt_layers)
    ]


def best_lr(records: list[dict[str, Any]], method: str, optimizer: str, variant: str = "") -> float | None:
    """The grid lr with the highest seed-0 accuracy (every grid point has seed 0; ties: the lower lr)."""
    by_lr = {
        r["lr"]: r["accuracy"]
        for r in records
        if r["method"] == method and r["optimizer"] == optimizer and r.get("variant", "") == variant and r["seed"] == 0
    }
    return max(sorted(by_lr), key=lambda lr: by_lr[lr]) if by_lr else None


def majority_accuracy(test_size: int | None) -> float:
    """Test accuracy of always answering the majority label: a run at or near it has collapsed."""
    from orthoft.defaults import rotten_tomatoes

    labels = [r["label"] for r in rotten_tomatoes(0)["test"][:test_size]]
    return max(labels.count(0), labels.count(1)) / len(labels)


def collapsed(record: dict[str, Any], majority: float) -> bool:
    """Diverged: a non-finite loss, a last-20 training loss no better than guessing (ln 2), or a
    test accuracy within 1 point of always answering the majority label."""
    return bool(record["diverged"]) or record["accuracy"] <= majority + 0.01


def default_lr(by_lr: dict[float, float], cliff: float = 0.03, tie: float = 0.01) -> float:
    """The rule behind ``orthoft.recommended_lr``: the low end of the best lr's plateau.

    From the best grid lr, step down while the next lower lr is within ``tie`` of the best (one
    point: below this benchmark's standard error of about 1.2, so those lrs are ties); the low end
    of a plateau is the choice that survives deeper or longer runs, whose upper lr edge moves down
    (docs/quality.md). With no plateau below it, the best lr, or one step lower when the next higher
    lr diverged or lost more than ``cliff`` (an optimum at a cliff's edge).
    """
    grid = sorted(by_lr)
    best = max(grid, key=lambda lr: by_lr[lr])
    i = j = grid.index(best)
    while j > 0 and by_lr[grid[j - 1]] >= by_lr[best] - tie:
        j -= 1
    if j == i and 0 < i < len(grid) - 1 and by_lr[grid[i + 1]] < by_lr[best] - cliff:
        j = i - 1
    return grid[j]


def adamw_lr_for(records: list[dict[str, Any]], method: str) -> float:
    from orthoft.optim import recommended_lr

    measured = best_lr([r for r in records if r["seed"] == 0], method, "adamw")
    return measured if measured is not None else recommended_lr(VARIANT_METHODS.get(method, method), "adamw")


def plan(phase: str, args: argparse.Namespace, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from orthoft.optim import recommended_lr

    points = []
    for method, optimizer in args.pairs:
        if optimizer != "adamw" and method == "svft":
            continue  # SVFT trains vectors only: every optimizer is its AdamW fallback
        grid = {**GRIDS, **EXTRA_OPTIMIZERS}[optimizer]
        base = {"method": method, "optimizer": optimizer, "variant": args.variant, "adapt_layers": args.adapt_layers}
        if phase == "grid":
            lrs, seeds = args.grid.get(optimizer, grid), [0]
        elif phase == "seeds":
            best = best_lr([r for r in records if r["seed"] == 0], method, optimizer, args.variant)
            lrs, seeds = ([best] if best is not None else []), list(range(1, args.seeds))
        elif optimizer in EXTRA_OPTIMIZERS:
            continue  # no recommended lr: not a package optimizer
        else:  # auto
            lrs, seeds = [recommended_lr(VARIANT_METHODS.get(method, method), optimizer)], list(range(args.seeds))
        points += [{**base, "lr": lr, "seed": seed} for lr in lrs for seed in seeds]
    return points


def run_phases(args: argparse.Namespace, task: Task) -> None:
    deadline = time.monotonic() + args.budget_minutes * 60
    for phase in args.phases:
        records = read_records(args.out, args.steps, args.adapt_layers)
        done = {point_key(r) for r in records}
        for point in plan(phase, args, records):
            # re-read: another process working on the same file may have run this point meanwhile
            records = read_records(args.out, args.steps, args.adapt_layers)
            done |= {point_key(r) for r in records}
            if point_key(point) in done:
                continue
            if time.monotonic() > deadline:
                print(f"budget of {args.budget_minutes} min spent: stopping before {point}")
                return
            # the fallback (vectors, head) of an orthogonalized optimizer: the method's best AdamW lr so far
            point["adamw_lr"] = point["lr"] if point["optimizer"] == "adamw" else adamw_lr_for(records, point["method"])
            record = run_point(task, point, args.steps, args.batch_size)
            with args.out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            done.add(point_key(point))
            print(
                f"[{phase}] {record['method']:>6} {record['optimizer']:>9} lr {record['lr']:<7g} seed "
                f"{record['seed']} acc {record['accuracy']:.3f} loss {record['train_loss_tail']:.3f}"
                f"{' DIVERGED' if record['diverged'] else ''} {record['seconds']:.0f}s",
                flush=True,
            )


def step_sensitivity(task: Task, method: str, optimizer: str, lr: float = 1e-3, examples: int = 64) -> float:
    """Relative change of the top layer's output per unit lr after ONE optimizer step from the init.

    The muP-style question: if ``best lr x sensitivity`` is about the same for every method, a
    per-method scale measured at init (a forward, a backward and a step, seconds) would let one lr
    serve all methods. The head is frozen here so only the adapter moves.
    """
    model = build_model(task, method, 0)
    model.classifier.requires_grad_(False)
    optimizer_ = build_run_optimizer(model, method, optimizer, lr, adamw_lr=lr)
    batch = task.fixed_batch(examples)
    model.eval()  # no dropout: the change is the step's alone
    hidden = {}

    def grab(_module: Any, _inputs: Any, output: Any) -> None:
        hidden["h"] = output[0] if isinstance(output, tuple) else output

    handle = model.encoder.get_base_model().encoder.layer[-1].register_forward_hook(grab)
    loss = model(**batch).loss
    before = hidden["h"].detach().clone()
    loss.backward()
    optimizer_.step()
    with torch.no_grad():
        model(**batch)
    handle.remove()
    mask = batch["attention_mask"].unsqueeze(-1).to(before.dtype)
    return float(((hidden["h"] - before) * mask).norm() / (before * mask).norm() / lr)


# ----------------------------------------------------------------------------------------------- table


def summarize(
    records: list[dict[str, Any]], method: str, optimizer: str, variant: str = "", majority: float = 0.5
) -> dict[str, Any] | None:
    """Best grid lr, its accuracy (mean over seeds), the diverged lrs, and the ``lr: auto`` accuracy."""
    from orthoft.optim import recommended_lr

    rows = [
        r for r in records if r["method"] == method and r["optimizer"] == optimizer and r.get("variant", "") == variant
    ]
    if not rows:
        return None
    best = best_lr(rows, method, optimizer, variant)
    at_best = [r for r in rows if r["lr"] == best]
    table_method = VARIANT_METHODS.get(method, method)
    auto = recommended_lr(table_method, optimizer) if not variant and optimizer in GRIDS else None
    at_auto = [r for r in rows if auto is not None and math.isclose(r["lr"], auto)]
    grid = sorted({r["lr"] for r in rows if r["seed"] == 0})
    summary = {
        "best_lr": best,
        "accuracy": statistics.mean(r["accuracy"] for r in at_best),
        "seeds": len(at_best),
        "seed_accuracies": [r["accuracy"] for r in sorted(at_best, key=lambda r: r["seed"])],
        "diverged": sorted({r["lr"] for r in rows if collapsed(r, majority)}),
        "grid": grid,
        "auto_lr": auto,
        "auto_accuracy": statistics.mean(r["accuracy"] for r in at_auto) if at_auto else None,
        "auto_seeds": [r["accuracy"] for r in sorted(at_auto, key=lambda r: r["seed"])],
        "params": rows[0]["params"],
        "seconds": statistics.median(r["seconds"] for r in rows),
        "by_lr": {lr: statistics.mean(r["accuracy"] for r in rows if r["lr"] == lr and r["seed"] == 0) for lr in grid},
    }
    summary["rule_lr"] = default_lr(summary["by_lr"]) if len(grid) >= 3 else None
    return summary


def markdown_table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| method | optimizer | params | best lr | test acc (seeds) | diverged lrs | rule lr | "
        "`lr: auto` | auto acc (seeds) | acc per grid lr (seed 0) | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = sorted({r.get("variant", "") for r in records})
    majority = majority_accuracy(records[0]["test_size"]) if records else 0.5
    for method in [*METHODS, *VARIANT_METHODS]:
        for optimizer in [*OPTIMIZERS, *EXTRA_OPTIMIZERS]:
            for variant in variants:
                s = summarize(records, method, optimizer, variant, majority)
                if s is None:
                    continue
                name = optimizer + (f" ({variant})" if variant else "")
                grid = ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in s["by_lr"].items())
                auto_acc = (
                    ""
                    if s["auto_accuracy"] is None
                    else (f"{s['auto_accuracy']:.3f} (" + " / ".join(f"{a:.3f}" for a in s["auto_seeds"]) + ")")
                )
                auto_lr = "" if s["auto_lr"] is None else f"{s['auto_lr']:g}"
                seeds = " / ".join(f"{a:.3f}" for a in s["seed_accuracies"])
                diverged = ", ".join(f"{lr:g}" for lr in s["diverged"]) or "none"
                rule = "" if s["rule_lr"] is None else f"{s['rule_lr']:g}"
                lines.append(
                    f"| {method} | {name} | {s['params']:,} | {s['best_lr']:g} | {s['accuracy']:.3f} "
                    f"({seeds}) | {diverged} | {rule} | {auto_lr} | {auto_acc} | {grid} | "
                    f"{s['seconds']:.0f} |"
                )
    return "\n".join(lines) + "\n"


def measured_defaults(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The rule lr of every measured (method, optimizer): what ``orthoft.optim.learning_rates`` should hold."""
    majority = majority_accuracy(records[0]["test_size"]) if records else 0.5
    table: dict[str, dict[str, float]] = {}
    for method in METHODS:
        for optimizer in OPTIMIZERS:
            s = summarize(records, method, optimizer, "", majority)
            if s is not None and s["rule_lr"] is not None and len(s["grid"]) >= 5:
                table.setdefault(method, {})[optimizer] = s["rule_lr"]
    return table


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in {**GRIDS, **EXTRA_OPTIMIZERS} or not values:
            raise argparse.ArgumentTypeError(f"--grid takes OPTIMIZER=LR,LR,... with OPTIMIZER in {OPTIMIZERS}")
        grid[name] = [float(v) for v in values.split(",")]
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("eval/results/quality.jsonl"))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*METHODS, *VARIANT_METHODS])
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=[*OPTIMIZERS, *EXTRA_OPTIMIZERS])
    parser.add_argument(
        "--jobs",
        nargs="*",
        default=None,
        help="run these METHOD:OPT,OPT pairs in this order instead of --methods x --optimizers",
    )
    parser.add_argument("--phases", nargs="*", default=["grid", "seeds", "auto"], choices=["grid", "seeds", "auto"])
    parser.add_argument("--grid", nargs="*", default=[], help="override a grid: OPTIMIZER=LR,LR,...")
    parser.add_argument("--seeds", type=int, default=2, help="seeds at the best points and at lr: auto")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--test-size", type=int, default=None, help="first N test snippets (default: all 1,275)")
    parser.add_argument("--budget-minutes", type=float, default=600.0, help="start no run after this")
    parser.add_argument("--variant", default="", help="a label stored with the records (e.g. an A/B of code)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapt-layers", type=int, default=2, help="adapters on MiniLM's top N layers (6: all)")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table here")
    parser.add_argument(
        "--sensitivity",
        type=Path,
        default=None,
        help="append the one-step sensitivity at init of --methods x {adamw, muon} to this JSONL",
    )
    parser.add_argument("--defaults", action="store_true", help="also print each measured pair's rule lr")
    parser.add_argument("--quick", action="store_true", help="OFT and LoRA, AdamW and Muon, 3 lrs, 60 steps")
    args = parser.parse_args()
    args.grid = parse_grid(args.grid)
    args.pairs = [(m, o) for m in args.methods for o in args.optimizers]
    if args.jobs is not None:
        args.pairs = [(job.partition(":")[0], o) for job in args.jobs for o in job.partition(":")[2].split(",")]
    if args.quick:
        args.pairs = [(m, o) for m in ("oft", "lora") for o in ("adamw", "muon")]
        args.steps, args.seeds = 60, 1
        args.grid = {"adamw": [1e-3, 3e-3, 1e-2], "muon": [1e-2, 3e-2, 1e-1]}
        args.test_size = args.test_size or 400
        if args.out == parser.get_default("out"):
            args.out = Path("eval/results/quality-quick.jsonl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    task = Task(args.max_length, args.test_size, args.adapt_layers) if args.phases or args.sensitivity else None
    if args.phases:
        run_phases(args, task)
    if args.sensitivity is not None:
        with args.sensitivity.open("a", encoding="utf-8") as handle:
            for method, optimizer in [(m, o) for m in args.methods for o in ("adamw", "muon")]:
                value = step_sensitivity(task, method, optimizer)
                print(f"sensitivity {method:>6} {optimizer:>9}: {value:.4g} per unit lr", flush=True)
                handle.write(
                    json.dumps(
                        {
                            "method": method,
                            "optimizer": optimizer,
                            "sensitivity": value,
                            "adapt_layers": args.adapt_layers,
                        }
                    )
                    + "\n"
                )
    records = read_records(args.out, args.steps, args.adapt_layers)
    table = markdown_table(records)
    print(table)
    if args.defaults:
        print("measured rule lrs (orthoft/optim/learning_rates.py):")
        for method, row in measured_defaults(records).items():
            print(f"  {method}: " + ", ".join(f"{opt}={lr:g}" for opt, lr in row.items()))
    if args.table is not None:
        args.table.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
