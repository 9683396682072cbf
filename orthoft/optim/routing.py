"""Route a model's trainable tensors to matrix views or the AdamW fallback, and build an optimizer.

Adapter layers declare how their trainable tensors look with a class attribute

    optimizer_views: dict[str, str] = {"orthoft_oft_Q": "skew_packed"}

mapping the name of an ``nn.ParameterDict`` attribute (keys are adapter names) to a view string
(see ``views.py``). Every trainable tensor in such a dict gets that view; every other trainable
parameter (biases, norms, embeddings, classifier heads, other 2-D weights) goes to AdamW unless
``muon_for_plain_matrices=True``, which sends other 2-D weights to the ``"matrix"`` view (still
keeping embeddings and heads on AdamW, where Muon is known not to help).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .optimizers import OPTIMIZERS, OrthogonalizedOptimizer
from .views import VECTOR, check_view

DEFAULT_HEAD_NAMES = ("lm_head", "classifier", "score")


@dataclass(frozen=True)
class Route:
    name: str
    param: nn.Parameter
    view: str


def _declared_views(model: nn.Module) -> dict[int, Route]:
    routes: dict[int, Route] = {}
    for module_name, module in model.named_modules():
        views = getattr(type(module), "optimizer_views", None)
        if not views:
            continue
        for attr, view in views.items():
            container = getattr(module, attr, None)
            if container is None or not hasattr(container, "items"):
                raise TypeError(
                    f"{type(module).__name__} at {module_name!r} declares optimizer_views[{attr!r}] but has "
                    f"no nn.ParameterDict attribute {attr!r}; fix optimizer_views on the layer class."
                )
            for adapter_name, param in container.items():
                if not param.requires_grad:
                    continue
                name = f"{module_name}.{attr}.{adapter_name}"
                check_view(view, param, label=name)
                previous = routes.get(id(param))
                if previous is not None and previous.view != view:
                    raise ValueError(
                        f"{name} is declared both as {previous.view!r} (as {previous.name}) and "
                        f"{view!r}; a shared tensor needs one view."
                    )
                routes[id(param)] = Route(name, param, view)
    return routes


def route_parameters(
    model: nn.Module,
    muon_for_plain_matrices: bool = False,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
) -> list[Route]:
    """Every trainable parameter of ``model`` once, with the view it is updated through."""
    routes = _declared_views(model)
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    ordered: list[Route] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in routes:
            ordered.append(routes[id(param)])
            continue
        is_head = any(part in head_names for part in name.split("."))
        plain_matrix = param.ndim == 2 and id(param) not in embedding_params and not is_head
        view = "matrix" if muon_for_plain_matrices and plain_matrix else VECTOR
        ordered.append(Route(name, param, view))
    return ordered


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    muon_for_plain_matrices: bool = False,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer for ``model``'s trainable parameters, routed by the adapters' ``optimizer_views``.

    Args:
        model: any module (a PEFT model works: the adapter layers carry ``optimizer_views``).
        name: "muon", "normuon", "turbomuon", "root", "auon", "hybridauon", or "adamw" (plain
            ``torch.optim.AdamW`` on everything, the baseline).
        lr: learning rate of the orthogonalized groups.
        adamw_lr / adamw_weight_decay: for the AdamW fallback group (default: ``lr`` and the
            optimizer's ``weight_decay``).
        muon_for_plain_matrices: also orthogonalize trainable 2-D weights that no adapter declares
            (never embeddings or params under a module named in ``head_names``).
        kwargs: passed to the optimizer class (momentum, weight_decay, update_scale, ns_dtype, ...).

    One param group per view (group key ``"view"``) plus one ``use_muon=False`` group for the
    fallback; empty groups are left out.
    """
    _reject_sharded_model(model)
    key = name.lower().replace("-", "").replace("_", "")
    routes = route_parameters(model, muon_for_plain_matrices, head_names)
    _check_trainable(model, routes, muon_for_plain_matrices)
    if key == "adamw":
        return _warn_if_nothing_trains(torch.optim.AdamW([r.param for r in routes], lr=lr, **kwargs))
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; use 'adamw' or one of {sorted(OPTIMIZERS)}.")

    by_view: dict[str, list[nn.Parameter]] = {}
    for route in routes:
        by_view.setdefault(route.view, []).append(route.param)
    groups: list[dict[str, Any]] = [
        {"params": params, "view": view} for view, params in by_view.items() if view != VECTOR
    ]
    if VECTOR in by_view:
        fallback: dict[str, Any] = {"params": by_view[VECTOR], "view": VECTOR, "use_muon": False}
        if adamw_lr is not None:
            fallback["lr"] = adamw_lr
        if adamw_weight_decay is not None:
            fallback["weight_decay"] = adamw_weight_decay
        groups.append(fallback)
    optimizer_class: type[OrthogonalizedOptimizer] = OPTIMIZERS[key]
    return _warn_if_nothing_trains(optimizer_class(groups, lr=lr, **kwargs))


WRAP_ORDER_HINT = (
    "An optimizer built before get_peft_model(...) or SFTTrainer(..., peft_config=...) wraps the model holds "
    "the base weights, which the wrapping freezes, and not the adapter tensors it creates: it trains nothing."
)


def _holds_adapter(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an adapter layer: it declares ``optimizer_views`` or is a PEFT layer."""
    return any(getattr(type(m), "optimizer_views", None) or isinstance(m, BaseTunerLayer) for m in model.modules())


def _check_trainable(model: nn.Module, routes: list[Route], muon_for_plain_matrices: bool) -> None:
    """Refuse a model with nothing to train, or one whose trainable tensors are only its own base weights."""
    if not routes:
        raise ValueError(
            "build_optimizer: the model has no trainable parameters (requires_grad=True); nothing to optimize. "
            "Fix: build it from the model with its adapters trainable (get_peft_model(...), or "
            "PeftModel.from_pretrained(..., is_trainable=True))."
        )
    if not muon_for_plain_matrices and not _holds_adapter(model):
        raise ValueError(
            f"build_optimizer: {type(model).__name__} holds no adapter (no orthoft or PEFT adapter layer): its "
            f"{len(routes)} trainable tensors are the base model's own weights. {WRAP_ORDER_HINT} Fix: build the "
            "optimizer from the wrapped model (peft_model = get_peft_model(model, config); "
            "build_optimizer(peft_model, ...); SFTTrainer(model=peft_model, optimizers=(optimizer, None))). "
            "To train the base weights on purpose, pass muon_for_plain_matrices=True (or use torch.optim.AdamW)."
        )


def _warn_if_nothing_trains(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Warn once, at a step, when none of the optimizer's tensors has a gradient (it would silently do nothing)."""

    def check(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        if any(p.grad is not None for p in params):
            return
        frozen = sum(not p.requires_grad for p in params)
        handle.remove()
        warnings.warn(
            f"orthoft optimizer: none of its {len(params)} tensors has a gradient at this step, so the step changes "
            f"nothing ({frozen} of them are frozen now). {WRAP_ORDER_HINT} Fix: build it with build_optimizer() "
            "from the model the trainer actually trains (after wrapping), and pass that one to the trainer.",
            RuntimeWarning,
            stacklevel=2,
        )

    handle = optimizer.register_step_pre_hook(check)
    return optimizer


def _reject_sharded_model(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        raise NotImplementedError(
            "build_optimizer got an FSDP-wrapped model; orthoft.optim orthogonalizes whole matrices and "
            "does not gather shards. Use DDP, or torch.optim.AdamW under FSDP."
        )
