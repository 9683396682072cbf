"""Step time and memory of every orthoft method against PEFT's implementations and LoRA.

One stack of ``--layers`` square Linear layers (``--dim``, default 2048) and ``--tokens``
tokens (default 512); a step is forward, a mean-square loss and backward. Methods are timed
round-robin in the same process (``--rounds`` rounds of ``--steps`` steps, median per method),
so machine load drifts hit all of them alike; the table reports ratios to LoRA and, where PEFT
has the same method, to PEFT. ``--memory`` runs each method once more in its own subprocess
and reports the peak resident memory the steps add (CPU) or ``max_memory_allocated`` (CUDA).

    python eval/bench_layers.py                   # all methods, CPU, d=2048, 512 tokens
    python eval/bench_layers.py --only oft boft peft_boft --dim 1024
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

# Spinning OpenMP barriers make small batched matmuls ~100x slower when another process shares the
# cores; must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import orthoft  # noqa: E402


@dataclass
class Bench:
    name: str
    make_config: Callable[[], peft.PeftConfig]
    compare_to: str | None = None  # PEFT's implementation of the same method
    note: str = ""


def _optional(config_name: str, **kwargs) -> Callable[[], peft.PeftConfig]:
    def make() -> peft.PeftConfig:
        return getattr(orthoft, config_name)(target_modules=TARGETS, **kwargs)

    return make


TARGETS = ["0", "1", "2", "3"]


def benches() -> list[Bench]:
    """Every method at the settings its paper or PEFT uses by default, and LoRA at a similar budget."""
    items = [
        Bench("lora_r8", lambda: peft.LoraConfig(r=8, target_modules=TARGETS)),
        Bench("lora_r4", lambda: peft.LoraConfig(r=4, target_modules=TARGETS)),
        Bench(
            "peft_oft_b32",
            lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS, use_cayley_neumann=True),
        ),
        Bench("oft_b32", lambda: orthoft.OFTConfig(block_size=32, target_modules=TARGETS), "peft_oft_b32"),
        Bench(
            "oft_b32_exact",
            lambda: orthoft.OFTConfig(block_size=32, use_exact_cayley=True, target_modules=TARGETS),
            "peft_oft_b32",
        ),
        Bench(
            "peft_boft_m2_b8",
            lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS),
            note="PEFT silently runs m=1 without its CUDA extension",
        ),
        Bench(
            "boft_m2_b8",
            lambda: orthoft.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=TARGETS),
            "peft_boft_m2_b8",
        ),
    ]
    if hasattr(orthoft, "HRAConfig"):
        items += [
            Bench("peft_hra_r8", lambda: peft.HRAConfig(r=8, target_modules=TARGETS)),
            Bench("hra_r8", _optional("HRAConfig", r=8), "peft_hra_r8"),
        ]
    if hasattr(orthoft, "QGOFTConfig"):
        items += [
            Bench("qgoft_quasi", _optional("QGOFTConfig")),
            Bench("goft_strict", _optional("QGOFTConfig", strict=True)),
        ]
    if hasattr(orthoft, "PSOFTConfig"):
        items += [
            Bench("peft_psoft_r64", lambda: peft.PsoftConfig(r=64, target_modules=TARGETS)),
            Bench("psoft_r64", _optional("PSOFTConfig", r=64), "peft_psoft_r64"),
        ]
    if hasattr(orthoft, "SVFTConfig"):
        items += [
            Bench("svft_plain_full", _optional("SVFTConfig", pattern="plain"), note="full bases, 2 dense products"),
            Bench("svft_banded_full", _optional("SVFTConfig", pattern="banded"), note="full bases"),
            Bench(
                "svft_banded_r256",
                _optional("SVFTConfig", pattern="banded", rank=256),
                note="truncated bases, residual frozen",
            ),
        ]
    return items


def build_stack(dim: int, layers: int, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)]).to(device=device, dtype=dtype)


def wrap(bench: Bench, base: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), bench.make_config())
    # start away from the identity so no method can take an init-only shortcut
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    return model


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, x)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def trainable_per_layer(model: nn.Module, layers: int) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) // layers


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(args: argparse.Namespace, name: str) -> float:
    """Peak memory (MiB) the training steps add, for one method in a fresh process."""
    bench = {b.name: b for b in benches()}[name]
    base = build_stack(args.dim, args.layers, getattr(torch, args.dtype), args.device)
    model = wrap(bench, base)
    x = torch.randn(1, args.tokens, args.dim, device=args.device, dtype=getattr(torch, args.dtype))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step(model, x)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = rss_bytes()
    for _ in range(3):
        step(model, x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - before, 0) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess each")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        print(json.dumps({"peak_mib": measure_memory(args, args.memory_child)}))
        return

    selected = [b for b in benches() if not args.only or b.name in args.only]
    dtype = getattr(torch, args.dtype)
    base = build_stack(args.dim, args.layers, dtype, args.device)
    x = torch.randn(1, args.tokens, args.dim, device=args.device, dtype=dtype)
    models = {b.name: wrap(b, base) for b in selected}
    for model in models.values():  # warm-up: allocator, caches, lazy buffers
        time_steps(model, x, 1, args.device)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            samples[name].append(time_steps(model, x, args.steps, args.device))
    times = {name: statistics.median(v) for name, v in samples.items()}

    memory: dict[str, float] = {}
    if args.memory:
        for bench in selected:
            child = [sys.executable, __file__, "--_memory-child", bench.name]
            for flag in ("dim", "layers", "tokens", "dtype", "device"):
                child += [f"--{flag}", str(getattr(args, flag))]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            memory[bench.name] = json.loads(out.strip().splitlines()[-1])["peak_mib"]

    lora = times.get("lora_r8")
    print(
        f"\n{args.layers} x Linear({args.dim}, {args.dim}), {args.tokens} tokens, {args.dtype} on {args.device}, "
        f"torch threads {torch.get_num_threads()}; median of {args.rounds} rounds x {args.steps} steps"
    )
    header = f"{'method':<20}{'params/layer':>13}{'ms/step':>10}{'vs LoRA r8':>12}{'vs PEFT':>10}"
    header += f"{'peak MiB':>10}" if memory else ""
    print(header + "  note")
    rows = []
    for bench in selected:
        t = times[bench.name]
        vs_peft = times[bench.compare_to] / t if bench.compare_to in times else None
        row = {
            "method": bench.name,
            "params_per_layer": trainable_per_layer(models[bench.name], args.layers),
            "ms_per_step": 1000 * t,
            "lora_r8_time_ratio": t / lora if lora else None,
            "speedup_vs_peft": vs_peft,
            "peak_mib": memory.get(bench.name),
        }
        rows.append(row)
        line = f"{bench.name:<20}{row['params_per_layer']:>13,}{row['ms_per_step']:>10.1f}"
        line += f"{row['lora_r8_time_ratio']:>11.2f}x" if lora else f"{'':>12}"
        line += f"{vs_peft:>9.2f}x" if vs_peft else f"{'':>10}"
        line += f"{memory[bench.name]:>10.0f}" if memory else ""
        print(line + (f"  {bench.note}" if bench.note else ""))
    print("vs LoRA r8: step time / LoRA's (lower is better); vs PEFT: PEFT's step time / ours (higher is better)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
