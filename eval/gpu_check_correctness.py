"""Section 2 of ``eval/gpu_check.py``: every orthoft method per layer kind on a random-init tiny Llama."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from gpu_check_common import (
    HAS_BNB,
    TINY_LLAMA,
    TINY_TARGETS,
    Run,
    error_text,
    fmt,
    free_memory,
    load_llama,
    logits,
    orthoft_configs,
    relative_max,
    save_random_llama,
    table,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import orthoft

CASTS = {"_to_copy", "to", "copy", "copy_", "clone", "_autocast_to_reduced_precision", "_autocast_to_full_precision"}
REDUCTIONS = {"sum", "mean", "norm", "prod", "cumsum", "cumprod", "amax", "amin", "max", "min", "var", "std"}
MATRIX_OPS = (
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "addbmm",
    "matmul",
    "mv",
    "dot",
    "linalg_",
    "_linalg_",
    "triangular_solve",
    "cholesky",
    "householder_product",
    "einsum",
)


def is_arithmetic(func: Any) -> bool:
    name = func.overloadpacket.__name__
    if name in CASTS:
        return False
    return torch.Tag.pointwise in func.tags or name in REDUCTIONS or name.startswith(MATRIX_OPS)


def storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(tensor)


class RotationDtypeProbe(TorchDispatchMode):
    """Records the arithmetic ops computed from adapter tensors alone (not from the activations).

    Tensors are tagged by storage: the adapter's parameters and buffers are one source, the layer
    input another; an op's outputs take its inputs' tags (activation wins). The ops seen here run
    after autocast's casts, so a rotation built under autocast shows up as bf16 ops. Dtype casts are
    not counted: casting the finished fp32 rotation to the activation dtype is where it is applied.
    """

    def __init__(self, adapter_tensors: list[torch.Tensor], activations: list[torch.Tensor]) -> None:
        super().__init__()
        self.adapter = {storage_key(t) for t in adapter_tensors if t.numel()}
        self.activation = {storage_key(t) for t in activations}
        self.alive: list[torch.Tensor] = []  # no storage is freed and reused while tags refer to it
        self.build_ops: list[tuple[str, list[str]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.numel()}
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.alive.extend(outputs)
        from_activation, from_adapter = bool(inputs & self.activation), bool(inputs & self.adapter)
        if from_activation or from_adapter:
            (self.activation if from_activation else self.adapter).update(storage_key(t) for t in outputs)
        if from_adapter and not from_activation and is_arithmetic(func):
            dtypes = [str(t.dtype).removeprefix("torch.") for t in outputs if t.is_floating_point()]
            self.build_ops.append((func.overloadpacket.__name__, dtypes))
        return out


def rotation_dtype_check(model: torch.nn.Module, run: Run, activation_dtype: torch.dtype) -> dict[str, Any]:
    """Adapter parameters float32, and the first adapted layer's forward under bf16 autocast."""
    params_fp32 = all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    layer = next(m for m in model.modules() if isinstance(m, orthoft.OrthoLayer))
    adapter = [
        t for name, t in [*layer.named_parameters(), *layer.named_buffers()] if not name.startswith("base_layer")
    ]
    x = torch.randn(2, 8, layer.in_features, device=run.device, dtype=activation_dtype)
    layer.train()
    with torch.autocast(run.device, dtype=torch.bfloat16), RotationDtypeProbe(adapter, [x]) as probe:
        out = layer(x)
    low = Counter(f"{name}->{'/'.join(d)}" for name, d in probe.build_ops if any(t != "float32" for t in d))
    finite = bool(torch.isfinite(out.float()).all())
    return {
        "adapter_params_fp32": params_fp32,
        "adapter_only_ops": len(probe.build_ops),
        "adapter_only_ops_not_fp32": dict(low),
        "output_finite": finite,
        "layer": layer.module_name,
        "ok": params_fp32 and finite and not low,
    }


def train_steps(model: torch.nn.Module, input_ids: torch.Tensor, run: Run, steps: int = 3) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    losses, grads_ok = [], True
    for _ in range(steps):
        with run.autocast():
            loss = model(input_ids=input_ids, labels=input_ids).loss  # includes the qGOFT/HRA penalty
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in params]
        grads_ok = grads_ok and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        grads_ok = grads_ok and any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        optimizer.step()
        losses.append(float(loss.detach()))
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return {"losses": [round(v, 4) for v in losses], "trainable": len(params), "ok": finite and grads_ok}


@dataclass
class Kind:
    name: str
    compute_dtype: torch.dtype
    identity_floor: float  # identity tolerance when the kernel adds no noise
    floor: float = 1e-3  # merge / export tolerance when the kernel adds no noise (tests/test_export.py)


def correctness_kinds(run: Run) -> list[Kind]:
    if run.dry_run:
        kinds = [Kind("fp32", torch.float32, 1e-5), Kind("nf4", torch.float32, 1e-5)]
    else:
        kinds = [
            Kind("bf16", torch.bfloat16, 1e-3),
            Kind("nf4", torch.bfloat16, 1e-3),
            Kind("int8", torch.bfloat16, 1e-3),
        ]
    return kinds if HAS_BNB else [k for k in kinds if k.name in ("fp32", "bf16")]


# correctness-row targets per method config (None: the method picks its own, e.g. CLOVER's attention pairs)
METHOD_TARGETS: dict[str, list[str] | None] = {"CLOVERConfig": None}


def method_config(name: str, cls: type) -> Any:
    targets = METHOD_TARGETS.get(name, TINY_TARGETS)
    return cls() if targets is None else cls(target_modules=targets)


def kernel_noise(folder: Path, kind: Kind, run: Run, scratch: Path) -> dict[str, float]:
    """``export_merged`` errors of an untrained OFT (the identity): what the base kernel alone contributes."""
    model = peft.get_peft_model(
        load_llama(folder, kind.name, run.device, kind.compute_dtype), orthoft.OFTConfig(target_modules=TINY_TARGETS)
    )
    report = orthoft.export_merged(model, scratch / f"noise-{kind.name}", overwrite=True)
    return {"merge": report.merge_error["relative_max"], "export": report.export_error["relative_max"]}


def attempt(checks: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one check; an exception fails that check only, and the table shows it."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - the row says what broke, the other checks still run
        checks[name] = False
        checks.setdefault("errors", {})[name] = error_text(error)
        return None


def merge_checks(model: Any, input_ids: torch.Tensor, kind: Kind, scratch: Path, row: dict[str, Any]) -> None:
    trained = logits(model, input_ids)
    if kind.name in ("fp32", "bf16"):  # in-place merge into the dense weights and back
        model.merge_adapter()
        row["inplace_merge_rel"] = relative_max(logits(model, input_ids), trained)
        model.unmerge_adapter()
        row["unmerge_rel"] = relative_max(logits(model, input_ids), trained)
    report = orthoft.export_merged(model, scratch / f"{row['method']}-{kind.name}", overwrite=True)
    row.update(
        merge_rel=report.merge_error["relative_max"],
        export_rel=report.export_error["relative_max"],
        export_dtype=report.dtype,
    )


def check_method(
    name: str, cls: type, kind: Kind, folder: Path, run: Run, scratch: Path, noise: dict[str, float]
) -> dict[str, Any]:
    torch.manual_seed(0)
    input_ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 16), device=run.device)
    base = load_llama(folder, kind.name, run.device, kind.compute_dtype)
    reference = logits(base, input_ids)
    model = peft.get_peft_model(base, method_config(name, cls))
    tolerance = {
        "identity": max(kind.identity_floor, 3 * noise["merge"]),
        "merge": max(kind.floor, 3 * noise["merge"]),
        "export": max(kind.floor, 3 * noise["export"]),
    }
    row: dict[str, Any] = {"method": name.removesuffix("Config"), "kind": kind.name, "tolerance": tolerance}
    checks: dict[str, Any] = {}
    row["identity_rel"] = relative_max(logits(model, input_ids), reference)
    checks["identity"] = row["identity_rel"] <= tolerance["identity"]
    row["train"] = attempt(checks, "finite_grads", lambda: train_steps(model, input_ids, run))
    if row["train"] is not None:
        row["moved_rel"] = relative_max(logits(model, input_ids), reference)
        checks["finite_grads"] = row["train"]["ok"] and row["moved_rel"] > 0
    row["autocast_fp32"] = attempt(
        checks, "autocast_fp32", lambda: rotation_dtype_check(model, run, kind.compute_dtype)
    )
    if row["autocast_fp32"] is not None:
        checks["autocast_fp32"] = row["autocast_fp32"]["ok"]
    attempt(checks, "merged_eq_unmerged", lambda: merge_checks(model, input_ids, kind, scratch, row))
    if "merge_rel" in row:
        # in place: exact only in float32 (a bf16 weight rounds the merge); reported for every dense kind
        in_place = kind.name != "fp32" or (
            row["inplace_merge_rel"] <= tolerance["merge"] and row["unmerge_rel"] <= tolerance["identity"]
        )
        checks["merged_eq_unmerged"] = row["merge_rel"] <= tolerance["merge"] and in_place
        checks["export"] = row["export_rel"] <= tolerance["export"]
    else:
        checks["export"] = False
    row["checks"] = checks
    row["ok"] = all(v for k, v in checks.items() if k != "errors")
    return row


def section_correctness(run: Run) -> dict[str, Any]:
    kinds = correctness_kinds(run)
    result: dict[str, Any] = {"kinds": [k.name for k in kinds], "rows": [], "noise": {}, "skipped": []}
    if not HAS_BNB:
        result["skipped"].append("bitsandbytes is not installed: no nf4/int8 rows")
    configs = orthoft_configs()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        folder = save_random_llama(scratch / "tiny-llama", torch.float32, "cpu", **TINY_LLAMA)
        for kind in kinds:
            try:
                noise = kernel_noise(folder, kind, run, scratch)
            except Exception as error:  # noqa: BLE001 - the table says what broke, the run goes on
                noise = {"merge": 0.0, "export": 0.0, "error": error_text(error)}
            result["noise"][kind.name] = noise
            for name, cls in configs.items():
                if run.budget.left() < 30:
                    result["skipped"].append(f"{name} on {kind.name}: time budget spent")
                    continue
                try:
                    row = check_method(name, cls, kind, folder, run, scratch, noise)
                except Exception as error:  # noqa: BLE001
                    row = {
                        "method": name.removesuffix("Config"),
                        "kind": kind.name,
                        "ok": False,
                        "error": error_text(error),
                    }
                result["rows"].append(row)
                print(f"  correctness {row['method']:>6} {kind.name:>5}: {'ok' if row['ok'] else 'FAIL'}", flush=True)
                free_memory(run)
    return result


CORRECTNESS_NOTE = (
    "Relative max logit differences (max |diff| / max |reference|) on a random-init tiny Llama. identity: the "
    "adapter model at init vs the base. merged: `export_merged`'s dense float32 merge vs the adapter model after "
    "training; dense kinds also merge in place and unmerge (required on fp32 only: a bf16 weight rounds the merge). "
    "grads: 3 AdamW steps (bf16 autocast on CUDA), every trainable gradient present and finite, one nonzero, losses "
    "finite, logits moved. export: the written model (default dtype; dequantized float32 for bnb bases) vs the "
    "adapter model. Tolerance: max(1e-3, 3 x the kernel noise of an untrained OFT export); identity: max(1e-5 on "
    "fp32-compute kinds or 1e-3 on bf16 ones, 3 x noise). fp32 under autocast: every trainable parameter is "
    "float32, and in the first adapted layer's forward under bf16 autocast every arithmetic op computed from "
    "adapter tensors alone (the rotation build, traced with a TorchDispatchMode; casts excluded) produced float32, "
    "output finite. Forward only; the backward is not traced. 0 adapter-only ops: the method applies its "
    "parameters to the activations directly, so only the parameter dtypes are checked."
)


def markdown_correctness(section: dict | None) -> list[str]:
    if section is None:
        return ["## 2. Correctness per method and layer kind", "", "not run (section not selected)", ""]
    rows, errors = [], []
    for r in section["rows"]:
        if "checks" not in r:
            rows.append([r["method"], r["kind"], f"ERROR: {r['error']}"] + [""] * 5)
            continue
        rows.append(correctness_cells(r))
        errors += [f"- {r['method']} {r['kind']} {k}: {v}" for k, v in r["checks"].get("errors", {}).items()]
    noise = ", ".join(f"{k} merge {fmt(v['merge'])} export {fmt(v['export'])}" for k, v in section["noise"].items())
    return (
        [
            "## 2. Correctness per method and layer kind",
            "",
            CORRECTNESS_NOTE,
            "",
            f"kernel noise: {noise}",
            "",
        ]
        + table(
            [
                "method",
                "kind",
                "identity",
                "merged == unmerged",
                "grads after 3 steps",
                "export",
                "fp32 under autocast",
                "all",
            ],
            rows,
        )
        + errors
        + [f"- skipped: {s}" for s in section["skipped"]]
        + [""]
    )


def correctness_cells(r: dict[str, Any]) -> list[str]:
    checks, auto, train = r["checks"], r.get("autocast_fp32"), r.get("train")

    def cell(name: str, text: str) -> str:
        return f"{fmt(checks.get(name))} {text}" if name not in checks.get("errors", {}) else "FAIL (error below)"

    merge = fmt(r.get("merge_rel")) + (f" / in-place {fmt(r['inplace_merge_rel'])}" if "inplace_merge_rel" in r else "")
    train_text = f"loss {train['losses'][0]:.3f}->{train['losses'][-1]:.3f}" if train else ""
    auto_text = ""
    if auto:
        not_fp32 = auto["adapter_only_ops_not_fp32"]
        listed = ", ".join(f"{op} x{count}" for op, count in not_fp32.items())
        auto_text = f"params fp32 {fmt(auto['adapter_params_fp32'])}; adapter-only ops: {auto['adapter_only_ops']}" + (
            f", {sum(not_fp32.values())} not fp32 ({listed})" if not_fp32 else ", all fp32"
        )
    return [
        r["method"],
        r["kind"],
        cell("identity", fmt(r["identity_rel"])),
        cell("merged_eq_unmerged", merge),
        cell("finite_grads", train_text),
        cell("export", f"{fmt(r.get('export_rel'))} ({r.get('export_dtype')})"),
        cell("autocast_fp32", auto_text),
        fmt(r["ok"]),
    ]
