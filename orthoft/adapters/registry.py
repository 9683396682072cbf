"""The one place orthoft touches PEFT internals to register its methods.

PEFT 0.21's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so
orthoft adds its own types (``"ORTHOFT_OFT"``, ...) to the three mappings PEFT consults in
``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained``. A type is an
:class:`OrthoPeftType`: a ``str`` (equal to, hashed and written to ``adapter_config.json`` as
``"ORTHOFT_OFT"``) that also has the ``.value`` PEFT and transformers read from ``PeftType``
members (``load_adapter``, ``AutoModel*.from_pretrained(adapter_dir)``, mixed models, hotswap,
Trainer). The supported PEFT range is pinned in pyproject.toml and ``tests/test_peft_integration.py``
and ``tests/test_loaders.py`` fail loudly if a PEFT upgrade breaks the round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft import mapping

if TYPE_CHECKING:  # annotations only: config.py imports peft_type_for from here
    from .base import OrthoTuner
    from .config import OrthoConfig

PEFT_TYPE_PREFIX = "ORTHOFT_"
REGISTERED: dict[str, tuple[type[OrthoConfig], type[OrthoTuner]]] = {}


class OrthoPeftType(str):
    """An orthoft PEFT type: the plain string ``"ORTHOFT_OFT"`` plus the ``.value`` of a ``PeftType`` member.

    PEFT's own types are members of ``class PeftType(str, Enum)``; PEFT and transformers read
    ``config.peft_type.value`` (e.g. ``peft_type.value.lower()`` as the adapter key marker in
    transformers' ``load_adapter``). Being a ``str`` keeps dict lookups, comparisons and the JSON in
    ``adapter_config.json`` exactly as for a plain string, so adapters saved before still load.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        """The plain string, as ``PeftType.LORA.value == "LORA"``."""
        return str.__str__(self)  # a plain str copy


def peft_type_for(method: str) -> OrthoPeftType:
    """The PEFT type of an orthoft method: ``"oft"`` -> ``"ORTHOFT_OFT"`` (the one place it is spelled)."""
    return OrthoPeftType(PEFT_TYPE_PREFIX + method.upper())


def method_of(peft_type: str) -> str:
    """``"ORTHOFT_OFT"`` -> ``"oft"``."""
    return peft_type.removeprefix(PEFT_TYPE_PREFIX).lower()


def registered_methods() -> dict[str, type[OrthoConfig]]:
    """Method name (``oft``, ``boft``, ...) -> config class, for every method registered now."""
    return {method_of(peft_type): config for peft_type, (config, _) in REGISTERED.items()}


def register_method(config_cls: type[OrthoConfig], tuner_cls: type[OrthoTuner]) -> str:
    """Make ``config_cls.method`` known to PEFT under ``peft_type_for(config_cls.method)``; returns that type.

    Idempotent for the same classes.
    """
    if not config_cls.method:
        raise ValueError(
            f"register_method: {config_cls.__name__} declares no method name. "
            'Fix: set the class variable method = "<name>" on the config class.'
        )
    peft_type = peft_type_for(config_cls.method)
    for existing_type, prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == tuner_cls.prefix and existing_type != peft_type:
            raise KeyError(f"PEFT prefix {prefix!r} of {peft_type} is already used by {existing_type}")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix
    REGISTERED[peft_type] = (config_cls, tuner_cls)
    return peft_type
