"""Step time and memory of every orthoft method against LoRA and PEFT's own implementations, per layer shape.

The model is two adapted ``Linear(d, d)`` layers (``q`` and ``v``) reading the same 512 tokens;
a step is forward, a mean-square loss on both outputs and backward. By default the input
requires a gradient, as every hidden state past the first adapted layer of a model does, so the
base layers' input-gradient GEMMs are part of every method's step and the ratios show the
adapters' own cost. ``--no-input-grad`` benchmarks a model's first adapted layer instead: there
LoRA skips the input gradient while input-side methods (OFT, BOFT, qGOFT, HRA) must push the
gradient through the frozen weight to reach their rotation (one extra ``N x d x d`` GEMM per layer,
inherent to ``W R^T``; end to end it is 3 of SmolLM2's 210 adapted layers).

Methods are timed round-robin in one process per shape (``--rounds`` rounds of ``--steps``
steps, median per method), so load drifts hit all of them alike. On the CPU the clock is the
process's CPU time (``--clock cpu``, the default there): on a shared machine wall time mostly
measures the scheduler, while the CPU time of a 1-thread process is the work a step does (run
with ``OMP_NUM_THREADS=1``; with more threads it sums them). ``--memory`` runs each method
once more in its own subprocess and reports the peak resident memory the steps add above the
built model (CPU; glibc is told to return every large block, so RSS follows live tensors) or
``max_memory_allocated`` (CUDA). ``--profile`` prints the torch.profiler op table of each
selected method (forward and backward ranges) instead of timing.

    python eval/bench_layers.py                          # d = 576, 1024, 2048, 4096; ~10 min on 1 thread
    python eval/bench_layers.py --dims 1024 --memory     # one shape, with peak memory
    python eval/bench_layers.py --dims 2048 --only lora_r8 oft_b32 --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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

TARGETS = ["q", "v"]


@dataclass
class Bench:
    name: str
    make_config: Callable[[], peft.PeftConfig]
    compare_to: str | None = None  # PEFT's implementation of the same method
    note: str = ""
    max_dim: int | None = None  # skipped above this width (setup cost, e.g. a full SVD per layer)


def _ours(config_name: str, **kwargs) -> Callable[[], peft.PeftConfig]:
    return lambda: getattr(orthoft, config_name)(target_modules=TARGETS, **kwargs)


def benches() -> list[Bench]:
    """Every method at the settings its paper or PEFT uses by default, LoRA r8 as the reference."""
    return [
        Bench("lora_r8", lambda: peft.LoraConfig(r=8, target_modules=TARGETS)),
        Bench("peft_oft_b32", lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS)),
        Bench("oft_b32", _ours("OFTConfig", block_size=32), "peft_oft_b32"),
        Bench("oft_b32_exact", _ours("OFTConfig", block_size=32, use_exact_cayley=True), "peft_oft_b32"),
        Bench(
            "peft_boft_m2_b8",
            lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS),
            note="PEFT runs m=1 without its CUDA extension",
        ),
        Bench("boft_m2_b8", _ours("BOFTConfig", block_size=8, n_butterfly_factor=2), "peft_boft_m2_b8"),
        Bench("peft_hra_r8", lambda: peft.HRAConfig(r=8, target_modules=TARGETS)),
        Bench("hra_r8", _ours("HRAConfig", r=8), "peft_hra_r8"),
        Bench("qgoft", _ours("QGOFTConfig")),
        Bench("goft_strict", _ours("QGOFTConfig", strict=True)),
        Bench("peft_psoft_r32", lambda: peft.PsoftConfig(r=32, target_modules=TARGETS)),
        Bench("psoft_r32", _ours("PSOFTConfig", r=32), "peft_psoft_r32"),
        Bench("svft_banded_full", _ours("SVFTConfig"), note="default: full bases", max_dim=2048),
        Bench("svft_plain_full", _ours("SVFTConfig", pattern="plain"), note="full bases", max_dim=2048),
        Bench("svft_banded_r128", _ours("SVFTConfig", rank=128, svd="lowrank"), note="truncated bases"),
    ]


class QV(nn.Module):
    """Two projections of the same hidden states, like an attention block's q and v."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(x), self.v(x)


def build_base(dim: int, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    return QV(dim).to(device=device, dtype=dtype)


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
    q, v = model(x)
    (q.float().square().mean() + v.float().square().mean()).backward()
    model.zero_grad(set_to_none=True)
    x.grad = None


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, device: str, clock: str = "cpu") -> float:
    """Seconds per step: CPU time of this process (``clock="cpu"``) or wall time."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    synchronize(device)
    start = timer()
    for _ in range(steps):
        step(model, x)
    synchronize(device)
    return (timer() - start) / steps


def make_input(args: argparse.Namespace, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.tokens, dim, generator=generator, dtype=torch.float32)
    return x.to(device=args.device, dtype=getattr(torch, args.dtype)).requires_grad_(args.input_grad)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) // len(TARGETS)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("bench_layers: /proc/self/status has no VmHWM line (not Linux?)")


def measure_memory(args: argparse.Namespace, name: str, dim: int) -> float:
    """Peak memory (MiB) a training step adds above the built model, for one method (in a memory child)."""
    bench = {b.name: b for b in benches()}[name]
    model = wrap(bench, build_base(dim, getattr(torch, args.dtype), args.device))
    x = make_input(args, dim)
    step(model, x)  # lazy buffers and caches are part of the model, not of the step
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            step(model, x)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-RSS mark to the current RSS
    before = _rss_bytes()
    for _ in range(2):
        step(model, x)
    return max(_peak_rss_bytes() - before, 0) / 2**20


def memory_in_subprocess(args: argparse.Namespace, name: str, dims: list[int]) -> dict[int, float]:
    """Peak step memory of one method at each width, measured one width after the other in a fresh process."""
    child = [sys.executable, __file__, "--_memory-child", name, "--dims", *map(str, dims)]
    for flag in ("tokens", "dtype", "device"):
        child += [f"--{flag}", str(getattr(args, flag))]
    if not args.input_grad:
        child.append("--no-input-grad")
    # large blocks straight from mmap and back on free: RSS then follows live tensors, not the heap's high mark
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(child, capture_output=True, text=True, check=True, env=env).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def profile(models: dict[str, nn.Module], x: torch.Tensor, rows: int) -> None:
    """torch.profiler op table (self CPU time) of one step of each model, forward and backward as ranges."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    for name, model in models.items():
        step(model, x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                with record_function("forward"):
                    q, v = model(x)
                    loss = q.float().square().mean() + v.float().square().mean()
                with record_function("backward"):
                    loss.backward()
                model.zero_grad(set_to_none=True)
                x.grad = None
        print(f"\n=== {name}: 2 steps, d={x.shape[-1]}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def bench_dim(args: argparse.Namespace, dim: int, selected: list[Bench]) -> list[dict]:
    selected = [b for b in selected if b.max_dim is None or dim <= b.max_dim]
    dtype = getattr(torch, args.dtype)
    base = build_base(dim, dtype, args.device)
    x = make_input(args, dim)
    models = {b.name: wrap(b, base) for b in selected}
    if args.profile:
        profile(models, x, args.profile_rows)
        return []
    for model in models.values():  # warm-up: allocator, caches, lazy buffers
        time_steps(model, x, 1, args.device)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            samples[name].append(time_steps(model, x, args.steps, args.device, args.clock))
    times = {name: statistics.median(v) for name, v in samples.items()}
    memory = {b.name: args.memory_by_method[b.name][dim] for b in selected} if args.memory else {}
    rows = []
    for bench in selected:
        t = times[bench.name]
        rows.append(
            {
                "dim": dim,
                "method": bench.name,
                "params_per_layer": trainable(models[bench.name]),
                "ms_per_step": 1000 * t,
                "time_vs_lora": t / times["lora_r8"] if "lora_r8" in times else None,
                "speedup_vs_peft": times[bench.compare_to] / t if bench.compare_to in times else None,
                "peak_mib": memory.get(bench.name),
                "memory_vs_lora": memory[bench.name] / memory["lora_r8"] if "lora_r8" in memory else None,
                "note": bench.note,
            }
        )
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    grad = "input requires grad" if args.input_grad else "input without grad (first adapted layer)"
    print(
        f"\n2 x Linear(d, d) (q, v), {args.tokens} tokens, fwd+bwd, {grad}, {args.dtype} on {args.device}, "
        f"torch threads {torch.get_num_threads()}, {args.clock} time, median of {args.rounds} round-robin rounds "
        f"x {args.steps} steps"
    )
    memory = any(r["peak_mib"] is not None for r in rows)
    header = f"{'d':>5} {'method':<18}{'params/layer':>13}{'ms/step':>10}{'vs LoRA':>9}{'vs PEFT':>9}"
    header += f"{'peak MiB':>10}{'vs LoRA':>9}" if memory else ""
    print(header + "  note")
    for row in rows:
        line = f"{row['dim']:>5} {row['method']:<18}{row['params_per_layer']:>13,}{row['ms_per_step']:>10.1f}"
        line += f"{row['time_vs_lora']:>8.2f}x" if row["time_vs_lora"] else f"{'':>9}"
        line += f"{row['speedup_vs_peft']:>8.2f}x" if row["speedup_vs_peft"] else f"{'':>9}"
        if memory:
            line += f"{row['peak_mib']:>10.0f}" if row["peak_mib"] is not None else f"{'':>10}"
            line += f"{row['memory_vs_lora']:>8.2f}x" if row["memory_vs_lora"] else f"{'':>9}"
        print(line + (f"  {row['note']}" if row["note"] else ""))
    print("vs LoRA: time (memory) / LoRA r8's, lower is better; vs PEFT: PEFT's step time / ours, higher is better")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu" if not torch.cuda.is_available() else "wall",
        help="cpu: CPU time of this process (robust on a shared machine; with 1 thread it is the step's work); "
        "wall: elapsed time (use on an idle machine or a GPU)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-input-grad", dest="input_grad", action="store_false", help="first-layer setting")
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess each")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per method, no timing")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        peaks = {dim: measure_memory(args, args.memory_child, dim) for dim in args.dims}
        print(json.dumps(peaks))
        return
    selected = [b for b in benches() if not args.only or b.name in args.only]
    if args.memory and not args.profile:
        args.memory_by_method = {
            b.name: memory_in_subprocess(args, b.name, [d for d in args.dims if b.max_dim is None or d <= b.max_dim])
            for b in selected
        }
    rows = []
    for dim in args.dims:
        rows += bench_dim(args, dim, selected)
    if rows:
        print_table(rows, args)
    if args.json:
        with open(args.json, "w") as handle:
            options = {k: v for k, v in vars(args).items() if k != "memory_by_method"}
            json.dump({"args": options, "threads": torch.get_num_threads(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
