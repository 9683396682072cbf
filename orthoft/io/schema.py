"""The one schema checker for YAML recipes (training and diffusion alike).

A recipe section is a dataclass; :func:`build_section` checks every key of a raw mapping against
its fields and type annotations and calls the section's ``check(where)`` for ranges and
combinations. An ``adapter`` section is ``method`` plus the fields of that method's config class,
looked up in ``orthoft.adapters.REGISTERED``, so a method added later validates as soon as it is
registered. Every error is a :class:`RecipeError` naming the file, the dotted key, the value and
the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..adapters.registry import peft_type_for, registered_methods

# method names users may write that mean a registered method
METHOD_ALIASES = {"qoft": "oft", "oftv2": "oft"}
# PeftConfig fields orthoft sets itself; a recipe may not set them
RESERVED_ADAPTER_FIELDS = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "requires"}
)


class RecipeError(ValueError):
    """A recipe file or override is invalid; the message says where and how to fix it."""


@dataclass
class AdapterSection:
    """``method`` plus that method's config fields (``target_modules``, ``block_size``, ...)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return peft_type_for(canonical_method(self.method))


def canonical_method(method: str) -> str:
    name = method.strip().lower()
    return METHOD_ALIASES.get(name, name)


def method_config_class(method: str, where: str = "adapter.method") -> type:
    """The config class registered for ``method``; RecipeError naming the registered ones if absent."""
    methods = registered_methods()
    name = canonical_method(method)
    if name not in methods:
        raise RecipeError(
            f"{where}: no orthoft method {method!r} is registered (looked up peft_type "
            f"{peft_type_for(name)} in orthoft.adapters.REGISTERED). Registered methods: {sorted(methods)}. "
            "If the method is new, its config class must be registered by orthoft.adapters first."
        )
    return methods[name]


def adapter_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls) if f.init and f.name not in RESERVED_ADAPTER_FIELDS}


def build_adapter_section(value: dict[str, Any], source: str) -> AdapterSection:
    """Validate an ``adapter`` mapping: a registered method and only its config's fields, well typed."""
    where = f"{source}: adapter"
    if "method" not in value:
        raise RecipeError(f"{where}: missing key 'method' (one of {sorted(registered_methods())}).")
    method = value["method"]
    if not isinstance(method, str):
        raise RecipeError(f"{where}.method: expected a method name string, got {method!r}.")
    config_cls = method_config_class(method, f"{where}.method")
    fields_by_name = adapter_fields(config_cls)
    options = {k: v for k, v in value.items() if k != "method"}
    for key in options:
        if key not in fields_by_name:
            raise RecipeError(
                f"{where}: unknown key {key!r} for method {method!r} ({config_cls.__name__}). "
                f"Valid keys: {['method', *sorted(fields_by_name)]}."
            )
    hints = type_hints(config_cls)
    for key, val in options.items():
        options[key] = check_type(val, hints.get(key, Any), f"{where}.{key}")
    try:
        config_cls(**copy.deepcopy(options))  # its __post_init__ checks ranges and combinations
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: invalid options for {config_cls.__name__}: {err}") from err
    return AdapterSection(method=canonical_method(method), options=options)


def build_section(cls: type, value: dict[str, Any], where: str) -> Any:
    """An instance of dataclass ``cls`` from a raw mapping, every key and type checked, then ``check(where)``."""
    fields_by_name = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields_by_name:
            raise RecipeError(f"{where}: unknown key {key!r}. Valid keys: {sorted(fields_by_name)}.")
    hints = type_hints(cls)
    kwargs = {}
    for name, f in fields_by_name.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in value:
            if required:
                raise RecipeError(f"{where}: missing required key {name!r}.")
            continue
        kwargs[name] = check_type(value[name], hints[name], f"{where}.{name}")
    section = cls(**kwargs)
    if hasattr(section, "check"):
        section.check(where)
    return section


def require_positive(where: str, **values: float | None) -> None:
    """RecipeError unless every given value is None or > 0."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise RecipeError(f"{where}.{name}: must be > 0, got {value}.")


def require_non_negative(where: str, **values: float | None) -> None:
    """RecipeError unless every given value is None or >= 0."""
    for name, value in values.items():
        if value is not None and value < 0:
            raise RecipeError(f"{where}.{name}: must be >= 0, got {value}.")


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass and its dataclass bases (``Any`` where one cannot be resolved)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                hints.update(typing.get_type_hints(klass))
            except (NameError, TypeError):  # an annotation we cannot resolve: accept any value there
                hints.update({name: Any for name in getattr(klass, "__annotations__", {})})
    return hints


def describe_type(tp: Any) -> str:
    """An annotation in words for error messages (``one of 'nf4', 'fp4'``, ``int or null``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def check_type(value: Any, tp: Any, where: str) -> Any:
    """``value`` if it fits annotation ``tp`` (ints widen to float), else RecipeError."""
    ok, converted = _fits(value, tp)
    if not ok:
        raise RecipeError(f"{where}: expected {describe_type(tp)}, got {value!r} ({type(value).__name__}).")
    return converted


def _fits(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any or tp is object:
        return True, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # compare types too: YAML's true must not match a Literal 1
        return any(value == choice and type(value) is type(choice) for choice in args), value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _fits(value, arg)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, set, tuple) or tp in (list, set, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = args[0] if args else Any
        items = [_fits(v, inner) for v in value]
        return all(ok for ok, _ in items), [c for _, c in items]
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation we do not model: let the config class judge


__all__ = [
    "METHOD_ALIASES",
    "RESERVED_ADAPTER_FIELDS",
    "AdapterSection",
    "RecipeError",
    "adapter_fields",
    "build_adapter_section",
    "build_section",
    "canonical_method",
    "check_type",
    "describe_type",
    "method_config_class",
    "require_non_negative",
    "require_positive",
    "type_hints",
]
