"""CLOVER: train a small matrix per attention head between orthonormal head bases (Meng et al.).

Per head, ``W_Q^T W_K`` and ``W_O W_V`` have rank <= ``d_head``. CLOVER factors them as
``U S V^T`` with orthonormal ``U``, ``V`` and trains the ``d_head x d_head`` core ``S``
(initialized to the singular values). With RoPE between Q and K the pair cannot be merged, so
each head of Q and K is factored alone by QR (``W_h = S_h B_h``, ``B_h`` orthonormal rows); with
GQA (fewer kv heads) the V-O pair is not per head either, so V is factored per kv head and O per
head by QR.

How it sits in PEFT. The base weights are never replaced. The orthonormal bases are fixed
linear functions of the original weights (e.g. ``B_h = S0_h^{-1} W_h`` for a QR-factored head),
so a trained core ``S_h`` is the same model as the original projection followed (q, k, v heads)
or preceded (O under GQA) by a per-head ``d_head x d_head`` transform
``T_h = I + L_h (S_h - S0_h) R_h``, with ``L_h``, ``R_h`` small frozen matrices (for QR:
``L = I``, ``R = S0^{-1}``; the joint cases in :func:`orthoft.orthogonal.heads.joint_value_output` and
:func:`~orthoft.orthogonal.heads.joint_query_key`)
and ``S0_h`` the initial core. The layer applies ``T_h`` to the head's slice of the activations:

* ``T_h = I`` exactly at init (``S_h - S0_h`` is exactly 0), so the model is bitwise the base model;
* the gradient of ``S_h`` is the one of CLOVER's own parametrization (``L``, ``R`` map the
  projection's coordinates to the orthonormal ones);
* merging folds ``T_h`` into the weight of the projection that carries it (no extra parameters
  remain), unmerging applies ``T_h^{-1}``, disabling is the untouched base layer;
* ``S``, ``S0``, ``L``, ``R`` are saved with the adapter (``d_head^2`` numbers per head each), so
  ``PeftModel.from_pretrained`` on a fresh base model is exact and never depends on a QR/SVD
  being reproducible; the head layout is re-derived from the config and the module names.

Where a pair is factored jointly, the transform lives on one member (V for V-O, Q for Q-K) and the
other projection is left as a plain module: its weight does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..orthogonal.heads import (
    HeadFactors,
    HeadLayout,
    fused_qkv_factors,
    qr_head_factors,
    query_key_factors,
    value_output_factors,
)
from .base import OrthoLayer, OrthoTuner, layer_kind
from .config import OrthoConfig

Role = Literal["q", "k", "v", "o", "qkv"]
DEFAULT_PROJECTION_ROLES: dict[str, str] = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "qkv_proj": "qkv",
    "c_attn": "qkv",
    "c_proj": "o",
}
# model config keys whose presence means rotary position embeddings sit between Q and K
ROTARY_CONFIG_KEYS = (
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "rotary_dim",
    "rotary_pct",
    "rotary_emb_base",
)
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
    "gpt2": ["c_attn", "attn.c_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}


@dataclass
class CLOVERConfig(OrthoConfig):
    """CLOVER: a trainable ``d_head x d_head`` core per attention head between orthonormal bases.

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.01, Muon 0.03, NorMuon 0.03,
    TurboMuon 0.1, ROOT 0.1, AuON 0.03 (all grid-measured on MiniLM-L6 / Rotten Tomatoes; ``docs/quality.md``).
    Short fine-tunes of small models; see there for larger ones.

    Which factorization each projection gets (decided per attention block from what is targeted):

    * Q and K both targeted, no rotary embedding: joint SVD of ``W_Q^h^T W_K^h``; the core sits on Q.
    * otherwise Q (per head) and K (per kv head) alone by QR.
    * V and O both targeted and ``num_kv_heads == num_heads``: joint SVD of ``W_O^h W_V^h``; the
      core sits on V.
    * otherwise V alone by QR per kv head, O alone by QR per head (on O's input).

    Params: ``d_head^2`` per factored head.

    Args:
        target_modules: attention projections, by default per ``model_type`` (Llama-like:
            ``q_proj, k_proj, v_proj, o_proj``; GPT-2: ``c_attn, attn.c_proj``).
        num_heads / num_kv_heads / head_dim: head layout; read from the model config when ``None``.
        rotary: whether rotary embeddings sit between Q and K; ``None`` reads the model config.
        projection_roles: module name -> role (``"q"``, ``"k"``, ``"v"``, ``"o"`` or fused ``"qkv"``),
            merged over the defaults (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``qkv_proj``,
            ``c_attn``, ``c_proj``).
        Plus the common options of ``OrthoConfig``.
    """

    num_heads: int | None = field(default=None)
    num_kv_heads: int | None = field(default=None)
    head_dim: int | None = field(default=None)
    rotary: bool | None = field(default=None)
    projection_roles: dict[str, str] | None = field(default=None)

    method = "clover"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        bad = {k: v for k, v in (self.projection_roles or {}).items() if v not in ("q", "k", "v", "o", "qkv")}
        if bad:
            raise ValueError(
                f"CLOVERConfig: projection_roles {bad} name unknown roles. Fix: use 'q', 'k', 'v', 'o' or 'qkv'."
            )
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"CLOVERConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}. Fix: pass the model's head layout."
            )

    def roles(self) -> dict[str, str]:
        return {**DEFAULT_PROJECTION_ROLES, **(self.projection_roles or {})}


# ---- the layer ------------------------------------------------------------------------------------


class CLOVERLayer(OrthoLayer):
    """One attention projection with per-head CLOVER transforms. Built by :class:`CLOVERModel` only."""

    method_name = "CLOVER"
    map_kind = "reparametrized"  # per-head cores between fixed bases: no input-side map
    adapter_layer_names = ("orthoft_clover_S",)
    other_param_names = (
        "adapter_configs",
        "clover_side",
        "orthoft_clover_S0",
        "orthoft_clover_left",
        "orthoft_clover_right",
        "orthoft_clover_index",
    )
    optimizer_views = {"orthoft_clover_S": "matrix_stack"}
    # T - I = left (S - S0) right moves the weight linearly in S - S0
    merge_roles = {"orthoft_clover_S": "shift"}
    merge_references = {"orthoft_clover_S": "orthoft_clover_S0"}
    unsupported_kinds = {"conv2d": "CLOVER factors attention heads and a Conv2d has none"}

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: PeftConfig,
        module_name: str = "",
        factors: HeadFactors | None = None,
    ) -> None:
        # handed to create_adapter, which OrthoLayer.__init__ calls before it returns
        self.__dict__["_incoming_factors"] = factors
        super().__init__(base_layer, adapter_name, config, module_name)

    def update_layer(
        self, adapter_name: str, config: PeftConfig, factors: HeadFactors | None = None, **kwargs: Any
    ) -> None:
        if factors is not None:
            self.__dict__["_incoming_factors"] = factors
        super().update_layer(adapter_name, config, **kwargs)

    def create_adapter(self, adapter_name: str, config: CLOVERConfig) -> None:
        factors = self.__dict__.pop("_incoming_factors", None)
        if factors is None:
            raise RuntimeError("CLOVER: layers are created by CLOVERModel, which computes the head factors.")
        if not hasattr(self, "orthoft_clover_S"):
            self.orthoft_clover_S = nn.ParameterDict()
            self.orthoft_clover_S0 = BufferDict(persistent=True)
            self.orthoft_clover_left = BufferDict(persistent=True)
            self.orthoft_clover_right = BufferDict(persistent=True)
            # the head layout is re-derived from the config on load: not saved
            self.orthoft_clover_index = BufferDict(persistent=False)
            self.clover_side: dict[str, str] = {}
        device = factors.s0.device
        s0 = factors.s0.float()
        self.orthoft_clover_S0[adapter_name] = s0
        self.orthoft_clover_left[adapter_name] = factors.left.float()
        self.orthoft_clover_right[adapter_name] = factors.right.float()
        starts = torch.tensor(factors.starts, device=device)
        index = (starts[:, None] + torch.arange(factors.head_dim, device=device)).flatten()
        self.orthoft_clover_index[adapter_name] = index
        self.clover_side[adapter_name] = factors.side
        core = s0.clone()
        if not config.init_weights:
            core = core + 0.1 * core.abs().mean() * torch.randn_like(core)
        self.orthoft_clover_S[adapter_name] = nn.Parameter(core)

    # ---- the per-head transforms ----------------------------------------------------------------
    def head_deltas(self, adapter_name: str) -> torch.Tensor:
        """``T_g - I = left_g (S_g - S0_g) right_g`` (float32, (G, dh, dh)); exactly 0 at init."""
        tensors = [self.orthoft_clover_S[adapter_name], self.orthoft_clover_S0[adapter_name]]
        tensors += [self.orthoft_clover_left[adapter_name], self.orthoft_clover_right[adapter_name]]
        return self.cached_for_inference(adapter_name, tensors, lambda: self._build_deltas(adapter_name))

    def _build_deltas(self, adapter_name: str) -> torch.Tensor:
        change = self.orthoft_clover_S[adapter_name].float() - self.orthoft_clover_S0[adapter_name]
        return self.orthoft_clover_left[adapter_name] @ change @ self.orthoft_clover_right[adapter_name]

    def _apply_heads(self, adapter_name: str, features: torch.Tensor, deltas: torch.Tensor, bias=None):
        """``features`` with each group slice ``z_g`` (minus ``bias``) replaced by ``T_g z_g`` (last dim)."""
        index = self.orthoft_clover_index[adapter_name]
        groups, head_dim = deltas.shape[0], deltas.shape[-1]
        heads = features.index_select(-1, index)
        if bias is not None:
            heads = heads - bias.index_select(0, index).to(heads.dtype)
        heads = heads.unflatten(-1, (groups, head_dim))
        change = torch.einsum("...gj,gij->...gi", heads, deltas.to(heads.dtype))
        # under autocast the einsum may come out in bf16 while features are float32
        return features.index_add(-1, index, change.flatten(-2).to(features.dtype))

    def _transform_weight(self, adapter_name: str, weight: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        index = self.orthoft_clover_index[adapter_name]
        groups, head_dim = deltas.shape[0], deltas.shape[-1]
        if self.clover_side[adapter_name] == "output":  # rows of head g: W_g -> T_g W_g
            heads = weight.index_select(0, index).unflatten(0, (groups, head_dim))
            return weight.index_add(0, index, (deltas @ heads).flatten(0, 1))
        heads = weight.index_select(1, index).unflatten(1, (groups, head_dim))  # columns: W_g -> W_g T_g
        return weight.index_add(1, index, torch.einsum("ogj,gji->ogi", heads, deltas).flatten(1))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor, training: bool = False) -> torch.Tensor:
        return self._transform_weight(adapter_name, weight, self.head_deltas(adapter_name))

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        deltas = self.head_deltas(adapter_name)
        eye = torch.eye(deltas.shape[-1], device=deltas.device)
        return self._transform_weight(adapter_name, weight, torch.linalg.inv(eye + deltas) - eye)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self.unmerged_active_adapters()
        # merging a1 then a2 gives T2 T1 W (output side) or W T1 T2 (input side): apply in that order
        for name in reversed(active):
            if self.clover_side[name] == "input":
                x = self._apply_heads(name, x, self.head_deltas(name))
        result = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.get_base_layer(), "bias", None)
        for name in active:
            if self.clover_side[name] == "output":
                # T acts on W x only: the bias stays where it is, as in the merged weight
                result = self._apply_heads(name, result, self.head_deltas(name), bias)
        return result

    def extra_repr(self) -> str:
        sides = ", ".join(f"{a}: {s}" for a, s in self.clover_side.items())
        return f"{super().extra_repr()}, sides=({sides})"


# ---- the tuner ------------------------------------------------------------------------------------


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """Float64 ``(out, in)`` weight of a Linear, Conv1D or quantized linear (possibly wrapped)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    backend = resolve_quantization_backend(base)
    if backend is not None:
        weight = backend.get_base_weight(base)
    elif isinstance(base, Conv1D):
        weight = base.weight.T
    else:
        weight = base.weight
    return weight.detach().double()


class CLOVERModel(OrthoTuner):
    prefix = "orthoft_clover_"
    tuner_layer_cls = CLOVERLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        # resolve the head layout once, so that it is saved with the adapter config
        heads = peft_config.num_heads or model_config.get("num_attention_heads") or model_config.get("n_head")
        if not heads:
            raise ValueError(
                "CLOVERConfig: the model config does not give the number of attention heads. "
                "Fix: pass num_heads=..., num_kv_heads=... and head_dim=... to CLOVERConfig."
            )
        hidden = model_config.get("hidden_size") or model_config.get("n_embd")
        peft_config.num_heads = heads
        peft_config.num_kv_heads = peft_config.num_kv_heads or model_config.get("num_key_value_heads") or heads
        head_dim = peft_config.head_dim or model_config.get("head_dim") or (hidden // heads if hidden else None)
        if not head_dim:
            raise ValueError(
                "CLOVERConfig: head_dim is unknown for this model. Fix: pass head_dim=... to CLOVERConfig."
            )
        peft_config.head_dim = head_dim
        if peft_config.rotary is None:
            peft_config.rotary = any(model_config.get(key) is not None for key in ROTARY_CONFIG_KEYS)
        if peft_config.num_heads % peft_config.num_kv_heads:
            raise ValueError(
                f"CLOVERConfig: num_heads {peft_config.num_heads} is not a multiple of num_kv_heads "
                f"{peft_config.num_kv_heads}. Fix: pass the model's head layout explicitly."
            )
        return peft_config

    def _is_targeted(self, config: PeftConfig, key: str) -> bool:
        result = self._check_target_module_exists(config, key)
        return bool(result) and not isinstance(result, _ExcludedModule)

    def layer_kwargs(
        self, peft_config: PeftConfig, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> dict[str, Any] | None:
        """The head factors CLOVERLayer needs; None when the partner projection carries this pair's core."""
        factors = self.head_factors(peft_config, target, target_name, parent, current_key)
        return None if factors is None else {"factors": factors}

    def head_factors(
        self, config: CLOVERConfig, target: nn.Module, target_name: str, parent: nn.Module, key: str
    ) -> HeadFactors | None:
        """The factorization of ``target`` (None when its partner carries the core)."""
        roles = config.roles()
        role = roles.get(target_name)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if role is None:
            raise TypeError(
                f"CLOVER: {key} ({type(base).__name__}) is not a known attention projection. Fix: target "
                "q_proj/k_proj/v_proj/o_proj (or c_attn and attn.c_proj), or give its role in "
                "projection_roles."
            )
        kind = layer_kind(base)
        if kind not in ("linear", "conv1d", "quantized"):
            raise TypeError(
                f"CLOVER: {key} is a {type(base).__name__}; CLOVER factors attention heads of Linear, Conv1D "
                "or quantized linear projections. Fix: remove it from target_modules."
            )
        siblings: dict[str, tuple[str, nn.Module]] = {}
        for name, module in parent.named_children():
            if roles.get(name) is not None and module is not target:
                siblings.setdefault(roles[name], (name, module))
        prefix = key.rpartition(".")[0]

        def partner(wanted: str) -> nn.Module | None:
            found = siblings.get(wanted)
            if found is None:
                return None
            return found[1] if self._is_targeted(config, f"{prefix}.{found[0]}" if prefix else found[0]) else None

        has_values = "v" in siblings or "qkv" in siblings
        if role == "o" and not has_values:
            raise TypeError(
                f"CLOVER: {key} is named like an attention output projection but its parent "
                f"{type(parent).__name__} has no value projection (e.g. GPT-2's mlp.c_proj). "
                "Fix: target only attention modules, e.g. 'attn.c_proj'."
            )
        layout = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, bool(config.rotary))
        weight = _dense_weight(target)
        if role == "qkv":
            outputs = partner("o")
            joint_outputs = _dense_weight(outputs) if outputs is not None and layout.group_size == 1 else None
            return fused_qkv_factors(key, weight, layout, joint_outputs)
        if role == "q":
            keys = partner("k")
            if keys is not None and not layout.rotary:
                return query_key_factors(key, weight, _dense_weight(keys), layout, start=0)
            return qr_head_factors(key, weight, layout.num_heads, layout.head_dim, "output")
        if role == "k":
            if partner("q") is not None and not layout.rotary:
                return None
            return qr_head_factors(key, weight, layout.num_kv_heads, layout.head_dim, "output")
        if role == "v":
            outputs = partner("o")
            if outputs is not None and layout.group_size == 1:
                return value_output_factors(key, weight, _dense_weight(outputs), layout, start=0)
            return qr_head_factors(key, weight, layout.num_kv_heads, layout.head_dim, "output")
        # role == "o"
        if layout.group_size == 1 and (partner("v") is not None or partner("qkv") is not None):
            return None
        return qr_head_factors(key, weight, layout.num_heads, layout.head_dim, "input")
