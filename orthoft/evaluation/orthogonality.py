"""Orthogonality diagnostics of trained adapters, per adapted layer and adapter.

What is inspected follows the layer's declared ``map_kind`` (no method is special-cased):

``"input_map"`` (the layer maps inputs ``x -> x R``, e.g. OFT, BOFT, HRA, qGOFT), kind ``multiplicative``:

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

  ``R`` comes from the layer itself: block-diagonal layers return their ``(n, b, b)`` blocks from
  ``layer.rotation_blocks(adapter)`` (eigenvalues per block; the union is the spectrum of the
  block-diagonal); other layers give the dense map as ``layer.transform_input(adapter, I)`` (skipped
  above ``max_dense_dim`` features, eigenvalues only up to ``max_eig_dim``). Layers with an output
  scale (``layer.output_scale(adapter)``) also report ``max |s - 1|``.

``"additive"`` (``W + dW``) and ``"reparametrized"`` (no input-side map, e.g. CLOVER's per-head
cores), kind ``additive``/``reparametrized``: the relative weight change ``|W' - W|_F / |W|_F``.

An adapter with NaN/inf values (in its tensors, or in the map they make) has no angles: its entry
says ``non_finite`` (the tensors, or ``"computed map"``) instead, the summary counts such layers in
``non_finite_layers`` and leaves them out of its means and maxima, so a diverged adapter never reads
as a small rotation.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from ..adapters.base import OrthoLayer


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


def _block_stats(blocks: torch.Tensor, dim: int) -> dict[str, Any]:
    """Statistics of the block-diagonal map from its blocks (never builds the ``dim x dim`` matrix)."""
    blocks = blocks.detach().float().cpu()
    n_blocks = dim // blocks.shape[-1]
    if blocks.shape[0] == 1 and n_blocks > 1:  # one shared block stands for all of them
        blocks = blocks.expand(n_blocks, -1, -1)
    eye = torch.eye(blocks.shape[-1])
    return {
        "structure": f"{blocks.shape[0]} blocks of {blocks.shape[-1]}",
        "orthogonality_error": float((blocks.mT @ blocks - eye).abs().amax()),
        "distance_from_identity": float((blocks - eye).square().sum().sqrt()),
        **_angle_stats(
            torch.linalg.eigvals(blocks.double()).reshape(-1), float(blocks.diagonal(dim1=-2, dim2=-1).sum()), dim
        ),
    }


def _dense_stats(layer: OrthoLayer, adapter: str, dim: int, max_eig_dim: int) -> dict[str, Any]:
    """Statistics of the dense input map ``R = transform_input(adapter, I)``."""
    eye = torch.eye(dim, device=next(layer.parameters()).device)
    rotation = layer.transform_input(adapter, eye).detach().float().cpu()  # rows of I @ R = R
    eye = eye.cpu()
    eigenvalues = torch.linalg.eigvals(rotation.double()) if dim <= max_eig_dim else None
    return {
        "structure": f"dense {dim}x{dim}",
        "orthogonality_error": float((rotation.T @ rotation - eye).abs().amax()),
        "distance_from_identity": float((rotation - eye).norm()),
        **_angle_stats(eigenvalues, float(rotation.trace()), dim),
    }


def _input_map_entry(layer: OrthoLayer, adapter: str, max_dense_dim: int, max_eig_dim: int) -> dict[str, Any]:
    dim = layer.in_features
    blocks = layer.rotation_blocks(adapter)
    if blocks is not None:  # block-diagonal: work per block
        entry = _block_stats(blocks, dim)
    elif dim > max_dense_dim:
        return {"skipped": f"in_features {dim} > max_dense_dim {max_dense_dim}"}
    else:
        entry = _dense_stats(layer, adapter, dim, max_eig_dim)
    scale = layer.output_scale(adapter)
    if scale is not None:
        entry["max_abs_scale_minus_1"] = float((scale.detach().float() - 1).abs().max())
    return entry


def _weight_change_entry(layer: OrthoLayer, adapter: str) -> dict[str, Any]:
    """How far the adapter moved the weight: ``|dW|_F / |W|_F``."""
    base = layer.dense_base_weight()
    delta = layer.get_delta_weight(adapter).float()
    return {"kind": layer.map_kind, "relative_delta": float(delta.norm() / base.norm().clamp_min(1e-12))}


def adapter_non_finite(layer: OrthoLayer, adapter: str) -> list[str]:
    """Names of ``adapter``'s tensors in ``layer`` (not the base weight) holding NaN or inf."""
    found = []
    for name, tensor in itertools.chain(layer.named_parameters(), layer.named_buffers()):
        if name.startswith("base_layer.") or adapter not in name.split("."):
            continue  # PEFT keys adapter tensors by name: orthoft_oft_Q.default, ...default.weight
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(name)
    return found


def non_finite_adapter_tensors(model: nn.Module) -> list[str]:
    """``layer.tensor`` of every orthoft adapter tensor in ``model`` that holds NaN or inf (empty when all finite)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, OrthoLayer):
            for adapter in module.adapter_configs:
                found += [f"{name}.{tensor}" for tensor in adapter_non_finite(module, adapter)]
    return found


def _finite(entry: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in entry.values() if isinstance(v, float))


def _layer_entry(name: str, layer: OrthoLayer, adapter: str, max_dense_dim: int, max_eig_dim: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"layer": name, "adapter": adapter, "method": layer.method_name}
    kind = layer.map_kind
    bad = adapter_non_finite(layer, adapter)
    if bad:  # no statistics: eigenvalues of NaN are NaN (or an error), and angles would read as small
        entry.update(kind=kind, non_finite=bad)
        return entry
    if kind == "input_map":
        entry.update(kind="multiplicative", **_input_map_entry(layer, adapter, max_dense_dim, max_eig_dim))
    elif kind in ("additive", "reparametrized"):
        entry.update(_weight_change_entry(layer, adapter))
    else:
        raise ValueError(
            f"{type(layer).__name__}.map_kind is {kind!r}; orthogonality diagnostics know 'input_map', 'additive' "
            "and 'reparametrized' (see OrthoLayer.map_kind)."
        )
    if not _finite(entry):  # finite tensors whose map overflowed
        return {
            "layer": name,
            "adapter": adapter,
            "method": layer.method_name,
            "kind": entry["kind"],
            "non_finite": ["computed map"],
        }
    return entry


@torch.no_grad()
def orthogonality_report(model: nn.Module, max_dense_dim: int = 4096, max_eig_dim: int = 1024) -> dict[str, Any]:
    """Per-layer diagnostics of every orthoft adapter in ``model`` (see the module docstring) and a summary."""
    layers: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        if not isinstance(module, OrthoLayer):
            continue
        for adapter in module.adapter_configs:
            if module.has_adapter(adapter):
                layers.append(_layer_entry(name, module, adapter, max_dense_dim, max_eig_dim))
    summary: dict[str, Any] = {"layers": len(layers)}
    non_finite = [e for e in layers if "non_finite" in e]
    if non_finite:
        summary["non_finite_layers"] = len(non_finite)
    for summary_key, key, reduce in (
        ("max_orthogonality_error", "orthogonality_error", max),
        ("max_angle_deg", "max_angle_deg", max),
        ("mean_angle_deg", "mean_angle_deg", _mean),
        ("mean_trace_angle_deg", "trace_angle_deg", _mean),
        ("mean_relative_delta", "relative_delta", _mean),
    ):
        values = [e[key] for e in layers if key in e and "non_finite" not in e]
        if values:
            summary[summary_key] = reduce(values)
    return {"summary": summary, "layers": layers}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def format_values(values: dict[str, Any]) -> str:
    """``key=value, ...`` with floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def format_orthogonality(report: dict[str, Any], limit: int = 12) -> str:
    """A short table: the summary (first any NON-FINITE layers), then the ``limit`` layers that moved most."""
    lines = ["orthogonality: " + format_values(report["summary"])]
    non_finite = [e for e in report["layers"] if "non_finite" in e]
    if non_finite:
        first = non_finite[0]
        lines.append(
            f"  NON-FINITE (NaN/inf) adapter values in {len(non_finite)} layer(s), no angles for them; first: "
            f"{first['layer']} [{first['adapter']}]: {', '.join(first['non_finite'])}"
        )
    finite = [e for e in report["layers"] if "non_finite" not in e]
    ranked = sorted(finite, key=lambda e: -e.get("trace_angle_deg", e.get("relative_delta", 0.0)))
    for entry in ranked[:limit]:
        values = {k: v for k, v in entry.items() if k not in ("layer", "adapter", "method", "kind")}
        lines.append(f"  {entry['layer']} [{entry['adapter']}]: {format_values(values)}")
    if len(ranked) > limit:
        lines.append(f"  ... {len(ranked) - limit} more layers in the JSON report")
    return "\n".join(lines)
