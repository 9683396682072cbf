"""Fields every orthoft config shares with PEFT's configs; each method's name and PEFT type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from peft.config import PeftConfig

from .card import LOADING_NOTE, write_adapter_card
from .registry import peft_type_for


@dataclass
class OrthoConfig(PeftConfig):
    """Base of all orthoft configs. Each method's config declares its name once, in the class variable
    ``method`` (e.g. ``"oft"``); ``peft_type`` is derived from it (``ORTHOFT_OFT``) and registration uses it.

    Args:
        target_modules: module names or regex to adapt, or ``"all-linear"``; when omitted, a
            default per transformers ``model_type`` is used.
        exclude_modules: module names or regex never adapted.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"<method>_only"`` (biases of adapted layers).
        init_weights: ``True`` starts at the identity (the base model); ``False`` draws random
            adapter weights (tests and debugging only).
        layers_to_transform / layers_pattern: restrict to some layer indices, as in PEFT.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier).
        requires: not an option: a note written into ``adapter_config.json`` for whoever opens it
            (loading needs ``pip install orthoft`` and ``import orthoft``); always reset to the current note.
    """

    target_modules: list[str] | str | None = field(default=None)
    exclude_modules: list[str] | str | None = field(default=None)
    bias: Literal["none", "all"] | str = field(default="none")
    init_weights: bool = field(default=True)
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    requires: str = field(default=LOADING_NOTE, repr=False)

    method: ClassVar[str] = ""  # the method's name, e.g. "oft"; its PEFT type is peft_type_for(method)
    # bias "<prefix>_only" is accepted; the prefix is the method name unless a method sets a shorter one
    method_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method:
            self.peft_type = peft_type_for(self.method)
        self.requires = LOADING_NOTE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        allowed_bias = {"none", "all", f"{self.method_prefix or self.method}_only"}
        if self.bias not in allowed_bias:
            raise ValueError(f"{type(self).__name__}: bias={self.bias!r} is not one of {sorted(allowed_bias)}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{type(self).__name__}: layers_pattern needs layers_to_transform as well.")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``adapter_config.json``, then the folder's model card (README.md) naming orthoft (``card.py``)."""
        super().save_pretrained(save_directory, **kwargs)
        write_adapter_card(save_directory, self)

    def check_positive(self, fix: str = "", **values: int | float | None) -> None:
        """Raise a ValueError naming the config and the option for each ``name=value`` that is <= 0 (None passes).

        ``fix`` is appended as ``Fix: ...``; ``{name}`` in it becomes the option's name.
        """
        for name, value in values.items():
            if value is not None and value <= 0:
                hint = f" Fix: {fix.format(name=name)}" if fix else ""
                raise ValueError(f"{type(self).__name__}: {name} must be > 0, got {value}.{hint}")


@dataclass
class CayleyConfig(OrthoConfig):
    """Options of methods whose rotations come from packed skew matrices through a Cayley map.

    Args:
        use_exact_cayley: exact ``(I+Q)(I-Q)^{-1}`` (a batched solve) instead of Cayley-Neumann.
            Both use the same sign convention, so switching never flips a trained rotation.
        neumann_degree: highest power of ``Q`` in the Neumann series; even degrees are far more
            orthogonal at equal cost (error ``|Q|^(2k+2)`` vs ``2|Q|^(k+1)``). PEFT's
            ``num_cayley_neumann_terms=t`` is ``neumann_degree=t-2``.
        max_skew_norm: Frobenius bound on each skew block (``None`` disables). Below 1 it keeps
            the Neumann series convergent; rotations then stay under ~84 degrees per plane.
    """

    use_exact_cayley: bool = field(default=False)
    neumann_degree: int = field(default=4)
    max_skew_norm: float | None = field(default=0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.neumann_degree < 0:
            raise ValueError(f"{type(self).__name__}: neumann_degree must be >= 0, got {self.neumann_degree}.")
        if self.max_skew_norm is not None and self.max_skew_norm <= 0:
            raise ValueError(f"{type(self).__name__}: max_skew_norm must be > 0 or None, got {self.max_skew_norm}.")

    def rotation_kwargs(self) -> dict:
        return {"exact": self.use_exact_cayley, "neumann_degree": self.neumann_degree, "max_norm": self.max_skew_norm}
