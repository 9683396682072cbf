"""End to end: SmolLM2-135M in nf4, every linear layer adapted, step time and peak memory per method.

QLoRA (PEFT LoRA r8), PEFT's OFT/BOFT/HRA/PSOFT and every orthoft method fine-tune the embedded
SmolLM2-135M-Instruct (``orthoft.defaults``, no hub) loaded in bitsandbytes nf4 with float32
compute, ``target_modules="all-linear"`` (q/k/v/o and gate/up/down of the 30 blocks; CLOVER: its
attention projections), on batches of 4 x 128 Hamlet tokens: forward, causal-LM loss (plus the
method's regularizer where it has one, as ``orthoft train`` adds it), backward, AdamW step.

One fresh process per method: ``--warmup`` steps, then ``--steps`` timed steps (median of the
process's CPU time per step by default, ``--clock cpu``: with ``OMP_NUM_THREADS=1`` that is the
work a step does, which a shared machine's scheduler does not inflate; wall time is reported
too, and ``--clock wall`` ranks by it). Then
glibc is told to hand every free and every future large block back to the OS, the peak-RSS
mark is reset and ``--memory-steps`` more steps run: their peak RSS is the whole process while
training (model, optimizer state, activations), with freed heap from loading not hiding what a
method allocates. ``--repeats N`` runs the whole list N times (medians over repeats), so a load
drift on the machine hits every method.

    python eval/bench_e2e.py                               # all methods, ~1 min each on 1 thread
    python eval/bench_e2e.py --only qlora oft boft --json out.json

Ratios: time and memory over QLoRA's (lower is better); ``vs PEFT`` is PEFT's step time over
ours for the same method (higher is better). PEFT methods without bitsandbytes layers (BOFT, HRA,
PSOFT in PEFT 0.21) cannot run on the nf4 model; their rows say so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# name -> (family, options, PEFT twin); family "peft" takes peft.<Config>, "orthoft" orthoft.<Config>
METHODS: dict[str, tuple[str, str, dict, str | None]] = {
    "qlora_r8": ("peft", "LoraConfig", {"r": 8, "lora_alpha": 16}, None),
    "peft_oft_b32": ("peft", "OFTConfig", {"r": 0, "oft_block_size": 32, "use_cayley_neumann": True}, None),
    "peft_boft_m2_b8": ("peft", "BOFTConfig", {"boft_block_size": 8, "boft_n_butterfly_factor": 2}, None),
    "peft_hra_r8": ("peft", "HRAConfig", {"r": 8}, None),
    "peft_psoft_r32": ("peft", "PsoftConfig", {"r": 32}, None),
    "oft_b32": ("orthoft", "OFTConfig", {"block_size": 32}, "peft_oft_b32"),
    "boft_m2_b8": ("orthoft", "BOFTConfig", {"block_size": 8, "n_butterfly_factor": 2}, "peft_boft_m2_b8"),
    "qgoft": ("orthoft", "QGOFTConfig", {}, None),
    "hra_r8": ("orthoft", "HRAConfig", {"r": 8}, "peft_hra_r8"),
    "psoft_r32": ("orthoft", "PSOFTConfig", {"r": 32}, "peft_psoft_r32"),
    "svft_banded_full": ("orthoft", "SVFTConfig", {}, None),
    "svft_banded_r64": ("orthoft", "SVFTConfig", {"rank": 64, "svd": "lowrank"}, None),
    "clover": ("orthoft", "CLOVERConfig", {"target_modules": None}, None),
    "orthogonal_adaptation_r8": ("orthoft", "OrthogonalAdaptationConfig", {"rank": 8}, None),
}
REFERENCE = "qlora_r8"


def _mallopt_release() -> None:
    """Return free heap to the OS and serve every later block >= 64 KiB from mmap, so RSS follows live memory."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)
    libc.malloc_trim(0)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("bench_e2e: /proc/self/status has no VmHWM line (not Linux?)")


def build(name: str, batch: int, seq: int):
    """The adapted nf4 model, its optimizer and one fixed batch of Hamlet tokens."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import orthoft
    from orthoft import defaults
    from orthoft.adapters.base import keep_bnb_4bit_unpacked

    family, config_name, options, _ = METHODS[name]
    path = str(defaults.smollm2_path())
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", dtype=torch.float32)
    for module in model.modules():  # same bitsandbytes layout for every method (see keep_bnb_4bit_unpacked)
        keep_bnb_4bit_unpacked(module)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    options = {"target_modules": "all-linear", "task_type": "CAUSAL_LM", **options}
    if options["target_modules"] is None:
        del options["target_modules"]
    config = getattr(peft if family == "peft" else orthoft.adapters, config_name)(**options)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, config)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(defaults.hamlet_text()[:20000], return_tensors="pt").input_ids[0]
    tokens = ids[: batch * seq].reshape(batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    penalty = getattr(orthoft, "regularization_loss", None) if family == "orthoft" else None
    return model, optimizer, tokens, penalty, sum(p.numel() for p in params)


def child(name: str, args: argparse.Namespace) -> dict:
    import torch

    start = time.perf_counter()
    model, optimizer, tokens, penalty, trainable = build(name, args.batch, args.seq)
    setup_s = time.perf_counter() - start

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        if penalty is not None:
            extra = penalty(model)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    _mallopt_release()
    _reset_peak_rss()
    for _ in range(args.memory_steps):
        step()
    return {
        "method": name,
        "trainable": trainable,
        "setup_s": setup_s,
        "step_s": statistics.median(cpu_times if args.clock == "cpu" else times),
        "wall_step_s": statistics.median(times),
        "cpu_step_s": statistics.median(cpu_times),
        "clock": args.clock,
        "peak_rss_mib": _peak_rss_bytes() / 2**20,
        "lifetime_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": loss,
        "threads": torch.get_num_threads(),
    }


def run_child(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--_child", name]
    for flag in ("batch", "seq", "warmup", "steps", "memory_steps", "clock"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": name, "error": error[:200]}
    return json.loads(lines[-1])


def summarize(samples: dict[str, list[dict]]) -> list[dict]:
    rows = {}
    for name, runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows[name] = {"method": name, "error": runs[-1]["error"]}
            continue
        rows[name] = {
            "method": name,
            "trainable": ok[0]["trainable"],
            "step_s": statistics.median(r["step_s"] for r in ok),
            "wall_step_s": statistics.median(r["wall_step_s"] for r in ok),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
            "lifetime_max_rss_mib": statistics.median(r["lifetime_max_rss_mib"] for r in ok),
            "runs": ok,
        }
    ref = rows.get(REFERENCE, {})
    for name, row in rows.items():
        if "error" in row:
            continue
        if "step_s" in ref:
            row["time_vs_qlora"] = row["step_s"] / ref["step_s"]
            row["memory_vs_qlora"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
        twin = rows.get(METHODS[name][3] or "", {})
        if "step_s" in twin:
            row["speedup_vs_peft"] = twin["step_s"] / row["step_s"]
    return list(rows.values())


def print_table(rows: list[dict], args: argparse.Namespace, threads: int | None) -> None:
    print(
        f"\nSmolLM2-135M nf4 (float32 compute), all-linear, batch {args.batch} x {args.seq} tokens, fwd+bwd+AdamW, "
        f"torch threads {threads}, {args.clock} time; median of {args.steps} steps after {args.warmup} warm-up, "
        f"{args.repeats} process(es) per method"
    )
    print(
        f"{'method':<26}{'trainable':>11}{'s/step':>9}{'wall s':>8}{'vs QLoRA':>10}{'vs PEFT':>9}"
        f"{'peak RSS MiB':>14}{'vs QLoRA':>10}{'max RSS MiB':>13}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<26}  failed: {row['error']}")
            continue
        line = f"{row['method']:<26}{row['trainable']:>11,}{row['step_s']:>9.2f}{row['wall_step_s']:>8.2f}"
        line += f"{row['time_vs_qlora']:>9.2f}x" if "time_vs_qlora" in row else f"{'':>10}"
        line += f"{row['speedup_vs_peft']:>8.2f}x" if "speedup_vs_peft" in row else f"{'':>9}"
        line += f"{row['peak_rss_mib']:>14.0f}"
        line += f"{row['memory_vs_qlora']:>9.2f}x" if "memory_vs_qlora" in row else f"{'':>10}"
        print(line + f"{row['lifetime_max_rss_mib']:>13.0f}")
    print(
        "peak RSS: the whole process during training steps; max RSS: its lifetime maximum (includes loading). "
        "vs PEFT: PEFT's step time / ours."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help=f"methods (default: all of {', '.join(METHODS)})")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="what s/step and its ratios use: CPU time of the process (robust on a shared machine; the step's "
        "work with OMP_NUM_THREADS=1) or wall time",
    )
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    names = args.only or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if REFERENCE not in names:
        names = [REFERENCE, *names]
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            result = run_child(name, args)
            samples[name].append(result)
            status = result.get("error") or f"{result['step_s']:.2f} s/step, {result['peak_rss_mib']:.0f} MiB"
            print(f"[{repeat + 1}/{args.repeats}] {name}: {status}", flush=True)
    rows = summarize(samples)
    threads = next((r["runs"][0]["threads"] for r in rows if "runs" in r), None)
    print_table(rows, args, threads)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
