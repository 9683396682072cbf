"""Diffusion recipes: YAML validated against dataclasses before anything heavy loads.

The LLM recipe schema (``orthoft.training.recipe``) is about language models and text data, so
diffusion keeps its own sections but reuses that module's validators: the same type checks,
the same ``RecipeError`` messages (file, dotted key, bad value, valid choices), and the same
``adapter`` section (``method`` plus that method's config fields, looked up in
``orthoft.adapters.REGISTERED``, so methods added later validate as soon as they register).

Sections: ``base`` (the pipeline to fine-tune: a saved/hub one, or the tiny digits pipeline
pre-trained here), ``subject`` (DreamBooth subject and prior preservation on digits), ``adapter``
(plus ``target_groups``: UNet layer groups expanded into ``target_modules``), ``train``
(``DenoiserTrainingSettings``), ``sample`` (grid), ``concepts`` (Orthogonal Adaptation runs) and
``output_dir``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..io.recipes import find_recipe
from ..io.schema import (
    AdapterSection,
    RecipeError,
    build_adapter_section,
    build_section,
    check_type,
    method_config_class,
)
from .models import UNET_TARGET_GROUPS, unet_target_modules
from .train import DenoiserTrainingSettings

DIGITS = list(range(10))

# pre-training of the tiny UNet: enough for recognizable digits 0-8 in ~1 minute on one core
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 400,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "warmup_steps": 30,
    "ema_decay": 0.995,
    "snr_gamma": 5.0,
    "condition_dropout": 0.1,  # the empty prompt that classifier-free guidance needs
    "log_every": 100,
}


@dataclass
class BaseSection:
    """The pipeline to fine-tune.

    pretrained: a saved diffusers pipeline folder or hub id (e.g. a Stable Diffusion 1.5 id on a
        GPU machine); ``null`` builds the tiny pixel-space pipeline from its fixed config and
        pre-trains it here on ``pretrain_digits``.
    seed: initialization seed of the tiny UNet.
    image_size: digits are 8x8 upsampled to this (multiple of 8; the tiny UNet is built for it).
    pretrain: ``DenoiserTrainingSettings`` fields overriding ``PRETRAIN_DEFAULTS``.
    cache: keep the pre-trained tiny pipeline under ``$ORTHOFT_CACHE/diffusion`` keyed by every
        setting that shapes it, so the next recipe reuses it.
    """

    pretrained: str | None = None
    seed: int = 0
    image_size: int = 16
    pretrain_digits: list[int] = field(default_factory=lambda: list(range(9)))
    pretrain: dict[str, Any] = field(default_factory=dict)
    cache: bool = True

    def check(self, where: str) -> None:
        if self.image_size < 8 or self.image_size % 8:
            raise RecipeError(f"{where}.image_size: must be a multiple of 8 (16 or 32), got {self.image_size}.")
        _check_digits(self.pretrain_digits, f"{where}.pretrain_digits")

    def pretrain_settings(self, where: str) -> DenoiserTrainingSettings:
        return _settings({**PRETRAIN_DEFAULTS, **self.pretrain}, f"{where}.pretrain")


@dataclass
class SubjectSection:
    """DreamBooth subject (a digit never seen in pre-training) and prior preservation.

    prompt: template with ``{digit}``; the same template is used for the prior digits.
    validation_images: subject images held out for the validation noise-prediction loss.
    prior: ``dataset`` (real images of ``prior_digits``), ``generated`` (the base model's own
        samples for the class prompts: DreamBooth's original recipe) or ``none``.
    num_prior_images: prior images used for training; as many again (from the data set) measure
        how well the prior is preserved.
    """

    digit: int = 9
    prompt: str = "a photo of digit {digit}"
    validation_images: int = 40
    prior: Literal["dataset", "generated", "none"] = "dataset"
    prior_digits: list[int] = field(default_factory=lambda: list(range(9)))
    num_prior_images: int = 200

    def check(self, where: str) -> None:
        _check_digits([self.digit], f"{where}.digit")
        _check_digits(self.prior_digits, f"{where}.prior_digits")
        if "{digit}" not in self.prompt:
            raise RecipeError(f"{where}.prompt: must contain '{{digit}}', got {self.prompt!r}.")
        if self.digit in self.prior_digits:
            raise RecipeError(f"{where}.prior_digits: must not contain the subject digit {self.digit}.")
        if self.validation_images < 1 or self.num_prior_images < 1:
            raise RecipeError(f"{where}: validation_images and num_prior_images must be >= 1.")


@dataclass
class SampleSection:
    """The before/after grid: ``images_per_prompt`` rows x one column per digit, seed per image."""

    digits: list[int] = field(default_factory=lambda: list(DIGITS))
    images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0

    def check(self, where: str) -> None:
        _check_digits(self.digits, f"{where}.digits")
        if self.images_per_prompt < 1 or self.num_inference_steps < 1:
            raise RecipeError(f"{where}: images_per_prompt and num_inference_steps must be >= 1.")


@dataclass
class ConceptItem:
    """One Orthogonal Adaptation concept: images of ``digit`` after ``transform``, with its own prompt."""

    name: str
    digit: int
    prompt: str
    transform: Literal["none", "mirror", "rotate180", "transpose"] = "none"


@dataclass
class ConceptsSection:
    """Orthogonal Adaptation: concepts trained independently (each with the ``train`` settings) and merged.

    rank: per-concept rank (``concept_index`` is the concept's position in ``items``).
    bases: basis kinds to compare; each trains every concept again.
    validation_images: per concept, held out for losses and interference.
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 4
    bases: list[str] = field(default_factory=lambda: ["orthogonal", "independent"])
    validation_images: int = 30
    basis_seed: int = 0

    def check(self, where: str) -> None:
        from ..adapters.orthogonal_adaptation import BASIS_KINDS

        if len(self.items) < 2:
            raise RecipeError(f"{where}.items: needs at least 2 concepts to merge, got {len(self.items)}.")
        for basis in self.bases:
            if basis not in BASIS_KINDS:
                raise RecipeError(f"{where}.bases: {basis!r} is not one of {list(BASIS_KINDS)}.")
        if self.rank < 1:
            raise RecipeError(f"{where}.rank: must be >= 1, got {self.rank}.")

    def concepts(self, where: str) -> list[ConceptItem]:
        items = [build_section(ConceptItem, item, f"{where}.items[{i}]") for i, item in enumerate(self.items)]
        names = [item.name for item in items]
        if len(set(names)) != len(names):
            raise RecipeError(f"{where}.items: concept names must be distinct, got {names}.")
        for item in items:
            _check_digits([item.digit], f"{where}.items.{item.name}.digit")
        return items


@dataclass
class DiffusionRecipe:
    base: BaseSection
    subject: SubjectSection
    adapter: AdapterSection
    train: DenoiserTrainingSettings
    sample: SampleSection
    concepts: ConceptsSection | None = None
    output_dir: str = "runs/diffusion"
    description: str = ""
    source_path: str | None = None

    def peft_config(self, **overrides: Any) -> Any:
        """The adapter's PEFT config (``overrides`` e.g. ``concept_index`` for Orthogonal Adaptation)."""

        return method_config_class(self.adapter.method)(**{**self.adapter.options, **overrides})

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"description": self.description, "output_dir": self.output_dir}
        for name in ("base", "subject", "train", "sample", "concepts"):
            section = getattr(self, name)
            if section is not None:
                data[name] = dataclasses.asdict(section)
        options = {k: sorted(v) if isinstance(v, set) else v for k, v in self.adapter.options.items()}
        data["adapter"] = {"method": self.adapter.method, **options}
        return data


SECTION_NAMES = ("base", "subject", "adapter", "train", "sample", "concepts", "output_dir", "description")


def load_recipe(path: str | Path, **top_level_overrides: Any) -> DiffusionRecipe:
    """Read and validate a diffusion recipe; ``output_dir=...`` / ``base=<pipeline folder>`` override the file."""
    path = find_recipe(path)  # a file, or a shipped recipe by name (`orthoft recipes` lists them)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if "base" in top_level_overrides:
        raw["base"] = {**(raw.get("base") or {}), "pretrained": top_level_overrides.pop("base")}
    raw.update(top_level_overrides)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "<diffusion recipe>") -> DiffusionRecipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(raw).__name__}.")
    for key in raw:
        if key not in SECTION_NAMES:
            raise RecipeError(f"{source}: unknown key {key!r}. Valid top-level keys: {list(SECTION_NAMES)}.")
    if "adapter" not in raw:
        raise RecipeError(f"{source}: missing section 'adapter' (method plus its config fields).")
    base = build_section(BaseSection, _mapping(raw, "base", source), f"{source}: base")
    base.pretrain_settings(f"{source}: base")  # validate now, not after minutes of work
    subject = build_section(SubjectSection, _mapping(raw, "subject", source), f"{source}: subject")
    sample = build_section(SampleSection, _mapping(raw, "sample", source), f"{source}: sample")
    train = _settings(_mapping(raw, "train", source), f"{source}: train")
    adapter = _adapter(_mapping(raw, "adapter", source), source)
    concepts = None
    if raw.get("concepts") is not None:
        concepts = build_section(ConceptsSection, _mapping(raw, "concepts", source), f"{source}: concepts")
        concepts.concepts(f"{source}: concepts")
    output_dir = check_type(raw.get("output_dir", "runs/diffusion"), str, f"{source}: output_dir")
    description = check_type(raw.get("description", ""), str, f"{source}: description")
    return DiffusionRecipe(base, subject, adapter, train, sample, concepts, output_dir, description.strip(), source)


def _adapter(value: dict[str, Any], source: str) -> AdapterSection:
    value = dict(value)
    groups = value.pop("target_groups", None)
    if groups is not None:
        if "target_modules" in value:
            raise RecipeError(f"{source}: adapter: set target_groups or target_modules, not both.")
        try:
            value["target_modules"] = unet_target_modules(groups)
        except ValueError as err:
            raise RecipeError(f"{source}: adapter.target_groups: {err} Groups: {sorted(UNET_TARGET_GROUPS)}.") from err
    return build_adapter_section(value, source)


def _settings(value: dict[str, Any], where: str) -> DenoiserTrainingSettings:
    try:
        return build_section(DenoiserTrainingSettings, value, where)
    except ValueError as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"{where}: {err}") from err


def _mapping(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise RecipeError(f"{source}: section {name!r} must be a mapping, got {value!r}.")
    return value


def _check_digits(digits: list[int], where: str) -> None:
    bad = [d for d in digits if not 0 <= d <= 9]
    if bad or not digits:
        raise RecipeError(f"{where}: digits must be a non-empty list of 0..9, got {digits}.")
