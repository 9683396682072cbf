"""The layer base every orthoft method stands on, and the PEFT tuner that injects it.

A method file only says how its adapter parameters are created and what linear map they
mean; this module knows the layer types (``nn.Linear``, transformers ``Conv1D``,
``nn.Conv2d``, bitsandbytes ``Linear4bit``/``Linear8bitLt``), dtypes, dropout-free plumbing,
merge/unmerge and several adapters at once.

Two families of methods:

* multiplicative (OFT, BOFT, qGOFT, HRA): effective weight ``diag(s) W T^T`` where ``T`` is a
  map on the input features and ``s`` an optional output scale. Linear-like layers apply it
  input-side, ``base(x T)``, so the frozen (possibly quantized) kernel is untouched. Conv2d
  rotates the flattened ``in_channels * kh * kw`` filter dimension, which is only exact on the
  weight, so it builds ``W T^T`` (cheap: weights are small next to activations) and convolves.
* additive (PSOFT, SVFT, ...): effective weight ``W + dW``; override ``adapter_delta_forward``
  and ``adapter_delta_weight``.

Several active adapters compose in merge order: merging ``a1`` then ``a2`` gives
``W T1^T T2^T``, and the unmerged forward applies ``T2`` first so both agree. Already merged
adapters sit next to ``W``; unmerging pops them in reverse order.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .integration import cast_adapter_to_base_dtype, expand_all_linear, warn_requantizing_merge
from .sizes import check_rank, resolve_block_size  # re-exported: method files import them from here

LayerKind = str  # "linear" | "conv1d" | "conv2d" | "quantized"


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Which of the supported layer families ``module`` belongs to, or None."""
    if resolve_quantization_backend(module) is not None:
        return "quantized"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def keep_bnb_4bit_unpacked(module: nn.Module) -> None:
    """Keep a bitsandbytes ``Linear4bit`` in its standard layout; undo a CPU repack that already happened.

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.48) repacks a Linear4bit weight into a bf16
    inference layout at its first eval forward without gradients. That layout has no backward
    (adapter gradients silently stay None in later training steps) and PEFT's dequantization
    misreads it (merges, exports and SVD-based inits get garbage weights). The undo is exact: the
    block scales stay the bf16 values the layer has been computing with. Other modules: no-op.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state.original_nested = False  # keep the bf16 scales in use instead of quantizing them a second time
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    # the CPU layout stores the scales transposed, (in / blocksize, out); back to one per block in order
    state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    weight.data = data
    weight.quant_state = state
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = state


def build_without_autocast(build: Callable[[], Any], tensors: list[torch.Tensor]) -> Any:
    """``build()`` with autocast disabled on the CPU and on the tensors' device.

    Under autocast the small products of a rotation build (Cayley series, block products,
    triangular solves) would run in bf16/fp16: less accurate than the float32 the adapter is
    stored in, and some kernels (CPU triangular solve) have no bf16 version at all.
    """
    device_types = {"cpu"} | {t.device.type for t in tensors if t.device.type in ("cuda", "xpu", "mps")}
    with contextlib.ExitStack() as stack:
        for device_type in sorted(device_types):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        return build()


SUPPORTED_LAYERS = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1), bitsandbytes Linear4bit/Linear8bitLt"


class OrthoLayer(nn.Module, BaseTunerLayer):
    """Shared base of all orthoft adapter layers.

    Subclasses set ``adapter_layer_names`` (ParameterDicts keyed by adapter name),
    ``other_param_names``, ``optimizer_views`` (how each trainable tensor looks to an
    orthogonalizing optimizer: "skew_packed", "matrix", "matrix_stack" or "vector") and
    implement ``create_adapter`` plus either the multiplicative or the additive hooks.
    """

    method_name: ClassVar[str] = "orthoft"
    additive: ClassVar[bool] = False
    optimizer_views: ClassVar[dict[str, str]] = {}
    # layer kinds a method cannot handle, with the reason shown to the user
    unsupported_kinds: ClassVar[dict[str, str]] = {}
    # how each adapter tensor combines when adapters are merged into one (roles: orthoft.adapters.combine)
    merge_roles: ClassVar[dict[str, str]] = {}
    # "shift" tensors measured from a frozen per-adapter value instead of 0: tensor dict -> buffer dict
    merge_references: ClassVar[dict[str, str]] = {}

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PeftConfig, module_name: str = "") -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.module_name = module_name
        kind = layer_kind(self.get_base_layer())
        if kind is None:
            raise TypeError(
                f"{self.method_name}: module {module_name or type(base_layer).__name__} is a "
                f"{type(base_layer).__name__}, which cannot be adapted. Supported: {SUPPORTED_LAYERS}. "
                "Fix: remove it from target_modules (or use exclude_modules)."
            )
        if kind in self.unsupported_kinds:
            raise TypeError(
                f"{self.method_name}: module {module_name} ({type(base_layer).__name__}) is not supported: "
                f"{self.unsupported_kinds[kind]}. Fix: remove it from target_modules."
            )
        self.kind = kind
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        if kind == "quantized":
            keep_bnb_4bit_unpacked(self.get_base_layer())
        base = self.get_base_layer()
        if kind == "conv2d":
            if base.groups != 1:
                raise TypeError(
                    f"{self.method_name}: Conv2d {module_name} has groups={base.groups}; only groups=1 is "
                    "supported because the rotation mixes all input channels. Fix: exclude this module."
                )
            self.in_features = base.in_channels * math.prod(base.kernel_size)
            self.out_features = base.out_channels
        elif kind == "conv1d":
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.adapter_configs: dict[str, PeftConfig] = {}
        self._inference_cache: dict[str, tuple[tuple, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ---- method hooks -------------------------------------------------------------------
    def create_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Create this adapter's parameters (float32) in the layer's ParameterDicts."""
        raise NotImplementedError

    def transform_input(
        self, adapter_name: str, x: torch.Tensor, transpose: bool = False, training: bool = False
    ) -> torch.Tensor:
        """Multiplicative methods: ``x -> x T`` (``x T^T`` with ``transpose``) on the last dim.

        ``training`` is True only inside a training-mode forward: the one place dropout may act.
        """
        raise NotImplementedError

    def inverse_transform_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x -> x T^{-T}``, used by unmerge. Orthogonal maps have ``T^{-T} = T``."""
        return self.transform_input(adapter_name, x, transpose=False)

    def output_scale(self, adapter_name: str) -> torch.Tensor | None:
        """Multiplicative methods: optional per-output-feature scale ``s`` (shape ``(out,)``)."""
        return None

    # ---- what diagnostics may inspect ---------------------------------------------------
    @property
    def map_kind(self) -> str:
        """How an adapter of this layer changes the weight, for diagnostics and merging tools.

        ``"input_map"``: ``W -> diag(s) W T^T`` with ``T = transform_input(adapter, I)`` (and, when
        ``rotation_blocks`` returns them, block-diagonal ``T``); ``"additive"``: ``W -> W + dW``;
        ``"reparametrized"``: neither (e.g. CLOVER's per-head cores): only the weight change is defined.
        """
        return "additive" if self.additive else "input_map"

    def rotation_blocks(self, adapter_name: str) -> torch.Tensor | None:
        """Block-diagonal input maps: the float32 blocks ``(n_blocks, b, b)`` (one when shared); else None."""
        return None

    def merge_refusal(self, adapter_name: str, combination_type: str) -> str | None:
        """Why this adapter's settings rule out ``combination_type`` beyond what its roles say (None: they do not)."""
        return None

    def regularization_loss(self, adapter_name: str) -> torch.Tensor | None:
        """This adapter's training penalty, already multiplied by its config's weight (0-d float32).

        None when the method has no penalty or its weight is 0. ``orthoft.regularization_loss(model)``
        sums these over every layer and active adapter.
        """
        return None

    def adapter_delta_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Additive methods: ``x -> x dW^T`` for input rows ``x`` (..., in_features)."""
        raise NotImplementedError

    def adapter_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive methods: dense ``dW`` (out, in_features), float32."""
        raise NotImplementedError

    # ---- adapter bookkeeping ------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PeftConfig, **kwargs: Any) -> None:
        self.adapter_configs[adapter_name] = config
        self.create_adapter(adapter_name, config)
        self._move_adapter_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=getattr(config, "inference_mode", False))

    def _move_adapter_to_base_device(self, adapter_name: str) -> None:
        # Unlike PEFT's helper this keeps adapter tensors in float32: rotations are built in
        # float32 even for bf16/fp16 models and cast only where they meet activations.
        device = self.base_device()
        if device is None:
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ParameterDict, nn.ModuleDict)) and adapter_name in container:
                item = container[adapter_name]
                if item.device != device and item.device.type != "meta":
                    container[adapter_name] = item.to(device)

    def base_device(self) -> torch.device | None:
        """Device of the frozen base weight (None for a weightless base layer)."""
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None else None

    def cached_for_inference(self, key: str, tensors: list[torch.Tensor], build: Callable[[], Any]) -> Any:
        """``build()``, reused across calls while no gradient is recorded and ``tensors`` are unchanged.

        Generation calls every adapted layer once per token; rebuilding each rotation every time
        costs more than the rotation itself. Any in-place update (optimizer step, load) bumps a
        tensor's version and invalidates the entry. The build runs with autocast off, so rotations
        are float32 even inside a bf16/fp16 autocast region; they meet activations afterwards.
        """
        if torch.is_grad_enabled() or self.training:
            return build_without_autocast(build, tensors)
        stamp = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        hit = self._inference_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = build_without_autocast(build, tensors)
        self._inference_cache[key] = (stamp, value)
        return value

    def has_adapter(self, adapter_name: str) -> bool:
        """Whether this layer holds adapter ``adapter_name``."""
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def unmerged_active_adapters(self) -> list[str]:
        """Active adapters this layer holds that are not merged into the base weight (forward applies these)."""
        return [a for a in self.active_adapters if self.has_adapter(a) and a not in self.merged_adapters]

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype adapter products run in for input ``x``: its own when floating, else float32."""
        return x.dtype if x.is_floating_point() else torch.float32

    # ---- dense weight access (float32, shape (out, in_features)) -------------------------
    def dense_base_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        if self.kind == "quantized":
            weight = self.get_base_weight()
        elif self.kind == "conv1d":
            weight = base.weight.data.T
        else:
            weight = base.weight.data
        return weight.reshape(self.out_features, self.in_features).float()

    def store_dense_base_weight(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        if self.kind == "quantized":
            dtype = getattr(base, "compute_dtype", None) or torch.float32
            self.set_base_weight(weight.to(dtype).contiguous())
            return
        old = base.weight
        if self.kind == "conv1d":
            weight = weight.T
        base.weight.data = weight.reshape(old.shape).to(old.dtype).contiguous()

    def merged_weight(self, adapter_name: str, weight: torch.Tensor, training: bool = False) -> torch.Tensor:
        """``W -> W'`` for one adapter, float32 dense ``(out, in_features)``."""
        if self.additive:
            return weight + self.adapter_delta_weight(adapter_name)
        merged = self.transform_input(adapter_name, weight, transpose=True, training=training)
        scale = self.output_scale(adapter_name)
        return merged if scale is None else merged * scale.float()[:, None]

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.additive:
            return weight - self.adapter_delta_weight(adapter_name)
        scale = self.output_scale(adapter_name)
        if scale is not None:
            weight = weight / scale.float()[:, None]
        return self.inverse_transform_input(adapter_name, weight)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W' - W`` for one adapter on the current base weight (float32)."""
        weight = self.dense_base_weight()
        return self.merged_weight(adapter_name, weight) - weight

    # ---- merge / unmerge ----------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if self.has_adapter(a)]
        if not adapter_names:
            return
        with torch.no_grad():
            weight = self.dense_base_weight()
            for name in adapter_names:
                weight = self.merged_weight(name, weight)
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(
                        f"{self.method_name}: merging adapter {name!r} into {self.module_name} produced "
                        "NaN/inf; the adapter weights are broken. Nothing was merged."
                    )
            self.store_dense_base_weight(weight)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        with torch.no_grad():
            weight = self.dense_base_weight()
            while self.merged_adapters:
                weight = self.unmerged_weight(self.merged_adapters.pop(), weight)
            self.store_dense_base_weight(weight)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self.unmerged_active_adapters()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.kind == "conv2d":
            return self._forward_weight_side(x, active)
        if self.additive:
            result = self.base_layer(x, *args, **kwargs)
            for name in active:
                result = result + self.adapter_delta_forward(name, x).to(result.dtype)
            return result
        dtype = x.dtype
        x_rot = x
        for name in reversed(active):
            x_rot = self.transform_input(name, x_rot, training=self.training)
        result = self.base_layer(x_rot.to(dtype), *args, **kwargs)
        scales = [s for s in (self.output_scale(a) for a in active) if s is not None]
        if scales:
            scale = torch.stack(scales).prod(0).to(result.dtype)
            bias = self.get_base_layer().bias
            # the output scale multiplies W only: (result - bias) s + bias, as one pass over the activations
            if bias is None:
                result = result * scale
            else:
                result = torch.addcmul(bias.to(result.dtype) * (1 - scale), result, scale)
        return result

    def _forward_weight_side(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        weight = self.dense_base_weight()
        for name in active:
            weight = self.merged_weight(name, weight, training=self.training)
        weight = weight.reshape(base.weight.shape).to(x.dtype)
        return base._conv_forward(x, weight, base.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class OrthoTuner(BaseTuner):
    """PEFT tuner shared by all orthoft methods; a method sets ``prefix`` and ``tuner_layer_cls``."""

    tuner_layer_cls: type[OrthoLayer]
    target_module_mapping: dict[str, list[str]] = {}

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "lie", **kwargs: Any
    ) -> None:
        """PEFT's call shape (``PeftModel`` forwards it here): see :func:`orthoft.adapters.merging.merge_adapters`."""
        from .merging import merge_adapters  # merging builds on this module; imported on use to avoid a cycle

        merge_adapters(self, adapters, weights, adapter_name, combination_type, **kwargs)

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        super()._prepare_model(peft_config, model)
        # gradients reach the adapters through unadapted 4-bit layers too: none may use the bf16 CPU
        # layout, which has no backward (see keep_bnb_4bit_unpacked)
        for module in model.modules():
            keep_bnb_4bit_unpacked(module)
        from .regularization import apply_penalty_in_training  # builds on this module; imported on use (cycle)

        apply_penalty_in_training(model)  # the qGOFT/HRA penalties reach any trainer's loss with no user code

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

            mapping = self.target_module_mapping or TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
            targets = mapping.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError(
                    f"{type(peft_config).__name__}: no default target_modules for model_type "
                    f"{model_config.get('model_type')!r}. Fix: pass target_modules=[...] or 'all-linear'."
                )
            peft_config.target_modules = set(targets)
        # PEFT's own "all-linear" scan would skip the layers an earlier orthoft adapter wrapped
        wrapped = [n for n, m in self.model.named_modules() if isinstance(m, OrthoLayer) and m.kind != "conv2d"]
        expand_all_linear(peft_config, self.model, wrapped)
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT calls this after creating or loading an adapter. True: float32 (orthoft builds float32;
        # PEFT upcasts what a low_cpu_mem_usage load brought in half precision); False: the base's dtype
        if autocast_adapter_dtype:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
            return
        for module in self.model.modules():
            if isinstance(module, OrthoLayer) and module.has_adapter(adapter_name):
                cast_adapter_to_base_dtype(module, adapter_name)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        names = adapter_names or self.active_adapters
        quantized = [
            m.module_name
            for m in self.model.modules()
            if isinstance(m, OrthoLayer) and m.kind == "quantized" and any(m.has_adapter(a) for a in names)
        ]
        warn_requantizing_merge(quantized)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def layer_kwargs(
        self, peft_config: PeftConfig, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> dict[str, Any] | None:
        """Extra keyword arguments for the layer constructor and ``update_layer`` of ``target``.

        ``{}`` for most methods. A method that derives per-module data from the model (e.g. CLOVER's
        head factors, which need the sibling projections under ``parent``) overrides this; None
        leaves ``target`` as it is.
        """
        return {}

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        layer_kwargs = self.layer_kwargs(peft_config, target, target_name, parent, current_key)
        if layer_kwargs is None:
            return
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **layer_kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{self.tuner_layer_cls.method_name}: {current_key} already holds a {type(target).__name__} "
                "adapter of another method. Fix: merge_and_unload() it first or target another module."
            )
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config, module_name=current_key, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


__all__ = ["OrthoLayer", "OrthoTuner", "check_rank", "keep_bnb_4bit_unpacked", "layer_kind", "resolve_block_size"]
