"""Sections 3 and 4 of ``eval/gpu_check.py``: QLoRA-style throughput and memory; Newton-Schulz timings."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from gpu_check_common import (
    ALL_LINEAR,
    HAS_BNB,
    MIB,
    TINY_LLAMA,
    Run,
    error_text,
    fmt,
    free_memory,
    load_llama,
    save_random_llama,
    table,
)

import orthoft
from orthoft.optim import newton_schulz

# ---- 3. throughput and peak memory --------------------------------------------------------------

# Llama-3.1-8B, Llama-3.2-1B and Llama-3.2-3B layer shapes (fewer layers, a 32k vocabulary); 8B first:
# the target is stated at that shape, so a tight budget skips the others
LLAMA_SHAPES = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8),
}
GPU_SETUP = dict(layers=4, vocab=32000, batch=1, seq=2048, warmup=2, rounds=3, steps=4, first_shape_s=90)
DRY_SETUP = dict(layers=2, vocab=128, batch=1, seq=32, warmup=1, rounds=2, steps=1, first_shape_s=10)


def throughput_configs() -> dict[str, Callable[[], Any]]:
    return {
        "QLoRA r16 (PEFT LoRA)": lambda: peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR
        ),
        "PEFT OFT b32": lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=ALL_LINEAR),
        "orthoft OFT b32": lambda: orthoft.OFTConfig(block_size=32, target_modules=ALL_LINEAR),
        "orthoft BOFT b8 m2": lambda: orthoft.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=ALL_LINEAR),
        "orthoft HRA r8": lambda: orthoft.HRAConfig(r=8, target_modules=ALL_LINEAR),
        "orthoft qGOFT": lambda: orthoft.QGOFTConfig(target_modules=ALL_LINEAR),
        "orthoft PSOFT r32": lambda: orthoft.PSOFTConfig(r=32, svd="lowrank", target_modules=ALL_LINEAR),
    }


@dataclass
class Candidate:
    name: str
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    resident: int = 0  # bytes this config keeps allocated between steps (model, optimizer state)
    build_s: float = 0.0
    trainable: int = 0
    seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    error: str | None = None


def memory_allocated(run: Run) -> int:
    return torch.cuda.memory_allocated() if run.device == "cuda" else 0


def train_step(candidate: Candidate, input_ids: torch.Tensor, run: Run) -> None:
    model, optimizer = candidate.model, candidate.optimizer
    with run.autocast():
        loss = model(input_ids=input_ids, labels=input_ids).loss  # includes the qGOFT/HRA penalty
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_candidate(
    name: str, make_config: Callable[[], Any], folder: Path, input_ids: torch.Tensor, run: Run, warmup: int
) -> Candidate:
    candidate = Candidate(name)
    before, start = memory_allocated(run), time.monotonic()
    try:
        compute_dtype = torch.bfloat16 if run.device == "cuda" else torch.float32
        model = peft.get_peft_model(load_llama(folder, "nf4", run.device, compute_dtype), make_config())
        params = [p for p in model.parameters() if p.requires_grad]
        candidate.model, candidate.trainable = model, sum(p.numel() for p in params)
        candidate.optimizer = torch.optim.AdamW(params, lr=1e-5)
        for _ in range(warmup):
            train_step(candidate, input_ids, run)
        run.synchronize()
    except Exception as error:  # noqa: BLE001 - one OOM or failure must not end the others
        candidate.model = candidate.optimizer = None
        candidate.error = error_text(error)
        free_memory(run)
    candidate.resident = memory_allocated(run) - before
    candidate.build_s = time.monotonic() - start
    return candidate


def time_round(candidate: Candidate, input_ids: torch.Tensor, run: Run, steps: int) -> None:
    """``steps`` steps; the peak counts this config's allocations only (the others stay resident)."""
    try:
        others = memory_allocated(run) - candidate.resident
        if run.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                train_step(candidate, input_ids, run)
            end.record()
            end.synchronize()
            candidate.seconds.append(start.elapsed_time(end) / 1000)
            candidate.peaks.append(torch.cuda.max_memory_allocated() - others)
        else:
            start_s = time.perf_counter()
            for _ in range(steps):
                train_step(candidate, input_ids, run)
            candidate.seconds.append(time.perf_counter() - start_s)
    except Exception as error:  # noqa: BLE001
        candidate.error = error_text(error)
        candidate.model = candidate.optimizer = None
        free_memory(run)


def bench_shape(label: str, shape: dict[str, int], setup: dict[str, int], run: Run, scratch: Path) -> list[dict]:
    config = dict(shape, num_hidden_layers=setup["layers"], vocab_size=setup["vocab"], tie_word_embeddings=False)
    folder = save_random_llama(
        scratch / f"llama-{label}", torch.bfloat16 if run.device == "cuda" else torch.float32, run.device, **config
    )
    input_ids = torch.randint(0, setup["vocab"], (setup["batch"], setup["seq"]), device=run.device)
    candidates = []
    for name, make in throughput_configs().items():
        if run.budget.left() < 20:
            candidates.append(Candidate(name, error="not built: time budget spent"))
            continue
        candidates.append(build_candidate(name, make, folder, input_ids, run, setup["warmup"]))
    shutil.rmtree(folder)  # the quantized copies are in memory; the checkpoint only costs disk now
    for round_index in range(setup["rounds"]):
        round_start = time.monotonic()
        for candidate in candidates:
            if candidate.model is not None:
                time_round(candidate, input_ids, run, setup["steps"])
        if round_index + 1 < setup["rounds"] and run.budget.left() < 1.5 * (time.monotonic() - round_start) + 20:
            break  # medians over fewer rounds rather than overrun the budget
    rows = [summarize(label, c, setup["steps"], setup["batch"] * setup["seq"]) for c in candidates]
    for candidate in candidates:
        candidate.model = candidate.optimizer = None
    free_memory(run)
    reference = rows[0]
    for row in rows:
        if row.get("tokens_per_s") and reference.get("tokens_per_s"):
            row["tokens_per_s_vs_qlora"] = row["tokens_per_s"] / reference["tokens_per_s"]
        if row.get("peak_mib") and reference.get("peak_mib"):
            row["peak_mib_vs_qlora"] = row["peak_mib"] / reference["peak_mib"]
    return rows


def summarize(label: str, candidate: Candidate, steps: int, tokens_per_step: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "shape": label,
        "config": candidate.name,
        "trainable": candidate.trainable,
        "build_s": round(candidate.build_s, 1),
        "rounds": len(candidate.seconds),
    }
    if candidate.seconds:
        median = statistics.median(candidate.seconds)
        row["tokens_per_s"] = steps * tokens_per_step / median
        row["ms_per_step"] = 1000 * median / steps
        row["seconds_per_round"] = [round(s, 4) for s in candidate.seconds]
    if candidate.peaks:
        row["peak_mib"] = statistics.median(candidate.peaks) / MIB
    if candidate.error:
        row["error"] = candidate.error
    return row


def section_throughput(run: Run) -> dict[str, Any]:
    setup = DRY_SETUP if run.dry_run else GPU_SETUP
    shapes = (
        {
            "tiny": {
                k: TINY_LLAMA[k]
                for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
            }
        }
        if run.dry_run
        else LLAMA_SHAPES
    )
    result: dict[str, Any] = {
        "setup": {
            **setup,
            "quantization": "nf4, double quantization",
            "optimizer": "AdamW",
            "autocast": "bf16" if run.device == "cuda" else "none (CPU float32)",
            "targets": ALL_LINEAR,
            "gradient_checkpointing": False,
        },
        "timings_meaningful": not run.dry_run,
        "rows": [],
        "skipped": [],
    }
    if not HAS_BNB:
        result["skipped"].append("all shapes: bitsandbytes is not installed (nf4 needs it)")
        return result
    previous: tuple[float, int] | None = None  # (seconds, hidden * intermediate) of the last shape run
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in shapes.items():
            size = shape["hidden_size"] * (shape["hidden_size"] + shape["intermediate_size"])
            predicted = setup["first_shape_s"] if previous is None else previous[0] * size / previous[1]
            if run.budget.left() < predicted:
                result["skipped"].append(f"{label}: about {predicted:.0f} s needed, {run.budget.left():.0f} s left")
                continue
            start = time.monotonic()
            try:
                result["rows"].extend(bench_shape(label, shape, setup, run, Path(tmp)))
            except Exception as error:  # noqa: BLE001
                result["skipped"].append(f"{label}: {error_text(error)}")
            previous = (time.monotonic() - start, size)
            print(f"  throughput {label}: {previous[0]:.0f} s", flush=True)
    return result


# ---- 4. Newton-Schulz ---------------------------------------------------------------------------

# (batch, rows, cols): OFT b32 skew blocks of a 8192-feature layer, HRA-like 4096x8, full matrices
NS_SHAPES_GPU = [(256, 32, 32), (1, 4096, 8), (1, 1024, 4096), (1, 4096, 4096)]
NS_SHAPES_DRY = [(16, 8, 8), (1, 64, 8), (1, 32, 64)]
ERROR_MAX_DIM = 1024  # float64 SVDs of larger matrices (smaller side) would eat the budget


# Kept here rather than taken from the library or eval/spectra.py: only orthogonalize, METHODS and
# DEFAULT_STEPS of orthoft.optim.newton_schulz are relied on, the rest is being reorganized.
def conditioned_matrices(batch: int, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random float32 matrices with singular values log-spaced from 1 to 0.1 (condition 10)."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(batch, rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, cols, k, generator=generator, dtype=torch.float64))
    singular_values = torch.logspace(0, -1, k, dtype=torch.float64)
    return ((u * singular_values) @ v.mT).float()


def max_sigma_deviation(x: torch.Tensor) -> float:
    """Largest ``|sigma - 1|`` over every matrix in ``x`` (float64 SVD): 0 for an exact polar factor."""
    return float((torch.linalg.svdvals(x.double()) - 1).abs().max())


def time_call(fn: Callable[[], torch.Tensor], run: Run, repeats: int) -> list[float]:
    for _ in range(3):
        fn()
    run.synchronize()
    times = []
    for _ in range(repeats):
        if run.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start_s))
    return times


def newton_schulz_row(method: str, inputs: list[torch.Tensor], run: Run, repeats: int) -> dict[str, Any]:
    calls = iter(range(10**9))

    def one_call() -> torch.Tensor:
        return newton_schulz.orthogonalize(inputs[next(calls) % len(inputs)], method=method, dtype=torch.bfloat16)

    shape = "x".join(str(d) for d in inputs[0].shape)
    row: dict[str, Any] = {
        "method": method,
        "shape": shape,
        "dtype": "bfloat16",
        "steps": newton_schulz.DEFAULT_STEPS[method],
    }
    try:
        times = time_call(one_call, run, repeats)
        row["ms_median"] = statistics.median(times)
        row["ms_min"] = min(times)
        if min(inputs[0].shape[-2:]) <= ERROR_MAX_DIM:
            row["orthogonality_error"] = max_sigma_deviation(one_call())
    except Exception as error:  # noqa: BLE001 - one failing shape must not end the others
        row["error"] = error_text(error)
    return row


def section_newton_schulz(run: Run) -> dict[str, Any]:
    shapes = NS_SHAPES_DRY if run.dry_run else NS_SHAPES_GPU
    repeats = 3 if run.dry_run else 20
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, m, n in shapes:
        # condition number 10, never zeros; two inputs alternate so repeats do not reuse one buffer
        inputs = [
            conditioned_matrices(batch, m, n, generator).to(run.device, torch.bfloat16).squeeze(0) for _ in range(2)
        ]
        rows += [newton_schulz_row(method, inputs, run, repeats) for method in newton_schulz.METHODS]
    for row in rows:
        keller = next(r for r in rows if r["shape"] == row["shape"] and r["method"] == "keller")
        if row.get("ms_median") and keller.get("ms_median"):
            row["speedup_vs_keller"] = keller["ms_median"] / row["ms_median"]
    return {
        "repeats": repeats,
        "timing": "CUDA events" if run.device == "cuda" else "perf_counter (CPU)",
        "timings_meaningful": not run.dry_run,
        "input": "singular values log-spaced 1..0.1",
        "rows": rows,
    }


def markdown_throughput(section: dict | None) -> list[str]:
    if section is None:
        return ["## 3. Throughput and peak memory", "", "not run (section not selected)", ""]
    s = section["setup"]
    head = [
        "## 3. Throughput and peak memory (nf4 base)",
        "",
        f"Random-init Llama shapes with {s['layers']} decoder layers, vocabulary {s['vocab']}, batch {s['batch']} x "
        f"sequence {s['seq']}; {s['quantization']}; all linear layers adapted; {s['optimizer']}; autocast "
        f"{s['autocast']}; no gradient checkpointing. Every config resident at once, {s['rounds']} rounds of "
        f"{s['steps']} steps round-robin after {s['warmup']} warm-up steps; medians. Peak: this config's "
        "`max_memory_allocated` (model, optimizer state, activations) during its steps."
        + ("" if section["timings_meaningful"] else " DRY RUN: CPU timings of tiny shapes, meaningless."),
        "",
    ]
    rows = [
        [
            r["shape"],
            r["config"],
            f"{r['trainable']:,}",
            fmt(r.get("tokens_per_s"), ".0f"),
            fmt(r.get("tokens_per_s_vs_qlora"), ".2f"),
            fmt(r.get("peak_mib"), ".0f"),
            fmt(r.get("peak_mib_vs_qlora"), ".3f"),
            str(r["rounds"]),
            r.get("error", ""),
        ]
        for r in section["rows"]
    ]
    return (
        head
        + table(
            ["shape", "config", "trainable", "tokens/s", "vs QLoRA", "peak MiB", "vs QLoRA", "rounds", "error"], rows
        )
        + [f"- skipped: {x}" for x in section["skipped"]]
        + [""]
    )


def markdown_newton_schulz(section: dict | None) -> list[str]:
    if section is None:
        return ["## 4. Newton-Schulz", "", "not run (section not selected)", ""]
    rows = [
        [
            r["shape"],
            r["method"],
            str(r["steps"]),
            fmt(r.get("ms_median"), ".4f"),
            fmt(r.get("ms_min"), ".4f"),
            fmt(r.get("speedup_vs_keller"), ".2f"),
            fmt(r.get("orthogonality_error"), ".3f"),
            r.get("error", ""),
        ]
        for r in section["rows"]
    ]
    note = "" if section["timings_meaningful"] else " DRY RUN: CPU timings, meaningless."
    return [
        "## 4. Newton-Schulz (bf16)",
        "",
        f"`orthogonalize` per call, {section['timing']}, median of "
        f"{section['repeats']}; input {section['input']}; error: max |sigma - 1| of the result (float64 SVD, "
        f"smaller side up to {ERROR_MAX_DIM}).{note}",
        "",
    ] + table(["shape", "method", "steps", "ms median", "ms min", "vs keller", "max abs(sigma-1)", "error"], rows)
