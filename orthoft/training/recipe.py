"""Training recipes: YAML files validated against a dataclass schema before anything heavy loads.

A recipe has the sections ``model``, ``adapter``, ``data``, ``train``, ``optim``, ``eval`` and
``export`` (plus a free-text ``description``). Every key is checked: an unknown key, a value of
the wrong type or out of range raises :class:`RecipeError` naming the file, the dotted key, the
bad value and the valid choices. ``adapter`` takes ``method`` plus the fields of that method's
config class, looked up by name in ``orthoft.adapters.REGISTERED`` (peft_type ``ORTHOFT_<METHOD>``),
so a recipe for a method added later validates as soon as its config class is registered.

``--override train.max_steps=10`` style overrides are applied to the raw YAML before validation;
values are parsed as YAML (``true``, ``1e-3``, ``[q_proj, v_proj]``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..io.datafiles import DATA_FILE_SUFFIXES
from ..io.recipes import find_recipe
from ..io.schema import (
    AdapterSection,
    RecipeError,
    build_adapter_section,
    build_section,
    require_non_negative,
    require_positive,
)
from ..optim.optimizers import OPTIMIZERS

TASKS = ("causal_lm", "sequence_classification")
DATA_SOURCES = ("hamlet", "rotten_tomatoes", "file", "text_file", "hf")
# accelerate.utils.LoggerType's values, spelled out so validating a recipe does not import accelerate
TRACKERS = ("tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "aim", "all")


@dataclass
class ModelSection:
    """Which base model to load and how.

    name_or_path: ``smollm2`` / ``minilm`` (embedded defaults, no hub), a local folder, or a hub id.
    task: ``causal_lm`` or ``sequence_classification`` (then ``num_labels`` is used).
    tokenizer: tokenizer folder or id when it differs from the model (same shortcuts).
    from_config: build a randomly initialised model from this transformers config instead of
        loading weights (``model_type`` plus config fields; tests and smoke runs). ``name_or_path``
        then only names the run.
    load_in_4bit / load_in_8bit: bitsandbytes quantization of the frozen base weights.
    compute_dtype: dtype of the 4-bit matmuls and of unquantized weights; ``auto`` means bfloat16
        on a GPU that supports it, float16 on other GPUs, float32 on CPU.
    """

    name_or_path: str
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: int = 2
    tokenizer: str | None = None
    from_config: dict[str, Any] | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = False
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def check(self, where: str) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise RecipeError(f"{where}: set load_in_4bit or load_in_8bit, not both.")
        require_positive(where, num_labels=self.num_labels)
        if self.from_config is not None and "model_type" not in self.from_config:
            raise RecipeError(f"{where}.from_config: needs a 'model_type' (e.g. llama, bert).")
        if self.from_config is not None and (self.load_in_4bit or self.load_in_8bit):
            raise RecipeError(f"{where}: from_config builds float weights; drop load_in_4bit/load_in_8bit.")


def infer_data_source(path: str | None, where: str) -> str:
    """``file`` for a local data file (by suffix, or because it exists), ``hf`` for anything else."""
    if not path:
        raise RecipeError(
            f"{where}: set source (one of {list(DATA_SOURCES)}) or path (a local .jsonl/.json/.csv/.txt file or a "
            "datasets id)."
        )
    return "file" if Path(path).suffix.lower() in DATA_FILE_SUFFIXES or Path(path).is_file() else "hf"


@dataclass
class DataSection:
    """Where the examples come from and how they become token sequences.

    source: ``hamlet`` (embedded text), ``rotten_tomatoes`` (embedded labelled snippets),
        ``file`` (``path`` to a local data file, read by its suffix: ``.jsonl``/``.json``/``.csv``/
        ``.tsv`` rows with ``text_field`` (and ``label_field``, or the templates), anything else
        plain UTF-8 text), ``text_file`` (plain text whatever the suffix) or ``hf`` (``path`` = a
        ``datasets`` id or a local dataset folder; a path to a local file is read as ``file``).
        Left out, it follows ``path``: a data-file suffix or an existing file means ``file``,
        anything else ``hf``; so ``data: {path: my.jsonl}`` is enough. Relative paths are from the
        current folder. Row files hold out ``eval_size`` shuffled rows unless ``eval_split`` names
        a split (a JSON object of split lists, e.g. ``{"train": [...], "validation": [...]}``).
    block_size: tokens per training sequence for plain text (the text is cut into equal blocks).
    held_out_fraction: plain text: last fraction of the blocks kept out of training (perplexity).
    max_length: truncation length of labelled / instruction examples.
    prompt_template / response_template: instruction data: ``str.format`` templates over a row's
        fields; the loss covers only the response tokens.
    use_chat_template: wrap prompt/response with the tokenizer's chat template (instruct models).
    eval_size: number of examples taken from train for validation when the source has no eval split.
    """

    source: Literal["hamlet", "rotten_tomatoes", "file", "text_file", "hf"] | None = None
    path: str | None = None
    hf_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    eval_size: int = 500
    text_field: str = "text"
    label_field: str = "label"
    prompt_template: str | None = None
    response_template: str | None = None
    use_chat_template: bool = False
    block_size: int = 128
    held_out_fraction: float = 0.1
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_test_examples: int | None = None

    def check(self, where: str) -> None:
        require_positive(where, block_size=self.block_size, max_length=self.max_length, eval_size=self.eval_size)
        require_positive(
            where,
            max_train_examples=self.max_train_examples,
            max_eval_examples=self.max_eval_examples,
            max_test_examples=self.max_test_examples,
        )
        if not 0.0 < self.held_out_fraction < 1.0:
            raise RecipeError(f"{where}.held_out_fraction: must be in (0, 1), got {self.held_out_fraction}.")
        if self.source is None:  # follow the path: see the docstring
            self.source = infer_data_source(self.path, where)
        if self.source in ("file", "text_file", "hf") and not self.path:
            raise RecipeError(f"{where}.path: source {self.source!r} needs a path (a file or a datasets id).")
        if (self.prompt_template is None) != (self.response_template is None):
            raise RecipeError(f"{where}: set both prompt_template and response_template, or neither.")


@dataclass
class TrainSection:
    """The optimisation loop. Steps are optimizer steps (after gradient accumulation).

    batch_size is per process; the global batch is ``batch_size * gradient_accumulation_steps * processes``.
    mixed_precision ``auto``: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU.
    eval_every / save_every: 0 means only at the end.
    report_to: Accelerate trackers that also get the train/eval records, e.g. ``[tensorboard]``
        (``pip install tensorboard``; event files in ``<output_dir>/trackers/orthoft``) or ``wandb``.
    """

    output_dir: str | None = None
    seed: int = 0
    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    report_to: list[str] = field(default_factory=list)

    def check(self, where: str) -> None:
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise RecipeError(f"{where}.report_to: unknown tracker {unknown[0]!r}; Accelerate's trackers: {TRACKERS}.")
        require_positive(
            where,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            log_every=self.log_every,
            keep_checkpoints=self.keep_checkpoints,
            max_grad_norm=self.max_grad_norm,
        )
        require_finite(where, max_grad_norm=self.max_grad_norm)
        require_non_negative(
            where, warmup_steps=self.warmup_steps, eval_every=self.eval_every, save_every=self.save_every
        )
        if self.warmup_steps >= self.max_steps and self.lr_scheduler != "constant":
            raise RecipeError(
                f"{where}.warmup_steps: {self.warmup_steps} leaves no step after warmup (max_steps "
                f"{self.max_steps}); lower it."
            )


@dataclass
class OptimSection:
    """Optimizer from ``orthoft.optim.build_optimizer``.

    name: ``adamw`` or an orthogonalized optimizer (``muon``, ``normuon``, ``turbomuon``, ``root``,
        ``auon``, ``hybridauon``). lr: learning rate of the adapter tensors, or ``auto``: the
        method's measured default for this optimizer (``orthoft.recommended_lr``). adamw_lr: of the
        parameters that fall back to AdamW (vectors, classifier heads; default ``lr``, or with
        ``lr: auto`` the method's AdamW default).
    options: extra keyword arguments for the optimizer (``momentum``, ``ns_steps``, ``betas`` ...).
    """

    name: str = "adamw"
    lr: float | Literal["auto"] = 1e-3
    weight_decay: float = 0.0
    adamw_lr: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str) -> None:
        lr = None if self.lr == "auto" else self.lr  # auto: resolved when the optimizer is built
        require_finite(where, lr=lr, adamw_lr=self.adamw_lr, weight_decay=self.weight_decay)
        require_positive(where, lr=lr, adamw_lr=self.adamw_lr)
        require_non_negative(where, weight_decay=self.weight_decay)
        valid = optimizer_names()
        key = self.name.lower().replace("-", "").replace("_", "")
        if key not in valid:
            raise RecipeError(f"{where}.name: unknown optimizer {self.name!r}; valid: {sorted(valid)}.")


@dataclass
class EvalSection:
    """Evaluation during and after training.

    metrics: names of the metric modules shipped in ``orthoft/evaluation/metric_modules`` (default:
        perplexity for causal LMs, accuracy and f1 for classification). eval_before: also evaluate
        the untrained adapter (step 0).
    generate_prompt: causal LMs: print a greedy continuation of this prompt before and after.
    orthogonality: write per-layer orthogonality diagnostics of the trained adapter.
    """

    metrics: list[str] | None = None
    eval_before: bool = True
    batch_size: int | None = None
    max_batches: int | None = None
    generate_prompt: str | None = None
    max_new_tokens: int = 48
    orthogonality: bool = True

    def check(self, where: str) -> None:
        require_positive(
            where, batch_size=self.batch_size, max_batches=self.max_batches, max_new_tokens=self.max_new_tokens
        )
        known = ("accuracy", "f1", "perplexity")
        for name in self.metrics or []:
            if name not in known:
                raise RecipeError(f"{where}.metrics: unknown metric {name!r}; shipped metrics: {list(known)}.")


@dataclass
class ExportSection:
    """Merged export after training through ``orthoft.export.export_merged`` (into ``output_dir``, default
    ``<train.output_dir>/merged``; ``dtype: auto`` keeps the base config's dtype)."""

    enabled: bool = False
    output_dir: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: str | None = None


@dataclass
class Recipe:
    model: ModelSection
    adapter: AdapterSection
    data: DataSection
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)
    description: str = ""
    source_path: str | None = None  # the file it came from (not a YAML key)

    def metrics(self) -> list[str]:
        if self.eval.metrics is not None:
            return list(self.eval.metrics)
        return ["perplexity"] if self.model.task == "causal_lm" else ["accuracy", "f1"]

    def output_dir(self) -> Path:
        if self.train.output_dir:
            return Path(self.train.output_dir)
        stem = Path(self.source_path).stem if self.source_path else "run"
        return Path("runs") / stem

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-ready data (what ``load_recipe`` accepts), e.g. to save next to a run."""
        data: dict[str, Any] = {"description": self.description} if self.description else {}
        for name in SECTIONS:
            section = getattr(self, name)
            if name == "adapter":
                data[name] = {"method": section.method, **section.options}
            else:
                data[name] = dataclasses.asdict(section)
        return data


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "adapter": AdapterSection,
    "data": DataSection,
    "train": TrainSection,
    "optim": OptimSection,
    "eval": EvalSection,
    "export": ExportSection,
}
REQUIRED_SECTIONS = ("model", "adapter", "data")


def require_finite(where: str, **values: float | None) -> None:
    """RecipeError unless every given value is None or a finite number (YAML reads .nan and .inf)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise RecipeError(f"{where}.{name}: must be a finite number, got {value}. Fix: set a finite value.")


# ---- public entry points ----------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError with the file and key on any problem."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"Recipe file {path} is a folder; pass a YAML file such as recipes/smollm2-qoft.yaml.")
    path = find_recipe(path)  # the file as given, else the recipe of that name shipped with orthoft
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from err
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe: {err.strerror or err}. Fix its permissions.") from err
    return recipe_from_dict(raw, source=str(path), overrides=overrides)


def recipe_from_dict(raw: Any, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate already-parsed recipe data (``source`` names it in errors)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(raw).__name__}.")
    raw = apply_overrides(raw, overrides or [], source)
    valid_top = [*SECTIONS, "description"]
    for key in raw:
        if key not in valid_top:
            hint = ""
            if {"base", "subject"} & raw.keys() or Path(source).name.startswith("diffusion-"):
                hint = f" This looks like a diffusion recipe: run it with `orthoft diffusion train {source}`."
            raise RecipeError(f"{source}: unknown key {key!r}. Valid top-level keys: {valid_top}.{hint}")
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise RecipeError(f"{source}: missing section {name!r} (required: {list(REQUIRED_SECTIONS)}).")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: section {name!r} must be a mapping, got {value!r}.")
        if name == "adapter":
            sections[name] = build_adapter_section(value, source)
        else:
            sections[name] = build_section(cls, value, f"{source}: {name}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{source}: description must be a string.")
    recipe = Recipe(**sections, description=description, source_path=source)
    _check_cross_section(recipe, source)
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a copy of the raw recipe."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        dotted, sep, text = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise RecipeError(
                f"--override {item!r}: expected SECTION.KEY=VALUE, e.g. train.max_steps=10 or adapter.block_size=16."
            )
        section, key = parts
        if section not in SECTIONS:
            raise RecipeError(f"--override {item!r}: unknown section {section!r}; valid: {list(SECTIONS)}.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"--override {item!r}: value is not valid YAML: {err}") from err
        target = raw.setdefault(section, {}) or {}
        if not isinstance(target, dict):
            raise RecipeError(f"{source}: section {section!r} must be a mapping before overriding {key!r}.")
        raw[section] = {**target, key: value}
    return raw


def optimizer_names() -> set[str]:
    """Optimizer names a recipe may use: adamw and the orthogonalized ones of ``orthoft.optim``."""
    return {"adamw", *OPTIMIZERS}


def _check_cross_section(recipe: Recipe, source: str) -> None:
    task, data = recipe.model.task, recipe.data
    if task == "sequence_classification" and data.source == "hamlet":
        raise RecipeError(f"{source}: data.source 'hamlet' is plain text; model.task must be causal_lm.")
    if task == "causal_lm" and data.source == "rotten_tomatoes":
        raise RecipeError(
            f"{source}: data.source 'rotten_tomatoes' is labelled; use model.task sequence_classification."
        )
    if task == "causal_lm" and any(m in ("accuracy", "f1") for m in recipe.metrics()):
        raise RecipeError(f"{source}: eval.metrics accuracy/f1 need model.task sequence_classification.")
    if task == "sequence_classification" and "perplexity" in recipe.metrics():
        raise RecipeError(f"{source}: eval.metrics perplexity needs model.task causal_lm.")
