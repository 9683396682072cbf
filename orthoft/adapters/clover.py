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
``L = I``, ``R = S0^{-1}``; the joint cases in :func:`joint_value_output`, :func:`joint_query_key`)
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

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from peft.utils import resolve_quantization_backend
from torch import nn

from .base import Conv1D, OrthoLayer, OrthoTuner, layer_kind
from .config import OrthoConfig

PEFT_TYPE = "ORTHOFT_CLOVER"

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

    method_prefix = "clover"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._check_positive(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        bad = {k: v for k, v in (self.projection_roles or {}).items() if v not in ("q", "k", "v", "o", "qkv")}
        if bad:
            raise ValueError(
                f"CLOVERConfig: projection_roles {bad} name unknown roles. "
                "Fix: use 'q', 'k', 'v', 'o' or 'qkv'."
            )
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"CLOVERConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}. Fix: pass the model's head layout."
            )

    def roles(self) -> dict[str, str]:
        return {**DEFAULT_PROJECTION_ROLES, **(self.projection_roles or {})}


# ---- per-head factorizations (float64, batched over heads) --------------------------------------


@dataclass
class HeadFactors:
    """Frozen factors of one projection: ``T_g = I + left_g (S_g - s0_g) right_g`` per head group ``g``.

    ``side`` is ``"output"`` (``T`` acts on the head's slice of the output) or ``"input"`` (on the
    head's slice of the input). ``starts[g]`` is where group ``g``'s ``head_dim`` features begin.
    """

    side: Literal["output", "input"]
    starts: list[int]
    head_dim: int
    s0: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


def _positive_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR with a positive diagonal in ``R`` (unique for full column rank)."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs[..., None, :], r * signs[..., :, None]


def _eye_like(batch: torch.Tensor) -> torch.Tensor:
    return torch.eye(batch.shape[-1], dtype=batch.dtype, device=batch.device).expand_as(batch).clone()


def qr_rows(heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads ``W_h`` (G, dh, in) as ``S0_h B_h`` with ``B_h`` orthonormal rows: returns ``(s0, left, right)``.

    ``W_h' = S_h B_h = (I + (S_h - S0_h) S0_h^{-1}) W_h``: ``left = I``, ``right = S0^{-1}``.
    """
    _, r = _positive_qr(heads.mT)
    s0 = r.mT  # lower triangular
    return s0, _eye_like(s0), torch.linalg.inv(s0)


def qr_columns(heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads ``W_h`` (G, out, dh) as ``B_h S0_h`` with ``B_h`` orthonormal columns.

    ``W_h' = B_h S_h = W_h (I + S0_h^{-1} (S_h - S0_h))``: ``left = S0^{-1}``, ``right = I``.
    """
    _, r = _positive_qr(heads)
    return r, torch.linalg.inv(r), _eye_like(r)


def joint_value_output(values: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per head ``W_O^h W_V^h = U diag(sigma) V^T`` from ``values`` (G, dh, in) and ``outputs`` (G, out, dh).

    The core sits on V: ``W_O^h T_h W_V^h = U S_h V^T`` with ``T_h = I + D^{-1} (S_h - diag(sigma)) C^{-1}``,
    ``C = W_V^h V`` and ``D = U^T W_O^h``. Computed from two thin QRs and a ``dh x dh`` SVD, never
    forming the ``out x in`` product.
    """
    _, r_v = _positive_qr(values.mT)  # W_V^T = Q_v R_v
    _, r_o = _positive_qr(outputs)  # W_O = Q_o R_o
    u, sigma, wh = torch.linalg.svd(r_o @ r_v.mT)
    c = r_v.mT @ wh.mT  # W_V V
    d = u.mT @ r_o  # U^T W_O
    return torch.diag_embed(sigma), torch.linalg.inv(d), torch.linalg.inv(c)


def joint_query_key(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per head ``W_Q^h^T W_K^h = U diag(sigma) V^T`` from ``queries`` and matching ``keys`` (G, dh, in).

    The core sits on Q: scores ``x^T U S_h^T V^T y`` need ``T_h = I + C^{-T} (S_h - diag(sigma)) A^{-1}``
    with ``A = W_Q^h U`` and ``C = W_K^h V``.
    """
    _, r_q = _positive_qr(queries.mT)
    _, r_k = _positive_qr(keys.mT)
    u, sigma, wh = torch.linalg.svd(r_q @ r_k.mT)
    a = r_q.mT @ u
    c = r_k.mT @ wh.mT
    return torch.diag_embed(sigma), torch.linalg.inv(c).mT, torch.linalg.inv(a)


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
        return features.index_add(-1, index, change.flatten(-2))

    def _transform_weight(
        self, adapter_name: str, weight: torch.Tensor, deltas: torch.Tensor
    ) -> torch.Tensor:
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
        active = self._unmerged_active()
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
    elif Conv1D is not None and isinstance(base, Conv1D):
        weight = base.weight.T
    else:
        weight = base.weight
    return weight.detach().double()


@dataclass
class _HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: bool

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


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
        peft_config.num_kv_heads = (
            peft_config.num_kv_heads or model_config.get("num_key_value_heads") or heads
        )
        head_dim = (
            peft_config.head_dim or model_config.get("head_dim") or (hidden // heads if hidden else None)
        )
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
        factors = self.head_factors(peft_config, target, target_name, parent, current_key)
        if factors is None:
            return  # the partner projection carries this pair's core
        if isinstance(target, CLOVERLayer):
            target.update_layer(adapter_name, peft_config, factors=factors)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"CLOVER: {current_key} already holds a {type(target).__name__} adapter of another method. "
                "Fix: merge_and_unload() it first or target another module."
            )
        new_module = CLOVERLayer(target, adapter_name, peft_config, module_name=current_key, factors=factors)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
            return (
                found[1]
                if self._is_targeted(config, f"{prefix}.{found[0]}" if prefix else found[0])
                else None
            )

        has_values = "v" in siblings or "qkv" in siblings
        if role == "o" and not has_values:
            raise TypeError(
                f"CLOVER: {key} is named like an attention output projection but its parent "
                f"{type(parent).__name__} has no value projection (e.g. GPT-2's mlp.c_proj). "
                "Fix: target only attention modules, e.g. 'attn.c_proj'."
            )
        layout = _HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, bool(config.rotary))
        weight = _dense_weight(target)
        if role == "qkv":
            return self._fused_factors(key, weight, layout, partner("o"))
        if role == "q":
            keys = partner("k")
            if keys is not None and not layout.rotary:
                return self._query_key_factors(key, weight, _dense_weight(keys), layout, start=0)
            return self._qr_factors(key, weight, layout.num_heads, layout.head_dim, "output")
        if role == "k":
            if partner("q") is not None and not layout.rotary:
                return None
            return self._qr_factors(key, weight, layout.num_kv_heads, layout.head_dim, "output")
        if role == "v":
            outputs = partner("o")
            if outputs is not None and layout.group_size == 1:
                return self._value_output_factors(key, weight, _dense_weight(outputs), layout, start=0)
            return self._qr_factors(key, weight, layout.num_kv_heads, layout.head_dim, "output")
        # role == "o"
        if layout.group_size == 1 and (partner("v") is not None or partner("qkv") is not None):
            return None
        return self._qr_factors(key, weight, layout.num_heads, layout.head_dim, "input")

    # ---- factor builders ---------------------------------------------------------------------
    @staticmethod
    def _check_features(key: str, features: int, expected: int, what: str) -> None:
        if features != expected:
            raise ValueError(
                f"CLOVER: {key} has {features} {what} features but the head layout needs {expected}. "
                "Fix: pass num_heads, num_kv_heads and head_dim matching the model to CLOVERConfig."
            )

    @staticmethod
    def _finish(
        key: str, side: str, starts: list[int], head_dim: int, parts: tuple[torch.Tensor, ...]
    ) -> HeadFactors:
        s0, left, right = parts
        if not all(torch.isfinite(t).all() for t in parts):
            raise ValueError(
                f"CLOVER: a head of {key} is rank-deficient, so it has no orthonormal {head_dim}-dim basis. "
                "Fix: exclude this module (exclude_modules=[...])."
            )
        return HeadFactors(side, starts, head_dim, s0, left, right)  # type: ignore[arg-type]

    def _qr_factors(
        self, key: str, weight: torch.Tensor, heads: int, head_dim: int, side: str
    ) -> HeadFactors:
        if side == "output":
            self._check_features(key, weight.shape[0], heads * head_dim, "output")
            parts = qr_rows(weight.reshape(heads, head_dim, weight.shape[1]))
        else:
            self._check_features(key, weight.shape[1], heads * head_dim, "input")
            parts = qr_columns(weight.reshape(weight.shape[0], heads, head_dim).transpose(0, 1))
        return self._finish(key, side, [h * head_dim for h in range(heads)], head_dim, parts)

    def _query_key_factors(
        self, key: str, queries: torch.Tensor, keys: torch.Tensor, layout: _HeadLayout, start: int
    ) -> HeadFactors:
        n, dh = layout.num_heads, layout.head_dim
        self._check_features(key, queries.shape[0], n * dh, "query output")
        self._check_features(key, keys.shape[0], layout.num_kv_heads * dh, "key output")
        q_heads = queries.reshape(n, dh, -1)
        k_heads = keys.reshape(layout.num_kv_heads, dh, -1).repeat_interleave(layout.group_size, dim=0)
        parts = joint_query_key(q_heads, k_heads)
        return self._finish(key, "output", [start + h * dh for h in range(n)], dh, parts)

    def _value_output_factors(
        self, key: str, values: torch.Tensor, outputs: torch.Tensor, layout: _HeadLayout, start: int
    ) -> HeadFactors:
        n, dh = layout.num_heads, layout.head_dim
        self._check_features(key, values.shape[0], n * dh, "value output")
        self._check_features(key, outputs.shape[1], n * dh, "output-projection input")
        v_heads = values.reshape(n, dh, -1)
        o_heads = outputs.reshape(outputs.shape[0], n, dh).transpose(0, 1)
        parts = joint_value_output(v_heads, o_heads)
        return self._finish(key, "output", [start + h * dh for h in range(n)], dh, parts)

    def _fused_factors(
        self, key: str, weight: torch.Tensor, layout: _HeadLayout, outputs: nn.Module | None
    ) -> HeadFactors:
        n, kv, dh = layout.num_heads, layout.num_kv_heads, layout.head_dim
        self._check_features(key, weight.shape[0], (n + 2 * kv) * dh, "output (fused q, k, v)")
        q, k, v = weight.split([n * dh, kv * dh, kv * dh])
        k_start, v_start = n * dh, (n + kv) * dh
        pieces = []
        if layout.rotary:
            pieces.append(self._qr_factors(key, q, n, dh, "output"))
            k_factors = self._qr_factors(key, k, kv, dh, "output")
            k_factors.starts = [k_start + s for s in k_factors.starts]
            pieces.append(k_factors)
        else:
            pieces.append(self._query_key_factors(key, q, k, layout, start=0))
        if outputs is not None and layout.group_size == 1:
            pieces.append(self._value_output_factors(key, v, _dense_weight(outputs), layout, start=v_start))
        else:
            v_factors = self._qr_factors(key, v, kv, dh, "output")
            v_factors.starts = [v_start + s for s in v_factors.starts]
            pieces.append(v_factors)
        return dataclasses.replace(
            pieces[0],
            starts=[s for p in pieces for s in p.starts],
            s0=torch.cat([p.s0 for p in pieces]),
            left=torch.cat([p.left for p in pieces]),
            right=torch.cat([p.right for p in pieces]),
        )
