"""``orthoft eval``: task metrics through ``evaluate`` and orthogonality diagnostics of trained adapters.

Metrics are ``evaluate`` modules shipped in ``eval/metrics/<name>/<name>.py`` (accuracy, f1,
perplexity) and loaded by path, because the hub copies are unreachable offline.

Orthogonality diagnostics, per adapted layer and adapter (multiplicative methods, whose layer maps
inputs ``x -> x R``):

* ``orthogonality_error``: ``max |R^T R - I|`` over all entries (0 for an exact rotation; a
  truncated Cayley-Neumann series or a soft penalty leaves a small residue).
* rotation angles: a real orthogonal ``R`` has eigenvalues ``e^{+-i theta_k}`` on the unit circle;
  the angle of eigenvalue ``lambda_k`` is ``theta_k = |arg lambda_k|`` in ``[0, 180]`` degrees (a
  reflection's ``-1`` counts as 180). Reported: ``max_angle_deg``, ``mean_angle_deg`` and
  ``rms_angle_deg`` over all ``d`` eigenvalues (directions left fixed count as 0, so the mean is
  diluted by them on purpose: it measures how much of the space moved).
* ``trace_angle_deg = arccos(trace(R) / d)``: since ``trace R = sum_k cos theta_k`` this is the
  angle whose cosine is the mean cosine; it needs no eigendecomposition and equals the RMS angle
  to second order for small angles. ``distance_from_identity = |R - I|_F``.

``R`` comes from the layer itself: OFT layers expose their ``(n, b, b)`` blocks through
``OFTLayer.rotations(adapter)`` (eigenvalues per block; the union is the spectrum of the block-diagonal);
other multiplicative layers give the dense map as ``layer.transform_input(adapter, I)`` (skipped
above ``max_dense_dim`` features, eigenvalues only up to ``max_eig_dim``). Layers with an output
scale also report ``max |s - 1|``. Additive methods (``W + dW``) and layers without an input-side
map (CLOVER's per-head cores) report the relative weight change ``|W' - W|_F / |W|_F``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

METRICS_DIR_ENV = "ORTHOFT_METRICS_DIR"


# ---- metric modules ---------------------------------------------------------------------------
def metrics_dir() -> Path:
    """Folder of the shipped metric modules: ``$ORTHOFT_METRICS_DIR`` or ``eval/metrics`` of the checkout."""
    import os

    if os.environ.get(METRICS_DIR_ENV):
        return Path(os.environ[METRICS_DIR_ENV])
    return Path(__file__).resolve().parent.parent / "eval" / "metrics"


def load_metric(name: str) -> Any:
    """``evaluate.load`` of a shipped metric module by path."""
    import evaluate

    path = metrics_dir() / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in metrics_dir().glob("*") if (p / f"{p.name}.py").is_file())
        raise FileNotFoundError(
            f"Metric module {path / (name + '.py')} not found (available: {available}). orthoft loads metrics "
            f"from the checkout's eval/metrics; set {METRICS_DIR_ENV} to that folder when orthoft is installed "
            "elsewhere."
        )
    return evaluate.load(str(path))


# ---- distributed helpers (work without torch.distributed too) ----------------------------------
def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(items: list[Any]) -> list[Any]:
    """Concatenate ``items`` from every process (in rank order); a no-op in a single process."""
    rank, world = _world()
    if world == 1:
        return items
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


# ---- task metrics ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_examples(
    model: nn.Module,
    examples: list[dict[str, Any]],
    kind: str,
    metric_names: list[str],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` (sharded over processes when distributed; every process gets the result).

    ``kind`` is ``lm`` (per-token NLL -> perplexity) or ``classification`` (argmax -> accuracy, f1).
    """
    from orthoft.training.data import IGNORE_INDEX, collate, shard

    rank, world = _world()
    if max_batches is not None:
        examples = examples[: max_batches * batch_size * world]
    local = shard(examples, rank, world)
    was_training = model.training
    model.eval()
    nll_sums: list[float] = []
    counts: list[int] = []
    predictions: list[int] = []
    references: list[int] = []
    for start in range(0, len(local), batch_size):
        batch = collate(local[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if kind == "lm":
            shifted = labels[:, 1:]
            losses = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="none"
            ).view(shifted.shape)
            valid = shifted != IGNORE_INDEX
            nll_sums += (losses * valid).sum(1).tolist()
            counts += valid.sum(1).tolist()
        else:
            predictions += logits.argmax(-1).tolist()
            references += labels.tolist()
    model.train(was_training)
    results: dict[str, float] = {}
    if kind == "lm":
        nll_sums, counts = _gather(nll_sums), _gather(counts)
        if "perplexity" in metric_names:
            out = load_metric("perplexity").compute(nll_sum=nll_sums, num_tokens=counts)
            results.update(perplexity=out["perplexity"], loss=out["mean_nll"], tokens=out["num_tokens"])
    else:
        predictions, references = _gather(predictions), _gather(references)
        for name in metric_names:
            results.update(load_metric(name).compute(predictions=predictions, references=references))
        results["examples"] = len(references)
    return results


@torch.no_grad()
def generate_sample(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, device: Any, chat: bool = False
) -> str:
    """Greedy continuation of ``prompt`` (deterministic, consumes no random numbers).

    ``chat``: wrap the prompt as a user turn with the tokenizer's chat template (instruct models).
    """
    was_training = model.training
    model.eval()
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(device)
    output = model.generate(
        input_ids=encoded["input_ids"],  # not token_type_ids: BERT-style tokenizers add them, decoders reject them
        attention_mask=encoded["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


# ---- orthogonality diagnostics -----------------------------------------------------------------
def _angle_stats(eigenvalues: torch.Tensor | None, rotation_trace: float, dim: int) -> dict[str, float]:
    stats: dict[str, float] = {
        "trace_angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, rotation_trace / dim)))),
    }
    if eigenvalues is not None:
        angles = torch.rad2deg(torch.angle(eigenvalues).abs().double())
        stats.update(
            max_angle_deg=float(angles.max()),
            mean_angle_deg=float(angles.mean()),
            rms_angle_deg=float(angles.square().mean().sqrt()),
        )
    return stats


def _multiplicative_entry(layer: nn.Module, adapter: str, max_dense_dim: int, max_eig_dim: int) -> dict[str, Any]:
    from orthoft.adapters.oft import OFTLayer

    dim = layer.in_features
    if isinstance(layer, OFTLayer):  # block-diagonal: work per block, never build d x d
        blocks = layer.rotations(adapter).detach().float().cpu()
        n_blocks = dim // blocks.shape[-1]
        if blocks.shape[0] == 1 and n_blocks > 1:  # one shared block stands for all of them
            blocks = blocks.expand(n_blocks, -1, -1)
        eye = torch.eye(blocks.shape[-1])
        error = float((blocks.mT @ blocks - eye).abs().amax())
        eigenvalues = torch.linalg.eigvals(blocks.double()).reshape(-1)
        trace = float(blocks.diagonal(dim1=-2, dim2=-1).sum())
        distance = float((blocks - eye).square().sum().sqrt())
        entry = {"structure": f"{blocks.shape[0]} blocks of {blocks.shape[-1]}"}
    else:
        if dim > max_dense_dim:
            return {"skipped": f"in_features {dim} > max_dense_dim {max_dense_dim}"}
        eye = torch.eye(dim, device=next(layer.parameters()).device)
        rotation = layer.transform_input(adapter, eye).detach().float().cpu()  # rows of I @ R = R
        eye = eye.cpu()
        error = float((rotation.T @ rotation - eye).abs().amax())
        eigenvalues = torch.linalg.eigvals(rotation.double()) if dim <= max_eig_dim else None
        trace = float(rotation.trace())
        distance = float((rotation - eye).norm())
        entry = {"structure": f"dense {dim}x{dim}"}
    entry.update(orthogonality_error=error, distance_from_identity=distance, **_angle_stats(eigenvalues, trace, dim))
    scale = layer.output_scale(adapter)
    if scale is not None:
        entry["max_abs_scale_minus_1"] = float((scale.detach().float() - 1).abs().max())
    return entry


@torch.no_grad()
def orthogonality_report(model: nn.Module, max_dense_dim: int = 4096, max_eig_dim: int = 1024) -> dict[str, Any]:
    """Per-layer diagnostics of every orthoft adapter in ``model`` (see the module docstring) and a summary."""
    from orthoft.adapters.base import OrthoLayer

    layers: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        if not isinstance(module, OrthoLayer):
            continue
        for adapter in module.adapter_configs:
            if not module.has_adapter(adapter):
                continue
            entry: dict[str, Any] = {"layer": name, "adapter": adapter, "method": module.method_name}
            # no input-side map to inspect (additive methods, CLOVER's per-head cores): report how far W moved
            input_side = type(module).transform_input is not OrthoLayer.transform_input
            if module.additive or not input_side:
                base = module.dense_base_weight()
                delta = module.get_delta_weight(adapter).float()
                kind = "additive" if module.additive else "reparametrized"
                entry.update(kind=kind, relative_delta=float(delta.norm() / base.norm().clamp_min(1e-12)))
            else:
                stats = _multiplicative_entry(module, adapter, max_dense_dim, max_eig_dim)
                entry.update(kind="multiplicative", **stats)
            layers.append(entry)
    summary: dict[str, Any] = {"layers": len(layers)}
    for summary_key, key, reduce in (
        ("max_orthogonality_error", "orthogonality_error", max),
        ("max_angle_deg", "max_angle_deg", max),
        ("mean_angle_deg", "mean_angle_deg", _mean),
        ("mean_trace_angle_deg", "trace_angle_deg", _mean),
        ("mean_relative_delta", "relative_delta", _mean),
    ):
        values = [e[key] for e in layers if key in e]
        if values:
            summary[summary_key] = reduce(values)
    return {"summary": summary, "layers": layers}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def format_orthogonality(report: dict[str, Any], limit: int = 12) -> str:
    """A short table: the summary, then the ``limit`` layers that moved most."""
    lines = ["orthogonality: " + ", ".join(f"{k}={_fmt(v)}" for k, v in report["summary"].items())]
    ranked = sorted(report["layers"], key=lambda e: -e.get("trace_angle_deg", e.get("relative_delta", 0.0)))
    for entry in ranked[:limit]:
        values = {k: v for k, v in entry.items() if k not in ("layer", "adapter", "method", "kind")}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        lines.append(f"  {entry['layer']} [{entry['adapter']}]: {shown}")
    if len(ranked) > limit:
        lines.append(f"  ... {len(ranked) - limit} more layers in the JSON report")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- command line ------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a trained adapter: accuracy/F1/perplexity and orthogonality diagnostics.",
        description=(
            "Evaluate a trained adapter. TARGET is a run folder written by `orthoft train` (it holds "
            "recipe.yaml and final/adapter) or a recipe file (then --adapter, default <output_dir>/final/adapter)."
        ),
    )
    parser.add_argument("target", help="run folder or recipe YAML")
    parser.add_argument("--adapter", help="adapter folder (save_pretrained output); default: the run's final adapter")
    parser.add_argument("--split", choices=("eval", "test"), default="eval", help="which split to score")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", help="JSON file for the results (default: <adapter>/../eval_<split>.json)")
    parser.add_argument("--no-metrics", action="store_true", help="only the orthogonality diagnostics")
    parser.add_argument("--no-orthogonality", action="store_true", help="only the task metrics")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from orthoft.training.data import build_task_data
    from orthoft.training.models import load_trained
    from orthoft.training.recipe import load_recipe

    target = Path(args.target)
    recipe_path = target / "recipe.yaml" if target.is_dir() else target
    recipe = load_recipe(recipe_path, args.override)
    if args.adapter:
        adapter_dir = Path(args.adapter)
    elif target.is_dir():
        adapter_dir = target / "final" / "adapter"
    else:
        adapter_dir = recipe.output_dir() / "final" / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(
            f"orthoft eval: {adapter_dir} holds no adapter_config.json. Pass --adapter with a folder written by "
            "`orthoft train` (RUN/final/adapter or RUN/checkpoints/step-N/adapter)."
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_map = {"": 0} if device == "cuda" else "cpu"
    model, tokenizer = load_trained(recipe.model, adapter_dir, device_map=device_map, seed=recipe.train.seed)
    if not (recipe.model.load_in_4bit or recipe.model.load_in_8bit):
        model.to(device)
    results: dict[str, Any] = {"adapter": str(adapter_dir), "split": args.split}
    if not args.no_metrics:
        data = build_task_data(recipe.data, tokenizer, recipe.model.task, recipe.train.seed)
        examples = data.test if args.split == "test" else data.eval
        if examples is None:
            raise SystemExit(f"orthoft eval: {data.description} has no test split; use --split eval.")
        batch_size = args.batch_size or recipe.eval.batch_size or recipe.train.batch_size
        results["metrics"] = evaluate_examples(
            model, examples, data.kind, recipe.metrics(), batch_size, tokenizer.pad_token_id, device
        )
        print(f"{args.split} metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results["metrics"].items()))
    if not args.no_orthogonality:
        results["orthogonality"] = orthogonality_report(model)
        print(format_orthogonality(results["orthogonality"]))
    output = Path(args.output) if args.output else adapter_dir.parent / f"eval_{args.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"wrote {output}")
    return 0
